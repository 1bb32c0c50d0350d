//! The `native` meter DTLS stack: the client mode of our own engine (`est-dtls`), pumped over a
//! [`Conn`]. It speaks the RFC 9148 profile (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, P-256, EMS),
//! backs off its retransmissions exponentially from `flight_interval` (RFC 6347 §4.2.4.1),
//! and can offer a Connection ID (RFC 9146) so that a meter whose NAT rebinds keeps its session.
//!
//! The server certificate is checked by rustls's webpki verifier over the meter's Implicit TA
//! database (RFC 9148 §3), as the other backends do. Meters keep their ClientHellos small
//! (`lean_hello`), can name the server certificate they hold with RFC 7924 cached_info, and can
//! send (and receive) certificates as C509 (RFC 7250 negotiation, X.509 as the fallback).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use est_dtls::{CertError, ChainVerifier, Client, ClientConfig, ConnEvent, SigningKey, Verified};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use webrtc_util::conn::Conn;

use crate::dtls::{recv_until, send_queued, server_verifier, DtlsClientConfig, SessionError};
use crate::meter::{Credential, FailureReason};

/// Largest datagram read.
const RECV_BUF: usize = 2048;
/// Engine configurations kept (one per credential and settings): a fleet reuses few.
const MAX_CACHED: usize = 256;
/// The largest retransmission interval the back-off reaches.
const RETRANSMIT_MAX: Duration = Duration::from_secs(60);

/// What an engine configuration is built from.
#[derive(PartialEq)]
struct ConfigKey {
    key_pkcs8_der: Vec<u8>,
    chain_der: Vec<Vec<u8>>,
    server_name: String,
    mtu: usize,
    flight_interval: Duration,
    handshake_timeout: Duration,
    connection_id: bool,
    trust_anchors_der: Vec<Vec<u8>>,
    /// The server chain offered with cached_info (empty: none).
    cached_server_chain: Vec<Vec<u8>>,
    c509_certificate_type: Option<u8>,
}
static CONFIGS: Mutex<VecDeque<(ConfigKey, Arc<ClientConfig>)>> = Mutex::new(VecDeque::new());

/// The engine's configuration for a meter, built once per credential and settings.
fn config(cfg: &DtlsClientConfig, cred: &Credential) -> Result<Arc<ClientConfig>, FailureReason> {
    let key = ConfigKey {
        key_pkcs8_der: cred.key_pkcs8_der.clone(),
        chain_der: cred.chain_der.clone(),
        server_name: cfg.server_name.clone(),
        mtu: cfg.mtu,
        flight_interval: cfg.flight_interval,
        handshake_timeout: cfg.handshake_timeout,
        connection_id: cfg.connection_id,
        trust_anchors_der: cfg.trust_anchors_der.clone(),
        cached_server_chain: if cfg.cached_info {
            cfg.server_chain_der.clone()
        } else {
            Vec::new()
        },
        c509_certificate_type: cfg.c509_certificate_type,
    };
    let mut cache = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let signing = SigningKey::from_pkcs8(&cred.key_pkcs8_der)
        .map_err(|e| FailureReason::Credentials(format!("client key: {e}")))?;
    let mut c = ClientConfig::new(
        cred.chain_der.clone(),
        Arc::new(signing),
        server_check(cfg)?,
    );
    c.mtu_bytes = cfg.mtu;
    c.retransmit = est_dtls::RetransmitConfig {
        initial: cfg.flight_interval,
        max: RETRANSMIT_MAX.max(cfg.flight_interval),
    };
    c.handshake_timeout = cfg.handshake_timeout;
    // RFC 9148 §3: the mandatory suite; P-256 and ecdsa_secp256r1_sha256 (RFC 7925 §4.4, §5).
    c.cipher_suites = vec![est_dtls::CipherSuite::Aes128Ccm8];
    c.groups = vec![est_dtls::NamedGroup::Secp256r1];
    c.signature_schemes = vec![est_dtls::SignatureScheme::EcdsaSecp256r1Sha256];
    // A meter on a mesh: the first ClientHello fits one 802.15.4 frame.
    c.lean_hello = true;
    // We send with the server's CID; we want none back (our own address does not move for
    // the server's sake).
    c.connection_id = cfg.connection_id.then(Vec::new);
    if !key.cached_server_chain.is_empty() {
        c.cached_server_chains = vec![key.cached_server_chain.clone()];
    }
    c.c509 = key.c509_certificate_type.map(est_dtls::C509Codec::type3);
    let c = Arc::new(c);
    if cache.len() >= MAX_CACHED {
        cache.pop_front();
    }
    cache.push_back((key, c.clone()));
    Ok(c)
}

/// RFC 9148 §3 / RFC 7925 §4.4.1: the server's chain leads to the Implicit TA and names the
/// server.
fn server_check(cfg: &DtlsClientConfig) -> Result<ChainVerifier, FailureReason> {
    if cfg.danger_skip_server_verification {
        return Ok(Arc::new(|_chain: &[Vec<u8>]| {
            Ok(Verified {
                identity: Vec::new(),
                context: None,
            })
        }));
    }
    let verifier = server_verifier(&cfg.trust_anchors_der)?;
    let name = ServerName::try_from(cfg.server_name.clone())
        .map_err(|e| FailureReason::Credentials(format!("server name: {e}")))?;
    Ok(Arc::new(move |chain: &[Vec<u8>]| {
        let leaf = chain
            .first()
            .map(|c| CertificateDer::from(c.as_slice()))
            .ok_or_else(|| CertError::BadCertificate("no server certificate".into()))?;
        let intermediates: Vec<CertificateDer<'_>> = chain
            .iter()
            .skip(1)
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        verifier
            .verify_server_cert(&leaf, &intermediates, &name, &[], UnixTime::now())
            .map(|_| Verified {
                identity: Vec::new(),
                context: None,
            })
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                    CertError::UnknownCa(e.to_string())
                }
                other => CertError::BadCertificate(other.to_string()),
            })
    }))
}

/// An established session of the native engine.
pub struct NativeSession {
    conn: Arc<dyn Conn + Send + Sync>,
    client: Client,
    outgoing: VecDeque<Vec<u8>>,
    app: VecDeque<Vec<u8>>,
    rbuf: Vec<u8>,
    closed: bool,
}

impl std::fmt::Debug for NativeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSession")
            .field("server", &self.client.server())
            .field("suite", &self.client.connection().cipher_suite())
            .field("cid", &self.client.connection().peer_cid())
            .finish()
    }
}

/// Moves what the engine produced into our queues; `Err` once the handshake failed.
fn pump(
    client: &mut Client,
    outgoing: &mut VecDeque<Vec<u8>>,
    app: &mut VecDeque<Vec<u8>>,
    closed: &mut bool,
) -> Result<(), String> {
    while let Some(d) = client.poll_transmit() {
        outgoing.push_back(d);
    }
    while let Some(ev) = client.poll_event() {
        match ev {
            ConnEvent::Data(d) => app.push_back(d),
            ConnEvent::Closed(est_dtls::CloseReason::HandshakeFailed(e)) => {
                *closed = true;
                return Err(e.to_string());
            }
            ConnEvent::Closed(_) => *closed = true,
            ConnEvent::Connected | ConnEvent::AddressChanged(_) => {}
        }
    }
    Ok(())
}

/// One handshake attempt over `conn`, bounded by `cfg.handshake_timeout`.
pub async fn connect(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<NativeSession, FailureReason> {
    let config = config(cfg, cred)?;
    let server = conn
        .remote_addr()
        .ok_or_else(|| FailureReason::Io("the connection has no remote address".into()))?;
    let client = Client::connect(Instant::now(), server, config)
        .map_err(|e| FailureReason::HandshakeError(e.to_string()))?;
    let session = NativeSession {
        conn,
        client,
        outgoing: VecDeque::new(),
        app: VecDeque::new(),
        rbuf: vec![0u8; RECV_BUF],
        closed: false,
    };
    match tokio::time::timeout(cfg.handshake_timeout, handshake(session)).await {
        Ok(r) => r,
        Err(_) => Err(FailureReason::HandshakeTimeout),
    }
}

async fn handshake(mut s: NativeSession) -> Result<NativeSession, FailureReason> {
    let io_err = |e: std::io::Error| FailureReason::Io(e.to_string());
    loop {
        pump(&mut s.client, &mut s.outgoing, &mut s.app, &mut s.closed)
            .map_err(FailureReason::HandshakeError)?;
        send_queued(&*s.conn, &mut s.outgoing)
            .await
            .map_err(io_err)?;
        if s.client.is_established() {
            return Ok(s);
        }
        if s.client.is_closed() {
            return Err(FailureReason::HandshakeError(
                "the handshake ended without completing".into(),
            ));
        }
        let wake = s
            .client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let from = s.client.server();
        match recv_until(&*s.conn, &mut s.rbuf, wake)
            .await
            .map_err(io_err)?
        {
            Some(n) => {
                let d = s.rbuf.get(..n).unwrap_or_default();
                s.client.handle_datagram(Instant::now(), from, d);
            }
            None => s.client.handle_timeout(Instant::now()),
        }
    }
}

impl NativeSession {
    /// Sends one application datagram (one DTLS record).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), SessionError> {
        self.client
            .send(Instant::now(), data)
            .map_err(|e| SessionError::Tls(e.to_string()))?;
        pump(
            &mut self.client,
            &mut self.outgoing,
            &mut self.app,
            &mut self.closed,
        )
        .map_err(SessionError::Tls)?;
        send_queued(&*self.conn, &mut self.outgoing)
            .await
            .map_err(|e| SessionError::Io(e.to_string()))
    }

    /// Receives one application datagram into `buf` (truncated to it). Cancel-safe: a
    /// received datagram is handled before the next await.
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<usize, SessionError> {
        loop {
            if let Some(d) = self.app.pop_front() {
                let n = d.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), d.get(..n)) {
                    dst.copy_from_slice(src);
                }
                return Ok(n);
            }
            if self.closed {
                return Err(SessionError::Closed);
            }
            send_queued(&*self.conn, &mut self.outgoing)
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let n = self
                .conn
                .recv(&mut self.rbuf)
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let from = self.client.server();
            let d = self.rbuf.get(..n).unwrap_or_default();
            self.client.handle_datagram(Instant::now(), from, d);
            pump(
                &mut self.client,
                &mut self.outgoing,
                &mut self.app,
                &mut self.closed,
            )
            .map_err(SessionError::Tls)?;
        }
    }

    /// Sends close_notify and closes the connection.
    pub async fn close(mut self) {
        self.client.close();
        let _ = pump(
            &mut self.client,
            &mut self.outgoing,
            &mut self.app,
            &mut self.closed,
        );
        let _ = send_queued(&*self.conn, &mut self.outgoing).await;
        let _ = self.conn.close().await;
    }

    /// Closes the connection without a close_notify.
    pub async fn abandon(self) {
        let _ = self.conn.close().await;
    }

    /// The negotiated suite, for reports.
    pub fn cipher_suite(&self) -> Option<est_dtls::CipherSuite> {
        self.client.connection().cipher_suite()
    }

    /// The server's certificate chain, as the handshake delivered it (from the Certificate
    /// message, or the held copy it named by fingerprint).
    pub fn server_chain(&self) -> &[Vec<u8>] {
        self.client.connection().peer_certificates()
    }

    /// The server's CID this meter sends with (empty: none).
    pub fn server_cid(&self) -> &[u8] {
        self.client.connection().peer_cid()
    }

    /// Records the meter's connection now goes through `conn` (a NAT rebinding: a new source
    /// address). With a Connection ID the session carries on; without one the server cannot
    /// tell the datagrams are ours.
    pub fn rebind(&mut self, conn: Arc<dyn Conn + Send + Sync>) {
        self.conn = conn;
    }
}
