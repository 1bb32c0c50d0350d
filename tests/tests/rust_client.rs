//! Integration over real UDP + DTLS on loopback with our Rust client pieces: block-wise
//! at the smallest block size, CoAP deduplication of a retransmitted enrollment over
//! DTLS, and a meter that re-enrolls from the same address and port after closing.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, MessageType, Packet, RequestType};
use est_proto::ca::{self, RingP256Signer};
use est_proto::coap::{Client, ClientConfig, ClientEvent, Method, Request, Response};
use est_proto::est::{CF_PKCS10, CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT};
use est_server::datadir;
use est_tests::TestServer;
use webrtc_util::conn::Conn;

struct Meter {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    trust: Vec<Vec<u8>>,
}

fn meter(srv: &TestServer, serial: &str) -> Meter {
    let fleet = srv.mint(&[serial]).unwrap();
    let dev = fleet.join(serial);
    Meter {
        chain: datadir::read_certs(&dev.join("idevid-chain.pem")).unwrap(),
        key: datadir::read_key(&dev.join("idevid.key")).unwrap(),
        trust: datadir::read_certs(&fleet.join("implicit-ta.pem")).unwrap(),
    }
}

async fn dtls(
    server: SocketAddr,
    local: SocketAddr,
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &[Vec<u8>],
) -> Arc<dyn Conn + Send + Sync> {
    // A fixed port can still be held for a moment by a closed connection's tasks: retry.
    let mut tries = 0;
    let sock = loop {
        match tokio::net::UdpSocket::bind(local).await {
            Ok(sock) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("binding {local}: {e}"),
        }
    };
    sock.connect(server).await.unwrap();
    est_tests::webrtc_dtls(sock, chain, key, trust)
        .await
        .unwrap()
}

/// One request through the sans-IO client over a DTLS connection.
async fn exchange(
    conn: &Arc<dyn Conn + Send + Sync>,
    client: &mut Client,
    req: Request,
) -> Response {
    client.start(Instant::now(), req).unwrap();
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(d) = client.poll_transmit() {
            conn.send(&d).await.unwrap();
        }
        if let Some(ev) = client.poll_event() {
            match ev {
                ClientEvent::Response(r) => return r,
                ClientEvent::Failed(e) => panic!("exchange failed: {e:?}"),
            }
        }
        let wake = client
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or(deadline)
            .min(deadline);
        assert!(
            tokio::time::Instant::now() < deadline,
            "exchange took too long"
        );
        tokio::select! {
            r = conn.recv(&mut buf) => {
                let n = r.unwrap();
                client.handle_datagram(Instant::now(), &buf[..n]);
            }
            _ = tokio::time::sleep_until(wake) => client.handle_timeout(Instant::now()),
        }
    }
}

fn client(szx: u8) -> Client {
    Client::new(
        ClientConfig {
            block1_szx: szx,
            block2_szx: Some(szx),
            ..ClientConfig::default()
        },
        7,
    )
}

/// A fresh key (PKCS#8) and a CSR for it.
fn new_csr(serial: &str) -> (Vec<u8>, RingP256Signer, Vec<u8>) {
    let pkcs8 = ca::generate_p256_pkcs8(&mut rand::rngs::OsRng).unwrap();
    let signer = RingP256Signer::from_pkcs8_der(&pkcs8).unwrap();
    let subject = ca::name_from_attrs(&[(est_proto::policy::OID_SERIAL_NUMBER, serial)]).unwrap();
    (
        ca::build_csr(&signer, &subject, None, None).unwrap(),
        signer,
        pkcs8,
    )
}

/// POST /sen with a fresh key and CSR for `serial`; asserts 2.04 and that the certificate
/// (returned, DER) certifies that key.
async fn sen_with_a_fresh_key(
    conn: &Arc<dyn Conn + Send + Sync>,
    c: &mut Client,
    serial: &str,
) -> Vec<u8> {
    let (csr, signer, _) = new_csr(serial);
    let req = Request::new(Method::Post, "/.well-known/est/sen")
        .with_payload(CF_PKCS10, csr)
        .with_accept(CF_PKIX_CERT);
    let resp = exchange(conn, c, req).await;
    assert_eq!(
        resp.code,
        coap_lite::ResponseType::Changed,
        "{:?}",
        String::from_utf8_lossy(&resp.payload)
    );
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(&resp.payload).unwrap();
    assert_eq!(
        cert.tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
        signer.public_key_sec1()
    );
    resp.payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_with_16_byte_blocks_both_ways() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let m = meter(&srv, "SNBLK");
    let conn = dtls(
        srv.addr,
        "127.0.0.1:0".parse().unwrap(),
        &m.chain,
        &m.key,
        &m.trust,
    )
    .await;
    let mut c = client(0);
    let crts = exchange(
        &conn,
        &mut c,
        Request::new(Method::Get, "/.well-known/est/crts"),
    )
    .await;
    assert_eq!(crts.content_format, Some(CF_PKCS7_CERTS_ONLY));
    let cas = ca::certs_from_certs_only(&crts.payload).unwrap();
    assert_eq!(cas.len(), 1);
    // The certificate certifies our key and chains to the CA that /crts gave us.
    let ldevid = sen_with_a_fresh_key(&conn, &mut c, "SNBLK").await;
    let policy = est_proto::policy::Policy::new(Default::default(), &[], &cas[0]).unwrap();
    policy
        .authenticate_operational(std::slice::from_ref(&ldevid), std::time::SystemTime::now())
        .expect("chains to the CA from /crts");
    let stats = c.stats();
    assert!(
        stats.datagrams_sent > 20,
        "small blocks mean many datagrams: {stats:?}"
    );
    srv.stop().await;
}

/// A CON POST /sen sent twice with the same Message ID (a retransmission whose ACK was
/// lost) gets byte-identical answers, and only one certificate exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmitted_enrollment_is_deduplicated_over_dtls() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let m = meter(&srv, "SNDUP");
    let conn = dtls(
        srv.addr,
        "127.0.0.1:0".parse().unwrap(),
        &m.chain,
        &m.key,
        &m.trust,
    )
    .await;
    let (csr, _, _) = new_csr("SNDUP");
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = 0x4242;
    p.set_token(vec![1, 2, 3, 4]);
    p.add_option(coap_lite::CoapOption::UriPath, b".well-known".to_vec());
    p.add_option(coap_lite::CoapOption::UriPath, b"est".to_vec());
    p.add_option(coap_lite::CoapOption::UriPath, b"sen".to_vec());
    p.set_content_format(coap_lite::ContentFormat::ApplicationPkcs10);
    p.add_option(coap_lite::CoapOption::Accept, vec![0x01, 0x1f]); // 287
    p.payload = csr;
    let bytes = p.to_bytes().unwrap();
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 2048];
    for _ in 0..2 {
        conn.send(&bytes).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(20), conn.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        answers.push(buf[..n].to_vec());
    }
    assert_eq!(answers[0], answers[1], "identical bytes for the duplicate");
    let ack = Packet::from_bytes(&answers[0]).unwrap();
    assert_eq!(ack.header.message_id, 0x4242);
    assert_eq!(
        ack.header.code,
        MessageClass::Response(coap_lite::ResponseType::Changed)
    );
    assert_eq!(srv.store().count_certificates().unwrap(), 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_reenrolls_from_the_same_address_and_port() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let m = meter(&srv, "SNPORT");
    // The meter keeps its source port, as a meter with a configured port (or a NAT) does: the
    // second connection binds the port the first one got.
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let conn = dtls(srv.addr, any, &m.chain, &m.key, &m.trust).await;
    let local = conn.local_addr().unwrap();
    assert_ne!(local.port(), 0);
    let mut c = client(6);
    let (csr, _, pkcs8) = new_csr("SNPORT");
    let req = Request::new(Method::Post, "/.well-known/est/sen")
        .with_payload(CF_PKCS10, csr)
        .with_accept(CF_PKIX_CERT);
    let ldevid = exchange(&conn, &mut c, req).await.payload;
    conn.close().await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Same address and port, now authenticated with the LDevID it just received.
    let conn = dtls(
        srv.addr,
        local,
        std::slice::from_ref(&ldevid),
        &pkcs8,
        &m.trust,
    )
    .await;
    use der::{Decode, Encode};
    let subject = x509_cert::Certificate::from_der(&ldevid)
        .unwrap()
        .tbs_certificate
        .subject;
    let new_key =
        RingP256Signer::from_pkcs8_der(&ca::generate_p256_pkcs8(&mut rand::rngs::OsRng).unwrap())
            .unwrap();
    let csr2 = ca::build_csr(&new_key, &subject, None, None).unwrap();
    let mut c = client(6);
    let req = Request::new(Method::Post, "/.well-known/est/sren")
        .with_payload(CF_PKCS10, csr2)
        .with_accept(CF_PKIX_CERT);
    let renewed = exchange(&conn, &mut c, req).await;
    assert_eq!(
        renewed.code,
        coap_lite::ResponseType::Changed,
        "{:?}",
        String::from_utf8_lossy(&renewed.payload)
    );
    let renewed = x509_cert::Certificate::from_der(&renewed.payload).unwrap();
    assert_eq!(
        renewed.tbs_certificate.subject.to_der().unwrap(),
        subject.to_der().unwrap()
    );
    assert_eq!(srv.store().count_certificates().unwrap(), 2);
    srv.stop().await;
}

/// An IDevID past its notAfter, signed by the configured manufacturer CA: RFC 9148 §3 lets a
/// server accept it. With `policy.accept_expired_idevid = false` (the default) the handshake
/// refuses it; with `true` the handshake's chain verifier accepts it as a manufacturer chain and
/// the device enrolls over DTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idevid_enrolls_over_dtls_only_when_policy_allows_it() {
    for accept in [false, true] {
        let srv = TestServer::start(|c| c.policy.accept_expired_idevid = accept)
            .await
            .unwrap();
        let mfr_pem = srv.data_dir.join("manufacturers/demo-manufacturer-ca.pem");
        let maker = datadir::load_ca(&mfr_pem, &mfr_pem.with_extension("key")).unwrap();
        let day = Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let (idevid, key) = ca::mint_idevid(
            &maker,
            "SNOLD",
            est_server::factory::DEMO_HW_TYPE,
            now - 800 * day,
            now - day,
            &mut rand::rngs::OsRng,
        )
        .unwrap();
        let chain = vec![idevid, maker.certificate_der().to_vec()];
        let trust =
            datadir::read_certs(&srv.mint(&["SNNEW"]).unwrap().join("implicit-ta.pem")).unwrap();
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(srv.addr).await.unwrap();
        let connected = est_tests::webrtc_dtls_within(
            sock,
            &chain,
            &key,
            &trust,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await;
        if !accept {
            assert!(
                connected.is_err(),
                "an expired IDevID must be refused by default"
            );
            assert_eq!(srv.transport().handshakes_completed, 0);
            assert_eq!(srv.store().count_certificates().unwrap(), 0);
            srv.stop().await;
            continue;
        }
        let conn: Arc<dyn Conn + Send + Sync> =
            connected.expect("accepted when policy.accept_expired_idevid = true");
        sen_with_a_fresh_key(&conn, &mut client(1), "SNOLD").await;
        let stored = srv.store().list_certificates(10).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].device_id, "SNOLD");
        srv.stop().await;
    }
}
