//! The meter: a sans-IO state machine for one device's EST-coaps lifecycle (RFC 9148).
//!
//! ```text
//!  Unprovisioned --start--> Handshaking --connected--> [Discovering] --> FetchingCaCerts --> Enrolling
//!        ^                      |  failure                                               |  2.04 + verified
//!        |                 Waiting (backoff) <-- CoAP timeout / 5.00 / handshake error   v
//!        |                      |  5.03 + Max-Age: wait, then resend the identical CSR  Enrolled --renew--> Handshaking (LDevID)
//!        |                                                                               ^                  --> Renewing
//!   Failed(reason) <-- 4.xx, verification failure, attempts or 5.03 retries exhausted    +------------------------+
//! ```
//!
//! States are named after what the meter waits for. Time is an input (`now`), randomness (the
//! enrollment key, backoff jitter) comes from the meter's seed, and I/O is described by [`Action`]s
//! that a driver (the tokio runtime in [`crate::driver`], or a test) carries out:
//! `Connect` = run a DTLS handshake with the given credential, `Send` = hand a CoAP request to the
//! `est_proto::coap::Client` of the session, `Disconnect` = close the DTLS session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cbor_schemas::c509::{
    CONTENT_FORMAT_C509_CERT_DEFAULT as CF_C509_CERT,
    CONTENT_FORMAT_C509_PKCS10_DEFAULT as CF_C509_PKCS10,
    CONTENT_FORMAT_COSE_C509_DEFAULT as CF_COSE_C509,
};
use est_proto::coap::{ClientError, Method, Request, Response, ResponseType};
use est_proto::est::{code_text, CF_PKCS10, CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use x509_cert::Certificate;

use crate::pki::{self, DeviceIdentity, EnrollmentKey, PkiError, VerifyError};

/// The response format the meter asks for with Accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertFormat {
    /// application/pkcs7-mime; smime-type=certs-only (281), the RFC 9148 default.
    Pkcs7,
    /// application/pkix-cert (287): the single DER certificate.
    PkixCert,
    /// C509 (draft-ietf-cose-cbor-encoded-cert-20), certificates re-encoded as type 3:
    /// application/cose-c509-cert+cbor (one C509Certificate) from /sen and /sren,
    /// application/cose-c509+cbor (COSE_C509, a bag) from /crts.
    C509,
}

impl CertFormat {
    /// The Accept of /sen and /sren (one certificate).
    pub fn content_format(self) -> u16 {
        match self {
            CertFormat::Pkcs7 => CF_PKCS7_CERTS_ONLY,
            CertFormat::PkixCert => CF_PKIX_CERT,
            CertFormat::C509 => CF_C509_CERT,
        }
    }

    /// The Accept of /crts (the Explicit TA database: a bag for C509).
    pub fn crts_content_format(self) -> u16 {
        match self {
            CertFormat::C509 => CF_COSE_C509,
            other => other.content_format(),
        }
    }
}

/// When a meter asks `/crts` for its Explicit TA database (RFC 9148 §4.1, RFC 7030 §4.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CrtsMode {
    /// In every session, before /sen or /sren.
    Always,
    /// In the first session that enrolls; the answer is kept, so retries and renewals skip it.
    #[default]
    Once,
    /// Never: the meter holds its Explicit TA database already
    /// ([`MeterConfig::explicit_ta_der`], provisioned or kept from an earlier enrollment).
    Never,
}

/// Meter behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterConfig {
    /// Start with `GET /.well-known/core?rt=ace.est*` and use the discovered paths (RFC 9148 §4.1).
    pub discovery: bool,
    /// After enrolling, open a new session with the LDevID and re-enroll (/sren).
    pub renew: bool,
    pub accept: CertFormat,
    /// Send certification requests as C509 (CF 65004, type 3) instead of PKCS#10 (286).
    pub c509_requests: bool,
    /// Sessions (handshake + exchanges) tried before giving up on a retryable failure.
    pub max_attempts: u32,
    /// Backoff before session attempt k+1: `retry_backoff * 2^(k-1)`, plus up to 50% seeded jitter.
    pub retry_backoff: Duration,
    /// How many 5.03 + Max-Age answers the meter honours before giving up.
    pub max_busy_retries: u32,
    /// Cap on a single Max-Age wait (a server could ask for hours).
    pub max_retry_after: Duration,
    /// EST root path used without discovery (RFC 9148 §4.1 default `/.well-known/est`).
    pub est_root: String,
    /// When to fetch /crts.
    pub crts: CrtsMode,
    /// The Explicit TA database a [`CrtsMode::Never`] meter holds (DER), against which it
    /// verifies the certificates it is issued.
    pub explicit_ta_der: Vec<Vec<u8>>,
    /// Where the enrollment key pair comes from.
    pub key_source: KeySource,
}

/// Where a meter's enrollment key pair comes from. Either way every meter makes its own key and
/// signs its own CSR when it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeySource {
    /// The meter's seeded generator, with p256: the same seed gives the same key and CSR
    /// (simulations and their tests replay byte for byte).
    #[default]
    Seeded,
    /// The operating system's generator, with ring: a few times cheaper, not reproducible
    /// (the load generator, where the meters' own CPU competes with the server's).
    System,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            discovery: false,
            renew: false,
            accept: CertFormat::Pkcs7,
            c509_requests: false,
            max_attempts: 4,
            retry_backoff: Duration::from_secs(2),
            max_busy_retries: 8,
            max_retry_after: Duration::from_secs(120),
            est_root: "/.well-known/est".into(),
            crts: CrtsMode::Once,
            explicit_ta_der: Vec::new(),
            key_source: KeySource::Seeded,
        }
    }
}

/// Why a meter did not finish (or why one attempt failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum FailureReason {
    #[error("DTLS handshake timeout")]
    HandshakeTimeout,
    #[error("DTLS handshake failed: {0}")]
    HandshakeError(String),
    #[error("CoAP timeout on {0}")]
    CoapTimeout(String),
    #[error("CoAP error on {resource}: {error}")]
    CoapError { resource: String, error: String },
    #[error("{resource} answered {code}")]
    Rejected { resource: String, code: String },
    #[error("{0} kept answering 5.03 (retries exhausted)")]
    Busy(String),
    #[error("bad response from {resource}: {error}")]
    BadResponse { resource: String, error: String },
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("discovery: {0}")]
    Discovery(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("credentials: {0}")]
    Credentials(String),
}

impl FailureReason {
    /// A short, low-cardinality label for "failures by reason" tables.
    pub fn label(&self) -> String {
        match self {
            FailureReason::HandshakeTimeout => "handshake timeout".into(),
            FailureReason::HandshakeError(_) => "handshake error".into(),
            FailureReason::CoapTimeout(r) => format!("coap timeout {r}"),
            FailureReason::CoapError { resource, .. } => format!("coap error {resource}"),
            FailureReason::Rejected { resource, code } => format!("{code} {resource}"),
            FailureReason::Busy(r) => format!("5.03 exhausted {r}"),
            FailureReason::BadResponse { resource, .. } => format!("bad response {resource}"),
            FailureReason::Verification(_) => "verification failure".into(),
            FailureReason::Discovery(_) => "discovery failure".into(),
            FailureReason::Io(_) => "i/o error".into(),
            FailureReason::Credentials(_) => "credentials".into(),
        }
    }

    /// Whether a fresh session might succeed (transient network or server trouble).
    fn retryable(&self) -> bool {
        matches!(
            self,
            FailureReason::HandshakeTimeout
                | FailureReason::HandshakeError(_)
                | FailureReason::CoapTimeout(_)
                | FailureReason::CoapError { .. }
                | FailureReason::Io(_)
        ) || matches!(self, FailureReason::Rejected { code, .. } if code.starts_with("5."))
    }
}

/// Which credential authenticates a DTLS session (RFC 9148 §3: IDevID for /sen, LDevID for /sren).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    Enroll,
    Renew,
}

/// A client certificate chain (DER, leaf first) and its PKCS#8 private key.
#[derive(Clone)]
pub struct Credential {
    pub chain_der: Vec<Vec<u8>>,
    pub key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

/// What the driver must do next.
#[derive(Debug, Clone)]
pub enum Action {
    /// Run a DTLS handshake authenticated with `credential`, then call
    /// [`Meter::handle_connected`] or [`Meter::handle_connect_failed`].
    Connect {
        purpose: Purpose,
        credential: Credential,
    },
    /// Start this request on the session's CoAP client; report with [`Meter::handle_response`] or
    /// [`Meter::handle_request_failed`].
    Send(Request),
    /// Close the DTLS session (no reply expected).
    Disconnect,
}

/// The EST exchange a request belongs to: one resource the meter asks (RFC 9148 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EstExchange {
    Discover,
    CaCerts,
    Enroll,
    ReEnroll,
}

impl EstExchange {
    pub fn resource(self) -> &'static str {
        match self {
            EstExchange::Discover => "/.well-known/core",
            EstExchange::CaCerts => "/crts",
            EstExchange::Enroll => "/sen",
            EstExchange::ReEnroll => "/sren",
        }
    }
}

/// Meter states, named after what the meter waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterState {
    /// Not started.
    Unprovisioned,
    /// Waiting for the DTLS handshake.
    Handshaking { purpose: Purpose },
    /// Waiting for the /.well-known/core answer.
    Discovering,
    /// Waiting for /crts.
    FetchingCaCerts,
    /// Waiting for /sen.
    Enrolling,
    /// Waiting for /sren.
    Renewing,
    /// Waiting for a backoff (after a failed session) or a Max-Age (after 5.03) to pass.
    Waiting { until: Instant, then: Resume },
    /// Holding an LDevID; nothing left to do.
    Enrolled,
    /// Gave up.
    Failed(FailureReason),
}

/// What a [`MeterState::Waiting`] meter does when the wait is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Open a new session for this purpose.
    Reconnect(Purpose),
    /// Resend the request of this exchange on the current session (RFC 9148 §4.7: the identical
    /// CSR).
    Resend(EstExchange),
}

/// Timings and counters of one meter, for the fleet report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterStats {
    /// Sessions opened (handshakes attempted).
    pub handshakes: u32,
    pub handshakes_failed: u32,
    /// Duration of the last successful handshake.
    pub handshake_us: Option<u64>,
    /// From `start` to the verified LDevID (including retries and waits).
    pub enroll_us: Option<u64>,
    /// From the renewal session start to the verified renewed LDevID.
    pub renew_us: Option<u64>,
    /// 5.03 + Max-Age answers honoured.
    pub busy_retries: u32,
    /// Failures that led to a new session.
    pub session_retries: u32,
}

/// EST resource paths (from the default root or discovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstPaths {
    pub crts: Vec<String>,
    pub sen: Vec<String>,
    pub sren: Vec<String>,
}

impl EstPaths {
    pub fn under(root: &str) -> EstPaths {
        let base: Vec<String> = root
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let with = |leaf: &str| {
            let mut p = base.clone();
            p.push(leaf.to_owned());
            p
        };
        EstPaths {
            crts: with("crts"),
            sen: with("sen"),
            sren: with("sren"),
        }
    }
}

/// Parses an RFC 6690 link-format discovery answer for the ace.est.{crts,sen,sren} resources.
pub fn parse_discovery(body: &[u8], fallback: &EstPaths) -> Result<EstPaths, String> {
    let text = std::str::from_utf8(body).map_err(|_| "link-format is not UTF-8".to_string())?;
    let mut paths = fallback.clone();
    let mut found = 0;
    for link in text.split(',') {
        let link = link.trim();
        let Some(rest) = link.strip_prefix('<') else {
            continue;
        };
        let Some((uri, attrs)) = rest.split_once('>') else {
            continue;
        };
        // coaps://host:port/path -> path (a different port would need a new session; not supported).
        let path_part = match uri.split_once("://") {
            Some((_, after)) => after.find('/').map_or("", |i| &after[i..]),
            None => uri,
        };
        let segs: Vec<String> = path_part
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for attr in attrs.split(';') {
            let attr = attr.trim();
            let Some(rt) = attr.strip_prefix("rt=") else {
                continue;
            };
            // rt may carry several space-separated types.
            for t in rt.trim_matches('"').split(' ') {
                match t {
                    "ace.est.crts" => {
                        paths.crts = segs.clone();
                        found += 1;
                    }
                    "ace.est.sen" => {
                        paths.sen = segs.clone();
                        found += 1;
                    }
                    "ace.est.sren" => {
                        paths.sren = segs.clone();
                        found += 1;
                    }
                    _ => {}
                }
            }
        }
    }
    if found == 0 {
        return Err("no ace.est.* resource in the discovery answer".into());
    }
    Ok(paths)
}

/// One virtual meter.
pub struct Meter {
    config: MeterConfig,
    serial: String,
    idevid: Credential,
    key: EnrollmentKey,
    csr_der: Vec<u8>,
    /// The /sren request (subject and SAN of the LDevID), built after enrollment.
    renewal_csr_der: Option<Vec<u8>>,
    paths: EstPaths,
    state: MeterState,
    actions: VecDeque<Action>,
    rng: ChaCha8Rng,
    ca_certs: Vec<Certificate>,
    ca_certs_der: Vec<Vec<u8>>,
    ldevid: Option<Vec<u8>>,
    /// The LDevID's serialNumber, hex.
    ldevid_serial: Option<String>,
    renewed: bool,
    discovered: bool,
    attempts: u32,
    busy: u32,
    started: Option<Instant>,
    session_started: Option<Instant>,
    renew_started: Option<Instant>,
    /// The purpose of the current (or next) session.
    purpose: Purpose,
    stats: MeterStats,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("serial", &self.serial)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Meter {
    /// A meter with its factory identity. Generates the enrollment key pair from `seed` and builds
    /// the PKCS#10 request once (the same CSR is resent after 5.03, RFC 9148 §4.7).
    pub fn new(
        config: MeterConfig,
        identity: &DeviceIdentity,
        seed: u64,
    ) -> Result<Meter, PkiError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let key = match config.key_source {
            KeySource::Seeded => EnrollmentKey::generate(&mut rng),
            KeySource::System => EnrollmentKey::generate_system()?,
        };
        let csr_der = pki::build_csr(
            &key,
            &identity.serial,
            identity.cert_chain_der.first().map(Vec::as_slice),
        )?;
        let paths = EstPaths::under(&config.est_root);
        // A meter that never asks /crts holds its Explicit TA database from the start.
        let (ca_certs, ca_certs_der) = match config.crts {
            CrtsMode::Never => (
                pki::parse_ca_certs(&config.explicit_ta_der)
                    .map_err(|e| PkiError::TrustAnchors(e.to_string()))?,
                config.explicit_ta_der.clone(),
            ),
            _ => (Vec::new(), Vec::new()),
        };
        Ok(Meter {
            config,
            serial: identity.serial.clone(),
            idevid: Credential {
                chain_der: identity.cert_chain_der.clone(),
                key_pkcs8_der: identity.key_pkcs8_der.clone(),
            },
            key,
            csr_der,
            renewal_csr_der: None,
            paths,
            state: MeterState::Unprovisioned,
            actions: VecDeque::new(),
            rng,
            ca_certs,
            ca_certs_der,
            ldevid: None,
            ldevid_serial: None,
            renewed: false,
            discovered: false,
            attempts: 0,
            busy: 0,
            started: None,
            session_started: None,
            renew_started: None,
            purpose: Purpose::Enroll,
            stats: MeterStats::default(),
        })
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn state(&self) -> &MeterState {
        &self.state
    }

    pub fn stats(&self) -> &MeterStats {
        &self.stats
    }

    /// The verified LDevID (DER), once enrolled.
    pub fn ldevid(&self) -> Option<&[u8]> {
        self.ldevid.as_deref()
    }

    /// The serialNumber (hex) of [`Meter::ldevid`].
    pub fn ldevid_serial(&self) -> Option<&str> {
        self.ldevid_serial.as_deref()
    }

    /// Whether the LDevID came from a successful /sren.
    pub fn renewed(&self) -> bool {
        self.renewed
    }

    /// The CA certificates from /crts (the Explicit TA database).
    pub fn ca_certs_der(&self) -> &[Vec<u8>] {
        &self.ca_certs_der
    }

    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// The enrollment key's SubjectPublicKeyInfo (DER).
    pub fn public_key_spki(&self) -> &[u8] {
        &self.key.spki_der
    }

    /// Finished (enrolled or failed).
    pub fn is_done(&self) -> bool {
        matches!(self.state, MeterState::Enrolled | MeterState::Failed(_))
    }

    /// Begins the lifecycle: Unprovisioned -> Handshaking (IDevID).
    pub fn start(&mut self, now: Instant) {
        if self.state != MeterState::Unprovisioned {
            return;
        }
        self.started = Some(now);
        self.connect(now, Purpose::Enroll);
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            MeterState::Waiting { until, .. } => Some(until),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let MeterState::Waiting { until, then } = self.state else {
            return;
        };
        if now < until {
            return;
        }
        match then {
            Resume::Reconnect(purpose) => self.connect(now, purpose),
            Resume::Resend(step) => self.send(step),
        }
    }

    fn connect(&mut self, now: Instant, purpose: Purpose) {
        let credential = match purpose {
            Purpose::Enroll => self.idevid.clone(),
            Purpose::Renew => match (self.ldevid.clone(), self.key.pkcs8_der()) {
                (Some(cert), Ok(key)) => Credential {
                    chain_der: vec![cert],
                    key_pkcs8_der: key,
                },
                (None, _) => {
                    return self.fail(FailureReason::Credentials(
                        "renewal without an LDevID".into(),
                    ))
                }
                (_, Err(e)) => return self.fail(FailureReason::Credentials(e.to_string())),
            },
        };
        self.purpose = purpose;
        self.attempts += 1;
        self.stats.handshakes += 1;
        self.session_started = Some(now);
        self.state = MeterState::Handshaking { purpose };
        self.actions.push_back(Action::Connect {
            purpose,
            credential,
        });
    }

    /// The DTLS handshake finished: run the first EST step of this session.
    pub fn handle_connected(&mut self, now: Instant) {
        let MeterState::Handshaking { purpose } = self.state else {
            return;
        };
        if let Some(s) = self.session_started {
            self.stats.handshake_us = Some(micros(now.saturating_duration_since(s)));
        }
        // RFC 9148 §4.1: discovery first (optional); /crts before /sen so that the meter can
        // check what it receives against the Explicit TA database, which it keeps (RFC 9148
        // lets a client keep its explicit TA database) unless told to ask every time.
        let step = match (purpose, self.config.crts) {
            (Purpose::Enroll, _) if self.config.discovery && !self.discovered => {
                EstExchange::Discover
            }
            (_, CrtsMode::Always) => EstExchange::CaCerts,
            (Purpose::Enroll, CrtsMode::Once) if self.ca_certs.is_empty() => EstExchange::CaCerts,
            (Purpose::Enroll, _) => EstExchange::Enroll,
            (Purpose::Renew, _) => EstExchange::ReEnroll,
        };
        self.send(step);
    }

    pub fn handle_connect_failed(&mut self, now: Instant, reason: FailureReason) {
        if !matches!(self.state, MeterState::Handshaking { .. }) {
            return;
        }
        self.stats.handshakes_failed += 1;
        self.session_failed(now, reason);
    }

    fn request_for(&self, step: EstExchange) -> Request {
        let accept = Some(self.config.accept.content_format());
        match step {
            EstExchange::Discover => Request {
                method: Method::Get,
                path: vec![".well-known".into(), "core".into()],
                query: vec!["rt=ace.est*".into()],
                content_format: None,
                accept: None,
                payload: Vec::new(),
            },
            EstExchange::CaCerts => Request {
                method: Method::Get,
                path: self.paths.crts.clone(),
                query: Vec::new(),
                content_format: None,
                accept: Some(self.config.accept.crts_content_format()),
                payload: Vec::new(),
            },
            EstExchange::Enroll | EstExchange::ReEnroll => Request {
                method: Method::Post,
                path: if step == EstExchange::Enroll {
                    self.paths.sen.clone()
                } else {
                    self.paths.sren.clone()
                },
                query: Vec::new(),
                content_format: Some(if self.config.c509_requests {
                    CF_C509_PKCS10
                } else {
                    CF_PKCS10
                }),
                accept,
                payload: self.encode_request(match (step, &self.renewal_csr_der) {
                    (EstExchange::ReEnroll, Some(r)) => r,
                    _ => &self.csr_der,
                }),
            },
        }
    }

    fn send(&mut self, step: EstExchange) {
        self.state = match step {
            EstExchange::Discover => MeterState::Discovering,
            EstExchange::CaCerts => MeterState::FetchingCaCerts,
            EstExchange::Enroll => MeterState::Enrolling,
            EstExchange::ReEnroll => MeterState::Renewing,
        };
        let req = self.request_for(step);
        self.actions.push_back(Action::Send(req));
    }

    /// The EST exchange the meter waits for, if any.
    pub fn exchange(&self) -> Option<EstExchange> {
        self.current_step()
    }

    fn current_step(&self) -> Option<EstExchange> {
        match self.state {
            MeterState::Discovering => Some(EstExchange::Discover),
            MeterState::FetchingCaCerts => Some(EstExchange::CaCerts),
            MeterState::Enrolling => Some(EstExchange::Enroll),
            MeterState::Renewing => Some(EstExchange::ReEnroll),
            _ => None,
        }
    }

    /// The CoAP client gave up on the outstanding request.
    pub fn handle_request_failed(&mut self, now: Instant, error: ClientError) {
        let Some(step) = self.current_step() else {
            return;
        };
        let reason = match error {
            ClientError::Timeout => FailureReason::CoapTimeout(step.resource().into()),
            e => FailureReason::CoapError {
                resource: step.resource().into(),
                error: e.to_string(),
            },
        };
        self.actions.push_back(Action::Disconnect);
        self.session_failed(now, reason);
    }

    /// A transport error on the established session (the DTLS connection closed).
    pub fn handle_session_lost(&mut self, now: Instant, error: String) {
        if self.current_step().is_none() {
            return;
        }
        self.actions.push_back(Action::Disconnect);
        self.session_failed(now, FailureReason::Io(error));
    }

    /// The final CoAP response to the outstanding request.
    pub fn handle_response(&mut self, now: Instant, response: Response) {
        let Some(step) = self.current_step() else {
            return;
        };
        let resource = step.resource().to_string();
        match response.code {
            // RFC 9148 §4.7 / Table 4: 5.03 + Max-Age = retry (the identical request) after Max-Age.
            ResponseType::ServiceUnavailable => {
                self.busy += 1;
                if self.busy > self.config.max_busy_retries {
                    self.actions.push_back(Action::Disconnect);
                    return self.fail(FailureReason::Busy(resource));
                }
                self.stats.busy_retries += 1;
                // RFC 7252 §5.10.5: Max-Age defaults to 60 s.
                let wait = Duration::from_secs(u64::from(response.max_age.unwrap_or(60)))
                    .min(self.config.max_retry_after);
                self.state = MeterState::Waiting {
                    until: now + wait,
                    then: Resume::Resend(step),
                };
                return;
            }
            ResponseType::Content | ResponseType::Changed => {}
            other => {
                let reason = FailureReason::Rejected {
                    resource,
                    code: code_text(other),
                };
                self.actions.push_back(Action::Disconnect);
                return self.session_failed(now, reason);
            }
        }
        match step {
            EstExchange::Discover => match parse_discovery(&response.payload, &self.paths) {
                Ok(p) => {
                    self.paths = p;
                    self.discovered = true;
                    let next = match self.config.crts {
                        CrtsMode::Once if !self.ca_certs.is_empty() => EstExchange::Enroll,
                        CrtsMode::Never => EstExchange::Enroll,
                        _ => EstExchange::CaCerts,
                    };
                    self.send(next);
                }
                Err(e) => {
                    self.actions.push_back(Action::Disconnect);
                    self.fail(FailureReason::Discovery(e));
                }
            },
            EstExchange::CaCerts => match self.certs_of(&response) {
                Ok(der) => match pki::parse_ca_certs(&der) {
                    Ok(certs) => {
                        self.ca_certs = certs;
                        self.ca_certs_der = der;
                        self.send(match self.purpose {
                            Purpose::Enroll => EstExchange::Enroll,
                            Purpose::Renew => EstExchange::ReEnroll,
                        });
                    }
                    Err(e) => {
                        self.actions.push_back(Action::Disconnect);
                        self.fail(FailureReason::Verification(e.to_string()));
                    }
                },
                Err(e) => {
                    self.actions.push_back(Action::Disconnect);
                    self.fail(FailureReason::BadResponse { resource, error: e });
                }
            },
            EstExchange::Enroll | EstExchange::ReEnroll => {
                let verified = self
                    .certs_of(&response)
                    .map_err(|e| FailureReason::BadResponse {
                        resource: resource.clone(),
                        error: e,
                    });
                let verified = verified.and_then(|certs| {
                    pki::verify_issued(&certs, &self.key.spki_der, &self.ca_certs)
                        .map_err(|e: VerifyError| FailureReason::Verification(e.to_string()))
                });
                self.actions.push_back(Action::Disconnect);
                match verified {
                    Ok(pki::IssuedLeaf {
                        der: leaf,
                        serial_hex,
                    }) => {
                        self.ldevid = Some(leaf.clone());
                        self.ldevid_serial = Some(serial_hex);
                        self.busy = 0;
                        if step == EstExchange::Enroll {
                            if let Some(s) = self.started {
                                self.stats.enroll_us =
                                    Some(micros(now.saturating_duration_since(s)));
                            }
                            if self.config.renew {
                                // RFC 7030 §4.2.2: the /sren request carries the subject and SAN
                                // of the certificate being renewed.
                                match pki::build_renewal_csr(&self.key, &leaf) {
                                    Ok(csr) => self.renewal_csr_der = Some(csr),
                                    Err(e) => {
                                        self.ldevid = Some(leaf);
                                        return self
                                            .fail(FailureReason::Credentials(e.to_string()));
                                    }
                                }
                                self.attempts = 0;
                                self.renew_started = Some(now);
                                return self.connect(now, Purpose::Renew);
                            }
                        } else {
                            self.renewed = true;
                            if let Some(s) = self.renew_started {
                                self.stats.renew_us =
                                    Some(micros(now.saturating_duration_since(s)));
                            }
                        }
                        self.state = MeterState::Enrolled;
                    }
                    Err(reason) => self.fail(reason),
                }
            }
        }
    }

    /// The request payload: the PKCS#10 DER, or its lossless C509 type-3 re-encoding.
    fn encode_request(&self, csr_der: &[u8]) -> Vec<u8> {
        if self.config.c509_requests {
            // Our own CSRs are canonical DER within the C509 profile; should conversion
            // ever fail, sending the DER makes the server answer 4.00 visibly.
            cbor_schemas::c509::csr_der_to_c509(csr_der).unwrap_or_else(|_| csr_der.to_vec())
        } else {
            csr_der.to_vec()
        }
    }

    /// The certificates in a /crts, /sen or /sren answer, by Content-Format.
    fn certs_of(&self, response: &Response) -> Result<Vec<Vec<u8>>, String> {
        match response.content_format {
            Some(CF_PKIX_CERT) => Ok(vec![response.payload.clone()]),
            Some(CF_C509_CERT) => cbor_schemas::c509::certificate_c509_to_der(&response.payload)
                .map(|der| vec![der])
                .map_err(|e| e.to_string()),
            Some(CF_COSE_C509) => {
                let c509 = cbor_schemas::cose::decode_cose_c509(&response.payload)
                    .map_err(|e| e.to_string())?;
                c509.iter()
                    .map(|c| {
                        cbor_schemas::c509::certificate_c509_to_der(c).map_err(|e| e.to_string())
                    })
                    .collect()
            }
            // RFC 9148 §4.3: 281 is the default when the server sends no Content-Format.
            Some(CF_PKCS7_CERTS_ONLY) | None => {
                est_proto::ca::certs_from_certs_only(&response.payload).map_err(|e| e.to_string())
            }
            Some(other) => Err(format!("unexpected Content-Format {other}")),
        }
    }

    fn session_failed(&mut self, now: Instant, reason: FailureReason) {
        if !reason.retryable() || self.attempts >= self.config.max_attempts {
            return self.fail(reason);
        }
        self.stats.session_retries += 1;
        // Exponential backoff with up to 50% jitter from the meter's seed, so that a fleet that
        // failed together does not retry in lockstep.
        let exp = self.attempts.saturating_sub(1).min(16);
        let base = self.config.retry_backoff.saturating_mul(1u32 << exp);
        let jitter = base.mul_f64(self.rng.gen_range(0.0..0.5));
        self.state = MeterState::Waiting {
            until: now + base + jitter,
            then: Resume::Reconnect(self.purpose),
        };
    }

    fn fail(&mut self, reason: FailureReason) {
        self.state = MeterState::Failed(reason);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod virtual_time;
