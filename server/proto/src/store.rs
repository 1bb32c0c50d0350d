//! The durable record of what the CA issued, and the audit trail.
//!
//! The core never waits for storage to become durable. It reads through the [`Store`] trait
//! (lookups by request digest and serial, the device allowlist) and asks for every durable write
//! with a [`Commit`], which its driver hands to [`Store::submit_commit`] and completes later
//! (`crate::session::EstSession::complete_commit`): the quinn-proto shape, where the core asks
//! and the driver does the I/O. The daemon implements the trait with SQLite (WAL,
//! `synchronous=FULL`, a writer thread that groups queued commits into one transaction); tests
//! and simulations use [`MemoryStore`]. The rules every implementation keeps: the outcome of a
//! commit is reported only once the data is durable, because the meter receives the
//! certificate right after (the "nothing lost" rule); an issuance is atomic with the
//! supersession of the device's previous certificate and its audit row; and a second issuance
//! for the same device and request digest is not stored but answered
//! [`CommitOutcome::AlreadyIssued`] with the first.

use std::sync::Mutex;
use std::time::SystemTime;

/// Lifecycle of an issued certificate in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    /// The device's current operational certificate.
    Active,
    /// Replaced by a later enrollment or re-enrollment of the same device.
    Superseded,
    /// Revoked by an operator.
    Revoked,
}

impl CertStatus {
    /// Stable text form used in storage and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "active",
            CertStatus::Superseded => "superseded",
            CertStatus::Revoked => "revoked",
        }
    }

    /// Inverse of [`CertStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(CertStatus::Active),
            "superseded" => Some(CertStatus::Superseded),
            "revoked" => Some(CertStatus::Revoked),
            _ => None,
        }
    }
}

/// How a certificate came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuanceKind {
    /// `/sen`: first enrollment, authenticated by a manufacturer IDevID.
    Enroll,
    /// `/sren`: re-enrollment, authenticated by a current LDevID.
    Reenroll,
    /// `/skg` or `/skc`: server-side key generation.
    ServerKeygen,
}

impl IssuanceKind {
    /// Stable text form used in storage and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuanceKind::Enroll => "enroll",
            IssuanceKind::Reenroll => "reenroll",
            IssuanceKind::ServerKeygen => "serverkeygen",
        }
    }
}

/// One issued certificate as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// Certificate serial number, lower-case hex without leading sign byte handling
    /// (exactly the DER INTEGER content bytes).
    pub serial_hex: String,
    /// The device identity the certificate was issued to (IDevID serialNumber).
    pub device_id: String,
    /// Subject DN in RFC 4514 text form, for display.
    pub subject: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// SHA-256 of the request (PKCS#10 DER, or the C509 request bytes) that produced it.
    pub request_digest: [u8; 32],
    /// Validity as seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// Validity as seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// When it was committed, seconds since the Unix epoch.
    pub issued_at_unix: i64,
    pub status: CertStatus,
    pub kind: IssuanceKind,
    /// For a re-enrollment: the serial of the certificate it replaces.
    pub replaces_serial_hex: Option<String>,
}

/// One audit record: every enrollment attempt, success or refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub at_unix: i64,
    /// Peer transport address, e.g. `127.0.0.1:40001`.
    pub peer: String,
    /// Device identity if it could be established (serialNumber), else empty.
    pub device_id: String,
    /// EST operation, e.g. `sen`, `sren`, `skg`.
    pub operation: String,
    /// `issued`, `replayed` (a retried request answered with the certificate already
    /// issued), or `refused`.
    pub outcome: String,
    /// CoAP response code sent, e.g. `2.04`, `4.03`.
    pub code: String,
    /// Short human-readable reason or the issued serial.
    pub detail: String,
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A durable write the core asks for (`crate::session::Event::Commit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// A newly issued certificate and its `issued` audit row, in one transaction that also
    /// marks every other active certificate of the device superseded. If the device already
    /// has a certificate for the same request digest (two retries raced), nothing is written
    /// and the outcome is [`CommitOutcome::AlreadyIssued`] with that certificate. If the
    /// certificate a re-enrollment replaces (`replaces_serial_hex`) is no longer active when
    /// the commit runs (another re-enrollment of the device, on this node or another,
    /// committed first), nothing is written and the outcome is
    /// [`CommitOutcome::ReplacedNotActive`].
    Issuance {
        cert: Box<IssuedCert>,
        audit: AuditEvent,
    },
    /// An audit row on its own (a refusal, a replayed answer).
    Audit(AuditEvent),
}

/// Result of a [`Commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The write is durable.
    Committed,
    /// Another request from the same device with the same request digest committed first
    /// (two retries raced); answer with this one instead.
    AlreadyIssued(IssuedCert),
    /// A re-enrollment lost a race: the certificate it replaces had this status (no longer
    /// active) when the commit ran, and the device's certificate for this request was not
    /// the one that superseded it. Nothing was written; the request is refused as it would
    /// have been had the winner committed before it was read.
    ReplacedNotActive(CertStatus),
}

/// What a commit came to: its outcome once durable, or why the store could not make it so
/// (the core answers that 5.03 + Max-Age: the store is unavailable, try again later).
pub type CommitResult = Result<CommitOutcome, StoreError>;

/// Called exactly once with the result of a submitted [`Commit`], from whatever thread the
/// store completes it on (possibly before [`Store::submit_commit`] returns).
pub type CommitDone = Box<dyn FnOnce(CommitResult) + Send + 'static>;

/// Storage used by the EST core. Implementations must be safe to call from several threads at
/// once. The reads are synchronous (local, no fsync); the write is submitted and completed
/// later, so that no caller waits for durability on a thread of its own.
pub trait Store: Send + Sync {
    /// The certificate already issued to `device_id` for an identical request, if any.
    fn find_by_request(
        &self,
        device_id: &str,
        request_digest: &[u8; 32],
    ) -> Result<Option<IssuedCert>, StoreError>;

    /// Look a certificate up by serial (lower-case hex).
    fn find_by_serial(&self, serial_hex: &str) -> Result<Option<IssuedCert>, StoreError>;

    /// Whether `device_id` is on the device allowlist.
    fn device_allowed(&self, device_id: &str) -> Result<bool, StoreError>;

    /// Queue `commit` and return at once; `done` is called exactly once with the result, only
    /// after the write is on stable storage (or has failed). A store that cannot accept the
    /// commit (closed, its writer gone) calls `done` with the error.
    fn submit_commit(&self, commit: Commit, done: CommitDone);
}

/// Submits `commit` and blocks the calling thread until its result (operator commands and
/// tests; never on a thread the store needs to complete it).
pub fn commit_and_wait(store: &dyn Store, commit: Commit) -> CommitResult {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    store.submit_commit(
        commit,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.recv().unwrap_or_else(|_| {
        Err(StoreError::Backend(
            "the store dropped a commit without a result".into(),
        ))
    })
}

/// Seconds since the Unix epoch (negative before 1970).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A Unix time (as stored: seconds, [`unix_seconds`]) as a UTC calendar date and time of day,
/// proleptic Gregorian, for display by the operator CLI and the load-test reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UtcDateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl UtcDateTime {
    /// Any `i64` (before 1970 too): days from the civil calendar (H. Hinnant's
    /// civil_from_days), seconds of the day from the remainder.
    pub fn from_unix_seconds(unix: i64) -> Self {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        // Each value is in range by construction (month 1..=12, day 1..=31, secs < 86,400).
        let narrow = |v: i64| u8::try_from(v).unwrap_or(u8::MAX);
        UtcDateTime {
            year: y,
            month: narrow(m),
            day: narrow(d),
            hour: narrow(secs / 3600),
            minute: narrow(secs / 60 % 60),
            second: narrow(secs % 60),
        }
    }

    /// `2026-11-25 14:00:00`.
    pub fn date_time(&self) -> String {
        let Self {
            year: y,
            month: m,
            day: d,
            hour: hh,
            minute: mm,
            second: ss,
        } = self;
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
    }

    /// RFC 3339: `2026-11-25T14:00:00Z`.
    pub fn rfc3339(&self) -> String {
        let Self {
            year: y,
            month: m,
            day: d,
            hour: hh,
            minute: mm,
            second: ss,
        } = self;
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }

    /// For file names: `20261125-140000`.
    pub fn compact(&self) -> String {
        let Self {
            year: y,
            month: m,
            day: d,
            hour: hh,
            minute: mm,
            second: ss,
        } = self;
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
    }
}

#[derive(Default)]
struct MemoryInner {
    certs: Vec<IssuedCert>,
    audit: Vec<AuditEvent>,
    allowlist: Vec<String>,
}

/// An in-memory [`Store`] for tests and simulations. Not durable.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add device serials to the allowlist.
    pub fn allow_devices<I: IntoIterator<Item = String>>(&self, ids: I) {
        if let Ok(mut g) = self.inner.lock() {
            g.allowlist.extend(ids);
        }
    }

    /// Every certificate committed so far, oldest first.
    pub fn certificates(&self) -> Vec<IssuedCert> {
        self.inner
            .lock()
            .map(|g| g.certs.clone())
            .unwrap_or_default()
    }

    /// Every audit event so far, oldest first.
    pub fn audit_events(&self) -> Vec<AuditEvent> {
        self.inner
            .lock()
            .map(|g| g.audit.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryInner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend("memory store mutex poisoned".into()))
    }
}

impl MemoryStore {
    /// Applies `commit` at once (what [`Store::submit_commit`] does before calling back): a
    /// simulation that models commit latency or outages calls this when its virtual store
    /// "finishes".
    pub fn commit(&self, commit: &Commit) -> CommitResult {
        let mut g = self.lock()?;
        match commit {
            Commit::Issuance { cert, audit } => {
                if let Some(existing) = g.certs.iter().find(|c| {
                    c.device_id == cert.device_id && c.request_digest == cert.request_digest
                }) {
                    return Ok(CommitOutcome::AlreadyIssued(existing.clone()));
                }
                if let Some(replaced) = &cert.replaces_serial_hex {
                    if let Some(r) = g.certs.iter().find(|c| &c.serial_hex == replaced) {
                        if r.status != CertStatus::Active {
                            return Ok(CommitOutcome::ReplacedNotActive(r.status));
                        }
                    }
                }
                for c in g.certs.iter_mut() {
                    if c.device_id == cert.device_id && c.status == CertStatus::Active {
                        c.status = CertStatus::Superseded;
                    }
                }
                g.certs.push(IssuedCert::clone(cert));
                g.audit.push(audit.clone());
            }
            Commit::Audit(audit) => g.audit.push(audit.clone()),
        }
        Ok(CommitOutcome::Committed)
    }
}

impl Store for MemoryStore {
    fn find_by_request(
        &self,
        device_id: &str,
        request_digest: &[u8; 32],
    ) -> Result<Option<IssuedCert>, StoreError> {
        let g = self.lock()?;
        Ok(g.certs
            .iter()
            .find(|c| c.device_id == device_id && &c.request_digest == request_digest)
            .cloned())
    }

    fn find_by_serial(&self, serial_hex: &str) -> Result<Option<IssuedCert>, StoreError> {
        let g = self.lock()?;
        Ok(g.certs.iter().find(|c| c.serial_hex == serial_hex).cloned())
    }

    fn device_allowed(&self, device_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.allowlist.iter().any(|d| d == device_id))
    }

    fn submit_commit(&self, commit: Commit, done: CommitDone) {
        done(self.commit(&commit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_known_instants_and_der() {
        let at = UtcDateTime::from_unix_seconds;
        assert_eq!(at(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400).rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_615_200).compact(), "20261125-140000");
        assert_eq!(at(1_795_615_200).date_time(), "2026-11-25 14:00:00");
        assert_eq!(at(-1).date_time(), "1969-12-31 23:59:59");
        // 99991231235959Z, the IEEE 802.1AR "no expiry" notAfter.
        assert_eq!(at(253_402_300_799).date_time(), "9999-12-31 23:59:59");
        for unix in [
            0u64,
            68_169_599,
            951_868_799,
            4_107_542_400,
            253_402_300_799,
        ] {
            let dt = der::DateTime::from_unix_duration(std::time::Duration::from_secs(unix))
                .unwrap_or_else(|e| panic!("{unix}: {e}"));
            let ours = at(i64::try_from(unix).unwrap_or(i64::MAX));
            assert_eq!(
                (ours.year, ours.month, ours.day),
                (i64::from(dt.year()), dt.month(), dt.day()),
                "{unix}"
            );
            assert_eq!(
                (ours.hour, ours.minute, ours.second),
                (dt.hour(), dt.minutes(), dt.seconds())
            );
        }
    }
}
