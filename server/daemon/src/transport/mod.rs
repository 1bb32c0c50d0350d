//! DTLS 1.2 transport: one UDP socket, many meters, webrtc-dtls for the record layer and handshake.
//!
//! ```text
//!   UDP socket (tokio, or turmoil in tests)  ── DatagramSocket trait (socket.rs)
//!        │ recv_from
//!   demultiplexer task (server.rs)  ── peeks at record headers only (record.rs), never decrypts
//!        │ per peer: mpsc queue ─► PeerConn (webrtc_util::conn::Conn) ─► webrtc_dtls::conn::DTLSConn
//!        │                                                                    │ completed handshake
//!   DtlsListener::accept() ◄── DtlsSession (plaintext datagrams, verified peer chain) ◄─┘
//! ```
//!
//! The DTLS engine is webrtc-dtls 0.12 (RFC 6347 DTLS 1.2, RFC 7925's mandatory suite
//! TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8). It has defects that matter for smart meters on lossy links
//! (measured in `docs/dependencies.md` §2 and its Addendum). The project neither forks nor vendors
//! it; each defect is worked around here, from outside the crate:
//!
//! 1. **Serial accept and no handshake timeout** (`DTLSListener::accept` awaits a whole handshake;
//!    webrtc-rs/webrtc#614). We do not use the crate's listener: every handshake runs in its own task
//!    under `tokio::time::timeout(handshake_timeout)`. Half-open handshakes are bounded by
//!    `max_half_open_handshakes`, sessions by `max_sessions`; ClientHellos over a limit are dropped
//!    and counted.
//! 2. **The webrtc-util UDP demultiplexer never forgets a peer** (a meter returning from the same
//!    IP:port is black-holed forever, and memory leaks). Our own demultiplexer keeps a map of peer
//!    address to virtual connection. Only a datagram whose first record is a ClientHello creates a
//!    peer; peers are removed on close, handshake failure/timeout and idle timeout. A short
//!    tombstone afterwards swallows late duplicates (a stray duplicate ClientHello would otherwise
//!    start a server handshake nobody finishes), but lets a ClientHello with a *new* client random
//!    through, so a meter can re-handshake from the same port at once.
//! 3. **The server never retransmits its final flight** (RFC 6347 §4.2.4; pion/dtls#479,
//!    webrtc-rs/rtc#243): after sending ChangeCipherSpec + Finished the library considers the
//!    handshake done and discards the client's retransmitted flight 5, so if our final flight is
//!    lost the client waits forever (about 20% of handshakes at 20% loss). The virtual connection
//!    records every datagram the server writes from its ChangeCipherSpec onward. After completion,
//!    a datagram from that peer whose first record is a ChangeCipherSpec, an epoch-0 handshake
//!    record that is not a ClientHello, or a handshake record at epoch >= 1 (the client's flight 5
//!    again) makes us re-send the saved datagrams — at most once per 500 ms per peer — and the
//!    duplicate is swallowed. The saved flight is kept until the first application data from the
//!    peer (proof that it has our Finished) or `final_flight_retention` (2 x MSL = 240 s), and also
//!    across a server-side close (in the tombstone).
//! 4. **A ClientHello with a new client random from an address that already has a session** (the
//!    meter rebooted, or its close_notify was lost) must replace that session, or the meter waits
//!    for the idle timeout. Anyone able to spoof the address could then reset sessions, so we check
//!    return routability first, without inventing our own cookie format: the new ClientHello starts
//!    a *candidate* handshake beside the existing session; webrtc-dtls answers it with a
//!    HelloVerifyRequest carrying a fresh random cookie (RFC 6347 §4.2.1) that only the real
//!    address receives. Only when the candidate sends its ServerHello — which the library does only
//!    after the cookie came back — is the old session closed (`CloseReason::Replaced`) and the
//!    candidate promoted. A spoofed ClientHello costs one half-open slot until `handshake_timeout`
//!    and never touches the existing session. (The cookie state itself is per-candidate, i.e.
//!    stateful; it is bounded by the half-open limit and one candidate per address.)
//!    A stateless HMAC cookie exchange of our own in front of the library is not possible: the
//!    library's server always sends its own HelloVerifyRequest and only accepts a first
//!    ClientHello with message_seq 0, while a ClientHello that echoes our cookie has message_seq 1;
//!    rewriting it would change the handshake transcript (RFC 6347 §4.2.6 hashes the DTLS
//!    handshake headers) and break the Finished check. So spoofed ClientHellos from many
//!    addresses can fill the half-open slots for `handshake_timeout`; they are refused and counted
//!    (`dropped_over_limit`), never grow memory beyond the limits.
//! 5. **The library's reader task spins at 100% CPU when `Conn::recv` returns an error.** The
//!    virtual connection's `recv` therefore never fails: on a removed peer it pends; the library's
//!    tasks end when the `DTLSConn` is closed or dropped, and the application learns of the removal
//!    through [`DtlsSession::recv`] returning [`TransportError::Closed`].
//! 6. **CCM_8 is not in the library's default suites**; [`CipherSuiteName`] names the suites we
//!    allow and the default is `[Ccm8, Gcm]`. The library picks the first suite *in the client's
//!    order*, so configure only `Ccm8` to force it.
//! 7. **Client side** (tests, device simulator): the webrtc-dtls client retransmits every
//!    `flight_interval` forever. [`client::connect`] runs each attempt under a timeout and retries
//!    the whole handshake from a fresh session until an overall deadline.
//!
//! Evidence (tests in `server/daemon/tests/`): `transport_sim.rs` runs seeded turmoil
//! simulations at 20% loss — `thousand_handshakes_at_20_percent_loss_all_complete` (25 sims x 40
//! meters x 2 handshakes from the same IP:port, each with a round trip: 2000/2000 complete, none
//! needed a client restart), `final_flight_resend_fixes_hung_handshakes` (the same seeds with the
//! resend switched off leave about one handshake in six hung), and
//! `final_flight_is_resent_after_server_side_close`. `transport_real.rs` covers certificate
//! refusal, the policy hook, garbage, limits, same-port re-handshakes, replacement, the
//! resend rate limit, idle timeout, shutdown and task/memory cleanup on 127.0.0.1.
//!
//! Not available from outside the crate, hence not offered: DTLS Connection ID (RFC 9146),
//! session resumption, exponential retransmission back-off (RFC 6347 §4.2.4.1; the interval is fixed),
//! tls-unique channel binding (the Finished verify_data is private), stateless cookies inside the
//! library's own HelloVerifyRequest.

pub mod client;
mod record;
mod server;
mod socket;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use webrtc_dtls::cipher_suite::CipherSuiteId;

pub use server::{DtlsListener, DtlsSession, TransportMetrics};
pub use socket::{DatagramSocket, SocketConn};

/// Policy hook run during the handshake, after the chain has been verified against the trust
/// anchors: receives the client's certificates (DER, leaf first, as sent). Returning `Err`
/// aborts the handshake with a `bad_certificate` alert (e.g. revoked or not allow-listed device).
pub type PeerCertificateHook = Arc<dyn Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync>;

/// What a [`ClientChainVerifier`] established about a client, kept with the session
/// ([`DtlsSession::peer_verification`]); the caller downcasts it to its own type.
pub type PeerVerification = Arc<dyn std::any::Any + Send + Sync>;

/// Validates the client's certificate chain (DER, leaf first, as sent) during the handshake,
/// in place of webrtc-dtls's own verifier. Returning `Err` aborts the handshake with a
/// `bad_certificate` alert.
///
/// Why: webrtc-dtls 0.12's verifier (`RequireAndVerifyClientCert`) validates the chain on every
/// pass of its flight-4 parser (twice per handshake) and builds a throw-away rcgen root per
/// connection for its fallback (`unwrap_or`, dependencies.md §2), and the EST policy needs to
/// know *which* anchor the path ends in, which that verifier does not tell. With a verifier the
/// library runs in `RequireAnyClientCert` mode: it still requires the Certificate and checks the
/// CertificateVerify signature (proof of possession) before calling us.
pub type ClientChainVerifier =
    Arc<dyn Fn(&[Vec<u8>]) -> Result<PeerVerification, String> + Send + Sync>;

/// Cipher suites we allow (all ECDHE_ECDSA, AES-128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CipherSuiteName {
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (0xC0AE, RFC 7251): mandatory in RFC 7925 §4.4 and RFC 9148 §3.
    Ccm8,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (0xC02B, RFC 5289).
    Gcm,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM (0xC0AC, RFC 7251).
    Ccm,
}

impl CipherSuiteName {
    /// The IANA code point.
    pub fn iana_code(self) -> u16 {
        match self {
            CipherSuiteName::Ccm8 => 0xC0AE,
            CipherSuiteName::Gcm => 0xC02B,
            CipherSuiteName::Ccm => 0xC0AC,
        }
    }

    /// The suite for an IANA code point, if it is one we allow.
    pub fn from_iana_code(code: u16) -> Option<Self> {
        match code {
            0xC0AE => Some(CipherSuiteName::Ccm8),
            0xC02B => Some(CipherSuiteName::Gcm),
            0xC0AC => Some(CipherSuiteName::Ccm),
            _ => None,
        }
    }

    pub(crate) fn to_dtls(self) -> CipherSuiteId {
        match self {
            CipherSuiteName::Ccm8 => CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm_8,
            CipherSuiteName::Gcm => CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
            CipherSuiteName::Ccm => CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm,
        }
    }
}

impl fmt::Display for CipherSuiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CipherSuiteName::Ccm8 => "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
            CipherSuiteName::Gcm => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            CipherSuiteName::Ccm => "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
        })
    }
}

/// Server configuration. Every duration and size carries its unit in the name.
#[derive(Clone)]
pub struct DtlsServerConfig {
    /// Our certificate chain, DER, server certificate first.
    pub certificate_chain_der: Vec<Vec<u8>>,
    /// Our private key, PKCS#8 DER, ECDSA P-256 (webrtc-dtls accepts only P-256 or Ed25519).
    pub private_key_pkcs8_der: Vec<u8>,
    /// Trust anchors for client certificates (manufacturer CAs, our issuing CA). A client
    /// certificate is required and verified (webpki rules: the path is built only from what the
    /// client sends plus these anchors, so intermediates a client does not send must be anchors).
    pub client_trust_anchors_der: Vec<Vec<u8>>,
    /// Optional policy hook run during the handshake.
    pub verify_peer_certificate: Option<PeerCertificateHook>,
    /// Validates client chains instead of webrtc-dtls (then `client_trust_anchors_der` is not
    /// used: the verifier holds its own anchors). Runs once per handshake, before the hook.
    pub client_chain_verifier: Option<ClientChainVerifier>,
    /// Allowed suites. The client's order decides among them.
    pub cipher_suites: Vec<CipherSuiteName>,
    /// Handshake fragmentation size handed to webrtc-dtls, and the largest application datagram
    /// [`DtlsSession::send`] accepts (RFC 7252 §4.6: 1152 bytes when the path MTU is unknown).
    pub mtu_bytes: usize,
    /// webrtc-dtls's fixed handshake retransmission interval.
    pub flight_interval: Duration,
    /// A handshake not completed within this time is abandoned.
    pub handshake_timeout: Duration,
    /// A session that neither received a datagram nor sent one for this long is closed.
    pub idle_timeout: Duration,
    /// Handshakes in progress at once; further new ClientHellos are dropped and counted.
    pub max_half_open_handshakes: usize,
    /// Established sessions plus handshakes in progress.
    pub max_sessions: usize,
    /// Require the extended_master_secret extension (RFC 7627), as RFC 9148 §3 advises.
    pub extended_master_secret_required: bool,
    /// Answer a ClientHello's `use_srtp` extension (RFC 5764 §4.1.1) instead of refusing it.
    /// DTLS stacks written for WebRTC (dimpl, for one) offer it on every handshake; webrtc-dtls
    /// refuses such a client with a fatal insufficient_security alert unless the server lists a
    /// matching SRTP profile. With this set the server lists all four profiles webrtc-dtls knows,
    /// echoes the extension, and never exports SRTP keys: the session carries CoAP only.
    pub answer_use_srtp: bool,
    /// Re-send our saved final flight when the client's flight 5 comes back (RFC 6347 §4.2.4).
    /// Only tests turn this off, to show the library defect.
    pub final_flight_resend: bool,
    /// How long a saved final flight is kept when no application data arrives (2 x MSL).
    pub final_flight_retention: Duration,
    /// How long a closed peer's address keeps swallowing late duplicates.
    pub tombstone_duration: Duration,
    /// SO_RCVBUF requested by [`DtlsListener::bind_udp`] (0: leave the OS default, often 208 KiB,
    /// which a burst of handshake flights can overflow). Linux caps it at `net.core.rmem_max`.
    pub socket_receive_buffer_bytes: usize,
}

impl Default for DtlsServerConfig {
    fn default() -> Self {
        DtlsServerConfig {
            certificate_chain_der: Vec::new(),
            private_key_pkcs8_der: Vec::new(),
            client_trust_anchors_der: Vec::new(),
            verify_peer_certificate: None,
            client_chain_verifier: None,
            cipher_suites: vec![CipherSuiteName::Ccm8, CipherSuiteName::Gcm],
            mtu_bytes: 1152,
            flight_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_half_open_handshakes: 1024,
            max_sessions: 20_000,
            extended_master_secret_required: true,
            answer_use_srtp: true,
            final_flight_resend: true,
            final_flight_retention: Duration::from_secs(240),
            tombstone_duration: Duration::from_secs(30),
            socket_receive_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for DtlsServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("DtlsServerConfig")
            .field("certificate_chain_len", &self.certificate_chain_der.len())
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
            .field(
                "extended_master_secret_required",
                &self.extended_master_secret_required,
            )
            .field("final_flight_resend", &self.final_flight_resend)
            .field("final_flight_retention", &self.final_flight_retention)
            .field("tombstone_duration", &self.tombstone_duration)
            .field(
                "socket_receive_buffer_bytes",
                &self.socket_receive_buffer_bytes,
            )
            .finish()
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent close_notify or a fatal alert.
    PeerClosed,
    /// We closed it ([`DtlsSession::close`] or drop).
    LocalClose,
    /// No traffic for `idle_timeout`.
    IdleTimeout,
    /// The same address completed a return-routability check for a new handshake.
    Replaced,
    /// The listener shut down.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::PeerClosed => "closed by peer",
            CloseReason::LocalClose => "closed locally",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::Replaced => "replaced by a new handshake from the same address",
            CloseReason::Shutdown => "listener shut down",
        })
    }
}

/// Errors of the DTLS transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid DTLS configuration: {0}")]
    Config(String),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("DTLS handshake failed: {0}")]
    Handshake(String),
    #[error("DTLS handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
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

/// Install rustls' ring provider as the process default, if none is installed yet.
/// webrtc-dtls builds rustls verifiers, which panic when both ring and aws-lc-rs are compiled in
/// and no default was chosen (webrtc-rs/webrtc#567).
pub(crate) fn ensure_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Our certificate and key in webrtc-dtls form.
pub(crate) fn load_certificate(
    chain_der: &[Vec<u8>],
    key_pkcs8_der: &[u8],
) -> Result<webrtc_dtls::crypto::Certificate, TransportError> {
    if chain_der.is_empty() {
        return Err(TransportError::Config("certificate chain is empty".into()));
    }
    let key_pair = rcgen::KeyPair::try_from(key_pkcs8_der)
        .map_err(|e| TransportError::Config(format!("private key is not usable PKCS#8: {e}")))?;
    if !key_pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
        return Err(TransportError::Config(
            "private key must be ECDSA P-256 (RFC 7925 §4.4)".into(),
        ));
    }
    let private_key = webrtc_dtls::crypto::CryptoPrivateKey::from_key_pair(&key_pair)
        .map_err(|e| TransportError::Config(format!("private key rejected by webrtc-dtls: {e}")))?;
    Ok(webrtc_dtls::crypto::Certificate {
        certificate: chain_der
            .iter()
            .map(|der| rustls::pki_types::CertificateDer::from(der.clone()))
            .collect(),
        private_key,
    })
}

/// A rustls root store from DER trust anchors.
pub(crate) fn root_store(
    anchors_der: &[Vec<u8>],
    what: &str,
) -> Result<rustls::RootCertStore, TransportError> {
    if anchors_der.is_empty() {
        return Err(TransportError::Config(format!("{what} is empty")));
    }
    let mut store = rustls::RootCertStore::empty();
    for (index, der) in anchors_der.iter().enumerate() {
        store
            .add(rustls::pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| TransportError::Config(format!("{what}[{index}] rejected: {e}")))?;
    }
    Ok(store)
}

pub(crate) fn dtls_cipher_suites(
    suites: &[CipherSuiteName],
) -> Result<Vec<CipherSuiteId>, TransportError> {
    if suites.is_empty() {
        return Err(TransportError::Config("cipher_suites is empty".into()));
    }
    Ok(suites.iter().map(|s| s.to_dtls()).collect())
}
