//! The `native` meter DTLS stack: the client mode of our own engine (`est-dtls`), pumped over a
//! [`Conn`]. It speaks the RFC 9148 profile (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, P-256, EMS),
//! backs off its retransmissions exponentially from `flight_interval` (RFC 6347 §4.2.4.1),
//! and can offer a Connection ID (RFC 9146) so that a meter whose NAT rebinds keeps its session.
//!
//! The server certificate is checked by rustls's webpki verifier over the meter's Implicit TA
//! database (RFC 9148 §3), as the other backends do. Meters keep their ClientHellos small
//! (`lean_hello`), can name the server certificate they hold with RFC 7924 cached_info, and can
//! send (and receive) certificates as C509 (RFC 7250 negotiation, X.509 as the fallback).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use est_dtls::{CertError, ChainVerifier, Client, ClientConfig, ConnEvent, SigningKey, Verified};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use webrtc_util::conn::Conn;

use crate::dtls::{recv_until, send_queued, server_verifier, DtlsClientConfig, SessionError};
use crate::meter::{Credential, FailureReason};

/// Largest datagram read.
const RECV_BUF: usize = 2048;
/// Engine configurations kept (one per credential and settings). A load-test fleet has 2,048
/// devices by default; with fewer slots than devices every handshake rebuilt its configuration
/// (a PKCS#8 parse with a P-256 point multiplication) after a linear scan of the cache.
const MAX_CACHED: usize = 16_384;
/// The largest retransmission interval the back-off reaches.
const RETRANSMIT_MAX: Duration = Duration::from_secs(60);

/// What an engine configuration is built from.
struct ConfigKey {
    key_pkcs8_der: Vec<u8>,
    chain_der: Vec<Vec<u8>>,
    server_name: String,
    mtu: usize,
    flight_interval: Duration,
    handshake_timeout: Duration,
    connection_id: bool,
    danger_skip_server_verification: bool,
    trust_anchors_der: Vec<Vec<u8>>,
    /// The server chain offered with cached_info (empty: none).
    cached_server_chain: Vec<Vec<u8>>,
    c509_certificate_type: Option<u8>,
}

/// The server chain a meter offers with cached_info (empty: none).
fn cached_chain(cfg: &DtlsClientConfig) -> &[Vec<u8>] {
    if cfg.cached_info {
        &cfg.server_chain_der
    } else {
        &[]
    }
}

impl ConfigKey {
    fn of(cfg: &DtlsClientConfig, cred: &Credential) -> ConfigKey {
        ConfigKey {
            key_pkcs8_der: cred.key_pkcs8_der.clone(),
            chain_der: cred.chain_der.clone(),
            server_name: cfg.server_name.clone(),
            mtu: cfg.mtu,
            flight_interval: cfg.flight_interval,
            handshake_timeout: cfg.handshake_timeout,
            connection_id: cfg.connection_id,
            danger_skip_server_verification: cfg.danger_skip_server_verification,
            trust_anchors_der: cfg.trust_anchors_der.clone(),
            cached_server_chain: cached_chain(cfg).to_vec(),
            c509_certificate_type: cfg.c509_certificate_type,
        }
    }

    /// Whether this key was made from `cfg` and `cred` (compared in place: a lookup copies
    /// nothing).
    fn matches(&self, cfg: &DtlsClientConfig, cred: &Credential) -> bool {
        self.key_pkcs8_der == cred.key_pkcs8_der
            && self.chain_der == cred.chain_der
            && self.server_name == cfg.server_name
            && self.mtu == cfg.mtu
            && self.flight_interval == cfg.flight_interval
            && self.handshake_timeout == cfg.handshake_timeout
            && self.connection_id == cfg.connection_id
            && self.danger_skip_server_verification == cfg.danger_skip_server_verification
            && self.trust_anchors_der == cfg.trust_anchors_der
            && self.cached_server_chain == cached_chain(cfg)
            && self.c509_certificate_type == cfg.c509_certificate_type
    }
}

/// The hash a configuration is filed under: the meter's key and certificate (what differs
/// between meters); the settings are compared on a hit.
fn config_hash(cred: &Credential) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cred.key_pkcs8_der.hash(&mut h);
    cred.chain_der.hash(&mut h);
    h.finish()
}

/// Built configurations by [`config_hash`]; emptied when it reaches [`MAX_CACHED`] entries.
#[derive(Default)]
struct ConfigCache {
    by_hash: HashMap<u64, Vec<(ConfigKey, Arc<ClientConfig>)>>,
    len: usize,
}
static CONFIGS: Mutex<Option<ConfigCache>> = Mutex::new(None);

/// The engine's configuration for a meter, built once per credential and settings.
fn config(cfg: &DtlsClientConfig, cred: &Credential) -> Result<Arc<ClientConfig>, FailureReason> {
    let hash = config_hash(cred);
    {
        let cache = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
        let hit = cache
            .as_ref()
            .and_then(|m| m.by_hash.get(&hash))
            .and_then(|v| v.iter().find(|(k, _)| k.matches(cfg, cred)));
        if let Some((_, c)) = hit {
            return Ok(c.clone());
        }
    }
    // Built outside the lock: meters of other devices need not wait for this one.
    let c = build_config(cfg, cred)?;
    let mut cache = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(ConfigCache::default);
    if cache.len >= MAX_CACHED {
        cache.by_hash.clear();
        cache.len = 0;
    }
    let slot = cache.by_hash.entry(hash).or_default();
    if let Some((_, built)) = slot.iter().find(|(k, _)| k.matches(cfg, cred)) {
        // Another meter of the same device built it meanwhile: share one.
        return Ok(built.clone());
    }
    slot.push((ConfigKey::of(cfg, cred), c.clone()));
    cache.len += 1;
    Ok(c)
}

fn build_config(
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<Arc<ClientConfig>, FailureReason> {
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
    let cached = cached_chain(cfg);
    if !cached.is_empty() {
        c.cached_server_chains = vec![cached.to_vec()];
    }
    c.c509 = cfg.c509_certificate_type.map(est_dtls::C509Codec::type3);
    Ok(Arc::new(c))
}

/// RFC 9148 §3 / RFC 7925 §4.4.1: the server's chain leads to the Implicit TA and names the
/// server.
fn server_check(cfg: &DtlsClientConfig) -> Result<ChainVerifier, FailureReason> {
    if cfg.danger_skip_server_verification {
        return Ok(Arc::new(|_chain: &[Vec<u8>]| {
            Ok(Verified {
                identity: Vec::new(),
                context: None,
                leaf: None,
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
                leaf: None,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn credential(tag: u8) -> Credential {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        Credential {
            // The engine does not read its own chain until a handshake: any bytes do here.
            chain_der: vec![vec![0x30, 0x03, 0x02, 0x01, tag]],
            key_pkcs8_der: key.as_ref().to_vec(),
        }
    }

    fn settings() -> DtlsClientConfig {
        DtlsClientConfig {
            backend: crate::dtls::DtlsBackend::Native,
            danger_skip_server_verification: true,
            ..DtlsClientConfig::default()
        }
    }

    #[test]
    fn a_configuration_is_built_once_per_credential_and_settings() {
        let cfg = settings();
        let a = credential(1);
        let first = config(&cfg, &a).unwrap();
        assert!(Arc::ptr_eq(&first, &config(&cfg, &a).unwrap()));
        // Another meter: its own configuration.
        let b = credential(2);
        assert!(!Arc::ptr_eq(&first, &config(&cfg, &b).unwrap()));
        // The same meter with other settings: another configuration.
        let other = DtlsClientConfig {
            mtu: cfg.mtu / 2,
            ..settings()
        };
        let smaller = config(&other, &a).unwrap();
        assert!(!Arc::ptr_eq(&first, &smaller));
        assert_eq!(smaller.mtu_bytes, cfg.mtu / 2);
        // Server verification on or off never shares a configuration.
        let verifying = DtlsClientConfig {
            danger_skip_server_verification: false,
            trust_anchors_der: Vec::new(),
            ..settings()
        };
        assert!(
            config(&verifying, &a).is_err(),
            "no trust anchor: the verifier cannot be built, so no skipped check is reused"
        );
    }

    #[test]
    fn a_fleet_larger_than_the_old_256_slots_stays_cached() {
        let cfg = settings();
        let creds: Vec<Credential> = (0..300u32).map(|i| credential(i as u8)).collect();
        let built: Vec<Arc<ClientConfig>> =
            creds.iter().map(|c| config(&cfg, c).unwrap()).collect();
        // Round-robin again, as loadtest's meters go through the fleet: every one is a hit.
        for (c, b) in creds.iter().zip(&built) {
            assert!(Arc::ptr_eq(b, &config(&cfg, c).unwrap()));
        }
    }

    #[test]
    fn a_bad_key_is_refused() {
        let cred = Credential {
            chain_der: vec![vec![0x30, 0x00]],
            key_pkcs8_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        };
        assert!(matches!(
            config(&settings(), &cred),
            Err(FailureReason::Credentials(_))
        ));
    }
}
