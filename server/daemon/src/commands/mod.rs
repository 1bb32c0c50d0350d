//! The subcommands other than `run`: each renders its own output. Helpers they share
//! (logging, opening the data directory and the store, time formatting) are here.

pub(crate) mod audit;
pub(crate) mod c509;
pub(crate) mod certs;
pub(crate) mod devices;
pub(crate) mod factory;
pub(crate) mod init;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use est_server::datadir;
use tracing_subscriber::EnvFilter;

pub(crate) fn init_logging(json: bool) {
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

pub(crate) fn ensure_init(data_dir: &Path) -> Result<()> {
    let r = datadir::init(data_dir, &[])?;
    if r.created {
        eprintln!("initialised a new data directory at {}", data_dir.display());
    }
    Ok(())
}

pub(crate) fn open_store(data_dir: &Path) -> Result<est_server::store::SqliteStore> {
    let cfg = datadir::load_config(data_dir, None)?;
    let db = datadir::resolve(data_dir, &cfg.storage.database);
    if !db.exists() {
        bail!("no store at {} (run `est-server init` first)", db.display());
    }
    est_server::store::SqliteStore::open(&db, 1).map_err(|e| anyhow::anyhow!("{e}"))
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn utc(unix: i64) -> String {
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
