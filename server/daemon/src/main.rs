//! `est-server`: EST-coaps (RFC 9148) enrollment server for field devices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use est_server::{config::Config, datadir, factory, service};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: the DTLS path allocates, copies and frees many small
/// buffers across threads; measured -5% server CPU per enrollment on top of LTO (loadtest,
/// 64 meters). `no_thp`: no huge-page advice, so the resident set stays small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EST-coaps (RFC 9148) enrollment server for smart meters and other field devices.
///
/// Meters authenticate over DTLS 1.2 with their manufacturer certificate (IDevID) and
/// receive an operational certificate (LDevID) at coaps://HOST:5684/.well-known/est/sen;
/// they re-enroll at /sren with it. Run without arguments to start a working server on
/// built-in defaults: it creates ./est-data (CA, demo manufacturer CA, DTLS certificate,
/// documented est-server.toml, SQLite store) on first start.
#[derive(Parser, Debug)]
#[command(name = "est-server", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Data directory holding keys, certificates, est-server.toml and the store.
    #[arg(long, global = true, env = "EST_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the data directory: issuing CA, demo manufacturer CA, DTLS certificate,
    /// est-server.toml and the store. Keeps an existing one untouched.
    Init {
        /// Extra DNS names or IP addresses for the server's DTLS certificate
        /// (localhost, 127.0.0.1 and ::1 are always included). Repeatable.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Run the server (initialising the data directory first if it does not exist).
    Run(RunArgs),
    /// Meter factory tools: mint IDevIDs signed by the demo manufacturer CA.
    #[command(subcommand)]
    Factory(FactoryCommand),
    /// Inspect issued certificates in the store.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage the device allowlist (used when policy.require_device_allowlist = true).
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// C509 tools for meter vendors: convert certificates and CSRs between DER and C509
    /// (draft-ietf-cose-cbor-encoded-cert, type 3: lossless re-encoding).
    #[command(subcommand)]
    C509(C509Command),
    /// Show the most recent audit events (every enrollment attempt, allowed or refused).
    Audit {
        /// How many events to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Configuration file (default: <data-dir>/est-server.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on, overriding server.listen (e.g. 127.0.0.1:5684).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum FactoryCommand {
    /// Mint IDevID certificates and keys as a meter factory would.
    ///
    /// Writes OUT/<serial>/idevid.pem, idevid.key (0600), idevid-chain.pem, plus
    /// OUT/fleet.json, OUT/manufacturer-ca.pem and OUT/implicit-ta.pem (the trust anchor
    /// for the server's DTLS certificate). The output of `--count N` is what
    /// `client-sim --fleet OUT` reads.
    Mint {
        /// Serial number of a single device (goes into subject serialNumber and the
        /// hardwareModuleName SAN).
        #[arg(long, conflicts_with = "count")]
        serial: Option<String>,
        /// Mint a fleet of N devices with serials <prefix><000001..>.
        #[arg(long)]
        count: Option<u64>,
        /// Serial prefix for --count.
        #[arg(long, default_value = "SN")]
        prefix: String,
        /// First index for --count.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// IDevID validity in years; default: no expiry (99991231235959Z, IEEE 802.1AR).
        #[arg(long)]
        validity_years: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// List issued certificates, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one certificate (by serial or unique serial prefix) as PEM with its record.
    Show { serial: String },
}

#[derive(Subcommand, Debug)]
enum C509Command {
    /// DER (or PEM) certificate or PKCS#10 request -> C509 type 3. A certificate becomes
    /// the CBOR sequence ~C509Certificate (or COSE_C509 with --cose), a request the
    /// C509CertificationRequest array. Raw bytes go to stdout unless --out is given.
    Encode {
        file: PathBuf,
        /// Write the C509 bytes here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Wrap a certificate as COSE_C509 (what application/cose-c509-cert carries).
        #[arg(long)]
        cose: bool,
        /// Print a readable dump with sizes (DER vs C509) instead of raw bytes on stdout.
        #[arg(long)]
        info: bool,
    },
    /// C509 certificate (~C509Certificate, C509Certificate or COSE_C509) or C509 request
    /// -> the exact DER it was re-encoded from (type 3 only: a natively signed type 2
    /// has no DER form).
    Decode {
        file: PathBuf,
        /// Write the DER bytes here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print a readable dump with sizes instead of raw bytes on stdout.
        #[arg(long)]
        info: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Import device serials (one per line; blank lines and # comments ignored).
    Import { file: PathBuf },
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let data_dir = cli.common.data_dir.clone();
    match cli.command {
        None => run(&data_dir, RunArgs::default()),
        Some(Command::Run(args)) => run(&data_dir, args),
        Some(Command::Init { server_names }) => {
            init_logging(false);
            let r = datadir::init(&data_dir, &server_names)?;
            if r.created {
                println!("created {}", r.data_dir.display());
            } else {
                println!(
                    "{} already initialised; left untouched",
                    r.data_dir.display()
                );
            }
            Ok(())
        }
        Some(Command::Factory(FactoryCommand::Mint {
            serial,
            count,
            prefix,
            start,
            out,
            validity_years,
        })) => {
            init_logging(false);
            ensure_init(&data_dir)?;
            let cfg = datadir::load_config(&data_dir, None)?;
            let serials = match (serial, count) {
                (Some(s), None) => vec![s],
                (None, Some(n)) => factory::serial_range(&prefix, start, n),
                _ => bail!("give either --serial SN or --count N"),
            };
            let bar = indicatif_bar(serials.len());
            factory::mint(&data_dir, &cfg, &serials, &out, validity_years, |i| {
                if let Some(b) = &bar {
                    b(i)
                }
            })?;
            println!("minted {} IDevID(s) into {}", serials.len(), out.display());
            Ok(())
        }
        Some(Command::Certs(cmd)) => {
            init_logging(false);
            let store = open_store(&data_dir)?;
            match cmd {
                CertsCommand::List { limit, json } => {
                    let certs = store
                        .list_certificates(limit)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    if json {
                        for c in certs {
                            println!(
                                "{}",
                                serde_json::json!({
                                    "serial": c.serial_hex, "device": c.device_id, "subject": c.subject,
                                    "status": c.status.as_str(), "kind": c.kind.as_str(),
                                    "issued_at": c.issued_at_unix, "not_after": c.not_after_unix,
                                    "replaces": c.replaces_serial_hex,
                                })
                            );
                        }
                    } else {
                        println!(
                            "{:<34} {:<14} {:<11} {:<12} {:<20} subject",
                            "serial", "device", "status", "kind", "issued (UTC)"
                        );
                        for c in certs {
                            println!(
                                "{:<34} {:<14} {:<11} {:<12} {:<20} {}",
                                c.serial_hex,
                                c.device_id,
                                c.status.as_str(),
                                c.kind.as_str(),
                                utc(c.issued_at_unix),
                                c.subject
                            );
                        }
                    }
                }
                CertsCommand::Show { serial } => {
                    let found = store
                        .find_by_serial_prefix(&serial)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    match found.as_slice() {
                        [] => bail!("no certificate with serial {serial}"),
                        [c] => {
                            println!("serial:     {}", c.serial_hex);
                            println!("device:     {}", c.device_id);
                            println!("subject:    {}", c.subject);
                            println!("status:     {}", c.status.as_str());
                            println!("kind:       {}", c.kind.as_str());
                            println!("issued at:  {}", utc(c.issued_at_unix));
                            println!("not before: {}", utc(c.not_before_unix));
                            println!("not after:  {}", utc(c.not_after_unix));
                            if let Some(r) = &c.replaces_serial_hex {
                                println!("replaces:   {r}");
                            }
                            print!("{}", datadir::cert_pem(&c.der)?);
                        }
                        many => bail!(
                            "{} certificates match {serial}; give more digits",
                            many.len()
                        ),
                    }
                }
            }
            store.close();
            Ok(())
        }
        Some(Command::Devices(DevicesCommand::Import { file })) => {
            init_logging(false);
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ids: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            let store = open_store(&data_dir)?;
            let added = store
                .import_devices(&ids, unix_now())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            store.close();
            println!("{} serial(s) read, {added} new on the allowlist", ids.len());
            Ok(())
        }
        Some(Command::C509(cmd)) => c509_tool(cmd),
        Some(Command::Audit { limit }) => {
            init_logging(false);
            let store = open_store(&data_dir)?;
            let events = store
                .recent_audit(limit)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for e in events.iter().rev() {
                println!(
                    "{} {:<22} {:<12} {:<5} {:<9} {} {}",
                    utc(e.at_unix),
                    e.peer,
                    e.device_id,
                    e.operation,
                    e.outcome,
                    e.code,
                    e.detail
                );
            }
            store.close();
            Ok(())
        }
    }
}

fn c509_tool(cmd: C509Command) -> Result<()> {
    use cbor_schemas::{c509, cose};
    use std::io::Write;
    let emit = |bytes: &[u8], out: Option<PathBuf>, info: Option<String>| -> Result<()> {
        if let Some(o) = &out {
            std::fs::write(o, bytes).with_context(|| format!("writing {}", o.display()))?;
        }
        match info {
            Some(text) => println!("{text}"),
            None if out.is_none() => std::io::stdout().write_all(bytes)?,
            None => {}
        }
        Ok(())
    };
    match cmd {
        C509Command::Encode {
            file,
            out,
            cose: wrap,
            info,
        } => {
            let input = read_der_or_pem(&file)?;
            let (c509, what) = match c509::certificate_der_to_c509(&input) {
                Ok(seq) if wrap => (cose::cose_c509_chain(&[seq])?, "COSE_C509 certificate"),
                Ok(seq) => (seq, "~C509Certificate (type 3)"),
                Err(cert_err) => match c509::csr_der_to_c509(&input) {
                    Ok(csr) => (csr, "C509CertificationRequest (type 3)"),
                    Err(csr_err) => bail!(
                        "{}: not convertible as a certificate ({cert_err}) nor as a PKCS#10 request ({csr_err})",
                        file.display()
                    ),
                },
            };
            let text = info.then(|| {
                let dump = c509::describe(&c509).unwrap_or_else(|e| format!("(dump failed: {e})"));
                format!(
                    "{what}: DER {} bytes -> C509 {} bytes ({:.0}%)\n{dump}",
                    input.len(),
                    c509.len(),
                    100.0 * c509.len() as f64 / input.len().max(1) as f64
                )
            });
            emit(&c509, out, text)
        }
        C509Command::Decode { file, out, info } => {
            let input =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let der = if let Ok(csr) = c509::C509Csr::decode(&input) {
                csr.to_der()?
            } else if let Ok(d) = c509::certificate_c509_to_der(&input) {
                d
            } else {
                let certs = cose::decode_cose_c509(&input).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a C509 certificate, request or COSE_C509: {e}",
                        file.display()
                    )
                })?;
                let first = certs.first().context("empty COSE_C509")?;
                c509::certificate_c509_to_der(first)?
            };
            let text = info.then(|| {
                let dump = c509::describe(&input).unwrap_or_else(|e| format!("(dump failed: {e})"));
                format!(
                    "C509 {} bytes -> DER {} bytes\n{dump}",
                    input.len(),
                    der.len()
                )
            });
            emit(&der, out, text)
        }
    }
}

fn read_der_or_pem(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.first() == Some(&0x30) {
        return Ok(bytes);
    }
    let (_label, der) = der::pem::decode_vec(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: neither DER nor PEM: {e}", path.display()))?;
    Ok(der)
}

fn indicatif_bar(n: usize) -> Option<impl Fn(usize)> {
    if n < 50 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("minting {bar:40} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(move |i: usize| {
        bar.set_position(i as u64);
        if i == n {
            bar.finish();
        }
    })
}

fn ensure_init(data_dir: &Path) -> Result<()> {
    let r = datadir::init(data_dir, &[])?;
    if r.created {
        eprintln!("initialised a new data directory at {}", data_dir.display());
    }
    Ok(())
}

fn open_store(data_dir: &Path) -> Result<est_server::store::SqliteStore> {
    let cfg = datadir::load_config(data_dir, None)?;
    let db = datadir::resolve(data_dir, &cfg.storage.database);
    if !db.exists() {
        bail!("no store at {} (run `est-server init` first)", db.display());
    }
    est_server::store::SqliteStore::open(&db, 1).map_err(|e| anyhow::anyhow!("{e}"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn utc(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(s) => match der::DateTime::from_unix_duration(std::time::Duration::from_secs(s)) {
            Ok(dt) => format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                dt.year(),
                dt.month(),
                dt.day(),
                dt.hour(),
                dt.minutes(),
                dt.seconds()
            ),
            Err(_) => unix.to_string(),
        },
        Err(_) => unix.to_string(),
    }
}

fn run(data_dir: &Path, args: RunArgs) -> Result<()> {
    let config_given = args.config.is_some();
    if !config_given {
        ensure_init(data_dir)?;
    }
    let config: Config = datadir::load_config(data_dir, args.config.as_deref())?;
    init_logging(config.server.log_format == "json");
    let worker_threads = config.server.worker_threads;
    let loaded = datadir::load(data_dir, config)?;
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
        shutdown.recv().await;
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
