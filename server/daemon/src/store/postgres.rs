//! PostgreSQL implementation of [`est_proto::store::Store`]: N est-server nodes on one database.
//!
//! # Shape
//!
//! The store owns a small tokio runtime of its own (two threads, `est-pg`) that runs a
//! deadpool-postgres pool of `[storage] pool_size` tokio-postgres connections:
//!
//! - **Commits** ([`Store::submit_commit`]) go on a queue served by `pool_size / 2` writer
//!   tasks. A writer takes whatever is queued (up to `max_batch`) and commits it in one
//!   transaction, the statements pipelined on one connection (one round trip for the whole
//!   batch, one WAL flush): the group commit. Each completion is called after COMMIT
//!   returned, so a meter never holds a certificate PostgreSQL could lose.
//! - **Reads** ([`Store::find_by_request`] and the others) stay synchronous, as the core calls
//!   them inside `EstSession::handle_datagram`: the query runs on the store's runtime and the
//!   calling thread waits for it. On a worker of a multi-threaded tokio runtime (the daemon's)
//!   the wait is wrapped in `tokio::task::block_in_place`, so the runtime moves its other
//!   tasks to another thread meanwhile; elsewhere (CLI, tests) it simply blocks. Every read
//!   and every batch is bounded by `[storage] timeout_ms`: an unreachable database answers
//!   [`StoreError::Backend`], which the core turns into 5.03 + Max-Age.
//!
//! Why not make the reads async? They sit in the middle of the core's decision (allowlist,
//! the certificate being renewed, a retried request) and would need the sans-IO core to
//! suspend and resume a request at three more points, for a round trip of ~0.1 ms on a
//! local network; block_in_place costs the runtime a thread hand-off instead. The driver
//! already treats the commit, the one slow operation (the WAL flush), as an event.
//!
//! # Correctness across nodes
//!
//! Nothing but the database coordinates the nodes. An issuance is one call of the SQL
//! function `est_issue_profile` (migration 5: `est_issue_slot` of migration 4 recording the
//! certificate's profile too; `est_issue` of migrations 1 and 2 before them), inside the
//! batch's transaction, which:
//!
//! 1. returns the device's certificate for the same request digest if there is one (a retry
//!    on any node gets the first node's certificate: [`CommitOutcome::AlreadyIssued`]);
//! 2. for a re-enrollment, locks the certificate it replaces (`SELECT ... FOR UPDATE`) and
//!    refuses it if another re-enrollment has superseded it meanwhile
//!    ([`CommitOutcome::ReplacedNotActive`]) unless that one was for the same request;
//! 3. supersedes the device's active certificate of the same slot ([`IssuedCert::slot`]: a
//!    DLMS meter's signing and key-agreement certificates stay active side by side), inserts
//!    the new one and its audit row.
//!
//! The constraints make races safe whatever the timing: `UNIQUE (device_id, request_digest)`
//! and a partial unique index allowing one `active` certificate per device and slot. A
//! statement that loses a race on either (or a deadlock) is retried inside the function from
//! step 1 under a fresh snapshot (READ COMMITTED), where it sees the winner. Two nodes racing
//! the same device's /sren (in one slot) therefore produce one active certificate: the
//! loser's meter gets the same certificate (same CSR) or a 4.03 refusal (another CSR). Each
//! batch takes its row locks in device order, so two nodes' batches do not deadlock on each
//! other.
//!
//! Revocation (migration 2) keeps the same rules on N nodes and the operator CLI:
//!
//! - `est_issue` (now `est_issue_slot`) first takes the device's transaction-scoped advisory
//!   lock, which [`Store::block_device`] takes too: a block and an issuance of the same
//!   device, on any nodes, are ordered. The block either comes first (the issuance sees it and answers
//!   `blocked`: [`CommitOutcome::Refused`]) or second (it revokes the new certificate). A
//!   re-enrollment whose certificate was revoked meanwhile is refused the same way (the
//!   `FOR UPDATE` of step 2 waits for a revocation in progress).
//! - [`Store::revoke`] locks the certificate's row, so a second revocation of it (another
//!   node, the CLI) waits and answers [`RevokeOutcome::AlreadyRevoked`].
//! - The revocation generation and the last cRLNumber live in the one row of
//!   `revocation_state`, each bumped by an `UPDATE` whose row lock lasts until COMMIT: every
//!   node polls the same generation, and no cRLNumber is handed out twice (nor skipped).
//!   [`Store::save_crl`] compares numbers under `LOCK TABLE crls IN EXCLUSIVE MODE`.
//!
//! # Schema
//!
//! Versioned migrations ([`MIGRATIONS`]) are applied at open, under an advisory lock so
//! that nodes starting together apply each once; `schema_migrations` records them. A new
//! column or table is a new entry at the end of the list (migration 2: revocation).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use est_proto::store::{
    issuance_refusal, AuditEvent, BlockOutcome, CertStatus, Commit, CommitDone, CommitOutcome,
    CommitResult, CrlRecord, DeviceBlock, IssuanceKind, IssuanceWindow, IssuedCert, Revocation,
    RevokeOutcome, RevokedEntry, Store, StoreError,
};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{pg_tls, revoked_entry, ServerStore, WriteOp, WriterCounters, WriterStats};
use crate::config::StorageSection;

/// One schema change, applied once per database, in order.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first. Append; never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "certificates, audit, devices; est_issue()",
        sql: MIGRATION_1,
    },
    Migration {
        version: 2,
        name: "revocation: revoked_at/reason, blocked_devices, revocation_state, crls; est_issue() refuses blocked devices",
        sql: MIGRATION_2,
    },
    Migration {
        version: 3,
        name: "audit.relay (the join proxy an enrollment came through); est_issue_relayed()",
        sql: MIGRATION_3,
    },
    Migration {
        version: 4,
        name: "certificates.slot (DLMS signing and key-agreement certificates side by side); est_issue_slot()",
        sql: MIGRATION_4,
    },
    Migration {
        version: 5,
        name: "certificates.profile (the certificate profile kept at /sren); est_issue_profile()",
        sql: MIGRATION_5,
    },
];

const MIGRATION_1: &str = r#"
CREATE TABLE certificates (
    -- Lower-case hex; "C" collation so that the primary key also serves `certs show PREFIX`.
    serial          text COLLATE "C" PRIMARY KEY,
    device_id       text NOT NULL,
    subject         text NOT NULL,
    der             bytea NOT NULL,
    request_digest  bytea NOT NULL CHECK (length(request_digest) = 32),
    not_before      bigint NOT NULL,
    not_after       bigint NOT NULL,
    issued_at       bigint NOT NULL,
    status          text NOT NULL,
    kind            text NOT NULL,
    replaces        text,
    -- Insertion order, for `certs list` (issued_at ties).
    seq             bigserial NOT NULL
);
-- A retried request (same device, same CSR) on any node finds the first certificate.
CREATE UNIQUE INDEX certificates_by_request ON certificates (device_id, request_digest);
-- At most one active certificate per device, whatever the nodes do.
CREATE UNIQUE INDEX certificates_one_active ON certificates (device_id) WHERE status = 'active';
CREATE INDEX certificates_by_issued ON certificates (issued_at DESC, seq DESC);

CREATE TABLE audit (
    id         bigserial PRIMARY KEY,
    at         bigint NOT NULL,
    peer       text NOT NULL,
    device_id  text NOT NULL,
    operation  text NOT NULL,
    outcome    text NOT NULL,
    code       text NOT NULL,
    detail     text NOT NULL
);

CREATE TABLE devices (
    device_id    text PRIMARY KEY,
    imported_at  bigint NOT NULL
);

-- One issuance: 'committed', 'already:<serial>' (the device's certificate for the same
-- request) or 'not-active:<status>' (a re-enrollment whose certificate was superseded by
-- another one first). Races on the unique indexes, deadlocks and serialization failures are
-- retried from the top under a fresh snapshot, where the winner is visible.
CREATE FUNCTION est_issue(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text
) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    existing text;
    replaced_status text;
    attempt integer := 0;
BEGIN
    LOOP
        BEGIN
            SELECT serial INTO existing FROM certificates
                WHERE device_id = p_device AND request_digest = p_digest;
            IF FOUND THEN
                RETURN 'already:' || existing;
            END IF;
            IF p_replaces IS NOT NULL THEN
                SELECT status INTO replaced_status FROM certificates
                    WHERE serial = p_replaces FOR UPDATE;
                IF FOUND AND replaced_status <> 'active' THEN
                    SELECT serial INTO existing FROM certificates
                        WHERE device_id = p_device AND request_digest = p_digest;
                    IF FOUND THEN
                        RETURN 'already:' || existing;
                    END IF;
                    RETURN 'not-active:' || replaced_status;
                END IF;
            END IF;
            UPDATE certificates SET status = 'superseded'
                WHERE device_id = p_device AND status = 'active';
            INSERT INTO certificates (serial, device_id, subject, der, request_digest,
                    not_before, not_after, issued_at, status, kind, replaces)
                VALUES (p_serial, p_device, p_subject, p_der, p_digest,
                    p_not_before, p_not_after, p_issued_at, p_status, p_kind, p_replaces);
            INSERT INTO audit (at, peer, device_id, operation, outcome, code, detail)
                VALUES (a_at, a_peer, a_device, a_operation, a_outcome, a_code, a_detail);
            RETURN 'committed';
        EXCEPTION WHEN unique_violation OR deadlock_detected OR serialization_failure THEN
            attempt := attempt + 1;
            IF attempt >= 8 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END
$fn$;
"#;

/// Revocation and CRLs (the SQLite store's schema of the same release, plus what N nodes
/// need): a revoked certificate's date and CRLReason; the blocklist; one row holding the
/// revocation generation and the last cRLNumber, each bumped by an `UPDATE` that holds the
/// row's lock until COMMIT, so that every node and the CLI see one sequence (no number twice,
/// no generation lost); every CRL saved; and `est_issue` taking a per-device advisory lock
/// (shared with `block_device`) and refusing a blocked device.
const MIGRATION_2: &str = r#"
ALTER TABLE certificates
    ADD COLUMN revoked_at bigint,
    ADD COLUMN revocation_reason smallint;
-- The per-device enrollment rate limit (issued_since).
CREATE INDEX certificates_by_device_time ON certificates (device_id, issued_at);
-- The CRL's entries.
CREATE INDEX certificates_revoked ON certificates (revoked_at, serial) WHERE status = 'revoked';

CREATE TABLE blocked_devices (
    device_id   text COLLATE "C" PRIMARY KEY,
    blocked_at  bigint NOT NULL,
    reason      smallint NOT NULL
);

CREATE TABLE revocation_state (
    id          integer PRIMARY KEY CHECK (id = 1),
    generation  bigint NOT NULL,
    crl_number  bigint NOT NULL
);
INSERT INTO revocation_state (id, generation, crl_number) VALUES (1, 0, 0);

CREATE TABLE crls (
    number       bigint PRIMARY KEY,
    this_update  bigint NOT NULL,
    next_update  bigint NOT NULL,
    generation   bigint NOT NULL,
    der          bytea NOT NULL
);

-- As in migration 1, plus: the device's advisory lock first (a block of the device waits
-- for this issuance or this issuance for the block, so a block never misses a certificate
-- committed beside it), and 'blocked' for a decommissioned device. A re-enrollment whose
-- certificate was revoked meanwhile answers 'not-active:revoked'.
CREATE OR REPLACE FUNCTION est_issue(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text
) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    existing text;
    replaced_status text;
    attempt integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_device, 0));
    LOOP
        BEGIN
            SELECT serial INTO existing FROM certificates
                WHERE device_id = p_device AND request_digest = p_digest;
            IF FOUND THEN
                RETURN 'already:' || existing;
            END IF;
            PERFORM 1 FROM blocked_devices WHERE device_id = p_device;
            IF FOUND THEN
                RETURN 'blocked';
            END IF;
            IF p_replaces IS NOT NULL THEN
                SELECT status INTO replaced_status FROM certificates
                    WHERE serial = p_replaces FOR UPDATE;
                IF FOUND AND replaced_status <> 'active' THEN
                    SELECT serial INTO existing FROM certificates
                        WHERE device_id = p_device AND request_digest = p_digest;
                    IF FOUND THEN
                        RETURN 'already:' || existing;
                    END IF;
                    RETURN 'not-active:' || replaced_status;
                END IF;
            END IF;
            UPDATE certificates SET status = 'superseded'
                WHERE device_id = p_device AND status = 'active';
            INSERT INTO certificates (serial, device_id, subject, der, request_digest,
                    not_before, not_after, issued_at, status, kind, replaces)
                VALUES (p_serial, p_device, p_subject, p_der, p_digest,
                    p_not_before, p_not_after, p_issued_at, p_status, p_kind, p_replaces);
            INSERT INTO audit (at, peer, device_id, operation, outcome, code, detail)
                VALUES (a_at, a_peer, a_device, a_operation, a_outcome, a_code, a_detail);
            RETURN 'committed';
        EXCEPTION WHEN unique_violation OR deadlock_detected OR serialization_failure THEN
            attempt := attempt + 1;
            IF attempt >= 8 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END
$fn$;
"#;

/// The join proxy of an enrollment (issue #12). est_issue() writes its audit row without
/// naming the column, so the column's default takes the relay from a transaction-local
/// setting that est_issue_relayed() sets around the call (and clears after it).
const MIGRATION_3: &str = r#"
ALTER TABLE audit ADD COLUMN relay text
    DEFAULT NULLIF(current_setting('est.relay', true), '');
CREATE FUNCTION est_issue_relayed(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text, a_relay text
) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    outcome text;
BEGIN
    PERFORM set_config('est.relay', coalesce(a_relay, ''), true);
    outcome := est_issue(p_serial, p_device, p_subject, p_der, p_digest, p_not_before,
        p_not_after, p_issued_at, p_status, p_kind, p_replaces, a_at, a_peer, a_device,
        a_operation, a_outcome, a_code, a_detail);
    PERFORM set_config('est.relay', '', true);
    RETURN outcome;
END
$fn$;
"#;

/// Certificate slots (a DLMS meter holds a signing and a key-agreement certificate at once,
/// [`IssuedCert::slot`]; "" is the LDevID, and every row from before this migration): one
/// active certificate per device *and slot*, and a new certificate supersedes only the active
/// one of its own slot. `est_issue_slot()` is the issuance of migration 2 with the slot and
/// the relay as parameters; `est_issue()` (and through it `est_issue_relayed()`, which nodes
/// of the previous release call during a rolling upgrade) becomes the issuance into slot "".
const MIGRATION_4: &str = r#"
ALTER TABLE certificates ADD COLUMN slot text NOT NULL DEFAULT '';
DROP INDEX certificates_one_active;
CREATE UNIQUE INDEX certificates_one_active_per_slot ON certificates (device_id, slot)
    WHERE status = 'active';

CREATE FUNCTION est_issue_slot(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text, p_slot text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text, a_relay text
) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    existing text;
    replaced_status text;
    attempt integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_device, 0));
    LOOP
        BEGIN
            SELECT serial INTO existing FROM certificates
                WHERE device_id = p_device AND request_digest = p_digest;
            IF FOUND THEN
                RETURN 'already:' || existing;
            END IF;
            PERFORM 1 FROM blocked_devices WHERE device_id = p_device;
            IF FOUND THEN
                RETURN 'blocked';
            END IF;
            IF p_replaces IS NOT NULL THEN
                SELECT status INTO replaced_status FROM certificates
                    WHERE serial = p_replaces FOR UPDATE;
                IF FOUND AND replaced_status <> 'active' THEN
                    SELECT serial INTO existing FROM certificates
                        WHERE device_id = p_device AND request_digest = p_digest;
                    IF FOUND THEN
                        RETURN 'already:' || existing;
                    END IF;
                    RETURN 'not-active:' || replaced_status;
                END IF;
            END IF;
            UPDATE certificates SET status = 'superseded'
                WHERE device_id = p_device AND slot = p_slot AND status = 'active';
            INSERT INTO certificates (serial, device_id, subject, der, request_digest,
                    not_before, not_after, issued_at, status, kind, replaces, slot)
                VALUES (p_serial, p_device, p_subject, p_der, p_digest,
                    p_not_before, p_not_after, p_issued_at, p_status, p_kind, p_replaces, p_slot);
            INSERT INTO audit (at, peer, device_id, operation, outcome, code, detail, relay)
                VALUES (a_at, a_peer, a_device, a_operation, a_outcome, a_code, a_detail,
                    NULLIF(a_relay, ''));
            RETURN 'committed';
        EXCEPTION WHEN unique_violation OR deadlock_detected OR serialization_failure THEN
            attempt := attempt + 1;
            IF attempt >= 8 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION est_issue(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text
) RETURNS text LANGUAGE sql AS $fn$
    SELECT est_issue_slot(p_serial, p_device, p_subject, p_der, p_digest, p_not_before,
        p_not_after, p_issued_at, p_status, p_kind, p_replaces, '', a_at, a_peer, a_device,
        a_operation, a_outcome, a_code, a_detail, current_setting('est.relay', true));
$fn$;
"#;

/// The certificate profile a certificate was issued under ([`IssuedCert::profile`]), which its
/// re-enrollment keeps; "" = none recorded (every row from before this migration).
/// `est_issue_profile()` is `est_issue_slot()` with the profile recorded on the row it
/// inserted, in the same call (so in the batch's transaction); `est_issue_slot()`, which
/// nodes of the previous release call during a rolling upgrade, is unchanged and records "".
const MIGRATION_5: &str = r#"
ALTER TABLE certificates ADD COLUMN profile text NOT NULL DEFAULT '';

CREATE FUNCTION est_issue_profile(
    p_serial text, p_device text, p_subject text, p_der bytea, p_digest bytea,
    p_not_before bigint, p_not_after bigint, p_issued_at bigint, p_status text, p_kind text,
    p_replaces text, p_slot text,
    a_at bigint, a_peer text, a_device text, a_operation text, a_outcome text, a_code text,
    a_detail text, a_relay text, p_profile text
) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    outcome text;
BEGIN
    outcome := est_issue_slot(p_serial, p_device, p_subject, p_der, p_digest, p_not_before,
        p_not_after, p_issued_at, p_status, p_kind, p_replaces, p_slot, a_at, a_peer, a_device,
        a_operation, a_outcome, a_code, a_detail, a_relay);
    IF outcome = 'committed' THEN
        UPDATE certificates SET profile = p_profile WHERE serial = p_serial;
    END IF;
    RETURN outcome;
END
$fn$;
"#;

/// Serialises migrations of nodes that start together (an arbitrary constant).
const MIGRATION_LOCK_KEY: i64 = 0x4553_545f_5047; // "EST_PG"

/// The certificate columns, in the order [`cert_from_row`] reads them.
macro_rules! cert_columns {
    () => {
        "serial, device_id, subject, der, request_digest, not_before, not_after, issued_at, status, kind, replaces, slot, profile"
    };
}
const CERT_COLUMNS: &str = cert_columns!();

macro_rules! cert_select {
    ($where:literal) => {
        concat!("SELECT ", cert_columns!(), " FROM certificates ", $where)
    };
}
const SELECT_BY_REQUEST: &str = cert_select!("WHERE device_id = $1 AND request_digest = $2");
const SELECT_BY_SERIAL: &str = cert_select!("WHERE serial = $1");
const SELECT_DEVICE: &str = "SELECT 1 FROM devices WHERE device_id = $1";
/// One issuance (migration 5's function: the certificate's slot and profile, and the relay in
/// the audit row).
const ISSUE: &str =
    "SELECT est_issue_profile($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)";
const INSERT_AUDIT: &str = "INSERT INTO audit (at, peer, device_id, operation, outcome, code, detail, relay) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

// Revocation (migration 2).
const SELECT_BLOCKED: &str = "SELECT 1 FROM blocked_devices WHERE device_id = $1";
const ISSUED_SINCE: &str =
    "SELECT count(*), min(issued_at) FROM certificates WHERE device_id = $1 AND issued_at >= $2";
/// The device's advisory lock, the one `est_issue` takes.
const LOCK_DEVICE: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
const SELECT_FOR_REVOKE: &str = cert_select!("WHERE serial = $1 FOR UPDATE");
const REVOKE_CERT: &str = "UPDATE certificates SET status = 'revoked', revoked_at = $2, revocation_reason = $3 WHERE serial = $1 AND status <> 'revoked'";
const REVOKE_ACTIVE_OF_DEVICE: &str = "UPDATE certificates SET status = 'revoked', revoked_at = $2, revocation_reason = $3 WHERE device_id = $1 AND status = 'active' RETURNING serial";
const BLOCK_DEVICE: &str = "INSERT INTO blocked_devices (device_id, blocked_at, reason) VALUES ($1, $2, $3) ON CONFLICT (device_id) DO NOTHING";
const BUMP_GENERATION: &str =
    "UPDATE revocation_state SET generation = generation + 1 WHERE id = 1";
const SELECT_REVOKED: &str = "SELECT serial, revoked_at, revocation_reason FROM certificates WHERE status = 'revoked' ORDER BY revoked_at, serial";
const SELECT_GENERATION: &str = "SELECT generation FROM revocation_state WHERE id = 1";
const NEXT_CRL_NUMBER: &str =
    "UPDATE revocation_state SET crl_number = crl_number + 1 WHERE id = 1 RETURNING crl_number";
const INSERT_CRL: &str = "INSERT INTO crls (number, this_update, next_update, generation, der) SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM crls WHERE number >= $1)";
const SELECT_LATEST_CRL: &str = "SELECT number, this_update, next_update, generation, der FROM crls ORDER BY number DESC LIMIT 1";

/// What [`PgStore::open`] needs (from `[storage]`).
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// URL or libpq key=value connection string.
    pub url: String,
    /// Connections in the pool; half of them (at least one) write.
    pub pool_size: usize,
    /// Most commits in one transaction.
    pub max_batch: usize,
    /// Bound on a read or a batch, connecting included.
    pub timeout: Duration,
    /// The CA of the server's certificate (PEM or DER), for `sslmode=verify-ca|verify-full`
    /// (and a checked `require`); see [`super::pg_tls`].
    pub ca_file: Option<PathBuf>,
}

impl PgSettings {
    pub fn from_config(s: &StorageSection) -> Self {
        Self {
            url: s.url.clone(),
            pool_size: s.pool_size.max(1),
            max_batch: s.max_batch.max(1),
            timeout: Duration::from_millis(s.timeout_ms.max(1)),
            ca_file: (!s.ca_file.as_os_str().is_empty()).then(|| s.ca_file.clone()),
        }
    }

    /// The defaults of `[storage]` with this connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::from_config(&StorageSection::default())
        }
    }
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PgStore {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    queue: Mutex<Option<mpsc::UnboundedSender<WriteOp>>>,
    /// Closed (every sender dropped) when the last writer task has ended.
    writers_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    counters: Arc<WriterCounters>,
    timeout: Duration,
    /// `user@host:port/dbname`, never the password.
    target: String,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A tokio-postgres error as the store reports it: the server's message and SQLSTATE when
/// there is one (tokio-postgres's Display says only "db error"), else the error and its
/// causes.
fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => with_causes(e),
    }
}

/// `e` and every error under it (`source()`), e.g. "error performing TLS handshake: invalid
/// peer certificate: UnknownIssuer": the Display of tokio-postgres and deadpool errors leaves
/// the cause out.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

/// A connection the pool could not give, with the reason (a refused TLS certificate, an
/// unreachable host).
fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    backend(with_causes(&e))
}

/// [`pg_text`] as a [`StoreError::Backend`].
fn db(e: tokio_postgres::Error) -> StoreError {
    backend(pg_text(&e))
}

async fn insert_audit(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AuditEvent,
) -> Result<(), StoreError> {
    tx.execute(
        INSERT_AUDIT,
        &[
            &a.at_unix,
            &a.peer,
            &a.device_id,
            &a.operation,
            &a.outcome,
            &a.code,
            &a.detail,
            &a.relay,
        ],
    )
    .await
    .map_err(db)?;
    Ok(())
}

fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        cfg.get_user().unwrap_or("?"),
        cfg.get_dbname().unwrap_or("?")
    )
}

/// Waits for `rx` on the calling thread; on a worker of a multi-threaded tokio runtime the
/// runtime is told first (block_in_place), so its other tasks move to another thread.
fn wait_here<T>(rx: std::sync::mpsc::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
    let wait = move || {
        rx.recv()
            .unwrap_or_else(|_| Err(backend("the PostgreSQL store is closed")))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl PgStore {
    /// Connects, applies the pending migrations and starts the writers. Fails if the
    /// database cannot be reached within the timeout (a node does not start blind).
    pub fn open(settings: &PgSettings) -> Result<Self, StoreError> {
        let (mut pg, ssl_mode) =
            pg_tls::parse_url(&settings.url).map_err(|e| backend(format!("storage.url: {e}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(settings.timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("est-server");
        }
        let target = describe(&pg);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("est-pg")
            .enable_all()
            .build()
            .map_err(backend)?;
        let handle = runtime.handle().clone();
        let tls = pg_tls::connector(ssl_mode, settings.ca_file.as_deref())
            .map_err(|e| backend(format!("PostgreSQL at {target}: TLS: {e}")))?;
        if ssl_mode == pg_tls::SslMode::Require && settings.ca_file.is_none() {
            tracing::warn!(target_db = %target, "sslmode=require without storage.ca_file: the connection to PostgreSQL is encrypted but the server is not authenticated; use sslmode=verify-full with storage.ca_file");
        }
        let manager_config = ManagerConfig {
            // A connection that died with the server is noticed (is_closed) and replaced.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_config(pg, tls, manager_config),
            None => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(backend)?;
        let counters = Arc::new(WriterCounters::default());
        let (tx, rx) = mpsc::unbounded_channel::<WriteOp>();
        let store = Self {
            runtime: Mutex::new(Some(runtime)),
            handle,
            pool,
            queue: Mutex::new(Some(tx)),
            writers_done: Mutex::new(None),
            counters,
            timeout: settings.timeout,
            target,
        };
        let applied = store
            .run("migrating the schema", |pool| async move {
                let mut client = pool.get().await.map_err(pool_error)?;
                migrate(&mut client).await
            })
            .map_err(|e| {
                backend(format!(
                    "PostgreSQL at {} (sslmode={}): {e}",
                    store.target,
                    ssl_mode.as_str()
                ))
            })?;
        if !applied.is_empty() {
            tracing::info!(target_db = %store.target, migrations = ?applied, "PostgreSQL schema migrated");
        }
        let writers = (settings.pool_size / 2).max(1);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..writers {
            let rx = rx.clone();
            let pool = store.pool.clone();
            let counters = store.counters.clone();
            let done_tx = done_tx.clone();
            let (max_batch, timeout) = (settings.max_batch, settings.timeout);
            store.handle.spawn(async move {
                writer_loop(rx, pool, max_batch, timeout, &counters).await;
                drop(done_tx);
            });
        }
        drop(done_tx);
        if let Ok(mut w) = store.writers_done.lock() {
            *w = Some(done_rx);
        }
        tracing::info!(target_db = %store.target, pool_size = settings.pool_size, writers, max_batch = settings.max_batch, "PostgreSQL store open");
        Ok(store)
    }

    /// `user@host:port/dbname` of the database (no password), for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `f` on the store's runtime with a pooled connection's pool, bounded by the
    /// timeout, and waits for it here.
    fn run<T, F>(&self, what: &'static str, f: impl FnOnce(Pool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.pool.clone());
        let timeout = self.timeout;
        // A closed store's runtime drops the task, and with it `tx`: the wait ends with an
        // error.
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(backend(format!(
                    "{what}: no answer from PostgreSQL within {} ms",
                    timeout.as_millis()
                ))),
            };
            let _ = tx.send(r);
        });
        wait_here(rx)
    }

    /// One certificate by a query with these parameters.
    fn read_cert(
        &self,
        sql: &'static str,
        device_or_serial: String,
        digest: Option<[u8; 32]>,
    ) -> Result<Option<IssuedCert>, StoreError> {
        self.run("reading a certificate", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(sql)
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            let row = match &digest {
                Some(d) => {
                    client
                        .query_opt(&st, &[&device_or_serial, &d.as_slice()])
                        .await
                }
                None => client.query_opt(&st, &[&device_or_serial]).await,
            }
            .map_err(|e| backend(pg_text(&e)))?;
            row.map(|r| cert_from_row(&r)).transpose()
        })
    }

    fn read_certs(
        &self,
        sql: String,
        param: Box<dyn ToSql + Send + Sync>,
    ) -> Result<Vec<IssuedCert>, StoreError> {
        self.run("listing certificates", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(&sql, &[param.as_ref() as &(dyn ToSql + Sync)])
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            rows.iter().map(cert_from_row).collect()
        })
    }

    /// Drops every table, function and migration record of the store (tests, between
    /// cases sharing a database).
    pub fn drop_schema(&self) -> Result<(), StoreError> {
        self.run("dropping the schema", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .batch_execute(
                    "DROP TABLE IF EXISTS certificates, audit, devices, blocked_devices,
                         revocation_state, crls, schema_migrations CASCADE;
                     DROP FUNCTION IF EXISTS est_issue, est_issue_relayed, est_issue_slot, est_issue_profile CASCADE;",
                )
                .await
                .map_err(|e| backend(pg_text(&e)))
        })
    }

    /// The schema versions recorded in `schema_migrations`, ascending.
    pub fn schema_versions(&self) -> Result<Vec<i32>, StoreError> {
        self.run("reading schema_migrations", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT version FROM schema_migrations ORDER BY version",
                    &[],
                )
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
        })
    }
}

/// Applies the migrations the database lacks, in one transaction under an advisory lock;
/// returns the versions applied.
async fn migrate(client: &mut deadpool_postgres::Object) -> Result<Vec<i32>, StoreError> {
    let db = |e: tokio_postgres::Error| backend(pg_text(&e));
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     integer PRIMARY KEY,
             name        text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db)?;
    let present: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if present.contains(&m.version) {
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            backend(format!(
                "migration {} ({}): {}",
                m.version,
                m.name,
                pg_text(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(db)?;
        applied.push(m.version);
    }
    let ours = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(newer) = present.iter().copied().filter(|v| *v > ours).max() {
        tracing::warn!(
            database_version = newer,
            this_node = ours,
            "the database schema is newer than this est-server; upgrade this node"
        );
    }
    tx.commit().await.map_err(db)?;
    Ok(applied)
}

fn cert_from_row(r: &Row) -> Result<IssuedCert, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(e.to_string());
    let serial: String = r.try_get(0).map_err(get)?;
    let digest: Vec<u8> = r.try_get(4).map_err(get)?;
    let request_digest: [u8; 32] = digest
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("request digest of {serial}")))?;
    let status: String = r.try_get(8).map_err(get)?;
    let status = CertStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("status {status:?} of {serial}")))?;
    let kind: String = r.try_get(9).map_err(get)?;
    let kind = match kind.as_str() {
        "enroll" => IssuanceKind::Enroll,
        "reenroll" => IssuanceKind::Reenroll,
        "serverkeygen" => IssuanceKind::ServerKeygen,
        other => return Err(StoreError::Corrupt(format!("kind {other:?} of {serial}"))),
    };
    Ok(IssuedCert {
        device_id: r.try_get(1).map_err(get)?,
        subject: r.try_get(2).map_err(get)?,
        der: r.try_get(3).map_err(get)?,
        request_digest,
        not_before_unix: r.try_get(5).map_err(get)?,
        not_after_unix: r.try_get(6).map_err(get)?,
        issued_at_unix: r.try_get(7).map_err(get)?,
        status,
        kind,
        replaces_serial_hex: r.try_get(10).map_err(get)?,
        slot: r.try_get(11).map_err(get)?,
        profile: r.try_get(12).map_err(get)?,
        serial_hex: serial,
    })
}

/// Why a batch did not commit.
enum BatchError {
    /// No connection, a connection lost, a timeout: every commit of the batch fails (the
    /// core answers 5.03; the meters retry, and the request digest makes that idempotent).
    Unavailable(String),
    /// A statement failed on a live connection: the batch is retried one commit per
    /// transaction, so one bad commit does not fail the others.
    Statement(String),
}

fn batch_error(e: tokio_postgres::Error) -> BatchError {
    if e.as_db_error().is_some() && !e.is_closed() {
        BatchError::Statement(pg_text(&e))
    } else {
        BatchError::Unavailable(pg_text(&e))
    }
}

fn device_of(c: &Commit) -> &str {
    match c {
        Commit::Issuance { cert, .. } => &cert.device_id,
        Commit::Audit(a) => &a.device_id,
    }
}

/// What `est_issue` or an audit insert answered, before the replayed certificate is read.
enum Raw {
    Committed,
    Already(String),
    NotActive(String),
    Blocked,
}

async fn apply_one(
    tx: &deadpool_postgres::Transaction<'_>,
    issue: &tokio_postgres::Statement,
    audit_st: &tokio_postgres::Statement,
    commit: &Commit,
) -> Result<Raw, tokio_postgres::Error> {
    match commit {
        Commit::Issuance { cert, audit } => {
            let digest = cert.request_digest.as_slice();
            let params: [&(dyn ToSql + Sync); 21] = [
                &cert.serial_hex,
                &cert.device_id,
                &cert.subject,
                &cert.der,
                &digest,
                &cert.not_before_unix,
                &cert.not_after_unix,
                &cert.issued_at_unix,
                &cert.status.as_str(),
                &cert.kind.as_str(),
                &cert.replaces_serial_hex,
                &cert.slot,
                &audit.at_unix,
                &audit.peer,
                &audit.device_id,
                &audit.operation,
                &audit.outcome,
                &audit.code,
                &audit.detail,
                &audit.relay,
                &cert.profile,
            ];
            let row = tx.query_one(issue, &params).await?;
            let text: String = row.get(0);
            Ok(if let Some(serial) = text.strip_prefix("already:") {
                Raw::Already(serial.to_owned())
            } else if let Some(status) = text.strip_prefix("not-active:") {
                Raw::NotActive(status.to_owned())
            } else if text == "blocked" {
                Raw::Blocked
            } else {
                Raw::Committed
            })
        }
        Commit::Audit(a) => {
            tx.execute(
                audit_st,
                &[
                    &a.at_unix,
                    &a.peer,
                    &a.device_id,
                    &a.operation,
                    &a.outcome,
                    &a.code,
                    &a.detail,
                    &a.relay,
                ],
            )
            .await?;
            Ok(Raw::Committed)
        }
    }
}

/// Commits `commits` in one transaction, their statements pipelined on one connection, and
/// returns each one's outcome in order.
async fn apply_batch(pool: &Pool, commits: &[&Commit]) -> Result<Vec<CommitResult>, BatchError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| BatchError::Unavailable(with_causes(&e)))?;
    let tx = client.transaction().await.map_err(batch_error)?;
    let issue = tx.prepare_cached(ISSUE).await.map_err(batch_error)?;
    let audit_st = tx.prepare_cached(INSERT_AUDIT).await.map_err(batch_error)?;
    // Row locks in device order: two nodes' batches cannot wait on each other in a cycle.
    let mut order: Vec<(usize, &Commit)> = commits.iter().copied().enumerate().collect();
    order.sort_by(|(_, a), (_, b)| device_of(a).cmp(device_of(b)));
    let raws = futures_util::future::try_join_all(
        order
            .iter()
            .map(|&(_, c)| apply_one(&tx, &issue, &audit_st, c)),
    )
    .await
    .map_err(batch_error)?;
    // The outcome of a COMMIT that fails is unknown: reported as unavailable, so that the
    // meter retries and finds what was (or was not) committed by its request digest.
    tx.commit()
        .await
        .map_err(|e| BatchError::Unavailable(pg_text(&e)))?;
    let mut out: Vec<Option<CommitResult>> = (0..commits.len()).map(|_| None).collect();
    for (raw, &(i, _)) in raws.into_iter().zip(&order) {
        let result = match raw {
            Raw::Committed => Ok(CommitOutcome::Committed),
            Raw::Blocked => issuance_refusal(true, None)
                .map(CommitOutcome::Refused)
                .ok_or_else(|| backend("a blocked device was not refused")),
            Raw::NotActive(status) => match CertStatus::parse(&status) {
                // Revoked meanwhile: refused as the SQLite store refuses it.
                Some(s) => Ok(issuance_refusal(false, Some(s))
                    .map_or(CommitOutcome::ReplacedNotActive(s), CommitOutcome::Refused)),
                None => Err(StoreError::Corrupt(format!("status {status:?}"))),
            },
            Raw::Already(serial) => {
                // Committed by another transaction before ours read it: readable now.
                match client.query_opt(SELECT_BY_SERIAL, &[&serial]).await {
                    Ok(Some(row)) => cert_from_row(&row).map(CommitOutcome::AlreadyIssued),
                    Ok(None) => Err(StoreError::Corrupt(format!(
                        "certificate {serial} vanished"
                    ))),
                    Err(e) => Err(backend(pg_text(&e))),
                }
            }
        };
        // `order` is a permutation of `0..commits.len()`: every slot is filled once.
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(result);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(backend("commit lost in its batch"))))
        .collect())
}

async fn writer_loop(
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<WriteOp>>>,
    pool: Pool,
    max_batch: usize,
    timeout: Duration,
    counters: &WriterCounters,
) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(max_batch);
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut batch, max_batch).await == 0 {
                return;
            }
        }
        let commits: Vec<&Commit> = batch.iter().map(|op| &op.commit).collect();
        let results = match tokio::time::timeout(timeout, apply_batch(&pool, &commits)).await {
            Ok(Ok(results)) => {
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                counters
                    .operations
                    .fetch_add(commits.len() as u64, Ordering::Relaxed);
                results
            }
            Ok(Err(BatchError::Statement(e))) if commits.len() > 1 => {
                tracing::warn!(error = %e, ops = commits.len(), "PostgreSQL batch failed; committing its operations one by one");
                let mut results = Vec::with_capacity(commits.len());
                for c in &commits {
                    let r = match tokio::time::timeout(timeout, apply_batch(&pool, &[c])).await {
                        Ok(Ok(mut r)) => {
                            counters.transactions.fetch_add(1, Ordering::Relaxed);
                            counters.operations.fetch_add(1, Ordering::Relaxed);
                            r.pop()
                                .unwrap_or_else(|| Err(backend("commit lost in its batch")))
                        }
                        Ok(Err(BatchError::Statement(e) | BatchError::Unavailable(e))) => {
                            Err(backend(e))
                        }
                        Err(_) => Err(backend("PostgreSQL commit timed out")),
                    };
                    results.push(r);
                }
                results
            }
            Ok(Err(BatchError::Statement(e) | BatchError::Unavailable(e))) => {
                tracing::error!(error = %e, ops = commits.len(), "PostgreSQL commit failed");
                commits.iter().map(|_| Err(backend(&e))).collect()
            }
            Err(_) => {
                tracing::error!(
                    ops = commits.len(),
                    timeout_ms = timeout.as_millis() as u64,
                    "PostgreSQL commit timed out"
                );
                commits
                    .iter()
                    .map(|_| {
                        Err(backend(format!(
                            "PostgreSQL commit: no answer within {} ms",
                            timeout.as_millis()
                        )))
                    })
                    .collect()
            }
        };
        drop(commits);
        for (op, r) in batch.drain(..).zip(results) {
            (op.done)(r);
        }
    }
}

impl Store for PgStore {
    fn find_by_request(
        &self,
        device_id: &str,
        request_digest: &[u8; 32],
    ) -> Result<Option<IssuedCert>, StoreError> {
        self.read_cert(
            SELECT_BY_REQUEST,
            device_id.to_owned(),
            Some(*request_digest),
        )
    }

    fn find_by_serial(&self, serial_hex: &str) -> Result<Option<IssuedCert>, StoreError> {
        self.read_cert(SELECT_BY_SERIAL, serial_hex.to_owned(), None)
    }

    fn device_allowed(&self, device_id: &str) -> Result<bool, StoreError> {
        let device = device_id.to_owned();
        self.run("reading the allowlist", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(SELECT_DEVICE)
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            let row = client
                .query_opt(&st, &[&device])
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            Ok(row.is_some())
        })
    }

    fn device_blocked(&self, device_id: &str) -> Result<bool, StoreError> {
        let device = device_id.to_owned();
        self.run("reading the blocklist", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client.prepare_cached(SELECT_BLOCKED).await.map_err(db)?;
            Ok(client
                .query_opt(&st, &[&device])
                .await
                .map_err(db)?
                .is_some())
        })
    }

    fn issued_since(&self, device_id: &str, since_unix: i64) -> Result<IssuanceWindow, StoreError> {
        let device = device_id.to_owned();
        self.run("counting a device's certificates", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client.prepare_cached(ISSUED_SINCE).await.map_err(db)?;
            let row = client
                .query_one(&st, &[&device, &since_unix])
                .await
                .map_err(db)?;
            Ok(IssuanceWindow {
                count: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                oldest_unix: row.get(1),
            })
        })
    }

    fn revoke(&self, r: &Revocation) -> Result<RevokeOutcome, StoreError> {
        let r = r.clone();
        self.run("revoking a certificate", move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(db)?;
            // The row lock: a revocation of the same serial on another node waits, then
            // finds it revoked; an issuance renewing it waits too (or is waited for).
            let Some(row) = tx
                .query_opt(SELECT_FOR_REVOKE, &[&r.serial_hex])
                .await
                .map_err(db)?
            else {
                return Ok(RevokeOutcome::NotFound);
            };
            let before = cert_from_row(&row)?;
            if before.status == CertStatus::Revoked {
                return Ok(RevokeOutcome::AlreadyRevoked(before));
            }
            let reason = i16::from(r.reason.code());
            tx.execute(REVOKE_CERT, &[&r.serial_hex, &r.revoked_at_unix, &reason])
                .await
                .map_err(db)?;
            tx.execute(BUMP_GENERATION, &[]).await.map_err(db)?;
            insert_audit(&tx, &r.audit).await?;
            tx.commit().await.map_err(db)?;
            Ok(RevokeOutcome::Revoked(before))
        })
    }

    fn block_device(&self, b: &DeviceBlock) -> Result<BlockOutcome, StoreError> {
        let b = b.clone();
        self.run("blocking a device", move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(db)?;
            // Taken by est_issue too: an issuance for the device on any node commits
            // before (and is revoked below) or after (and sees the block).
            tx.execute(LOCK_DEVICE, &[&b.device_id]).await.map_err(db)?;
            let reason = i16::from(b.reason.code());
            let newly_blocked = tx
                .execute(BLOCK_DEVICE, &[&b.device_id, &b.at_unix, &reason])
                .await
                .map_err(db)?
                > 0;
            let revoked_serials = if b.keep_certs {
                Vec::new()
            } else {
                tx.query(
                    REVOKE_ACTIVE_OF_DEVICE,
                    &[&b.device_id, &b.at_unix, &reason],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
            };
            tx.execute(BUMP_GENERATION, &[]).await.map_err(db)?;
            insert_audit(&tx, &b.audit).await?;
            tx.commit().await.map_err(db)?;
            Ok(BlockOutcome {
                newly_blocked,
                revoked_serials,
            })
        })
    }

    fn revoked_certificates(&self) -> Result<Vec<RevokedEntry>, StoreError> {
        self.run("reading the revoked certificates", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client.query(SELECT_REVOKED, &[]).await.map_err(db)?;
            rows.iter()
                .map(|r| {
                    let reason: Option<i16> = r.get(2);
                    revoked_entry(r.get(0), r.get(1), reason.map(i64::from))
                })
                .collect()
        })
    }

    fn blocked_devices(&self) -> Result<Vec<String>, StoreError> {
        self.run("reading the blocklist", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT device_id FROM blocked_devices ORDER BY device_id",
                    &[],
                )
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn revocation_generation(&self) -> Result<u64, StoreError> {
        self.run("reading the revocation generation", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client.prepare_cached(SELECT_GENERATION).await.map_err(db)?;
            let row = client.query_one(&st, &[]).await.map_err(db)?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    fn next_crl_number(&self) -> Result<u64, StoreError> {
        // One UPDATE in its own transaction: the row lock orders the nodes, and the number
        // is durable (COMMIT) before it is handed out.
        self.run("allocating a cRLNumber", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client.query_one(NEXT_CRL_NUMBER, &[]).await.map_err(db)?;
            u64::try_from(row.get::<_, i64>(0)).map_err(|_| StoreError::Corrupt("cRLNumber".into()))
        })
    }

    fn save_crl(&self, crl: &CrlRecord) -> Result<bool, StoreError> {
        let number = i64::try_from(crl.number).map_err(backend)?;
        let generation = i64::try_from(crl.generation).map_err(backend)?;
        let crl = crl.clone();
        self.run("saving a CRL", move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(db)?;
            // Two nodes saving at once: the second waits and compares with the first's.
            tx.batch_execute("LOCK TABLE crls IN EXCLUSIVE MODE")
                .await
                .map_err(db)?;
            let kept = tx
                .execute(
                    INSERT_CRL,
                    &[
                        &number,
                        &crl.this_update_unix,
                        &crl.next_update_unix,
                        &generation,
                        &crl.der,
                    ],
                )
                .await
                .map_err(db)?
                > 0;
            tx.commit().await.map_err(db)?;
            Ok(kept)
        })
    }

    fn latest_crl(&self) -> Result<Option<CrlRecord>, StoreError> {
        self.run("reading the latest CRL", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client.query_opt(SELECT_LATEST_CRL, &[]).await.map_err(db)?;
            Ok(row.map(|r| CrlRecord {
                number: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                this_update_unix: r.get(1),
                next_update_unix: r.get(2),
                generation: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                der: r.get(4),
            }))
        })
    }

    fn submit_commit(&self, commit: Commit, done: CommitDone) {
        let op = WriteOp { commit, done };
        let refused = match self.queue.lock() {
            Ok(q) => match q.as_ref() {
                Some(tx) => tx
                    .send(op)
                    .err()
                    .map(|e| (e.0, "the store's writers have stopped")),
                None => Some((op, "store is closed")),
            },
            Err(_) => Some((op, "store queue mutex poisoned")),
        };
        if let Some((op, why)) = refused {
            (op.done)(Err(backend(why)));
        }
    }
}

impl ServerStore for PgStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    fn list_certificates(&self, limit: usize) -> Result<Vec<IssuedCert>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_certs(
            format!("SELECT {CERT_COLUMNS} FROM certificates ORDER BY issued_at DESC, seq DESC LIMIT $1"),
            Box::new(limit),
        )
    }

    fn find_by_serial_prefix(&self, prefix: &str) -> Result<Vec<IssuedCert>, StoreError> {
        let pattern = format!(
            "{}%",
            prefix.to_ascii_lowercase().replace(['%', '_', '\\'], "")
        );
        self.read_certs(
            format!("SELECT {CERT_COLUMNS} FROM certificates WHERE serial LIKE $1 ORDER BY serial LIMIT 10"),
            Box::new(pattern),
        )
    }

    fn count_certificates(&self) -> Result<u64, StoreError> {
        self.run("counting certificates", |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one("SELECT count(*) FROM certificates", &[])
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("reading the audit trail", move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT at, peer, device_id, operation, outcome, code, detail, relay FROM audit ORDER BY id DESC LIMIT $1",
                    &[&limit],
                )
                .await
                .map_err(|e| backend(pg_text(&e)))?;
            Ok(rows
                .iter()
                .map(|r| AuditEvent {
                    at_unix: r.get(0),
                    peer: r.get(1),
                    device_id: r.get(2),
                    operation: r.get(3),
                    outcome: r.get(4),
                    code: r.get(5),
                    detail: r.get(6),
                    relay: r.get(7),
                })
                .collect())
        })
    }

    fn import_devices(&self, ids: &[String], now_unix: i64) -> Result<usize, StoreError> {
        let ids = ids.to_vec();
        self.run("importing devices", move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let db = |e: tokio_postgres::Error| backend(pg_text(&e));
            let tx = client.transaction().await.map_err(db)?;
            let st = tx
                .prepare("INSERT INTO devices (device_id, imported_at) VALUES ($1, $2) ON CONFLICT (device_id) DO NOTHING")
                .await
                .map_err(db)?;
            let mut added = 0u64;
            for id in &ids {
                added += tx.execute(&st, &[id, &now_unix]).await.map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(usize::try_from(added).unwrap_or(usize::MAX))
        })
    }

    fn writer_stats(&self) -> WriterStats {
        self.counters.snapshot()
    }

    fn close(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        // The writers drain what is queued, then end.
        if let Some(done) = self.writers_done.lock().ok().and_then(|mut d| d.take()) {
            let _ = done.recv_timeout(self.timeout.saturating_mul(4));
        }
        if let Some(rt) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            self.pool.close();
            // Not a blocking drop: close() may run inside the daemon's runtime.
            rt.shutdown_background();
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}
