//! The meter's DTLS 1.2 client on OpenSSL (the `openssl` crate over the system's OpenSSL 3;
//! cargo feature `openssl-backend`): the same profile as the webrtc-dtls client in
//! [`crate::dtls`]. It was expected to be the cheaper load generator (OpenSSL's P-256 is
//! assembly; no throw-away certificates per connection; no per-connection tasks), but it measured
//! *more* client CPU per enrollment than webrtc-dtls with Debian 12's OpenSSL 3.0, whose
//! certificate and key decoding outweighs the faster curve arithmetic (figures in
//! docs/benchmarks.md, "The load generator"); it is not the load generator's default.
//!
//! Profile (RFC 9148 §3, RFC 7925 §4): DTLS 1.2 only; TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 only;
//! the P-256 group only (so the server does the same ECDHE work as with a real meter); signature
//! algorithm ecdsa_secp256r1_sha256 only; the extended master secret (RFC 7627) is required;
//! the client certificate is the credential's chain; the server is verified against the meter's
//! Implicit TA database (any listed certificate is an anchor, as with webpki) and `server_name`.
//!
//! Sans-IO: OpenSSL runs over an in-memory datagram pipe ([`DatagramPipe`]: a read pops one
//! queued datagram or returns `WouldBlock`, each write is one outgoing datagram), and a small
//! async loop moves datagrams between the pipe and a `webrtc_util::Conn` (client-sim's emulated
//! link, or a plain UDP socket). OpenSSL's DTLS retransmission timer (RFC 6347 §4.2.4: 1 s
//! initial, doubled on each expiry) is checked by OpenSSL itself whenever the handshake is
//! driven while it waits for a flight, so the loop drives it again every [`TIMER_TICK`] when no
//! datagram arrives. The initial timer cannot be changed through the safe API
//! (`DTLS_set_timer_cb` is not wrapped), so `DtlsClientConfig::flight_interval` does not apply.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcGroupRef, EcKey, EcPoint};
use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode,
    SslVersion,
};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509VerifyResult, X509};
use webrtc_util::conn::Conn;

use crate::dtls::{DtlsClientConfig, SessionError};
use crate::meter::{Credential, FailureReason};

/// OpenSSL cipher name of TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (RFC 7251), the RFC 9148 §3 suite.
/// Newer OpenSSL releases (3.6 verified) count its 64-bit tag as 64-bit security and drop it below
/// the default security level ("no ciphers available"); the profile mandates it, hence level 0
/// (groups and signature algorithms stay pinned to P-256 / ECDSA-SHA256 below).
const CIPHER: &str = "ECDHE-ECDSA-AES128-CCM8:@SECLEVEL=0";
/// The one ECDHE group (RFC 7925 §4.4: secp256r1).
const GROUPS: &str = "P-256";
/// ecdsa_secp256r1_sha256 (RFC 7925 §4.4.2).
const SIGALGS: &str = "ECDSA+SHA256";
/// How often a waiting handshake is driven again so that OpenSSL's retransmission timer fires.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Receive buffer: larger than any datagram the server sends (webrtc-util's RECEIVE_MTU).
const RECV_BUF: usize = 8192;
/// Datagrams the pipe holds in each direction before it refuses more (a full flight at a small
/// MTU is well under this; the loop drains both queues after every OpenSSL call).
const MAX_QUEUED: usize = 256;
/// SSL contexts kept (one per distinct trust-anchor set; a run normally has one).
const MAX_CONTEXTS: usize = 8;
/// Parsed credentials kept (a load generator reuses a few thousand device identities).
const MAX_CREDENTIALS: usize = 4096;

/// In-memory datagram transport under OpenSSL.
#[derive(Debug, Default)]
pub struct DatagramPipe {
    incoming: VecDeque<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
}

impl DatagramPipe {
    fn push_incoming(&mut self, d: &[u8]) -> io::Result<()> {
        if self.incoming.len() >= MAX_QUEUED {
            return Err(io::Error::other("DTLS pipe: incoming queue full"));
        }
        self.incoming.push_back(d.to_vec());
        Ok(())
    }
}

impl Read for DatagramPipe {
    /// One datagram per read (DTLS reads whole datagrams; OpenSSL's buffer is larger than any).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(d) = self.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), d.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }
}

impl Write for DatagramPipe {
    /// OpenSSL writes each DTLS datagram (one or more records) with one call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.outgoing.len() >= MAX_QUEUED {
            return Err(io::Error::other("DTLS pipe: outgoing queue full"));
        }
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends the datagrams OpenSSL wrote ([`crate::dtls::send_queued`]: cancel-safe).
async fn flush(conn: &(dyn Conn + Send + Sync), pipe: &mut DatagramPipe) -> io::Result<()> {
    crate::dtls::send_queued(conn, &mut pipe.outgoing).await
}

/// What makes one SSL context differ from another.
#[derive(PartialEq, Eq)]
struct ContextKey {
    trust_anchors_der: Vec<Vec<u8>>,
    skip_verify: bool,
}

static CONTEXTS: Mutex<Vec<(ContextKey, SslContext)>> = Mutex::new(Vec::new());

fn build_context(cfg: &DtlsClientConfig) -> Result<SslContext, FailureReason> {
    let setup = |what: &str, e: openssl::error::ErrorStack| {
        FailureReason::HandshakeError(format!("OpenSSL client setup ({what}): {e}"))
    };
    let mut b =
        SslContextBuilder::new(SslMethod::dtls_client()).map_err(|e| setup("context", e))?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))
        .map_err(|e| setup("min version", e))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))
        .map_err(|e| setup("max version", e))?;
    b.set_cipher_list(CIPHER).map_err(|e| setup("cipher", e))?;
    b.set_groups_list(GROUPS).map_err(|e| setup("groups", e))?;
    b.set_sigalgs_list(SIGALGS)
        .map_err(|e| setup("signature algorithms", e))?;
    // NO_QUERY_MTU: the MTU is ours (SSL_set_mtu below), not asked of the (in-memory) BIO.
    // NO_TICKET: meters keep no session state (RFC 7925 §10 resumption is not used here).
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    // Every certificate of the Implicit TA database is a trust anchor, root or not (RFC 7030
    // §4.1.3; webpki in the webrtc backend does the same).
    b.verify_param_mut()
        .set_flags(X509VerifyFlags::PARTIAL_CHAIN)
        .map_err(|e| setup("verify flags", e))?;
    for ta in &cfg.trust_anchors_der {
        let cert = X509::from_der(ta)
            .map_err(|e| FailureReason::Credentials(format!("trust anchor: {e}")))?;
        b.cert_store_mut()
            .add_cert(cert)
            .map_err(|e| setup("trust anchor", e))?;
    }
    b.set_verify(if cfg.danger_skip_server_verification {
        SslVerifyMode::NONE
    } else {
        SslVerifyMode::PEER
    });
    Ok(b.build())
}

/// The shared SSL context for `cfg` (built once per distinct trust-anchor set: building one
/// costs far more than a handshake's worth of setup in OpenSSL 3).
fn context(cfg: &DtlsClientConfig) -> Result<SslContext, FailureReason> {
    let key = ContextKey {
        trust_anchors_der: cfg.trust_anchors_der.clone(),
        skip_verify: cfg.danger_skip_server_verification,
    };
    let mut cache = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, ctx)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(ctx.clone());
    }
    let ctx = build_context(cfg)?;
    if cache.len() >= MAX_CONTEXTS {
        cache.remove(0);
    }
    cache.push((key, ctx.clone()));
    Ok(ctx)
}

/// The P-256 curve, built once.
fn p256_group() -> Result<&'static EcGroupRef, ErrorStack> {
    static GROUP: OnceLock<EcGroup> = OnceLock::new();
    if let Some(g) = GROUP.get() {
        return Ok(g);
    }
    let g = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(GROUP.get_or_init(|| g))
}

/// ECPrivateKey (RFC 5915 §3), as carried inside PKCS#8.
#[derive(der::Sequence)]
struct EcPrivateKeyDer<'a> {
    version: u8,
    private_key: der::asn1::OctetStringRef<'a>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    parameters: Option<der::asn1::ObjectIdentifier>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    public_key: Option<der::asn1::BitStringRef<'a>>,
}

/// A P-256 private key from PKCS#8 DER without OpenSSL 3's decoder framework, whose
/// `d2i_PKCS8`/`EVP_PKCS82PKEY` path costs milliseconds per key: the PKCS#8 and SEC1 (RFC 5915)
/// layers are read here, and the key is built from its components.
fn p256_private_key(pkcs8_der: &[u8]) -> Result<PKey<Private>, String> {
    use der::Decode;
    let pki = p256::pkcs8::PrivateKeyInfo::from_der(pkcs8_der).map_err(|e| e.to_string())?;
    if pki.algorithm.oid != p256::pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1")
        || pki.algorithm.parameters_oid().map_err(|e| e.to_string())?
            != p256::pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7")
    {
        return Err("not a P-256 key (RFC 9148 §3 / RFC 7925 §4.4)".into());
    }
    let sec1 = EcPrivateKeyDer::from_der(pki.private_key).map_err(|e| e.to_string())?;
    if sec1.version != 1 {
        return Err(format!("ECPrivateKey version {}", sec1.version));
    }
    let public_key = sec1.public_key.as_ref().and_then(|b| b.as_bytes());
    let group = p256_group().map_err(|e| e.to_string())?;
    let d = BigNum::from_slice(sec1.private_key.as_bytes()).map_err(|e| e.to_string())?;
    let mut ctx = BigNumContext::new().map_err(|e| e.to_string())?;
    let public = match public_key {
        Some(p) => EcPoint::from_bytes(group, p, &mut ctx).map_err(|e| e.to_string())?,
        None => {
            let mut p = EcPoint::new(group).map_err(|e| e.to_string())?;
            p.mul_generator2(group, &d, &mut ctx)
                .map_err(|e| e.to_string())?;
            p
        }
    };
    let key = EcKey::from_private_components(group, &d, &public).map_err(|e| e.to_string())?;
    PKey::from_ec_key(key).map_err(|e| e.to_string())
}

/// A credential in OpenSSL's types.
#[derive(Clone)]
struct ParsedCredential {
    leaf: X509,
    intermediates: Vec<X509>,
    key: PKey<Private>,
}

/// (PKCS#8 key, certificate chain) -> parsed, with insertion order for eviction.
#[derive(Default)]
struct CredentialCache {
    map: HashMap<(Vec<u8>, Vec<Vec<u8>>), ParsedCredential>,
    order: VecDeque<(Vec<u8>, Vec<Vec<u8>>)>,
}

static CREDENTIALS: Mutex<Option<CredentialCache>> = Mutex::new(None);

fn parse_credential(cred: &Credential) -> Result<ParsedCredential, FailureReason> {
    let mut chain = cred.chain_der.iter();
    let leaf = chain
        .next()
        .ok_or_else(|| FailureReason::Credentials("empty certificate chain".into()))?;
    let leaf = X509::from_der(leaf)
        .map_err(|e| FailureReason::Credentials(format!("client cert: {e}")))?;
    let key = p256_private_key(&cred.key_pkcs8_der)
        .map_err(|e| FailureReason::Credentials(format!("client key: {e}")))?;
    let intermediates = chain
        .map(|c| {
            X509::from_der(c).map_err(|e| FailureReason::Credentials(format!("client chain: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ParsedCredential {
        leaf,
        intermediates,
        key,
    })
}

/// The credential in OpenSSL's types, parsed once: OpenSSL 3's decoders (the PKCS#8 key and the
/// certificates' public keys go through OSSL_DECODER) cost more than the rest of the client's
/// per-connection setup, and a load generator reuses its device identities.
fn credential(cred: &Credential) -> Result<ParsedCredential, FailureReason> {
    let key = (cred.key_pkcs8_der.clone(), cred.chain_der.clone());
    {
        let cache = CREDENTIALS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.as_ref().and_then(|c| c.map.get(&key)) {
            return Ok(p.clone());
        }
    }
    let parsed = parse_credential(cred)?;
    let mut guard = CREDENTIALS.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(CredentialCache::default);
    if !cache.map.contains_key(&key) {
        while cache.order.len() >= MAX_CREDENTIALS {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        cache.order.push_back(key.clone());
        cache.map.insert(key, parsed.clone());
    }
    Ok(parsed)
}

/// One connection's `Ssl`: client certificate and key, server name check, MTU.
fn new_ssl(cfg: &DtlsClientConfig, cred: &Credential) -> Result<Ssl, FailureReason> {
    let setup = |what: &str, e: openssl::error::ErrorStack| {
        FailureReason::HandshakeError(format!("OpenSSL client setup ({what}): {e}"))
    };
    let ctx = context(cfg)?;
    let cred = credential(cred)?;
    let mut ssl = Ssl::new(&ctx).map_err(|e| setup("SSL", e))?;
    ssl.set_certificate(&cred.leaf)
        .map_err(|e| FailureReason::Credentials(format!("client cert: {e}")))?;
    ssl.set_private_key(&cred.key)
        .map_err(|e| FailureReason::Credentials(format!("client key: {e}")))?;
    for c in cred.intermediates {
        ssl.add_chain_cert(c)
            .map_err(|e| FailureReason::Credentials(format!("client chain: {e}")))?;
    }
    if !cfg.danger_skip_server_verification {
        // RFC 9148 §3 / RFC 7925 §4.4.1: the server certificate must name the server.
        match cfg.server_name.parse::<IpAddr>() {
            Ok(ip) => ssl.param_mut().set_ip(ip),
            Err(_) => ssl.param_mut().set_host(&cfg.server_name),
        }
        .map_err(|e| setup("server name", e))?;
    }
    if cfg.server_name.parse::<IpAddr>().is_err() && !cfg.server_name.is_empty() {
        // SNI carries DNS names only (RFC 6066 §3).
        ssl.set_hostname(&cfg.server_name)
            .map_err(|e| setup("SNI", e))?;
    }
    let mtu = u32::try_from(cfg.mtu).unwrap_or(u32::MAX);
    ssl.set_mtu(mtu)
        .map_err(|e| setup(&format!("MTU {}", cfg.mtu), e))?;
    Ok(ssl)
}

/// Why a handshake failed, from OpenSSL's state after the failure.
fn describe_failure(stream: &SslStream<DatagramPipe>, e: &openssl::ssl::Error) -> FailureReason {
    let v = stream.ssl().verify_result();
    if v != X509VerifyResult::OK {
        return FailureReason::HandshakeError(format!(
            "server certificate verification failed: {} (OpenSSL: {e})",
            v.error_string()
        ));
    }
    FailureReason::HandshakeError(format!("OpenSSL: {e}"))
}

/// An established DTLS session over OpenSSL.
pub struct OpensslSession {
    conn: Arc<dyn Conn + Send + Sync>,
    stream: SslStream<DatagramPipe>,
    rbuf: Vec<u8>,
}

impl std::fmt::Debug for OpensslSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpensslSession")
            .field("version", &self.stream.ssl().version_str())
            .field(
                "cipher",
                &self.stream.ssl().current_cipher().map(|c| c.name()),
            )
            .finish_non_exhaustive()
    }
}

/// One handshake attempt over `conn`, bounded by `cfg.handshake_timeout`.
pub async fn connect(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
    cred: &Credential,
) -> Result<OpensslSession, FailureReason> {
    let ssl = new_ssl(cfg, cred)?;
    match tokio::time::timeout(cfg.handshake_timeout, handshake(conn, ssl)).await {
        Ok(r) => r,
        Err(_) => Err(FailureReason::HandshakeTimeout),
    }
}

async fn handshake(
    conn: Arc<dyn Conn + Send + Sync>,
    ssl: Ssl,
) -> Result<OpensslSession, FailureReason> {
    let io_err = |e: io::Error| FailureReason::Io(e.to_string());
    let mut stream = SslStream::new(ssl, DatagramPipe::default()).map_err(|e| {
        FailureReason::HandshakeError(format!("OpenSSL client setup (stream): {e}"))
    })?;
    let mut rbuf = vec![0u8; RECV_BUF];
    let mut result = stream.connect();
    loop {
        match result {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            Err(e) => {
                // The fatal alert OpenSSL queued goes out, so the server drops its state too.
                let _ = flush(&*conn, stream.get_mut()).await;
                return Err(describe_failure(&stream, &e));
            }
        }
        flush(&*conn, stream.get_mut()).await.map_err(io_err)?;
        // No datagram within TIMER_TICK: drive the handshake anyway; OpenSSL retransmits its
        // last flight when its timer has expired (dtls1_handle_timeout, checked on every read
        // attempt).
        let wake = std::time::Instant::now() + TIMER_TICK;
        if let Some(n) = crate::dtls::recv_until(&*conn, &mut rbuf, wake)
            .await
            .map_err(io_err)?
        {
            let d = rbuf.get(..n).unwrap_or_default();
            stream.get_mut().push_incoming(d).map_err(io_err)?;
        }
        result = stream.do_handshake();
    }
    flush(&*conn, stream.get_mut()).await.map_err(io_err)?;
    // RFC 9148 §3 / RFC 7925 §16: the extended master secret (RFC 7627) is required, as in the
    // webrtc backend (ExtendedMasterSecretType::Require).
    if stream.ssl().extms_support() != Some(true) {
        let _ = stream.shutdown();
        let _ = flush(&*conn, stream.get_mut()).await;
        return Err(FailureReason::HandshakeError(
            "server did not negotiate the extended master secret (RFC 7627)".into(),
        ));
    }
    Ok(OpensslSession { conn, stream, rbuf })
}

impl OpensslSession {
    /// Sends one application datagram (one DTLS record).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), SessionError> {
        flush(&*self.conn, self.stream.get_mut())
            .await
            .map_err(|e| SessionError::Io(e.to_string()))?;
        self.stream
            .ssl_write(data)
            .map_err(|e| SessionError::Tls(e.to_string()))?;
        flush(&*self.conn, self.stream.get_mut())
            .await
            .map_err(|e| SessionError::Io(e.to_string()))
    }

    /// Receives one application datagram into `buf`. Cancel-safe: a datagram is either fully
    /// handled or still waiting on the connection.
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<usize, SessionError> {
        // Bounded: each turn consumes one received datagram; non-application records (a
        // retransmitted server Finished, a duplicate) just lead to the next datagram.
        loop {
            match self.stream.ssl_read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Err(SessionError::Closed),
                Err(e) => return Err(SessionError::Tls(e.to_string())),
            }
            flush(&*self.conn, self.stream.get_mut())
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let n = self
                .conn
                .recv(&mut self.rbuf)
                .await
                .map_err(|e| SessionError::Io(e.to_string()))?;
            let d = self.rbuf.get(..n).unwrap_or_default();
            self.stream
                .get_mut()
                .push_incoming(d)
                .map_err(|e| SessionError::Io(e.to_string()))?;
        }
    }

    /// Sends close_notify and closes the connection.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown();
        let _ = flush(&*self.conn, self.stream.get_mut()).await;
        let _ = self.conn.close().await;
    }

    /// Negotiated protocol version and cipher suite (OpenSSL names), for tests and logs.
    pub fn negotiated(&self) -> (String, Option<String>) {
        (
            self.stream.ssl().version_str().to_string(),
            self.stream
                .ssl()
                .current_cipher()
                .map(|c| c.name().to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::net::{logged_udp, plaintext_handshake_type, LoggedUdp};
    use crate::testutil::{server, FakeEst};
    use std::net::SocketAddr;

    async fn udp(server: SocketAddr, drop_types: Vec<u8>) -> Arc<LoggedUdp> {
        logged_udp(server, drop_types).await.unwrap()
    }

    /// The handshake message types of what the client sent (dropped datagrams included).
    fn sent_types(conn: &LoggedUdp) -> Vec<u8> {
        let sent = conn.tap().sent();
        sent.iter()
            .filter_map(|d| plaintext_handshake_type(d))
            .collect()
    }

    fn cfg(srv: &server::TestServer) -> DtlsClientConfig {
        DtlsClientConfig {
            trust_anchors_der: vec![srv.trust_anchor_der.clone()],
            handshake_timeout: Duration::from_secs(10),
            backend: crate::dtls::DtlsBackend::Openssl,
            ..DtlsClientConfig::default()
        }
    }

    fn cred(d: &crate::pki::DeviceIdentity) -> Credential {
        Credential {
            chain_der: d.cert_chain_der.clone(),
            key_pkcs8_der: d.key_pkcs8_der.clone(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn negotiates_the_rfc9148_profile_and_carries_coap() {
        let mut est = FakeEst::new(31);
        let dev = est.device("SN300001");
        let srv = server::spawn(est).await;
        let conn = udp(srv.addr, Vec::new()).await;
        let mut s = connect(conn.clone(), &cfg(&srv), &cred(&dev))
            .await
            .unwrap();
        assert_eq!(
            s.negotiated(),
            (
                "DTLSv1.2".to_string(),
                Some("ECDHE-ECDSA-AES128-CCM8".to_string())
            )
        );
        // ClientHello twice (HelloVerifyRequest cookie exchange), then the client's flight 5
        // starting with its Certificate.
        let sent = sent_types(&conn);
        assert_eq!(sent.iter().filter(|t| **t == 1).count(), 2, "{sent:?}");
        assert!(sent.contains(&11), "{sent:?}");
        // The ClientHello offers exactly the profile: TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (+ the
        // renegotiation SCSV), secp256r1 only, ecdsa_secp256r1_sha256 only, extended master
        // secret.
        let ch = conn
            .tap()
            .sent()
            .into_iter()
            .find(|d| plaintext_handshake_type(d) == Some(1))
            .unwrap();
        let has = |needle: &[u8]| ch.windows(needle.len()).any(|w| w == needle);
        // DTLS record header 13 B, handshake header 12 B, client_version 2 B, random 32 B, then
        // session_id, cookie and the cipher suites (RFC 6347 §4.2.1).
        let mut off = 13 + 12 + 2 + 32;
        off += 1 + usize::from(ch[off]);
        off += 1 + usize::from(ch[off]);
        let len = usize::from(u16::from_be_bytes([ch[off], ch[off + 1]]));
        let suites: Vec<u16> = ch[off + 2..off + 2 + len]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .filter(|s| *s != 0x00ff) // TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746)
            .collect();
        assert_eq!(
            suites,
            vec![0xc0ae],
            "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 only"
        );
        assert!(
            has(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17]),
            "groups"
        );
        assert!(
            has(&[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]),
            "sigalgs"
        );
        assert!(has(&[0x00, 0x17, 0x00, 0x00]), "extended_master_secret");
        // A CoAP GET over the session.
        let mut client = est_proto::coap::Client::new(est_proto::coap::ClientConfig::default(), 1);
        client
            .start(
                std::time::Instant::now(),
                est_proto::coap::Request::new(est_proto::coap::Method::Get, "/est/crts"),
            )
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut answered = false;
        for _ in 0..32 {
            while let Some(d) = client.poll_transmit() {
                s.send(&d).await.unwrap();
            }
            if let Some(ev) = client.poll_event() {
                assert!(
                    matches!(ev, est_proto::coap::ClientEvent::Response(ref r) if !r.payload.is_empty()),
                    "{ev:?}"
                );
                answered = true;
                break;
            }
            let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            client.handle_datagram(std::time::Instant::now(), &buf[..n]);
        }
        assert!(answered);
        s.close().await;
        assert_eq!(srv.est.lock().unwrap().log.len(), 1);
    }

    /// Lost flights are resent by OpenSSL's own retransmission timer (RFC 6347 §4.2.4), driven
    /// by the loop's periodic re-entry: the first ClientHello and the first datagram of the
    /// client's Certificate flight are dropped, and the handshake still completes within one
    /// attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_flights_are_retransmitted_by_openssl_timer() {
        let mut est = FakeEst::new(32);
        let dev = est.device("SN300002");
        let srv = server::spawn(est).await;
        let conn = udp(srv.addr, vec![1, 11]).await;
        let t = std::time::Instant::now();
        let s = connect(conn.clone(), &cfg(&srv), &cred(&dev))
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(conn.tap().dropped(), 2);
        let sent = sent_types(&conn);
        // CH (dropped), CH again after the timer, CH with the cookie; Certificate twice. One
        // more resend is allowed: on a loaded box the server may answer after the 1 s timer.
        let count = |ty: u8| sent.iter().filter(|t| **t == ty).count();
        assert!((3..=4).contains(&count(1)), "{sent:?}");
        assert!((2..=3).contains(&count(11)), "{sent:?}");
        // Two expiries of OpenSSL's 1 s initial timer (the second may be doubled).
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
            "{took:?}"
        );
        s.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_datagrams_fit_the_mtu() {
        let mut est = FakeEst::new(36);
        let dev = est.device("SN300005");
        let srv = server::spawn(est).await;
        let conn = udp(srv.addr, Vec::new()).await;
        let mut c = cfg(&srv);
        c.mtu = 300;
        let s = connect(conn.clone(), &c, &cred(&dev)).await.unwrap();
        let largest = conn.tap().sent().iter().map(Vec::len).max().unwrap_or(0);
        assert!(largest <= 300, "{largest}");
        // The client's Certificate message (IDevID chain) needed several fragments.
        let sent = sent_types(&conn);
        assert!(sent.iter().filter(|t| **t == 11).count() >= 2, "{sent:?}");
        s.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_trust_anchor_fails_with_a_verification_reason() {
        let mut est = FakeEst::new(33);
        let dev = est.device("SN300003");
        let srv = server::spawn(est).await;
        let mut c = cfg(&srv);
        c.trust_anchors_der = vec![FakeEst::new(34).ca_der];
        let conn = udp(srv.addr, Vec::new()).await;
        let t = std::time::Instant::now();
        let e = connect(conn, &c, &cred(&dev)).await.unwrap_err();
        // Well under the 10 s handshake timeout: refused, not timed out.
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "fails at once, no timeout"
        );
        match e {
            FailureReason::HandshakeError(m) => assert!(
                m.contains("server certificate verification failed")
                    && m.contains("unable to get local issuer certificate"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The wrong name fails too, even with the right anchor (a new server: the stock webrtc
        // test listener stops accepting after a failed handshake).
        let mut est = FakeEst::new(35);
        let dev = est.device("SN300004");
        let srv = server::spawn(est).await;
        let mut c = cfg(&srv);
        c.server_name = "other.example".into();
        let conn = udp(srv.addr, Vec::new()).await;
        let e = connect(conn, &c, &cred(&dev)).await.unwrap_err();
        assert!(
            matches!(&e, FailureReason::HandshakeError(m) if m.contains("hostname mismatch")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_credentials_are_reported_before_any_datagram() {
        let c = DtlsClientConfig {
            backend: crate::dtls::DtlsBackend::Openssl,
            ..DtlsClientConfig::default()
        };
        let e = new_ssl(
            &c,
            &Credential {
                chain_der: vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]],
                key_pkcs8_der: Vec::new(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, FailureReason::Credentials(_)), "{e:?}");
    }

    #[test]
    fn p256_keys_are_read_without_the_decoders_and_others_refused() {
        use der::{Decode, Encode};
        let group = p256_group().unwrap();
        let ec = openssl::ec::EcKey::generate(group).unwrap();
        let original = PKey::from_ec_key(ec.clone()).unwrap();
        let pkcs8 = original.private_key_to_pkcs8().unwrap();
        let read = p256_private_key(&pkcs8).unwrap();
        assert!(read.public_eq(&original));
        assert_eq!(
            read.ec_key().unwrap().private_key().to_vec(),
            ec.private_key().to_vec()
        );
        // Without the optional public key (RFC 5915 §3), it is computed.
        let pki = p256::pkcs8::PrivateKeyInfo::from_der(&pkcs8).unwrap();
        let mut sec1 = EcPrivateKeyDer::from_der(pki.private_key).unwrap();
        sec1.public_key = None;
        sec1.parameters = None;
        let inner = sec1.to_der().unwrap();
        let stripped = p256::pkcs8::PrivateKeyInfo {
            private_key: &inner,
            ..pki
        }
        .to_der()
        .unwrap();
        assert!(p256_private_key(&stripped).unwrap().public_eq(&original));
        // P-384 is not the profile's curve.
        let p384 = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
        let other = PKey::from_ec_key(openssl::ec::EcKey::generate(&p384).unwrap()).unwrap();
        assert!(p256_private_key(&other.private_key_to_pkcs8().unwrap()).is_err());
        assert!(p256_private_key(b"junk").is_err());
    }

    #[test]
    fn pipe_carries_whole_datagrams_in_order() {
        let mut p = DatagramPipe::default();
        let mut buf = [0u8; 8];
        assert_eq!(
            p.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        p.push_incoming(b"abc").unwrap();
        p.push_incoming(b"de").unwrap();
        assert_eq!(p.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..2], b"ab");
        assert_eq!(p.read(&mut buf).unwrap(), 2);
        p.write_all(b"xyz").unwrap();
        p.write_all(b"w").unwrap();
        assert_eq!(p.outgoing.len(), 2);
    }
}

#[cfg(test)]
mod bench {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    /// `cargo test --release -p client-sim --lib dtls_openssl::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn setup_costs() {
        let mut est = crate::testutil::FakeEst::new(41);
        let dev = est.device("SN400001");
        let n = 500;
        let t = Instant::now();
        for _ in 0..n {
            let _ = PKey::private_key_from_pkcs8(&dev.key_pkcs8_der).unwrap();
        }
        println!("PKey::private_key_from_pkcs8 {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            let _ = p256_private_key(&dev.key_pkcs8_der).unwrap();
        }
        println!("PKCS#8 -> SEC1 -> EcKey -> PKey {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            let _ = X509::from_der(&dev.cert_chain_der[0]).unwrap();
        }
        println!(
            "X509::from_der {:?} (chain {})",
            t.elapsed() / n,
            dev.cert_chain_der.len()
        );
        let cfg = DtlsClientConfig {
            trust_anchors_der: vec![est.ca_der.clone()],
            ..DtlsClientConfig::default()
        };
        let cred = Credential {
            chain_der: dev.cert_chain_der.clone(),
            key_pkcs8_der: dev.key_pkcs8_der.clone(),
        };
        let _ = new_ssl(&cfg, &cred).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            let _ = new_ssl(&cfg, &cred).unwrap();
        }
        println!("new_ssl (cached ctx + credential) {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            let _ = build_context(&cfg).unwrap();
        }
        println!("build_context {:?}", t.elapsed() / n);
    }
}

#[cfg(test)]
mod handshake_bench {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::dtls::{connect_session, DtlsBackend};

    fn cpu_s() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let rest = s.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    /// Client CPU per handshake of each backend against a running server:
    /// `BENCH_SERVER=127.0.0.1:PORT BENCH_FLEET=DIR cargo test --release -p client-sim --lib
    /// handshake_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn client_cpu_per_handshake() {
        let server: std::net::SocketAddr = std::env::var("BENCH_SERVER").unwrap().parse().unwrap();
        let fleet = crate::pki::load_fleet(
            std::path::Path::new(&std::env::var("BENCH_FLEET").unwrap()),
            Some(400),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for backend in [
            DtlsBackend::Openssl,
            DtlsBackend::Webrtc,
            DtlsBackend::Openssl,
        ] {
            let cfg = DtlsClientConfig {
                trust_anchors_der: fleet.implicit_ta_der.clone(),
                backend,
                ..DtlsClientConfig::default()
            };
            let (c0, t0) = (cpu_s(), std::time::Instant::now());
            let n = rt.block_on(async {
                let mut ok = 0;
                for d in &fleet.devices {
                    let cred = Credential {
                        chain_der: d.cert_chain_der.clone(),
                        key_pkcs8_der: d.key_pkcs8_der.clone(),
                    };
                    let mut p = crate::link::LinkParams::profile(crate::link::LinkProfile::Lan);
                    p.latency = Duration::ZERO;
                    let link = crate::net::MeterLink::new(p, 1, None);
                    let conn = crate::net::EmulatedConn::connect(
                        "127.0.0.1:0".parse().unwrap(),
                        server,
                        link,
                    )
                    .await
                    .unwrap();
                    if let Ok(s) = connect_session(conn, &cfg, &cred).await {
                        ok += 1;
                        s.close().await;
                    }
                }
                ok
            });
            let cpu = cpu_s() - c0;
            println!(
                "{backend}: {n} handshakes, client CPU {:.3} ms each, wall {:.3} ms each",
                cpu * 1000.0 / f64::from(n),
                t0.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
            );
        }
    }
}
