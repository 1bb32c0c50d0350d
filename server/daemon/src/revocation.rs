//! Revocation in the running server and in the operator commands.
//!
//! ```text
//!   est-server certs revoke / devices block ──► Store::revoke / block_device (one transaction:
//!        │                                      status, blocklist, audit row, generation + 1)
//!        └─► publish_crl: Store::next_crl_number, sign with the issuing CA, Store::save_crl,
//!                          write <crl_file> (DER) and <crl_file>.pem
//!   running server, every [revocation] poll_interval_secs (revocation_tick):
//!        Store::revocation_generation changed? ──► RevocationView::reload (handshake checks)
//!        latest CRL older than the generation, or half its validity gone? ──► publish_crl
//!        latest CRL not the one served? ──► EstService::set_crl (the CoAP CRL resource)
//! ```
//!
//! Both the CLI and the server sign CRLs; the store hands out cRLNumbers and keeps the latest
//! CRL, so the number only grows whoever signs, and the server serves whatever is latest. A
//! revocation made while the server runs reaches its handshake checks and its CRL within one
//! poll interval; the EST layer reads the store on every enrollment (`Store::device_blocked`,
//! the status of the certificate being renewed), so `/sen` and `/sren` are refused at once.
//!
//! At the handshake ([`RevocationView::check`], from the client chain verifier): a revoked
//! LDevID (alert certificate_revoked), a blocked device's IDevID or LDevID (access_denied), and
//! an IDevID on a manufacturer's CRL (`[pki] manufacturer_crls`, certificate_revoked) are
//! refused before the handshake completes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use der::{Decode, Encode};
use est_proto::ca::{self, CrlEntry, CrlParams, IssuingCa, VerifiedCrl};
use est_proto::policy::AnchorClass;
use est_proto::store::{unix_seconds, CrlRecord, Store};
use x509_cert::Certificate;

use crate::config::{Config, RevocationSection};
use crate::datadir;
use crate::store::ServerStore;

fn at_unix(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// The issuing CAs whose CRLs are published: the main (P-256 or HSM) one, and the P-384 one
/// of `[ca_p384]` when enabled. Each signs the CRL of the certificates it issued.
#[derive(Clone, Copy)]
pub struct CrlSigners<'a> {
    pub main: &'a IssuingCa,
    pub p384: Option<&'a IssuingCa>,
}

/// The revoked certificates `ca` must list: with no other issuing CA, every revoked
/// certificate (as before there was a second CA); otherwise the P-384 CA lists what it issued
/// and the main CA everything else (its own, and any certificate whose record is gone).
fn crl_entries(
    store: &dyn Store,
    ca: &IssuingCa,
    other: Option<&IssuingCa>,
    main: bool,
) -> Result<Vec<CrlEntry>> {
    let mut out = Vec::new();
    for e in store.revoked_certificates()? {
        if let Some(other) = other {
            let issuer = store
                .find_by_serial(&e.serial_hex)?
                .and_then(|c| Certificate::from_der(&c.der).ok())
                .map(|c| c.tbs_certificate.issuer);
            let listed = match &issuer {
                Some(i) if main => i != other.subject(),
                Some(i) => i == ca.subject(),
                None => main,
            };
            if !listed {
                continue;
            }
        }
        out.push(CrlEntry {
            serial: hex::decode(&e.serial_hex)
                .with_context(|| format!("stored serial {}", e.serial_hex))?,
            revoked_at: at_unix(e.revoked_at_unix),
            reason_code: Some(e.reason.code()),
        });
    }
    Ok(out)
}

/// Sign a CRL with `ca` (cRLNumber from the store's sequence, shared by both CAs, so each
/// CA's numbers only grow) valid `crl_validity_hours` from `now`.
fn sign_crl(
    ca: &IssuingCa,
    store: &dyn Store,
    entries: &[CrlEntry],
    cfg: &RevocationSection,
    now: SystemTime,
) -> Result<(u64, SystemTime, SystemTime, Vec<u8>)> {
    let number = store.next_crl_number()?;
    // Whole seconds, as the CRL encodes them.
    let this_update = at_unix(unix_seconds(now));
    let next_update = this_update + Duration::from_secs(u64::from(cfg.crl_validity_hours) * 3600);
    let der = ca
        .sign_crl(&CrlParams {
            number,
            this_update,
            next_update,
            entries,
        })
        .map_err(|e| anyhow::anyhow!("signing the CRL: {e}"))?;
    Ok((number, this_update, next_update, der))
}

/// Sign the CRL of every revoked certificate the main issuing CA issued, keep it in the
/// store, and write the latest CRL the store holds to `crl_file` (DER) and `crl_file.pem`;
/// with a P-384 CA, sign its CRL too (the certificates it issued) and write it to
/// [`RevocationSection::crl_p384_file`] (and `.pem`). Returns the main CRL signed here.
pub fn publish_crl(
    cas: CrlSigners<'_>,
    store: &dyn Store,
    cfg: &RevocationSection,
    data_dir: &Path,
    now: SystemTime,
) -> Result<CrlRecord> {
    let ca = cas.main;
    // The generation is read first: the entries read after it include at least its
    // revocations.
    let generation = store.revocation_generation()?;
    let entries = crl_entries(store, ca, cas.p384, true)?;
    let (number, this_update, next_update, der) = sign_crl(ca, store, &entries, cfg, now)?;
    if let Some(p384) = cas.p384 {
        let entries = crl_entries(store, p384, Some(ca), false)?;
        let (n, _, _, der) = sign_crl(p384, store, &entries, cfg, now)?;
        write_crl_files(
            data_dir,
            &cfg.crl_p384_file(),
            &RevocationSection::pem_path(&cfg.crl_p384_file()),
            &der,
        )?;
        tracing::info!(
            number = n,
            entries = entries.len(),
            "P-384 CA's CRL published"
        );
    }
    let record = CrlRecord {
        number,
        this_update_unix: unix_seconds(this_update),
        next_update_unix: unix_seconds(next_update),
        generation,
        der,
    };
    store.save_crl(&record)?;
    // Another process may have saved a newer one meanwhile: the files get the latest.
    let latest = store.latest_crl()?.unwrap_or_else(|| record.clone());
    write_crl_files(data_dir, &cfg.crl_file, &cfg.crl_pem_file(), &latest.der)?;
    tracing::info!(
        number = record.number,
        entries = entries.len(),
        next_update = %est_proto::store::UtcDateTime::from_unix_seconds(record.next_update_unix).rfc3339(),
        "CRL published"
    );
    Ok(record)
}

/// The CRL files (public: mode 0644), replaced atomically (a reader never sees half a CRL).
fn write_crl_files(data_dir: &Path, der_file: &Path, pem_file: &Path, der: &[u8]) -> Result<()> {
    let pem = der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, der)
        .map_err(|e| anyhow::anyhow!("PEM: {e}"))?;
    for (path, bytes) in [
        (datadir::resolve(data_dir, der_file), der),
        (datadir::resolve(data_dir, pem_file), pem.as_bytes()),
    ] {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
                }
            }
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o644);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(())
}

/// Whether the latest CRL must be replaced: none yet, revocations since, or half of its
/// validity gone (so a fresh one is out well before nextUpdate).
pub fn crl_due(latest: Option<&CrlRecord>, generation: u64, now: SystemTime) -> bool {
    let Some(c) = latest else {
        return true;
    };
    let now = unix_seconds(now);
    let half = (c.next_update_unix - c.this_update_unix) / 2;
    c.generation < generation || now >= c.this_update_unix.saturating_add(half)
}

/// The manufacturer CRLs named in `[pki] manufacturer_crls`, each verified against one of
/// the manufacturer CAs (refused with the file named otherwise). A CRL past its nextUpdate
/// is used, with a warning.
pub fn load_manufacturer_crls(
    data_dir: &Path,
    config: &Config,
    manufacturer_cas: &[Vec<u8>],
    now: SystemTime,
) -> Result<Vec<VerifiedCrl>> {
    let mut out = Vec::new();
    for p in &config.pki.manufacturer_crls {
        let path = datadir::resolve(data_dir, p);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut last_err = None;
        let mut verified = None;
        for ca_der in manufacturer_cas {
            match ca::verify_crl(&bytes, ca_der) {
                Ok(v) => {
                    verified = Some(v);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let v = verified.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a CRL of any configured manufacturer CA ({})",
                path.display(),
                last_err.map_or_else(|| "no manufacturer CA".into(), |e| e.to_string())
            )
        })?;
        if v.next_update.is_some_and(|n| n < now) {
            tracing::warn!(file = %path.display(), "manufacturer CRL is past its nextUpdate; using it until a newer one is installed");
        }
        tracing::info!(file = %path.display(), entries = v.revoked.len(), "manufacturer CRL loaded");
        out.push(v);
    }
    Ok(out)
}

/// Who did an operator action, for the audit trail's `peer` column.
pub const OPERATOR: &str = "operator (CLI)";

fn open_store(data_dir: &Path, config: &Config) -> Result<Arc<dyn ServerStore>> {
    crate::store::open_for_command(data_dir, &config.storage)
}

/// Load the issuing CA (certificate and key) named by the configuration: its key from the
/// PKCS#11 token when `[hsm]` is enabled, else from the key file.
pub fn load_issuing_ca(data_dir: &Path, config: &Config) -> Result<IssuingCa> {
    let cert = datadir::resolve(data_dir, &config.pki.issuing_ca_cert);
    if config.hsm.enabled {
        return datadir::load_hsm_ca(data_dir, &cert, &config.hsm);
    }
    datadir::load_ca(
        &cert,
        &datadir::resolve(data_dir, &config.pki.issuing_ca_key),
    )
}

/// The P-384 issuing CA when `[ca_p384]` is enabled (for the operator commands, which sign
/// its CRL; the key's permissions are checked by `run`).
pub fn load_p384_ca(data_dir: &Path, config: &Config) -> Result<Option<IssuingCa>> {
    crate::p384::load(data_dir, config, true)
}

/// Sign and publish the CRLs with the configured issuing CAs.
fn publish_with(
    data_dir: &Path,
    config: &Config,
    store: &dyn Store,
    now: SystemTime,
) -> Result<CrlRecord> {
    let ca = load_issuing_ca(data_dir, config)?;
    let p384 = load_p384_ca(data_dir, config)?;
    publish_crl(
        CrlSigners {
            main: &ca,
            p384: p384.as_ref(),
        },
        store,
        &config.revocation,
        data_dir,
        now,
    )
}

/// Sign and write fresh CRLs now (`est-server crl publish`, and after every revocation).
pub fn publish_now(data_dir: &Path, config: &Config, now: SystemTime) -> Result<CrlRecord> {
    let store = open_store(data_dir, config)?;
    let r = publish_with(data_dir, config, store.as_ref(), now);
    store.close();
    r
}

/// What `est-server certs revoke` did.
#[derive(Debug)]
pub struct RevokeReport {
    pub outcome: est_proto::store::RevokeOutcome,
    /// The CRL published after it (none when nothing changed).
    pub crl: Option<CrlRecord>,
}

/// `est-server certs revoke SERIAL --reason R`: revoke one certificate (by serial or a
/// unique prefix of it), with its audit row, then publish a CRL that lists it.
pub fn revoke_certificate(
    data_dir: &Path,
    config: &Config,
    serial: &str,
    reason: est_proto::store::RevocationReason,
    now: SystemTime,
) -> Result<RevokeReport> {
    use est_proto::store::{AuditEvent, Revocation, RevokeOutcome};
    let store = open_store(data_dir, config)?;
    let found = store.find_by_serial_prefix(serial)?;
    let cert = match found.as_slice() {
        [] => {
            store.close();
            return Ok(RevokeReport {
                outcome: RevokeOutcome::NotFound,
                crl: None,
            });
        }
        [c] => c.clone(),
        many => anyhow::bail!(
            "{} certificates match {serial}; give more digits",
            many.len()
        ),
    };
    let at = unix_seconds(now);
    let outcome = store.revoke(&Revocation {
        serial_hex: cert.serial_hex.clone(),
        reason,
        revoked_at_unix: at,
        audit: AuditEvent {
            at_unix: at,
            peer: OPERATOR.into(),
            relay: None,
            device_id: cert.device_id.clone(),
            operation: "revoke".into(),
            outcome: "revoked".into(),
            code: "-".into(),
            detail: format!("serial {} reason {}", cert.serial_hex, reason.name()),
        },
    })?;
    let crl = match outcome {
        RevokeOutcome::Revoked(_) => Some(publish_with(data_dir, config, store.as_ref(), now)?),
        _ => None,
    };
    store.close();
    Ok(RevokeReport { outcome, crl })
}

/// What `est-server devices block` did.
#[derive(Debug)]
pub struct BlockReport {
    pub outcome: est_proto::store::BlockOutcome,
    pub crl: Option<CrlRecord>,
}

/// `est-server devices block SERIAL [--keep-certs]`: decommission a device (its `/sen` and
/// `/sren` refused from now on, its handshakes too) and, unless `keep_certs`, revoke its
/// active certificates with `reason`; then publish a CRL.
pub fn block_device(
    data_dir: &Path,
    config: &Config,
    device_id: &str,
    keep_certs: bool,
    reason: est_proto::store::RevocationReason,
    now: SystemTime,
) -> Result<BlockReport> {
    use est_proto::store::{AuditEvent, DeviceBlock};
    let store = open_store(data_dir, config)?;
    let at = unix_seconds(now);
    let outcome = store.block_device(&DeviceBlock {
        device_id: device_id.to_string(),
        reason,
        at_unix: at,
        keep_certs,
        audit: AuditEvent {
            at_unix: at,
            peer: OPERATOR.into(),
            relay: None,
            device_id: device_id.to_string(),
            operation: "block".into(),
            outcome: "blocked".into(),
            code: "-".into(),
            detail: if keep_certs {
                "device blocked; certificates kept".into()
            } else {
                format!(
                    "device blocked; active certificates revoked ({})",
                    reason.name()
                )
            },
        },
    })?;
    let crl = if outcome.revoked_serials.is_empty() {
        None
    } else {
        Some(publish_with(data_dir, config, store.as_ref(), now)?)
    };
    store.close();
    Ok(BlockReport { outcome, crl })
}

/// Why a handshake was refused by [`RevocationView::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// An LDevID of ours that was revoked.
    Revoked { device: String, serial: String },
    /// A device on the blocklist (any certificate).
    Blocked { device: String },
    /// A certificate of the chain is on its manufacturer's CRL.
    ManufacturerRevoked { device: String, serial: String },
}

impl HandshakeRefusal {
    /// Short reason, for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeRefusal::Revoked { .. } => "revoked",
            HandshakeRefusal::Blocked { .. } => "blocked",
            HandshakeRefusal::ManufacturerRevoked { .. } => "manufacturer_revoked",
        }
    }

    pub fn device(&self) -> &str {
        match self {
            HandshakeRefusal::Revoked { device, .. }
            | HandshakeRefusal::Blocked { device }
            | HandshakeRefusal::ManufacturerRevoked { device, .. } => device,
        }
    }
}

impl std::fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeRefusal::Revoked { serial, .. } => {
                write!(f, "certificate {serial} is revoked")
            }
            HandshakeRefusal::Blocked { device } => write!(f, "device {device} is blocked"),
            HandshakeRefusal::ManufacturerRevoked { serial, .. } => {
                write!(f, "certificate {serial} is on its manufacturer's CRL")
            }
        }
    }
}

#[derive(Default)]
struct ViewInner {
    generation: u64,
    revoked: HashSet<String>,
    blocked: HashSet<String>,
    /// Issuer Name DER -> revoked serials (content bytes), from the manufacturer CRLs.
    manufacturer: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
}

/// What the handshake checks against, in memory: our revoked serials, the blocked devices
/// (both from the store, at a generation) and the manufacturers' revoked serials.
#[derive(Default)]
pub struct RevocationView {
    inner: RwLock<ViewInner>,
    /// Handshakes refused, by reason.
    pub refused_revoked: AtomicU64,
    pub refused_blocked: AtomicU64,
    pub refused_manufacturer_revoked: AtomicU64,
    /// Refusals not written to the audit trail (over `max_handshake_audit_per_sec`).
    pub audit_suppressed: AtomicU64,
    audit_window: Mutex<Option<(Instant, u32)>>,
}

impl RevocationView {
    /// Re-read the revoked serials and blocked devices from `store`.
    pub fn reload(&self, store: &dyn Store) -> Result<u64> {
        // Generation first: what is read after it covers at least that generation.
        let generation = store.revocation_generation()?;
        let revoked = store
            .revoked_certificates()?
            .into_iter()
            .map(|e| e.serial_hex)
            .collect();
        let blocked = store.blocked_devices()?.into_iter().collect();
        if let Ok(mut g) = self.inner.write() {
            g.generation = generation;
            g.revoked = revoked;
            g.blocked = blocked;
        }
        Ok(generation)
    }

    /// Replace the manufacturers' revoked serials.
    pub fn set_manufacturer_crls(&self, crls: &[VerifiedCrl]) {
        let mut map: HashMap<Vec<u8>, HashSet<Vec<u8>>> = HashMap::new();
        for c in crls {
            map.entry(c.issuer_der.clone())
                .or_default()
                .extend(c.revoked.iter().map(|(s, _)| s.clone()));
        }
        if let Ok(mut g) = self.inner.write() {
            g.manufacturer = map;
        }
    }

    /// The store generation the view reflects.
    pub fn generation(&self) -> u64 {
        self.inner.read().map(|g| g.generation).unwrap_or(0)
    }

    /// Whether the client `chain` (leaf first), which path validation tied to an anchor of
    /// `class`, may complete its handshake. Counts refusals.
    pub fn check(
        &self,
        chain: &[Vec<u8>],
        leaf: &Certificate,
        class: AnchorClass,
    ) -> Result<(), HandshakeRefusal> {
        let r = self.decide(chain, leaf, class);
        if let Err(refusal) = &r {
            match refusal {
                HandshakeRefusal::Revoked { .. } => &self.refused_revoked,
                HandshakeRefusal::Blocked { .. } => &self.refused_blocked,
                HandshakeRefusal::ManufacturerRevoked { .. } => &self.refused_manufacturer_revoked,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn decide(
        &self,
        chain: &[Vec<u8>],
        leaf: &Certificate,
        class: AnchorClass,
    ) -> Result<(), HandshakeRefusal> {
        let Ok(g) = self.inner.read() else {
            return Ok(());
        };
        // Nothing revoked or blocked anywhere: the usual case.
        if g.revoked.is_empty() && g.blocked.is_empty() && g.manufacturer.is_empty() {
            return Ok(());
        }
        let device = ca::serial_number_attr(&leaf.tbs_certificate.subject).unwrap_or_default();
        if !device.is_empty() && g.blocked.contains(&device) {
            return Err(HandshakeRefusal::Blocked { device });
        }
        let serial = hex::encode(leaf.tbs_certificate.serial_number.as_bytes());
        match class {
            AnchorClass::Operational => {
                if g.revoked.contains(&serial) {
                    return Err(HandshakeRefusal::Revoked { device, serial });
                }
            }
            AnchorClass::Manufacturer => {
                if g.manufacturer.is_empty() {
                    return Ok(());
                }
                // The leaf is parsed already; the rest of the chain is parsed here.
                let rest: Vec<Certificate> = chain
                    .iter()
                    .skip(1)
                    .filter_map(|der| Certificate::from_der(der).ok())
                    .collect();
                for c in std::iter::once(leaf).chain(rest.iter()) {
                    let Ok(issuer) = c.tbs_certificate.issuer.to_der() else {
                        continue;
                    };
                    if g.manufacturer
                        .get(&issuer)
                        .is_some_and(|s| s.contains(c.tbs_certificate.serial_number.as_bytes()))
                    {
                        return Err(HandshakeRefusal::ManufacturerRevoked {
                            device,
                            serial: hex::encode(c.tbs_certificate.serial_number.as_bytes()),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a refusal may be written to the audit trail now (at most `per_sec` a second);
    /// counts the ones that may not.
    pub fn audit_allowed(&self, per_sec: u32) -> bool {
        let Ok(mut w) = self.audit_window.lock() else {
            return false;
        };
        let now = Instant::now();
        let (start, n) = match *w {
            Some((start, n)) if now.duration_since(start) < Duration::from_secs(1) => (start, n),
            _ => (now, 0),
        };
        if n < per_sec {
            *w = Some((start, n + 1));
            true
        } else {
            *w = Some((start, n));
            self.audit_suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_is_due_without_one_after_revocations_and_at_half_life() {
        let t = |s: i64| at_unix(s);
        assert!(crl_due(None, 0, t(1000)));
        let c = CrlRecord {
            number: 1,
            this_update_unix: 1000,
            next_update_unix: 1000 + 86_400,
            generation: 3,
            der: Vec::new(),
        };
        assert!(!crl_due(Some(&c), 3, t(2000)));
        assert!(crl_due(Some(&c), 4, t(2000)));
        assert!(crl_due(Some(&c), 3, t(1000 + 43_200)));
    }

    #[test]
    fn audit_rows_are_rate_limited() {
        let v = RevocationView::default();
        let allowed = (0..10).filter(|_| v.audit_allowed(3)).count();
        assert_eq!(allowed, 3);
        assert_eq!(v.audit_suppressed.load(Ordering::Relaxed), 7);
    }
}
