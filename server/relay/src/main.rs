//! `est-relay`: a DCU's join proxy. See `est-relay --help` and `est-relay --print-config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use est_relay::config::{FileConfig, DEFAULT_CONFIG_TOML};
use est_relay::Mode;

/// Relays meters' DTLS enrollment traffic to est-server (draft-ietf-anima-constrained-join-proxy).
#[derive(Parser, Debug)]
#[command(name = "est-relay", version)]
struct Args {
    /// Join port: where meters send DTLS and CoAP discovery (repeat for more interfaces).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// A registrar: its JPY port (stateless) or coaps port (stateful); repeat for failover,
    /// in order of preference.
    #[arg(long, value_name = "ADDR:PORT")]
    registrar: Vec<SocketAddr>,
    /// stateless (JPY) or stateful (a UDP circuit per meter).
    #[arg(long)]
    mode: Option<Mode>,
    /// TOML configuration (see --print-config); options above replace its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    if !args.listen.is_empty() {
        file.listen = args.listen.clone();
    }
    if !args.registrar.is_empty() {
        file.registrars = args.registrar.clone();
    }
    if let Some(m) = args.mode {
        file.mode = m;
    }
    init_logging(&file.log_format);
    // One thread is plenty for a DCU; the core is single-threaded anyway.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut relay = est_relay::driver::start(&file).await?;
        let joins: Vec<String> = relay.join_addrs.iter().map(ToString::to_string).collect();
        // One line on stdout with the bound addresses (ports may have been chosen by the system).
        println!(
            "est-relay {} listening on {} jpy_from {} registrars {}",
            relay.mode,
            joins.join(","),
            relay
                .jpy_addr
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            file.registrars
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        tracing::info!(mode = %relay.mode, listen = ?relay.join_addrs, jpy_from = ?relay.jpy_addr, registrars = ?file.registrars, "est-relay started");
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                relay.shutdown().await;
            }
            _ = relay.wait() => {}
        }
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
