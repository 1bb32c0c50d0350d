//! Interop with software nobody here wrote: libcoap's `coap-client` (GnuTLS and OpenSSL
//! builds, Debian libcoap3-bin 4.3.1) enrolls against our server over real UDP + DTLS 1.2
//! with certificates and 64-byte Block1, and `openssl verify` checks what we issued.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use est_tests::*;

/// GET crts, POST sen with `-b 64`, then POST sren authenticated by the new LDevID;
/// every certificate verified by openssl against the issuing CA.
async fn enroll_and_reenroll(which: Libcoap, serial: &str, engine_shards: usize) {
    let srv = TestServer::start(|c| c.dtls.engine_shards = engine_shards)
        .await
        .expect("server");
    let fleet = srv.mint(&[serial]).expect("mint");
    let dev = fleet.join(serial);
    let work = srv.dir.path().join(format!("work-{serial}"));
    std::fs::create_dir_all(&work).expect("dir");
    // coap-client-openssl sends only its leaf; coap-client-gnutls sends the chain.
    let idevid = match which {
        Libcoap::Gnutls => dev.join("idevid-chain.pem"),
        Libcoap::Openssl => dev.join("idevid.pem"),
    };
    let trust = fleet.join("implicit-ta.pem");
    let creds = Creds {
        cert: &idevid,
        key: &dev.join("idevid.key"),
        trust: &trust,
    };

    // /crts, PKCS#7 (281) and bare certificate (287).
    let p7 = work.join("crts.p7");
    let (run, listed) = crts_pkcs7(which, &creds, &srv.url("crts"), &p7)
        .await
        .expect("crts");
    assert!(run.payload.is_some(), "no /crts payload: {run:?}");
    // What the client's Certificate message carried: the IDevID and the manufacturer CA
    // (GnuTLS, from the chain file), or the IDevID alone (OpenSSL), which the server accepts
    // because the IDevID's issuer is a configured manufacturer CA (the path is built from
    // the anchors).
    let t = srv.transport();
    let sent = match which {
        Libcoap::Gnutls => 2,
        Libcoap::Openssl => 1,
    };
    assert_eq!(
        (t.handshakes_completed, t.peer_certificates_received),
        (1, sent),
        "{t:?}"
    );
    // libcoap offers no certificate type (RFC 7250): X.509, though the server offers C509.
    assert_eq!(t.c509_client_certificates, 0, "{t:?}");
    assert!(listed.contains("EST Issuing CA"), "{listed}");
    let ca_der = work.join("ca.der");
    coap_client(
        which,
        Some(&creds),
        &["-m", "get", "-A", "287"],
        &srv.url("crts"),
        Some(&ca_der),
    )
    .await
    .expect("crts 287");
    let ca_pem = der_to_pem(&ca_der).expect("ca pem");
    openssl_verify(&ca_pem, &ca_pem).expect("self-signed CA from /crts");

    // /sen: a CSR made by openssl, Block1 in 64-byte blocks, answer as pkix-cert.
    let (ldevid_key, csr) =
        openssl_csr(&work, "ldevid", &format!("/serialNumber={serial}")).expect("csr");
    let ldevid_der = work.join("ldevid.der");
    let ldevid_pem = enroll_csr(which, &creds, &srv.url("sen"), &csr, &ldevid_der)
        .await
        .expect("sen");
    openssl_verify(&srv.ca_pem(), &ldevid_pem).expect("openssl verifies the LDevID");
    openssl_verify(&ca_pem, &ldevid_pem).expect("and against the CA fetched from /crts");
    let text = openssl(&[
        "x509",
        "-in",
        path_str(&ldevid_pem).unwrap(),
        "-noout",
        "-text",
    ])
    .expect("text");
    assert!(text.contains(&format!("serialNumber = {serial}")), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    // Its public key is the one in our CSR.
    assert!(same_public_key(&ldevid_pem, &ldevid_key).unwrap());

    // /sren, authenticated with the new LDevID, CSR subject equal to the certificate's
    // (RFC 7030 §4.2.2), default answer PKCS#7 (281).
    let subject = cert_subject(&ldevid_pem).unwrap();
    let (_, csr2) = openssl_csr(&work, "renew", &subject).expect("csr2");
    let creds2 = Creds {
        cert: &ldevid_pem,
        key: &ldevid_key,
        trust: &trust,
    };
    let renewed_p7 = work.join("renewed.p7");
    let run = coap_client(
        which,
        Some(&creds2),
        &[
            "-m",
            "post",
            "-b",
            "64",
            "-t",
            "286",
            "-f",
            path_str(&csr2).unwrap(),
        ],
        &srv.url("sren"),
        Some(&renewed_p7),
    )
    .await
    .expect("sren");
    assert!(run.payload.is_some(), "no /sren payload: {run:?}");
    let renewed_pem = work.join("renewed.pem");
    openssl(&[
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        path_str(&renewed_p7).unwrap(),
        "-print_certs",
        "-out",
        path_str(&renewed_pem).unwrap(),
    ])
    .expect("p7");
    openssl_verify(&srv.ca_pem(), &renewed_pem).expect("renewed certificate verifies");

    // The store: two certificates for the device, the first superseded by the second.
    let certs = srv.store().list_certificates(10).expect("list");
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert!(certs.iter().all(|c| c.device_id == serial));
    assert_eq!(certs[0].status.as_str(), "active");
    assert_eq!(certs[1].status.as_str(), "superseded");
    assert_eq!(
        certs[0].replaces_serial_hex.as_deref(),
        Some(certs[1].serial_hex.as_str())
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gnutls_client_enrolls_and_reenrolls() {
    if !require_tools() {
        return;
    }
    enroll_and_reenroll(Libcoap::Gnutls, "SNGNUTLS1", 1).await;
}

/// The same through four engine shards behind the dispatcher: each of libcoap's sessions
/// (a new source port every run) lands on the shard its address hashes to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gnutls_client_enrolls_and_reenrolls_through_engine_shards() {
    if !require_tools() {
        return;
    }
    enroll_and_reenroll(Libcoap::Gnutls, "SNGNUTLS2", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_client_enrolls_and_reenrolls() {
    if !require_tools() {
        return;
    }
    enroll_and_reenroll(Libcoap::Openssl, "SNOPENSSL1", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_sen_returns_the_same_certificate() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNRETRY"]).unwrap();
    let dev = fleet.join("SNRETRY");
    let trust = fleet.join("implicit-ta.pem");
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let (_, csr) = openssl_csr(srv.dir.path(), "retry", "/serialNumber=SNRETRY").unwrap();
    let mut got = Vec::new();
    for i in 0..2 {
        let out = srv.dir.path().join(format!("retry-{i}.der"));
        let run = post_csr_with(
            Libcoap::Gnutls,
            &creds,
            &srv.url("sen"),
            &csr,
            Some(&out),
            None,
        )
        .await
        .unwrap();
        got.push(run.payload.expect("certificate"));
    }
    assert_eq!(
        got[0], got[1],
        "same CSR from the same device: same certificate"
    );
    assert_eq!(srv.store().count_certificates().unwrap(), 1);
    srv.stop().await;
}

fn bad_request_dir(srv: &TestServer) -> std::path::PathBuf {
    let d = srv.dir.path().join("bad");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_store_nothing() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNBAD"]).unwrap();
    let dev = fleet.join("SNBAD");
    let trust = fleet.join("implicit-ta.pem");
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let work = bad_request_dir(&srv);
    let (_, csr) = openssl_csr(&work, "good", "/serialNumber=SNBAD").unwrap();

    // Bad CSR signature: flip the last byte (inside the signature's s value).
    let mut bytes = std::fs::read(&csr).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = work.join("tampered.der");
    std::fs::write(&tampered, &bytes).unwrap();
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &[
            "-m",
            "post",
            "-b",
            "64",
            "-t",
            "286",
            "-f",
            path_str(&tampered).unwrap(),
        ],
        &srv.url("sen"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    assert!(run.stderr.contains("CSR"), "diagnostic payload: {run:?}");

    // Wrong Content-Format (0 = text/plain).
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "post", "-t", "0", "-f", path_str(&csr).unwrap()],
        &srv.url("sen"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.15"), "{run:?}");

    // Accept 9999.
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "get", "-A", "9999"],
        &srv.url("crts"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.06"), "{run:?}");

    // Unknown resource and wrong method.
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "get"],
        &srv.url("nope"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.04"), "{run:?}");
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "get"],
        &srv.url("sen"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.05"), "{run:?}");

    // /sren with an IDevID is refused by policy.
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "post", "-t", "286", "-f", path_str(&csr).unwrap()],
        &srv.url("sren"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.03"), "{run:?}");

    assert_eq!(
        srv.store().count_certificates().unwrap(),
        0,
        "nothing stored from refused requests"
    );
    let audit = srv.store().recent_audit(50).unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.outcome == "refused" && a.code == "4.00"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|a| a.outcome == "refused" && a.code == "4.03" && a.operation == "sren"),
        "{audit:?}"
    );
    srv.stop().await;
}

async fn handshake_refused(srv: &TestServer, creds: Option<&Creds<'_>>) {
    let before = srv.transport();
    let run = coap_client(
        Libcoap::Gnutls,
        creds,
        &["-m", "get", "-B", "5"],
        &srv.url("crts"),
        None,
    )
    .await
    .unwrap();
    assert!(
        run.error_code().is_none(),
        "no CoAP answer expected: {run:?}"
    );
    let after = srv.transport();
    assert_eq!(
        after.handshakes_completed, before.handshakes_completed,
        "handshake must not complete: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_or_unknown_manufacturer_fails_the_handshake() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNX"]).unwrap();
    let trust = fleet.join("implicit-ta.pem");
    // No client certificate at all.
    handshake_refused(&srv, None).await;
    // A device certificate from a manufacturer we do not trust, made by openssl.
    let w = bad_request_dir(&srv);
    let (ca_key, ca_cert) = est_test_tools::openssl::self_signed(
        &w,
        "rogue",
        "P-256",
        "/CN=Rogue Maker CA",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign",
        ],
    )
    .unwrap();
    let (dev_key, dev_csr) =
        est_test_tools::openssl::csr(&w, "dev", "/serialNumber=SNROGUE").unwrap();
    let dev_cert = est_test_tools::openssl::sign(
        &w,
        "dev",
        &dev_csr,
        (&ca_key, &ca_cert),
        &[
            "extendedKeyUsage=clientAuth",
            "keyUsage=critical,digitalSignature",
        ],
    )
    .unwrap();
    let rogue = Creds {
        cert: &dev_cert,
        key: &dev_key,
        trust: &trust,
    };
    handshake_refused(&srv, Some(&rogue)).await;
    assert!(
        srv.transport().handshakes_failed >= 2,
        "{:?}",
        srv.transport()
    );
    assert_eq!(srv.store().count_certificates().unwrap(), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_records_do_not_disturb_an_enrollment() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNOK"]).unwrap();
    let dev = fleet.join("SNOK");
    let trust = fleet.join("implicit-ta.pem");
    let (_, csr) = openssl_csr(srv.dir.path(), "ok", "/serialNumber=SNOK").unwrap();
    let addr = srv.addr;
    // A noisy neighbour: garbage, a truncated DTLS ClientHello header, an application
    // data record for a session that does not exist, all while a meter enrolls.
    let noise = tokio::spawn(async move {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let truncated_hello = [
            0x16u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x01, 0x00,
        ];
        let stray_app_data = [0x17u8, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4];
        for i in 0..400u32 {
            let garbage: Vec<u8> = (0..(i % 97)).map(|b| (b * 31 + i) as u8).collect();
            for d in [&garbage[..], &truncated_hello[..], &stray_app_data[..]] {
                let _ = sock.send_to(d, addr).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    });
    let out = srv.dir.path().join("ok.der");
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let run = post_csr(Libcoap::Gnutls, &creds, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    noise.await.unwrap();
    assert!(run.payload.is_some(), "{run:?}");
    openssl_verify(&srv.ca_pem(), &der_to_pem(&out).unwrap()).unwrap();
    let m = srv.transport();
    assert!(m.dropped_garbage + m.dropped_unknown_peer > 0, "{m:?}");
    assert_eq!(srv.store().count_certificates().unwrap(), 1);
    srv.stop().await;
}

/// Issue 4's end-to-end bar: a C509 request over DTLS (libcoap posts the bytes with our
/// experimental Content-Format), a C509 answer whose DER equivalent passes openssl verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c509_enrollment_over_dtls_verifies_with_openssl() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNC509"]).unwrap();
    let dev = fleet.join("SNC509");
    let trust = fleet.join("implicit-ta.pem");
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let (_, csr) = openssl_csr(srv.dir.path(), "c509", "/serialNumber=SNC509").unwrap();
    let csr_der = std::fs::read(&csr).unwrap();
    let c509_csr = cbor_schemas::c509::csr_der_to_c509(&csr_der).unwrap();
    assert!(c509_csr.len() < csr_der.len());
    let c509_path = srv.dir.path().join("csr.c509");
    std::fs::write(&c509_path, &c509_csr).unwrap();
    let cert_cf = cbor_schemas::c509::CONTENT_FORMAT_C509_CERT_DEFAULT.to_string();
    let csr_cf = cbor_schemas::c509::CONTENT_FORMAT_C509_PKCS10_DEFAULT.to_string();
    let out = srv.dir.path().join("ldevid.c509");
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &[
            "-m",
            "post",
            "-b",
            "64",
            "-t",
            &csr_cf,
            "-A",
            &cert_cf,
            "-f",
            path_str(&c509_path).unwrap(),
        ],
        &srv.url("sen"),
        Some(&out),
    )
    .await
    .unwrap();
    let body = run
        .payload
        .clone()
        .unwrap_or_else(|| panic!("no C509 answer: {run:?}"));
    // application/cose-c509-cert+cbor (draft -20): the bare C509Certificate array.
    assert_eq!(body[0], 0x8b, "C509Certificate is an array of 11 items");
    let der = cbor_schemas::c509::certificate_c509_to_der(&body).unwrap();
    assert!(
        body.len() < der.len(),
        "C509 {} vs DER {}",
        body.len(),
        der.len()
    );
    let der_path = srv.dir.path().join("ldevid-from-c509.der");
    std::fs::write(&der_path, &der).unwrap();
    openssl_verify(&srv.ca_pem(), &der_to_pem(&der_path).unwrap()).unwrap();
    let stored = srv.store().list_certificates(5).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].der, der, "the store holds the DER equivalent");
    srv.stop().await;
}
