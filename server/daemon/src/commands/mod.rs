//! The subcommands other than `run`: each renders its own output. Helpers they share
//! (logging, opening the data directory and the store, time formatting) are here.

pub(crate) mod audit;
pub(crate) mod c509;
pub(crate) mod ca;
pub(crate) mod certs;
pub(crate) mod crl;
pub(crate) mod devices;
pub(crate) mod dtls;
pub(crate) mod factory;
pub(crate) mod init;

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use est_proto::store::{unix_seconds, UtcDateTime};
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

/// The store `[storage]` of the data directory's configuration names (SQLite or PostgreSQL).
pub(crate) fn open_store(
    data_dir: &Path,
) -> Result<std::sync::Arc<dyn est_server::store::ServerStore>> {
    let cfg = datadir::load_config(data_dir, None)?;
    est_server::store::open_for_command(data_dir, &cfg.storage)
}

pub(crate) fn unix_now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// `2026-11-25 14:00:00` (UTC) for a stored Unix time.
pub(crate) fn utc(unix: i64) -> String {
    UtcDateTime::from_unix_seconds(unix).date_time()
}
