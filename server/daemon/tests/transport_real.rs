//! DTLS transport on real UDP sockets (127.0.0.1 only).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod transport_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use client_sim::dtls;
use client_sim::meter::FailureReason;
use client_sim::net::{Tapped, WireLog};
use est_server::transport::CertError;
use est_server::transport::{
    CipherSuiteName, ClientChainVerifier, CloseReason, DtlsListener, DtlsServerConfig, DtlsSession,
    PeerCertificateHook, PeerVerification, TransportError, VerifiedClient,
};
use tokio::net::UdpSocket;
use transport_support::{Device, SocketConn, TestPki};
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::conn::DTLSConn;
use webrtc_util::conn::Conn;

const LOCALHOST: &str = "127.0.0.1:0";

async fn start_server(config: DtlsServerConfig) -> (Arc<DtlsListener>, SocketAddr) {
    let listener = Arc::new(
        DtlsListener::bind_udp(LOCALHOST.parse().unwrap(), config)
            .await
            .unwrap(),
    );
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Accept sessions and echo every datagram back, prefixed with "echo:".
fn spawn_echo(listener: Arc<DtlsListener>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(session) = listener.accept().await {
            tokio::spawn(echo(session));
        }
    })
}

async fn echo(session: DtlsSession) {
    let mut buf = vec![0u8; 2048];
    while let Ok(n) = session.recv(&mut buf).await {
        let mut reply = b"echo:".to_vec();
        reply.extend_from_slice(&buf[..n]);
        if session.send(&reply).await.is_err() {
            break;
        }
    }
}

async fn client_socket() -> Arc<UdpSocket> {
    Arc::new(UdpSocket::bind(LOCALHOST).await.unwrap())
}

async fn connect(
    socket: &Arc<UdpSocket>,
    server: SocketAddr,
    cfg: &Device,
) -> Result<Arc<DTLSConn>, FailureReason> {
    let conn: Arc<dyn Conn + Send + Sync> = Arc::new(SocketConn::new(Arc::clone(socket), server));
    cfg.connect(conn).await.map(|c| c.conn)
}

/// Send `payload` and return the echo; re-sends like a CoAP CON if a datagram is lost (loopback
/// can drop when a shared CI machine is saturated), ignoring echoes of other payloads.
async fn round_trip(conn: &DTLSConn, payload: &[u8]) -> Vec<u8> {
    let mut expected = b"echo:".to_vec();
    expected.extend_from_slice(payload);
    let mut buf = vec![0u8; 2048];
    for _ in 0..4 {
        conn.write(payload, None).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
            match conn.read(&mut buf, Some(left)).await {
                Ok(n) if buf[..n] == expected[..] => return expected,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    panic!("no echo of {:?}", String::from_utf8_lossy(payload));
}

/// A server on the test PKI and one device connected to it: (listener, the device's socket, its
/// DTLS connection, the server's session).
async fn one_session(
    pki: &TestPki,
) -> (
    Arc<DtlsListener>,
    Arc<UdpSocket>,
    Arc<DTLSConn>,
    DtlsSession,
) {
    let (listener, addr) = start_server(pki.server_config()).await;
    let socket = client_socket().await;
    let cfg = pki.device_config("127.0.0.1");
    let accept = {
        let listener = Arc::clone(&listener);
        tokio::spawn(async move { listener.accept().await })
    };
    let conn = connect(&socket, addr, &cfg).await.unwrap();
    let session = accept.await.unwrap().unwrap();
    (listener, socket, conn, session)
}

/// The listener refused one handshake and holds no session or half-open state for it.
async fn one_refusal_and_nothing_left(listener: &DtlsListener) {
    wait_for(|| listener.metrics().handshakes_failed == 1).await;
    let m = listener.metrics();
    assert_eq!(m.handshakes_completed, 0);
    assert_eq!(m.sessions_now, 0);
    assert_eq!(m.half_open_now, 0);
}

#[tokio::test]
async fn good_client_completes_and_exchanges_data() {
    let pki = TestPki::generate();
    let (listener, socket, conn, session) = one_session(&pki).await;

    assert_eq!(session.peer_addr(), socket.local_addr().unwrap());
    assert_eq!(
        session.peer_certificates(),
        &[pki.device.cert_der.clone(), pki.device_sub_ca_der.clone()][..]
    );
    assert_eq!(session.cipher_suite(), Some(CipherSuiteName::Ccm8));

    conn.write(b"GET /.well-known/est/crts", None)
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = session.recv(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"GET /.well-known/est/crts");
    session.send(b"2.05 Content").await.unwrap();
    let n = conn
        .read(&mut buf, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(&buf[..n], b"2.05 Content");

    // mtu_bytes bounds the whole datagram: 1152 - 29 bytes of CCM_8 record overhead.
    let too_big = vec![0u8; 1124];
    assert!(matches!(
        session.send(&too_big).await,
        Err(TransportError::DatagramTooLarge {
            len: 1124,
            max_bytes: 1123
        })
    ));

    let m = listener.metrics();
    assert_eq!(m.handshakes_started, 1);
    assert_eq!(m.handshakes_completed, 1);
    assert_eq!(m.sessions_now, 1);
    assert_eq!(m.half_open_now, 0);

    // The client closes: the server session ends with PeerClosed and the peer is forgotten.
    conn.close().await.unwrap();
    let err = session.recv(&mut buf).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Closed(CloseReason::PeerClosed)),
        "{err:?}"
    );
    assert_eq!(listener.metrics().sessions_now, 0);
}

#[tokio::test]
async fn the_server_preference_decides_the_suite() {
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    server_cfg.cipher_suites = vec![CipherSuiteName::Gcm, CipherSuiteName::Ccm8];
    let (listener, addr) = start_server(server_cfg).await;
    let socket = client_socket().await;
    let mut cfg = pki.device_config("localhost");
    cfg.dtls.webrtc_cipher_suites = vec![
        CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm_8,
        CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
    ];
    let accept = {
        let listener = Arc::clone(&listener);
        tokio::spawn(async move { listener.accept().await })
    };
    let _conn = connect(&socket, addr, &cfg).await.unwrap();
    let session = accept.await.unwrap().unwrap();
    assert_eq!(session.cipher_suite(), Some(CipherSuiteName::Gcm));
}

/// A WebRTC-style client offers use_srtp (RFC 5764) and insists on it. With `answer_use_srtp`
/// the server echoes a profile and the session works; by default it ignores the offer, the
/// client aborts (insufficient_security) and nothing is left behind.
#[tokio::test]
async fn a_client_offering_use_srtp_is_answered_and_refused_only_when_configured_off() {
    use webrtc_dtls::extension::extension_use_srtp::SrtpProtectionProfile;
    let pki = TestPki::generate();
    for answer in [true, false] {
        let mut server_cfg = pki.server_config();
        assert!(!server_cfg.answer_use_srtp, "off by default");
        server_cfg.answer_use_srtp = answer;
        let (listener, addr) = start_server(server_cfg).await;
        let _echo = spawn_echo(Arc::clone(&listener));
        let socket = client_socket().await;
        let cfg = pki
            .device_config("127.0.0.1")
            .with_timeout(Duration::from_secs(3));
        let mut config = dtls::client_config(&cfg.dtls, &cfg.cred).unwrap();
        config.srtp_protection_profiles = vec![SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm];
        let conn: Arc<dyn Conn + Send + Sync> =
            Arc::new(SocketConn::new(Arc::clone(&socket), addr));
        let result = dtls::connect_config_retrying(
            conn,
            &config,
            cfg.dtls.handshake_timeout,
            cfg.overall_timeout,
        )
        .await;
        if answer {
            let c = result.unwrap();
            assert_eq!(
                round_trip(&c.conn, b"srtp offered").await,
                b"echo:srtp offered"
            );
            assert_eq!(listener.metrics().handshakes_completed, 1);
        } else {
            assert!(
                matches!(result, Err(FailureReason::HandshakeError(_))),
                "refused when configured off, got {:?}",
                result.map(|_| ())
            );
            one_refusal_and_nothing_left(&listener).await;
        }
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    let mut cfg = pki.device_config("127.0.0.1");
    cfg.cred.chain_der.clear();
    cfg = cfg.with_timeout(Duration::from_secs(3));
    let result = connect(&socket, addr, &cfg).await;
    assert!(
        matches!(result, Err(FailureReason::HandshakeError(_))),
        "a client without a certificate must be refused, got {:?}",
        result.map(|_| ())
    );
    one_refusal_and_nothing_left(&listener).await;
}

#[tokio::test]
async fn client_from_unknown_ca_is_refused() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    let mut cfg = pki.device_config("127.0.0.1");
    cfg.cred.chain_der = vec![pki.rogue_device.cert_der.clone()];
    cfg.cred.key_pkcs8_der = pki.rogue_device.key_pkcs8_der.clone();
    cfg = cfg.with_timeout(Duration::from_secs(3));
    let result = connect(&socket, addr, &cfg).await;
    assert!(
        matches!(result, Err(FailureReason::HandshakeError(_))),
        "a client from an unknown CA must be refused, got {:?}",
        result.map(|_| ())
    );
    wait_for(|| listener.metrics().handshakes_failed == 1).await;
    assert_eq!(listener.metrics().handshakes_completed, 0);
}

#[tokio::test]
async fn policy_hook_refuses_a_device_during_the_handshake() {
    let pki = TestPki::generate();
    let refused_leaf = pki.device.cert_der.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let seen_in_hook = Arc::clone(&seen);
    let hook: PeerCertificateHook = Arc::new(move |chain: &[Vec<u8>]| {
        seen_in_hook.lock().unwrap().push(chain.len());
        if chain.first() == Some(&refused_leaf) {
            Err("device is revoked".to_string())
        } else {
            Ok(())
        }
    });
    let mut server_cfg = pki.server_config();
    server_cfg.verify_peer_certificate = Some(hook);
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    let cfg = pki
        .device_config("127.0.0.1")
        .with_timeout(Duration::from_secs(3));
    let result = connect(&socket, addr, &cfg).await;
    assert!(
        matches!(result, Err(FailureReason::HandshakeError(_))),
        "{:?}",
        result.map(|_| ())
    );
    wait_for(|| listener.metrics().handshakes_failed == 1).await;
    assert_eq!(*seen.lock().unwrap(), vec![2], "hook saw [leaf, sub-CA]");
    assert_eq!(listener.metrics().handshakes_completed, 0);
}

/// With our own chain verifier, webrtc-dtls runs in RequireAnyClientCert mode: the verifier runs
/// once per handshake (the library's parser may ask twice), its result travels with the session,
/// the policy hook still runs, and the library still demands a certificate and proof of
/// possession (CertificateVerify) before the verifier is asked.
#[tokio::test]
async fn own_chain_verifier_decides_once_and_its_result_travels_with_the_session() {
    let pki = TestPki::generate();
    let genuine_leaf = pki.device.cert_der.clone();
    let verifier_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = Arc::clone(&verifier_calls);
    let verifier: ClientChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if chain.first() == Some(&genuine_leaf) {
            Ok(VerifiedClient {
                identity: Vec::new(),
                verification: Arc::new(format!("device with {} certificates", chain.len()))
                    as PeerVerification,
                leaf: None,
            })
        } else {
            Err(CertError::BadCertificate("not a known device".to_string()))
        }
    });
    let hooked = Arc::clone(&hook_calls);
    let hook: PeerCertificateHook = Arc::new(move |_chain: &[Vec<u8>]| {
        hooked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    let mut server_cfg = pki.server_config();
    server_cfg.client_chain_verifier = Some(verifier);
    server_cfg.verify_peer_certificate = Some(hook);
    // The verifier holds its own anchors; the library's are not consulted.
    server_cfg.client_trust_anchors_der.clear();
    let (listener, addr) = start_server(server_cfg).await;
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let accepted_in_task = Arc::clone(&accepted);
    let acceptor = Arc::clone(&listener);
    let _server = tokio::spawn(async move {
        while let Ok(session) = acceptor.accept().await {
            let what = session
                .peer_verification()
                .and_then(|v| Arc::clone(v).downcast::<String>().ok())
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            accepted_in_task.lock().unwrap().push(what);
            tokio::spawn(echo(session));
        }
    });

    // The genuine device: accepted, verified once, hook once.
    let socket = client_socket().await;
    let cfg = pki.device_config("127.0.0.1");
    let conn = connect(&socket, addr, &cfg).await.expect("genuine device");
    assert_eq!(round_trip(&conn, b"hi").await, b"echo:hi");
    assert_eq!(verifier_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(hook_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        *accepted.lock().unwrap(),
        vec!["device with 2 certificates".to_string()]
    );

    // Another device's chain: the verifier refuses, the hook is not asked.
    let refuse = |cfg: Device| cfg.with_timeout(Duration::from_secs(3));
    let mut rogue = refuse(pki.device_config("127.0.0.1"));
    rogue.cred.chain_der = vec![pki.rogue_device.cert_der.clone()];
    rogue.cred.key_pkcs8_der = pki.rogue_device.key_pkcs8_der.clone();
    let result = connect(&client_socket().await, addr, &rogue).await;
    assert!(matches!(result, Err(FailureReason::HandshakeError(_))));
    wait_for(|| listener.metrics().handshakes_failed == 1).await;
    // Once per handshake that reached the Certificate (the webrtc-dtls client may retry a
    // refused handshake once more within its deadline).
    assert!(verifier_calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(hook_calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The genuine chain without its private key: CertificateVerify fails in the library,
    // before our verifier is asked.
    let mut stolen = refuse(pki.device_config("127.0.0.1"));
    stolen.cred.key_pkcs8_der = pki.rogue_device.key_pkcs8_der.clone();
    let result = connect(&client_socket().await, addr, &stolen).await;
    assert!(matches!(result, Err(FailureReason::HandshakeError(_))));
    wait_for(|| listener.metrics().handshakes_failed == 2).await;

    // No certificate at all: refused by the library (RequireAnyClientCert).
    let mut anonymous = refuse(pki.device_config("127.0.0.1"));
    anonymous.cred.chain_der.clear();
    let result = connect(&client_socket().await, addr, &anonymous).await;
    assert!(matches!(result, Err(FailureReason::HandshakeError(_))));
    wait_for(|| listener.metrics().handshakes_failed == 3).await;
    // Once per handshake that reached the Certificate (the webrtc-dtls client may retry a
    // refused handshake once more within its deadline).
    assert!(verifier_calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(listener.metrics().handshakes_completed, 1);
    assert_eq!(accepted.lock().unwrap().len(), 1);
}

fn record(content_type: u8, epoch: u16, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 0xFE, 0xFD];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
    r.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
    r.extend_from_slice(fragment);
    r
}

/// A peer that completes the cookie exchange and then goes silent: it holds a half-open slot.
async fn silent_peer(socket: &UdpSocket, addr: SocketAddr, random: [u8; 32]) {
    use est_dtls::wire;
    let ch1 = client_hello(random);
    socket.send_to(&ch1, addr).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (rec, _) = wire::parse_record(&buf[..n], 0).unwrap();
    let frags = wire::parse_handshake_fragments(rec.fragment).unwrap();
    let hvr = wire::HelloVerifyRequest::parse(frags[0].body).unwrap();
    let (rec1, _) = wire::parse_record(&ch1, 0).unwrap();
    let f1 = wire::parse_handshake_fragments(rec1.fragment).unwrap();
    let mut ch = wire::ClientHello::parse(f1[0].body).unwrap();
    ch.cookie = hvr.cookie;
    let msg = wire::handshake_message(1, 1, &ch.encode());
    let mut out = Vec::new();
    wire::push_record(&mut out, 22, wire::DTLS_1_2, 0, 2, &[], &msg);
    socket.send_to(&out, addr).await.unwrap();
}

/// A minimal ClientHello (the server answers it with a HelloVerifyRequest).
fn client_hello(random: [u8; 32]) -> Vec<u8> {
    let mut body = vec![0xFE, 0xFD];
    body.extend_from_slice(&random);
    body.push(0); // session id
    body.push(0); // cookie
    body.extend_from_slice(&[0, 2, 0xC0, 0xAE]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression methods
                                     // extensions: extended_master_secret, signature_algorithms [ecdsa_secp256r1_sha256]
    body.extend_from_slice(&[0, 12, 0x00, 0x17, 0, 0, 0x00, 0x0D, 0, 4, 0, 2, 4, 3]);
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut handshake = vec![
        1, len[1], len[2], len[3], 0, 0, 0, 0, 0, len[1], len[2], len[3],
    ];
    handshake.extend_from_slice(&body);
    record(22, 0, &handshake)
}

#[track_caller]
fn wait_for(mut condition: impl FnMut() -> bool) -> impl std::future::Future<Output = ()> {
    let caller = std::panic::Location::caller();
    async move {
        // Generous: CI machines are shared and slow.
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(condition(), "condition at {caller} not reached within 10 s");
    }
}

#[tokio::test]
async fn garbage_and_truncated_records_are_ignored() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let _echo = spawn_echo(Arc::clone(&listener));

    let attacker = UdpSocket::bind(LOCALHOST).await.unwrap();
    let mut truncated = record(22, 0, &[1u8; 100]);
    truncated.truncate(40);
    let mut truncated_hello = client_hello([7; 32]);
    truncated_hello.truncate(30);
    let tls_record = {
        let mut r = record(22, 0, &[1, 0, 0, 0]);
        r[1] = 0x03;
        r
    };
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xFF; 3],
        (0..=255u8).collect(),
        truncated,
        truncated_hello,
        tls_record,
        record(25, 1, &[0u8; 40]), // tls12_cid: not supported
    ];
    for datagram in &garbage {
        attacker.send_to(datagram, addr).await.unwrap();
    }
    // Well-formed records that are not a ClientHello, from an unknown address.
    attacker
        .send_to(&record(23, 1, &[0u8; 40]), addr)
        .await
        .unwrap();
    attacker.send_to(&record(20, 0, &[1]), addr).await.unwrap();

    // A good client still completes and is echoed.
    let socket = client_socket().await;
    let conn = connect(&socket, addr, &pki.device_config("127.0.0.1"))
        .await
        .unwrap();
    assert_eq!(round_trip(&conn, b"ping").await, b"echo:ping");

    let m = listener.metrics();
    // The empty datagram may or may not reach us (OS-dependent); the other six are garbage.
    // Malformed records, and records from an address with no session that are not a
    // ClientHello, are dropped without state.
    assert!(m.dropped_garbage + m.dropped_unknown_peer >= 8, "{m:?}");
    assert_eq!(m.handshakes_started, 1, "no state for garbage: {m:?}");
    assert_eq!(m.handshakes_completed, 1);
}

#[tokio::test]
async fn half_open_limit_is_enforced_and_recovers() {
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    server_cfg.max_half_open_handshakes = 2;
    server_cfg.handshake_timeout = Duration::from_millis(1500);
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));

    // Two peers that echo the cookie and then go silent hold both half-open slots.
    let idle_a = UdpSocket::bind(LOCALHOST).await.unwrap();
    let idle_b = UdpSocket::bind(LOCALHOST).await.unwrap();
    silent_peer(&idle_a, addr, [1; 32]).await;
    silent_peer(&idle_b, addr, [2; 32]).await;
    wait_for(|| listener.metrics().half_open_now == 2).await;

    // A real meter is not kept out: the oldest silent handshake gives way to it.
    let socket = client_socket().await;
    let mut cfg = pki.device_config("127.0.0.1");
    cfg.dtls.flight_interval = Duration::from_millis(200);
    let conn = connect(&socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&conn, b"x").await, b"echo:x");

    let m = listener.metrics();
    assert_eq!(m.handshakes_abandoned, 1, "{m:?}");
    assert_eq!(m.handshakes_started, 3, "{m:?}");
    // The other silent one times out.
    wait_for(|| listener.metrics().handshakes_timed_out == 1).await;
    assert_eq!(listener.metrics().half_open_now, 0);
    assert!(m.half_open_now <= 1, "{m:?}");
}

#[tokio::test]
async fn same_port_rehandshake_after_close_and_after_silent_restart() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let sessions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _acceptor = {
        let listener = Arc::clone(&listener);
        let sessions = Arc::clone(&sessions);
        tokio::spawn(async move {
            while let Ok(session) = listener.accept().await {
                let session = Arc::new(session);
                sessions.lock().unwrap().push(Arc::clone(&session));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    while let Ok(n) = session.recv(&mut buf).await {
                        let mut reply = b"echo:".to_vec();
                        reply.extend_from_slice(&buf[..n]);
                        if session.send(&reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    };
    let socket = client_socket().await;
    let cfg = pki.device_config("127.0.0.1");

    // 1. Handshake, exchange, close (close_notify reaches the server).
    let first = connect(&socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&first, b"one").await, b"echo:one");
    first.close().await.unwrap();
    wait_for(|| listener.metrics().sessions_now == 0).await;

    // 2. Same IP:port again, at once (the stock listener black-holes this forever).
    let second = connect(&socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&second, b"two").await, b"echo:two");

    // 3. The meter "reboots" without close_notify and handshakes again from the same port: the
    //    server replaces the old session after the cookie exchange.
    drop(second);
    let third = connect(&socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&third, b"three").await, b"echo:three");

    let m = listener.metrics();
    assert_eq!(m.handshakes_completed, 3, "{m:?}");
    assert_eq!(m.sessions_replaced, 1, "{m:?}");
    assert_eq!(m.sessions_now, 1, "{m:?}");
    let all = sessions.lock().unwrap().clone();
    assert_eq!(all.len(), 3);
    let mut buf = [0u8; 64];
    assert!(matches!(
        all[1].recv(&mut buf).await,
        Err(TransportError::Closed(CloseReason::Replaced))
    ));
}

#[tokio::test]
async fn spoofed_client_hello_does_not_disturb_an_established_session() {
    // The "spoofer" shares the client's address here only in the sense that we inject a
    // ClientHello with a fresh random from the same socket but never answer the cookie.
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    server_cfg.handshake_timeout = Duration::from_millis(500);
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    let conn = connect(&socket, addr, &pki.device_config("127.0.0.1"))
        .await
        .unwrap();
    assert_eq!(round_trip(&conn, b"before").await, b"echo:before");

    // Inject from the same address via a raw send on the client's socket. The server's
    // HelloVerifyRequest comes back to this socket; the DTLS client ignores it.
    socket.send_to(&client_hello([9; 32]), addr).await.unwrap();
    // Answered statelessly with a HelloVerifyRequest; nothing is kept for it.
    wait_for(|| listener.metrics().hello_verify_sent == 2).await;
    assert_eq!(listener.metrics().half_open_now, 0);

    assert_eq!(round_trip(&conn, b"after").await, b"echo:after");
    let m = listener.metrics();
    assert_eq!(m.sessions_replaced, 0, "{m:?}");
    assert_eq!(m.sessions_now, 1, "{m:?}");
}

#[tokio::test]
async fn idle_session_is_closed() {
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    server_cfg.idle_timeout = Duration::from_millis(300);
    let (listener, addr) = start_server(server_cfg).await;
    let accept = {
        let listener = Arc::clone(&listener);
        tokio::spawn(async move { listener.accept().await })
    };
    let socket = client_socket().await;
    let started = tokio::time::Instant::now();
    let conn = connect(&socket, addr, &pki.device_config("127.0.0.1"))
        .await
        .unwrap();
    let session = accept.await.unwrap().unwrap();
    let mut buf = [0u8; 64];
    let err = session.recv(&mut buf).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Closed(CloseReason::IdleTimeout)),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let m = listener.metrics();
    assert_eq!(m.sessions_idle_closed, 1);
    assert_eq!(m.sessions_now, 0);
    // The client got our close_notify.
    let read = conn.read(&mut buf, Some(Duration::from_secs(2))).await;
    assert!(
        matches!(read, Err(webrtc_dtls::Error::ErrAlertFatalOrClose)),
        "{read:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_accept_and_sessions() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let accept = {
        let listener = Arc::clone(&listener);
        tokio::spawn(async move { listener.accept().await })
    };
    let socket = client_socket().await;
    let _conn = connect(&socket, addr, &pki.device_config("127.0.0.1"))
        .await
        .unwrap();
    let session = accept.await.unwrap().unwrap();
    listener.shutdown().await;
    let mut buf = [0u8; 64];
    assert!(matches!(
        session.recv(&mut buf).await,
        Err(TransportError::Closed(CloseReason::Shutdown))
    ));
    assert!(matches!(
        listener.accept().await,
        Err(TransportError::ListenerClosed)
    ));
}

#[tokio::test]
async fn bad_configuration_is_rejected() {
    let pki = TestPki::generate();
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    let mut cfg = pki.server_config();
    cfg.client_trust_anchors_der.clear();
    assert!(matches!(
        DtlsListener::bind(socket, cfg).await,
        Err(TransportError::Config(_))
    ));
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    let mut cfg = pki.server_config();
    cfg.private_key_pkcs8_der = vec![1, 2, 3];
    assert!(matches!(
        DtlsListener::bind(socket, cfg).await,
        Err(TransportError::Config(_))
    ));
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    let mut cfg = pki.server_config();
    cfg.cipher_suites.clear();
    assert!(matches!(
        DtlsListener::bind(socket, cfg).await,
        Err(TransportError::Config(_))
    ));
}

#[tokio::test]
async fn session_limit_is_enforced() {
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    server_cfg.max_sessions = 1;
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let cfg = pki.device_config("127.0.0.1");

    let first_socket = client_socket().await;
    let first = connect(&first_socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&first, b"1").await, b"echo:1");

    // The second meter is refused cleanly (a fatal alert, not silence) while the first holds
    // the only slot ...
    let second_socket = client_socket().await;
    let mut short = cfg.clone().with_timeout(Duration::from_millis(600));
    short.dtls.flight_interval = Duration::from_millis(100);
    let refused = connect(&second_socket, addr, &short).await;
    assert!(
        matches!(refused, Err(FailureReason::HandshakeError(_))),
        "{:?}",
        refused.map(|_| ())
    );
    assert!(listener.metrics().dropped_over_limit >= 1);

    // ... and admitted once the first one closed.
    first.close().await.unwrap();
    wait_for(|| listener.metrics().sessions_now == 0).await;
    let second = connect(&second_socket, addr, &cfg).await.unwrap();
    assert_eq!(round_trip(&second, b"2").await, b"echo:2");
    assert_eq!(listener.metrics().handshakes_completed, 2);
}

#[tokio::test]
async fn restarted_handshake_from_same_port_replaces_the_half_open_one() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;

    // An abandoned handshake from this port: a ClientHello whose HelloVerifyRequest is never answered.
    socket.send_to(&client_hello([3; 32]), addr).await.unwrap();
    let mut hvr = [0u8; 512];
    let (_, from) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut hvr))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, addr);
    // Stateless: nothing is held for a ClientHello without a cookie.
    assert_eq!(listener.metrics().half_open_now, 0);

    // The meter starts over with a fresh session from the same port.
    let conn = connect(&socket, addr, &pki.device_config("127.0.0.1"))
        .await
        .unwrap();
    assert_eq!(round_trip(&conn, b"again").await, b"echo:again");
    let m = listener.metrics();
    assert_eq!(m.handshakes_started, 1, "{m:?}");
    assert_eq!(m.handshakes_completed, 1, "{m:?}");
    assert_eq!(m.handshakes_abandoned, 0, "{m:?}");
    assert_eq!(m.half_open_now, 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handshakes_pass_a_stalled_one_and_leave_nothing_behind() {
    let pki = TestPki::generate();
    let mut server_cfg = pki.server_config();
    // A close_notify lost on a saturated machine is cleaned up by the idle timeout instead.
    server_cfg.idle_timeout = Duration::from_secs(3);
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));

    // A handshake that stalls after its first flight (the stock listener would block accept on it).
    let stalled = UdpSocket::bind(LOCALHOST).await.unwrap();
    silent_peer(&stalled, addr, [5; 32]).await;
    wait_for(|| listener.metrics().half_open_now == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let runtime = tokio::runtime::Handle::current();
    let baseline_tasks = runtime.metrics().num_alive_tasks();

    const METERS: usize = 32;
    let started = std::time::Instant::now();
    let mut meters = Vec::new();
    for i in 0..METERS {
        let cfg = pki.device_config("127.0.0.1");
        meters.push(tokio::spawn(async move {
            let socket = client_socket().await;
            let conn = connect(&socket, addr, &cfg).await.unwrap();
            let payload = format!("meter-{i}");
            assert_eq!(
                round_trip(&conn, payload.as_bytes()).await,
                format!("echo:{payload}").as_bytes()
            );
            conn.close().await.unwrap();
        }));
    }
    for meter in meters {
        meter.await.unwrap();
    }
    let wall = started.elapsed();
    println!("{METERS} concurrent mutual-auth CCM_8 handshakes + round trip + close on loopback: {wall:?}");

    wait_for(|| listener.metrics().sessions_now == 0).await;
    // Engine tasks (2 per DTLSConn, both sides), echo tasks and handshake tasks are all gone.
    wait_for(|| {
        let alive = runtime.metrics().num_alive_tasks();
        if alive > baseline_tasks {
            eprintln!("alive tasks {alive}, baseline {baseline_tasks}");
        }
        alive <= baseline_tasks
    })
    .await;
    // Only the stalled handshake is still tracked.
    wait_for(|| listener.metrics().tracked_addresses_now == 1).await;
    let m = listener.metrics();
    assert_eq!(m.handshakes_completed, 32, "{m:?}");
    assert_eq!(m.half_open_now, 1, "{m:?}");
    assert_eq!(m.tombstones_now, 0, "{m:?}");
}

#[tokio::test]
async fn final_flight_resend_is_rate_limited_and_released_by_application_data() {
    let pki = TestPki::generate();
    let (listener, addr) = start_server(pki.server_config()).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    // Remembers what the client sent, to replay its flight 5 by hand.
    let recording = Arc::new(Tapped::new(
        SocketConn::new(Arc::clone(&socket), addr),
        WireLog::default(),
    ));
    let conn = pki
        .device_config("127.0.0.1")
        .connect(Arc::clone(&recording) as Arc<dyn Conn + Send + Sync>)
        .await
        .unwrap()
        .conn;
    wait_for(|| listener.metrics().sessions_now == 1).await;
    // The client's last handshake datagram belongs to its flight 5 (… ChangeCipherSpec, Finished).
    let flight5_tail = recording.tap().sent().last().unwrap().clone();
    let resends = || listener.metrics().final_flight_resends;
    assert_eq!(resends(), 0);

    // As if our final flight had been lost: the client's flight 5 comes back, three times at once.
    for _ in 0..3 {
        socket.send_to(&flight5_tail, addr).await.unwrap();
    }
    wait_for(|| listener.metrics().dropped_duplicates == 3).await;
    assert_eq!(resends(), 1, "at most one resend per 500 ms");

    tokio::time::sleep(Duration::from_millis(600)).await;
    socket.send_to(&flight5_tail, addr).await.unwrap();
    wait_for(|| listener.metrics().dropped_duplicates == 4).await;
    assert_eq!(resends(), 2);

    // Application data proves the client has our Finished: the saved flight is released.
    assert_eq!(round_trip(&conn, b"data").await, b"echo:data");
    tokio::time::sleep(Duration::from_millis(600)).await;
    socket.send_to(&flight5_tail, addr).await.unwrap();
    wait_for(|| listener.metrics().dropped_duplicates == 5).await;
    assert_eq!(resends(), 2, "no resend after application data");
    // The duplicates never reached the session, which still works.
    assert_eq!(round_trip(&conn, b"still").await, b"echo:still");
}

#[tokio::test]
async fn panicking_policy_hook_refuses_and_leaves_no_state() {
    let pki = TestPki::generate();
    let hook: PeerCertificateHook = Arc::new(|_chain: &[Vec<u8>]| panic!("bug in policy code"));
    let mut server_cfg = pki.server_config();
    server_cfg.verify_peer_certificate = Some(hook);
    let (listener, addr) = start_server(server_cfg).await;
    let _echo = spawn_echo(Arc::clone(&listener));
    let socket = client_socket().await;
    let cfg = pki
        .device_config("127.0.0.1")
        .with_timeout(Duration::from_secs(3));
    let result = connect(&socket, addr, &cfg).await;
    assert!(
        matches!(result, Err(FailureReason::HandshakeError(_))),
        "{:?}",
        result.map(|_| ())
    );
    wait_for(|| listener.metrics().handshakes_failed == 1).await;
    let m = listener.metrics();
    assert_eq!(m.half_open_now, 0, "{m:?}");
    assert_eq!(m.tracked_addresses_now, 0, "{m:?}");
    assert_eq!(m.refused_bad_certificate, 1, "{m:?}");
}

/// A session task that does not read cannot make the driver hold more than the per-session
/// byte budget (32 KiB), however large the records: the rest is dropped and counted, as a full
/// socket buffer would. Then reading resumes normally.
#[tokio::test]
async fn a_session_that_does_not_read_holds_at_most_its_byte_budget() {
    let pki = TestPki::generate();
    let (listener, _socket, conn, session) = one_session(&pki).await;
    // 30 records of 4,000 bytes (120,000 bytes), nobody reading on the server.
    for i in 0..30u8 {
        conn.write(&vec![i; 4000], None).await.unwrap();
    }
    // 8 records fit the 32 KiB budget (32,000 bytes); the other 22 are dropped.
    wait_for(|| listener.metrics().dropped_queue_full >= 22).await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut queued = 0;
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), session.recv(&mut buf)).await
    {
        assert_eq!(n, 4000);
        queued += n;
    }
    assert_eq!(queued, 32_000, "bytes queued for the session");
    assert_eq!(
        u64::try_from(queued / 4000).unwrap() + listener.metrics().dropped_queue_full,
        30
    );
    // The budget is free again: the next record goes through.
    assert_eq!(round_trip_after_drain(&conn, &session).await, 1200);
}

async fn round_trip_after_drain(conn: &DTLSConn, session: &DtlsSession) -> usize {
    conn.write(&[7u8; 1200], None).await.unwrap();
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), session.recv(&mut buf))
        .await
        .unwrap()
        .unwrap()
}

/// One handshake of our engine's client (`est_dtls::Client`) over UDP: the chain the server
/// sent (as the client's verifier saw it) and whether the handshake completed.
async fn engine_handshake(
    pki: &TestPki,
    server: SocketAddr,
    cached_server_chains: Vec<Vec<Vec<u8>>>,
) -> (Vec<Vec<u8>>, bool) {
    use std::sync::Mutex;
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let verifier: est_dtls::ChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
        *record.lock().unwrap() = chain.to_vec();
        Ok(est_dtls::Verified {
            identity: Vec::new(),
            context: None,
            leaf: None,
        })
    });
    let key = est_dtls::SigningKey::from_pkcs8(&pki.device.key_pkcs8_der).unwrap();
    let mut cc = est_dtls::ClientConfig::new(
        vec![pki.device.cert_der.clone(), pki.device_sub_ca_der.clone()],
        Arc::new(key),
        verifier,
    );
    cc.cipher_suites = vec![est_dtls::CipherSuite::Aes128Ccm8];
    cc.cached_server_chains = cached_server_chains;
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    let mut client =
        est_dtls::Client::connect(std::time::Instant::now(), server, Arc::new(cc)).unwrap();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !client.is_established() && !client.is_closed() {
        while let Some(d) = client.poll_transmit() {
            socket.send_to(&d, server).await.unwrap();
        }
        let wake = client
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or(deadline)
            .min(deadline);
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = r.unwrap();
                client.handle_datagram(std::time::Instant::now(), from, &buf[..n]);
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                client.handle_timeout(std::time::Instant::now());
            }
        }
    }
    let chain = seen.lock().unwrap().clone();
    (chain, client.is_established())
}

#[tokio::test]
async fn send_chain_off_sends_the_server_certificate_alone() {
    let pki = TestPki::generate();
    let chain = vec![pki.server.cert_der.clone(), pki.root_der.clone()];
    for (send_chain, expect) in [(true, chain.clone()), (false, chain[..1].to_vec())] {
        let mut cfg = pki.server_config();
        cfg.certificate_chain_der = chain.clone();
        cfg.send_chain = send_chain;
        let (listener, addr) = start_server(cfg).await;
        let accept = spawn_echo(Arc::clone(&listener));
        let (seen, ok) = engine_handshake(&pki, addr, Vec::new()).await;
        assert!(ok, "send_chain = {send_chain}");
        assert_eq!(seen, expect, "send_chain = {send_chain}");
        // The device sent [leaf, sub-CA]: two certificates received.
        assert_eq!(listener.metrics().peer_certificates_received, 2);
        accept.abort();
        listener.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_holding_the_server_chain_gets_its_fingerprint() {
    let pki = TestPki::generate();
    let chain = vec![pki.server.cert_der.clone(), pki.root_der.clone()];
    let mut cfg = pki.server_config();
    cfg.certificate_chain_der = chain.clone();
    let (listener, addr) = start_server(cfg).await;
    let accept = spawn_echo(Arc::clone(&listener));
    // Held: the server answers with the fingerprint; the client validates the chain it holds.
    let (seen, ok) = engine_handshake(&pki, addr, vec![chain.clone()]).await;
    assert!(ok);
    assert_eq!(seen, chain);
    assert_eq!(listener.metrics().cached_info_hits, 1);
    // Stale (the leaf alone is another Certificate message): the full chain.
    let (seen, ok) = engine_handshake(&pki, addr, vec![chain[..1].to_vec()]).await;
    assert!(ok);
    assert_eq!(seen, chain);
    assert_eq!(listener.metrics().cached_info_hits, 1);
    accept.abort();
    listener.shutdown().await;
    // [dtls] cached_info = false: the extension is ignored.
    let mut cfg = pki.server_config();
    cfg.certificate_chain_der = chain.clone();
    cfg.cached_info = false;
    let (listener, addr) = start_server(cfg).await;
    let accept = spawn_echo(Arc::clone(&listener));
    let (seen, ok) = engine_handshake(&pki, addr, vec![chain.clone()]).await;
    assert!(ok);
    assert_eq!(seen, chain);
    assert_eq!(listener.metrics().cached_info_hits, 0);
    accept.abort();
    listener.shutdown().await;
}
