//! `est-server devices import`: the device allowlist.

use std::path::Path;

use anyhow::{Context, Result};

use super::{init_logging, open_store, unix_now};
use crate::cli::DevicesCommand;

pub(crate) fn run(data_dir: &Path, cmd: DevicesCommand) -> Result<()> {
    let DevicesCommand::Import { file } = cmd;
    init_logging(false);
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
