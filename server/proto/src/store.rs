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
    /// The certificate slot of the device this certificate fills: a new certificate
    /// supersedes only the active ones of the same device *and slot*. "" is the LDevID (every
    /// profile but `dlms`); the `dlms` profile fills "dlms-signing", "dlms-key-agreement" or
    /// "dlms-tls", so a meter's signing and key-agreement certificates are active together.
    pub slot: String,
    /// The certificate profile (`[[profiles]]` name) it was issued under, which a
    /// re-enrollment authenticated by this certificate keeps; "" when none was: the built-in
    /// LDevID profile, the `dlms` profile, or a certificate stored before profiles were
    /// recorded.
    pub profile: String,
}

/// One audit record: every enrollment attempt, success or refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub at_unix: i64,
    /// Peer transport address, e.g. `127.0.0.1:40001` (for a meter behind a stateless join
    /// proxy: the proxy's address and the start of the meter's JPY header,
    /// `198.51.100.4:7634/jpy:0a1b2c3d4e5f`).
    pub peer: String,
    /// The join proxy (DCU relay) the attempt came through, its address; `None`: direct.
    pub relay: Option<String>,
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

/// Why a certificate was revoked: the CRLReason codes of RFC 5280 §5.3.1 (7 is unused;
/// removeFromCRL, 8, only appears in delta CRLs and is not offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl RevocationReason {
    /// Every reason, in code order.
    pub const ALL: [RevocationReason; 9] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
        RevocationReason::AaCompromise,
    ];

    /// The CRLReason code (RFC 5280 §5.3.1), as stored and as put in the CRL.
    pub fn code(self) -> u8 {
        match self {
            RevocationReason::Unspecified => 0,
            RevocationReason::KeyCompromise => 1,
            RevocationReason::CaCompromise => 2,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
            RevocationReason::CertificateHold => 6,
            RevocationReason::PrivilegeWithdrawn => 9,
            RevocationReason::AaCompromise => 10,
        }
    }

    /// The reason of a CRLReason code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The RFC 5280 name, e.g. `keyCompromise` (what `openssl crl -text` prints, in words).
    pub fn name(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::CaCompromise => "cACompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::CertificateHold => "certificateHold",
            RevocationReason::PrivilegeWithdrawn => "privilegeWithdrawn",
            RevocationReason::AaCompromise => "aACompromise",
        }
    }

    /// A reason from its RFC 5280 name in any case, with or without dashes or underscores
    /// (`keyCompromise`, `key-compromise`, `KEY_COMPROMISE`), or its code (`1`).
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        if let Ok(code) = t.parse::<u8>() {
            return Self::from_code(code);
        }
        let norm: String = t
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        Self::ALL
            .into_iter()
            .find(|r| r.name().to_ascii_lowercase() == norm)
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An operator's revocation of one certificate ([`Store::revoke`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Serial, lower-case hex as stored.
    pub serial_hex: String,
    pub reason: RevocationReason,
    /// The revocationDate the CRL will carry, seconds since the Unix epoch.
    pub revoked_at_unix: i64,
    /// Written in the same transaction (operation `revoke`).
    pub audit: AuditEvent,
}

/// What [`Store::revoke`] came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// Revoked now (the certificate as it was before).
    Revoked(IssuedCert),
    /// It was revoked already; nothing changed (no audit row either).
    AlreadyRevoked(IssuedCert),
    /// No certificate with that serial.
    NotFound,
}

/// An operator's decommissioning of a device ([`Store::block_device`]): its future `/sen`
/// and `/sren` are refused, and unless `keep_certs` its active certificates are revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBlock {
    pub device_id: String,
    /// The reason the device's certificates are revoked with (normally
    /// cessationOfOperation).
    pub reason: RevocationReason,
    pub at_unix: i64,
    /// Leave its certificates as they are (only future enrollments are refused).
    pub keep_certs: bool,
    /// Written in the same transaction (operation `block`).
    pub audit: AuditEvent,
}

/// What [`Store::block_device`] came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockOutcome {
    /// False when the device was on the blocklist already.
    pub newly_blocked: bool,
    /// Serials revoked by this block.
    pub revoked_serials: Vec<String>,
}

/// One entry of the CRL: a revoked certificate of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial_hex: String,
    pub revoked_at_unix: i64,
    pub reason: RevocationReason,
}

/// How many certificates a device was issued since a given time ([`Store::issued_since`]),
/// for the per-device enrollment rate limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IssuanceWindow {
    pub count: u64,
    /// issued_at of the oldest of them (seconds since the Unix epoch).
    pub oldest_unix: Option<i64>,
}

/// What an enrollment reads from the store before it is decided
/// ([`Store::enrollment_reads`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnrollmentReads {
    /// The device is blocked (`est-server devices block`).
    pub blocked: bool,
    /// The certificate already issued to the device for an identical request (not read
    /// for a blocked device, or without a request digest).
    pub already_issued: Option<IssuedCert>,
}

/// The latest CRL published, as the store keeps it: every server and operator command
/// that signs a CRL goes through [`Store::next_crl_number`] and [`Store::save_crl`], so
/// the CRL number only grows, whoever signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlRecord {
    /// cRLNumber (RFC 5280 §5.2.3).
    pub number: u64,
    pub this_update_unix: i64,
    pub next_update_unix: i64,
    /// The [`Store::revocation_generation`] it covers: every revocation up to it is listed.
    pub generation: u64,
    /// The CRL, DER.
    pub der: Vec<u8>,
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
    /// marks every other active certificate of the device in the same slot
    /// ([`IssuedCert::slot`]) superseded. If the device already
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
#[allow(
    clippy::large_enum_variant,
    reason = "one per commit, moved once to the core: boxing the certificate saves nothing"
)]
pub enum CommitOutcome {
    /// The write is durable.
    Committed,
    /// Another request from the same device with the same request digest committed first
    /// (two retries raced); answer with this one instead.
    AlreadyIssued(IssuedCert),
    /// A re-enrollment lost a race: the certificate it replaces had this status (no longer
    /// active, superseded) when the commit ran, and the device's certificate for this request
    /// was not the one that superseded it. Nothing was written; the request is refused as it
    /// would have been had the winner committed before it was read.
    ReplacedNotActive(CertStatus),
    /// Not written: between the decision and the commit, the device was blocked or the
    /// certificate the re-enrollment authenticated with was revoked (the reason, for the
    /// answer and the audit row).
    Refused(String),
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

    /// What an enrollment reads before it is decided: whether `device_id` is blocked and,
    /// for `request_digest`, the certificate already issued for that request
    /// ([`Store::device_blocked`], [`Store::find_by_request`]). A store that can reads both
    /// at once, from one snapshot (SQLite: one read transaction instead of two).
    fn enrollment_reads(
        &self,
        device_id: &str,
        request_digest: Option<&[u8; 32]>,
    ) -> Result<EnrollmentReads, StoreError> {
        let blocked = self.device_blocked(device_id)?;
        let already_issued = match request_digest {
            Some(digest) if !blocked => self.find_by_request(device_id, digest)?,
            _ => None,
        };
        Ok(EnrollmentReads {
            blocked,
            already_issued,
        })
    }

    /// Look a certificate up by serial (lower-case hex).
    fn find_by_serial(&self, serial_hex: &str) -> Result<Option<IssuedCert>, StoreError>;

    /// Whether `device_id` is on the device allowlist.
    fn device_allowed(&self, device_id: &str) -> Result<bool, StoreError>;

    /// Whether `device_id` was decommissioned (`est-server devices block`): its `/sen` and
    /// `/sren` are refused.
    fn device_blocked(&self, device_id: &str) -> Result<bool, StoreError>;

    /// Certificates issued to `device_id` at or after `since_unix` (every kind), for the
    /// per-device enrollment rate limit.
    fn issued_since(&self, device_id: &str, since_unix: i64) -> Result<IssuanceWindow, StoreError>;

    /// Revoke one certificate and write its audit row, in one transaction, durable on
    /// return (an operator command: synchronous). Bumps the revocation generation.
    fn revoke(&self, revocation: &Revocation) -> Result<RevokeOutcome, StoreError>;

    /// Put a device on the blocklist and, unless `keep_certs`, revoke its active
    /// certificates, with the audit row, in one transaction, durable on return. Bumps the
    /// revocation generation.
    fn block_device(&self, block: &DeviceBlock) -> Result<BlockOutcome, StoreError>;

    /// Every revoked certificate, oldest revocation first: the CRL's entries.
    fn revoked_certificates(&self) -> Result<Vec<RevokedEntry>, StoreError>;

    /// Every blocked device.
    fn blocked_devices(&self) -> Result<Vec<String>, StoreError>;

    /// A number that grows with every revocation and block (0: none ever). A server
    /// compares it with the generation its CRL and its handshake checks cover, to learn of
    /// revocations made by another process (the operator CLI) without reading every row.
    fn revocation_generation(&self) -> Result<u64, StoreError>;

    /// Allocate the next cRLNumber (1, 2, ...), durable on return: never handed out twice.
    fn next_crl_number(&self) -> Result<u64, StoreError>;

    /// Keep `crl` as the latest CRL unless one with a higher number is stored already;
    /// returns whether it was kept.
    fn save_crl(&self, crl: &CrlRecord) -> Result<bool, StoreError>;

    /// The latest CRL saved, if any.
    fn latest_crl(&self) -> Result<Option<CrlRecord>, StoreError>;

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
    blocked: Vec<String>,
    revoked: Vec<RevokedEntry>,
    generation: u64,
    crl_number: u64,
    crl: Option<CrlRecord>,
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
                let replaced = cert
                    .replaces_serial_hex
                    .as_deref()
                    .and_then(|r| g.certs.iter().find(|c| c.serial_hex == r).map(|c| c.status));
                if let Some(refusal) =
                    issuance_refusal(g.blocked.contains(&cert.device_id), replaced)
                {
                    return Ok(CommitOutcome::Refused(refusal));
                }
                if let Some(status) = replaced.filter(|s| *s != CertStatus::Active) {
                    return Ok(CommitOutcome::ReplacedNotActive(status));
                }
                for c in g.certs.iter_mut() {
                    if c.device_id == cert.device_id
                        && c.slot == cert.slot
                        && c.status == CertStatus::Active
                    {
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

/// Why an issuance is refused at commit time (see [`CommitOutcome::Refused`]): the device
/// is blocked, or the certificate being renewed has been revoked. Shared by the stores.
pub fn issuance_refusal(device_blocked: bool, replaced: Option<CertStatus>) -> Option<String> {
    if device_blocked {
        return Some("device is blocked (decommissioned)".into());
    }
    if replaced == Some(CertStatus::Revoked) {
        return Some("certificate being renewed is revoked".into());
    }
    None
}

impl MemoryStore {
    fn revoke_locked(
        g: &mut MemoryInner,
        serial_hex: &str,
        reason: RevocationReason,
        at: i64,
    ) -> Option<(IssuedCert, bool)> {
        let cert = g.certs.iter_mut().find(|c| c.serial_hex == serial_hex)?;
        let before = cert.clone();
        if cert.status == CertStatus::Revoked {
            return Some((before, false));
        }
        cert.status = CertStatus::Revoked;
        g.revoked.push(RevokedEntry {
            serial_hex: serial_hex.to_string(),
            revoked_at_unix: at,
            reason,
        });
        Some((before, true))
    }
}

impl Store for MemoryStore {
    fn device_blocked(&self, device_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.blocked.iter().any(|d| d == device_id))
    }

    fn issued_since(&self, device_id: &str, since_unix: i64) -> Result<IssuanceWindow, StoreError> {
        let g = self.lock()?;
        let mut w = IssuanceWindow::default();
        for c in g
            .certs
            .iter()
            .filter(|c| c.device_id == device_id && c.issued_at_unix >= since_unix)
        {
            w.count += 1;
            w.oldest_unix = Some(
                w.oldest_unix
                    .map_or(c.issued_at_unix, |o| o.min(c.issued_at_unix)),
            );
        }
        Ok(w)
    }

    fn revoke(&self, r: &Revocation) -> Result<RevokeOutcome, StoreError> {
        let mut g = self.lock()?;
        match Self::revoke_locked(&mut g, &r.serial_hex, r.reason, r.revoked_at_unix) {
            None => Ok(RevokeOutcome::NotFound),
            Some((before, false)) => Ok(RevokeOutcome::AlreadyRevoked(before)),
            Some((before, true)) => {
                g.generation += 1;
                g.audit.push(r.audit.clone());
                Ok(RevokeOutcome::Revoked(before))
            }
        }
    }

    fn block_device(&self, b: &DeviceBlock) -> Result<BlockOutcome, StoreError> {
        let mut g = self.lock()?;
        let newly_blocked = !g.blocked.contains(&b.device_id);
        if newly_blocked {
            g.blocked.push(b.device_id.clone());
        }
        let mut out = BlockOutcome {
            newly_blocked,
            revoked_serials: Vec::new(),
        };
        if !b.keep_certs {
            let active: Vec<String> = g
                .certs
                .iter()
                .filter(|c| c.device_id == b.device_id && c.status == CertStatus::Active)
                .map(|c| c.serial_hex.clone())
                .collect();
            for s in active {
                Self::revoke_locked(&mut g, &s, b.reason, b.at_unix);
                out.revoked_serials.push(s);
            }
        }
        g.generation += 1;
        g.audit.push(b.audit.clone());
        Ok(out)
    }

    fn revoked_certificates(&self) -> Result<Vec<RevokedEntry>, StoreError> {
        Ok(self.lock()?.revoked.clone())
    }

    fn blocked_devices(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.blocked.clone())
    }

    fn revocation_generation(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.generation)
    }

    fn next_crl_number(&self) -> Result<u64, StoreError> {
        let mut g = self.lock()?;
        g.crl_number += 1;
        Ok(g.crl_number)
    }

    fn save_crl(&self, crl: &CrlRecord) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        if g.crl.as_ref().is_some_and(|c| c.number >= crl.number) {
            return Ok(false);
        }
        g.crl = Some(crl.clone());
        Ok(true)
    }

    fn latest_crl(&self) -> Result<Option<CrlRecord>, StoreError> {
        Ok(self.lock()?.crl.clone())
    }

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
