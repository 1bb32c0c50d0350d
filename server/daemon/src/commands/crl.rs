//! `est-server crl publish|show`: the issuing CAs' CRLs (the main CA's, and the P-384 CA's
//! when `[ca_p384]` is enabled).

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use est_server::datadir;

use super::{init_logging, open_store, utc};
use crate::cli::CrlCommand;

pub(crate) fn run(data_dir: &Path, cmd: CrlCommand) -> Result<()> {
    init_logging(false);
    let config = datadir::load_config(data_dir, None)?;
    let file = datadir::resolve(data_dir, &config.revocation.crl_file);
    match cmd {
        CrlCommand::Publish => {
            let crl = est_server::revocation::publish_now(data_dir, &config, SystemTime::now())?;
            println!(
                "CRL number {} (next update {} UTC) written to {} and {}",
                crl.number,
                utc(crl.next_update_unix),
                file.display(),
                datadir::resolve(data_dir, &config.revocation.crl_pem_file()).display()
            );
            if config.ca_p384.enabled {
                println!(
                    "P-384 CA's CRL written to {}",
                    datadir::resolve(data_dir, &config.revocation.crl_p384_file()).display()
                );
            }
        }
        CrlCommand::Show => {
            let store = open_store(data_dir)?;
            let latest = store.latest_crl()?;
            let revoked = store.revoked_certificates()?;
            let blocked = store.blocked_devices()?;
            store.close();
            match latest {
                Some(c) => {
                    println!("CRL number:  {}", c.number);
                    println!("this update: {} UTC", utc(c.this_update_unix));
                    println!("next update: {} UTC", utc(c.next_update_unix));
                    println!("file:        {}", file.display());
                }
                None => println!("no CRL published yet (`est-server crl publish`)"),
            }
            if let Some(p384) = est_server::revocation::load_p384_ca(data_dir, &config)? {
                let f = datadir::resolve(data_dir, &config.revocation.crl_p384_file());
                match std::fs::read(&f) {
                    Ok(der) => {
                        let c = est_proto::ca::verify_crl(&der, p384.certificate_der())
                            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                        let number = c.number.as_deref().map_or(String::from("-"), |n| {
                            n.iter()
                                .fold(0u128, |a, b| (a << 8) | u128::from(*b))
                                .to_string()
                        });
                        println!("P-384 CA's CRL number: {number}");
                        println!(
                            "  this update: {} UTC",
                            utc(est_proto::store::unix_seconds(c.this_update))
                        );
                        if let Some(n) = c.next_update {
                            println!(
                                "  next update: {} UTC",
                                utc(est_proto::store::unix_seconds(n))
                            );
                        }
                        println!("  entries:     {}", c.revoked.len());
                        println!("  file:        {}", f.display());
                    }
                    Err(_) => println!("no P-384 CRL published yet (`est-server crl publish`)"),
                }
            }
            println!("revoked certificates: {}", revoked.len());
            for r in revoked {
                println!(
                    "  {}  {} UTC  {}",
                    r.serial_hex,
                    utc(r.revoked_at_unix),
                    r.reason.name()
                );
            }
            println!("blocked devices: {}", blocked.len());
            for d in blocked {
                println!("  {d}");
            }
        }
    }
    Ok(())
}
