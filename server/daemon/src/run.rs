//! `est-server run` (and `est-server` without a subcommand): load the data directory, start
//! the service on a tokio runtime, and stop cleanly on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use est_server::{config::Config, datadir, service};

use crate::cli::RunArgs;
use crate::commands::{ensure_init, init_logging};

pub(crate) fn run(data_dir: &Path, args: RunArgs) -> Result<()> {
    let config_given = args.config.is_some();
    if !config_given {
        ensure_init(data_dir)?;
    }
    let config: Config = datadir::load_config(data_dir, args.config.as_deref())?;
    init_logging(config.server.log_format == "json");
    let worker_threads = config.server.worker_threads;
    let keys = if args.allow_insecure_key_permissions {
        datadir::KeyPermissions::AllowInsecure
    } else {
        datadir::KeyPermissions::Strict
    };
    let loaded = datadir::load_with(data_dir, config, keys)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    let rt = builder.enable_all().thread_name("est-io").build()?;
    rt.block_on(async move {
        // The handlers go in before anything is announced: a supervisor (or a test) that sends
        // SIGTERM as soon as it reads "listening" must get a clean shutdown, not the default
        // action's kill.
        let shutdown = ShutdownSignal::install();
        // SIGHUP: re-read the DTLS certificate (after `est-server dtls renew`), the
        // manufacturer CRLs and the revocations, without a restart.
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let server = service::start(loaded, args.listen).await?;
        let addr = server.local_addr;
        tracing::info!(%addr, data_dir = %data_dir.display(), "est-server listening (coaps, DTLS 1.2)");
        println!("est-server listening on coaps://{addr} (UDP, DTLS 1.2), data in {}", data_dir.display());
        println!("EST resources: coaps://{addr}/.well-known/est/{{crts,sen,sren,att,skg,skc}}, discovery at /.well-known/core");
        println!("enroll a demo meter:");
        println!("  est-server factory mint --data-dir {} --serial SN0001 --out meter", data_dir.display());
        println!("  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout meter/ldevid.key -subj /serialNumber=SN0001 -outform DER -out meter/csr.der");
        println!(
            "  coap-client-gnutls -m post -b 64 -t 286 -A 287 -f meter/csr.der -c meter/SN0001/idevid-chain.pem -j meter/SN0001/idevid.key -C meter/implicit-ta.pem -o meter/ldevid.der coaps://{}/.well-known/est/sen",
            display_host(addr)
        );
        let stop = shutdown.recv();
        tokio::pin!(stop);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                _ = &mut stop => break,
                _ = hup => {
                    tracing::info!("SIGHUP: reloading");
                    if let Err(e) = server.reload().await {
                        tracing::error!(error = %format!("{e:#}"), "reload failed; the previous certificate and CRLs stay in use");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })
}

fn display_host(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// SIGTERM or SIGINT (Ctrl-C), with the handlers registered when this is made.
struct ShutdownSignal {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            ShutdownSignal {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            ShutdownSignal {}
        }
    }

    async fn recv(self) {
        #[cfg(unix)]
        {
            async fn next(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = next(self.terminate) => {},
                _ = next(self.interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
