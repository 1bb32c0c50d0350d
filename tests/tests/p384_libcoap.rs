//! A P-384 meter (IDevID and CSRs on P-384, made by openssl) enrolls and re-enrolls through
//! libcoap's `coap-client-gnutls` over real UDP + DTLS 1.2 against a server with a P-384
//! issuing CA beside the P-256 one; `openssl verify` accepts what it issued.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use est_tests::*;

/// A P-384 IDevID for `serial`, signed (ecdsa-with-SHA384) by the demo manufacturer CA, made
/// with openssl only. Returns (key, chain PEM = IDevID + manufacturer CA).
fn p384_idevid(srv: &TestServer, work: &Path, serial: &str) -> (PathBuf, PathBuf) {
    let mfr = srv.data_dir.join("manufacturers/demo-manufacturer-ca.pem");
    let mfr_key = srv.data_dir.join("manufacturers/demo-manufacturer-ca.key");
    let key = work.join("idevid.key");
    let csr = work.join("idevid.csr");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        "-keyout",
        path_str(&key).unwrap(),
        "-subj",
        &format!("/CN={serial}/serialNumber={serial}"),
        "-out",
        path_str(&csr).unwrap(),
    ])
    .unwrap();
    let ext = work.join("idevid.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    )
    .unwrap();
    let cert = work.join("idevid.pem");
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr).unwrap(),
        "-CA",
        path_str(&mfr).unwrap(),
        "-CAkey",
        path_str(&mfr_key).unwrap(),
        "-set_serial",
        "0x1384",
        "-days",
        "3650",
        "-sha384",
        "-extfile",
        path_str(&ext).unwrap(),
        "-out",
        path_str(&cert).unwrap(),
    ])
    .unwrap();
    let chain = work.join("idevid-chain.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&mfr).unwrap());
    std::fs::write(&chain, pem).unwrap();
    (key, chain)
}

/// A P-384 key and its DER CSR; `digest` is openssl's -sha256 / -sha384.
fn p384_csr(work: &Path, name: &str, subject: &str, digest: &str) -> (PathBuf, PathBuf) {
    let key = work.join(format!("{name}.key"));
    let csr = work.join(format!("{name}.csr.der"));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        digest,
        "-keyout",
        path_str(&key).unwrap(),
        "-subj",
        subject,
        "-outform",
        "DER",
        "-out",
        path_str(&csr).unwrap(),
    ])
    .unwrap();
    (key, csr)
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
