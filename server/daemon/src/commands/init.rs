//! `est-server init`: create the data directory, with the issuing CA's key in a file or on
//! a PKCS#11 token.

use std::path::Path;

use anyhow::{Context, Result};
use est_server::config::StorageSection;
use est_server::datadir;
use est_server::hsm::HsmSection;

use super::init_logging;
use crate::cli::{HsmInitArgs, StorageInitArgs};

pub(crate) fn run(
    data_dir: &Path,
    server_names: &[String],
    hsm: HsmInitArgs,
    storage: StorageInitArgs,
) -> Result<()> {
    init_logging(false);
    let section = hsm_section(hsm)?;
    let storage = storage_section(storage)?;
    let r = datadir::init_with_storage(data_dir, server_names, section.as_ref(), &storage)?;
    if r.created {
        println!("created {}", r.data_dir.display());
        if let Some(h) = &section {
            println!(
                "the issuing CA key is {:?} on token {:?} ({}); no key file was written",
                h.key_label,
                h.token_label,
                h.module.display()
            );
        }
    } else {
        println!(
            "{} already initialised; left untouched",
            r.data_dir.display()
        );
    }
    Ok(())
}

/// The `[storage]` section the flags describe (the default, SQLite, without them). A CA file
/// is recorded by its absolute path.
fn storage_section(a: StorageInitArgs) -> Result<StorageSection> {
    let Some(url) = a.storage_url else {
        return Ok(StorageSection::default());
    };
    let ca_file = match a.storage_ca_file {
        Some(p) => std::fs::canonicalize(&p)
            .with_context(|| format!("the PostgreSQL CA file {}", p.display()))?,
        None => Default::default(),
    };
    Ok(StorageSection {
        backend: "postgres".into(),
        url,
        ca_file,
        ..StorageSection::default()
    })
}

/// The `[hsm]` section the flags describe, if any. A PIN file is recorded by its absolute
/// path, so the configuration does not depend on the directory `init` ran in.
fn hsm_section(a: HsmInitArgs) -> Result<Option<HsmSection>> {
    let (Some(module), Some(token_label)) = (a.hsm_module, a.hsm_token) else {
        return Ok(None);
    };
    let pin_file = match a.hsm_pin_file {
        Some(p) => std::fs::canonicalize(&p)
            .with_context(|| format!("the HSM PIN file {}", p.display()))?,
        None => Default::default(),
    };
    let section = HsmSection {
        enabled: true,
        module,
        token_label,
        key_label: a.hsm_key_label,
        pin_file,
        pin_env: a.hsm_pin_env,
        sessions: a.hsm_sessions,
    };
    section.validate()?;
    Ok(Some(section))
}
