//! One DTLS 1.2 association, server or client side: the record layer (epochs, replay window,
//! AEAD, Connection ID), flights and their retransmission (RFC 6347 §4.2.4), and the handshake
//! state machine, whose states are named for the message they await.
//!
//! Sans-IO: every call takes `now`; datagrams to send collect in an outbox the owner drains
//! (always to [`Connection::peer`]); events go to the caller's list.

use std::net::SocketAddr;

use crate::peer::PeerAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::SecureRandom;

use crate::config::{C509Codec, ClientConfig, RetransmitConfig, ServerConfig, Verified};
use crate::crypto::{
    self, CipherSuite, EphemeralKey, NamedGroup, RecordCipher, SignatureScheme, Transcript,
};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reassembly::{Inserted, Reassembler};
use crate::replay::ReplayWindow;
use crate::wire::{
    self, alert, certificate_type as cert_type, content_type as ct, extension_type as ext,
    handshake_type as hs, CertificateMsg, CertificateRequest, ClientHello, Extension,
    HelloVerifyRequest, Record, Records, ServerHello, ServerKeyExchange, DTLS_1_0, DTLS_1_2,
    HANDSHAKE_HEADER_LEN, RECORD_HEADER_LEN,
};

/// Signature schemes we accept from a peer (RFC 7925 profile + P-384 for DLMS suite 2).
const ACCEPTED_SCHEMES: [u16; 2] = [0x0403, 0x0503];
/// A peer-triggered resend of our flight happens at most this often (a repeated flight can
/// arrive as several datagrams; one resend answers them all).
const PEER_TRIGGERED_RESEND_INTERVAL: Duration = Duration::from_millis(250);
/// Encrypted records of the next epoch a handshake keeps while the ChangeCipherSpec is still
/// missing (each at most [`wire::MAX_CIPHERTEXT_LEN`] plus its CID); later ones are dropped.
pub const MAX_FUTURE_RECORDS: usize = 4;

#[cfg(feature = "danger-test-faults")]
mod danger;

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent close_notify or a fatal alert.
    PeerClosed,
    /// We closed it.
    LocalClose,
    /// No traffic for the idle timeout.
    IdleTimeout,
    /// The same address proved return routability for a new handshake (RFC 6347 §4.2.8).
    Replaced,
    /// A newer session of the same identity took its place (per-identity limit).
    Superseded,
    /// The handshake failed.
    HandshakeFailed(Error),
    /// The endpoint shut down.
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("closed by peer"),
            CloseReason::LocalClose => f.write_str("closed locally"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::Replaced => {
                f.write_str("replaced by a new handshake from the same address")
            }
            CloseReason::Superseded => {
                f.write_str("superseded by a newer session of the same identity")
            }
            CloseReason::HandshakeFailed(e) => write!(f, "handshake failed: {e}"),
            CloseReason::Shutdown => f.write_str("endpoint shut down"),
        }
    }
}

/// What a connection tells its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnEvent {
    /// The handshake completed.
    Connected,
    /// Application data arrived.
    Data(Vec<u8>),
    /// An authenticated, newer record came from a new address (RFC 9146 §6); the connection
    /// now sends there. Carries the old address.
    AddressChanged(PeerAddr),
    /// The connection is over.
    Closed(CloseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Server handshake states, named for what they await (RFC 6347 Figure 1, flight 5).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    ExpectCertificate,
    ExpectClientKeyExchange,
    ExpectCertificateVerify,
    ExpectChangeCipherSpec,
    ExpectFinished,
}

/// Client handshake states (flights 2, 4 and 6).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    ExpectHelloVerifyOrServerHello,
    ExpectCertificate,
    ExpectServerKeyExchange,
    ExpectCertificateRequestOrDone,
    ExpectServerHelloDone,
    ExpectChangeCipherSpec,
    ExpectFinished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HsState {
    Server(ServerState),
    Client(ClientState),
}

/// A message of a flight, kept to be re-encoded (with fresh record sequence numbers) when the
/// flight is retransmitted.
#[derive(Clone, Debug)]
enum FlightItem {
    Handshake { epoch: u16, message: Vec<u8> },
    ChangeCipherSpec { epoch: u16 },
}

#[derive(Debug)]
struct Retransmit {
    next_at: Instant,
    rto: Duration,
}

/// A protected record that arrived before its epoch's ChangeCipherSpec: (content type,
/// epoch, sequence number, CID, fragment).
type FutureRecord = (u8, u16, u64, Vec<u8>, Vec<u8>);

struct Handshake {
    state: HsState,
    client_random: [u8; 32],
    server_random: [u8; 32],
    suite: CipherSuite,
    transcript: Transcript,
    reassembler: Reassembler,
    next_send_msg_seq: u16,
    ephemeral: Option<EphemeralKey>,
    ems: bool,
    master: Option<[u8; 48]>,
    pending_read: Option<RecordCipher>,
    pending_write: Option<RecordCipher>,
    /// Client: our ClientHello, resent with the cookie.
    client_hello: Option<ClientHello>,
    /// Client: whether the server asked for our certificate.
    certificate_requested: bool,
    /// Client: the server's ECDHE public key and group.
    server_public: Option<(NamedGroup, Vec<u8>)>,
    /// Client: fingerprints of `cached_server_chains` offered with cached_info (RFC 7924).
    cached_fingerprints: Vec<[u8; 32]>,
    /// Client: the server took up cached_info for its certificate.
    certificate_cached: bool,
    /// Client: extensions left out of the first ClientHello and added to the one that
    /// answers a HelloVerifyRequest ([`ClientConfig::lean_hello`]).
    deferred_extensions: Vec<Extension>,
    /// The certificate type (RFC 7250) of the peer's Certificate message, and of ours.
    peer_certificate_type: u8,
    own_certificate_type: u8,
    /// Server: the key of the client's leaf certificate, read when its Certificate came
    /// (`None` if it has none we can verify with: its CertificateVerify then fails).
    peer_key: Option<crypto::PeerKey>,
    started: Instant,
    last_progress: Instant,
    future_records: Vec<FutureRecord>,
}

/// The role-specific configuration a connection needs.
#[derive(Clone)]
pub(crate) enum RoleConfig {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>),
}

impl RoleConfig {
    fn mtu(&self) -> usize {
        match self {
            RoleConfig::Server(c) => c.mtu_bytes,
            RoleConfig::Client(c) => c.mtu_bytes,
        }
    }

    fn retransmit(&self) -> RetransmitConfig {
        match self {
            RoleConfig::Server(c) => c.retransmit,
            RoleConfig::Client(c) => c.retransmit,
        }
    }

    fn handshake_timeout(&self) -> Duration {
        match self {
            RoleConfig::Server(c) => c.handshake_timeout,
            RoleConfig::Client(c) => c.handshake_timeout,
        }
    }
}

/// Output of a connection call: events, in order.
pub(crate) type Events = Vec<ConnEvent>;

/// One association.
pub struct Connection {
    role: Role,
    config: RoleConfig,
    peer: PeerAddr,
    /// Bytes the path to `peer` adds to each datagram (a join proxy's JPY wrapping): our
    /// datagrams are that much below the MTU.
    path_overhead: usize,
    hs: Option<Box<Handshake>>,
    established: bool,
    closed: bool,
    write_epoch: u16,
    write_seq: [u64; 2],
    write_cipher: Option<RecordCipher>,
    read_cipher: Option<RecordCipher>,
    read_window: ReplayWindow,
    /// The CID the peer puts in records to us (we issued it); empty: none.
    own_cid: Vec<u8>,
    /// The CID we put in records to the peer; empty: plain records.
    peer_cid: Vec<u8>,
    /// Plaintext record size limit negotiated with max_fragment_length (RFC 6066).
    max_plaintext: usize,
    suite: Option<CipherSuite>,
    peer_chain: Vec<Vec<u8>>,
    verified: Option<Verified>,
    flight: Vec<FlightItem>,
    retransmit: Option<Retransmit>,
    last_peer_resend: Option<Instant>,
    final_flight_until: Option<Instant>,
    last_activity: Instant,
    outbox: Vec<Vec<u8>>,
    /// The ClientHello random of this association's handshake (a repeated ClientHello with it
    /// is a duplicate, not a new handshake).
    client_random: [u8; 32],
    /// Closed by the application while the peer may still lack our final flight: the
    /// association only answers a repeated flight 5 until `final_flight_until` (RFC 6347
    /// §4.2.4: the node that sent the last flight keeps answering for 2 x MSL).
    draining: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .field("established", &self.established)
            .field("closed", &self.closed)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

fn random32(rng: &dyn SecureRandom) -> Result<[u8; 32], Error> {
    let mut r = [0u8; 32];
    rng.fill(&mut r)
        .map_err(|_| Error::Internal("rng".into()))?;
    Ok(r)
}

/// Constant-time comparison of two verify_data values.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Connection {
    // -----------------------------------------------------------------------------------------
    // Construction
    // -----------------------------------------------------------------------------------------

    /// Server side: a ClientHello whose cookie verified (RFC 6347 §4.2.1). Negotiates, sends
    /// flight 4 and awaits the client's certificate. `ch_message` is the whole ClientHello
    /// handshake message (header as if unfragmented), the first transcript entry.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept(
        now: Instant,
        peer: PeerAddr,
        config: Arc<ServerConfig>,
        ch: &ClientHello,
        ch_message: &[u8],
        ch_message_seq: u16,
        ch_record_seq: u64,
        own_cid: Vec<u8>,
        round_trip: Duration,
        rng: &dyn SecureRandom,
        metrics: &mut Metrics,
    ) -> Result<Connection, Error> {
        // RFC 6347 §4.2.1 / RFC 7925 §18: DTLS 1.2 only. Versions count down on the wire.
        if ch.client_version[0] != 0xFE || ch.client_version[1] > DTLS_1_2[1] {
            return Err(Error::ProtocolVersion);
        }
        if !ch.compression_methods.contains(&0) {
            return Err(Error::IllegalParameter("compression other than null"));
        }
        // RFC 5746: an initial handshake carries an empty renegotiation_info, if any.
        let reneg_ext = ch.extension(ext::RENEGOTIATION_INFO);
        if let Some(data) = reneg_ext {
            if !wire::parse_opaque8(data)?.is_empty() {
                return Err(Error::Renegotiation);
            }
        }
        let secure_reneg = reneg_ext.is_some()
            || ch
                .cipher_suites
                .contains(&wire::EMPTY_RENEGOTIATION_INFO_SCSV);
        let ems = ch.extension(ext::EXTENDED_MASTER_SECRET).is_some();
        if !ems && config.require_extended_master_secret {
            return Err(Error::NoExtendedMasterSecret);
        }
        let suite = config
            .cipher_suites
            .iter()
            .copied()
            .find(|s| ch.cipher_suites.contains(&s.code()))
            .ok_or(Error::NoCommonSuite)?;
        // RFC 8422 §4: without supported_groups a client supports secp256r1.
        let client_groups = match ch.extension(ext::SUPPORTED_GROUPS) {
            Some(d) => wire::parse_supported_groups(d)?,
            None => vec![NamedGroup::Secp256r1.code()],
        };
        let group = config
            .groups
            .iter()
            .copied()
            .find(|g| client_groups.contains(&g.code()))
            .ok_or(Error::NoCommonGroup)?;
        let point_formats = match ch.extension(ext::EC_POINT_FORMATS) {
            Some(d) => {
                let f = wire::parse_ec_point_formats(d)?;
                if !f.contains(&0) {
                    return Err(Error::IllegalParameter(
                        "ec_point_formats without uncompressed",
                    ));
                }
                true
            }
            None => false,
        };
        // RFC 7925 §5: the client MUST send signature_algorithms; without it only SHA-1 would do.
        let client_schemes = match ch.extension(ext::SIGNATURE_ALGORITHMS) {
            Some(d) => wire::parse_signature_algorithms(d)?,
            None => return Err(Error::NoCommonSignatureScheme),
        };
        let our_scheme = config.private_key.scheme();
        if !client_schemes.contains(&our_scheme.code()) {
            return Err(Error::NoCommonSignatureScheme);
        }
        let max_plaintext = match ch.extension(ext::MAX_FRAGMENT_LENGTH) {
            Some([code @ 1..=4]) => Some((*code, 1usize << (8 + usize::from(*code)))),
            Some(_) => return Err(Error::IllegalParameter("max_fragment_length")),
            None => None,
        };
        // RFC 5764 §4.1.1: echo one offered profile (SRTP_AEAD_AES_128_GCM 0x0007, _256_GCM
        // 0x0008, AES128_CM_HMAC_SHA1_80 0x0001, _32 0x0002), with an empty MKI.
        let srtp_profile = match ch.extension(ext::USE_SRTP) {
            Some(d) if config.answer_use_srtp => {
                let mut r = wire::Reader::new(d);
                let list = r.vec16()?;
                let _mki = r.vec8()?;
                r.finish()?;
                let offered = wire::parse_u16_list(list)?;
                [0x0007u16, 0x0008, 0x0001, 0x0002]
                    .into_iter()
                    .find(|p| offered.contains(p))
            }
            _ => None,
        };
        let client_cid = match ch.extension(ext::CONNECTION_ID) {
            Some(d) if config.cid_length > 0 => Some(wire::parse_opaque8(d)?),
            _ => None,
        };
        // RFC 7250 §4.2: the certificate types. C509 when configured and offered (ours only
        // if our chain converts), else X.509 when offered; neither: unsupported_certificate.
        let c509 = config.c509.as_ref();
        let offered_types = |typ: u16| -> Result<Option<Vec<u8>>, Error> {
            Ok(match ch.extension(typ) {
                Some(d) => Some(wire::parse_certificate_types(d)?),
                None => None,
            })
        };
        let pick = |offered: &[u8], c509_ok: bool| -> Result<u8, Error> {
            match c509.map(|c| c.type_code) {
                Some(t) if c509_ok && offered.contains(&t) => Ok(t),
                _ if offered.contains(&cert_type::X509) => Ok(cert_type::X509),
                _ => Err(Error::UnsupportedCertificate),
            }
        };
        let client_cert_type = match offered_types(ext::CLIENT_CERTIFICATE_TYPE)? {
            Some(types) => Some(pick(&types, true)?),
            None => None,
        };
        let (server_cert_type, own_chain) =
            match (offered_types(ext::SERVER_CERTIFICATE_TYPE)?, c509) {
                (Some(types), Some(codec)) if types.contains(&codec.type_code) => {
                    match c509_chain(codec, &config.certificate_chain) {
                        Some(chain) => (Some(codec.type_code), chain),
                        None => (Some(pick(&types, false)?), config.certificate_chain.clone()),
                    }
                }
                (Some(types), _) => (Some(pick(&types, false)?), config.certificate_chain.clone()),
                (None, _) => (None, config.certificate_chain.clone()),
            };
        // RFC 7924 §4.1: a client that holds our current Certificate message gets its
        // fingerprint instead (a stale or unknown fingerprint gets the full message).
        let certificate_body = CertificateMsg {
            certificates: own_chain,
        }
        .encode();
        let cached_certificate = match ch.extension(ext::CACHED_INFO) {
            Some(d) if config.cached_info => {
                let objects = wire::parse_cached_info_client(d)?;
                let ours = crypto::certificate_fingerprint(&certificate_body);
                objects
                    .iter()
                    .any(|o| o.typ == wire::cached_info_type::CERT && o.hash == ours)
                    .then_some(ours)
            }
            _ => None,
        };

        let server_random = random32(rng)?;
        let mut sh_exts = Vec::new();
        if secure_reneg {
            sh_exts.push(Extension {
                typ: ext::RENEGOTIATION_INFO,
                data: wire::opaque8_body(&[]),
            });
        }
        if ems {
            sh_exts.push(Extension {
                typ: ext::EXTENDED_MASTER_SECRET,
                data: Vec::new(),
            });
        }
        if point_formats {
            sh_exts.push(Extension {
                typ: ext::EC_POINT_FORMATS,
                data: vec![1, 0],
            });
        }
        if let Some((code, _)) = max_plaintext {
            sh_exts.push(Extension {
                typ: ext::MAX_FRAGMENT_LENGTH,
                data: vec![code],
            });
        }
        if let Some(p) = srtp_profile {
            let mut data = vec![0, 2];
            data.extend_from_slice(&p.to_be_bytes());
            data.push(0);
            sh_exts.push(Extension {
                typ: ext::USE_SRTP,
                data,
            });
        }
        let (own_cid, peer_cid) = match client_cid {
            Some(peer_cid) => {
                sh_exts.push(Extension {
                    typ: ext::CONNECTION_ID,
                    data: wire::opaque8_body(&own_cid),
                });
                (own_cid, peer_cid)
            }
            None => (Vec::new(), Vec::new()),
        };
        if cached_certificate.is_some() {
            sh_exts.push(Extension {
                typ: ext::CACHED_INFO,
                data: wire::cached_info_server_body(&[wire::cached_info_type::CERT]),
            });
        }
        for (typ, chosen) in [
            (ext::CLIENT_CERTIFICATE_TYPE, client_cert_type),
            (ext::SERVER_CERTIFICATE_TYPE, server_cert_type),
        ] {
            if let Some(t) = chosen {
                sh_exts.push(Extension { typ, data: vec![t] });
            }
        }
        let sh = ServerHello {
            server_version: DTLS_1_2,
            random: server_random,
            session_id: Vec::new(),
            cipher_suite: suite.code(),
            compression_method: 0,
            extensions: sh_exts,
        };

        let ephemeral = EphemeralKey::generate(group, rng)?;
        let params = ServerKeyExchange::params(group.code(), ephemeral.public_key());
        let signed = ServerKeyExchange::signed_data(&ch.random, &server_random, &params);
        let signature = config.private_key.sign(rng, &signed)?;
        metrics.ecdsa_signs += 1;
        let ske = ServerKeyExchange {
            named_group: group.code(),
            public: ephemeral.public_key().to_vec(),
            signature_scheme: our_scheme.code(),
            signature,
        };
        let cr = CertificateRequest {
            certificate_types: vec![wire::CERT_TYPE_ECDSA_SIGN],
            signature_schemes: ACCEPTED_SCHEMES.to_vec(),
            authorities: config.certificate_authorities.clone(),
        };

        let mut transcript = Transcript::new();
        transcript.add(ch_message);
        // RFC 6347 §4.2.2: a stateless server numbers its messages from the ClientHello's.
        let mut seq = ch_message_seq;
        let mut flight = Vec::with_capacity(5);
        let bodies: [(u8, Vec<u8>); 5] = [
            (hs::SERVER_HELLO, sh.encode()),
            (
                hs::CERTIFICATE,
                match cached_certificate {
                    Some(fingerprint) => {
                        metrics.cached_info_hits += 1;
                        wire::opaque8_body(&fingerprint)
                    }
                    None => certificate_body,
                },
            ),
            (hs::SERVER_KEY_EXCHANGE, ske.encode()),
            (hs::CERTIFICATE_REQUEST, cr.encode()),
            (hs::SERVER_HELLO_DONE, Vec::new()),
        ];
        for (t, body) in bodies {
            let m = wire::handshake_message(t, seq, &body);
            transcript.add(&m);
            flight.push(FlightItem::Handshake {
                epoch: 0,
                message: m,
            });
            seq = seq.wrapping_add(1);
        }

        let hs = Handshake {
            state: HsState::Server(ServerState::ExpectCertificate),
            client_random: ch.random,
            server_random,
            suite,
            transcript,
            reassembler: Reassembler::new(
                ch_message_seq.wrapping_add(1),
                config.limits.max_handshake_message_bytes,
            ),
            next_send_msg_seq: seq,
            ephemeral: Some(ephemeral),
            ems,
            master: None,
            pending_read: None,
            pending_write: None,
            client_hello: None,
            certificate_requested: true,
            server_public: None,
            cached_fingerprints: Vec::new(),
            certificate_cached: false,
            deferred_extensions: Vec::new(),
            peer_certificate_type: client_cert_type.unwrap_or(cert_type::X509),
            own_certificate_type: server_cert_type.unwrap_or(cert_type::X509),
            peer_key: None,
            started: now,
            last_progress: now,
            future_records: Vec::new(),
        };
        let mut conn = Connection::new(Role::Server, RoleConfig::Server(config), peer, now);
        conn.hs = Some(Box::new(hs));
        conn.client_random = ch.random;
        conn.own_cid = own_cid;
        conn.peer_cid = peer_cid;
        conn.suite = Some(suite);
        if let Some((_, n)) = max_plaintext {
            conn.max_plaintext = n;
        }
        // RFC 6347 §4.2.1: the ServerHello reuses the ClientHello's record sequence number.
        conn.write_seq[0] = ch_record_seq;
        conn.flight = flight;
        conn.send_flight(now, metrics);
        // RFC 6298 §2.2 from the cookie's round trip R: RTO = R + 4 x R/2 = 3R, at least the
        // configured initial timer, at most its maximum: a slow path does not get flight 4
        // resent before flight 5 can be back.
        let rtx = conn.config.retransmit();
        conn.arm_retransmit_with(now, (round_trip * 3).clamp(rtx.initial, rtx.max));
        Ok(conn)
    }

    /// Client side: starts a handshake with the server at `peer` (flight 1).
    pub fn connect(
        now: Instant,
        peer: SocketAddr,
        config: Arc<ClientConfig>,
        rng: &dyn SecureRandom,
    ) -> Result<Connection, Error> {
        let client_random = random32(rng)?;
        let lean = config.lean_hello;
        let schemes: Vec<u16> = config.signature_schemes.iter().map(|s| s.code()).collect();
        let mut exts = vec![Extension {
            typ: ext::SUPPORTED_GROUPS,
            data: wire::supported_groups_body(
                &config.groups.iter().map(|g| g.code()).collect::<Vec<_>>(),
            ),
        }];
        if !lean {
            exts.push(Extension {
                typ: ext::EC_POINT_FORMATS,
                data: vec![1, 0],
            });
        }
        exts.push(Extension {
            typ: ext::SIGNATURE_ALGORITHMS,
            data: wire::signature_algorithms_body(&schemes),
        });
        exts.push(Extension {
            typ: ext::EXTENDED_MASTER_SECRET,
            data: Vec::new(),
        });
        if !lean {
            exts.push(Extension {
                typ: ext::RENEGOTIATION_INFO,
                data: wire::opaque8_body(&[]),
            });
        }
        if let Some(cid) = &config.connection_id {
            exts.push(Extension {
                typ: ext::CONNECTION_ID,
                data: wire::opaque8_body(cid),
            });
        }
        // RFC 7924: name the server certificates we hold by their fingerprints, in the form we
        // ask the server to send (C509 when we offer it and the chain converts).
        let cached_fingerprints: Vec<[u8; 32]> = config
            .cached_server_chains
            .iter()
            .take(wire::MAX_CACHED_OBJECTS)
            .map(|chain| {
                let certificates = config
                    .c509
                    .as_ref()
                    .and_then(|codec| c509_chain(codec, chain))
                    .unwrap_or_else(|| chain.clone());
                crypto::certificate_fingerprint(&CertificateMsg { certificates }.encode())
            })
            .collect();
        let mut deferred_extensions = Vec::new();
        // RFC 7250: C509 first, X.509 as the fallback, for our certificate and the server's.
        if let Some(codec) = &config.c509 {
            for typ in [ext::CLIENT_CERTIFICATE_TYPE, ext::SERVER_CERTIFICATE_TYPE] {
                let e = Extension {
                    typ,
                    data: wire::certificate_types_body(&[codec.type_code, cert_type::X509]),
                };
                if lean {
                    deferred_extensions.push(e);
                } else {
                    exts.push(e);
                }
            }
        }
        if !cached_fingerprints.is_empty() {
            let objects: Vec<wire::CachedObject> = cached_fingerprints
                .iter()
                .map(|f| wire::CachedObject {
                    typ: wire::cached_info_type::CERT,
                    hash: f.to_vec(),
                })
                .collect();
            let e = Extension {
                typ: ext::CACHED_INFO,
                data: wire::cached_info_client_body(&objects),
            };
            if lean {
                deferred_extensions.push(e);
            } else {
                exts.push(e);
            }
        }
        let mut cipher_suites: Vec<u16> = config.cipher_suites.iter().map(|s| s.code()).collect();
        if lean {
            cipher_suites.push(wire::EMPTY_RENEGOTIATION_INFO_SCSV);
        }
        let ch = ClientHello {
            client_version: DTLS_1_2,
            random: client_random,
            session_id: Vec::new(),
            cookie: Vec::new(),
            cipher_suites,
            compression_methods: vec![0],
            extensions: exts,
        };
        let ch = crate::faults::client_hello(&config, ch);
        let message = wire::handshake_message(hs::CLIENT_HELLO, 0, &ch.encode());
        let mut transcript = Transcript::new();
        transcript.add(&message);
        let hs = Handshake {
            state: HsState::Client(ClientState::ExpectHelloVerifyOrServerHello),
            client_random,
            server_random: [0; 32],
            suite: config
                .cipher_suites
                .first()
                .copied()
                .ok_or(Error::NoCommonSuite)?,
            transcript,
            reassembler: Reassembler::new(0, config.max_handshake_message_bytes),
            next_send_msg_seq: 1,
            ephemeral: None,
            ems: false,
            master: None,
            pending_read: None,
            pending_write: None,
            client_hello: Some(ch),
            certificate_requested: false,
            server_public: None,
            cached_fingerprints,
            certificate_cached: false,
            deferred_extensions,
            peer_certificate_type: cert_type::X509,
            own_certificate_type: cert_type::X509,
            peer_key: None,
            started: now,
            last_progress: now,
            future_records: Vec::new(),
        };
        let own_cid = config.connection_id.clone().unwrap_or_default();
        let mut conn = Connection::new(
            Role::Client,
            RoleConfig::Client(config),
            PeerAddr::Direct(peer),
            now,
        );
        conn.hs = Some(Box::new(hs));
        conn.own_cid = own_cid;
        conn.flight = vec![FlightItem::Handshake { epoch: 0, message }];
        let mut scratch = Metrics::default();
        conn.send_flight(now, &mut scratch);
        conn.arm_retransmit(now);
        Ok(conn)
    }

    fn new(role: Role, config: RoleConfig, peer: PeerAddr, now: Instant) -> Connection {
        Connection {
            role,
            config,
            path_overhead: peer.path_overhead(),
            peer,
            hs: None,
            established: false,
            closed: false,
            write_epoch: 0,
            write_seq: [0, 0],
            write_cipher: None,
            read_cipher: None,
            read_window: ReplayWindow::new(),
            own_cid: Vec::new(),
            peer_cid: Vec::new(),
            max_plaintext: wire::MAX_PLAINTEXT_LEN,
            suite: None,
            peer_chain: Vec::new(),
            verified: None,
            flight: Vec::new(),
            retransmit: None,
            last_peer_resend: None,
            final_flight_until: None,
            last_activity: now,
            outbox: Vec::new(),
            client_random: [0; 32],
            draining: false,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Accessors
    // -----------------------------------------------------------------------------------------

    pub fn role(&self) -> Role {
        self.role
    }

    /// Where this connection sends.
    pub fn peer(&self) -> PeerAddr {
        self.peer.clone()
    }

    /// Where this connection sends, without a copy.
    pub fn peer_ref(&self) -> &PeerAddr {
        &self.peer
    }

    /// The largest datagram we send to the peer: the MTU less what the path adds.
    fn path_mtu(&self) -> usize {
        self.config.mtu().saturating_sub(self.path_overhead)
    }

    pub fn is_established(&self) -> bool {
        self.established
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn is_handshaking(&self) -> bool {
        !self.established && !self.closed
    }

    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        self.suite
    }

    /// The client random of this association's handshake (tells a repeated ClientHello from a
    /// new one).
    pub fn handshake_client_random(&self) -> Option<[u8; 32]> {
        match &self.hs {
            Some(h) => Some(h.client_random),
            None => Some(self.client_random),
        }
    }

    /// Closed, but still answering a repeated flight 5 with our final flight.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The peer's certificate chain as sent (DER, leaf first).
    pub fn peer_certificates(&self) -> &[Vec<u8>] {
        &self.peer_chain
    }

    /// Hands the peer's chain over (e.g. to the application's session) so that it is not kept
    /// twice; [`Connection::peer_certificates`] is empty afterwards.
    pub fn take_peer_certificates(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.peer_chain)
    }

    pub fn verified(&self) -> Option<&Verified> {
        self.verified.as_ref()
    }

    /// The CID the peer uses towards us (empty: none).
    pub fn own_cid(&self) -> &[u8] {
        &self.own_cid
    }

    /// The CID we use towards the peer (empty: none).
    pub fn peer_cid(&self) -> &[u8] {
        &self.peer_cid
    }

    /// Largest application datagram [`Connection::send`] accepts on this path.
    pub fn max_datagram(&self) -> usize {
        let overhead = RECORD_HEADER_LEN
            + self.peer_cid.len()
            + if self.peer_cid.is_empty() { 0 } else { 1 }
            + self.suite.map_or(24, |s| s.record_overhead());
        self.path_mtu()
            .saturating_sub(overhead)
            .min(self.max_plaintext)
    }

    /// Datagrams to send to [`Connection::peer`].
    pub fn drain_outbox(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.outbox.drain(..)
    }

    pub fn has_outbox(&self) -> bool {
        !self.outbox.is_empty()
    }

    // -----------------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------------

    /// The next instant [`Connection::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.draining {
            return self.final_flight_until;
        }
        if self.closed {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(r) = &self.retransmit {
            consider(r.next_at);
        }
        if let Some(h) = &self.hs {
            consider(h.started + self.config.handshake_timeout());
            if let RoleConfig::Server(c) = &self.config {
                consider(h.last_progress + c.handshake_stall_timeout);
            }
        }
        if self.established {
            if let RoleConfig::Server(c) = &self.config {
                consider(self.last_activity + c.idle_timeout);
            }
            if let Some(t) = self.final_flight_until {
                consider(t);
            }
        }
        next
    }

    pub fn handle_timeout(&mut self, now: Instant, metrics: &mut Metrics, events: &mut Events) {
        if self.draining {
            if self.final_flight_until.is_none_or(|t| now >= t) {
                self.draining = false;
                self.final_flight_until = None;
                self.flight.clear();
            }
            return;
        }
        if self.closed {
            return;
        }
        if let Some(h) = &self.hs {
            let deadline = h.started + self.config.handshake_timeout();
            let stalled = match &self.config {
                RoleConfig::Server(c) => now >= h.last_progress + c.handshake_stall_timeout,
                RoleConfig::Client(_) => false,
            };
            if now >= deadline || stalled {
                self.fail(Error::Timeout, metrics, events);
                return;
            }
        }
        if self.established {
            if let Some(t) = self.final_flight_until {
                if now >= t {
                    self.final_flight_until = None;
                    self.flight.clear();
                }
            }
            if let RoleConfig::Server(c) = &self.config {
                if now >= self.last_activity + c.idle_timeout {
                    self.close_with(CloseReason::IdleTimeout, true, metrics, events);
                    return;
                }
            }
        }
        let due = matches!(&self.retransmit, Some(r) if now >= r.next_at);
        if due {
            self.send_flight(now, metrics);
            metrics.flights_retransmitted += 1;
            let max = self.config.retransmit().max;
            if let Some(r) = &mut self.retransmit {
                // RFC 6347 §4.2.4.1: double the timer at each retransmission.
                r.rto = (r.rto * 2).min(max);
                r.next_at = now + r.rto;
            }
        }
    }

    fn arm_retransmit(&mut self, now: Instant) {
        self.arm_retransmit_with(now, self.config.retransmit().initial);
    }

    fn arm_retransmit_with(&mut self, now: Instant, initial: Duration) {
        self.retransmit = Some(Retransmit {
            next_at: now + initial,
            rto: initial,
        });
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    /// Sends application data (one datagram, one record).
    pub fn send(&mut self, now: Instant, data: &[u8]) -> Result<(), Error> {
        if !self.established || self.closed {
            return Err(Error::UnexpectedMessage(
                "send before the handshake completed",
            ));
        }
        if data.len() > self.max_datagram() {
            return Err(Error::Limit("datagram larger than the path allows"));
        }
        let rec = self.encode_record(ct::APPLICATION_DATA, self.write_epoch, data)?;
        self.outbox.push(rec);
        self.last_activity = now;
        Ok(())
    }

    /// Sends close_notify and closes.
    pub fn close(&mut self, metrics: &mut Metrics, events: &mut Events) {
        self.close_with(CloseReason::LocalClose, true, metrics, events);
    }

    pub(crate) fn close_with(
        &mut self,
        reason: CloseReason,
        notify: bool,
        _metrics: &mut Metrics,
        events: &mut Events,
    ) {
        if self.closed {
            return;
        }
        let drain = reason == CloseReason::LocalClose
            && self.established
            && self.final_flight_until.is_some()
            && !self.flight.is_empty();
        if notify && self.write_epoch > 0 {
            if let Ok(rec) = self.encode_record(
                ct::ALERT,
                self.write_epoch,
                &[alert::WARNING, alert::CLOSE_NOTIFY],
            ) {
                self.outbox.push(rec);
            }
        }
        self.closed = true;
        self.hs = None;
        self.retransmit = None;
        if drain {
            self.draining = true;
        } else {
            self.flight.clear();
        }
        events.push(ConnEvent::Closed(reason));
    }

    /// Fails the handshake or session: fatal alert (where the error has one), then closed.
    pub(crate) fn fail(&mut self, err: Error, metrics: &mut Metrics, events: &mut Events) {
        if self.closed {
            return;
        }
        if let Some(desc) = err.alert() {
            if let Ok(rec) = self.encode_record(ct::ALERT, self.write_epoch, &[alert::FATAL, desc])
            {
                self.outbox.push(rec);
            }
        }
        if !self.established {
            metrics.refuse(err.refusal_reason());
        }
        self.closed = true;
        self.hs = None;
        self.retransmit = None;
        self.flight.clear();
        events.push(ConnEvent::Closed(CloseReason::HandshakeFailed(err)));
    }

    fn encode_record(&mut self, content: u8, epoch: u16, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let [epoch0_seq, later_seq] = &mut self.write_seq;
        let slot = if epoch == 0 { epoch0_seq } else { later_seq };
        let seq = *slot;
        if seq >= (1u64 << 48) - 1 {
            return Err(Error::Limit("record sequence number exhausted"));
        }
        *slot = seq + 1;
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + payload.len() + 40);
        if epoch == 0 {
            wire::push_record(&mut out, content, DTLS_1_2, 0, seq, &[], payload);
            return Ok(out);
        }
        let cipher = self
            .write_cipher
            .as_ref()
            .ok_or_else(|| Error::Internal("no write keys for epoch 1".into()))?;
        if self.peer_cid.is_empty() {
            let sealed = cipher.seal(epoch, seq, content, payload);
            wire::push_record(&mut out, content, DTLS_1_2, epoch, seq, &[], &sealed);
        } else {
            // RFC 9146 §4: once encrypted, every record to a peer with a CID is tls12_cid.
            let inner = wire::inner_plaintext(content, payload);
            let sealed = cipher.seal_cid(epoch, seq, &self.peer_cid, &inner);
            wire::push_record(
                &mut out,
                ct::TLS12_CID,
                DTLS_1_2,
                epoch,
                seq,
                &self.peer_cid,
                &sealed,
            );
        }
        Ok(out)
    }

    /// Encodes the current flight into datagrams no larger than the MTU and queues them:
    /// handshake messages fragmented to fit, consecutive plaintext handshake messages (or
    /// fragments) sharing one record where the datagram has room (RFC 6347 §4.2.3: "multiple
    /// DTLS handshake messages MAY be placed in the same DTLS record"; 13 bytes saved per
    /// message), records packed into datagrams.
    fn send_flight(&mut self, _now: Instant, metrics: &mut Metrics) {
        let mtu = self.path_mtu();
        let items = std::mem::take(&mut self.flight);
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        // Plaintext handshake fragments waiting to share a record.
        let mut pending: Vec<u8> = Vec::new();
        for item in &items {
            let records: Vec<Vec<u8>> = match item {
                FlightItem::ChangeCipherSpec { epoch } => {
                    self.flush_handshake_record(&mut pending, &mut datagrams, &mut current);
                    let r = self.encode_record(ct::CHANGE_CIPHER_SPEC, *epoch, &[1]);
                    // The cipher for the next epoch is installed once its CCS is encoded.
                    if *epoch == 0 {
                        if let Some(h) = &mut self.hs {
                            if let Some(w) = h.pending_write.take() {
                                self.write_cipher = Some(w);
                            }
                        }
                        self.write_epoch = 1;
                    }
                    r.into_iter().collect()
                }
                FlightItem::Handshake { epoch, message } => {
                    let overhead = RECORD_HEADER_LEN
                        + HANDSHAKE_HEADER_LEN
                        + if *epoch > 0 {
                            self.suite.map_or(24, |s| s.record_overhead()) + self.peer_cid.len() + 1
                        } else {
                            0
                        };
                    let max_body = mtu
                        .saturating_sub(overhead)
                        .min(self.max_plaintext.saturating_sub(HANDSHAKE_HEADER_LEN))
                        .max(16);
                    let fragments = wire::fragment_handshake(message, max_body);
                    if *epoch > 0 {
                        self.flush_handshake_record(&mut pending, &mut datagrams, &mut current);
                        fragments
                            .iter()
                            .filter_map(|f| self.encode_record(ct::HANDSHAKE, *epoch, f).ok())
                            .collect()
                    } else {
                        for f in fragments {
                            let room = mtu.saturating_sub(current.len());
                            let joined = RECORD_HEADER_LEN + pending.len() + f.len();
                            let fits = joined <= room && joined <= self.max_plaintext;
                            if !fits {
                                self.flush_handshake_record(
                                    &mut pending,
                                    &mut datagrams,
                                    &mut current,
                                );
                            }
                            if pending.is_empty()
                                && !current.is_empty()
                                && current.len() + RECORD_HEADER_LEN + f.len() > mtu
                            {
                                datagrams.push(std::mem::take(&mut current));
                            }
                            pending.extend_from_slice(&f);
                        }
                        Vec::new()
                    }
                }
            };
            for r in records {
                place_record(&mut datagrams, &mut current, r, mtu);
            }
        }
        self.flush_handshake_record(&mut pending, &mut datagrams, &mut current);
        if !current.is_empty() {
            datagrams.push(current);
        }
        self.flight = items;
        metrics.datagrams_sent_handshake += datagrams.len() as u64;
        self.outbox.extend(datagrams);
    }

    /// Encodes the plaintext handshake fragments in `pending` as one record into the datagram
    /// being filled (see [`Connection::send_flight`]).
    fn flush_handshake_record(
        &mut self,
        pending: &mut Vec<u8>,
        datagrams: &mut Vec<Vec<u8>>,
        current: &mut Vec<u8>,
    ) {
        if pending.is_empty() {
            return;
        }
        if let Ok(r) = self.encode_record(ct::HANDSHAKE, 0, pending) {
            place_record(datagrams, current, r, self.config.mtu());
        }
        pending.clear();
    }

    /// Resends our last flight because the peer repeated its previous one, at most once per
    /// [`PEER_TRIGGERED_RESEND_INTERVAL`].
    fn resend_on_peer_repeat(&mut self, now: Instant, metrics: &mut Metrics) {
        if self.flight.is_empty() {
            return;
        }
        // While our own timer runs, at most once per its interval: a peer whose timer is
        // shorter than the path's round trip repeats its flight while ours is on the way, and
        // answering every repeat would double the traffic of a slow path.
        let gap = self
            .retransmit
            .as_ref()
            .map_or(PEER_TRIGGERED_RESEND_INTERVAL, |r| {
                r.rto.max(PEER_TRIGGERED_RESEND_INTERVAL)
            });
        if let Some(t) = self.last_peer_resend {
            if now < t + gap {
                return;
            }
        }
        self.last_peer_resend = Some(now);
        self.send_flight(now, metrics);
        metrics.flights_resent_on_repeat += 1;
        if let Some(r) = &mut self.retransmit {
            r.next_at = now + r.rto;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Receiving
    // -----------------------------------------------------------------------------------------

    /// Handles a datagram from `from` routed to this connection. `cid_len` is the length of the
    /// CIDs the receiving side issued (the server's configured length, or the client's own).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: &PeerAddr,
        datagram: &[u8],
        metrics: &mut Metrics,
        events: &mut Events,
    ) {
        let cid_len = self.own_cid.len();
        for rec in Records::new(datagram, cid_len) {
            if self.closed && !self.draining {
                return;
            }
            match rec {
                Ok(rec) => self.handle_record(now, from, &rec, metrics, events),
                Err(_) => {
                    metrics.records_malformed += 1;
                    return;
                }
            }
        }
    }

    fn handle_record(
        &mut self,
        now: Instant,
        from: &PeerAddr,
        rec: &Record<'_>,
        metrics: &mut Metrics,
        events: &mut Events,
    ) {
        if rec.content_type == ct::TLS12_CID || rec.epoch > 0 {
            self.handle_protected(now, from, rec, metrics, events);
            return;
        }
        // Epoch 0: plaintext, unauthenticated.
        match rec.content_type {
            ct::HANDSHAKE => self.handle_plain_handshake(now, rec.fragment, metrics, events),
            ct::CHANGE_CIPHER_SPEC => {
                if rec.fragment != [1] {
                    metrics.records_malformed += 1;
                    return;
                }
                self.handle_ccs(now, metrics, events);
            }
            ct::ALERT => {
                // An unauthenticated alert can be forged by anyone who knows the address: it
                // only ends a handshake in progress, never an established session.
                if self.established || self.closed {
                    return;
                }
                if let Ok((level, desc)) = wire::parse_alert(rec.fragment) {
                    if level == alert::FATAL || desc == alert::CLOSE_NOTIFY {
                        metrics.refuse(crate::error::RefusalReason::PeerAlert);
                        self.closed = true;
                        self.hs = None;
                        self.retransmit = None;
                        events.push(ConnEvent::Closed(CloseReason::HandshakeFailed(
                            Error::PeerAlert(desc),
                        )));
                    }
                }
            }
            _ => metrics.records_dropped += 1,
        }
    }

    fn handle_plain_handshake(
        &mut self,
        now: Instant,
        fragment: &[u8],
        metrics: &mut Metrics,
        events: &mut Events,
    ) {
        let frags = match wire::parse_handshake_fragments(fragment) {
            Ok(f) => f,
            Err(_) => {
                metrics.records_malformed += 1;
                return;
            }
        };
        if self.established {
            // The peer repeats its last flight: it did not get our final flight.
            if self.role == Role::Server {
                self.resend_on_peer_repeat(now, metrics);
            }
            return;
        }
        let mut repeat = false;
        for f in &frags {
            if self.role == Role::Server && f.msg_type == hs::CLIENT_HELLO {
                // The ClientHello with the cookie again: flight 4 was lost.
                repeat = true;
                continue;
            }
            let Some(h) = &mut self.hs else { return };
            match h.reassembler.insert(f) {
                Ok(Inserted::Buffered) => {}
                Ok(Inserted::Old) => repeat = true,
                Ok(Inserted::TooFarAhead) => {}
                Err(e) => {
                    self.fail(Error::Decode(e), metrics, events);
                    return;
                }
            }
        }
        self.process_messages(now, metrics, events);
        if repeat && !self.closed && !self.established {
            self.resend_on_peer_repeat(now, metrics);
        }
    }

    fn process_messages(&mut self, now: Instant, metrics: &mut Metrics, events: &mut Events) {
        loop {
            if self.closed {
                return;
            }
            let Some(h) = &mut self.hs else { return };
            let Some((t, seq, body)) = h.reassembler.pop() else {
                return;
            };
            h.last_progress = now;
            let result = match h.state {
                HsState::Server(s) => self.server_message(now, s, t, seq, &body, metrics, events),
                HsState::Client(s) => self.client_message(now, s, t, seq, &body, metrics, events),
            };
            if let Err(e) = result {
                self.fail(e, metrics, events);
                return;
            }
        }
    }

    fn handle_ccs(&mut self, now: Instant, metrics: &mut Metrics, events: &mut Events) {
        if self.established {
            if self.role == Role::Server {
                self.resend_on_peer_repeat(now, metrics);
            }
            return;
        }
        let Some(h) = &mut self.hs else { return };
        let expecting = matches!(
            h.state,
            HsState::Server(ServerState::ExpectChangeCipherSpec)
                | HsState::Client(ClientState::ExpectChangeCipherSpec)
        );
        if !expecting {
            // Early or repeated: dropped silently; the peer's retransmission brings it again.
            metrics.records_dropped += 1;
            return;
        }
        let Some(read) = h.pending_read.take() else {
            return;
        };
        self.read_cipher = Some(read);
        self.read_window = ReplayWindow::new();
        h.state = match h.state {
            HsState::Server(_) => HsState::Server(ServerState::ExpectFinished),
            HsState::Client(_) => HsState::Client(ClientState::ExpectFinished),
        };
        h.last_progress = now;
        let buffered = std::mem::take(&mut h.future_records);
        let peer = self.peer.clone();
        for (content, epoch, seq, cid, payload) in buffered {
            let rec = Record {
                content_type: content,
                version: DTLS_1_2,
                epoch,
                seq,
                cid: &cid,
                fragment: &payload,
            };
            self.handle_protected(now, &peer, &rec, metrics, events);
        }
    }

    fn handle_protected(
        &mut self,
        now: Instant,
        from: &PeerAddr,
        rec: &Record<'_>,
        metrics: &mut Metrics,
        events: &mut Events,
    ) {
        let is_cid = rec.content_type == ct::TLS12_CID;
        // RFC 9146 §4: with a CID we issued, protected records must carry it; without, never.
        if is_cid == self.own_cid.is_empty() || (is_cid && rec.cid != self.own_cid.as_slice()) {
            metrics.records_dropped += 1;
            return;
        }
        if rec.epoch != 1 {
            metrics.records_dropped += 1;
            return;
        }
        let Some(cipher) = &self.read_cipher else {
            if let Some(h) = &mut self.hs {
                if h.future_records.len() < MAX_FUTURE_RECORDS {
                    h.future_records.push((
                        rec.content_type,
                        rec.epoch,
                        rec.seq,
                        rec.cid.to_vec(),
                        rec.fragment.to_vec(),
                    ));
                }
            }
            return;
        };
        // RFC 6347 §4.1.2.6: the replay check comes first; the window moves only after the
        // record authenticated.
        if !self.read_window.check(rec.seq) {
            metrics.records_replayed += 1;
            return;
        }
        let opened = if is_cid {
            cipher
                .open_cid(rec.epoch, rec.seq, rec.cid, rec.fragment)
                .map_err(|_| ())
                .and_then(|inner| wire::split_inner_plaintext(inner).map_err(|_| ()))
        } else {
            cipher
                .open(rec.epoch, rec.seq, rec.content_type, rec.fragment)
                .map(|p| (rec.content_type, p))
                .map_err(|_| ())
        };
        let Ok((content, plaintext)) = opened else {
            // RFC 6347 §4.1.2.1: records with bad MACs are silently discarded.
            metrics.records_bad_mac += 1;
            return;
        };
        let newest = self.read_window.highest();
        self.read_window.update(rec.seq);
        self.last_activity = now;
        // RFC 9146 §6: move the peer address only on an authenticated record that is newer than
        // any before it.
        if *from != self.peer && newest.is_none_or(|n| rec.seq > n) {
            let old = std::mem::replace(&mut self.peer, from.clone());
            self.path_overhead = self.peer.path_overhead();
            metrics.peer_address_changes += 1;
            events.push(ConnEvent::AddressChanged(old));
        }
        if self.draining && content != ct::HANDSHAKE {
            return;
        }
        match content {
            ct::APPLICATION_DATA => {
                if self.established {
                    // The peer has our final flight.
                    self.final_flight_until = None;
                    if self.role == Role::Server {
                        self.flight.clear();
                    }
                    events.push(ConnEvent::Data(plaintext));
                } else {
                    metrics.records_dropped += 1;
                }
            }
            ct::ALERT => {
                if let Ok((level, desc)) = wire::parse_alert(&plaintext) {
                    if desc == alert::CLOSE_NOTIFY || level == alert::FATAL {
                        let reason = if self.established {
                            CloseReason::PeerClosed
                        } else {
                            metrics.refuse(crate::error::RefusalReason::PeerAlert);
                            CloseReason::HandshakeFailed(Error::PeerAlert(desc))
                        };
                        self.closed = true;
                        self.hs = None;
                        self.retransmit = None;
                        events.push(ConnEvent::Closed(reason));
                    }
                }
            }
            ct::HANDSHAKE => {
                if self.established {
                    let Ok(frags) = wire::parse_handshake_fragments(&plaintext) else {
                        return;
                    };
                    let renegotiation = frags
                        .iter()
                        .any(|f| f.msg_type == hs::CLIENT_HELLO || f.msg_type == hs::HELLO_REQUEST);
                    if renegotiation {
                        // RFC 7925 §17: renegotiation is disabled; refuse with a warning.
                        metrics.renegotiations_refused += 1;
                        if let Ok(r) = self.encode_record(
                            ct::ALERT,
                            self.write_epoch,
                            &[alert::WARNING, alert::NO_RENEGOTIATION],
                        ) {
                            self.outbox.push(r);
                        }
                    } else if self.role == Role::Server {
                        // The client's Finished again: our final flight was lost.
                        self.resend_on_peer_repeat(now, metrics);
                    }
                    return;
                }
                let frags = match wire::parse_handshake_fragments(&plaintext) {
                    Ok(f) => f,
                    Err(e) => {
                        self.fail(Error::Decode(e), metrics, events);
                        return;
                    }
                };
                for f in &frags {
                    let Some(h) = &mut self.hs else { return };
                    if let Err(e) = h.reassembler.insert(f) {
                        self.fail(Error::Decode(e), metrics, events);
                        return;
                    }
                }
                self.process_messages(now, metrics, events);
            }
            _ => metrics.records_dropped += 1,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Server handshake
    // -----------------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn server_message(
        &mut self,
        now: Instant,
        state: ServerState,
        t: u8,
        seq: u16,
        body: &[u8],
        metrics: &mut Metrics,
        events: &mut Events,
    ) -> Result<(), Error> {
        let RoleConfig::Server(config) = self.config.clone() else {
            return Err(Error::Internal("server message on a client".into()));
        };
        let message = wire::handshake_message(t, seq, body);
        match (state, t) {
            (ServerState::ExpectCertificate, hs::CERTIFICATE) => {
                let chain = CertificateMsg::parse(body, config.limits.max_chain_len)?.certificates;
                if chain.is_empty() {
                    return Err(Error::NoCertificate);
                }
                // A C509 chain is verified, and proves possession, as its DER equivalent.
                let peer_type = self.hs_mut()?.peer_certificate_type;
                if peer_type != cert_type::X509 {
                    metrics.c509_client_certificates += 1;
                }
                let chain = der_chain(config.c509.as_ref(), peer_type, chain)?;
                metrics.chain_verifications += 1;
                metrics.peer_certificates_received += chain.len() as u64;
                let mut verified = (config.client_verifier)(&chain)?;
                // The leaf's keyUsage, and the key that must sign the CertificateVerify: from
                // the verifier's parse of the leaf if it handed one over (taken: not kept with
                // the session), else parsed here (once).
                let peer_key = match (verified.leaf.take(), chain.first()) {
                    (Some(leaf), _) => crypto::signing_key_of(&leaf)?,
                    (None, Some(der)) => crypto::leaf_signing_key(der)?,
                    (None, None) => None,
                };
                self.peer_chain = chain;
                self.verified = Some(verified);
                let h = self.hs_mut()?;
                h.peer_key = peer_key;
                h.transcript.add(&message);
                h.state = HsState::Server(ServerState::ExpectClientKeyExchange);
            }
            (ServerState::ExpectClientKeyExchange, hs::CLIENT_KEY_EXCHANGE) => {
                let point = wire::parse_client_key_exchange(body)?;
                let h = self.hs_mut()?;
                let eph = h
                    .ephemeral
                    .take()
                    .ok_or_else(|| Error::Internal("no ephemeral key".into()))?;
                let premaster = eph.agree(&point)?;
                h.transcript.add(&message);
                derive_keys(h, &premaster, Role::Server)?;
                h.state = HsState::Server(ServerState::ExpectCertificateVerify);
            }
            (ServerState::ExpectCertificateVerify, hs::CERTIFICATE_VERIFY) => {
                let (scheme, sig) = wire::parse_digitally_signed(body)?;
                let scheme = SignatureScheme::from_u16(scheme).ok_or(Error::IllegalParameter(
                    "CertificateVerify signature scheme",
                ))?;
                if self.peer_chain.is_empty() {
                    return Err(Error::NoCertificate);
                }
                let h = self.hs_mut()?;
                metrics.ecdsa_verifies += 1;
                h.peer_key
                    .as_ref()
                    .ok_or(Error::BadSignature)?
                    .verify(scheme, h.transcript.as_bytes(), &sig)
                    .map_err(|_| Error::BadSignature)?;
                h.transcript.add(&message);
                h.state = HsState::Server(ServerState::ExpectChangeCipherSpec);
            }
            (ServerState::ExpectFinished, hs::FINISHED) => {
                let got = wire::parse_finished(body)?;
                let h = self.hs_mut()?;
                if !same_bytes(&got, &h.verify_data(b"client finished")?) {
                    return Err(Error::BadFinished);
                }
                h.transcript.add(&message);
                let ours = h.verify_data(b"server finished")?;
                let fin = wire::handshake_message(hs::FINISHED, h.next_send_msg_seq, &ours);
                h.next_send_msg_seq = h.next_send_msg_seq.wrapping_add(1);
                // Flight 6: ChangeCipherSpec, Finished (RFC 6347 Figure 1).
                self.flight = vec![
                    FlightItem::ChangeCipherSpec { epoch: 0 },
                    FlightItem::Handshake {
                        epoch: 1,
                        message: fin,
                    },
                ];
                self.send_flight(now, metrics);
                self.established = true;
                self.hs = None;
                self.retransmit = None;
                self.final_flight_until = Some(now + config.final_flight_retention);
                self.last_activity = now;
                metrics.handshakes_completed += 1;
                events.push(ConnEvent::Connected);
            }
            _ => return Err(Error::UnexpectedMessage(message_name(t))),
        }
        Ok(())
    }

    fn hs_mut(&mut self) -> Result<&mut Handshake, Error> {
        self.hs
            .as_deref_mut()
            .ok_or_else(|| Error::Internal("no handshake state".into()))
    }

    // -----------------------------------------------------------------------------------------
    // Client handshake
    // -----------------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn client_message(
        &mut self,
        now: Instant,
        state: ClientState,
        t: u8,
        seq: u16,
        body: &[u8],
        metrics: &mut Metrics,
        events: &mut Events,
    ) -> Result<(), Error> {
        let RoleConfig::Client(config) = self.config.clone() else {
            return Err(Error::Internal("client message on a server".into()));
        };
        let message = wire::handshake_message(t, seq, body);
        match (state, t) {
            (ClientState::ExpectHelloVerifyOrServerHello, hs::HELLO_VERIFY_REQUEST) => {
                let hvr = HelloVerifyRequest::parse(body)?;
                // RFC 6347 §4.2.1: the HelloVerifyRequest version only says how it is formatted.
                if hvr.server_version != DTLS_1_0 && hvr.server_version != DTLS_1_2 {
                    return Err(Error::ProtocolVersion);
                }
                let h = self.hs_mut()?;
                let deferred = std::mem::take(&mut h.deferred_extensions);
                let ch = h
                    .client_hello
                    .as_mut()
                    .ok_or_else(|| Error::Internal("no ClientHello".into()))?;
                ch.cookie = hvr.cookie;
                ch.extensions.extend(deferred);
                let msg_seq = h.next_send_msg_seq;
                h.next_send_msg_seq = h.next_send_msg_seq.wrapping_add(1);
                let m = wire::handshake_message(hs::CLIENT_HELLO, msg_seq, &ch.encode());
                // RFC 6347 §4.2.6: the first ClientHello and the HelloVerifyRequest are not
                // part of the transcript.
                h.transcript = Transcript::new();
                h.transcript.add(&m);
                self.flight = vec![FlightItem::Handshake {
                    epoch: 0,
                    message: m,
                }];
                self.send_flight(now, metrics);
                self.arm_retransmit(now);
            }
            (ClientState::ExpectHelloVerifyOrServerHello, hs::SERVER_HELLO) => {
                let sh = ServerHello::parse(body)?;
                if sh.server_version != DTLS_1_2 {
                    return Err(Error::ProtocolVersion);
                }
                let suite = CipherSuite::from_u16(sh.cipher_suite)
                    .filter(|s| config.cipher_suites.contains(s))
                    .ok_or(Error::IllegalParameter("cipher suite not offered"))?;
                if sh.compression_method != 0 {
                    return Err(Error::IllegalParameter("compression method"));
                }
                let offered = [
                    ext::SUPPORTED_GROUPS,
                    ext::EC_POINT_FORMATS,
                    ext::EXTENDED_MASTER_SECRET,
                    ext::RENEGOTIATION_INFO,
                    ext::CONNECTION_ID,
                    ext::CACHED_INFO,
                    ext::CLIENT_CERTIFICATE_TYPE,
                    ext::SERVER_CERTIFICATE_TYPE,
                ];
                let cid_offered = config.connection_id.is_some();
                let cached_offered = !self.hs_mut()?.cached_fingerprints.is_empty();
                let types_offered = config.c509.is_some();
                for e in &sh.extensions {
                    let cert_type_ext = e.typ == ext::CLIENT_CERTIFICATE_TYPE
                        || e.typ == ext::SERVER_CERTIFICATE_TYPE;
                    if !offered.contains(&e.typ)
                        || (e.typ == ext::CONNECTION_ID && !cid_offered)
                        || (e.typ == ext::CACHED_INFO && !cached_offered)
                        || (cert_type_ext && !types_offered)
                    {
                        return Err(Error::UnsupportedExtension(e.typ));
                    }
                }
                // RFC 7250 §4.2: the types the server chose, each one we offered.
                let chosen = |typ: u16| -> Result<u8, Error> {
                    match sh.extension(typ) {
                        None => Ok(cert_type::X509),
                        Some(d) => {
                            let t = wire::parse_certificate_type(d)?;
                            let ours = config.c509.as_ref().map(|c| c.type_code);
                            if t == cert_type::X509 || Some(t) == ours {
                                Ok(t)
                            } else {
                                Err(Error::IllegalParameter("certificate type not offered"))
                            }
                        }
                    }
                };
                let own_certificate_type = chosen(ext::CLIENT_CERTIFICATE_TYPE)?;
                let peer_certificate_type = chosen(ext::SERVER_CERTIFICATE_TYPE)?;
                // RFC 7924 §4: the server names only types we offered (we offer 'cert').
                let certificate_cached = match sh.extension(ext::CACHED_INFO) {
                    Some(d) => {
                        let types = wire::parse_cached_info_server(d)?;
                        if types.iter().any(|t| *t != wire::cached_info_type::CERT) {
                            return Err(Error::IllegalParameter("cached_info type not offered"));
                        }
                        true
                    }
                    None => false,
                };
                if let Some(d) = sh.extension(ext::RENEGOTIATION_INFO) {
                    if !wire::parse_opaque8(d)?.is_empty() {
                        return Err(Error::Renegotiation);
                    }
                }
                let ems = sh.extension(ext::EXTENDED_MASTER_SECRET).is_some();
                if !ems && config.require_extended_master_secret {
                    return Err(Error::NoExtendedMasterSecret);
                }
                let peer_cid = match sh.extension(ext::CONNECTION_ID) {
                    Some(d) => Some(wire::parse_opaque8(d)?),
                    None => None,
                };
                match peer_cid {
                    Some(c) => self.peer_cid = c,
                    // The server did not take up CID: neither side uses one.
                    None => self.own_cid.clear(),
                }
                self.suite = Some(suite);
                let h = self.hs_mut()?;
                h.suite = suite;
                h.ems = ems;
                h.certificate_cached = certificate_cached;
                h.own_certificate_type = own_certificate_type;
                h.peer_certificate_type = peer_certificate_type;
                h.server_random = sh.random;
                h.transcript.add(&message);
                h.state = HsState::Client(ClientState::ExpectCertificate);
            }
            (ClientState::ExpectCertificate, hs::CERTIFICATE) => {
                let h = self.hs_mut()?;
                // RFC 7924 §4.1: after the server took up cached_info, a short message is the
                // fingerprint of a chain we hold; a full one replaces our copy.
                let cached = match wire::parse_cached_certificate(body) {
                    Some(hash) if h.certificate_cached => Some(
                        h.cached_fingerprints
                            .iter()
                            .zip(&config.cached_server_chains)
                            .find(|(f, _)| f[..] == *hash)
                            .map(|(_, chain)| chain.clone())
                            .ok_or(Error::IllegalParameter(
                                "cached_info fingerprint of a certificate we do not hold",
                            ))?,
                    ),
                    _ => None,
                };
                let peer_type = h.peer_certificate_type;
                let chain = match cached {
                    Some(chain) => chain,
                    None => der_chain(
                        config.c509.as_ref(),
                        peer_type,
                        CertificateMsg::parse(body, config.max_chain_len)?.certificates,
                    )?,
                };
                if chain.is_empty() {
                    return Err(Error::BadCertificate("empty server certificate".into()));
                }
                metrics.chain_verifications += 1;
                let verified = (config.server_verifier)(&chain)?;
                self.peer_chain = chain;
                self.verified = Some(verified);
                let h = self.hs_mut()?;
                h.transcript.add(&message);
                h.state = HsState::Client(ClientState::ExpectServerKeyExchange);
            }
            (ClientState::ExpectServerKeyExchange, hs::SERVER_KEY_EXCHANGE) => {
                let ske = ServerKeyExchange::parse(body)?;
                let group = NamedGroup::from_u16(ske.named_group)
                    .filter(|g| config.groups.contains(g))
                    .ok_or(Error::IllegalParameter("group not offered"))?;
                let scheme = SignatureScheme::from_u16(ske.signature_scheme)
                    .filter(|s| config.signature_schemes.contains(s))
                    .ok_or(Error::IllegalParameter("signature scheme not offered"))?;
                let leaf = self
                    .peer_chain
                    .first()
                    .ok_or_else(|| Error::Internal("no server certificate".into()))?;
                let key = crypto::PeerKey::from_cert(leaf).map_err(|_| Error::BadSignature)?;
                let h = self.hs_mut()?;
                let params = ServerKeyExchange::params(ske.named_group, &ske.public);
                let signed =
                    ServerKeyExchange::signed_data(&h.client_random, &h.server_random, &params);
                key.verify(scheme, &signed, &ske.signature)
                    .map_err(|_| Error::BadSignature)?;
                h.server_public = Some((group, ske.public));
                h.transcript.add(&message);
                h.state = HsState::Client(ClientState::ExpectCertificateRequestOrDone);
            }
            (ClientState::ExpectCertificateRequestOrDone, hs::CERTIFICATE_REQUEST) => {
                let cr = CertificateRequest::parse(body)?;
                if !cr.certificate_types.contains(&wire::CERT_TYPE_ECDSA_SIGN)
                    || !cr
                        .signature_schemes
                        .contains(&config.private_key.scheme().code())
                {
                    return Err(Error::NoCommonSignatureScheme);
                }
                let h = self.hs_mut()?;
                h.certificate_requested = true;
                h.transcript.add(&message);
                h.state = HsState::Client(ClientState::ExpectServerHelloDone);
            }
            (
                ClientState::ExpectCertificateRequestOrDone | ClientState::ExpectServerHelloDone,
                hs::SERVER_HELLO_DONE,
            ) => {
                if !body.is_empty() {
                    return Err(Error::Decode(wire::DecodeError::TrailingBytes));
                }
                self.client_flight5(now, &config, &message, metrics)?;
            }
            (ClientState::ExpectFinished, hs::FINISHED) => {
                let got = wire::parse_finished(body)?;
                let h = self.hs_mut()?;
                if !same_bytes(&got, &h.verify_data(b"server finished")?) {
                    return Err(Error::BadFinished);
                }
                self.established = true;
                self.hs = None;
                self.retransmit = None;
                self.flight.clear();
                self.last_activity = now;
                metrics.handshakes_completed += 1;
                events.push(ConnEvent::Connected);
            }
            _ => return Err(Error::UnexpectedMessage(message_name(t))),
        }
        Ok(())
    }

    /// Flight 5: Certificate, ClientKeyExchange, CertificateVerify, ChangeCipherSpec, Finished.
    fn client_flight5(
        &mut self,
        now: Instant,
        config: &ClientConfig,
        shd: &[u8],
        metrics: &mut Metrics,
    ) -> Result<(), Error> {
        let rng = ring::rand::SystemRandom::new();
        let h = self.hs_mut()?;
        h.transcript.add(shd);
        let (group, server_public) = h
            .server_public
            .take()
            .ok_or_else(|| Error::Internal("no server key".into()))?;
        let eph = EphemeralKey::generate(group, &rng)?;
        let our_public = crate::faults::client_point(config, eph.public_key().to_vec());
        let premaster = eph.agree(&server_public)?;
        let mut flight = Vec::with_capacity(5);
        let mut seq = h.next_send_msg_seq;
        let mut next = |t: u8, body: &[u8], tr: &mut Transcript| {
            let m = wire::handshake_message(t, seq, body);
            seq = seq.wrapping_add(1);
            tr.add(&m);
            m
        };
        if h.certificate_requested {
            let certificates = match &config.c509 {
                Some(codec) if h.own_certificate_type == codec.type_code => {
                    c509_chain(codec, &config.certificate_chain).ok_or_else(|| {
                        Error::Internal("our certificate has no C509 encoding".into())
                    })?
                }
                _ => config.certificate_chain.clone(),
            };
            let m = next(
                hs::CERTIFICATE,
                &CertificateMsg { certificates }.encode(),
                &mut h.transcript,
            );
            flight.push(FlightItem::Handshake {
                epoch: 0,
                message: m,
            });
        }
        let m = next(
            hs::CLIENT_KEY_EXCHANGE,
            &wire::client_key_exchange_body(&our_public),
            &mut h.transcript,
        );
        flight.push(FlightItem::Handshake {
            epoch: 0,
            message: m,
        });
        derive_keys(h, &premaster, Role::Client)?;
        if h.certificate_requested {
            let signed = crate::faults::certificate_verify_input(config, h.transcript.as_bytes());
            let sig = config.private_key.sign(&rng, &signed)?;
            metrics.ecdsa_signs += 1;
            let body = wire::digitally_signed_body(config.private_key.scheme().code(), &sig);
            let m = next(hs::CERTIFICATE_VERIFY, &body, &mut h.transcript);
            flight.push(FlightItem::Handshake {
                epoch: 0,
                message: m,
            });
        }
        flight.push(FlightItem::ChangeCipherSpec { epoch: 0 });
        let vd = h.verify_data(b"client finished")?;
        let vd = crate::faults::finished(config, vd);
        let m = next(hs::FINISHED, &vd, &mut h.transcript);
        flight.push(FlightItem::Handshake {
            epoch: 1,
            message: m,
        });
        h.next_send_msg_seq = seq;
        h.state = HsState::Client(ClientState::ExpectChangeCipherSpec);
        self.flight = flight;
        self.send_flight(now, metrics);
        self.arm_retransmit(now);
        Ok(())
    }
}

impl Handshake {
    /// Finished verify_data (RFC 5246 §7.4.9) over the transcript so far, with `label`
    /// ("client finished" / "server finished").
    fn verify_data(&mut self, label: &[u8]) -> Result<[u8; 12], Error> {
        let master = self
            .master
            .ok_or_else(|| Error::Internal("no master".into()))?;
        let hash = self.transcript.hash(self.suite.prf_hash());
        Ok(crypto::finished_verify_data(
            self.suite, &master, label, &hash,
        ))
    }
}

/// Master secret (RFC 7627 when negotiated) and the record keys of epoch 1.
fn derive_keys(h: &mut Handshake, premaster: &[u8], role: Role) -> Result<(), Error> {
    let session_hash;
    let ems_hash = if h.ems {
        // RFC 7627 §3: the session hash covers the transcript up to the ClientKeyExchange.
        session_hash = h.transcript.hash(h.suite.prf_hash());
        Some(session_hash.as_slice())
    } else {
        None
    };
    let master = crypto::master_secret(
        h.suite,
        premaster,
        ems_hash,
        &h.client_random,
        &h.server_random,
    );
    let kb = crypto::key_block(h.suite, &master, &h.client_random, &h.server_random);
    let client = RecordCipher::new(h.suite, &kb.client_write_key, kb.client_write_iv)?;
    let server = RecordCipher::new(h.suite, &kb.server_write_key, kb.server_write_iv)?;
    let (read, write) = match role {
        Role::Server => (client, server),
        Role::Client => (server, client),
    };
    h.pending_read = Some(read);
    h.pending_write = Some(write);
    h.master = Some(master);
    Ok(())
}

/// Appends record `r` to the datagram being filled, or starts a new one if it does not fit the
/// MTU.
fn place_record(datagrams: &mut Vec<Vec<u8>>, current: &mut Vec<u8>, r: Vec<u8>, mtu: usize) {
    if !current.is_empty() && current.len() + r.len() > mtu {
        datagrams.push(std::mem::take(current));
    }
    current.extend_from_slice(&r);
}

/// A DER chain in its C509 encoding, or `None` if a certificate does not convert.
fn c509_chain(codec: &C509Codec, chain: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    chain.iter().map(|c| (codec.from_der)(c).ok()).collect()
}

/// A received chain of certificate type `typ` as DER (C509 through the codec).
fn der_chain(
    codec: Option<&C509Codec>,
    typ: u8,
    chain: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, Error> {
    match codec {
        Some(codec) if typ == codec.type_code && typ != cert_type::X509 => chain
            .iter()
            .map(|c| (codec.to_der)(c).map_err(|e| Error::BadCertificate(format!("C509: {e}"))))
            .collect(),
        _ => Ok(chain),
    }
}

fn message_name(t: u8) -> &'static str {
    match t {
        hs::HELLO_REQUEST => "HelloRequest",
        hs::CLIENT_HELLO => "ClientHello",
        hs::SERVER_HELLO => "ServerHello",
        hs::HELLO_VERIFY_REQUEST => "HelloVerifyRequest",
        hs::CERTIFICATE => "Certificate",
        hs::SERVER_KEY_EXCHANGE => "ServerKeyExchange",
        hs::CERTIFICATE_REQUEST => "CertificateRequest",
        hs::SERVER_HELLO_DONE => "ServerHelloDone",
        hs::CERTIFICATE_VERIFY => "CertificateVerify",
        hs::CLIENT_KEY_EXCHANGE => "ClientKeyExchange",
        hs::FINISHED => "Finished",
        _ => "unknown handshake message",
    }
}
