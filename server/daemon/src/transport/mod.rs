//! DTLS 1.2 transport: one UDP socket, many meters, our own sans-IO engine (`est-dtls`).
//!
//! ```text
//!   UDP socket (tokio, or turmoil in tests)  ── DatagramSocket trait (socket.rs)
//!        │ recv_from / send_to
//!   driver task (server.rs) ── owns est_dtls::Endpoint: stateless cookies, admission limits,
//!        │                      retransmission with back-off, Connection ID, records
//!   DtlsListener::accept() ◄── DtlsSession (plaintext datagrams, verified peer chain)
//! ```
//!
//! Until 2026-12 the server ran webrtc-dtls behind a demultiplexer of our own, with workarounds
//! for its defects (no stateless cookies, no back-off, no final-flight resend, no Connection
//! ID). Those could not all be fixed from outside the crate (docs/design.md §1 and §5), so the
//! server now runs `server/dtls`; webrtc-dtls remains a meter-side stack of client-sim (which the
//! transport tests use as their client).
//!
//! Evidence: the engine's own tests on virtual time (`server/dtls/tests`), `transport_sim.rs`
//! (turmoil, 20% loss), `transport_real.rs` (real sockets: refusals, limits, replacement,
//! idle timeout, shutdown), and the interop tests in `tests/`: libcoap (GnuTLS, OpenSSL) and
//! webrtc-dtls against the server; `openssl s_client`, Mbed TLS's `ssl_client2` (Connection
//! ID, a NAT port change) and Go's pion/dtls against the engine (`interop_dtls.rs`).

mod identities;
mod server;
mod socket;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use server::{DtlsListener, DtlsSession, TransportMetrics};
pub use socket::DatagramSocket;

pub use est_dtls::{CertError, CloseReason, IpPrefix, PeerAddr};

/// Policy hook run during the handshake, after the chain has been verified against the trust
/// anchors: receives the client's certificates (DER, leaf first, as sent). Returning `Err`
/// aborts the handshake with a `bad_certificate` alert (e.g. revoked or not allow-listed device).
pub type PeerCertificateHook = Arc<dyn Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync>;

/// What a [`ClientChainVerifier`] established about a client, kept with the session
/// ([`DtlsSession::peer_verification`]); the caller downcasts it to its own type.
pub type PeerVerification = Arc<dyn std::any::Any + Send + Sync>;

/// A client chain that a [`ClientChainVerifier`] accepted.
#[derive(Clone)]
pub struct VerifiedClient {
    /// The device's identity, for the per-identity session limit (e.g. its serial number);
    /// empty: the SHA-256 of the leaf certificate.
    pub identity: Vec<u8>,
    /// What the verifier established, kept with the session.
    pub verification: PeerVerification,
    /// The leaf as the verifier parsed it, if it did: exactly the chain's first certificate
    /// ([`est_dtls::Verified::leaf`]); the engine then does not parse it again.
    pub leaf: Option<Arc<x509_cert::Certificate>>,
}

/// Validates the client's certificate chain (DER, leaf first, as sent) once per handshake,
/// before the CertificateVerify (proof of possession) is checked. The error's kind picks the
/// alert (bad_certificate, unknown_ca, certificate_expired, access_denied) and the refusal
/// counter. The EST policy uses it to record *which* anchor the path ends in.
pub type ClientChainVerifier =
    Arc<dyn Fn(&[Vec<u8>]) -> Result<VerifiedClient, CertError> + Send + Sync>;

/// Cipher suites we allow (all ECDHE_ECDSA with an AEAD). The 16-byte-tag
/// TLS_ECDHE_ECDSA_WITH_AES_128_CCM (0xC0AC) is not among them: the engine does not implement it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CipherSuiteName {
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (0xC0AE, RFC 7251): mandatory in RFC 7925 §4.4 and RFC 9148 §3.
    Ccm8,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (0xC02B, RFC 5289).
    Gcm,
    /// TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 (0xC02C, RFC 5289).
    Gcm256,
}

impl CipherSuiteName {
    /// Every suite, in the engine's default order of preference.
    pub const ALL: [CipherSuiteName; 3] = [
        CipherSuiteName::Ccm8,
        CipherSuiteName::Gcm,
        CipherSuiteName::Gcm256,
    ];

    /// The IANA code point.
    pub fn iana_code(self) -> u16 {
        self.to_engine().code()
    }

    /// The suite for an IANA code point, if it is one we allow.
    pub fn from_iana_code(code: u16) -> Option<Self> {
        est_dtls::CipherSuite::from_u16(code).map(Self::from_engine)
    }

    /// The name used in the configuration file (`dtls.cipher_suites`).
    pub fn config_name(self) -> &'static str {
        match self {
            CipherSuiteName::Ccm8 => "ccm8",
            CipherSuiteName::Gcm => "gcm",
            CipherSuiteName::Gcm256 => "gcm256",
        }
    }

    /// The suite a configuration name stands for.
    pub fn from_config_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.config_name() == name)
    }

    /// The engine's suite.
    pub(crate) fn to_engine(self) -> est_dtls::CipherSuite {
        match self {
            CipherSuiteName::Ccm8 => est_dtls::CipherSuite::Aes128Ccm8,
            CipherSuiteName::Gcm => est_dtls::CipherSuite::Aes128Gcm,
            CipherSuiteName::Gcm256 => est_dtls::CipherSuite::Aes256Gcm,
        }
    }

    pub(crate) fn from_engine(s: est_dtls::CipherSuite) -> CipherSuiteName {
        match s {
            est_dtls::CipherSuite::Aes128Ccm8 => CipherSuiteName::Ccm8,
            est_dtls::CipherSuite::Aes128Gcm => CipherSuiteName::Gcm,
            est_dtls::CipherSuite::Aes256Gcm => CipherSuiteName::Gcm256,
        }
    }
}

impl fmt::Display for CipherSuiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_engine().iana_name())
    }
}

/// Server configuration. Every duration and size carries its unit in the name.
#[derive(Clone)]
pub struct DtlsServerConfig {
    /// Our certificate chain, DER, server certificate first.
    pub certificate_chain_der: Vec<Vec<u8>>,
    /// Send all of `certificate_chain_der` in the handshake (true), or only its first
    /// certificate (false: every client must hold the server certificate's issuer as an anchor).
    pub send_chain: bool,
    /// RFC 7924 cached_info: a client naming our Certificate message by its current fingerprint
    /// gets the fingerprint instead of the chain.
    pub cached_info: bool,
    /// C509 certificates in the handshake under this TLS certificate type number (RFC 7250);
    /// `None`: X.509 only.
    pub c509_certificate_type: Option<u8>,
    /// Our private key, PKCS#8 DER, ECDSA P-256 or P-384.
    pub private_key_pkcs8_der: Vec<u8>,
    /// Trust anchors for client certificates, used when no `client_chain_verifier` is set: the
    /// chain is validated with rustls-webpki (path built from what the client sends plus these).
    pub client_trust_anchors_der: Vec<Vec<u8>>,
    /// Optional policy hook run during the handshake, after the chain verified.
    pub verify_peer_certificate: Option<PeerCertificateHook>,
    /// Validates client chains instead of `client_trust_anchors_der`. Runs once per handshake,
    /// before the hook.
    pub client_chain_verifier: Option<ClientChainVerifier>,
    /// Allowed suites, in the server's order of preference (the first one the client also
    /// offers is chosen).
    pub cipher_suites: Vec<CipherSuiteName>,
    /// Largest datagram sent, handshake flights included (records packed, messages
    /// fragmented to fit), and the largest application datagram [`DtlsSession::send`] takes
    /// (RFC 7252 §4.6: 1152 bytes when the path MTU is unknown).
    pub mtu_bytes: usize,
    /// Initial handshake retransmission timeout; it doubles up to `retransmit_max`
    /// (RFC 6347 §4.2.4.1).
    pub flight_interval: Duration,
    pub retransmit_max: Duration,
    /// A handshake not completed within this time is abandoned.
    pub handshake_timeout: Duration,
    /// A handshake past the cookie that receives nothing for this long is abandoned.
    pub handshake_stall_timeout: Duration,
    /// A session that neither received a datagram nor sent one for this long is closed.
    pub idle_timeout: Duration,
    /// Handshakes past the cookie exchange at once; at the cap the oldest gives way.
    pub max_half_open_handshakes: usize,
    /// Handshakes past the cookie exchange from one IP address.
    pub max_half_open_per_ip: usize,
    /// Established sessions plus handshakes in progress; over it a fatal alert.
    pub max_sessions: usize,
    /// Established sessions of one device identity; a new one replaces the oldest.
    pub max_sessions_per_identity: usize,
    /// Established sessions from one IP address (`session_limit_exempt_ips` are exempt).
    pub max_sessions_per_ip: usize,
    /// Addresses exempt from the per-IP limits (DCU relays).
    pub session_limit_exempt_ips: Vec<std::net::IpAddr>,
    /// Join proxies (DCU relays) allowed to send JPY messages to the JPY socket
    /// ([`DtlsListener::bind_with_jpy`]); JPY from any other source is dropped and counted. A
    /// stateful proxy's circuits from these prefixes count under the per-relay caps.
    pub jpy_allowed_proxies: Vec<IpPrefix>,
    /// Longest JPY header accepted (the draft: SHOULD be at most 32 bytes).
    pub jpy_max_header_bytes: usize,
    /// Handshakes past the cookie exchange of one join proxy's meters.
    pub max_half_open_per_relay: usize,
    /// Established sessions of one join proxy's meters.
    pub max_sessions_per_relay: usize,
    /// Require the extended_master_secret extension (RFC 7627), as RFC 9148 §3 advises.
    pub extended_master_secret_required: bool,
    /// Answer a ClientHello's use_srtp offer (RFC 5764) instead of ignoring it: WebRTC-derived
    /// DTLS stacks (dimpl) refuse a server that does not. No SRTP keys are exported.
    pub answer_use_srtp: bool,
    /// How long our final flight is kept to answer a repeated client flight 5 (2 x MSL).
    pub final_flight_retention: Duration,
    /// Cookie HMAC key rotation interval.
    pub cookie_rotation_interval: Duration,
    /// Length of the Connection IDs we issue (RFC 9146); 0 turns CID off.
    pub cid_length: usize,
    /// Leading bytes of every CID (a node id for CID-routing load balancers).
    pub cid_prefix: Vec<u8>,
    /// Log lines about remote peers per second, in total.
    pub max_log_lines_per_sec: u32,
    /// SO_RCVBUF requested by [`DtlsListener::bind_udp`] (0: leave the OS default, often 208 KiB,
    /// which a burst of handshake flights can overflow). Linux caps it at `net.core.rmem_max`.
    pub socket_receive_buffer_bytes: usize,
    /// Engine shards: independent DTLS endpoints, each a task of its own, so that handshakes
    /// run on several cores (one endpoint does every handshake's ECDHE and signatures on one
    /// core). 1: one endpoint reads the socket itself. More: a dispatcher task reads the socket
    /// and hands each datagram to a shard chosen by the Connection ID's shard byte (a record
    /// of content type tls12_cid) or else by a keyed hash of the peer (address and port, or
    /// join proxy and header). Every cap is shared out among the shards (rounded up) but the
    /// per-identity limit, which holds across the shards (their drivers share a registry of
    /// the sessions per identity).
    pub engine_shards: usize,
    /// Established sessions waiting for [`DtlsListener::accept`]; over it a new session is
    /// closed at once (counted: `sessions_dropped_accept_queue_full`).
    pub accept_queue_sessions: usize,
    /// Plaintext datagrams queued for one session task; over it they are dropped (counted:
    /// `dropped_queue_full`; CoAP retransmits).
    pub session_queue_datagrams: usize,
    /// Bytes queued for one session task, whatever the datagram count (DTLS allows 16 KiB
    /// records: without a byte budget 32 of them could wait per session).
    pub session_queue_bytes: usize,
    /// Commands from sessions to the driver (sends, closes). A sending session waits for room;
    /// a dropped session's close request is lost when it is full (counted:
    /// `close_commands_dropped`) and the session ends at its idle timeout. With several engine
    /// shards a per-identity supersede from another shard that finds it full waits for room
    /// (counted: `supersedes_deferred`).
    pub command_queue_len: usize,
    /// Datagrams waiting for one engine shard (with `engine_shards` > 1); over it they are
    /// dropped (counted: `dropped_queue_full`), like a full socket buffer.
    pub shard_inbox_datagrams: usize,
}

impl Default for DtlsServerConfig {
    fn default() -> Self {
        DtlsServerConfig {
            certificate_chain_der: Vec::new(),
            send_chain: true,
            cached_info: true,
            c509_certificate_type: None,
            private_key_pkcs8_der: Vec::new(),
            client_trust_anchors_der: Vec::new(),
            verify_peer_certificate: None,
            client_chain_verifier: None,
            cipher_suites: vec![CipherSuiteName::Ccm8, CipherSuiteName::Gcm],
            mtu_bytes: 1152,
            flight_interval: Duration::from_secs(1),
            retransmit_max: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(60),
            handshake_stall_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_half_open_handshakes: 1024,
            // Per-IP limits default to the global ones: meters behind one NAT, a DCU relay or a
            // load generator share an address. Lower them where meters have their own.
            max_half_open_per_ip: 1024,
            max_sessions: 20_000,
            max_sessions_per_identity: 4,
            max_sessions_per_ip: 20_000,
            session_limit_exempt_ips: Vec::new(),
            jpy_allowed_proxies: Vec::new(),
            jpy_max_header_bytes: 64,
            max_half_open_per_relay: 512,
            max_sessions_per_relay: 20_000,
            extended_master_secret_required: true,
            answer_use_srtp: false,
            final_flight_retention: Duration::from_secs(240),
            cookie_rotation_interval: Duration::from_secs(60),
            cid_length: 4,
            cid_prefix: Vec::new(),
            max_log_lines_per_sec: 20,
            socket_receive_buffer_bytes: 4 * 1024 * 1024,
            engine_shards: 1,
            accept_queue_sessions: 1024,
            session_queue_datagrams: 32,
            session_queue_bytes: 32 * 1024,
            command_queue_len: 4096,
            shard_inbox_datagrams: 1024,
        }
    }
}

impl fmt::Debug for DtlsServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("DtlsServerConfig")
            .field("certificate_chain_len", &self.certificate_chain_der.len())
            .field("send_chain", &self.send_chain)
            .field("cached_info", &self.cached_info)
            .field(
                "client_trust_anchors_len",
                &self.client_trust_anchors_der.len(),
            )
            .field(
                "verify_peer_certificate",
                &self.verify_peer_certificate.is_some(),
            )
            .field(
                "client_chain_verifier",
                &self.client_chain_verifier.is_some(),
            )
            .field("cipher_suites", &self.cipher_suites)
            .field("mtu_bytes", &self.mtu_bytes)
            .field("flight_interval", &self.flight_interval)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_half_open_handshakes", &self.max_half_open_handshakes)
            .field("max_sessions", &self.max_sessions)
            .field("cid_length", &self.cid_length)
            .finish_non_exhaustive()
    }
}

/// The engine's configuration from ours: credentials loaded, verifier and hook wrapped (a
/// panicking verifier or hook refuses the handshake instead of taking the driver down).
pub(crate) fn build_engine_config(
    cfg: &DtlsServerConfig,
) -> Result<est_dtls::ServerConfig, TransportError> {
    let Some(leaf) = cfg.certificate_chain_der.first() else {
        return Err(TransportError::Config("certificate chain is empty".into()));
    };
    let key = est_dtls::SigningKey::from_pkcs8(&cfg.private_key_pkcs8_der).map_err(|e| {
        TransportError::Config(format!(
            "private key must be ECDSA P-256 or P-384 PKCS#8: {e}"
        ))
    })?;
    if cfg.cipher_suites.is_empty() {
        return Err(TransportError::Config("cipher_suites is empty".into()));
    }
    let suites: Vec<est_dtls::CipherSuite> =
        cfg.cipher_suites.iter().map(|s| s.to_engine()).collect();
    let verifier: ClientChainVerifier = match &cfg.client_chain_verifier {
        Some(v) => v.clone(),
        None => anchors_verifier(&cfg.client_trust_anchors_der)?,
    };
    let hook = cfg.verify_peer_certificate.clone();
    let chain_verifier: est_dtls::ChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
        let run = std::panic::AssertUnwindSafe(|| -> Result<VerifiedClient, CertError> {
            let v = verifier(chain)?;
            if let Some(hook) = &hook {
                hook(chain).map_err(CertError::BadCertificate)?;
            }
            Ok(v)
        });
        match std::panic::catch_unwind(run) {
            Ok(Ok(v)) => Ok(est_dtls::Verified {
                identity: v.identity,
                context: Some(v.verification),
                leaf: v.leaf,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CertError::BadCertificate(
                "certificate verifier or policy hook panicked".into(),
            )),
        }
    });
    let sent: &[Vec<u8>] = if cfg.send_chain {
        &cfg.certificate_chain_der
    } else {
        std::slice::from_ref(leaf)
    };
    let mut e = est_dtls::ServerConfig::new(sent.to_vec(), Arc::new(key), chain_verifier);
    e.cached_info = cfg.cached_info;
    e.c509 = cfg.c509_certificate_type.map(est_dtls::C509Codec::type3);
    e.cipher_suites = suites;
    e.require_extended_master_secret = cfg.extended_master_secret_required;
    e.answer_use_srtp = cfg.answer_use_srtp;
    e.mtu_bytes = cfg.mtu_bytes;
    e.retransmit = est_dtls::RetransmitConfig {
        initial: cfg.flight_interval,
        max: cfg.retransmit_max.max(cfg.flight_interval),
    };
    e.handshake_timeout = cfg.handshake_timeout;
    e.handshake_stall_timeout = cfg.handshake_stall_timeout;
    e.idle_timeout = cfg.idle_timeout;
    e.final_flight_retention = cfg.final_flight_retention;
    e.cookie_rotation_interval = cfg.cookie_rotation_interval;
    e.cid_length = cfg.cid_length;
    e.cid_prefix = cfg.cid_prefix.clone();
    e.limits = est_dtls::Limits {
        max_half_open: cfg.max_half_open_handshakes.min(cfg.max_sessions),
        max_half_open_per_ip: cfg.max_half_open_per_ip,
        max_sessions: cfg.max_sessions,
        max_sessions_per_identity: cfg.max_sessions_per_identity,
        max_sessions_per_ip: cfg.max_sessions_per_ip,
        exempt_ips: cfg.session_limit_exempt_ips.clone(),
        max_half_open_per_relay: cfg.max_half_open_per_relay,
        max_sessions_per_relay: cfg.max_sessions_per_relay,
        relay_prefixes: cfg.jpy_allowed_proxies.clone(),
        max_log_lines_per_sec: cfg.max_log_lines_per_sec,
        ..est_dtls::Limits::default()
    };
    e.validate().map_err(TransportError::Config)?;
    Ok(e)
}

/// A verifier that validates client chains against DER trust anchors with rustls-webpki
/// (clientAuth usage, P-256/P-384 ECDSA).
fn anchors_verifier(anchors_der: &[Vec<u8>]) -> Result<ClientChainVerifier, TransportError> {
    if anchors_der.is_empty() {
        return Err(TransportError::Config(
            "client_trust_anchors_der is empty and no client_chain_verifier is set".into(),
        ));
    }
    let anchors: Vec<rustls_pki_types::TrustAnchor<'static>> = anchors_der
        .iter()
        .enumerate()
        .map(|(i, der)| {
            webpki::anchor_from_trusted_cert(&rustls_pki_types::CertificateDer::from(
                der.as_slice(),
            ))
            .map(|a| a.to_owned())
            .map_err(|e| TransportError::Config(format!("client_trust_anchors_der[{i}]: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(move |chain: &[Vec<u8>]| {
        verify_client_chain(&anchors, chain, rustls_pki_types::UnixTime::now())?;
        Ok(VerifiedClient {
            identity: Vec::new(),
            verification: Arc::new(()) as PeerVerification,
            leaf: None,
        })
    }))
}

/// Validates a client chain (leaf first, then intermediates) against `anchors` with
/// rustls-webpki: clientAuth usage, ECDSA P-256/SHA-256 or P-384/SHA-384, valid at `now`. An
/// unknown issuer is [`CertError::UnknownCa`], an expired or not yet valid certificate
/// [`CertError::Expired`], anything else [`CertError::BadCertificate`].
pub fn verify_client_chain(
    anchors: &[rustls_pki_types::TrustAnchor<'_>],
    chain: &[Vec<u8>],
    now: rustls_pki_types::UnixTime,
) -> Result<(), CertError> {
    let leaf_der = chain
        .first()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
        .ok_or_else(|| CertError::BadCertificate("no certificate".into()))?;
    let leaf = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    let intermediates: Vec<rustls_pki_types::CertificateDer<'_>> = chain
        .iter()
        .skip(1)
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
        .collect();
    leaf.verify_for_usage(
        &[
            webpki::ring::ECDSA_P256_SHA256,
            webpki::ring::ECDSA_P384_SHA384,
        ],
        anchors,
        &intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer => CertError::UnknownCa(e.to_string()),
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            CertError::Expired(e.to_string())
        }
        other => CertError::BadCertificate(other.to_string()),
    })?;
    Ok(())
}

/// Errors of the DTLS transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid DTLS configuration: {0}")]
    Config(String),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("DTLS session closed: {0}")]
    Closed(CloseReason),
    #[error("receive buffer too small for the datagram (it was discarded)")]
    BufferTooSmall,
    #[error("datagram of {len} bytes exceeds the limit of {max_bytes} bytes")]
    DatagramTooLarge { len: usize, max_bytes: usize },
    #[error("DTLS error: {0}")]
    Dtls(String),
    #[error("the listener has shut down")]
    ListenerClosed,
}
