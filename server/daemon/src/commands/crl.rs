//! `est-server crl publish|show`: the issuing CA's CRL.

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
