//! `est-server dtls renew`: a new DTLS server certificate.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use est_proto::store::{unix_seconds, UtcDateTime};
use est_server::datadir;

use super::init_logging;
use crate::cli::DtlsCommand;

pub(crate) fn run(data_dir: &Path, cmd: DtlsCommand) -> Result<()> {
    init_logging(false);
    let DtlsCommand::Renew {
        server_names,
        validity_days,
    } = cmd;
    anyhow::ensure!(validity_days > 0, "--validity-days must be positive");
    let config = datadir::load_config(data_dir, None)?;
    let r = est_server::lifetime::renew_dtls_certificate(
        data_dir,
        &config,
        &server_names,
        validity_days,
        SystemTime::now(),
    )?;
    let ips: Vec<String> = r.ip_addresses.iter().map(|i| i.to_string()).collect();
    println!(
        "new DTLS server certificate for {} {}, valid until {}",
        r.dns_names.join(", "),
        ips.join(", "),
        UtcDateTime::from_unix_seconds(unix_seconds(r.not_after)).rfc3339()
    );
    println!(
        "written to {} and {}; a running server uses it after `kill -HUP <pid>` (new handshakes) or a restart",
        datadir::resolve(data_dir, &config.pki.server_cert).display(),
        datadir::resolve(data_dir, &config.pki.server_key).display()
    );
    Ok(())
}
