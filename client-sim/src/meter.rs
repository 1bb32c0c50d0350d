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

use est_proto::coap::{ClientError, Method, Request, Response, ResponseType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use x509_cert::Certificate;

use crate::pki::{self, DeviceIdentity, EnrollmentKey, PkiError, VerifyError};

/// CoAP Content-Format numbers (RFC 9148 §4.1 / IANA).
pub mod content_format {
    pub const LINK_FORMAT: u16 = 40;
    pub const PKCS7_CERTS_ONLY: u16 = 281;
    pub const PKCS10: u16 = 286;
    pub const PKIX_CERT: u16 = 287;
    /// application/cose-c509-cert (draft-ietf-cose-cbor-encoded-cert; experimental number).
    pub const C509_CERT: u16 = cbor_schemas::c509::CONTENT_FORMAT_C509_CERT_DEFAULT;
    /// application/cose-c509-pkcs10 (experimental number).
    pub const C509_PKCS10: u16 = cbor_schemas::c509::CONTENT_FORMAT_C509_PKCS10_DEFAULT;
}

/// The response format the meter asks for with Accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertFormat {
    /// application/pkcs7-mime; smime-type=certs-only (281), the RFC 9148 default.
    Pkcs7,
    /// application/pkix-cert (287): the single DER certificate.
    PkixCert,
    /// application/cose-c509-cert: COSE_C509, certificates re-encoded as C509 type 3.
    C509,
}

impl CertFormat {
    pub fn content_format(self) -> u16 {
        match self {
            CertFormat::Pkcs7 => content_format::PKCS7_CERTS_ONLY,
            CertFormat::PkixCert => content_format::PKIX_CERT,
            CertFormat::C509 => content_format::C509_CERT,
        }
    }
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

/// The EST step a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    Discover,
    CaCerts,
    Enroll,
    ReEnroll,
}

impl Step {
    pub fn resource(self) -> &'static str {
        match self {
            Step::Discover => "/.well-known/core",
            Step::CaCerts => "/crts",
            Step::Enroll => "/sen",
            Step::ReEnroll => "/sren",
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
    /// Resend the request of this step on the current session (RFC 9148 §4.7: the identical CSR).
    Resend(Step),
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

/// Renders a CoAP response code as "4.03".
pub fn code_string(code: ResponseType) -> String {
    let (c, d) = code_class_detail(code);
    format!("{c}.{d:02}")
}

fn code_class_detail(code: ResponseType) -> (u8, u8) {
    let raw = coap_lite::MessageClass::Response(code);
    let byte: u8 = raw.into();
    (byte >> 5, byte & 0x1f)
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
        let key = EnrollmentKey::generate(&mut rng);
        let csr_der = pki::build_csr(
            &key,
            &identity.serial,
            identity.cert_chain_der.first().map(Vec::as_slice),
        )?;
        let paths = EstPaths::under(&config.est_root);
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
            ca_certs: Vec::new(),
            ca_certs_der: Vec::new(),
            ldevid: None,
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
        let step = match purpose {
            Purpose::Renew => Step::ReEnroll,
            // RFC 9148 §4.1: discovery first (optional); /crts before /sen so that the meter can
            // check what it receives against the Explicit TA database.
            Purpose::Enroll if self.config.discovery && !self.discovered => Step::Discover,
            Purpose::Enroll if self.ca_certs.is_empty() => Step::CaCerts,
            Purpose::Enroll => Step::Enroll,
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

    fn request_for(&self, step: Step) -> Request {
        let accept = Some(self.config.accept.content_format());
        match step {
            Step::Discover => Request {
                method: Method::Get,
                path: vec![".well-known".into(), "core".into()],
                query: vec!["rt=ace.est*".into()],
                content_format: None,
                accept: None,
                payload: Vec::new(),
            },
            Step::CaCerts => Request {
                method: Method::Get,
                path: self.paths.crts.clone(),
                query: Vec::new(),
                content_format: None,
                accept,
                payload: Vec::new(),
            },
            Step::Enroll | Step::ReEnroll => Request {
                method: Method::Post,
                path: if step == Step::Enroll {
                    self.paths.sen.clone()
                } else {
                    self.paths.sren.clone()
                },
                query: Vec::new(),
                content_format: Some(if self.config.c509_requests {
                    content_format::C509_PKCS10
                } else {
                    content_format::PKCS10
                }),
                accept,
                payload: self.encode_request(match (step, &self.renewal_csr_der) {
                    (Step::ReEnroll, Some(r)) => r,
                    _ => &self.csr_der,
                }),
            },
        }
    }

    fn send(&mut self, step: Step) {
        self.state = match step {
            Step::Discover => MeterState::Discovering,
            Step::CaCerts => MeterState::FetchingCaCerts,
            Step::Enroll => MeterState::Enrolling,
            Step::ReEnroll => MeterState::Renewing,
        };
        let req = self.request_for(step);
        self.actions.push_back(Action::Send(req));
    }

    fn current_step(&self) -> Option<Step> {
        match self.state {
            MeterState::Discovering => Some(Step::Discover),
            MeterState::FetchingCaCerts => Some(Step::CaCerts),
            MeterState::Enrolling => Some(Step::Enroll),
            MeterState::Renewing => Some(Step::ReEnroll),
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
                    code: code_string(other),
                };
                self.actions.push_back(Action::Disconnect);
                return self.session_failed(now, reason);
            }
        }
        match step {
            Step::Discover => match parse_discovery(&response.payload, &self.paths) {
                Ok(p) => {
                    self.paths = p;
                    self.discovered = true;
                    self.send(Step::CaCerts);
                }
                Err(e) => {
                    self.actions.push_back(Action::Disconnect);
                    self.fail(FailureReason::Discovery(e));
                }
            },
            Step::CaCerts => match self.certs_of(&response) {
                Ok(der) => match pki::parse_ca_certs(&der) {
                    Ok(certs) => {
                        self.ca_certs = certs;
                        self.ca_certs_der = der;
                        self.send(Step::Enroll);
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
            Step::Enroll | Step::ReEnroll => {
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
                    Ok(leaf) => {
                        self.ldevid = Some(leaf.clone());
                        self.busy = 0;
                        if step == Step::Enroll {
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
            Some(content_format::PKIX_CERT) => Ok(vec![response.payload.clone()]),
            Some(content_format::C509_CERT) => {
                let c509 = cbor_schemas::cose::decode_cose_c509(&response.payload)
                    .map_err(|e| e.to_string())?;
                c509.iter()
                    .map(|c| {
                        cbor_schemas::c509::certificate_c509_to_der(c).map_err(|e| e.to_string())
                    })
                    .collect()
            }
            // RFC 9148 §4.3: 281 is the default when the server sends no Content-Format.
            Some(content_format::PKCS7_CERTS_ONLY) | None => {
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
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testutil::FakeEst;

    fn t0() -> Instant {
        Instant::now()
    }

    fn expect_connect(m: &mut Meter) -> (Purpose, Credential) {
        match m.poll_action() {
            Some(Action::Connect {
                purpose,
                credential,
            }) => (purpose, credential),
            other => panic!("expected Connect, got {other:?}"),
        }
    }

    fn expect_send(m: &mut Meter) -> Request {
        match m.poll_action() {
            Some(Action::Send(r)) => r,
            other => panic!("expected Send, got {other:?}"),
        }
    }

    fn expect_disconnect(m: &mut Meter) {
        assert!(matches!(m.poll_action(), Some(Action::Disconnect)));
    }

    /// Answers every Send with the fake server until the meter stops sending.
    fn serve(m: &mut Meter, est: &mut FakeEst, now: Instant) {
        while let Some(a) = m.poll_action() {
            if let Action::Send(r) = a {
                let resp = est.handle(&r);
                m.handle_response(now, resp);
            }
        }
    }

    #[test]
    fn enrolls_with_crts_then_sen_and_verifies() {
        let mut est = FakeEst::new(1);
        let dev = est.device("SN000001");
        let mut m = Meter::new(MeterConfig::default(), &dev, 42).unwrap();
        assert_eq!(m.state(), &MeterState::Unprovisioned);
        let now = t0();
        m.start(now);
        let (purpose, cred) = expect_connect(&mut m);
        assert_eq!(purpose, Purpose::Enroll);
        assert_eq!(cred.chain_der, dev.cert_chain_der);
        assert_eq!(
            m.state(),
            &MeterState::Handshaking {
                purpose: Purpose::Enroll
            }
        );
        m.handle_connected(now + Duration::from_millis(800));
        assert_eq!(m.stats().handshake_us, Some(800_000));
        let crts = expect_send(&mut m);
        assert_eq!(crts.method, Method::Get);
        assert_eq!(crts.path, vec![".well-known", "est", "crts"]);
        assert_eq!(crts.accept, Some(281));
        assert_eq!(m.state(), &MeterState::FetchingCaCerts);
        m.handle_response(now, est.handle(&crts));
        let sen = expect_send(&mut m);
        assert_eq!(m.state(), &MeterState::Enrolling);
        assert_eq!(sen.method, Method::Post);
        assert_eq!(sen.path, vec![".well-known", "est", "sen"]);
        assert_eq!(sen.content_format, Some(286));
        assert_eq!(sen.payload, m.csr_der());
        m.handle_response(now + Duration::from_secs(2), est.handle(&sen));
        expect_disconnect(&mut m);
        assert_eq!(m.state(), &MeterState::Enrolled);
        assert_eq!(m.ldevid(), Some(est.issued[0].as_slice()));
        assert_eq!(m.stats().enroll_us, Some(2_000_000));
        assert_eq!(m.ca_certs_der(), &[est.ca_der.clone()]);
        // The CSR carried the IDevID's serialNumber and hardwareModuleName.
        let csr = est_proto::ca::parse_and_verify_csr(m.csr_der(), 4096).unwrap();
        assert_eq!(
            est_proto::ca::serial_number_attr(&csr.subject).as_deref(),
            Some("SN000001")
        );
        assert!(csr.hardware_module.is_some());
        assert!(m.poll_action().is_none());
    }

    #[test]
    fn discovery_paths_are_used() {
        let mut est = FakeEst::new(2);
        let dev = est.device("SN000002");
        let cfg = MeterConfig {
            discovery: true,
            accept: CertFormat::PkixCert,
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, 1).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        let disc = expect_send(&mut m);
        assert_eq!(disc.path, vec![".well-known", "core"]);
        assert_eq!(disc.query, vec!["rt=ace.est*"]);
        assert_eq!(m.state(), &MeterState::Discovering);
        m.handle_response(now, est.handle(&disc));
        let crts = expect_send(&mut m);
        assert_eq!(crts.path, vec!["est", "crts"]);
        assert_eq!(crts.accept, Some(287));
        m.handle_response(now, est.handle(&crts));
        let sen = expect_send(&mut m);
        assert_eq!(sen.path, vec!["est", "sen"]);
        m.handle_response(now, est.handle(&sen));
        assert_eq!(m.state(), &MeterState::Enrolled);
    }

    #[test]
    fn service_unavailable_waits_max_age_and_resends_identical_csr() {
        let mut est = FakeEst::new(3);
        est.busy_first = 2;
        est.busy_max_age = 7;
        let dev = est.device("SN000003");
        let mut m = Meter::new(MeterConfig::default(), &dev, 3).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        let crts = expect_send(&mut m);
        m.handle_response(now, est.handle(&crts));
        let sen = expect_send(&mut m);
        m.handle_response(now, est.handle(&sen));
        // RFC 9148 §4.7: wait Max-Age, on the same session.
        assert_eq!(
            m.state(),
            &MeterState::Waiting {
                until: now + Duration::from_secs(7),
                then: Resume::Resend(Step::Enroll)
            }
        );
        assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(7)));
        assert!(m.poll_action().is_none());
        m.handle_timeout(now + Duration::from_secs(6));
        assert!(m.poll_action().is_none(), "too early");
        let t1 = now + Duration::from_secs(7);
        m.handle_timeout(t1);
        let again = expect_send(&mut m);
        assert_eq!(again.payload, sen.payload, "identical CSR");
        m.handle_response(t1, est.handle(&again));
        let t2 = t1 + Duration::from_secs(7);
        m.handle_timeout(t2);
        let third = expect_send(&mut m);
        m.handle_response(t2, est.handle(&third));
        expect_disconnect(&mut m);
        assert_eq!(m.state(), &MeterState::Enrolled);
        assert_eq!(m.stats().busy_retries, 2);
        assert_eq!(est.csrs.len(), 3);
        assert!(est.csrs.iter().all(|c| c == &est.csrs[0]));
    }

    #[test]
    fn busy_retries_are_bounded() {
        let mut est = FakeEst::new(4);
        est.busy_first = 100;
        let dev = est.device("SN000004");
        let cfg = MeterConfig {
            max_busy_retries: 2,
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, 4).unwrap();
        let mut now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        for _ in 0..10 {
            serve(&mut m, &mut est, now);
            if let Some(t) = m.poll_timeout() {
                now = t;
                m.handle_timeout(now);
            }
        }
        assert_eq!(
            m.state(),
            &MeterState::Failed(FailureReason::Busy("/sen".into()))
        );
        assert_eq!(est.csrs.len(), 3);
    }

    #[test]
    fn coap_timeout_reconnects_after_backoff_and_skips_crts() {
        let mut est = FakeEst::new(5);
        let dev = est.device("SN000005");
        let cfg = MeterConfig {
            retry_backoff: Duration::from_secs(2),
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, 5).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        let crts = expect_send(&mut m);
        m.handle_response(now, est.handle(&crts));
        let _sen = expect_send(&mut m);
        m.handle_request_failed(now, ClientError::Timeout);
        expect_disconnect(&mut m);
        let MeterState::Waiting { until, then } = m.state().clone() else {
            panic!("expected Waiting, got {:?}", m.state())
        };
        assert_eq!(then, Resume::Reconnect(Purpose::Enroll));
        // 2 s * 2^0 plus up to 50% jitter.
        let wait = until - now;
        assert!(
            wait >= Duration::from_secs(2) && wait < Duration::from_secs(3),
            "{wait:?}"
        );
        m.handle_timeout(until);
        expect_connect(&mut m);
        m.handle_connected(until);
        let sen = expect_send(&mut m);
        assert_eq!(
            sen.path.last().map(String::as_str),
            Some("sen"),
            "CA certs kept"
        );
        m.handle_response(until, est.handle(&sen));
        assert_eq!(m.state(), &MeterState::Enrolled);
        assert_eq!(m.stats().session_retries, 1);
        assert_eq!(m.stats().handshakes, 2);
    }

    #[test]
    fn handshake_failures_exhaust_attempts() {
        let mut est = FakeEst::new(6);
        let dev = est.device("SN000006");
        let cfg = MeterConfig {
            max_attempts: 3,
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, 6).unwrap();
        let mut now = t0();
        m.start(now);
        let mut connects = 0;
        loop {
            while let Some(a) = m.poll_action() {
                if matches!(a, Action::Connect { .. }) {
                    connects += 1;
                    m.handle_connect_failed(now, FailureReason::HandshakeTimeout);
                }
            }
            match m.poll_timeout() {
                Some(t) => {
                    now = t;
                    m.handle_timeout(now);
                }
                None => break,
            }
        }
        assert_eq!(connects, 3);
        assert_eq!(
            m.state(),
            &MeterState::Failed(FailureReason::HandshakeTimeout)
        );
        assert_eq!(m.stats().handshakes_failed, 3);
    }

    #[test]
    fn client_error_codes_are_final() {
        let mut est = FakeEst::new(7);
        est.reject_sen = Some(ResponseType::Forbidden);
        let dev = est.device("SN000007");
        let mut m = Meter::new(MeterConfig::default(), &dev, 7).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        serve(&mut m, &mut est, now);
        assert_eq!(
            m.state(),
            &MeterState::Failed(FailureReason::Rejected {
                resource: "/sen".into(),
                code: "4.03".into()
            })
        );
        assert!(m.poll_timeout().is_none());
        if let MeterState::Failed(r) = m.state() {
            assert_eq!(r.label(), "4.03 /sen");
        }
    }

    #[test]
    fn certificate_for_another_key_fails_verification() {
        let mut est = FakeEst::new(8);
        est.wrong_key = true;
        let dev = est.device("SN000008");
        let mut m = Meter::new(MeterConfig::default(), &dev, 8).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        serve(&mut m, &mut est, now);
        assert!(matches!(
            m.state(),
            MeterState::Failed(FailureReason::Verification(_))
        ));
        assert!(m.ldevid().is_none());
    }

    #[test]
    fn renews_with_the_ldevid() {
        let mut est = FakeEst::new(9);
        let dev = est.device("SN000009");
        let cfg = MeterConfig {
            renew: true,
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, 9).unwrap();
        let now = t0();
        m.start(now);
        expect_connect(&mut m);
        m.handle_connected(now);
        let crts = expect_send(&mut m);
        m.handle_response(now, est.handle(&crts));
        let sen = expect_send(&mut m);
        m.handle_response(now, est.handle(&sen));
        expect_disconnect(&mut m);
        let (purpose, cred) = expect_connect(&mut m);
        assert_eq!(purpose, Purpose::Renew);
        assert_eq!(cred.chain_der, vec![est.issued[0].clone()]);
        let t1 = now + Duration::from_secs(1);
        m.handle_connected(t1);
        let sren = expect_send(&mut m);
        assert_eq!(sren.path, vec![".well-known", "est", "sren"]);
        // RFC 7030 §4.2.2: subject and SAN identical to the certificate being renewed.
        let csr = est_proto::ca::parse_and_verify_csr(&sren.payload, 4096).unwrap();
        let current = {
            use der::Decode;
            x509_cert::Certificate::from_der(&est.issued[0]).unwrap()
        };
        assert_eq!(csr.subject, current.tbs_certificate.subject);
        assert_eq!(
            csr.hardware_module,
            est_proto::ca::hardware_module_from_cert(&current)
        );
        m.handle_response(t1 + Duration::from_secs(1), est.handle(&sren));
        expect_disconnect(&mut m);
        assert_eq!(m.state(), &MeterState::Enrolled);
        assert!(m.renewed());
        assert_eq!(m.ldevid(), Some(est.issued[1].as_slice()));
        assert_eq!(
            m.stats().renew_us,
            Some(2_000_000),
            "from the end of /sen to the renewed LDevID"
        );
    }

    #[test]
    fn discovery_parser() {
        let fb = EstPaths::under("/.well-known/est");
        let p = parse_discovery(
            b"<coaps://[2001:db8::1]:61617/est/crts>;rt=\"ace.est.crts\";ct=\"281 287\",<coaps://[2001:db8::1]:61617/est/sen>;rt=\"ace.est.sen\"",
            &fb,
        )
        .unwrap();
        assert_eq!(p.crts, vec!["est", "crts"]);
        assert_eq!(p.sen, vec!["est", "sen"]);
        assert_eq!(p.sren, fb.sren);
        assert!(parse_discovery(b"</x>;rt=\"other\"", &fb).is_err());
        assert!(parse_discovery(&[0xff, 0xfe], &fb).is_err());
    }
}

/// The meter, the real sans-IO CoAP client and server session, and the link emulator, all on
/// virtual time: a whole enrollment over a lossy narrowband link, deterministic per seed. DTLS is
/// not modelled here (a session "connects" after a fixed delay).
#[cfg(test)]
mod virtual_time {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::link::{LinkDirection, LinkParams, Verdict};
    use crate::testutil::FakeEst;
    use est_proto::coap::{Client, ClientConfig, ClientEvent, CoapConfig, Incoming, ServerSession};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::sync::Arc;

    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct InFlight {
        at: Reverse<Instant>,
        seq: u64,
        to_server: bool,
        session: u64,
        data: Vec<u8>,
    }

    struct Run {
        enrolled: bool,
        end: Duration,
        retransmissions: u64,
        frames: u64,
        lost: u64,
    }

    fn run(seed: u64, link: &str, szx: u8) -> Run {
        let mut est = FakeEst::new(seed);
        let dev = est.device("SN200001");
        let cfg = MeterConfig {
            max_attempts: 8,
            retry_backoff: Duration::from_secs(5),
            ..MeterConfig::default()
        };
        let mut m = Meter::new(cfg, &dev, seed).unwrap();
        let params: LinkParams = link.parse().unwrap();
        let mut up = LinkDirection::new(params.clone(), seed ^ 1);
        let mut down = LinkDirection::new(params, seed ^ 2);
        let coap_cfg = ClientConfig {
            block1_szx: szx,
            block2_szx: Some(szx),
            ..ClientConfig::default()
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut heap: BinaryHeap<InFlight> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut session = 0u64;
        let mut client: Option<Client> = None;
        let mut server: Option<ServerSession> = None;
        let mut connect_at: Option<Instant> = None;
        let mut retransmissions = 0;
        m.start(now);
        for _ in 0..200_000 {
            while let Some(a) = m.poll_action() {
                match a {
                    Action::Connect { .. } => {
                        session += 1;
                        // A full DTLS handshake on this link takes a few round trips.
                        connect_at = Some(now + Duration::from_secs(3));
                    }
                    Action::Send(r) => client.as_mut().unwrap().start(now, r).unwrap(),
                    Action::Disconnect => {
                        if let Some(c) = client.take() {
                            retransmissions += c.stats().retransmissions;
                        }
                        server = None;
                    }
                }
            }
            if m.is_done() {
                break;
            }
            if let Some(c) = client.as_mut() {
                while let Some(d) = c.poll_transmit() {
                    if let Verdict::Deliver { at } = up.submit(now, d.len()) {
                        seq += 1;
                        heap.push(InFlight {
                            at: Reverse(at),
                            seq,
                            to_server: true,
                            session,
                            data: d,
                        });
                    }
                }
                let mut any = false;
                while let Some(ev) = c.poll_event() {
                    any = true;
                    match ev {
                        ClientEvent::Response(r) => m.handle_response(now, r),
                        ClientEvent::Failed(e) => m.handle_request_failed(now, e),
                    }
                }
                if any {
                    continue;
                }
            }
            // Advance virtual time to the next event.
            let next = [
                heap.peek().map(|f| f.at.0),
                client.as_ref().and_then(Client::poll_timeout),
                m.poll_timeout(),
                connect_at,
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("something to wait for");
            now = now.max(next);
            if connect_at.is_some_and(|t| t <= now) {
                connect_at = None;
                client = Some(Client::new(coap_cfg.clone(), seed ^ session));
                server = Some(ServerSession::new(Arc::new(CoapConfig::default())));
                m.handle_connected(now);
                continue;
            }
            while heap.peek().is_some_and(|f| f.at.0 <= now) {
                let f = heap.pop().unwrap();
                if f.session != session {
                    continue;
                }
                if f.to_server {
                    let Some(s) = server.as_mut() else { continue };
                    let out = match s.handle_datagram(now, &f.data) {
                        Incoming::Send(d) => vec![d],
                        Incoming::Request(id, req) => {
                            let resp = est.handle(&req);
                            s.respond(now, id, resp)
                        }
                        Incoming::Ignore => Vec::new(),
                    };
                    for d in out {
                        if let Verdict::Deliver { at } = down.submit(now, d.len()) {
                            seq += 1;
                            heap.push(InFlight {
                                at: Reverse(at),
                                seq,
                                to_server: false,
                                session,
                                data: d,
                            });
                        }
                    }
                } else if let Some(c) = client.as_mut() {
                    c.handle_datagram(now, &f.data);
                }
            }
            if let Some(c) = client.as_mut() {
                c.handle_timeout(now);
            }
            m.handle_timeout(now);
        }
        let ldevid_issued = m
            .ldevid()
            .is_some_and(|l| est.issued.iter().any(|i| i == l));
        Run {
            enrolled: matches!(m.state(), MeterState::Enrolled) && ldevid_issued,
            end: now - t0,
            retransmissions,
            frames: up.counters().frames + down.counters().frames,
            lost: up.counters().lost + down.counters().lost,
        }
    }

    #[test]
    fn enrolls_over_20_percent_loss_with_64_byte_blocks_deterministically() {
        let mut total_retx = 0;
        let mut total_lost = 0;
        for seed in 0..12 {
            let r = run(seed, "loss=0.2,latency=300ms,jitter=100ms,rate=50kbps", 2);
            assert!(r.enrolled, "seed {seed} did not enroll");
            total_retx += r.retransmissions;
            total_lost += r.lost;
            // Enrollment takes seconds to minutes of virtual time, not hours.
            assert!(r.end < Duration::from_secs(900), "seed {seed}: {:?}", r.end);
            assert!(r.frames > 40, "seed {seed}: {} frames", r.frames);
        }
        assert!(
            total_lost > 0 && total_retx > 0,
            "loss must have caused retransmissions"
        );
    }

    #[test]
    fn same_seed_same_run() {
        let a = run(
            5,
            "ge=0.05/0.3/0.8,latency=200ms,jitter=50ms,rate=20kbps",
            4,
        );
        let b = run(
            5,
            "ge=0.05/0.3/0.8,latency=200ms,jitter=50ms,rate=20kbps",
            4,
        );
        assert!(a.enrolled && b.enrolled);
        assert_eq!(a.frames, b.frames);
        assert_eq!(a.lost, b.lost);
        assert_eq!(a.retransmissions, b.retransmissions);
    }

    #[test]
    fn smaller_blocks_take_more_round_trips() {
        // 64-byte blocks keep every datagram within 2 frames; 1024-byte blocks fragment into ~12.
        let small = run(3, "latency=100ms", 2);
        let big = run(3, "latency=100ms", 6);
        assert!(small.enrolled && big.enrolled);
        assert!(small.end > big.end, "more round trips with small blocks");
    }
}
