//! The meter's DTLS 1.2 client on dimpl 0.9, a sans-IO DTLS engine, with ring doing the
//! cryptography ([`ring_provider`]: ECDHE P-256, ECDSA P-256 signing and verification, SHA-2,
//! HMAC, AES-128-GCM, the system CSPRNG).
//!
//! Profile, and where it differs from the webrtc-dtls and OpenSSL backends:
//! - DTLS 1.2 only (`Dtls::new_12`); the secp256r1 group only (RFC 7925 §4.4); the client's key
//!   signs with ecdsa_secp256r1_sha256 (RFC 7925 §4.4.2).
//! - **TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256** (RFC 5289), not the RFC 9148 §3 / RFC 7925 §4.4
//!   TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8: dimpl implements no CCM_8 suite for certificate
//!   authentication. est-server (webrtc-dtls) accepts the GCM suite too. The other two backends
//!   keep CCM_8.
//! - The extended master secret (RFC 7627) is always negotiated; dimpl refuses a server that
//!   does not (`SecurityError::ExtendedMasterSecretNotNegotiated`).
//! - The client Certificate message carries the **leaf only** (dimpl sends one certificate): a
//!   credential's further chain certificates are not sent. Fleet IDevIDs are signed directly by
//!   the manufacturer CA, which the server holds as a trust anchor, so the leaf suffices.
//! - dimpl's ClientHello always offers use_srtp (RFC 5764; it is a WebRTC library) and cannot be
//!   told not to. webrtc-dtls refuses an SRTP offer it cannot match with a fatal
//!   insufficient_security alert, where RFC 5764 §4.1.1 says a server without a shared profile
//!   SHOULD leave the extension out and go on; est-server can answer the offer
//!   (`dtls.answer_use_srtp = true`, default off; it echoes a profile and exports no SRTP keys).
//!   With a server that has it off, this backend cannot connect: loadtest and the dimpl tests
//!   turn it on for the servers they start. OpenSSL servers (libcoap) ignore it.
//! - No server_name (SNI) extension in the ClientHello (dimpl sends none); the name is still
//!   checked against the server certificate.
//! - Server authentication: dimpl does no PKI validation; it hands the server's leaf certificate
//!   out (`Output::PeerCert`, after it has checked the ServerKeyExchange signature with it and
//!   before the client's second flight goes out). It is verified here with rustls's webpki
//!   verifier, the one webrtc-dtls uses for the webrtc backend: path to one of
//!   `trust_anchors_der` (any listed certificate is an anchor), validity, `server_name` against
//!   the subjectAltName. A failure aborts the handshake before the client's Certificate /
//!   ClientKeyExchange flight is sent. dimpl exposes only the leaf, so the Implicit TA database
//!   must hold the server certificate's issuer (est-server's implicit-ta.pem is its issuing CA).
//!   `danger_skip_server_verification` skips it, as with the other backends.
//! - Retransmission is dimpl's (RFC 6347 §4.2.4): the initial timer is
//!   `DtlsClientConfig::flight_interval` (dimpl's `flight_start_rto`), doubled with ±25 % jitter
//!   on each expiry, with as many retries as fit in `handshake_timeout` (dimpl's own handshake
//!   deadline, also enforced around the whole attempt).
//!
//! Pumping: the engine's output (datagrams, its next timer, events) is drained after every
//! input; datagrams are queued and sent over the `webrtc_util::Conn` (the emulated link or a
//! UDP socket) with the helpers shared with the OpenSSL backend ([`crate::dtls::send_queued`],
//! [`crate::dtls::recv_until`]).

mod ring_provider;

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dimpl::{Dtls, DtlsCertificate, Output};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use webrtc_util::conn::Conn;

use crate::dtls::{recv_until, send_queued, server_verifier, DtlsClientConfig, SessionError};
use crate::meter::{Credential, FailureReason};

pub use ring_provider::provider as ring_crypto_provider;

/// Buffer for the engine's output during the handshake: dimpl copies the server's certificate
/// into it whole (and asserts that it fits), so it is sized well above any certificate.
const HANDSHAKE_POLL_BUF: usize = 16 * 1024;
/// Buffer for the engine's output once established (grown on `BufferTooSmall`).
const SESSION_POLL_BUF: usize = 2048;
/// Largest output buffer the engine may ask for (a DTLS record is at most 2^14 + overhead).
const MAX_POLL_BUF: usize = 18 * 1024;
/// Receive buffer: larger than any datagram the server sends (webrtc-util's RECEIVE_MTU).
const RECV_BUF: usize = 8192;
/// Outgoing datagrams / received application datagrams held before the session fails.
const MAX_QUEUED: usize = 256;
/// Engine outputs drained in one go before giving up (a flight at a small MTU is a few dozen).
const MAX_OUTPUTS: usize = 1024;
/// dimpl's record queues (its defaults, 30 in / 10 out, are too small for a certificate
/// flight fragmented at a small MTU).
const ENGINE_QUEUE: usize = 128;
/// Upper bound on the retries per flight (the handshake timeout normally ends it first).
const MAX_FLIGHT_RETRIES: usize = 12;
/// Configs / verifiers kept (one per distinct setting; a run normally has a handful).
const MAX_CACHED: usize = 64;
/// The engine's next timer, when it has none, is capped to this from now.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// Retries per flight so that retransmission goes on until `timeout`: the smallest n with
/// 0.75 x rto x (2^(n+1) - 1) >= timeout (dimpl doubles the timer and jitters it by ±25 %).
pub fn flight_retries(rto: Duration, timeout: Duration) -> usize {
    let mut waited = Duration::ZERO;
    let mut interval = rto;
    for n in 0..MAX_FLIGHT_RETRIES {
        waited = waited.saturating_add(interval.mul_f64(0.75));
        if waited >= timeout {
            return n;
        }
        interval = interval.saturating_mul(2);
    }
    MAX_FLIGHT_RETRIES
}

/// What makes one dimpl `Config` differ from another.
#[derive(PartialEq, Eq, Clone, Copy)]
struct ConfigKey {
    mtu: usize,
    rto: Duration,
    timeout: Duration,
}

static CONFIGS: Mutex<Vec<(ConfigKey, Arc<dimpl::Config>)>> = Mutex::new(Vec::new());

/// The dimpl config for `cfg`, built once per distinct setting: building one runs dimpl's
/// provider self-check (known-answer tests and a P-256 key-exchange round trip), which costs
/// more than a handshake's ECDHE.
fn config(cfg: &DtlsClientConfig) -> Result<Arc<dimpl::Config>, FailureReason> {
    let key = ConfigKey {
        mtu: cfg.mtu,
        rto: cfg.flight_interval,
        timeout: cfg.handshake_timeout,
    };
    let mut cache = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let c = dimpl::Config::builder()
        .with_crypto_provider(ring_provider::provider())
        .mtu(cfg.mtu)
        .flight_start_rto(cfg.flight_interval)
        .flight_retries(flight_retries(cfg.flight_interval, cfg.handshake_timeout))
        .handshake_timeout(cfg.handshake_timeout)
        .max_queue_rx(ENGINE_QUEUE)
        .max_queue_tx(ENGINE_QUEUE)
        .build()
        .map_err(|e| FailureReason::HandshakeError(format!("dimpl client setup: {e}")))?;
    let c = Arc::new(c);
    if cache.len() >= MAX_CACHED {
        cache.remove(0);
    }
    cache.push((key, c.clone()));
    Ok(c)
}

/// Server certificate check: rustls's webpki verifier over the Implicit TA database.
#[derive(Clone)]
struct ServerCheck {
    verifier: Arc<dyn ServerCertVerifier>,
    name: ServerName<'static>,
}

impl ServerCheck {
    fn new(cfg: &DtlsClientConfig) -> Result<Option<ServerCheck>, FailureReason> {
        if cfg.danger_skip_server_verification {
            return Ok(None);
        }
        let name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| FailureReason::Credentials(format!("server name: {e}")))?;
        Ok(Some(ServerCheck {
            verifier: server_verifier(&cfg.trust_anchors_der)?,
            name,
        }))
    }

    /// RFC 9148 §3 / RFC 7925 §4.4.1: the server certificate chains to the Implicit TA and
    /// names the server.
    fn verify(&self, leaf_der: &[u8]) -> Result<(), FailureReason> {
        self.verifier
            .verify_server_cert(
                &CertificateDer::from(leaf_der),
                &[],
                &self.name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| {
                FailureReason::HandshakeError(format!(
                    "server certificate verification failed: {e}"
                ))
            })
    }
}

/// The credential for dimpl: the leaf certificate and the PKCS#8 key, the key checked (parsed
/// with ring, cached) so that dimpl's own load cannot fail (it panics on a bad key).
fn certificate(cred: &Credential) -> Result<DtlsCertificate, FailureReason> {
    let leaf = cred
        .chain_der
        .first()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| FailureReason::Credentials("empty certificate chain".into()))?;
    ring_provider::load_p256_key(&cred.key_pkcs8_der)
        .map_err(|e| FailureReason::Credentials(format!("client key (P-256 PKCS#8): {e}")))?;
    Ok(DtlsCertificate {
        certificate: leaf.clone(),
        private_key: cred.key_pkcs8_der.clone(),
    })
}

/// Runs `f` on the engine, turning a panic inside dimpl (it asserts on some sizes) into an
/// error for this one connection.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| "dimpl panicked".to_string())
}

/// Events of one drain of the engine's output.
#[derive(Debug, Default)]
struct Events {
    connected: bool,
    peer_cert: Option<Vec<u8>>,
    close_notify: bool,
}

/// Why the engine failed.
enum EngineError {
    Timeout,
    Failed(String),
}

impl From<String> for EngineError {
    fn from(s: String) -> Self {
        EngineError::Failed(s)
    }
}

fn engine_error(e: dimpl::Error) -> EngineError {
    match e {
        dimpl::Error::Timeout(_) => EngineError::Timeout,
        e => EngineError::Failed(format!("dimpl: {e}")),
    }
}

/// The engine and its queues.
struct Engine {
    dtls: Dtls,
    poll_buf: Vec<u8>,
    outgoing: VecDeque<Vec<u8>>,
    app: VecDeque<Vec<u8>>,
    wake: Instant,
}

impl Engine {
    /// Advances the engine's clock (retransmits when a timer expired) and drains its output.
    fn tick(&mut self, now: Instant) -> Result<Events, EngineError> {
        let dtls = &mut self.dtls;
        guarded(move || dtls.handle_timeout(now))?.map_err(engine_error)?;
        self.drain()
    }

    /// Hands one received datagram to the engine and drains its output.
    fn feed(&mut self, datagram: &[u8], now: Instant) -> Result<Events, EngineError> {
        let dtls = &mut self.dtls;
        guarded(move || {
            dtls.handle_timeout(now)?;
            dtls.handle_packet(datagram)
        })?
        .map_err(engine_error)?;
        self.drain()
    }

    /// Moves all pending output into the queues, up to the engine's next timer.
    fn drain(&mut self) -> Result<Events, EngineError> {
        let mut ev = Events::default();
        for _ in 0..MAX_OUTPUTS {
            let (dtls, buf) = (&mut self.dtls, &mut self.poll_buf);
            let out = guarded(move || dtls.poll_output(buf))?;
            match out {
                Output::Packet(p) => {
                    if self.outgoing.len() >= MAX_QUEUED {
                        return Err("dimpl: outgoing queue full".to_string().into());
                    }
                    self.outgoing.push_back(p.to_vec());
                }
                Output::BufferTooSmall { needed } => {
                    if needed > MAX_POLL_BUF {
                        return Err(format!("dimpl: output of {needed} bytes").into());
                    }
                    self.poll_buf.resize(needed, 0);
                }
                Output::Timeout(t) => {
                    self.wake = t.min(Instant::now() + IDLE_WAKE);
                    return Ok(ev);
                }
                Output::Connected => ev.connected = true,
                Output::PeerCert(c) => ev.peer_cert = Some(c.to_vec()),
                Output::ApplicationData(d) => {
                    if self.app.len() >= MAX_QUEUED {
                        return Err("dimpl: received-data queue full".to_string().into());
                    }
                    self.app.push_back(d.to_vec());
                }
                Output::CloseNotify => ev.close_notify = true,
                // SRTP keying material (not negotiated here) and future variants.
                _ => {}
            }
        }
        Err("dimpl: engine output did not settle".to_string().into())
    }
}

/// An established DTLS session over dimpl.
pub struct DimplSession {
    conn: Arc<dyn Conn + Send + Sync>,
    engine: Engine,
    rbuf: Vec<u8>,
    /// The server sent close_notify.
    closed: bool,
}

impl std::fmt::Debug for DimplSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DimplSession")
            .field("dtls", &self.engine.dtls)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// One handshake attempt over `conn`, bounded by `cfg.handshake_timeout`.
pub async fn connect(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<DimplSession, FailureReason> {
    let config = config(cfg)?;
    let check = ServerCheck::new(cfg)?;
    let certificate = certificate(cred)?;
    let now = Instant::now();
    let dtls = guarded(|| {
        let mut d = Dtls::new_12(config, certificate, now);
        d.set_active(true);
        d
    })
    .map_err(|e| FailureReason::HandshakeError(format!("dimpl client setup: {e}")))?;
    let engine = Engine {
        dtls,
        poll_buf: vec![0u8; HANDSHAKE_POLL_BUF],
        outgoing: VecDeque::new(),
        app: VecDeque::new(),
        wake: now,
    };
    match tokio::time::timeout(cfg.handshake_timeout, handshake(conn, engine, check)).await {
        Ok(r) => r,
        Err(_) => Err(FailureReason::HandshakeTimeout),
    }
}

async fn handshake(
    conn: Arc<dyn Conn + Send + Sync>,
    mut engine: Engine,
    check: Option<ServerCheck>,
) -> Result<DimplSession, FailureReason> {
    let fail = |e: EngineError| match e {
        EngineError::Timeout => FailureReason::HandshakeTimeout,
        EngineError::Failed(m) => FailureReason::HandshakeError(m),
    };
    let io_err = |e: std::io::Error| FailureReason::Io(e.to_string());
    let mut rbuf = vec![0u8; RECV_BUF];
    let mut verified = check.is_none();
    // The first timeout starts the client: it queues the ClientHello.
    let mut ev = engine.tick(Instant::now()).map_err(fail)?;
    loop {
        if let Some(leaf) = ev.peer_cert.take() {
            if let Some(c) = &check {
                // Refused: nothing more is sent (dimpl has no way to send a fatal alert from
                // the application; the server's handshake state times out).
                c.verify(&leaf)?;
                verified = true;
            }
        }
        if ev.close_notify {
            return Err(FailureReason::HandshakeError(
                "server closed the connection during the handshake".into(),
            ));
        }
        send_queued(&*conn, &mut engine.outgoing)
            .await
            .map_err(io_err)?;
        if ev.connected {
            if !verified {
                return Err(FailureReason::HandshakeError(
                    "handshake completed without a server certificate to verify".into(),
                ));
            }
            break;
        }
        ev = match recv_until(&*conn, &mut rbuf, engine.wake)
            .await
            .map_err(io_err)?
        {
            Some(n) => engine.feed(rbuf.get(..n).unwrap_or_default(), Instant::now()),
            None => engine.tick(Instant::now()),
        }
        .map_err(fail)?;
    }
    engine.poll_buf = vec![0u8; SESSION_POLL_BUF];
    Ok(DimplSession {
        conn,
        engine,
        rbuf,
        closed: false,
    })
}

fn session_error(e: EngineError) -> SessionError {
    match e {
        EngineError::Timeout => SessionError::Tls("dimpl: timeout".into()),
        EngineError::Failed(m) => SessionError::Tls(m),
    }
}

impl DimplSession {
    /// Sends one application datagram (one DTLS record).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), SessionError> {
        let dtls = &mut self.engine.dtls;
        guarded(move || dtls.send_application_data(data))
            .map_err(SessionError::Tls)?
            .map_err(|e| SessionError::Tls(format!("dimpl: {e}")))?;
        self.engine.drain().map_err(session_error)?;
        send_queued(&*self.conn, &mut self.engine.outgoing)
            .await
            .map_err(|e| SessionError::Io(e.to_string()))
    }

    /// Receives one application datagram into `buf` (truncated to it). Cancel-safe: a
    /// received datagram is handled before the next await.
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<usize, SessionError> {
        loop {
            if let Some(d) = self.engine.app.pop_front() {
                let n = d.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), d.get(..n)) {
                    dst.copy_from_slice(src);
                }
                return Ok(n);
            }
            if self.closed {
                return Err(SessionError::Closed);
            }
            // Answers to retransmitted server flights go out too.
            send_queued(&*self.conn, &mut self.engine.outgoing)
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let n = self
                .conn
                .recv(&mut self.rbuf)
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let d = self.rbuf.get(..n).unwrap_or_default();
            let ev = self.engine.feed(d, Instant::now()).map_err(session_error)?;
            if ev.close_notify {
                self.closed = true;
            }
        }
    }

    /// Sends close_notify and closes the connection.
    pub async fn close(mut self) {
        let dtls = &mut self.engine.dtls;
        if guarded(move || dtls.close()).is_ok() {
            let _ = self.engine.drain();
            let _ = send_queued(&*self.conn, &mut self.engine.outgoing).await;
        }
        let _ = self.conn.close().await;
    }

    /// The negotiated protocol version, for tests and logs.
    pub fn protocol_version(&self) -> Option<dimpl::ProtocolVersion> {
        self.engine.dtls.protocol_version()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retries_cover_the_handshake_timeout() {
        // 2 s doubling: 1.5 + 3 + 6 + 12 = 22.5 s < 30 s, + 24 s = 46.5 s >= 30 s: 4 retries.
        assert_eq!(
            flight_retries(Duration::from_secs(2), Duration::from_secs(30)),
            4
        );
        assert_eq!(
            flight_retries(Duration::from_secs(1), Duration::from_millis(500)),
            0
        );
        assert_eq!(
            flight_retries(Duration::from_millis(1), Duration::from_secs(86_400)),
            MAX_FLIGHT_RETRIES
        );
    }

    #[test]
    fn configs_and_verifiers_are_built_once() {
        let mut est = crate::testutil::FakeEst::new(61);
        let cfg = DtlsClientConfig {
            trust_anchors_der: vec![est.ca_der.clone()],
            backend: crate::dtls::DtlsBackend::Dimpl,
            ..DtlsClientConfig::default()
        };
        assert!(Arc::ptr_eq(&config(&cfg).unwrap(), &config(&cfg).unwrap()));
        let mut other = cfg.clone();
        other.mtu = 300;
        assert!(!Arc::ptr_eq(
            &config(&cfg).unwrap(),
            &config(&other).unwrap()
        ));
        let a = ServerCheck::new(&cfg).unwrap().unwrap();
        let b = ServerCheck::new(&cfg).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a.verifier, &b.verifier));
        // The device certificate is not a server certificate for "localhost".
        let dev = est.device("SN610001");
        let e = a.verify(&dev.cert_chain_der[0]).unwrap_err();
        assert!(
            matches!(&e, FailureReason::HandshakeError(m) if m.contains("server certificate verification failed")),
            "{e:?}"
        );
        let mut skip = cfg.clone();
        skip.danger_skip_server_verification = true;
        assert!(ServerCheck::new(&skip).unwrap().is_none());
    }

    #[test]
    fn bad_credentials_are_reported_before_any_datagram() {
        let e = certificate(&Credential {
            chain_der: vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]],
            key_pkcs8_der: b"not a key".to_vec(),
        })
        .unwrap_err();
        assert!(matches!(e, FailureReason::Credentials(_)), "{e:?}");
        let e = certificate(&Credential {
            chain_der: Vec::new(),
            key_pkcs8_der: Vec::new(),
        })
        .unwrap_err();
        assert!(matches!(e, FailureReason::Credentials(_)), "{e:?}");
    }
}
