//! `est-server init`: create the data directory.

use std::path::Path;

use anyhow::Result;
use est_server::datadir;

use super::init_logging;

pub(crate) fn run(data_dir: &Path, server_names: &[String]) -> Result<()> {
    init_logging(false);
    let r = datadir::init(data_dir, server_names)?;
    if r.created {
        println!("created {}", r.data_dir.display());
    } else {
        println!(
            "{} already initialised; left untouched",
            r.data_dir.display()
        );
    }
    Ok(())
}
