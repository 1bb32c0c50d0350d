//! `est-server devices import|block`: the device allowlist, decommissioning.

use std::path::Path;

use anyhow::{Context, Result};

use super::{init_logging, open_store, unix_now};
use crate::cli::DevicesCommand;

pub(crate) fn run(data_dir: &Path, cmd: DevicesCommand) -> Result<()> {
    init_logging(false);
    let file = match cmd {
        DevicesCommand::Import { file } => file,
        DevicesCommand::Block {
            serial,
            keep_certs,
            reason,
        } => return block(data_dir, &serial, keep_certs, reason),
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let store = open_store(data_dir)?;
    let added = store.import_devices(&ids, unix_now())?;
    store.close();
    println!("{} serial(s) read, {added} new on the allowlist", ids.len());
    Ok(())
}

fn block(
    data_dir: &Path,
    serial: &str,
    keep_certs: bool,
    reason: est_proto::store::RevocationReason,
) -> Result<()> {
    let config = est_server::datadir::load_config(data_dir, None)?;
    let report = est_server::revocation::block_device(
        data_dir,
        &config,
        serial,
        keep_certs,
        reason,
        std::time::SystemTime::now(),
    )?;
    if report.outcome.newly_blocked {
        println!("device {serial} blocked: its /sen and /sren are refused from now on");
    } else {
        println!("device {serial} was already blocked");
    }
    for s in &report.outcome.revoked_serials {
        println!("revoked {s}, reason {}", reason.name());
    }
    if keep_certs {
        println!("its certificates were kept (--keep-certs)");
    }
    if let Some(crl) = report.crl {
        println!(
            "CRL number {} published: {}",
            crl.number,
            est_server::datadir::resolve(data_dir, &config.revocation.crl_file).display()
        );
    }
    Ok(())
}
