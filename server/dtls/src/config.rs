//! Configuration of both roles. Every duration and size carries its unit in the name; every
//! limit a peer can push against is here, with its counter in [`crate::Metrics`].

use std::any::Any;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::crypto::{CipherSuite, NamedGroup, SignatureScheme, SigningKey};
use crate::error::CertError;

/// What a verifier established about a peer's certificate chain.
#[derive(Clone, Default)]
pub struct Verified {
    /// The peer's identity for the per-identity session limit (e.g. the device serial). Empty:
    /// the SHA-256 of the leaf certificate is used.
    pub identity: Vec<u8>,
    /// Whatever the verifier wants the application to have with the session.
    pub context: Option<Arc<dyn Any + Send + Sync>>,
    /// The leaf (the chain's first certificate) as the verifier parsed it, if it did. It must
    /// be exactly that certificate: the engine then reads the key that must sign the
    /// CertificateVerify, and its keyUsage, from it instead of parsing the leaf again, and
    /// drops it (a parsed certificate is not kept with the session). `None`: the engine
    /// parses the leaf itself.
    pub leaf: Option<Arc<x509_cert::Certificate>>,
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("identity", &String::from_utf8_lossy(&self.identity))
            .field("context", &self.context.is_some())
            .field("leaf", &self.leaf.is_some())
            .finish()
    }
}

/// Validates a peer's certificate chain (DER, leaf first, as sent). Runs once per handshake,
/// before the CertificateVerify (proof of possession) is checked.
pub type ChainVerifier = Arc<dyn Fn(&[Vec<u8>]) -> Result<Verified, CertError> + Send + Sync>;

/// Converts one certificate between its DER and another encoding.
pub type CertConverter = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// The C509 certificate type (draft-ietf-cose-cbor-encoded-cert-20 §8.20 "TLS Certificate
/// Types": negotiated with RFC 7250's client_certificate_type and server_certificate_type). The
/// Certificate message keeps the layout of RFC 5246 §7.4.2 with each entry a C509 certificate,
/// `c509_data`, the CBOR array `C509Certificate` (draft -18 carried the unwrapped sequence
/// `~C509Certificate`, one byte shorter; -20 changed it). The engine works on the DER equivalent: what it
/// receives is converted with `to_der` before verification and the CertificateVerify check
/// (for type-3 re-encoded certificates the conversion is exact), what it sends with `from_der`.
#[derive(Clone)]
pub struct C509Codec {
    /// The CertificateType number (the draft's TBD5 is unassigned: a Private Use value).
    pub type_code: u8,
    /// C509 -> DER.
    pub to_der: CertConverter,
    /// DER -> C509.
    pub from_der: CertConverter,
}

#[cfg(feature = "c509")]
impl C509Codec {
    /// C509 through cbor-schemas' type-3 re-encoding (exactly invertible back to the DER) under
    /// the certificate type number `type_code`.
    pub fn type3(type_code: u8) -> C509Codec {
        C509Codec {
            type_code,
            to_der: Arc::new(|c: &[u8]| {
                cbor_schemas::c509::certificate_c509_to_der(c).map_err(|e| e.to_string())
            }),
            from_der: Arc::new(|d: &[u8]| {
                cbor_schemas::c509::certificate_der_to_c509(d).map_err(|e| e.to_string())
            }),
        }
    }
}

impl fmt::Debug for C509Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("C509Codec")
            .field("type_code", &self.type_code)
            .finish_non_exhaustive()
    }
}

/// Handshake retransmission timer (RFC 6347 §4.2.4.1): doubles from `initial` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetransmitConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// Limits on what peers can make the server hold (issue #10 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes past the cookie exchange, in total.
    pub max_half_open: usize,
    /// Handshakes past the cookie exchange from one source IP address.
    pub max_half_open_per_ip: usize,
    /// Established sessions plus handshakes in progress; over it a returning cookie gets a
    /// fatal handshake_failure alert.
    pub max_sessions: usize,
    /// Established sessions of one identity; a new one replaces the oldest.
    pub max_sessions_per_identity: usize,
    /// Established sessions from one source IP address (relays in `exempt_ips` are exempt).
    pub max_sessions_per_ip: usize,
    /// Source addresses exempt from the per-IP limits (DCU relays).
    pub exempt_ips: Vec<IpAddr>,
    /// Handshakes past the cookie exchange of meters behind one stateless join proxy (counted
    /// by the proxy's IP address, apart from its own direct traffic).
    pub max_half_open_per_relay: usize,
    /// Established sessions of meters behind one stateless join proxy.
    pub max_sessions_per_relay: usize,
    /// Sources that are join proxies: their direct traffic (a stateful proxy's circuits) is
    /// counted under the per-relay caps too, not the per-IP ones.
    pub relay_prefixes: Vec<crate::peer::IpPrefix>,
    /// A handshake message longer than this is refused (certificate chains are the longest).
    pub max_handshake_message_bytes: u32,
    /// Certificates in a peer's chain.
    pub max_chain_len: usize,
    /// Log lines about remote peers, per second, in total (the rest are counted, not logged).
    pub max_log_lines_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_half_open: 1024,
            max_half_open_per_ip: 16,
            max_sessions: 20_000,
            max_sessions_per_identity: 4,
            max_sessions_per_ip: 64,
            exempt_ips: Vec::new(),
            max_half_open_per_relay: 512,
            max_sessions_per_relay: 20_000,
            relay_prefixes: Vec::new(),
            max_handshake_message_bytes: 16 * 1024,
            max_chain_len: 8,
            max_log_lines_per_sec: 20,
        }
    }
}

/// Server configuration.
#[derive(Clone)]
pub struct ServerConfig {
    /// Our certificate chain, DER, our certificate first.
    pub certificate_chain: Vec<Vec<u8>>,
    /// Our key (ECDSA P-256 or P-384).
    pub private_key: Arc<SigningKey>,
    /// Validates client chains; a client certificate is always required.
    pub client_verifier: ChainVerifier,
    /// Suites in the server's preference order.
    pub cipher_suites: Vec<CipherSuite>,
    /// ECDHE groups in the server's preference order.
    pub groups: Vec<NamedGroup>,
    /// Refuse clients that do not offer extended_master_secret (RFC 7627).
    pub require_extended_master_secret: bool,
    /// Largest datagram we send (records are packed and handshake messages fragmented to fit).
    pub mtu_bytes: usize,
    pub retransmit: RetransmitConfig,
    /// A handshake not complete after this long is abandoned.
    pub handshake_timeout: Duration,
    /// A handshake past the cookie that receives nothing for this long is abandoned.
    pub handshake_stall_timeout: Duration,
    /// A session with no traffic in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// How long our final flight is kept to answer a repeated client flight (RFC 6347 §4.2.4:
    /// twice the TCP MSL), unless application data shows the client has it.
    pub final_flight_retention: Duration,
    /// Cookie HMAC key rotation; cookies of the previous key stay valid one more interval.
    pub cookie_rotation_interval: Duration,
    /// Length of the connection IDs we issue (RFC 9146); 0 turns Connection ID off.
    pub cid_length: usize,
    /// Leading bytes of every CID we issue (a node id for CID-routing load balancers); must be
    /// shorter than `cid_length`.
    pub cid_prefix: Vec<u8>,
    /// DER distinguished names sent in the CertificateRequest (empty: any).
    pub certificate_authorities: Vec<Vec<u8>>,
    /// RFC 7924 cached_info: when a client names our Certificate message by its current
    /// fingerprint, send the fingerprint instead of the certificates (RFC 7925 §4.4 makes the
    /// extension REQUIRED for certificate-based profiles). Off: the extension is ignored.
    pub cached_info: bool,
    /// Accept client certificates as C509, and send ours as C509 to a client that asks
    /// (RFC 7250 negotiation). `None`: X.509 only (the extensions are answered with X.509
    /// when the client offers it).
    pub c509: Option<C509Codec>,
    /// Answer a ClientHello's use_srtp offer (RFC 5764 §4.1.1) by echoing one profile, for
    /// DTLS stacks written for WebRTC that insist on it (dimpl; webrtc-dtls configured with
    /// SRTP profiles). No SRTP keys are ever exported: the session carries CoAP only.
    pub answer_use_srtp: bool,
    pub limits: Limits,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("certificate_chain_len", &self.certificate_chain.len())
            .field("cipher_suites", &self.cipher_suites)
            .field("groups", &self.groups)
            .field(
                "require_extended_master_secret",
                &self.require_extended_master_secret,
            )
            .field("mtu_bytes", &self.mtu_bytes)
            .field("retransmit", &self.retransmit)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshake_stall_timeout", &self.handshake_stall_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("cid_length", &self.cid_length)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// A configuration with the documented defaults around the given credentials.
    pub fn new(
        certificate_chain: Vec<Vec<u8>>,
        private_key: Arc<SigningKey>,
        client_verifier: ChainVerifier,
    ) -> Self {
        ServerConfig {
            certificate_chain,
            private_key,
            client_verifier,
            cipher_suites: vec![
                CipherSuite::Aes128Ccm8,
                CipherSuite::Aes128Gcm,
                CipherSuite::Aes256Gcm,
            ],
            groups: vec![
                NamedGroup::Secp256r1,
                NamedGroup::X25519,
                NamedGroup::Secp384r1,
            ],
            require_extended_master_secret: true,
            mtu_bytes: 1152,
            retransmit: RetransmitConfig::default(),
            handshake_timeout: Duration::from_secs(30),
            handshake_stall_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            final_flight_retention: Duration::from_secs(240),
            cookie_rotation_interval: Duration::from_secs(60),
            cid_length: 4,
            cid_prefix: Vec::new(),
            certificate_authorities: Vec::new(),
            cached_info: true,
            c509: None,
            answer_use_srtp: false,
            limits: Limits::default(),
        }
    }

    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), String> {
        if self.certificate_chain.is_empty() {
            return Err("certificate chain is empty".into());
        }
        if self.cipher_suites.is_empty() {
            return Err("cipher_suites is empty".into());
        }
        if self.groups.is_empty() {
            return Err("groups is empty".into());
        }
        if self.mtu_bytes < 200 || self.mtu_bytes > 16_384 {
            return Err(format!("mtu_bytes {} outside 200..=16384", self.mtu_bytes));
        }
        if self.cid_length > 32 {
            return Err("cid_length must be at most 32".into());
        }
        if self.cid_length > 0 && self.cid_prefix.len() >= self.cid_length {
            return Err("cid_prefix must be shorter than cid_length".into());
        }
        if self.retransmit.initial.is_zero() || self.retransmit.max < self.retransmit.initial {
            return Err("retransmit: initial must be > 0 and <= max".into());
        }
        let l = &self.limits;
        if l.max_half_open == 0 || l.max_sessions == 0 || l.max_half_open_per_ip == 0 {
            return Err("limits must be at least 1".into());
        }
        if l.max_half_open > l.max_sessions {
            return Err("limits.max_half_open must not exceed limits.max_sessions".into());
        }
        if l.max_sessions_per_identity == 0 || l.max_sessions_per_ip == 0 {
            return Err("per-identity and per-IP session limits must be at least 1".into());
        }
        if l.max_half_open_per_relay == 0 || l.max_sessions_per_relay == 0 {
            return Err("per-relay limits must be at least 1".into());
        }
        Ok(())
    }
}

/// Client configuration.
#[derive(Clone)]
pub struct ClientConfig {
    /// Our certificate chain (DER, ours first) and key.
    pub certificate_chain: Vec<Vec<u8>>,
    pub private_key: Arc<SigningKey>,
    /// Validates the server's chain.
    pub server_verifier: ChainVerifier,
    /// Suites offered, in preference order.
    pub cipher_suites: Vec<CipherSuite>,
    /// Groups offered, in preference order.
    pub groups: Vec<NamedGroup>,
    /// Signature schemes offered for the server's signatures (signature_algorithms).
    pub signature_schemes: Vec<SignatureScheme>,
    /// Keep the ClientHellos small for constrained links: no ec_point_formats (RFC 8422
    /// §5.1.2: uncompressed points are implied), the renegotiation SCSV instead of an empty
    /// renegotiation_info (RFC 5746 §3.3: 2 bytes instead of 5), and cached_info only in the
    /// ClientHello that answers a HelloVerifyRequest: the first one only fetches the cookie,
    /// which RFC 6347 §4.2.1 binds to version, random, session_id, suites and compression, not
    /// to extensions. A server that binds its cookie to the extensions too (tinydtls, older
    /// Californium) would answer with new cookies forever: leave this off for those.
    pub lean_hello: bool,
    pub require_extended_master_secret: bool,
    pub mtu_bytes: usize,
    pub retransmit: RetransmitConfig,
    pub handshake_timeout: Duration,
    /// Offer the connection_id extension with this CID (what we want to receive; empty: we will
    /// send with the server's CID but want none back). `None`: do not offer CID.
    pub connection_id: Option<Vec<u8>>,
    /// Server certificate chains (DER, leaf first, exactly as a server sent them) that we hold,
    /// from an earlier handshake or provisioning: each is offered by its fingerprint with RFC 7924
    /// cached_info (at most [`crate::wire::MAX_CACHED_OBJECTS`]), and a server that still
    /// sends it answers with the fingerprint alone. The chain is still validated by
    /// `server_verifier`. Empty: cached_info is not offered.
    pub cached_server_chains: Vec<Vec<Vec<u8>>>,
    /// Offer C509 for our certificate and the server's (RFC 7250: C509 first, X.509 second):
    /// a server that takes it up gets our chain as C509, and sends its own as C509. `None`:
    /// X.509 only, no extension.
    pub c509: Option<C509Codec>,
    pub max_chain_len: usize,
    pub max_handshake_message_bytes: u32,
    /// Deliberate protocol violations, for the engine's negative tests only.
    #[cfg(feature = "danger-test-faults")]
    pub danger_faults: crate::faults::TestFaults,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("certificate_chain_len", &self.certificate_chain.len())
            .field("cipher_suites", &self.cipher_suites)
            .field("groups", &self.groups)
            .field("mtu_bytes", &self.mtu_bytes)
            .field("retransmit", &self.retransmit)
            .field("connection_id", &self.connection_id)
            .field("cached_server_chains", &self.cached_server_chains.len())
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(
        certificate_chain: Vec<Vec<u8>>,
        private_key: Arc<SigningKey>,
        server_verifier: ChainVerifier,
    ) -> Self {
        ClientConfig {
            certificate_chain,
            private_key,
            server_verifier,
            cipher_suites: vec![CipherSuite::Aes128Ccm8, CipherSuite::Aes128Gcm],
            groups: vec![NamedGroup::Secp256r1],
            signature_schemes: vec![
                SignatureScheme::EcdsaSecp256r1Sha256,
                SignatureScheme::EcdsaSecp384r1Sha384,
            ],
            lean_hello: false,
            require_extended_master_secret: true,
            mtu_bytes: 1152,
            retransmit: RetransmitConfig::default(),
            handshake_timeout: Duration::from_secs(60),
            connection_id: None,
            cached_server_chains: Vec::new(),
            c509: None,
            max_chain_len: 8,
            max_handshake_message_bytes: 16 * 1024,
            #[cfg(feature = "danger-test-faults")]
            danger_faults: Default::default(),
        }
    }
}
