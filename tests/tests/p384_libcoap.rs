//! A P-384 meter (IDevID and CSRs on P-384, made by openssl) enrolls and re-enrolls through
//! libcoap's `coap-client-gnutls` over real UDP + DTLS 1.2 against a server with a P-384
//! issuing CA beside the P-256 one; `openssl verify` accepts what it issued.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};

use est_tests::*;

/// A P-384 IDevID for `serial`, signed (ecdsa-with-SHA384) by the demo manufacturer CA.
fn p384_idevid(srv: &TestServer, work: &Path, serial: &str) -> (PathBuf, PathBuf) {
    let mfr = srv.data_dir.join("manufacturers/demo-manufacturer-ca.pem");
    let mfr_key = srv.data_dir.join("manufacturers/demo-manufacturer-ca.key");
    openssl_idevid(&mfr, &mfr_key, work, serial, "P-384", "").unwrap()
}

/// A P-384 key and its DER CSR; `digest` is openssl's -sha256 / -sha384.
fn p384_csr(work: &Path, name: &str, subject: &str, digest: &str) -> (PathBuf, PathBuf) {
    openssl_csr_on(work, name, "P-384", subject, digest).unwrap()
}

/// A P-384 meter's working directory, IDevID and trust anchor (our P-256 CA, which signed
/// the server's DTLS certificate).
struct Meter {
    work: PathBuf,
    key: PathBuf,
    chain: PathBuf,
    trust: PathBuf,
}

impl Meter {
    fn new(srv: &TestServer, serial: &str) -> Self {
        let work = srv.dir.path().join(format!("work-{serial}"));
        std::fs::create_dir_all(&work).unwrap();
        let (key, chain) = p384_idevid(srv, &work, serial);
        Self {
            work,
            key,
            chain,
            trust: srv.ca_pem(),
        }
    }

    fn creds(&self) -> Creds<'_> {
        Creds {
            cert: &self.chain,
            key: &self.key,
            trust: &self.trust,
        }
    }
}

fn text_of(pem: &Path) -> String {
    openssl(&["x509", "-in", path_str(pem).unwrap(), "-noout", "-text"]).unwrap()
}

async fn post(creds: &Creds<'_>, url: &str, csr: &Path, out: &Path) -> CoapRun {
    post_csr(Libcoap::Gnutls, creds, url, csr, out)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p384_meter_enrolls_and_reenrolls_through_libcoap() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start_p384(|_| {}).await.expect("server");
    let serial = "SNP384A";
    let m = Meter::new(&srv, serial);
    let (work, trust, creds) = (&m.work, &m.trust, m.creds());
    let p384_ca = srv.data_dir.join("ca/issuing-ca-p384.pem");
    assert!(text_of(&p384_ca).contains("ecdsa-with-SHA384"));

    // /sen with a P-384 key, CSR signed ecdsa-with-SHA384.
    let (ldevid_key, csr) = p384_csr(
        work,
        "ldevid",
        &format!("/serialNumber={serial}"),
        "-sha384",
    );
    let ldevid_der = work.join("ldevid.der");
    let ldevid_pem = enroll_csr(Libcoap::Gnutls, &creds, &srv.url("sen"), &csr, &ldevid_der)
        .await
        .unwrap();
    openssl_verify(&p384_ca, &ldevid_pem).expect("openssl verifies the P-384 LDevID");
    assert!(
        openssl_verify(&srv.ca_pem(), &ldevid_pem).is_err(),
        "the P-256 CA must not verify a P-384 CA's certificate"
    );
    let text = text_of(&ldevid_pem);
    assert!(
        text.contains("Signature Algorithm: ecdsa-with-SHA384"),
        "{text}"
    );
    assert!(text.contains("NIST CURVE: P-384"), "{text}");
    assert!(text.contains("EST Issuing CA P-384"), "{text}");
    assert!(text.contains(&format!("serialNumber = {serial}")), "{text}");
    assert!(same_public_key(&ldevid_pem, &ldevid_key).unwrap());

    // /sren authenticated by the P-384 LDevID (DTLS client certificate on P-384), a P-384
    // CSR signed ecdsa-with-SHA256 this time.
    let subject = cert_subject(&ldevid_pem).unwrap();
    let (_, csr2) = p384_csr(work, "renew", &subject, "-sha256");
    let creds2 = Creds {
        cert: &ldevid_pem,
        key: &ldevid_key,
        trust,
    };
    let renewed_der = work.join("renewed.der");
    let renewed_pem = enroll_csr(
        Libcoap::Gnutls,
        &creds2,
        &srv.url("sren"),
        &csr2,
        &renewed_der,
    )
    .await
    .unwrap();
    openssl_verify(&p384_ca, &renewed_pem).expect("renewed P-384 certificate verifies");
    assert!(text_of(&renewed_pem).contains("ecdsa-with-SHA384"));

    // /crts lists both CAs.
    let p7 = work.join("crts.p7");
    let (_, listed) = crts_pkcs7(Libcoap::Gnutls, &creds2, &srv.url("crts"), &p7)
        .await
        .unwrap();
    assert!(
        listed.matches("subject=").count() == 2 && listed.contains("CN = EST Issuing CA P-384"),
        "{listed}"
    );

    // The store: the renewal superseded the first.
    let certs = srv.store().list_certificates(10).unwrap();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert_eq!(certs[0].status.as_str(), "active");
    assert_eq!(certs[1].status.as_str(), "superseded");
    srv.stop().await;
}

/// Without a P-384 CA, a P-384 CSR is refused with 4.00 (and nothing is issued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p384_csr_without_a_p384_ca_is_refused() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.expect("server");
    let serial = "SNP384B";
    let m = Meter::new(&srv, serial);
    let (work, creds) = (&m.work, m.creds());
    let (_, csr) = p384_csr(
        work,
        "ldevid",
        &format!("/serialNumber={serial}"),
        "-sha384",
    );
    let run = post(&creds, &srv.url("sen"), &csr, &work.join("none.der")).await;
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    assert!(srv.store().list_certificates(10).unwrap().is_empty());
    srv.stop().await;
}

/// Each issuing CA publishes its own CRL: a revoked P-384 certificate is listed in the CRL
/// the P-384 CA signs (`openssl crl -verify` accepts it against that CA only, `openssl verify
/// -crl_check` rejects the certificate), not in the P-256 CA's, whose live certificate still
/// verifies with its CRL; the CoAP resource `/crl-p384` serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_p384_certificate_is_in_the_p384_cas_own_crl() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start_p384(|_| {}).await.expect("server");
    let serial = "SNP384R";
    let m = Meter::new(&srv, serial);
    let (work, creds) = (&m.work, m.creds());
    let p384_ca = srv.data_dir.join("ca/issuing-ca-p384.pem");
    let (_, csr) = p384_csr(
        work,
        "ldevid",
        &format!("/serialNumber={serial}"),
        "-sha384",
    );
    let der = work.join("ldevid.der");
    let run = post(&creds, &srv.url("sen"), &csr, &der).await;
    assert!(run.payload.is_some(), "{run:?}");
    let p384_ldevid = der_to_pem(&der).unwrap();

    // A P-256 meter's certificate, which stays live.
    let fleet = srv.mint(&["SNP256L"]).unwrap();
    let dev = fleet.join("SNP256L");
    let p256_creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &m.trust,
    };
    let (_, csr) = openssl_csr(work, "p256", "/serialNumber=SNP256L").unwrap();
    let der = work.join("p256.der");
    let run = post(&p256_creds, &srv.url("sen"), &csr, &der).await;
    assert!(run.payload.is_some(), "{run:?}");
    let p256_ldevid = der_to_pem(&der).unwrap();

    let certs = srv.store().list_certificates(10).unwrap();
    let revoked = certs.iter().find(|c| c.device_id == serial).unwrap();
    let cfg = est_server::datadir::load_config(&srv.data_dir, None).unwrap();
    est_server::revocation::revoke_certificate(
        &srv.data_dir,
        &cfg,
        &revoked.serial_hex,
        est_proto::store::RevocationReason::KeyCompromise,
        std::time::SystemTime::now(),
    )
    .unwrap();

    let p384_crl = srv.data_dir.join("crl/issuing-ca-p384.crl.pem");
    let p256_crl = srv.data_dir.join("crl/issuing-ca.crl.pem");
    let text = openssl(&[
        "crl",
        "-in",
        path_str(&p384_crl).unwrap(),
        "-CAfile",
        path_str(&p384_ca).unwrap(),
        "-verify",
        "-noout",
        "-text",
    ])
    .expect("the P-384 CA's CRL verifies against it");
    assert!(
        text.to_ascii_lowercase().contains(&revoked.serial_hex),
        "{text}"
    );
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains("ecdsa-with-SHA384"), "{text}");
    assert!(text.contains("CN = EST Issuing CA P-384"), "{text}");
    assert!(
        openssl(&[
            "crl",
            "-in",
            path_str(&p384_crl).unwrap(),
            "-CAfile",
            path_str(&srv.ca_pem()).unwrap(),
            "-verify",
            "-noout",
        ])
        .is_err(),
        "the P-256 CA did not sign the P-384 CA's CRL"
    );
    let p256_text = openssl(&[
        "crl",
        "-in",
        path_str(&p256_crl).unwrap(),
        "-CAfile",
        path_str(&srv.ca_pem()).unwrap(),
        "-verify",
        "-noout",
        "-text",
    ])
    .unwrap();
    assert!(
        !p256_text.to_ascii_lowercase().contains(&revoked.serial_hex),
        "the P-256 CA's CRL must not list the P-384 CA's certificate: {p256_text}"
    );
    let crl_check = |ca: &Path, crl: &Path, cert: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            path_str(ca).unwrap(),
            "-CRLfile",
            path_str(crl).unwrap(),
            path_str(cert).unwrap(),
        ])
    };
    let e = crl_check(&p384_ca, &p384_crl, &p384_ldevid).unwrap_err();
    assert!(format!("{e:#}").contains("certificate revoked"), "{e:#}");
    crl_check(&srv.ca_pem(), &p256_crl, &p256_ldevid).expect("the live P-256 certificate");

    // Over CoAP, once the server has polled: the same bytes as the file.
    srv.running().poll_revocations().await.unwrap();
    let got = work.join("p384.crl");
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&p256_creds),
        &["-m", "get", "-A", "65005"],
        &srv.url_at("crl-p384"),
        Some(&got),
    )
    .await
    .unwrap();
    let file = std::fs::read(srv.data_dir.join("crl/issuing-ca-p384.crl")).unwrap();
    assert_eq!(run.payload.as_deref(), Some(file.as_slice()), "{run:?}");
    srv.stop().await;
}

/// Each issuing CA's certificates point at that CA's own CRL: with
/// `[revocation] distribution_points` and `distribution_points_p384` set, a P-384 LDevID
/// carries the P-384 CRL's URIs and a P-256 one the P-256 CRL's (`openssl x509 -text`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cas_certificates_point_at_its_own_crl() {
    if !require_tools() {
        return;
    }
    const P256_CDP: &str = "coaps://est.example.net/crl";
    const P384_CDP: &str = "coaps://est.example.net/crl-p384";
    const P384_CDP_HTTP: &str = "http://pki.example.net/est-p384.crl";
    let srv = TestServer::start_p384(|c| {
        c.revocation.distribution_points = vec![P256_CDP.into()];
        c.revocation.distribution_points_p384 = vec![P384_CDP.into(), P384_CDP_HTTP.into()];
    })
    .await
    .expect("server");
    let serial = "SNP384C";
    let m = Meter::new(&srv, serial);
    let (work, creds) = (&m.work, m.creds());
    let (_, csr) = p384_csr(
        work,
        "ldevid",
        &format!("/serialNumber={serial}"),
        "-sha384",
    );
    let p384_ldevid = enroll_csr(
        Libcoap::Gnutls,
        &creds,
        &srv.url("sen"),
        &csr,
        &work.join("p384.der"),
    )
    .await
    .unwrap();
    openssl_verify(&srv.data_dir.join("ca/issuing-ca-p384.pem"), &p384_ldevid).unwrap();
    let t = text_of(&p384_ldevid);
    assert!(t.contains("X509v3 CRL Distribution Points"), "{t}");
    assert!(t.contains(&format!("URI:{P384_CDP}\n")), "{t}");
    assert!(t.contains(&format!("URI:{P384_CDP_HTTP}\n")), "{t}");
    assert!(!t.contains(&format!("URI:{P256_CDP}\n")), "{t}");

    let fleet = srv.mint(&["SNP256C"]).unwrap();
    let dev = fleet.join("SNP256C");
    let p256_creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &m.trust,
    };
    let (_, csr) = openssl_csr(work, "p256", "/serialNumber=SNP256C").unwrap();
    let p256_ldevid = enroll_csr(
        Libcoap::Gnutls,
        &p256_creds,
        &srv.url("sen"),
        &csr,
        &work.join("p256.der"),
    )
    .await
    .unwrap();
    openssl_verify(&srv.ca_pem(), &p256_ldevid).unwrap();
    let t = text_of(&p256_ldevid);
    assert!(t.contains("X509v3 CRL Distribution Points"), "{t}");
    assert!(t.contains(&format!("URI:{P256_CDP}\n")), "{t}");
    assert!(!t.contains("crl-p384") && !t.contains(P384_CDP_HTTP), "{t}");

    // The P-384 list defaults to [] (no extension), whatever the P-256 one says.
    let srv = srv
        .restart(|c| c.revocation.distribution_points_p384 = Vec::new())
        .await
        .expect("restart");
    let (_, csr) = p384_csr(work, "again", &format!("/serialNumber={serial}"), "-sha384");
    let again = enroll_csr(
        Libcoap::Gnutls,
        &creds,
        &srv.url("sen"),
        &csr,
        &work.join("again.der"),
    )
    .await
    .unwrap();
    let t = text_of(&again);
    assert!(!t.contains("CRL Distribution Points"), "{t}");
    assert_eq!(
        est_server::config::RevocationSection::default().distribution_points_p384,
        Vec::<String>::new()
    );
    srv.stop().await;
}
