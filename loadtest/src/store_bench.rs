//! `loadtest store`: the CPU that est-server's SQLite store spends per issuance, without the
//! network and the curve operations around it.
//!
//! A fresh store (`est_server::store::SqliteStore`, the server's own: its schema, its
//! statements, its writer thread and group commit, `synchronous=FULL`) under `--dir` first
//! takes `--history` issuances, so that the indexes have the depth of a store in use. Then
//! `--meters` threads each commit issuances one after another, waiting for each to be durable,
//! as the server's sessions do: `--meters` commits are in flight, and the writer thread groups
//! what has queued up into one transaction and one fsync. Each issuance is what an enrollment
//! commits: a certificate row (560 bytes of DER, a random serial, the device's next request
//! digest) that supersedes the device's active one, and its audit row. Devices are taken in
//! turn from `--devices`.
//!
//! Reported: the writer thread's CPU per issuance (from its `/proc/self/task/TID/schedstat`),
//! the submitting threads' CPU per issuance, issuances per transaction, and wall time.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use est_proto::store::{
    commit_and_wait, AuditEvent, CertStatus, Commit, CommitOutcome, IssuanceKind, IssuedCert, Store,
};
use est_server::store::SqliteStore;

use crate::floor::{schedstat_cpu_ns, thread_cpu_ns};

/// What `loadtest store` measures.
#[derive(Debug, Clone)]
pub(crate) struct StoreArgs {
    pub issuances: u64,
    pub history: u64,
    pub meters: usize,
    pub devices: usize,
    pub max_batch: usize,
}

/// The measured figures.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoreFigures {
    pub writer_us: f64,
    pub submit_us: f64,
    pub per_transaction: f64,
    pub wall_us: f64,
}

/// Nanoseconds the scheduler has run the store's writer thread (the thread named
/// `est-store-writer`, whose comm the kernel cuts to 15 bytes).
fn writer_cpu_ns() -> Result<u64> {
    for task in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
        let dir = task?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() == "est-store-write" {
            return schedstat_cpu_ns(&dir.join("schedstat"));
        }
    }
    bail!("no est-store-writer thread in this process")
}

/// One issuance as an enrollment commits it: number `n`, for device `n % devices`.
fn issuance(n: u64, devices: usize) -> Commit {
    let device_id = format!("ESTLT{:08}", n % devices.max(1) as u64);
    let serial = ring::digest::digest(&ring::digest::SHA256, &n.to_be_bytes());
    let serial_hex: String = hex::encode(serial.as_ref()).chars().take(32).collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, &(!n).to_be_bytes());
    let mut request_digest = [0u8; 32];
    request_digest.copy_from_slice(digest.as_ref());
    let at = 1_767_225_600 + i64::try_from(n).unwrap_or(i64::MAX) / 1_000;
    Commit::Issuance {
        cert: Box::new(IssuedCert {
            serial_hex: serial_hex.clone(),
            device_id: device_id.clone(),
            subject: format!("SERIALNUMBER={device_id},CN={device_id}"),
            der: serial.as_ref().iter().cycle().take(560).copied().collect(),
            request_digest,
            not_before_unix: at,
            not_after_unix: at + 365 * 86_400,
            issued_at_unix: at,
            status: CertStatus::Active,
            kind: IssuanceKind::Enroll,
            replaces_serial_hex: None,
            slot: String::new(),
            profile: String::new(),
        }),
        audit: AuditEvent {
            at_unix: at,
            peer: "127.0.0.1:40000".into(),
            relay: None,
            device_id,
            operation: "sen".into(),
            outcome: "issued".into(),
            code: "2.04".into(),
            detail: format!("serial {serial_hex}"),
        },
    }
}

/// `meters` threads commit `count` issuances numbered from `first`, each waiting for its
/// own; the submitting threads' CPU, nanoseconds.
fn commit_all(
    store: &Arc<SqliteStore>,
    first: u64,
    count: u64,
    meters: usize,
    devices: usize,
) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(first));
    let end = first + count;
    let threads: Vec<_> = (0..meters.max(1))
        .map(|_| {
            let (store, next) = (Arc::clone(store), Arc::clone(&next));
            std::thread::spawn(move || -> Result<u64> {
                let cpu0 = thread_cpu_ns()?;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= end {
                        break;
                    }
                    match commit_and_wait(store.as_ref() as &dyn Store, issuance(n, devices)) {
                        Ok(CommitOutcome::Committed) => {}
                        other => bail!("issuance {n}: {other:?}"),
                    }
                }
                Ok(thread_cpu_ns()? - cpu0)
            })
        })
        .collect();
    let mut cpu = 0;
    for t in threads {
        cpu += t
            .join()
            .map_err(|_| anyhow::anyhow!("a meter thread panicked"))??;
    }
    Ok(cpu)
}

/// Run the measurement in a fresh store under `dir`.
pub(crate) fn measure(a: &StoreArgs, dir: &Path) -> Result<StoreFigures> {
    if a.issuances == 0 || a.meters == 0 || a.devices == 0 {
        bail!("issuances, meters and devices must be > 0");
    }
    let tmp = tempfile_dir(dir)?;
    let store = Arc::new(
        SqliteStore::open(&tmp.join("est.sqlite3"), a.max_batch.max(1))
            .context("opening the store")?,
    );
    commit_all(&store, 0, a.history, a.meters.max(8), a.devices)?;
    let stats0 = store.writer_stats();
    let (writer0, wall0) = (writer_cpu_ns()?, Instant::now());
    let submit = commit_all(&store, a.history, a.issuances, a.meters, a.devices)?;
    let (writer, wall) = (writer_cpu_ns()? - writer0, wall0.elapsed());
    let stats = store.writer_stats();
    store.close();
    drop(store);
    let _ = std::fs::remove_dir_all(&tmp);
    let n = a.issuances as f64;
    let transactions = (stats.transactions - stats0.transactions).max(1) as f64;
    Ok(StoreFigures {
        writer_us: writer as f64 / 1e3 / n,
        submit_us: submit as f64 / 1e3 / n,
        per_transaction: (stats.operations - stats0.operations) as f64 / transactions,
        wall_us: wall.as_secs_f64() * 1e6 / n,
    })
}

/// A new directory under `dir` for the store (removed afterwards).
fn tempfile_dir(dir: &Path) -> Result<std::path::PathBuf> {
    let d = dir.join(format!("loadtest-store-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// The report, one figure per line.
pub(crate) fn render(a: &StoreArgs, f: &StoreFigures) -> String {
    format!(
        "store: {} issuances, {} at once, {} devices, after {} issuances of history (SQLite, synchronous=FULL)\n\
         writer thread      {:>7.1} us CPU per issuance\n\
         submitting threads {:>7.1} us CPU per issuance\n\
         per transaction    {:>7.1} issuances (one fsync each)\n\
         wall               {:>7.1} us per issuance\n",
        a.issuances, a.meters, a.devices, a.history, f.writer_us, f.submit_us, f.per_transaction, f.wall_us
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A short run commits every issuance (each superseding its device's last), groups
    /// them, and reports CPU for the writer thread it found.
    #[test]
    fn a_short_run_measures_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let a = StoreArgs {
            issuances: 200,
            history: 100,
            meters: 4,
            devices: 16,
            max_batch: 256,
        };
        let f = measure(&a, dir.path()).unwrap();
        assert!(
            f.writer_us > 0.0 && f.submit_us > 0.0 && f.wall_us > 0.0,
            "{f:?}"
        );
        assert!((1.0..=4.0).contains(&f.per_transaction), "{f:?}");
        let text = render(&a, &f);
        assert!(
            text.contains("writer thread") && text.contains("200 issuances"),
            "{text}"
        );
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let bad = StoreArgs { meters: 0, ..a };
        assert!(measure(&bad, dir.path()).is_err());
    }
}
