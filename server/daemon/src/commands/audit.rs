//! `est-server audit`: the most recent enrollment attempts.

use std::path::Path;

use anyhow::Result;

use super::{init_logging, open_store, utc};

pub(crate) fn run(data_dir: &Path, limit: usize) -> Result<()> {
    init_logging(false);
    let store = open_store(data_dir)?;
    let events = store.recent_audit(limit)?;
    for e in events.iter().rev() {
        let via = e
            .relay
            .as_deref()
            .map(|r| format!(" (via relay {r})"))
            .unwrap_or_default();
        println!(
            "{} {:<22} {:<12} {:<5} {:<9} {} {}{}",
            utc(e.at_unix),
            e.peer,
            e.device_id,
            e.operation,
            e.outcome,
            e.code,
            e.detail,
            via
        );
    }
    store.close();
    Ok(())
}
