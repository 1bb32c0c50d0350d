//! The meter's DTLS 1.2 client, as RFC 9148 §3 asks: TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
//! a client certificate (IDevID, or LDevID for /sren), the server authenticated against the Implicit
//! TA, extended master secret required (RFC 7627).
//!
//! Three backends ([`DtlsBackend`]), which the driver sees through [`DtlsSession`]:
//! - webrtc-dtls (below, the default, always built);
//! - OpenSSL (`crate::dtls_openssl`, cargo feature `openssl-backend`), the same profile through
//!   the system's OpenSSL 3. It measured *more* client CPU than webrtc-dtls on Debian 12's
//!   OpenSSL 3.0 (figures in docs/benchmarks.md), so it is not the load generator's default;
//! - dimpl (`crate::dtls_dimpl`, cargo feature `dimpl-backend`), a sans-IO DTLS 1.2 engine with
//!   ring doing the cryptography. dimpl has no CCM_8 suite, so it negotiates
//!   TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, which est-server also accepts.
//!
//! webrtc-dtls retransmits flights at a fixed interval forever and has no handshake timeout
//! (docs/design.md §1.8), so every attempt runs under a timeout; retrying from a fresh
//! session is the meter's job ([`crate::meter`]).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use rustls::client::danger::ServerCertVerifier;

use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{Config, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;
use webrtc_dtls::crypto::{Certificate, CryptoPrivateKey};
use webrtc_util::conn::Conn;

use crate::meter::{Credential, FailureReason};

/// Which DTLS client library a meter uses.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DtlsBackend {
    /// webrtc-dtls 0.12 (pure Rust).
    #[default]
    Webrtc,
    /// The system's OpenSSL 3 through the `openssl` crate.
    Openssl,
    /// dimpl 0.9 (sans-IO, pure Rust) with a ring crypto provider; AES-128-GCM instead of CCM_8.
    Dimpl,
    /// Our own engine's client mode (est-dtls): CCM_8, exponential back-off, Connection ID.
    Native,
}

impl DtlsBackend {
    pub fn name(self) -> &'static str {
        match self {
            DtlsBackend::Webrtc => "webrtc",
            DtlsBackend::Openssl => "openssl",
            DtlsBackend::Dimpl => "dimpl",
            DtlsBackend::Native => "native",
        }
    }

    /// The cargo feature (of client-sim, forwarded by loadtest) that builds this backend;
    /// `None` for webrtc-dtls, which every build has.
    pub fn cargo_feature(self) -> Option<&'static str> {
        match self {
            DtlsBackend::Webrtc | DtlsBackend::Native => None,
            DtlsBackend::Openssl => Some("openssl-backend"),
            DtlsBackend::Dimpl => Some("dimpl-backend"),
        }
    }

    /// Whether this build has the backend.
    pub fn compiled_in(self) -> bool {
        match self {
            DtlsBackend::Webrtc | DtlsBackend::Native => true,
            DtlsBackend::Openssl => cfg!(feature = "openssl-backend"),
            DtlsBackend::Dimpl => cfg!(feature = "dimpl-backend"),
        }
    }

    /// `Ok` when this build has the backend, else a message naming the feature that builds it.
    pub fn ensure_compiled_in(self) -> Result<(), String> {
        match self.cargo_feature() {
            Some(feature) if !self.compiled_in() => Err(format!(
                "the {} DTLS backend is not compiled into this build; rebuild with `--features {feature}`",
                self.name()
            )),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for DtlsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DtlsBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "webrtc" | "webrtc-dtls" => Ok(DtlsBackend::Webrtc),
            "openssl" => Ok(DtlsBackend::Openssl),
            "dimpl" => Ok(DtlsBackend::Dimpl),
            "native" | "est-dtls" => Ok(DtlsBackend::Native),
            _ => Err(format!("`{s}`: expected webrtc, openssl, dimpl or native")),
        }
    }
}

/// DTLS client settings shared by all meters.
#[derive(Clone)]
pub struct DtlsClientConfig {
    /// Roots that verify the server's certificate (the meters' Implicit TA database).
    pub trust_anchors_der: Vec<Vec<u8>>,
    /// Name checked against the server certificate's subjectAltName.
    pub server_name: String,
    /// Handshake messages are fragmented to this size (webrtc-dtls `Config.mtu`, OpenSSL
    /// `SSL_set_mtu`, dimpl `Config::mtu`).
    pub mtu: usize,
    /// Fixed flight retransmission interval of webrtc-dtls; dimpl's initial retransmission
    /// timer (doubled on each expiry); not used by OpenSSL.
    pub flight_interval: Duration,
    /// Derive the flight interval per meter from its link ([`auto_flight_interval`]) instead of
    /// using `flight_interval`; the handshake timeout is then at least 8 intervals.
    pub flight_interval_auto: bool,
    /// Give up on one handshake attempt after this long.
    pub handshake_timeout: Duration,
    /// Skip server certificate verification (testing only).
    pub danger_skip_server_verification: bool,
    /// The DTLS client library.
    pub backend: DtlsBackend,
    /// Offer a Connection ID (RFC 9146; the native backend only): the session survives a
    /// change of the meter's source address.
    pub connection_id: bool,
    /// RFC 7924 cached_info (the native backend only): a meter that holds the server's
    /// certificate chain ([`DtlsClientConfig::server_chain_der`], or the chain it received in
    /// its previous handshake) names it by its fingerprint, and a server that still has it
    /// answers with the fingerprint instead of the chain.
    pub cached_info: bool,
    /// The server's certificate chain (DER, as the server sends it) the meters hold from
    /// provisioning; empty: each meter learns it in its first handshake.
    pub server_chain_der: Vec<Vec<u8>>,
    /// C509 certificates inside the handshake (the native backend only): offer this TLS
    /// certificate type number (RFC 7250) for the meter's certificate and the server's, X.509
    /// second. `None`: X.509 only.
    pub c509_certificate_type: Option<u8>,
    /// End a session with close_notify (RFC 5246 §7.2.1). false (the native backend only):
    /// just stop, and leave the server to close the session at its idle timeout; saves one
    /// datagram (31 B, one frame) per session.
    pub close_notify: bool,
    /// The suites the webrtc-dtls backend offers, in this order (a meter: CCM_8 only, RFC 9148
    /// §3; tests offer GCM too, to check the server's preference). Not used by the others.
    pub webrtc_cipher_suites: Vec<CipherSuiteId>,
}

impl std::fmt::Debug for DtlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsClientConfig")
            .field("trust_anchors", &self.trust_anchors_der.len())
            .field("server_name", &self.server_name)
            .field("mtu", &self.mtu)
            .field("flight_interval", &self.flight_interval)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Default for DtlsClientConfig {
    fn default() -> Self {
        DtlsClientConfig {
            trust_anchors_der: Vec::new(),
            server_name: "localhost".into(),
            mtu: 1152,
            flight_interval: Duration::from_secs(2),
            flight_interval_auto: false,
            handshake_timeout: Duration::from_secs(30),
            danger_skip_server_verification: false,
            backend: DtlsBackend::Webrtc,
            connection_id: false,
            cached_info: false,
            server_chain_der: Vec::new(),
            c509_certificate_type: None,
            close_notify: true,
            webrtc_cipher_suites: vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm_8],
        }
    }
}

/// Builds the webrtc-dtls client config for one session. A credential with an empty chain
/// sends no client certificate (which the server refuses: the tests check that it does).
pub fn client_config(cfg: &DtlsClientConfig, cred: &Credential) -> Result<Config, FailureReason> {
    // webrtc-dtls builds rustls verifiers, which panic when both ring and aws-lc-rs are compiled
    // in and no default provider was chosen (webrtc-rs/webrtc#567). Err: one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if cfg.webrtc_cipher_suites.is_empty() {
        return Err(FailureReason::Credentials(
            "webrtc_cipher_suites is empty".into(),
        ));
    }
    let certificates = if cred.chain_der.is_empty() {
        Vec::new()
    } else {
        let key_pair = rcgen::KeyPair::try_from(cred.key_pkcs8_der.as_slice())
            .map_err(|e| FailureReason::Credentials(format!("client key: {e}")))?;
        let private_key = CryptoPrivateKey::from_key_pair(&key_pair)
            .map_err(|e| FailureReason::Credentials(format!("client key: {e}")))?;
        vec![Certificate {
            certificate: cred
                .chain_der
                .iter()
                .map(|d| rustls::pki_types::CertificateDer::from(d.clone()))
                .collect(),
            private_key,
        }]
    };
    let mut roots = rustls::RootCertStore::empty();
    for ta in &cfg.trust_anchors_der {
        roots
            .add(rustls::pki_types::CertificateDer::from(ta.clone()))
            .map_err(|e| FailureReason::Credentials(format!("trust anchor: {e}")))?;
    }
    Ok(Config {
        certificates,
        cipher_suites: cfg.webrtc_cipher_suites.clone(),
        extended_master_secret: ExtendedMasterSecretType::Require,
        roots_cas: roots,
        server_name: cfg.server_name.clone(),
        mtu: cfg.mtu,
        flight_interval: cfg.flight_interval,
        insecure_skip_verify: cfg.danger_skip_server_verification,
        ..Config::default()
    })
}

/// One handshake attempt over `conn`, bounded by `cfg.handshake_timeout`.
pub async fn connect(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<Arc<DTLSConn>, FailureReason> {
    let config = client_config(cfg, cred)?;
    attempt(conn, config, cfg.handshake_timeout).await
}

async fn attempt(
    conn: Arc<dyn Conn + Send + Sync>,
    config: Config,
    timeout: Duration,
) -> Result<Arc<DTLSConn>, FailureReason> {
    match tokio::time::timeout(timeout, DTLSConn::new(conn, config, true, None)).await {
        Ok(Ok(c)) => Ok(Arc::new(c)),
        Ok(Err(e)) => Err(FailureReason::HandshakeError(e.to_string())),
        Err(_) => Err(FailureReason::HandshakeTimeout),
    }
}

/// A webrtc-dtls session that [`connect_retrying`] established.
pub struct Retried {
    pub conn: Arc<DTLSConn>,
    /// Handshake attempts used (1: the first one completed).
    pub attempts: u32,
}

impl std::fmt::Debug for Retried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retried")
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Handshake attempts of at most `cfg.handshake_timeout` each over `conn`, each from a fresh
/// session (new client random), until one completes or `overall_timeout` has passed (then
/// [`FailureReason::HandshakeTimeout`]). A handshake that *fails* (an alert, a certificate
/// refused) is not retried: that answer is definite. webrtc-dtls itself retransmits its flight
/// forever and never gives up; a meter's own retry policy is [`crate::meter`]'s, this is the
/// simple one the transport tests use.
pub async fn connect_retrying(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
    overall_timeout: Duration,
) -> Result<Retried, FailureReason> {
    let config = client_config(cfg, cred)?;
    connect_config_retrying(conn, &config, cfg.handshake_timeout, overall_timeout).await
}

/// [`connect_retrying`] with a webrtc-dtls `Config` the caller built (from [`client_config`],
/// then changed: e.g. an extension offered that a meter would not offer).
pub async fn connect_config_retrying(
    conn: Arc<dyn Conn + Send + Sync>,
    config: &Config,
    attempt_timeout: Duration,
    overall_timeout: Duration,
) -> Result<Retried, FailureReason> {
    if attempt_timeout.is_zero() || overall_timeout.is_zero() {
        return Err(FailureReason::Credentials(
            "handshake and overall timeouts must not be zero".into(),
        ));
    }
    let deadline = tokio::time::Instant::now() + overall_timeout;
    let mut attempts: u32 = 0;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(FailureReason::HandshakeTimeout);
        }
        attempts = attempts.saturating_add(1);
        match attempt(
            Arc::clone(&conn),
            config.clone(),
            attempt_timeout.min(remaining),
        )
        .await
        {
            Ok(conn) => return Ok(Retried { conn, attempts }),
            Err(FailureReason::HandshakeTimeout) => {
                tracing::debug!(attempts, "DTLS client attempt timed out; starting over");
            }
            Err(e) => return Err(e),
        }
    }
}

/// An established session's I/O failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("DTLS session closed by the server (close_notify)")]
    Closed,
    #[error("DTLS: {0}")]
    Tls(String),
    #[error("datagram I/O: {0}")]
    Io(String),
    /// webrtc-dtls's own error text, unchanged.
    #[error("{0}")]
    Webrtc(String),
}

/// An established DTLS session of any backend: application datagrams in and out.
pub enum DtlsSession {
    Webrtc(Arc<DTLSConn>),
    #[cfg(feature = "openssl-backend")]
    Openssl(Box<crate::dtls_openssl::OpensslSession>),
    #[cfg(feature = "dimpl-backend")]
    Dimpl(Box<crate::dtls_dimpl::DimplSession>),
    Native(Box<crate::dtls_native::NativeSession>),
}

impl std::fmt::Debug for DtlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DtlsSession::Webrtc(_) => f.write_str("DtlsSession::Webrtc"),
            #[cfg(feature = "openssl-backend")]
            DtlsSession::Openssl(s) => f.debug_tuple("DtlsSession::Openssl").field(s).finish(),
            #[cfg(feature = "dimpl-backend")]
            DtlsSession::Dimpl(s) => f.debug_tuple("DtlsSession::Dimpl").field(s).finish(),
            DtlsSession::Native(s) => f.debug_tuple("DtlsSession::Native").field(s).finish(),
        }
    }
}

impl DtlsSession {
    /// Sends one application datagram.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), SessionError> {
        match self {
            DtlsSession::Webrtc(c) => c
                .write(data, Some(Duration::from_secs(5)))
                .await
                .map(|_| ())
                .map_err(|e| SessionError::Webrtc(e.to_string())),
            #[cfg(feature = "openssl-backend")]
            DtlsSession::Openssl(s) => s.send(data).await,
            #[cfg(feature = "dimpl-backend")]
            DtlsSession::Dimpl(s) => s.send(data).await,
            DtlsSession::Native(s) => s.send(data).await,
        }
    }

    /// Receives one application datagram. Cancel-safe (used under `select!`).
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<usize, SessionError> {
        match self {
            DtlsSession::Webrtc(c) => c
                .read(buf, None)
                .await
                .map_err(|e| SessionError::Webrtc(e.to_string())),
            #[cfg(feature = "openssl-backend")]
            DtlsSession::Openssl(s) => s.recv(buf).await,
            #[cfg(feature = "dimpl-backend")]
            DtlsSession::Dimpl(s) => s.recv(buf).await,
            DtlsSession::Native(s) => s.recv(buf).await,
        }
    }

    /// The server's certificate chain as received in the handshake (the native backend only):
    /// what a meter keeps for RFC 7924 cached_info.
    pub fn server_chain(&self) -> Option<Vec<Vec<u8>>> {
        match self {
            DtlsSession::Native(s) => Some(s.server_chain().to_vec()),
            _ => None,
        }
    }

    /// Closes without close_notify (the native backend; the others close as usual).
    pub async fn abandon(self) {
        match self {
            DtlsSession::Native(s) => s.abandon().await,
            other => other.close().await,
        }
    }

    /// Sends close_notify and closes the connection (callers bound it with a timeout).
    pub async fn close(self) {
        match self {
            DtlsSession::Webrtc(c) => {
                let _ = c.close().await;
            }
            #[cfg(feature = "openssl-backend")]
            DtlsSession::Openssl(s) => s.close().await,
            #[cfg(feature = "dimpl-backend")]
            DtlsSession::Dimpl(s) => s.close().await,
            DtlsSession::Native(s) => s.close().await,
        }
    }
}

/// One handshake attempt over `conn` with the backend `cfg.backend`, bounded by
/// `cfg.handshake_timeout`.
pub async fn connect_session(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<DtlsSession, FailureReason> {
    match cfg.backend {
        DtlsBackend::Webrtc => connect(conn, cfg, cred).await.map(DtlsSession::Webrtc),
        DtlsBackend::Native => crate::dtls_native::connect(conn, cfg, cred)
            .await
            .map(|s| DtlsSession::Native(Box::new(s))),
        #[cfg(feature = "openssl-backend")]
        DtlsBackend::Openssl => crate::dtls_openssl::connect(conn, cfg, cred)
            .await
            .map(|s| DtlsSession::Openssl(Box::new(s))),
        #[cfg(feature = "dimpl-backend")]
        DtlsBackend::Dimpl => crate::dtls_dimpl::connect(conn, cfg, cred)
            .await
            .map(|s| DtlsSession::Dimpl(Box::new(s))),
        #[cfg(not(all(feature = "openssl-backend", feature = "dimpl-backend")))]
        missing => Err(FailureReason::HandshakeError(
            missing
                .ensure_compiled_in()
                .err()
                .unwrap_or_else(|| missing.name().to_string()),
        )),
    }
}

// Pumping a sans-IO DTLS engine (OpenSSL over an in-memory pipe, dimpl) over a `Conn`.

/// Sends the queued outgoing datagrams in order; a datagram leaves the queue only once sent, so
/// a cancelled call loses nothing.
pub(crate) async fn send_queued(
    conn: &(dyn Conn + Send + Sync),
    queue: &mut VecDeque<Vec<u8>>,
) -> io::Result<()> {
    while let Some(d) = queue.front() {
        conn.send(d)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        queue.pop_front();
    }
    Ok(())
}

/// Waits for one datagram (`Some(length)`) or until `wake` (`None`), whichever comes first.
/// Cancel-safe as `Conn::recv` is.
pub(crate) async fn recv_until(
    conn: &(dyn Conn + Send + Sync),
    buf: &mut [u8],
    wake: Instant,
) -> io::Result<Option<usize>> {
    tokio::select! {
        r = conn.recv(buf) => r.map(Some).map_err(|e| io::Error::other(e.to_string())),
        _ = tokio::time::sleep_until(wake.into()) => Ok(None),
    }
}

/// The worst-case round trip over a meter's path of a `datagram`-byte datagram each way:
/// latency + jitter + serialization, each direction, over the meter link and the DCU backhaul.
pub fn worst_rtt(
    link: &crate::link::LinkParams,
    dcu: Option<&crate::link::LinkParams>,
    datagram: usize,
) -> Duration {
    let one_way = |l: &crate::link::LinkParams| {
        l.latency + l.jitter + l.serialization_delay(l.frames.air_bytes(datagram))
    };
    (one_way(link) + dcu.map(one_way).unwrap_or_default()) * 2
}

/// A flight retransmission interval suited to a meter's path: 1.5 x the worst-case round trip
/// of a full 1152-byte flight datagram ([`worst_rtt`]), between 2 s and 20 s.
///
/// webrtc-dtls retransmits at a fixed interval with no backoff (RFC 6347 §4.2.4.1 asks for
/// doubling); an interval below the path's RTT makes every meter resend every flight before the
/// answer can arrive, which collapses a shared narrowband backhaul. RFC 7925 §11 recommends 9 s
/// initial timers for constrained links. The native backend starts from this value and doubles
/// it at each expiry.
pub fn auto_flight_interval(
    link: &crate::link::LinkParams,
    dcu: Option<&crate::link::LinkParams>,
) -> Duration {
    worst_rtt(link, dcu, 1152)
        .mul_f64(1.5)
        .clamp(Duration::from_secs(2), Duration::from_secs(20))
}

/// A CoAP ACK_TIMEOUT suited to a meter's path (RFC 7252 §4.8.1 lets it be adjusted to the
/// path): 1.5 x the worst-case round trip of a request and a response of `block` payload bytes
/// plus 100 B of CoAP and DTLS overhead, at least the RFC's 2 s, at most 20 s. The CoAP client
/// then draws the first timeout in `[ACK_TIMEOUT, 1.5 x ACK_TIMEOUT]` and doubles it at each
/// retransmission (RFC 7252 §4.2).
pub fn auto_ack_timeout(
    link: &crate::link::LinkParams,
    dcu: Option<&crate::link::LinkParams>,
    block: usize,
) -> Duration {
    worst_rtt(link, dcu, block + 100)
        .mul_f64(1.5)
        .clamp(Duration::from_secs(2), Duration::from_secs(20))
}

/// Verifiers kept, one per distinct trust-anchor set.
const MAX_CACHED_VERIFIERS: usize = 16;
type VerifierCache = Vec<(Vec<Vec<u8>>, Arc<dyn ServerCertVerifier>)>;
static VERIFIERS: Mutex<VerifierCache> = Mutex::new(Vec::new());

/// rustls's webpki server verifier over a trust-anchor set (the meter's Implicit TA
/// database), built once per distinct set; used by the dimpl and native backends.
pub(crate) fn server_verifier(
    anchors: &[Vec<u8>],
) -> Result<Arc<dyn ServerCertVerifier>, FailureReason> {
    let mut cache = VERIFIERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, v)) = cache.iter().find(|(k, _)| k.as_slice() == anchors) {
        return Ok(v.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    for ta in anchors {
        roots
            .add(rustls::pki_types::CertificateDer::from(ta.clone()))
            .map_err(|e| FailureReason::Credentials(format!("trust anchor: {e}")))?;
    }
    let v: Arc<dyn ServerCertVerifier> =
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| FailureReason::Credentials(format!("trust anchors: {e}")))?;
    if cache.len() >= MAX_CACHED_VERIFIERS {
        cache.remove(0);
    }
    cache.push((anchors.to_vec(), v.clone()));
    Ok(v)
}

/// The server's address, for messages.
pub fn describe(addr: SocketAddr) -> String {
    format!("coaps://{addr}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::link::{LinkParams, LinkProfile};

    #[test]
    fn a_backend_missing_from_the_build_names_its_feature() {
        assert_eq!(DtlsBackend::Webrtc.ensure_compiled_in(), Ok(()));
        for (b, built) in [
            (DtlsBackend::Openssl, cfg!(feature = "openssl-backend")),
            (DtlsBackend::Dimpl, cfg!(feature = "dimpl-backend")),
        ] {
            assert_eq!(b.compiled_in(), built);
            match b.ensure_compiled_in() {
                Ok(()) => assert!(built),
                Err(e) => {
                    assert!(!built);
                    let feature = b.cargo_feature().unwrap();
                    assert!(e.contains(b.name()) && e.contains(feature), "{e}");
                }
            }
        }
    }

    #[test]
    fn auto_flight_interval_follows_the_path() {
        let lan = LinkParams::profile(LinkProfile::Lan);
        assert_eq!(auto_flight_interval(&lan, None), Duration::from_secs(2));
        let mut plc = LinkParams::profile(LinkProfile::Plc);
        plc.latency *= 3;
        plc.jitter *= 3;
        let dcu: LinkParams = "latency=30ms,rate=64kbps".parse().unwrap();
        let i = auto_flight_interval(&plc, Some(&dcu));
        // one way: 1.8 s + 1541 on-air bytes at 20 kbit/s (0.62 s) + DCU 30 ms + 0.19 s.
        assert!(
            i > Duration::from_secs(7) && i < Duration::from_secs(9),
            "{i:?}"
        );
        let mut slow = plc.clone();
        slow.latency = Duration::from_secs(30);
        assert_eq!(auto_flight_interval(&slow, None), Duration::from_secs(20));
        // CoAP: the RFC's 2 s on a LAN; on plc 1.5 x (2 x (400 ms + 200 ms jitter + a 1124-byte
        // datagram's ~1,500 on-air bytes at 20 kbit/s, 0.6 s)) = 3.6 s.
        assert_eq!(auto_ack_timeout(&lan, None, 1024), Duration::from_secs(2));
        let plc = LinkParams::profile(LinkProfile::Plc);
        let a = auto_ack_timeout(&plc, None, 1024);
        assert!(
            a > Duration::from_millis(3400) && a < Duration::from_millis(3800),
            "{a:?}"
        );
        assert!(auto_ack_timeout(&plc, None, 64) < a);
    }
}
