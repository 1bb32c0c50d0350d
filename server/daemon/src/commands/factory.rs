//! `est-server factory mint`: IDevIDs as a meter factory would make them.

use std::path::Path;

use anyhow::{bail, Result};
use est_server::{datadir, factory};

use super::{ensure_init, init_logging};
use crate::cli::FactoryCommand;

pub(crate) fn run(data_dir: &Path, cmd: FactoryCommand) -> Result<()> {
    let FactoryCommand::Mint {
        serial,
        count,
        prefix,
        start,
        out,
        validity_years,
    } = cmd;
    init_logging(false);
    ensure_init(data_dir)?;
    let cfg = datadir::load_config(data_dir, None)?;
    let serials = match (serial, count) {
        (Some(s), None) => vec![s],
        (None, Some(n)) => factory::serial_range(&prefix, start, n),
        _ => bail!("give either --serial SN or --count N"),
    };
    let bar = indicatif_bar(serials.len());
    factory::mint(data_dir, &cfg, &serials, &out, validity_years, |i| {
        if let Some(b) = &bar {
            b(i)
        }
    })?;
    println!("minted {} IDevID(s) into {}", serials.len(), out.display());
    Ok(())
}

fn indicatif_bar(n: usize) -> Option<impl Fn(usize)> {
    if n < 50 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("minting {bar:40} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(move |i: usize| {
        bar.set_position(i as u64);
        if i == n {
            bar.finish();
        }
    })
}
