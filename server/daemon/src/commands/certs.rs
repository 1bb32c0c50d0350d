//! `est-server certs list|show|revoke`: issued certificates from the store.

use std::path::Path;

use anyhow::{bail, Result};
use est_server::datadir;

use super::{init_logging, open_store, utc};
use crate::cli::CertsCommand;

pub(crate) fn run(data_dir: &Path, cmd: CertsCommand) -> Result<()> {
    init_logging(false);
    if let CertsCommand::Revoke { serial, reason } = cmd {
        return revoke(data_dir, &serial, reason);
    }
    let store = open_store(data_dir)?;
    match cmd {
        CertsCommand::List { limit, json } => {
            let certs = store.list_certificates(limit)?;
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
            let found = store.find_by_serial_prefix(&serial)?;
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
                    if c.status == est_proto::store::CertStatus::Revoked {
                        if let Some(r) = store
                            .revoked_certificates()?
                            .into_iter()
                            .find(|r| r.serial_hex == c.serial_hex)
                        {
                            println!("revoked at: {}", utc(r.revoked_at_unix));
                            println!("reason:     {} ({})", r.reason.name(), r.reason.code());
                        }
                    }
                    print!("{}", datadir::cert_pem(&c.der)?);
                }
                many => bail!(
                    "{} certificates match {serial}; give more digits",
                    many.len()
                ),
            }
        }
        CertsCommand::Revoke { .. } => {}
    }
    store.close();
    Ok(())
}

fn revoke(data_dir: &Path, serial: &str, reason: est_proto::store::RevocationReason) -> Result<()> {
    use est_proto::store::RevokeOutcome;
    let config = datadir::load_config(data_dir, None)?;
    let report = est_server::revocation::revoke_certificate(
        data_dir,
        &config,
        serial,
        reason,
        std::time::SystemTime::now(),
    )?;
    match report.outcome {
        RevokeOutcome::NotFound => bail!("no certificate with serial {serial}"),
        RevokeOutcome::AlreadyRevoked(c) => {
            println!(
                "{} (device {}) was already revoked",
                c.serial_hex, c.device_id
            );
        }
        RevokeOutcome::Revoked(c) => {
            println!(
                "revoked {} (device {}), reason {} ({})",
                c.serial_hex,
                c.device_id,
                reason.name(),
                reason.code()
            );
        }
    }
    if let Some(crl) = report.crl {
        println!(
            "CRL number {} published: {}",
            crl.number,
            datadir::resolve(data_dir, &config.revocation.crl_file).display()
        );
    }
    Ok(())
}
