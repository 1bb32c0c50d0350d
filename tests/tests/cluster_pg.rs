//! Two est-server nodes on one PostgreSQL database, over real UDP + DTLS on loopback: any node
//! serves any meter.
//!
//! - a retried /sen with the same CSR on the other node returns the first node's certificate;
//! - /sren on node B supersedes the certificate node A issued;
//! - two nodes racing the same device's /sren leave one active certificate, and the loser's
//!   meter gets the same certificate (same CSR) or a 4.03 refusal (another CSR);
//! - a certificate revoked with `est-server certs revoke` (the CLI, against the same
//!   database) is refused for /sren at node B: at the EST layer on a session opened before,
//!   at the handshake once B's revocation poll has seen it; both nodes serve a CRL, signed
//!   by the issuing CA, that lists it; a block made through node B's store (no CLI) is
//!   published by the nodes' own polls in a CRL both serve;
//! - the per-device enrollment rate limit counts what every node issued: a device enrolled
//!   on A gets 5.03 for another CSR on B (its retry of the first still gets the certificate);
//! - with PostgreSQL down, enrollments are answered 5.03 with Max-Age, and served again
//!   once it is back, by the same process.
//!
//! The database is a throwaway cluster (est-test-tools' pg module); under CI a cluster that
//! cannot start fails these tests, elsewhere they are skipped.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::ResponseType;
use der::{Decode, Encode};
use est_proto::ca::{self, RingP256Signer};
use est_proto::coap::{Client, ClientConfig, ClientEvent, Method, Request, Response};
use est_proto::est::{CF_PKCS10, CF_PKIX_CERT};
use est_proto::store::{AuditEvent, CertStatus, DeviceBlock, RevocationReason, RevokeOutcome};
use est_server::datadir;
use est_test_tools::pg::TestPostgres;
use est_tests::TestServer;
use webrtc_util::conn::Conn;

type DtlsConn = Arc<dyn Conn + Send + Sync>;

async fn pg_server(pg: &TestPostgres, db: &str) -> TestServer {
    pg_server_with(pg, db, |_| {}).await
}

/// [`pg_server`] with the configuration further adjusted by `tweak`.
async fn pg_server_with(
    pg: &TestPostgres,
    db: &str,
    tweak: impl FnOnce(&mut est_server::config::Config),
) -> TestServer {
    let url = pg.create_database(db).unwrap();
    TestServer::start(move |c| {
        c.storage.backend = "postgres".into();
        c.storage.url = url;
        c.storage.pool_size = 6;
        c.storage.timeout_ms = 2000;
        c.est.overload_retry_after_secs = 3;
        tweak(c);
    })
    .await
    .unwrap()
}

struct Meter {
    serial: String,
    idevid_chain: Vec<Vec<u8>>,
    idevid_key: Vec<u8>,
    trust: Vec<Vec<u8>>,
}

fn meter(srv: &TestServer, serial: &str) -> Meter {
    let fleet = srv.mint(&[serial]).unwrap();
    let dev = fleet.join(serial);
    Meter {
        serial: serial.into(),
        idevid_chain: datadir::read_certs(&dev.join("idevid-chain.pem")).unwrap(),
        idevid_key: datadir::read_key(&dev.join("idevid.key")).unwrap(),
        trust: datadir::read_certs(&fleet.join("implicit-ta.pem")).unwrap(),
    }
}

async fn dtls(server: SocketAddr, chain: &[Vec<u8>], key: &[u8], trust: &[Vec<u8>]) -> DtlsConn {
    try_dtls(server, chain, key, trust).await.unwrap()
}

/// A DTLS session, or why the handshake failed.
async fn try_dtls(
    server: SocketAddr,
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &[Vec<u8>],
) -> anyhow::Result<DtlsConn> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    Ok(est_tests::webrtc_dtls(sock, chain, key, trust).await?)
}

/// One request through the sans-IO client over a DTLS connection.
async fn exchange(conn: &DtlsConn, req: Request) -> Response {
    let mut client = Client::new(ClientConfig::default(), rand::random());
    client.start(Instant::now(), req).unwrap();
    let mut buf = vec![0u8; 4096];
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
        assert!(
            tokio::time::Instant::now() < deadline,
            "exchange took too long"
        );
        let wake = client
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or(deadline)
            .min(deadline);
        tokio::select! {
            r = conn.recv(&mut buf) => {
                let n = r.unwrap();
                client.handle_datagram(Instant::now(), &buf[..n]);
            }
            _ = tokio::time::sleep_until(wake) => client.handle_timeout(Instant::now()),
        }
    }
}

/// A fresh key (PKCS#8) and a CSR for it with `subject`.
fn csr_for(subject: &x509_cert::name::Name) -> (Vec<u8>, Vec<u8>) {
    let pkcs8 = ca::generate_p256_pkcs8(&mut rand::rngs::OsRng).unwrap();
    let signer = RingP256Signer::from_pkcs8_der(&pkcs8).unwrap();
    (ca::build_csr(&signer, subject, None, None).unwrap(), pkcs8)
}

fn serial_subject(serial: &str) -> x509_cert::name::Name {
    ca::name_from_attrs(&[(est_proto::policy::OID_SERIAL_NUMBER, serial)]).unwrap()
}

fn post(op: &str, csr: Vec<u8>) -> Request {
    Request::new(Method::Post, &format!("/.well-known/est/{op}"))
        .with_payload(CF_PKCS10, csr)
        .with_accept(CF_PKIX_CERT)
}

fn changed(r: &Response) -> Vec<u8> {
    assert_eq!(
        r.code,
        ResponseType::Changed,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    r.payload.clone()
}

fn serial_hex(cert: &[u8]) -> String {
    let c = x509_cert::Certificate::from_der(cert).unwrap();
    c.tbs_certificate
        .serial_number
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn subject_of(cert: &[u8]) -> x509_cert::name::Name {
    x509_cert::Certificate::from_der(cert)
        .unwrap()
        .tbs_certificate
        .subject
}

fn active_count(srv: &TestServer, device: &str) -> usize {
    srv.store()
        .list_certificates(100_000)
        .unwrap()
        .iter()
        .filter(|c| c.device_id == device && c.status == CertStatus::Active)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_node_gets_the_same_certificate_and_sren_there_supersedes_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("cross-node retry and re-enrollment") else {
        return;
    };
    let a = pg_server(&pg, "cross").await;
    let b = a.start_another_node().await.unwrap();
    let m = meter(&a, "SNX1");

    // /sen on A; the meter never got the answer and retries the same CSR on B.
    let (csr, pkcs8) = csr_for(&serial_subject(&m.serial));
    let on_a = dtls(a.addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    let first = changed(&exchange(&on_a, post("sen", csr.clone())).await);
    let on_b = dtls(b.local_addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    let again = changed(&exchange(&on_b, post("sen", csr)).await);
    assert_eq!(first, again, "node B answers node A's certificate");
    assert_eq!(a.store().count_certificates().unwrap(), 1);

    // /sren on B, authenticated by the certificate A issued.
    let with_ldevid = dtls(b.local_addr, std::slice::from_ref(&first), &pkcs8, &m.trust).await;
    let (csr2, _) = csr_for(&subject_of(&first));
    let renewed = changed(&exchange(&with_ldevid, post("sren", csr2)).await);
    assert_eq!(
        subject_of(&renewed).to_der().unwrap(),
        subject_of(&first).to_der().unwrap()
    );
    let old = a
        .store()
        .find_by_serial(&serial_hex(&first))
        .unwrap()
        .unwrap();
    assert_eq!(
        old.status,
        CertStatus::Superseded,
        "A's certificate superseded by B"
    );
    let new = a
        .store()
        .find_by_serial(&serial_hex(&renewed))
        .unwrap()
        .unwrap();
    assert_eq!(new.status, CertStatus::Active);
    assert_eq!(
        new.replaces_serial_hex.as_deref(),
        Some(old.serial_hex.as_str())
    );
    assert_eq!(active_count(&a, "SNX1"), 1);
    b.shutdown().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_one_devices_sren_leave_one_active_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("cross-node /sren race") else {
        return;
    };
    let a = pg_server(&pg, "race").await;
    let b = a.start_another_node().await.unwrap();
    let nodes = [a.addr, b.local_addr];
    let (mut won, mut refused, mut same) = (0, 0, 0);
    for round in 0..8 {
        let serial = format!("SNR{round}");
        let m = meter(&a, &serial);
        let (csr, pkcs8) = csr_for(&serial_subject(&serial));
        let conn = dtls(a.addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
        let ldevid = changed(&exchange(&conn, post("sen", csr)).await);
        // The meter holds two sessions with its LDevID, one per node, and re-enrolls on both
        // at once: with different CSRs in even rounds, the same CSR in odd ones.
        let mut conns = Vec::new();
        for n in nodes {
            conns.push(dtls(n, std::slice::from_ref(&ldevid), &pkcs8, &m.trust).await);
        }
        let (c1, _) = csr_for(&subject_of(&ldevid));
        let c2 = if round % 2 == 1 {
            c1.clone()
        } else {
            csr_for(&subject_of(&ldevid)).0
        };
        let (r1, r2) = tokio::join!(
            exchange(&conns[0], post("sren", c1)),
            exchange(&conns[1], post("sren", c2))
        );
        let answers = [r1, r2];
        let ok: Vec<&Response> = answers
            .iter()
            .filter(|r| r.code == ResponseType::Changed)
            .collect();
        if round % 2 == 1 {
            assert_eq!(ok.len(), 2, "same CSR: both get a certificate");
            assert_eq!(ok[0].payload, ok[1].payload, "and it is the same one");
            same += 1;
        } else {
            assert_eq!(
                ok.len(),
                1,
                "{:?}",
                answers.iter().map(|r| r.code).collect::<Vec<_>>()
            );
            let loser = answers
                .iter()
                .find(|r| r.code != ResponseType::Changed)
                .unwrap();
            assert_eq!(
                loser.code,
                ResponseType::Forbidden,
                "{:?}",
                String::from_utf8_lossy(&loser.payload)
            );
            won += 1;
            refused += 1;
        }
        assert_eq!(active_count(&a, &serial), 1, "{serial}");
        let active = a
            .store()
            .find_by_serial(&serial_hex(&ok[0].payload))
            .unwrap()
            .unwrap();
        assert_eq!(
            active.status,
            CertStatus::Active,
            "the winner's certificate is the active one"
        );
    }
    assert_eq!((won, refused, same), (4, 4, 4));
    b.shutdown().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_enrollments_get_503_with_max_age_then_succeed_when_it_is_back() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(mut pg) = TestPostgres::start_or_skip("PostgreSQL outage over DTLS") else {
        return;
    };
    let a = pg_server(&pg, "outage").await;
    let m = meter(&a, "SNO1");
    let conn = dtls(a.addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    pg.stop(true);
    let (csr, _) = csr_for(&serial_subject("SNO1"));
    let r = exchange(&conn, post("sen", csr.clone())).await;
    assert_eq!(
        r.code,
        ResponseType::ServiceUnavailable,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_eq!(
        r.max_age,
        Some(3),
        "Max-Age tells the meter when to come back"
    );
    pg.restart().unwrap();
    // The same session, the same CSR, once the database is back: issued, and stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    let cert = loop {
        let r = exchange(&conn, post("sen", csr.clone())).await;
        if r.code == ResponseType::Changed {
            break r.payload;
        }
        assert_eq!(r.code, ResponseType::ServiceUnavailable);
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let stored = a
        .store()
        .find_by_serial(&serial_hex(&cert))
        .unwrap()
        .unwrap();
    assert_eq!(stored.der, cert);
    assert_eq!(a.store().count_certificates().unwrap(), 1);
    a.stop().await;
}

/// `crl` verified against the issuing CA: its revoked serials (hex) with their reason codes.
fn crl_entries(srv: &TestServer, crl: &[u8]) -> Vec<(String, Option<u8>)> {
    let ca = datadir::read_certs(&srv.ca_pem()).unwrap().remove(0);
    let v = ca::verify_crl(crl, &ca).unwrap_or_else(|e| panic!("CRL does not verify: {e}"));
    v.revoked
        .iter()
        .map(|(serial, reason)| {
            let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
            (hex, *reason)
        })
        .collect()
}

/// GET /crl over a DTLS session.
async fn fetch_crl(conn: &DtlsConn) -> Vec<u8> {
    let r = exchange(
        conn,
        Request::new(Method::Get, "/crl").with_accept(est_proto::est::CF_PKIX_CRL_DEFAULT),
    )
    .await;
    assert_eq!(r.code, ResponseType::Content, "{r:?}");
    r.payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_through_the_cli_is_refused_at_the_other_node_and_listed_by_both() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("cross-node revocation") else {
        return;
    };
    let a = pg_server(&pg, "revocation").await;
    let b = a.start_another_node().await.unwrap();
    let m = meter(&a, "SNREV1");
    let (csr, pkcs8) = csr_for(&serial_subject(&m.serial));
    let on_a = dtls(a.addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    let ldevid = changed(&exchange(&on_a, post("sen", csr)).await);
    let serial = serial_hex(&ldevid);
    // A session with the LDevID at B, opened while the certificate is still good.
    let early = dtls(
        b.local_addr,
        std::slice::from_ref(&ldevid),
        &pkcs8,
        &m.trust,
    )
    .await;

    // `est-server certs revoke` against the shared database (the nodes' configuration).
    let report = est_server::revocation::revoke_certificate(
        &a.data_dir,
        &a.config,
        &serial,
        RevocationReason::KeyCompromise,
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert!(
        matches!(&report.outcome, RevokeOutcome::Revoked(c) if c.device_id == "SNREV1"),
        "{:?}",
        report.outcome
    );
    let published = report.crl.expect("the CLI publishes a CRL");
    let generation = a.store().revocation_generation().unwrap();
    assert_eq!(published.generation, generation);

    // B's EST layer reads the store on every enrollment: refused at once.
    let (csr2, _) = csr_for(&subject_of(&ldevid));
    let r = exchange(&early, post("sren", csr2.clone())).await;
    assert_eq!(
        r.code,
        ResponseType::Forbidden,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert!(
        String::from_utf8_lossy(&r.payload).contains("revoked"),
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_eq!(a.store().count_certificates().unwrap(), 1, "nothing issued");

    // B's own revocation poll ([revocation] poll_interval_secs) picks the revocation up; from
    // then on B refuses the handshake itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    while b.revocation.generation() < generation || a.running().revocation.generation() < generation
    {
        assert!(
            Instant::now() < deadline,
            "the nodes' polls did not see the revocation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = b.listener.metrics().handshakes_completed;
    let refused = try_dtls(
        b.local_addr,
        std::slice::from_ref(&ldevid),
        &pkcs8,
        &m.trust,
    )
    .await;
    assert!(
        refused.is_err(),
        "the handshake with a revoked LDevID must fail"
    );
    assert_eq!(b.listener.metrics().handshakes_completed, before);
    assert!(
        b.revocation
            .refused_revoked
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // B's refusal lands in the shared audit trail (written behind the refusal).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = a.store().recent_audit(20).unwrap();
        if audit.iter().any(|e| {
            e.operation == "handshake"
                && e.outcome == "refused"
                && e.device_id == "SNREV1"
                && e.detail.contains(&serial)
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no handshake audit row: {audit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Both nodes serve a CRL (fetched over CoAP with the meter's IDevID) that the issuing CA
    // signed and that lists the certificate as keyCompromise (1).
    let on_b = dtls(b.local_addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    for (node, conn) in [("A", &on_a), ("B", &on_b)] {
        let crl = fetch_crl(conn).await;
        let entries = crl_entries(&a, &crl);
        assert!(
            entries.contains(&(serial.clone(), Some(1))),
            "node {node}'s CRL lacks {serial}: {entries:?}"
        );
    }
    let first_crl = a.store().latest_crl().unwrap().unwrap();

    // A block made through node B's store, with no CLI to publish after it: both nodes'
    // polls see the generation move, re-issue the CRL (cRLNumbers from the database, never
    // the same twice) and serve one listing the blocked device's certificate.
    let m2 = meter(&a, "SNREV2");
    let (csr, _) = csr_for(&serial_subject(&m2.serial));
    let on_b2 = dtls(b.local_addr, &m2.idevid_chain, &m2.idevid_key, &m2.trust).await;
    let second = serial_hex(&changed(&exchange(&on_b2, post("sen", csr)).await));
    let at = est_proto::store::unix_seconds(std::time::SystemTime::now());
    let blocked = b
        .store
        .block_device(&DeviceBlock {
            device_id: "SNREV2".into(),
            reason: RevocationReason::CessationOfOperation,
            at_unix: at,
            keep_certs: false,
            audit: AuditEvent {
                at_unix: at,
                peer: "test".into(),
                relay: None,
                device_id: "SNREV2".into(),
                operation: "block".into(),
                outcome: "blocked".into(),
                code: "-".into(),
                detail: "decommissioned".into(),
            },
        })
        .unwrap();
    assert_eq!(blocked.revoked_serials, std::slice::from_ref(&second));
    let deadline = Instant::now() + Duration::from_secs(20);
    for (node, conn) in [("A", &on_a), ("B", &on_b)] {
        loop {
            let entries = crl_entries(&a, &fetch_crl(conn).await);
            if entries.contains(&(second.clone(), Some(5))) {
                assert!(entries.contains(&(serial.clone(), Some(1))), "{entries:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} serves no CRL listing {second}: {entries:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let latest = a.store().latest_crl().unwrap().unwrap();
    assert!(latest.number > first_crl.number, "{latest:?}");
    assert_eq!(
        latest.generation,
        a.store().revocation_generation().unwrap()
    );
    // The blocked device's IDevID is refused at the handshake too (once B's view has it).
    let deadline = Instant::now() + Duration::from_secs(15);
    while b.revocation.generation() < latest.generation {
        assert!(Instant::now() < deadline, "B's poll did not see the block");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        try_dtls(b.local_addr, &m2.idevid_chain, &m2.idevid_key, &m2.trust)
            .await
            .is_err(),
        "a blocked device's handshake must fail"
    );
    b.shutdown().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_device_rate_limit_counts_the_other_nodes_issuances() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("cross-node rate limit") else {
        return;
    };
    let a = pg_server_with(&pg, "rate", |c| {
        c.enrollment.max_per_device_per_period = 1;
        c.enrollment.period_secs = 3600;
    })
    .await;
    let b = a.start_another_node().await.unwrap();
    let m = meter(&a, "SNRATE1");
    let (csr, _) = csr_for(&serial_subject(&m.serial));
    let on_a = dtls(a.addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    let first = changed(&exchange(&on_a, post("sen", csr.clone())).await);
    let on_b = dtls(b.local_addr, &m.idevid_chain, &m.idevid_key, &m.trust).await;
    // A retry of the same CSR on B is not a new issuance: the same certificate.
    assert_eq!(changed(&exchange(&on_b, post("sen", csr)).await), first);
    // Another CSR on B: over the limit A's issuance used up.
    let (other, _) = csr_for(&serial_subject(&m.serial));
    let r = exchange(&on_b, post("sen", other)).await;
    assert_eq!(
        r.code,
        ResponseType::ServiceUnavailable,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert!(
        r.max_age.is_some_and(|s| s > 0 && s <= 3600),
        "Max-Age: when A's certificate leaves the period ({:?})",
        r.max_age
    );
    assert_eq!(b.est.counters().rate_limited, 1);
    assert_eq!(a.running().est.counters().rate_limited, 0);
    assert_eq!(a.store().count_certificates().unwrap(), 1);
    // Another device is not limited by it.
    let m2 = meter(&a, "SNRATE2");
    let (csr2, _) = csr_for(&serial_subject(&m2.serial));
    let on_b2 = dtls(b.local_addr, &m2.idevid_chain, &m2.idevid_key, &m2.trust).await;
    changed(&exchange(&on_b2, post("sen", csr2)).await);
    b.shutdown().await;
    a.stop().await;
}
