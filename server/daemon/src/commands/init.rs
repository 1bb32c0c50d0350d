//! `est-server init`: create the data directory, with the issuing CA's key in a file or on
//! a PKCS#11 token.

use std::path::Path;

use anyhow::{Context, Result};
use est_server::datadir;
use est_server::hsm::HsmSection;

use super::init_logging;
use crate::cli::HsmInitArgs;

pub(crate) fn run(data_dir: &Path, server_names: &[String], hsm: HsmInitArgs) -> Result<()> {
    init_logging(false);
    let section = hsm_section(hsm)?;
    let r = datadir::init_with(data_dir, server_names, section.as_ref())?;
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
