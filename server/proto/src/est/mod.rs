//! EST-coaps resources (RFC 9148) on top of the CoAP layer.
//!
//! ```text
//!   GET  /.well-known/core[?rt=ace.est*]   discovery (RFC 6690 link format, RFC 9148 §4.1)
//!   GET  /.well-known/est/crts             CA certificates      281 (default) | 287
//!   POST /.well-known/est/sen              enroll (IDevID)      286 -> 281 | 287
//!   POST /.well-known/est/sren             re-enroll (LDevID)   286 -> 281 | 287
//!   GET  /.well-known/est/att              CSR attributes       285
//!   POST /.well-known/est/skg              server keygen        286 -> 62 {284 key, 281 cert}
//!   POST /.well-known/est/skc              server keygen        286 -> 62 {284 key, 287 cert}
//! ```
//!
//! [`EstService`] holds what every session shares: configuration, the [`Policy`], the
//! issuing CA, the [`Store`] and the [`EnrollmentGate`]. It serves one reassembled request
//! in two phases, driven by [`crate::session::EstSession`]: `begin` answers at once, or,
//! for an enrollment, admits it through the gate, applies the policy, issues through the
//! CA's `Signer` and asks for a durable [`Commit`]; `resume` takes the commit's result and
//! answers (or asks for the next write: the audit row of a replayed answer). Nothing here
//! waits for storage. Errors are typed ([`EstError`]) and become CoAP codes in exactly one
//! place ([`EstError::to_response`]).

mod csrattrs;
mod discovery;
mod error;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use coap_lite::ResponseType;
use rand::{CryptoRng, RngCore};

use cbor_schemas::c509::C509Csr;

use crate::ca::{self, IssueParams, IssuingCa};
use crate::coap::{Method, Request, Response};
use crate::policy::{AnchorClass, Policy};
use crate::store::{
    unix_seconds, AuditEvent, CertStatus, Commit, CommitOutcome, CommitResult, IssuanceKind,
    IssuedCert, Store, StoreError,
};

pub use error::{code_text, EstError};

/// application/link-format (RFC 6690).
pub const CF_LINK_FORMAT: u16 = 40;
/// application/multipart-core (RFC 8710).
pub const CF_MULTIPART_CORE: u16 = 62;
/// application/pkcs7-mime; smime-type=certs-only.
pub const CF_PKCS7_CERTS_ONLY: u16 = 281;
/// application/pkcs8.
pub const CF_PKCS8: u16 = 284;
/// application/csrattrs.
pub const CF_CSRATTRS: u16 = 285;
/// application/pkcs10.
pub const CF_PKCS10: u16 = 286;
/// application/pkix-cert.
pub const CF_PKIX_CERT: u16 = 287;

/// The EST resource root every server must support (RFC 9148 §4.1).
pub const EST_ROOT: [&str; 2] = [".well-known", "est"];

/// Settings of the EST layer (the `[est]` table of the configuration).
#[derive(Clone, Debug)]
pub struct EstConfig {
    /// Largest certification request accepted, bytes; larger gets 4.13. Default 4096.
    pub max_csr_bytes: usize,
    /// Enrollments (sen/sren/skg/skc) processed at once; beyond it 5.03 + Max-Age.
    /// Default 256.
    pub max_concurrent_enrollments: usize,
    /// Max-Age sent with 5.03 when overloaded, seconds. Default 5.
    pub overload_retry_after_seconds: u32,
    /// Serve /skg and /skc (server-side key generation). Default true.
    pub server_keygen: bool,
    /// Content-Format of `application/cose-c509-cert+cbor`, one C509 certificate (the CBOR
    /// array `C509Certificate`; draft-ietf-cose-cbor-encoded-cert-20 leaves the number
    /// unassigned; experimental range). Default 65003.
    pub c509_cert_content_format: u16,
    /// Content-Format of `application/cose-c509+cbor`, `COSE_C509`: a bag or chain of C509
    /// certificates (unassigned in draft -20; experimental range). Default 65015.
    pub cose_c509_content_format: u16,
    /// Content-Format of `application/cose-c509-pkcs10+cbor`, C509 certification requests
    /// (unassigned in draft -20; experimental range). Default 65004.
    pub c509_pkcs10_content_format: u16,
    /// Certificates one device may be issued per `enrollment_period` (every kind); beyond
    /// it 5.03 + Max-Age until the oldest leaves the period. 0: no limit.
    pub max_enrollments_per_device: u32,
    /// The sliding period of `max_enrollments_per_device`.
    pub enrollment_period: Duration,
    /// Path of the CoAP resource serving our CRL (e.g. `["crl"]` for `/crl`); empty: not
    /// served.
    pub crl_path: Vec<String>,
    /// Content-Format the CRL is served with (no CoAP number is registered for
    /// application/pkix-crl; the default is in the experimental range). Accept 42
    /// (application/octet-stream) gets the same bytes as 42.
    pub crl_content_format: u16,
    /// Path of the CoAP resource serving the P-384 issuing CA's CRL (e.g. `["crl-p384"]`);
    /// empty: not served.
    pub crl_p384_path: Vec<String>,
    /// Max-Age of the 5.03 sent while the issuing CA is outside its validity.
    pub ca_unavailable_retry_after_seconds: u32,
    /// The registrar's JPY endpoint for stateless join proxies, e.g.
    /// `jpy://[2001:db8::52]:7634`: discovery (`rt=brski.rjp`) announces it. `None`: not a
    /// JPY registrar.
    pub jpy_uri: Option<String>,
}

/// The default Content-Format of the CRL resource: application/pkix-crl has no CoAP number,
/// so one from the experimental range 65000-65535 (after the C509 ones).
pub const CF_PKIX_CRL_DEFAULT: u16 = 65005;
/// application/octet-stream, accepted for the CRL resource too.
pub const CF_OCTET_STREAM: u16 = 42;

impl Default for EstConfig {
    fn default() -> Self {
        Self {
            max_csr_bytes: 4096,
            max_concurrent_enrollments: 256,
            overload_retry_after_seconds: 5,
            server_keygen: true,
            c509_cert_content_format: cbor_schemas::c509::CONTENT_FORMAT_C509_CERT_DEFAULT,
            cose_c509_content_format: cbor_schemas::c509::CONTENT_FORMAT_COSE_C509_DEFAULT,
            c509_pkcs10_content_format: cbor_schemas::c509::CONTENT_FORMAT_C509_PKCS10_DEFAULT,
            max_enrollments_per_device: 0,
            enrollment_period: Duration::from_secs(86_400),
            crl_path: Vec::new(),
            crl_content_format: CF_PKIX_CRL_DEFAULT,
            crl_p384_path: Vec::new(),
            ca_unavailable_retry_after_seconds: 3600,
            jpy_uri: None,
        }
    }
}

/// Whether request path `p` is the configured resource `path` (never an empty one).
fn path_is(p: &[&str], path: &[String]) -> bool {
    !path.is_empty() && p.len() == path.len() && p.iter().zip(path).all(|(a, b)| a == b)
}

/// Who is asking, as established by the transport, and the wall clock.
pub struct RequestContext<'a> {
    /// Peer address for the audit log, e.g. `127.0.0.1:40001`.
    pub peer: &'a str,
    /// The join proxy the request came through (its address), for the audit log.
    pub relay: Option<&'a str>,
    /// The client certificate chain (DER, leaf first) that the DTLS handshake verified.
    pub client_chain: &'a [Vec<u8>],
    /// What [`Policy::verify_peer_chain`] established for `client_chain` at the handshake.
    /// With it the policy only checks the anchor class the operation needs; without it (or
    /// for another chain) the chain is verified again, in full.
    pub verified: Option<&'a crate::policy::VerifiedChain>,
    /// Wall-clock time, for certificate validity.
    pub now: SystemTime,
}

/// EST operations, for the audit log and the overload counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Crts,
    Sen,
    Sren,
    Att,
    Skg,
    Skc,
}

impl Operation {
    fn from_segment(s: &str) -> Option<Self> {
        Some(match s {
            "crts" => Operation::Crts,
            "sen" => Operation::Sen,
            "sren" => Operation::Sren,
            "att" => Operation::Att,
            "skg" => Operation::Skg,
            "skc" => Operation::Skc,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Crts => "crts",
            Operation::Sen => "sen",
            Operation::Sren => "sren",
            Operation::Att => "att",
            Operation::Skg => "skg",
            Operation::Skc => "skc",
        }
    }

    fn method(self) -> Method {
        match self {
            Operation::Crts | Operation::Att => Method::Get,
            _ => Method::Post,
        }
    }
}

/// Outcome counters of the EST layer (monotonic since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstCounters {
    /// Certificates issued (sen, sren, skg, skc).
    pub issued: u64,
    /// Retried requests answered with the certificate already issued.
    pub replayed: u64,
    /// Enrollments refused (4.xx, 5.00), overload and an unavailable store excluded.
    pub refused: u64,
    /// 5.03 + Max-Age answers because `max_concurrent_enrollments` was reached.
    pub overloaded: u64,
    /// 5.03 + Max-Age answers because the store could not read or commit.
    pub store_unavailable: u64,
    /// 5.03 + Max-Age answers because the device reached its enrollment rate limit.
    pub rate_limited: u64,
    /// 5.03 + Max-Age answers because the issuing CA was outside its validity.
    pub ca_unavailable: u64,
    /// Enrollments refused by policy because the device is blocked or its certificate
    /// revoked (included in `refused`).
    pub refused_revoked: u64,
    /// Audited refusals by the code answered, in the order of [`REFUSAL_CODES`].
    pub refusals_by_code: [u64; REFUSAL_CODES.len()],
}

/// The codes an audited enrollment refusal is answered with ([`EstCounters::refusals_by_code`];
/// "other" counts any code not listed).
pub const REFUSAL_CODES: [&str; 8] = [
    "4.00", "4.03", "4.06", "4.13", "4.15", "5.00", "5.03", "other",
];

#[derive(Default)]
struct AtomicCounters {
    issued: AtomicU64,
    replayed: AtomicU64,
    refused: AtomicU64,
    overloaded: AtomicU64,
    store_unavailable: AtomicU64,
    rate_limited: AtomicU64,
    ca_unavailable: AtomicU64,
    refused_revoked: AtomicU64,
    refusals_by_code: [AtomicU64; REFUSAL_CODES.len()],
}

/// The EST-coaps service: resources, policy, CA, store and the enrollment gate, shared by
/// every session ([`crate::session::EstSession`] drives it).
pub struct EstService {
    counters: AtomicCounters,
    config: EstConfig,
    ca: IssuingCa,
    /// Further issuing CAs beside `ca` (the P-384 one), chosen by the request key's curve.
    other_cas: Vec<IssuingCa>,
    policy: Policy,
    store: Arc<dyn Store>,
    gate: EnrollmentGate,
    crts_pkcs7: Vec<u8>,
    csrattrs: Vec<u8>,
    /// The CRL the CRL resource serves (the driver sets it, [`EstService::set_crl`]).
    crl: RwLock<Option<Arc<Vec<u8>>>>,
    /// The P-384 issuing CA's CRL ([`EstService::set_crl_p384`]).
    crl_p384: RwLock<Option<Arc<Vec<u8>>>>,
}

/// What serving a request comes to, now or after a commit.
pub(crate) enum Step {
    /// Answer the request with this.
    Respond(Response),
    /// Make `commit` durable, then [`EstService::resume`] `then` with its result.
    Commit(Commit, Box<AwaitingCommit>),
}

/// An enrollment waiting for its commit: the admission permit (held until the answer),
/// who asked, and what to answer once the write's result is known.
pub(crate) struct AwaitingCommit {
    permit: Arc<EnrollmentPermit>,
    exchange: Exchange,
    then: AfterCommit,
}

impl AwaitingCommit {
    /// The share of the admission permit that goes with the commit to the driver.
    pub(crate) fn ticket(&self) -> CommitTicket {
        CommitTicket {
            _permit: Arc::clone(&self.permit),
        }
    }
}

/// Travels with a commit the core asks for (`crate::session::Event::Commit`): it holds the
/// enrollment's admission permit until the driver drops it, which it does once the store has
/// reported the commit's result. The permit is released when both this and the session's
/// wait are over, so `max_concurrent_enrollments` also bounds the commits still in the
/// store's queue after their session has ended.
#[derive(Debug)]
pub struct CommitTicket {
    _permit: Arc<EnrollmentPermit>,
}

/// Who asked for which operation, for the audit rows written after the commit.
struct Exchange {
    op: Operation,
    peer: String,
    relay: Option<String>,
    device_id: String,
    /// The wall clock when the request arrived.
    at: SystemTime,
}

enum AfterCommit {
    /// A fresh issuance. Committed: answer `response` (built before the commit, so nothing
    /// can fail between a durable certificate and its answer). Already issued: answer with
    /// that certificate in `accept`, after auditing the replay.
    Issued {
        response: Response,
        serial_hex: String,
        accept: CertFormat,
    },
    /// The audit row of a replayed answer: answer `response` once it is recorded.
    Replayed {
        response: Response,
        serial_hex: String,
    },
    /// The audit row of a refusal: answer `response` whatever became of the row (as
    /// before: a refusal is not held back by a failing audit trail; the failure is logged).
    Refused { response: Response },
}

/// What the policy and the CA decided for an enrollment (a return value that lives for one
/// call: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Decision {
    /// A new certificate, with its answer already built.
    Issue {
        record: IssuedCert,
        audit: AuditEvent,
        response: Response,
        accept: CertFormat,
    },
    /// A retried request (same device, same request): the certificate already issued.
    Replay {
        existing: IssuedCert,
        accept: CertFormat,
    },
}

impl EstService {
    pub fn new(
        config: EstConfig,
        ca: IssuingCa,
        policy: Policy,
        store: Arc<dyn Store>,
    ) -> Result<Self, EstError> {
        let crts_pkcs7 = ca::certs_only(&[ca.certificate_der()])
            .map_err(|e| EstError::Internal(format!("building /crts: {e}")))?;
        let csrattrs = csrattrs::encode().map_err(|e| EstError::Internal(e.to_string()))?;
        let gate = EnrollmentGate::new(config.max_concurrent_enrollments);
        Ok(Self {
            counters: AtomicCounters::default(),
            config,
            ca,
            other_cas: Vec::new(),
            policy,
            store,
            gate,
            crts_pkcs7,
            csrattrs,
            crl: RwLock::new(None),
            crl_p384: RwLock::new(None),
        })
    }

    /// Add an issuing CA beside the main one (a P-384 CA beside the P-256 one): requests
    /// whose key is on its curve are issued by it, its LDevIDs may `/sren`, and `/crts`
    /// (PKCS#7) lists it after the main CA.
    pub fn add_issuing_ca(&mut self, ca: IssuingCa) -> Result<(), EstError> {
        let curve = ca
            .curve()
            .ok_or_else(|| EstError::Internal("issuing CA key is not P-256 or P-384".into()))?;
        if self.issuing_cas().any(|c| c.curve() == Some(curve)) {
            return Err(EstError::Internal(format!(
                "two issuing CAs on {curve}: only one per curve"
            )));
        }
        self.policy
            .add_operational_anchor(ca.certificate_der())
            .map_err(|e| EstError::Internal(format!("issuing CA anchor: {e}")))?;
        self.other_cas.push(ca);
        let ders: Vec<&[u8]> = self.issuing_cas().map(|c| c.certificate_der()).collect();
        self.crts_pkcs7 = ca::certs_only(&ders)
            .map_err(|e| EstError::Internal(format!("building /crts: {e}")))?;
        Ok(())
    }

    /// Every issuing CA: the main one first.
    pub fn issuing_cas(&self) -> impl Iterator<Item = &IssuingCa> {
        std::iter::once(&self.ca).chain(self.other_cas.iter())
    }

    /// The issuing CA for a request key on `curve`: the one whose key is on that curve; a
    /// P-256 key goes to the main CA when no CA is on P-256 (an HSM key of another kind).
    pub fn ca_for_curve(&self, curve: ca::Curve) -> Option<&IssuingCa> {
        self.issuing_cas()
            .find(|c| c.curve() == Some(curve))
            .or_else(|| (curve == ca::Curve::P256).then_some(&self.ca))
    }

    /// The issuing CA whose subject is `issuer`.
    fn ca_by_subject(&self, issuer: &ca::Name) -> &IssuingCa {
        self.issuing_cas()
            .find(|c| c.subject() == issuer)
            .unwrap_or(&self.ca)
    }

    pub fn config(&self) -> &EstConfig {
        &self.config
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The admission gate of enrollments (`max_concurrent_enrollments`), shared by every
    /// session of this service.
    pub fn gate(&self) -> &EnrollmentGate {
        &self.gate
    }

    /// Outcome counters since start.
    pub fn counters(&self) -> EstCounters {
        let c = &self.counters;
        EstCounters {
            issued: c.issued.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            overloaded: c.overloaded.load(Ordering::Relaxed),
            store_unavailable: c.store_unavailable.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            ca_unavailable: c.ca_unavailable.load(Ordering::Relaxed),
            refused_revoked: c.refused_revoked.load(Ordering::Relaxed),
            refusals_by_code: std::array::from_fn(|i| {
                c.refusals_by_code
                    .get(i)
                    .map_or(0, |a| a.load(Ordering::Relaxed))
            }),
        }
    }

    /// The issuing CA.
    pub fn ca(&self) -> &IssuingCa {
        &self.ca
    }

    /// Serve `der` at the CRL resource from now on (the driver calls it whenever a new CRL
    /// is published, by this process or another).
    pub fn set_crl(&self, der: Vec<u8>) {
        if let Ok(mut g) = self.crl.write() {
            *g = Some(Arc::new(der));
        }
    }

    /// The CRL being served.
    pub fn crl(&self) -> Option<Arc<Vec<u8>>> {
        self.crl.read().ok().and_then(|g| g.clone())
    }

    /// Serve `der`, the P-384 issuing CA's CRL, at `crl_p384_path` from now on.
    pub fn set_crl_p384(&self, der: Vec<u8>) {
        if let Ok(mut g) = self.crl_p384.write() {
            *g = Some(Arc::new(der));
        }
    }

    /// The P-384 issuing CA's CRL being served.
    pub fn crl_p384(&self) -> Option<Arc<Vec<u8>>> {
        self.crl_p384.read().ok().and_then(|g| g.clone())
    }

    /// Enrollments admitted and not yet answered (their commit may be in flight).
    pub fn in_flight(&self) -> usize {
        self.gate.in_use()
    }

    /// Serves one complete request as far as it can without storage I/O: an answer, or a
    /// commit to make durable first.
    pub(crate) fn begin<R: RngCore + CryptoRng>(
        &self,
        ctx: &RequestContext<'_>,
        req: &Request,
        rng: &mut R,
    ) -> Step {
        match self.route(ctx, req, rng) {
            Ok(step) => step,
            Err(e) => Step::Respond(self.error_response(ctx.peer, req, &e)),
        }
    }

    /// Continues an enrollment with the result of its commit.
    pub(crate) fn resume(&self, waiting: AwaitingCommit, result: CommitResult) -> Step {
        let AwaitingCommit {
            permit,
            exchange,
            then,
        } = waiting;
        match (then, result) {
            (
                AfterCommit::Issued {
                    response,
                    serial_hex,
                    ..
                },
                Ok(CommitOutcome::Committed),
            ) => {
                self.counters.issued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %exchange.peer, device = %exchange.device_id, op = exchange.op.name(), serial = %serial_hex, "certificate issued");
                Step::Respond(response)
            }
            (AfterCommit::Issued { .. }, Ok(CommitOutcome::Refused(reason))) => {
                // A block or revocation landed between the decision and the commit.
                let e = EstError::Forbidden(crate::policy::PolicyError::RevokedMeanwhile(reason));
                self.refusal(permit, exchange, e)
            }
            (AfterCommit::Issued { accept, .. }, Ok(CommitOutcome::AlreadyIssued(existing))) => {
                // Two retries raced: the first one's certificate is the answer.
                self.replay(permit, exchange, existing, accept)
            }
            (AfterCommit::Issued { .. }, Ok(CommitOutcome::ReplacedNotActive(status))) => {
                // Another re-enrollment of the device (on this node or another) superseded
                // the certificate this one authenticated with, after it was read: refused,
                // as it would have been had that one come first.
                let e: EstError =
                    crate::policy::PolicyError::CertificateNotActive(status.as_str()).into();
                self.refusal(permit, exchange, e)
            }
            (
                AfterCommit::Replayed {
                    response,
                    serial_hex,
                },
                Ok(_),
            ) => {
                self.counters.replayed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %exchange.peer, device = %exchange.device_id, serial = %serial_hex, "retried request answered with the certificate already issued");
                Step::Respond(response)
            }
            (AfterCommit::Refused { response }, result) => {
                if let Err(store_err) = result {
                    tracing::error!(%store_err, "could not record audit event");
                }
                Step::Respond(response)
            }
            (AfterCommit::Issued { .. } | AfterCommit::Replayed { .. }, Err(e)) => {
                // Nothing reaches the meter that is not durable: it is told to come back.
                let e = self.store_error(e);
                self.counters
                    .store_unavailable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %exchange.peer, device = %exchange.device_id, op = exchange.op.name(), error = ?e, "commit failed; answered 5.03");
                Step::Respond(e.to_response())
            }
        }
    }

    fn error_response(&self, peer: &str, req: &Request, e: &EstError) -> Response {
        if let EstError::Internal(detail) = e {
            tracing::error!(peer, path = %req.path_string(), %detail, "internal error");
        }
        e.to_response()
    }

    /// 5.03 + Max-Age when the store is unreachable (a meter retries later; nothing was
    /// issued to it), 5.00 when what it holds is corrupt.
    fn store_error(&self, e: StoreError) -> EstError {
        match e {
            StoreError::Backend(detail) => EstError::StoreUnavailable {
                retry_after_seconds: self.config.overload_retry_after_seconds,
                detail,
            },
            corrupt @ StoreError::Corrupt(_) => EstError::Internal(corrupt.to_string()),
        }
    }

    fn route<R: RngCore + CryptoRng>(
        &self,
        ctx: &RequestContext<'_>,
        req: &Request,
        rng: &mut R,
    ) -> Result<Step, EstError> {
        let path: Vec<&str> = req.path.iter().map(String::as_str).collect();
        match path.as_slice() {
            [".well-known", "core"] => {
                if req.method != Method::Get {
                    return Err(EstError::MethodNotAllowed);
                }
                check_accept(req, &[CF_LINK_FORMAT])?;
                let body = discovery::links(&self.config, self.config.server_keygen, &req.query);
                Ok(Step::Respond(
                    Response::new(ResponseType::Content).with_payload(CF_LINK_FORMAT, body),
                ))
            }
            p if path_is(p, &self.config.crl_path) => {
                self.crl_resource(req, self.crl()).map(Step::Respond)
            }
            p if path_is(p, &self.config.crl_p384_path) => {
                self.crl_resource(req, self.crl_p384()).map(Step::Respond)
            }
            [".well-known", "est", op] => {
                let op = Operation::from_segment(op).ok_or(EstError::NotFound)?;
                if matches!(op, Operation::Skg | Operation::Skc) && !self.config.server_keygen {
                    return Err(EstError::NotFound);
                }
                if req.method != op.method() {
                    return Err(EstError::MethodNotAllowed);
                }
                match op {
                    Operation::Crts => self.crts(req).map(Step::Respond),
                    Operation::Att => {
                        check_accept(req, &[CF_CSRATTRS])?;
                        Ok(Step::Respond(
                            Response::new(ResponseType::Content)
                                .with_payload(CF_CSRATTRS, self.csrattrs.clone()),
                        ))
                    }
                    _ => Ok(self.enrollment(ctx, op, req, rng)),
                }
            }
            _ => Err(EstError::NotFound),
        }
    }

    fn crts(&self, req: &Request) -> Result<Response, EstError> {
        match req.accept {
            None | Some(CF_PKCS7_CERTS_ONLY) => Ok(Response::new(ResponseType::Content)
                .with_payload(CF_PKCS7_CERTS_ONLY, self.crts_pkcs7.clone())),
            Some(CF_PKIX_CERT) => Ok(Response::new(ResponseType::Content)
                .with_payload(CF_PKIX_CERT, self.ca.certificate_der().to_vec())),
            // application/cose-c509-cert+cbor (C509 draft -20 §8.18): one certificate, the
            // main CA re-encoded as type 3 (as 287 gives its DER).
            Some(cf) if cf == self.config.c509_cert_content_format => {
                let body = cbor_schemas::c509::certificate_der_to_c509(self.ca.certificate_der())
                    .map_err(|e| EstError::Internal(format!("C509 /crts: {e}")))?;
                Ok(Response::new(ResponseType::Content).with_payload(cf, body))
            }
            // application/cose-c509+cbor: COSE_C509, a bag of every issuing CA (as 281 lists
            // them), each re-encoded as type 3.
            Some(cf) if cf == self.config.cose_c509_content_format => {
                let ders: Vec<Vec<u8>> = self
                    .issuing_cas()
                    .map(|c| c.certificate_der().to_vec())
                    .collect();
                let body = cbor_schemas::cose::cose_c509_chain_from_der(&ders)
                    .map_err(|e| EstError::Internal(format!("C509 /crts: {e}")))?;
                Ok(Response::new(ResponseType::Content).with_payload(cf, body))
            }
            Some(other) => Err(EstError::NotAcceptable(other)),
        }
    }

    /// GET of one of our CRLs (DER), as Content-Format `crl_content_format` (or 42 when
    /// asked).
    fn crl_resource(&self, req: &Request, crl: Option<Arc<Vec<u8>>>) -> Result<Response, EstError> {
        if req.method != Method::Get {
            return Err(EstError::MethodNotAllowed);
        }
        let cf = match req.accept {
            None => self.config.crl_content_format,
            Some(a) if a == self.config.crl_content_format || a == CF_OCTET_STREAM => a,
            Some(other) => return Err(EstError::NotAcceptable(other)),
        };
        match crl {
            Some(der) => Ok(Response::new(ResponseType::Content).with_payload(cf, der.to_vec())),
            None => Err(EstError::Overloaded {
                retry_after_seconds: self.config.overload_retry_after_seconds,
            }),
        }
    }

    /// The answer to a refused enrollment, after its `refused` audit row is committed.
    fn refusal(&self, permit: Arc<EnrollmentPermit>, exchange: Exchange, e: EstError) -> Step {
        self.count_refusal(&e);
        let response = e.to_response();
        let audit = AuditEvent {
            at_unix: unix_seconds(exchange.at),
            peer: exchange.peer.clone(),
            relay: exchange.relay.clone(),
            device_id: exchange.device_id.clone(),
            operation: exchange.op.name().to_string(),
            outcome: "refused".into(),
            code: e.code_text(),
            detail: e.to_string(),
        };
        tracing::info!(peer = %exchange.peer, device = %audit.device_id, op = exchange.op.name(), code = %audit.code, reason = %audit.detail, "enrollment refused");
        Step::Commit(
            Commit::Audit(audit),
            Box::new(AwaitingCommit {
                permit,
                exchange,
                then: AfterCommit::Refused { response },
            }),
        )
    }

    fn count_refusal(&self, e: &EstError) {
        use crate::policy::PolicyError as P;
        let c = &self.counters;
        let code = e.code_text();
        let i = REFUSAL_CODES
            .iter()
            .position(|k| *k == code)
            .unwrap_or(REFUSAL_CODES.len() - 1);
        if let Some(a) = c.refusals_by_code.get(i) {
            a.fetch_add(1, Ordering::Relaxed);
        }
        match e {
            EstError::RateLimited { .. } => c.rate_limited.fetch_add(1, Ordering::Relaxed),
            EstError::CaUnavailable { .. } => c.ca_unavailable.fetch_add(1, Ordering::Relaxed),
            EstError::Forbidden(
                P::DeviceBlocked | P::RevokedMeanwhile(_) | P::CertificateNotActive("revoked"),
            ) => {
                c.refused_revoked.fetch_add(1, Ordering::Relaxed);
                c.refused.fetch_add(1, Ordering::Relaxed)
            }
            _ => c.refused.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// sen / sren / skg / skc: admission first, before any other work (5.03 + Max-Age at
    /// the limit); then the policy and the CA; then every outcome but an overload or an
    /// unavailable store is written to the audit trail before it is answered.
    fn enrollment<R: RngCore + CryptoRng>(
        &self,
        ctx: &RequestContext<'_>,
        op: Operation,
        req: &Request,
        rng: &mut R,
    ) -> Step {
        let Some(permit) = self.gate.try_acquire().map(Arc::new) else {
            self.counters.overloaded.fetch_add(1, Ordering::Relaxed);
            return Step::Respond(
                EstError::Overloaded {
                    retry_after_seconds: self.config.overload_retry_after_seconds,
                }
                .to_response(),
            );
        };
        let mut exchange = Exchange {
            op,
            peer: ctx.peer.to_string(),
            relay: ctx.relay.map(str::to_string),
            device_id: String::new(),
            at: ctx.now,
        };
        match self.decide(ctx, op, req, rng, &mut exchange.device_id) {
            Ok(Decision::Issue {
                record,
                audit,
                response,
                accept,
            }) => {
                let then = AfterCommit::Issued {
                    response,
                    serial_hex: record.serial_hex.clone(),
                    accept,
                };
                Step::Commit(
                    Commit::Issuance {
                        cert: Box::new(record),
                        audit,
                    },
                    Box::new(AwaitingCommit {
                        permit,
                        exchange,
                        then,
                    }),
                )
            }
            Ok(Decision::Replay { existing, accept }) => {
                self.replay(permit, exchange, existing, accept)
            }
            Err(e @ EstError::StoreUnavailable { .. }) => {
                // Nowhere to write an audit row to; the log has it.
                self.counters
                    .store_unavailable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = ctx.peer, device = %exchange.device_id, op = op.name(), error = ?e, "store unavailable; answered 5.03");
                Step::Respond(e.to_response())
            }
            Err(e) => {
                if let EstError::Internal(detail) = &e {
                    tracing::error!(peer = ctx.peer, path = %req.path_string(), %detail, "internal error");
                }
                self.refusal(permit, exchange, e)
            }
        }
    }

    fn decide<R: RngCore + CryptoRng>(
        &self,
        ctx: &RequestContext<'_>,
        op: Operation,
        req: &Request,
        rng: &mut R,
        device_id_out: &mut String,
    ) -> Result<Decision, EstError> {
        let read = |e: StoreError| self.store_error(e);
        // 1. Who is this? /sen and server keygen take a manufacturer IDevID, /sren an
        //    LDevID of ours that is still the device's current certificate.
        let required = match op {
            Operation::Sren => AnchorClass::Operational,
            _ => AnchorClass::Manufacturer,
        };
        let device = self
            .policy
            .authenticate(required, ctx.client_chain, ctx.verified, ctx.now)?;
        device_id_out.clone_from(&device.device_id);
        let keygen = matches!(op, Operation::Skg | Operation::Skc);
        // Whether the device is blocked, and the certificate of a retried request (step 4),
        // in one read. Server keygen is never replayed (below); a request over the size
        // limit is refused at step 2 unhashed.
        let request_digest = (!keygen && req.payload.len() <= self.config.max_csr_bytes)
            .then(|| ca::csr_digest(&req.payload));
        let reads = self
            .store
            .enrollment_reads(&device.device_id, request_digest.as_ref())
            .map_err(read)?;
        if reads.blocked {
            return Err(crate::policy::PolicyError::DeviceBlocked.into());
        }
        if self.policy.config().require_device_allowlist
            && !self.store.device_allowed(&device.device_id).map_err(read)?
        {
            return Err(crate::policy::PolicyError::NotAllowlisted.into());
        }
        let replaces = if op == Operation::Sren {
            let current = self
                .store
                .find_by_serial(&device.certificate_serial_hex)
                .map_err(read)?
                .ok_or(crate::policy::PolicyError::UnknownCertificate)?;
            Some(current)
        } else {
            None
        };

        // 2. What is asked for, in which format?
        if req.payload.len() > self.config.max_csr_bytes {
            return Err(EstError::TooLarge {
                size: req.payload.len(),
                limit: self.config.max_csr_bytes,
            });
        }
        let csr = self.parse_request(req)?;
        let accept = self.response_format(op, req.accept, csr.format)?;

        // 3. Policy on the request itself.
        match op {
            Operation::Sren => {
                self.policy.check_reenroll_csr(
                    &device,
                    &csr.subject,
                    csr.hardware_module.as_ref(),
                )?;
            }
            _ => self
                .policy
                .check_enroll_csr_subject(&device, &csr.subject)?,
        }

        // The `dlms` profile (a device-class rule selects it): which certificate type the
        // CSR's keyUsage asks for, and the system title from the serial.
        let dlms = match self.policy.dlms_rule(&device.device_id) {
            Some(rule) => {
                let bad = |e: crate::dlms::DlmsError| EstError::BadRequest(format!("CSR: {e}"));
                rule.check_curve(ca::Curve::of_spki(&csr.public_key))
                    .map_err(bad)?;
                let kind = crate::dlms::DlmsCertType::from_requested(&csr.requested_extensions)
                    .map_err(bad)?;
                let title = rule
                    .system_title(&device.device_id)
                    .map_err(crate::policy::PolicyError::from)?;
                Some((kind, title))
            }
            None => None,
        };
        // A configured certificate profile (devices no dlms rule took): the key's curve
        // must be one it accepts. A re-enrollment keeps the profile the certificate being
        // renewed was issued under (recorded with it): the device now presents its LDevID,
        // which rules naming a manufacturer CA cannot match. If that profile is no longer
        // configured the renewal is refused (4.03) rather than issued under another profile
        // without the operator deciding so; the device can enroll again with its IDevID
        // (/sen), where today's rules choose. A certificate recorded without a profile (the
        // built-in one, or stored before profiles were recorded) is renewed under the rules.
        let profile = match (&dlms, &replaces) {
            (Some(_), _) => None,
            (None, Some(current)) if !current.profile.is_empty() => Some(
                self.policy
                    .config()
                    .profiles
                    .by_name(&current.profile)
                    .ok_or_else(|| {
                        crate::policy::PolicyError::Profile(format!(
                            "{:?} of the certificate being renewed is no longer configured; \
                             enroll at /sen",
                            current.profile
                        ))
                    })?,
            ),
            (None, _) => self.policy.profile(&device),
        };
        // Server-side key generation makes a P-256 key, or a P-384 one for a profile that
        // accepts P-384 keys and not P-256 ones.
        let keygen_curve = match profile {
            Some(p)
                if p.curves.contains(&ca::Curve::P384) && !p.curves.contains(&ca::Curve::P256) =>
            {
                ca::Curve::P384
            }
            _ => ca::Curve::P256,
        };
        if let Some(p) = profile {
            if !keygen {
                p.check_curve(ca::Curve::of_spki(&csr.public_key))
                    .map_err(|e| EstError::BadRequest(format!("CSR: {e}")))?;
            }
        }

        // 4. A retried request (same device, same CSR) gets the certificate already issued.
        //    Server keygen is excluded: its private key is never stored, so it cannot be
        //    replayed (the CoAP layer's deduplication covers retransmissions).
        //    (Read with the block above, by the digest of the payload: what `csr.digest` is for
        //    both request formats.)
        if let Some(existing) = reads.already_issued {
            if existing.status == CertStatus::Active && request_digest == Some(csr.digest) {
                return Ok(Decision::Replay { existing, accept });
            }
        }
        // Re-enrollment authenticated by a certificate that is no longer current (and
        // which was not the subject of a replay above) is refused.
        if let Some(current) = &replaces {
            if current.status != CertStatus::Active {
                return Err(crate::policy::PolicyError::CertificateNotActive(
                    current.status.as_str(),
                )
                .into());
            }
        }

        // 5. The CA for the key's curve must be able to sign now, and the device within
        //    its rate limit.
        let curve = if keygen {
            keygen_curve
        } else {
            ca::Curve::of_spki(&csr.public_key)
                .ok_or_else(|| EstError::BadRequest("CSR: key is neither P-256 nor P-384".into()))?
        };
        // The profile's signature hash names the CA; otherwise the CA on the key's curve.
        let ca_curve = profile.map_or(curve, |p| p.signature_hash.ca_curve(curve));
        let issuer = self.ca_for_curve(ca_curve).ok_or_else(|| {
            if ca_curve == curve {
                EstError::BadRequest(format!("CSR: no issuing CA for {curve} keys is configured"))
            } else {
                EstError::Internal(format!(
                    "no {ca_curve} issuing CA for the certificate profile"
                ))
            }
        })?;
        if let Err(detail) = issuer.check_validity(ctx.now) {
            tracing::error!(%detail, "issuing CA outside its validity: enrollments answered 5.03");
            return Err(EstError::CaUnavailable {
                retry_after_seconds: self.config.ca_unavailable_retry_after_seconds,
                detail,
            });
        }
        self.check_rate(&device.device_id, ctx.now)?;

        // 6. Issue.
        let (public_key, private_key) = if keygen {
            let (pkcs8, spki) = match keygen_curve {
                ca::Curve::P256 => {
                    let pkcs8 = ca::generate_p256_pkcs8(rng)
                        .map_err(|e| EstError::Internal(e.to_string()))?;
                    let spki = ca::p256_spki_from_pkcs8(&pkcs8);
                    (pkcs8, spki)
                }
                ca::Curve::P384 => {
                    let pkcs8 =
                        ca::generate_p384_pkcs8().map_err(|e| EstError::Internal(e.to_string()))?;
                    let spki = ca::spki_from_pkcs8(&pkcs8);
                    (pkcs8, spki)
                }
            };
            let spki = spki.map_err(|e| EstError::Internal(format!("generated key: {e}")))?;
            (spki, Some(pkcs8))
        } else {
            (csr.public_key.clone(), None)
        };
        let subject =
            match (&op, &replaces) {
                // RFC 7030 §4.2.2: the renewed certificate keeps its subject.
                (Operation::Sren, Some(_)) => device.subject.clone(),
                _ => match (&dlms, profile.and_then(|p| p.subject.as_ref())) {
                    (Some((_, title)), _) => self.policy.dlms_subject(&device, title)?,
                    (None, Some(template)) => template
                        .fill(&device.subject, &csr.subject)
                        .map_err(|e| match e {
                            crate::profile::FillError::IdevidField(_) => EstError::Forbidden(
                                crate::policy::PolicyError::Profile(e.to_string()),
                            ),
                            other => EstError::BadRequest(format!("CSR: {other}")),
                        })?,
                    (None, None) => self.policy.ldevid_subject(&device)?,
                },
            };
        let hardware_module = match profile {
            Some(p) => p.subject_alt_name(
                device.hardware_module.as_ref(),
                csr.hardware_module.as_ref(),
            )?,
            None => device.hardware_module.clone(),
        };
        let cfg = self.policy.config();
        let not_before = ctx
            .now
            .checked_sub(cfg.not_before_backdate)
            .unwrap_or(ctx.now);
        let not_after = ctx
            .now
            .checked_add(
                profile
                    .and_then(|p| p.validity)
                    .unwrap_or(cfg.ldevid_validity),
            )
            .ok_or_else(|| EstError::Internal("validity overflows".into()))?;
        // Never beyond the CA's own notAfter (the CA clamps; record what it signs).
        let not_after = issuer.effective_not_after(not_after);
        let serial = ca::random_serial(rng);
        let params = IssueParams {
            subject,
            public_key,
            hardware_module,
            serial,
            not_before,
            not_after,
            digital_signature: true,
            key_agreement: cfg.key_agreement,
            extended_key_usage_client_auth: true,
            extended_key_usage_server_auth: false,
            extended_key_usages: None,
        };
        let params = match dlms.map(|(kind, _)| kind) {
            None => match profile {
                None => params,
                Some(p) => IssueParams {
                    digital_signature: p.key_usage.digital_signature,
                    key_agreement: p.key_usage.key_agreement,
                    extended_key_usages: Some(p.extended_key_usage.clone()),
                    ..params
                },
            },
            // Gurux's checks: keyUsage exactly as the type says, EKU only on TLS ones.
            Some(kind) => {
                use crate::dlms::DlmsCertType as T;
                IssueParams {
                    digital_signature: matches!(kind, T::Signing | T::Tls),
                    key_agreement: matches!(kind, T::KeyAgreement | T::Tls),
                    extended_key_usage_client_auth: kind == T::Tls,
                    extended_key_usage_server_auth: kind == T::Tls,
                    ..params
                }
            }
        };
        let der = issuer
            .issue(&params)
            .map_err(|e| EstError::Internal(format!("issuing: {e}")))?;
        // 7. The answer, built now: once the certificate is durable nothing may fail
        //    between the commit and the meter.
        let response = self.certificate_response(op, &der, accept, private_key)?;
        let record = IssuedCert {
            serial_hex: hex::encode(params.serial.as_bytes()),
            device_id: device.device_id.clone(),
            subject: ca::name_string(&params.subject),
            // Keygen requests are never replayed (the key is not kept), so their record is
            // keyed by the certificate itself rather than the request.
            request_digest: if keygen {
                ca::csr_digest(&der)
            } else {
                csr.digest
            },
            der,
            not_before_unix: unix_seconds(not_before),
            not_after_unix: unix_seconds(not_after),
            issued_at_unix: unix_seconds(ctx.now),
            status: CertStatus::Active,
            kind: match op {
                Operation::Sren => IssuanceKind::Reenroll,
                Operation::Skg | Operation::Skc => IssuanceKind::ServerKeygen,
                _ => IssuanceKind::Enroll,
            },
            replaces_serial_hex: replaces.as_ref().map(|c| c.serial_hex.clone()),
            slot: dlms
                .map(|(kind, _)| kind.slot().to_owned())
                .unwrap_or_default(),
            profile: profile.map(|p| p.name.clone()).unwrap_or_default(),
        };
        let audit = AuditEvent {
            at_unix: unix_seconds(ctx.now),
            peer: ctx.peer.to_string(),
            relay: ctx.relay.map(str::to_string),
            device_id: device.device_id.clone(),
            operation: op.name().to_string(),
            outcome: "issued".into(),
            code: code_text(ResponseType::Changed),
            detail: match profile {
                Some(p) => format!("serial {} profile {}", record.serial_hex, p.name),
                None => format!("serial {}", record.serial_hex),
            },
        };
        // 8. Durable before the meter sees it: the caller asks for the commit.
        Ok(Decision::Issue {
            record,
            audit,
            response,
            accept,
        })
    }

    /// `[enrollment] max_per_device_per_period`: the certificates issued to the device in
    /// the sliding period, from the store (so it holds across restarts and servers).
    fn check_rate(&self, device_id: &str, now: SystemTime) -> Result<(), EstError> {
        let limit = self.config.max_enrollments_per_device;
        if limit == 0 {
            return Ok(());
        }
        let period = self.config.enrollment_period.as_secs();
        let now_unix = unix_seconds(now);
        let since = now_unix.saturating_sub(i64::try_from(period).unwrap_or(i64::MAX));
        let w = self
            .store
            .issued_since(device_id, since)
            .map_err(|e| self.store_error(e))?;
        if w.count < u64::from(limit) {
            return Ok(());
        }
        let oldest = w.oldest_unix.unwrap_or(now_unix);
        let wait = oldest
            .saturating_add(i64::try_from(period).unwrap_or(i64::MAX))
            .saturating_sub(now_unix)
            .max(1);
        Err(EstError::RateLimited {
            retry_after_seconds: u32::try_from(wait).unwrap_or(u32::MAX),
            limit,
            period_secs: period,
        })
    }

    /// The answer to a retried request, after its `replayed` audit row is committed.
    fn replay(
        &self,
        permit: Arc<EnrollmentPermit>,
        exchange: Exchange,
        existing: IssuedCert,
        accept: CertFormat,
    ) -> Step {
        let audit = AuditEvent {
            at_unix: unix_seconds(exchange.at),
            peer: exchange.peer.clone(),
            relay: exchange.relay.clone(),
            device_id: exchange.device_id.clone(),
            operation: exchange.op.name().to_string(),
            outcome: "replayed".into(),
            code: code_text(ResponseType::Changed),
            detail: format!("serial {}", existing.serial_hex),
        };
        let response = match self.certificate_response(exchange.op, &existing.der, accept, None) {
            Ok(r) => r,
            Err(e) => e.to_response(),
        };
        Step::Commit(
            Commit::Audit(audit),
            Box::new(AwaitingCommit {
                permit,
                exchange,
                then: AfterCommit::Replayed {
                    response,
                    serial_hex: existing.serial_hex,
                },
            }),
        )
    }

    /// Parse and check a certification request, PKCS#10 (CF 286) or C509
    /// (`application/cose-c509-pkcs10+cbor`), into one form: proof of possession verified.
    fn parse_request(&self, req: &Request) -> Result<Csr, EstError> {
        match req.content_format {
            Some(CF_PKCS10) => {
                let p = ca::parse_and_verify_csr(&req.payload, self.config.max_csr_bytes)
                    .map_err(|e| EstError::BadRequest(format!("CSR: {e}")))?;
                Ok(Csr {
                    digest: p.digest,
                    subject: p.subject,
                    public_key: p.public_key,
                    hardware_module: p.hardware_module,
                    requested_extensions: p.requested_extensions,
                    format: RequestFormat::Pkcs10,
                })
            }
            Some(cf) if cf == self.config.c509_pkcs10_content_format => {
                let bad =
                    |e: &dyn std::fmt::Display| EstError::BadRequest(format!("C509 CSR: {e}"));
                let c = C509Csr::decode(&req.payload).map_err(|e| bad(&e))?;
                c.verify_pop().map_err(|e| bad(&e))?;
                let hardware_module = match c.hardware_module_name() {
                    Some((hw_type, serial)) => {
                        Some(ca::HardwareModuleName::new(hw_type, &serial).map_err(|e| bad(&e))?)
                    }
                    None => None,
                };
                Ok(Csr {
                    digest: ca::csr_digest(&req.payload),
                    subject: c.subject().map_err(|e| bad(&e))?,
                    public_key: c.subject_public_key_info().map_err(|e| bad(&e))?,
                    hardware_module,
                    requested_extensions: Vec::new(),
                    format: RequestFormat::C509 {
                        native: i64::from(c.csr_type()) == cbor_schemas::c509::TYPE_NATIVE,
                    },
                })
            }
            other => Err(EstError::UnsupportedContentFormat(other)),
        }
    }

    /// Which representation to answer with, or 4.06 (RFC 9148 §4.3). Without Accept a
    /// PKCS#10 request gets PKCS#7 (281) and a C509 request gets a C509 certificate of
    /// the request's type (natively signed for a natively signed request), as the C509
    /// draft's EST section says.
    fn response_format(
        &self,
        op: Operation,
        accept: Option<u16>,
        request: RequestFormat,
    ) -> Result<CertFormat, EstError> {
        let native = matches!(request, RequestFormat::C509 { native: true });
        let c509 = CertFormat::C509 {
            native,
            cose: false,
        };
        match op {
            Operation::Skg | Operation::Skc => match accept {
                None | Some(CF_MULTIPART_CORE) => Ok(CertFormat::Multipart),
                Some(other) => Err(EstError::NotAcceptable(other)),
            },
            _ => match accept {
                None => Ok(match request {
                    RequestFormat::Pkcs10 => CertFormat::Pkcs7,
                    RequestFormat::C509 { .. } => c509,
                }),
                Some(CF_PKCS7_CERTS_ONLY) => Ok(CertFormat::Pkcs7),
                Some(CF_PKIX_CERT) => Ok(CertFormat::Pkix),
                Some(cf) if cf == self.config.c509_cert_content_format => Ok(c509),
                Some(cf) if cf == self.config.cose_c509_content_format => {
                    Ok(CertFormat::C509 { native, cose: true })
                }
                Some(other) => Err(EstError::NotAcceptable(other)),
            },
        }
    }

    fn certificate_response(
        &self,
        op: Operation,
        cert_der: &[u8],
        format: CertFormat,
        private_key: Option<Vec<u8>>,
    ) -> Result<Response, EstError> {
        let changed = Response::new(ResponseType::Changed);
        let internal = |e: &dyn std::fmt::Display| EstError::Internal(e.to_string());
        match (format, private_key) {
            (CertFormat::Multipart, Some(key)) => {
                // RFC 9148 §4.8 / Table 3: key as application/pkcs8 (284), the
                // certificate as 281 for /skg and 287 for /skc.
                let cert_part = if op == Operation::Skg {
                    (
                        CF_PKCS7_CERTS_ONLY,
                        ca::certs_only(&[cert_der]).map_err(|e| internal(&e))?,
                    )
                } else {
                    (CF_PKIX_CERT, cert_der.to_vec())
                };
                let body = cbor_schemas::multipart::encode(&[
                    (CF_PKCS8, key.as_slice()),
                    (cert_part.0, cert_part.1.as_slice()),
                ]);
                Ok(changed.with_payload(CF_MULTIPART_CORE, body))
            }
            (CertFormat::Multipart, None) => Err(EstError::Internal(
                "server keygen response without a key".into(),
            )),
            (CertFormat::Pkix, _) => Ok(changed.with_payload(CF_PKIX_CERT, cert_der.to_vec())),
            (CertFormat::Pkcs7, _) => {
                let p7 = ca::certs_only(&[cert_der]).map_err(|e| internal(&e))?;
                Ok(changed.with_payload(CF_PKCS7_CERTS_ONLY, p7))
            }
            (CertFormat::C509 { native, cose }, _) => {
                // Type 3: the exact DER certificate, re-encoded losslessly; type 2: signed
                // anew over the CBOR TBSCertificate. Both the array C509Certificate.
                let cert = if native {
                    self.sign_native(cert_der)?
                } else {
                    cbor_schemas::c509::certificate_der_to_c509(cert_der)
                        .map_err(|e| internal(&e))?
                };
                if cose {
                    let body =
                        cbor_schemas::cose::cose_c509_chain(&[cert]).map_err(|e| internal(&e))?;
                    Ok(changed.with_payload(self.config.cose_c509_content_format, body))
                } else {
                    Ok(changed.with_payload(self.config.c509_cert_content_format, cert))
                }
            }
        }
    }

    /// A natively signed (type 2) C509 certificate with the same content as the X.509
    /// certificate `cert_der` (which is what the store keeps): the CA signs the CBOR
    /// TBSCertificate. A replay of it carries the same content with a fresh ECDSA
    /// signature.
    fn sign_native(&self, cert_der: &[u8]) -> Result<Vec<u8>, EstError> {
        use der::Decode;
        let internal = |e: &dyn std::fmt::Display| EstError::Internal(format!("C509: {e}"));
        let cert = x509_cert::Certificate::from_der(cert_der).map_err(|e| internal(&e))?;
        let tbs = cbor_schemas::c509::tbs_from_x509(
            &cert.tbs_certificate,
            cbor_schemas::c509::TYPE_NATIVE,
        )
        .map_err(|e| internal(&e))?;
        let failure = std::cell::RefCell::new(None);
        let signer = self.ca_by_subject(&cert.tbs_certificate.issuer).signer();
        let native = cbor_schemas::c509::sign_native_certificate(&tbs, |msg| {
            signer.sign(msg).unwrap_or_else(|e| {
                *failure.borrow_mut() = Some(e.to_string());
                Vec::new()
            })
        });
        if let Some(f) = failure.into_inner() {
            return Err(EstError::Internal(format!("signing: {f}")));
        }
        native.map_err(|e| internal(&e))
    }
}

/// Encoding of the certification request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestFormat {
    Pkcs10,
    C509 { native: bool },
}

/// Representation of the certificate in the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CertFormat {
    /// 281
    Pkcs7,
    /// 287
    Pkix,
    /// Type 3 (re-encoded) or type 2 (natively signed) C509, as
    /// `application/cose-c509-cert+cbor` (the bare certificate) or, with `cose`, as
    /// `application/cose-c509+cbor` (COSE_C509 holding it).
    C509 { native: bool, cose: bool },
    /// 62, for server-side key generation.
    Multipart,
}

/// A certification request after parsing and proof-of-possession verification.
struct Csr {
    digest: [u8; 32],
    subject: ca::Name,
    public_key: spki::SubjectPublicKeyInfoOwned,
    hardware_module: Option<ca::HardwareModuleName>,
    /// The extensionRequest's extensions (PKCS#10 only): the `dlms` profile reads keyUsage.
    requested_extensions: Vec<x509_cert::ext::Extension>,
    format: RequestFormat,
}

/// 4.06 unless Accept is absent or one of `offered`.
fn check_accept(req: &Request, offered: &[u16]) -> Result<(), EstError> {
    match req.accept {
        Some(a) if !offered.contains(&a) => Err(EstError::NotAcceptable(a)),
        _ => Ok(()),
    }
}

/// The bound on enrollments in progress (`max_concurrent_enrollments`), shared by every
/// session of a service. A session takes a permit when an enrollment request arrives,
/// before any work or hand-off, and holds it until the answer is ready; the driver holds a
/// share of it ([`CommitTicket`]) until the store has reported the commit. So the store's
/// write queue is bounded by it too. Beyond it, 5.03 + Max-Age (RFC 9148 §5.7).
#[derive(Clone, Debug)]
pub struct EnrollmentGate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    in_use: AtomicUsize,
    limit: usize,
}

impl EnrollmentGate {
    /// A gate admitting at most `limit` enrollments at once (0 admits none).
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(GateInner {
                in_use: AtomicUsize::new(0),
                limit,
            }),
        }
    }

    /// A permit, or `None` at the limit. The permit is returned when dropped.
    pub fn try_acquire(&self) -> Option<EnrollmentPermit> {
        let inner = &self.inner;
        inner
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| EnrollmentPermit {
                inner: Arc::clone(inner),
            })
    }

    /// Permits held right now.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Acquire)
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }
}

/// One admitted enrollment; dropping it frees the slot.
#[derive(Debug)]
pub struct EnrollmentPermit {
    inner: Arc<GateInner>,
}

impl Drop for EnrollmentPermit {
    fn drop(&mut self) {
        self.inner.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
