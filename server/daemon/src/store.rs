//! SQLite implementation of [`est_proto::store::Store`].
//!
//! Durability: WAL journal with `synchronous=FULL`, so a COMMIT returns only after the
//! WAL is fsynced. Throughput: one writer thread owns the write connection and groups
//! whatever commits are queued (up to `max_batch`) into one transaction, so a storm of
//! enrollments costs one fsync per batch rather than per certificate; every commit's
//! completion is called only after its own data is durable. Each operation in a batch runs
//! under its own SAVEPOINT, so one failing operation does not fail the others.
//! Reads use a separate connection (WAL readers do not block the writer).
//!
//! Nobody waits for the writer on a thread of their own: [`Store::submit_commit`] queues the
//! commit with its completion, which the writer thread calls after the COMMIT (the daemon's
//! completion sends the result to the session task). Every commit in the queue holds its
//! enrollment's admission (the session's ticket, dropped by the completion), so
//! `[est] max_concurrent_enrollments` bounds the queue, even for sessions that have ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use est_proto::store::{
    issuance_refusal, AuditEvent, BlockOutcome, CertStatus, Commit, CommitDone, CommitOutcome,
    CommitResult, CrlRecord, DeviceBlock, EnrollmentReads, IssuanceKind, IssuanceWindow,
    IssuedCert, Revocation, RevocationReason, RevokeOutcome, RevokedEntry, Store, StoreError,
};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::config::StorageSection;

pub mod pg_tls;
pub mod postgres;
pub use postgres::PgStore;

/// What the daemon needs of a store besides the core's [`Store`]: the operator commands'
/// queries (`certs list`, `certs show`, `audit`), the allowlist import, the writer's
/// counters and an orderly close. [`SqliteStore`] and [`PgStore`] keep the same contract
/// (server/daemon/tests/store_contract.rs runs one suite against both).
pub trait ServerStore: Store {
    /// `"sqlite"` or `"postgres"`, for logs.
    fn backend_name(&self) -> &'static str;
    /// All certificates, newest first (for `certs list`).
    fn list_certificates(&self, limit: usize) -> Result<Vec<IssuedCert>, StoreError>;
    /// Certificates whose serial starts with `prefix`, at most 10 (for `certs show`).
    fn find_by_serial_prefix(&self, prefix: &str) -> Result<Vec<IssuedCert>, StoreError>;
    /// Number of certificates in the store.
    fn count_certificates(&self) -> Result<u64, StoreError>;
    /// The most recent audit events, newest first.
    fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError>;
    /// Add device serials to the allowlist; returns how many were new.
    fn import_devices(&self, ids: &[String], now_unix: i64) -> Result<usize, StoreError>;
    /// Transactions and operations committed so far.
    fn writer_stats(&self) -> WriterStats;
    /// Stop the writer(s) after they have drained their queue; later commits are refused.
    fn close(&self);
}

/// Opens the store `[storage]` names: SQLite at `database`, or PostgreSQL at `url` (schema
/// migrated before it returns); relative paths (`database`, `ca_file`) are resolved against
/// the data directory.
pub fn open_configured(
    storage: &StorageSection,
    data_dir: &Path,
) -> Result<Arc<dyn ServerStore>, StoreError> {
    if storage.is_postgres() {
        let mut settings = postgres::PgSettings::from_config(storage);
        settings.ca_file = settings
            .ca_file
            .map(|ca| crate::datadir::resolve(data_dir, &ca));
        Ok(Arc::new(PgStore::open(&settings)?))
    } else {
        let db = crate::datadir::resolve(data_dir, &storage.database);
        Ok(Arc::new(SqliteStore::open(&db, storage.max_batch)?))
    }
}

/// The store of a data directory for an operator command (`certs`, `devices`, `audit`,
/// `crl`): the one `storage` names, with one writer and at most two PostgreSQL connections.
/// SQLite must exist already (`est-server init` creates it).
pub fn open_for_command(
    data_dir: &Path,
    storage: &StorageSection,
) -> anyhow::Result<Arc<dyn ServerStore>> {
    let db = crate::datadir::resolve(data_dir, &storage.database);
    if !storage.is_postgres() && !db.exists() {
        anyhow::bail!("no store at {} (run `est-server init` first)", db.display());
    }
    let storage = StorageSection {
        max_batch: 1,
        pool_size: storage.pool_size.min(2),
        ..storage.clone()
    };
    Ok(open_configured(&storage, data_dir)?)
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS certificates (
    serial          TEXT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    der             BLOB NOT NULL,
    request_digest  BLOB NOT NULL,
    not_before      INTEGER NOT NULL,
    not_after       INTEGER NOT NULL,
    issued_at       INTEGER NOT NULL,
    status          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    replaces        TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS certificates_by_request ON certificates(device_id, request_digest);
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    peer       TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    operation  TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    code       TEXT NOT NULL,
    detail     TEXT NOT NULL,
    relay      TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    device_id    TEXT PRIMARY KEY,
    imported_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_device_time ON certificates(device_id, issued_at);
-- Decommissioned devices (`est-server devices block`): /sen and /sren refused.
CREATE TABLE IF NOT EXISTS blocked_devices (
    device_id   TEXT PRIMARY KEY,
    blocked_at  INTEGER NOT NULL,
    reason      INTEGER NOT NULL
);
-- One row: the revocation generation (bumped by every revoke and block, in the same
-- transaction) and the last cRLNumber handed out.
CREATE TABLE IF NOT EXISTS revocation_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL,
    crl_number  INTEGER NOT NULL
);
INSERT OR IGNORE INTO revocation_state(id, generation, crl_number) VALUES (1, 0, 0);
-- Every CRL published, by number; the latest is served.
CREATE TABLE IF NOT EXISTS crls (
    number       INTEGER PRIMARY KEY,
    this_update  INTEGER NOT NULL,
    next_update  INTEGER NOT NULL,
    generation   INTEGER NOT NULL,
    der          BLOB NOT NULL
);
"#;

// The revocation operations, as plain SQL (a port to another database keeps them).
const SELECT_BLOCKED: &str = "SELECT 1 FROM blocked_devices WHERE device_id = ?1";
const SELECT_STATUS: &str = "SELECT status FROM certificates WHERE serial = ?1";
const ISSUED_SINCE: &str =
    "SELECT COUNT(*), MIN(issued_at) FROM certificates WHERE device_id = ?1 AND issued_at >= ?2";
const REVOKE_CERT: &str = "UPDATE certificates SET status = 'revoked', revoked_at = ?2, revocation_reason = ?3 WHERE serial = ?1 AND status <> 'revoked'";
const SELECT_ACTIVE_OF_DEVICE: &str =
    "SELECT serial FROM certificates WHERE device_id = ?1 AND status = 'active'";
const BLOCK_DEVICE: &str =
    "INSERT OR IGNORE INTO blocked_devices(device_id, blocked_at, reason) VALUES (?1, ?2, ?3)";
const BUMP_GENERATION: &str =
    "UPDATE revocation_state SET generation = generation + 1 WHERE id = 1";
const SELECT_REVOKED: &str = "SELECT serial, revoked_at, revocation_reason FROM certificates WHERE status = 'revoked' ORDER BY revoked_at, serial";
const SELECT_GENERATION: &str = "SELECT generation FROM revocation_state WHERE id = 1";
const NEXT_CRL_NUMBER: &str =
    "UPDATE revocation_state SET crl_number = crl_number + 1 WHERE id = 1 RETURNING crl_number";
const INSERT_CRL: &str = "INSERT INTO crls(number, this_update, next_update, generation, der) SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS (SELECT 1 FROM crls WHERE number >= ?1)";
const SELECT_LATEST_CRL: &str = "SELECT number, this_update, next_update, generation, der FROM crls ORDER BY number DESC LIMIT 1";

/// The certificate columns, as a literal so the statements below are `&'static str`
/// (each is prepared once per connection and then reused from rusqlite's statement cache).
macro_rules! cert_columns {
    () => {
        "serial, device_id, subject, der, request_digest, not_before, not_after, issued_at, status, kind, replaces, slot, profile"
    };
}
const CERT_COLUMNS: &str = cert_columns!();
const SELECT_BY_REQUEST: &str = concat!(
    "SELECT ",
    cert_columns!(),
    " FROM certificates WHERE device_id = ?1 AND request_digest = ?2"
);
const SELECT_BY_SERIAL: &str = concat!(
    "SELECT ",
    cert_columns!(),
    " FROM certificates WHERE serial = ?1"
);
// The three statements of every issuance are `OR FAIL` rather than SQLite's default `OR
// ABORT`: an ABORT statement inside a transaction opens a statement journal, an in-memory
// copy of every page it changes, whose frees also showed as glibc trimming the writer
// thread's heap (docs/benchmarks.md, "The store's writer thread"). Each
// is a single-row change whose constraints are checked before it writes, and an operation
// that fails anyway is undone with the rest of its batch and applied again inside a
// SAVEPOINT of its own (`commit_batch`), so no partial change survives a failure.
const INSERT_CERT: &str = concat!(
    "INSERT OR FAIL INTO certificates(",
    cert_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
);
/// A new certificate supersedes the active ones of the same device and slot (a DLMS meter's
/// signing and key-agreement certificates live side by side).
const SUPERSEDE_ACTIVE: &str = "UPDATE OR FAIL certificates SET status = 'superseded' WHERE device_id = ?1 AND slot = ?2 AND status = 'active'";
const INSERT_AUDIT: &str = "INSERT OR FAIL INTO audit(at, peer, device_id, operation, outcome, code, detail, relay) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Columns added after the first release, added to an older database when it is opened.
const MIGRATIONS: &[(&str, &str, &str)] = &[
    // The join proxy an enrollment came through (issue #12).
    ("audit", "relay", "ALTER TABLE audit ADD COLUMN relay TEXT"),
    // Revocation (issue #13).
    (
        "certificates",
        "revoked_at",
        "ALTER TABLE certificates ADD COLUMN revoked_at INTEGER",
    ),
    (
        "certificates",
        "revocation_reason",
        "ALTER TABLE certificates ADD COLUMN revocation_reason INTEGER",
    ),
    // The certificate slot (IssuedCert::slot): "" = the LDevID, rows from before slots.
    (
        "certificates",
        "slot",
        "ALTER TABLE certificates ADD COLUMN slot TEXT NOT NULL DEFAULT ''",
    ),
    // The certificate profile it was issued under (IssuedCert::profile), kept at /sren;
    // "" = none recorded (every row from before this column).
    (
        "certificates",
        "profile",
        "ALTER TABLE certificates ADD COLUMN profile TEXT NOT NULL DEFAULT ''",
    ),
];

/// Indexes that need the migrated columns, made after [`MIGRATIONS`].
///
/// A device's active certificates (one per slot), for the supersession at every issuance
/// and for blocking a device. A partial index: a superseded certificate leaves it, so a
/// device has one or two entries whatever its history, and an issuance changes one leaf
/// of it. It replaces `certificates_by_device (device_id, status)`, which held every
/// certificate and was rewritten at each supersession (docs/benchmarks.md, "The store's
/// writer thread").
const POST_MIGRATION: &str = "
DROP INDEX IF EXISTS certificates_by_device;
CREATE INDEX IF NOT EXISTS certificates_active_by_device ON certificates(device_id, slot) WHERE status = 'active';
";

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    migrate_columns(conn)?;
    conn.execute_batch(POST_MIGRATION)
}

fn migrate_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, sql) in MIGRATIONS {
        let mut st = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let has = st
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .iter()
            .any(|c| c == column);
        if !has {
            conn.execute_batch(sql)?;
        }
    }
    Ok(())
}

/// A commit queued for the writer thread, with whom to tell.
pub(crate) struct WriteOp {
    pub(crate) commit: Commit,
    pub(crate) done: CommitDone,
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    reader: Mutex<Connection>,
    writer: Mutex<Option<Sender<WriteOp>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<WriterCounters>,
}

/// What the writer thread has done: `operations / transactions` is the group-commit factor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (one fsync each, with `synchronous=FULL`).
    pub transactions: u64,
    /// Operations (issuances, audit rows) in them.
    pub operations: u64,
}

#[derive(Default)]
pub(crate) struct WriterCounters {
    pub(crate) transactions: AtomicU64,
    pub(crate) operations: AtomicU64,
}

impl WriterCounters {
    pub(crate) fn snapshot(&self) -> WriterStats {
        WriterStats {
            transactions: self.transactions.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path, max_batch: usize) -> Result<Self, StoreError> {
        let write_conn = open_connection(path)?;
        write_conn.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&write_conn).map_err(backend)?;
        let reader = open_connection(path)?;
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(WriterCounters::default());
        let thread = std::thread::Builder::new()
            .name("est-store-writer".into())
            .spawn({
                let counters = counters.clone();
                move || writer_loop(write_conn, rx, max_batch.max(1), &counters)
            })
            .map_err(backend)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            counters,
        })
    }

    /// Transactions and operations committed by the writer thread so far.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `op` for the writer thread; if there is none, its completion comes back with
    /// the reason.
    fn send(&self, op: WriteOp) -> Result<(), (CommitDone, StoreError)> {
        let Ok(guard) = self.writer.lock() else {
            return Err((op.done, backend("writer mutex poisoned")));
        };
        let Some(tx) = guard.as_ref() else {
            return Err((op.done, backend("store is closed")));
        };
        tx.send(op)
            .map_err(|mpsc::SendError(op)| (op.done, backend("store writer thread has stopped")))
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self
            .reader
            .lock()
            .map_err(|_| backend("reader mutex poisoned"))?;
        f(&conn).map_err(backend)
    }

    /// All certificates, newest first (for `certs list`).
    pub fn list_certificates(&self, limit: usize) -> Result<Vec<IssuedCert>, StoreError> {
        let rows = self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates ORDER BY issued_at DESC, rowid DESC LIMIT ?1"
            ))?;
            let rows = st
                .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], raw_cert)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(cert_from_raw).collect()
    }

    /// Certificates whose serial starts with `prefix` (for `certs show`).
    pub fn find_by_serial_prefix(&self, prefix: &str) -> Result<Vec<IssuedCert>, StoreError> {
        let pattern = format!("{}%", prefix.to_ascii_lowercase().replace(['%', '_'], ""));
        let rows = self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates WHERE serial LIKE ?1 LIMIT 10"
            ))?;
            let rows = st
                .query_map([pattern], raw_cert)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(cert_from_raw).collect()
    }

    /// Number of certificates in the store.
    pub fn count_certificates(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM certificates", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| u64::try_from(n).unwrap_or(0))
    }

    /// The most recent audit events, newest first.
    pub fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT at, peer, device_id, operation, outcome, code, detail, relay FROM audit ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st
                .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok(AuditEvent {
                        at_unix: r.get(0)?,
                        peer: r.get(1)?,
                        device_id: r.get(2)?,
                        operation: r.get(3)?,
                        outcome: r.get(4)?,
                        code: r.get(5)?,
                        detail: r.get(6)?,
                        relay: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// Add device serials to the allowlist; returns how many were new.
    pub fn import_devices(&self, ids: &[String], now_unix: i64) -> Result<usize, StoreError> {
        // Administrative and rare: a connection of its own keeps it off the writer queue.
        let mut conn = open_connection(&self.path)?;
        let tx = conn.transaction().map_err(backend)?;
        let mut added = 0;
        {
            let mut st = tx
                .prepare("INSERT OR IGNORE INTO devices(device_id, imported_at) VALUES (?1, ?2)")
                .map_err(backend)?;
            for id in ids {
                added += st.execute(params![id, now_unix]).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(added)
    }

    /// An administrative transaction on a connection of its own (off the writer queue):
    /// `BEGIN IMMEDIATE`, `f`, `COMMIT` (durable on return, `synchronous=FULL`).
    fn admin<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = open_connection(&self.path)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(backend)?;
        let out = f(&tx)?;
        tx.commit().map_err(backend)?;
        Ok(out)
    }

    /// Stop the writer thread after it has drained its queue.
    pub fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut t) = self.thread.lock() {
            if let Some(handle) = t.take() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

type RawCert = (
    String,
    String,
    String,
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
);

fn raw_cert(r: &Row<'_>) -> rusqlite::Result<RawCert> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn cert_from_raw(raw: RawCert) -> Result<IssuedCert, StoreError> {
    let (serial, device, subject, der, digest, nb, na, at, status, kind, replaces, slot, profile) =
        raw;
    let request_digest: [u8; 32] = digest
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("request digest of {serial}")))?;
    let status = CertStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("status {status:?} of {serial}")))?;
    let kind = match kind.as_str() {
        "enroll" => IssuanceKind::Enroll,
        "reenroll" => IssuanceKind::Reenroll,
        "serverkeygen" => IssuanceKind::ServerKeygen,
        other => return Err(StoreError::Corrupt(format!("kind {other:?} of {serial}"))),
    };
    Ok(IssuedCert {
        serial_hex: serial,
        device_id: device,
        subject,
        der,
        request_digest,
        not_before_unix: nb,
        not_after_unix: na,
        issued_at_unix: at,
        status,
        kind,
        replaces_serial_hex: replaces,
        slot,
        profile,
    })
}

/// One certificate row by a cached statement (`sql` is one of the `SELECT_BY_*` texts).
fn query_cert(
    conn: &Connection,
    sql: &'static str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Option<RawCert>> {
    conn.prepare_cached(sql)?
        .query_row(params, raw_cert)
        .optional()
}

/// Run a cached statement that returns no rows.
fn exec_cached(
    conn: &Connection,
    sql: &'static str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn insert_audit(conn: &Connection, a: &AuditEvent) -> rusqlite::Result<()> {
    exec_cached(
        conn,
        INSERT_AUDIT,
        params![
            a.at_unix,
            a.peer,
            a.device_id,
            a.operation,
            a.outcome,
            a.code,
            a.detail,
            a.relay
        ],
    )?;
    Ok(())
}

/// A CRL entry from a revoked certificate's stored columns (both stores); a missing reason
/// is unspecified.
pub(crate) fn revoked_entry(
    serial: String,
    revoked_at: Option<i64>,
    reason: Option<i64>,
) -> Result<RevokedEntry, StoreError> {
    let reason = reason
        .and_then(|r| u8::try_from(r).ok())
        .map_or(
            Some(RevocationReason::Unspecified),
            RevocationReason::from_code,
        )
        .ok_or_else(|| StoreError::Corrupt(format!("revocation reason of {serial}")))?;
    Ok(RevokedEntry {
        serial_hex: serial,
        revoked_at_unix: revoked_at.unwrap_or(0),
        reason,
    })
}

fn is_blocked(conn: &Connection, device_id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(SELECT_BLOCKED)?
        .query_row(params![device_id], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

fn revoke_in(
    conn: &Connection,
    serial: &str,
    reason: RevocationReason,
    at: i64,
) -> rusqlite::Result<usize> {
    exec_cached(conn, REVOKE_CERT, params![serial, at, reason.code()])
}

fn apply_issue(
    conn: &Connection,
    cert: &IssuedCert,
    audit: &AuditEvent,
) -> Result<CommitOutcome, StoreError> {
    if let Some(raw) = query_cert(
        conn,
        SELECT_BY_REQUEST,
        params![cert.device_id, cert.request_digest.as_slice()],
    )
    .map_err(backend)?
    {
        return Ok(CommitOutcome::AlreadyIssued(cert_from_raw(raw)?));
    }
    // A block or revocation committed after the request was decided wins.
    let blocked = is_blocked(conn, &cert.device_id).map_err(backend)?;
    let replaced = match &cert.replaces_serial_hex {
        Some(r) => conn
            .prepare_cached(SELECT_STATUS)
            .and_then(|mut st| {
                st.query_row(params![r], |row| row.get::<_, String>(0))
                    .optional()
            })
            .map_err(backend)?
            .and_then(|s| CertStatus::parse(&s)),
        None => None,
    };
    if let Some(reason) = issuance_refusal(blocked, replaced) {
        return Ok(CommitOutcome::Refused(reason));
    }
    // Another re-enrollment of the device (on this node or another) committed first.
    if let Some(status) = replaced.filter(|s| *s != CertStatus::Active) {
        return Ok(CommitOutcome::ReplacedNotActive(status));
    }
    exec_cached(conn, SUPERSEDE_ACTIVE, params![cert.device_id, cert.slot]).map_err(backend)?;
    exec_cached(
        conn,
        INSERT_CERT,
        params![
            cert.serial_hex,
            cert.device_id,
            cert.subject,
            cert.der,
            cert.request_digest.as_slice(),
            cert.not_before_unix,
            cert.not_after_unix,
            cert.issued_at_unix,
            cert.status.as_str(),
            cert.kind.as_str(),
            cert.replaces_serial_hex,
            cert.slot,
            cert.profile,
        ],
    )
    .map_err(backend)?;
    insert_audit(conn, audit).map_err(backend)?;
    Ok(CommitOutcome::Committed)
}

/// Run `f` inside a SAVEPOINT: released on success, rolled back on error.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    exec_cached(conn, "SAVEPOINT op", []).map_err(backend)?;
    match f(conn) {
        Ok(v) => {
            exec_cached(conn, "RELEASE op", []).map_err(backend)?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

fn apply(conn: &Connection, commit: &Commit) -> CommitResult {
    match commit {
        Commit::Issuance { cert, audit } => apply_issue(conn, cert, audit),
        Commit::Audit(audit) => insert_audit(conn, audit)
            .map(|()| CommitOutcome::Committed)
            .map_err(backend),
    }
}

fn writer_loop(
    conn: Connection,
    rx: Receiver<WriteOp>,
    max_batch: usize,
    counters: &WriterCounters,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let (committed, results) = commit_batch(&conn, &batch);
        match &committed {
            Ok(()) => {
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                counters.operations.fetch_add(
                    u64::try_from(batch.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            Err(e) => tracing::error!(error = %e, "store commit failed"),
        }
        for (WriteOp { done, .. }, r) in batch.into_iter().zip(results) {
            done(match (&committed, r) {
                (Ok(()), r) => r,
                (Err(e), _) => Err(backend(e)),
            });
        }
    }
}

/// One transaction for the whole batch (one fsync), and each operation's result.
///
/// The batch is first applied as it is. An operation that fails (a backend error: an
/// operation that is refused, replayed or superseded has an `Ok` outcome and writes no more
/// than its audit row) makes the whole transaction roll back, and the batch is applied
/// again with each operation inside a SAVEPOINT of its own, so that only the failing one
/// leaves nothing behind. A SAVEPOINT makes SQLite copy every page the operation touches
/// into an in-memory journal, which is now paid only for a batch that failed
/// (docs/benchmarks.md, "The store's writer thread").
fn commit_batch(
    conn: &Connection,
    batch: &[WriteOp],
) -> (Result<(), StoreError>, Vec<CommitResult>) {
    let optimistic = in_transaction(conn, |c| {
        let mut results = Vec::with_capacity(batch.len());
        for op in batch {
            results.push(apply(c, &op.commit)?);
        }
        Ok(results)
    });
    match optimistic {
        Ok(results) => (Ok(()), results.into_iter().map(Ok).collect()),
        // Begin, commit or one of the operations failed, and nothing of the batch stands.
        Err(_) => {
            let mut results = Vec::with_capacity(batch.len());
            let committed = in_transaction(conn, |c| {
                for op in batch {
                    results.push(in_savepoint(c, |c| apply(c, &op.commit)));
                }
                Ok(())
            });
            results.resize_with(batch.len(), || Err(backend("not applied")));
            (committed, results)
        }
    }
}

/// Run `f` in a write transaction: committed (with synchronous=FULL, fsynced) if it
/// succeeds, rolled back otherwise. Nobody hears "committed" before COMMIT returns.
fn in_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    begun_by("BEGIN IMMEDIATE", conn, f)
}

/// Run `f` in a transaction opened by `begin` (`BEGIN IMMEDIATE` to write, `BEGIN` for a read
/// transaction): committed if it succeeds, rolled back otherwise.
fn begun_by<T>(
    begin: &'static str,
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    exec_cached(conn, begin, []).map_err(backend)?;
    let r = f(conn).and_then(|v| {
        exec_cached(conn, "COMMIT", []).map_err(backend)?;
        Ok(v)
    });
    if r.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    r
}

impl ServerStore for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }
    fn list_certificates(&self, limit: usize) -> Result<Vec<IssuedCert>, StoreError> {
        SqliteStore::list_certificates(self, limit)
    }
    fn find_by_serial_prefix(&self, prefix: &str) -> Result<Vec<IssuedCert>, StoreError> {
        SqliteStore::find_by_serial_prefix(self, prefix)
    }
    fn count_certificates(&self) -> Result<u64, StoreError> {
        SqliteStore::count_certificates(self)
    }
    fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        SqliteStore::recent_audit(self, limit)
    }
    fn import_devices(&self, ids: &[String], now_unix: i64) -> Result<usize, StoreError> {
        SqliteStore::import_devices(self, ids, now_unix)
    }
    fn writer_stats(&self) -> WriterStats {
        SqliteStore::writer_stats(self)
    }
    fn close(&self) {
        SqliteStore::close(self);
    }
}

impl Store for SqliteStore {
    fn enrollment_reads(
        &self,
        device_id: &str,
        request_digest: Option<&[u8; 32]>,
    ) -> Result<EnrollmentReads, StoreError> {
        let conn = self
            .reader
            .lock()
            .map_err(|_| backend("reader mutex poisoned"))?;
        // One read transaction: one WAL snapshot and one read lock for both lookups. Each
        // statement on its own would take its own, and after every commit of the writer find
        // the reader's page cache stale again.
        let (blocked, raw) = begun_by("BEGIN", &conn, |c| {
            let blocked = is_blocked(c, device_id).map_err(backend)?;
            let raw = match request_digest {
                Some(d) if !blocked => {
                    query_cert(c, SELECT_BY_REQUEST, params![device_id, d.as_slice()])
                        .map_err(backend)?
                }
                _ => None,
            };
            Ok((blocked, raw))
        })?;
        Ok(EnrollmentReads {
            blocked,
            already_issued: raw.map(cert_from_raw).transpose()?,
        })
    }

    fn find_by_request(
        &self,
        device_id: &str,
        request_digest: &[u8; 32],
    ) -> Result<Option<IssuedCert>, StoreError> {
        let raw = self.read(|c| {
            query_cert(
                c,
                SELECT_BY_REQUEST,
                params![device_id, request_digest.as_slice()],
            )
        })?;
        raw.map(cert_from_raw).transpose()
    }

    fn find_by_serial(&self, serial_hex: &str) -> Result<Option<IssuedCert>, StoreError> {
        let raw = self.read(|c| query_cert(c, SELECT_BY_SERIAL, params![serial_hex]))?;
        raw.map(cert_from_raw).transpose()
    }

    fn device_allowed(&self, device_id: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")?
                .query_row(params![device_id], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    fn submit_commit(&self, commit: Commit, done: CommitDone) {
        if let Err((done, e)) = self.send(WriteOp { commit, done }) {
            done(Err(e));
        }
    }

    fn device_blocked(&self, device_id: &str) -> Result<bool, StoreError> {
        self.read(|c| is_blocked(c, device_id))
    }

    fn issued_since(&self, device_id: &str, since_unix: i64) -> Result<IssuanceWindow, StoreError> {
        self.read(|c| {
            c.prepare_cached(ISSUED_SINCE)?
                .query_row(params![device_id, since_unix], |r| {
                    Ok(IssuanceWindow {
                        count: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        oldest_unix: r.get(1)?,
                    })
                })
        })
    }

    fn revoke(&self, r: &Revocation) -> Result<RevokeOutcome, StoreError> {
        self.admin(|tx| {
            let Some(raw) =
                query_cert(tx, SELECT_BY_SERIAL, params![r.serial_hex]).map_err(backend)?
            else {
                return Ok(RevokeOutcome::NotFound);
            };
            let before = cert_from_raw(raw)?;
            if before.status == CertStatus::Revoked {
                return Ok(RevokeOutcome::AlreadyRevoked(before));
            }
            revoke_in(tx, &r.serial_hex, r.reason, r.revoked_at_unix).map_err(backend)?;
            exec_cached(tx, BUMP_GENERATION, []).map_err(backend)?;
            insert_audit(tx, &r.audit).map_err(backend)?;
            Ok(RevokeOutcome::Revoked(before))
        })
    }

    fn block_device(&self, b: &DeviceBlock) -> Result<BlockOutcome, StoreError> {
        self.admin(|tx| {
            let newly_blocked = exec_cached(
                tx,
                BLOCK_DEVICE,
                params![b.device_id, b.at_unix, b.reason.code()],
            )
            .map_err(backend)?
                > 0;
            let mut revoked_serials = Vec::new();
            if !b.keep_certs {
                let active: Vec<String> = tx
                    .prepare_cached(SELECT_ACTIVE_OF_DEVICE)
                    .and_then(|mut st| {
                        st.query_map(params![b.device_id], |r| r.get(0))?
                            .collect::<rusqlite::Result<Vec<String>>>()
                    })
                    .map_err(backend)?;
                for serial in active {
                    revoke_in(tx, &serial, b.reason, b.at_unix).map_err(backend)?;
                    revoked_serials.push(serial);
                }
            }
            exec_cached(tx, BUMP_GENERATION, []).map_err(backend)?;
            insert_audit(tx, &b.audit).map_err(backend)?;
            Ok(BlockOutcome {
                newly_blocked,
                revoked_serials,
            })
        })
    }

    fn revoked_certificates(&self) -> Result<Vec<RevokedEntry>, StoreError> {
        let rows = self.read(|c| {
            c.prepare_cached(SELECT_REVOKED)?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(|(serial, at, reason)| revoked_entry(serial, at, reason))
            .collect()
    }

    fn blocked_devices(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT device_id FROM blocked_devices ORDER BY device_id")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
    }

    fn revocation_generation(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.prepare_cached(SELECT_GENERATION)?
                .query_row([], |r| r.get::<_, i64>(0))
        })
        .map(|g| u64::try_from(g).unwrap_or(0))
    }

    fn next_crl_number(&self) -> Result<u64, StoreError> {
        self.admin(|tx| {
            tx.prepare_cached(NEXT_CRL_NUMBER)
                .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(backend)
        })
    }

    fn save_crl(&self, crl: &CrlRecord) -> Result<bool, StoreError> {
        let number = i64::try_from(crl.number).map_err(backend)?;
        let generation = i64::try_from(crl.generation).map_err(backend)?;
        self.admin(|tx| {
            exec_cached(
                tx,
                INSERT_CRL,
                params![
                    number,
                    crl.this_update_unix,
                    crl.next_update_unix,
                    generation,
                    crl.der
                ],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
    }

    fn latest_crl(&self) -> Result<Option<CrlRecord>, StoreError> {
        self.read(|c| {
            c.prepare_cached(SELECT_LATEST_CRL)?
                .query_row([], |r| {
                    Ok(CrlRecord {
                        number: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        this_update_unix: r.get(1)?,
                        next_update_unix: r.get(2)?,
                        generation: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                        der: r.get(4)?,
                    })
                })
                .optional()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cert(serial: &str, device: &str, digest: u8) -> IssuedCert {
        IssuedCert {
            serial_hex: serial.into(),
            device_id: device.into(),
            subject: format!("CN={device}"),
            der: vec![0x30, 0x00],
            request_digest: [digest; 32],
            not_before_unix: 1,
            not_after_unix: 2,
            issued_at_unix: 3,
            status: CertStatus::Active,
            kind: IssuanceKind::Enroll,
            replaces_serial_hex: None,
            slot: String::new(),
            profile: String::new(),
        }
    }

    fn issue(s: &SqliteStore, cert: IssuedCert, audit: AuditEvent) -> CommitResult {
        est_proto::store::commit_and_wait(
            s,
            Commit::Issuance {
                cert: Box::new(cert),
                audit,
            },
        )
    }

    fn audit(device: &str) -> AuditEvent {
        AuditEvent {
            at_unix: 3,
            peer: "127.0.0.1:1".into(),
            relay: None,
            device_id: device.into(),
            operation: "sen".into(),
            outcome: "issued".into(),
            code: "2.04".into(),
            detail: String::new(),
        }
    }

    /// Supersession is per (device, slot): a DLMS meter's signing and key-agreement
    /// certificates stay active together; a new one in a slot supersedes only that slot's.
    #[test]
    fn supersession_is_per_device_and_slot() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("est.sqlite3"), 4).unwrap();
        let in_slot = |serial: &str, digest: u8, slot: &str| IssuedCert {
            slot: slot.into(),
            ..cert(serial, "SN9", digest)
        };
        issue(&s, in_slot("a1", 1, "dlms-signing"), audit("SN9")).unwrap();
        issue(&s, in_slot("b1", 2, "dlms-key-agreement"), audit("SN9")).unwrap();
        issue(&s, in_slot("c1", 3, ""), audit("SN9")).unwrap();
        let status = |serial: &str| s.find_by_serial(serial).unwrap().unwrap().status;
        assert_eq!(
            [status("a1"), status("b1"), status("c1")],
            [CertStatus::Active; 3]
        );
        issue(&s, in_slot("a2", 4, "dlms-signing"), audit("SN9")).unwrap();
        assert_eq!(status("a1"), CertStatus::Superseded);
        assert_eq!(status("a2"), CertStatus::Active);
        assert_eq!(status("b1"), CertStatus::Active);
        assert_eq!(status("c1"), CertStatus::Active);
        assert_eq!(
            s.find_by_serial("a2").unwrap().unwrap().slot,
            "dlms-signing"
        );
    }

    /// The block and the replay lookup in one read transaction: both answers as the two
    /// reads give them, nothing read for a blocked device, and the reader left outside any
    /// transaction (so it sees the next commit).
    #[test]
    fn enrollment_reads_answer_as_the_separate_reads_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("est.sqlite3"), 4).unwrap();
        issue(&s, cert("01", "SN1", 1), audit("SN1")).unwrap();
        let reads = s.enrollment_reads("SN1", Some(&[1; 32])).unwrap();
        assert!(!reads.blocked);
        assert_eq!(reads.already_issued.unwrap().serial_hex, "01");
        assert_eq!(
            reads_of(&s, "SN1", Some(&[2; 32])),
            EnrollmentReads::default()
        );
        assert_eq!(reads_of(&s, "SN1", None), EnrollmentReads::default());
        assert!(s.reader.lock().unwrap().is_autocommit());

        // A commit after a read is seen by the next one.
        issue(&s, cert("02", "SN1", 2), audit("SN1")).unwrap();
        assert_eq!(
            reads_of(&s, "SN1", Some(&[2; 32]))
                .already_issued
                .unwrap()
                .serial_hex,
            "02"
        );
        s.block_device(&DeviceBlock {
            device_id: "SN1".into(),
            reason: RevocationReason::CessationOfOperation,
            at_unix: 60,
            keep_certs: true,
            audit: audit("SN1"),
        })
        .unwrap();
        assert_eq!(
            reads_of(&s, "SN1", Some(&[1; 32])),
            EnrollmentReads {
                blocked: true,
                already_issued: None
            }
        );
        assert!(s.reader.lock().unwrap().is_autocommit());
    }

    fn reads_of(s: &SqliteStore, device: &str, digest: Option<&[u8; 32]>) -> EnrollmentReads {
        s.enrollment_reads(device, digest).unwrap()
    }

    #[test]
    fn commit_supersede_replay_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("est.sqlite3");
        {
            let s = SqliteStore::open(&path, 16).unwrap();
            assert_eq!(
                issue(&s, cert("01", "SN1", 1), audit("SN1")).unwrap(),
                CommitOutcome::Committed
            );
            // Same device, same request: the first certificate comes back.
            match issue(&s, cert("02", "SN1", 1), audit("SN1")).unwrap() {
                CommitOutcome::AlreadyIssued(c) => assert_eq!(c.serial_hex, "01"),
                other => panic!("{other:?}"),
            }
            // A new request supersedes the first.
            issue(&s, cert("03", "SN1", 3), audit("SN1")).unwrap();
            assert_eq!(
                s.find_by_serial("01").unwrap().unwrap().status,
                CertStatus::Superseded
            );
            assert_eq!(
                s.find_by_serial("03").unwrap().unwrap().status,
                CertStatus::Active
            );
            assert!(s.find_by_serial("02").unwrap().is_none());
            // An audit row on its own (a refusal, a replay).
            assert_eq!(
                est_proto::store::commit_and_wait(&s, Commit::Audit(audit("SN9"))).unwrap(),
                CommitOutcome::Committed
            );
            assert_eq!(s.recent_audit(10).unwrap().len(), 3);
        }
        // Durable across close and reopen.
        let s = SqliteStore::open(&path, 16).unwrap();
        assert_eq!(s.count_certificates().unwrap(), 2);
        assert_eq!(
            s.find_by_request("SN1", &[3; 32])
                .unwrap()
                .unwrap()
                .serial_hex,
            "03"
        );
        assert_eq!(s.find_by_serial_prefix("0").unwrap().len(), 2);
    }

    /// A database made before the `relay` column gets it when opened; the column round-trips.
    #[test]
    fn the_relay_column_is_added_to_an_older_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, \
                 peer TEXT NOT NULL, device_id TEXT NOT NULL, operation TEXT NOT NULL, \
                 outcome TEXT NOT NULL, code TEXT NOT NULL, detail TEXT NOT NULL); \
                 INSERT INTO audit(at, peer, device_id, operation, outcome, code, detail) \
                 VALUES (1, '127.0.0.1:1', 'SN0', 'sen', 'issued', '2.04', '');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path, 4).unwrap();
        let mut relayed = audit("SN1");
        relayed.relay = Some("198.51.100.4:7634".into());
        relayed.peer = "198.51.100.4:7634/jpy:0a0b0c0d0e0f".into();
        est_proto::store::commit_and_wait(&s, Commit::Audit(relayed.clone())).unwrap();
        let rows = s.recent_audit(10).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], relayed);
        assert_eq!(rows[1].relay, None);
        // Opening again does not try to add it twice.
        drop(s);
        SqliteStore::open(&path, 4).unwrap();
    }

    /// The first column of every row `sql` gives, as text.
    fn strings(conn: &Connection, sql: &str) -> Vec<String> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A batch is one transaction without per-operation savepoints. When one operation of
    /// it fails (here a duplicate serial), the batch is applied again operation by
    /// operation: the others are committed in one transaction and the failing one leaves
    /// nothing behind, neither its certificate nor its audit row.
    #[test]
    fn a_failing_operation_in_a_batch_costs_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteStore::open(&path, 4).unwrap());
        let conn = open_connection(&path).unwrap();
        let op = |serial: &str, device: &str, digest: u8| WriteOp {
            commit: Commit::Issuance {
                cert: Box::new(cert(serial, device, digest)),
                audit: audit(device),
            },
            done: Box::new(|_| {}),
        };
        let rows = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        // Without a failure: one transaction, every outcome Committed.
        let (committed, results) = commit_batch(&conn, &[op("01", "SN1", 1), op("02", "SN2", 2)]);
        committed.unwrap();
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(CommitOutcome::Committed))));
        assert_eq!((rows("certificates"), rows("audit")), (2, 2));
        // "02" again, for another device and request: the INSERT fails on the serial.
        let (committed, results) = commit_batch(
            &conn,
            &[op("03", "SN3", 3), op("02", "SN4", 4), op("05", "SN5", 5)],
        );
        committed.unwrap();
        assert!(
            matches!(results[0], Ok(CommitOutcome::Committed)),
            "{results:?}"
        );
        assert!(
            matches!(results[1], Err(StoreError::Backend(_))),
            "{results:?}"
        );
        assert!(
            matches!(results[2], Ok(CommitOutcome::Committed)),
            "{results:?}"
        );
        assert_eq!((rows("certificates"), rows("audit")), (4, 4));
        assert_eq!(
            strings(&conn, "SELECT device_id FROM certificates ORDER BY serial"),
            ["SN1", "SN2", "SN3", "SN5"]
        );
        assert!(conn.is_autocommit(), "no transaction left open");
        // A replay in a batch is an outcome, not a failure: no fallback, nothing written.
        let (committed, results) = commit_batch(&conn, &[op("06", "SN1", 1)]);
        committed.unwrap();
        assert!(
            matches!(results[0], Ok(CommitOutcome::AlreadyIssued(ref c)) if c.serial_hex == "01"),
            "{results:?}"
        );
        assert_eq!((rows("certificates"), rows("audit")), (4, 4));
    }

    /// The statements run at every issuance find their rows through an index (no table
    /// scan), on a new database and on one from before the active-certificates index.
    #[test]
    fn issuance_statements_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            // A database as an older release left it: the index over every certificate.
            let c = open_connection(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            migrate_columns(&c).unwrap();
            c.execute_batch(
                "CREATE INDEX certificates_by_device ON certificates(device_id, status)",
            )
            .unwrap();
        }
        drop(SqliteStore::open(&path, 4).unwrap());
        let conn = open_connection(&path).unwrap();
        assert_eq!(
            strings(&conn, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'certificates' AND name NOT LIKE 'sqlite_%' ORDER BY name"),
            [
                "certificates_active_by_device",
                "certificates_by_device_time",
                "certificates_by_request"
            ]
        );
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args = vec!["x"; st.parameter_count()];
            st.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        for (sql, index) in [
            (SUPERSEDE_ACTIVE, "certificates_active_by_device"),
            (SELECT_ACTIVE_OF_DEVICE, "certificates_active_by_device"),
            (ISSUED_SINCE, "certificates_by_device_time"),
            (SELECT_BY_REQUEST, "certificates_by_request"),
        ] {
            let p = plan(sql);
            assert!(
                p.contains(&format!("USING INDEX {index}"))
                    || p.contains(&format!("USING COVERING INDEX {index}")),
                "{sql}: {p}"
            );
        }
    }

    #[test]
    fn concurrent_commits_are_grouped_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SqliteStore::open(&dir.path().join("db"), 64).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let dev = format!("SN{t}-{i}");
                        let c = cert(&format!("{t:02x}{i:04x}"), &dev, 7);
                        assert_eq!(issue(&s, c, audit(&dev)).unwrap(), CommitOutcome::Committed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.count_certificates().unwrap(), 400);
        // Group commit: eight writers at once share transactions (fsyncs).
        let st = s.writer_stats();
        assert_eq!(st.operations, 400);
        assert!(st.transactions < st.operations, "{st:?}");
    }

    #[test]
    fn completions_come_from_the_writer_thread_and_a_closed_store_refuses_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db"), 8).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..4u8 {
            let tx = tx.clone();
            let dev = format!("SN{i}");
            s.submit_commit(
                Commit::Issuance {
                    cert: Box::new(cert(&format!("{i:02x}"), &dev, i)),
                    audit: audit(&dev),
                },
                Box::new(move |r| {
                    let on = std::thread::current().name().map(str::to_owned);
                    tx.send((r, on)).unwrap();
                }),
            );
        }
        for _ in 0..4 {
            let (r, on) = rx.recv().unwrap();
            assert_eq!(r.unwrap(), CommitOutcome::Committed);
            assert_eq!(on.as_deref(), Some("est-store-writer"));
        }
        s.close();
        let tx2 = tx.clone();
        s.submit_commit(
            Commit::Audit(audit("SN1")),
            Box::new(move |r| tx2.send((r, None)).unwrap()),
        );
        let (r, _) = rx.recv().unwrap();
        assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
        assert_eq!(s.count_certificates().unwrap(), 4);
    }

    #[test]
    fn allowlist() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db"), 4).unwrap();
        assert!(!s.device_allowed("SN1").unwrap());
        assert_eq!(
            s.import_devices(&["SN1".into(), "SN2".into(), "SN1".into()], 0)
                .unwrap(),
            2
        );
        assert!(s.device_allowed("SN1").unwrap());
        assert!(!s.device_allowed("SN3").unwrap());
    }

    fn rev(serial: &str, reason: RevocationReason) -> Revocation {
        Revocation {
            serial_hex: serial.into(),
            reason,
            revoked_at_unix: 50,
            audit: audit("SN1"),
        }
    }

    #[test]
    fn revoke_block_generation_and_crl_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SqliteStore::open(&path, 4).unwrap();
            assert_eq!(s.revocation_generation().unwrap(), 0);
            issue(&s, cert("01", "SN1", 1), audit("SN1")).unwrap();
            issue(&s, cert("02", "SN2", 2), audit("SN2")).unwrap();
            issue(&s, cert("03", "SN3", 3), audit("SN3")).unwrap();
            assert_eq!(
                s.revoke(&rev("ff", RevocationReason::KeyCompromise))
                    .unwrap(),
                RevokeOutcome::NotFound
            );
            assert!(matches!(
                s.revoke(&rev("01", RevocationReason::KeyCompromise)).unwrap(),
                RevokeOutcome::Revoked(c) if c.status == CertStatus::Active
            ));
            assert!(matches!(
                s.revoke(&rev("01", RevocationReason::Superseded)).unwrap(),
                RevokeOutcome::AlreadyRevoked(_)
            ));
            assert_eq!(s.revocation_generation().unwrap(), 1);
            let block = |dev: &str, keep: bool| DeviceBlock {
                device_id: dev.into(),
                reason: RevocationReason::CessationOfOperation,
                at_unix: 60,
                keep_certs: keep,
                audit: audit(dev),
            };
            let b = s.block_device(&block("SN2", false)).unwrap();
            assert!(b.newly_blocked);
            assert_eq!(b.revoked_serials, ["02"]);
            let b = s.block_device(&block("SN3", true)).unwrap();
            assert!(b.revoked_serials.is_empty());
            assert!(!s.block_device(&block("SN3", true)).unwrap().newly_blocked);
            assert_eq!(s.revocation_generation().unwrap(), 4);
            assert!(s.device_blocked("SN2").unwrap() && !s.device_blocked("SN1").unwrap());
            assert_eq!(s.blocked_devices().unwrap(), ["SN2", "SN3"]);
            assert_eq!(
                s.revoked_certificates().unwrap(),
                [
                    RevokedEntry {
                        serial_hex: "01".into(),
                        revoked_at_unix: 50,
                        reason: RevocationReason::KeyCompromise
                    },
                    RevokedEntry {
                        serial_hex: "02".into(),
                        revoked_at_unix: 60,
                        reason: RevocationReason::CessationOfOperation
                    },
                ]
            );
            assert_eq!(
                s.find_by_serial("03").unwrap().unwrap().status,
                CertStatus::Active
            );
            // A blocked device is refused at commit, whatever was decided before.
            assert_eq!(
                issue(&s, cert("04", "SN3", 4), audit("SN3")).unwrap(),
                CommitOutcome::Refused("device is blocked (decommissioned)".into())
            );
            // So is a re-enrollment whose certificate was revoked meanwhile.
            let mut renewal = cert("05", "SN1", 5);
            renewal.replaces_serial_hex = Some("01".into());
            assert!(matches!(
                issue(&s, renewal, audit("SN1")).unwrap(),
                CommitOutcome::Refused(r) if r.contains("revoked")
            ));
            assert!(s.find_by_serial("04").unwrap().is_none());
            // Issuances per device since a time.
            assert_eq!(
                s.issued_since("SN1", 0).unwrap(),
                IssuanceWindow {
                    count: 1,
                    oldest_unix: Some(3)
                }
            );
            assert_eq!(s.issued_since("SN1", 4).unwrap().count, 0);
            // cRLNumbers only grow; an older CRL never replaces a newer one.
            assert_eq!(s.latest_crl().unwrap(), None);
            assert_eq!(s.next_crl_number().unwrap(), 1);
            assert_eq!(s.next_crl_number().unwrap(), 2);
            let crl = |n: u64| CrlRecord {
                number: n,
                this_update_unix: 1,
                next_update_unix: 2,
                generation: 4,
                der: vec![n as u8],
            };
            assert!(s.save_crl(&crl(2)).unwrap());
            assert!(!s.save_crl(&crl(1)).unwrap());
            assert_eq!(s.latest_crl().unwrap().unwrap().number, 2);
        }
        // All of it durable.
        let s = SqliteStore::open(&path, 4).unwrap();
        assert_eq!(s.revocation_generation().unwrap(), 4);
        assert_eq!(s.next_crl_number().unwrap(), 3);
        assert_eq!(s.revoked_certificates().unwrap().len(), 2);
        assert_eq!(
            s.recent_audit(50)
                .unwrap()
                .iter()
                .filter(|a| a.device_id == "SN2")
                .count(),
            2
        );
    }

    #[test]
    fn a_database_from_before_revocation_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        {
            // The schema as first released: no revocation columns or tables.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, \
                 subject TEXT NOT NULL, der BLOB NOT NULL, request_digest BLOB NOT NULL, \
                 not_before INTEGER NOT NULL, not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL, \
                 status TEXT NOT NULL, kind TEXT NOT NULL, replaces TEXT);
                 INSERT INTO certificates VALUES ('0a', 'SN1', 'CN=SN1', x'3000', zeroblob(32), 1, 2, 3, 'active', 'enroll', NULL);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path, 4).unwrap();
        let old = s.find_by_serial("0a").unwrap().unwrap();
        assert_eq!((old.slot.as_str(), old.profile.as_str()), ("", ""));
        // New rows keep their profile beside the old ones.
        issue(
            &s,
            IssuedCert {
                profile: "vendor-a".into(),
                ..cert("0b", "SN2", 9)
            },
            audit("SN2"),
        )
        .unwrap();
        assert_eq!(s.find_by_serial("0b").unwrap().unwrap().profile, "vendor-a");
        assert!(matches!(
            s.revoke(&rev("0a", RevocationReason::Superseded)).unwrap(),
            RevokeOutcome::Revoked(_)
        ));
        assert_eq!(
            s.revoked_certificates().unwrap()[0].reason,
            RevocationReason::Superseded
        );
    }
}
