//! `est-server ca create-p384`: the P-384 issuing CA beside the P-256 one.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;

use super::init_logging;
use crate::cli::CaCommand;

pub(crate) fn run(data_dir: &Path, cmd: CaCommand) -> Result<()> {
    init_logging(false);
    match cmd {
        CaCommand::CreateP384 => {
            let cert = est_server::p384::create(data_dir, SystemTime::now())?;
            println!(
                "created the P-384 issuing CA {}; [ca_p384] enabled = true (restart the server to use it)",
                cert.display()
            );
        }
    }
    Ok(())
}
