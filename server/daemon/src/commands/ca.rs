//! `est-server ca create-p384`: the P-384 issuing CA beside the P-256 one.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;

use super::init_logging;
use crate::cli::CaCommand;

pub(crate) fn run(data_dir: &Path, cmd: CaCommand) -> Result<()> {
    init_logging(false);
    match cmd {
        CaCommand::CreateP384 { hsm_key_label } => {
            let cert = est_server::p384::create_with(
                data_dir,
                SystemTime::now(),
                hsm_key_label.as_deref(),
            )?;
            match hsm_key_label {
                Some(label) => println!(
                    "created the P-384 issuing CA {} with its key {label:?} on the [hsm] token; [ca_p384] enabled = true (restart the server to use it)",
                    cert.display()
                ),
                None => println!(
                    "created the P-384 issuing CA {}; [ca_p384] enabled = true (restart the server to use it)",
                    cert.display()
                ),
            }
        }
    }
    Ok(())
}
