//! The `dlms` certificate profile over the real path (libcoap `coap-client-gnutls`, UDP, DTLS
//! 1.2, CoAP, EST): a meter selected by a `[[dlms.rules]]` rule gets a signing and a
//! key-agreement certificate from two CSRs, both active, checked field by field with
//! `openssl x509 -text`; a P-384 key-agreement CSR gets a P-384 certificate signed
//! ecdsa-with-SHA384 that replaces only the key-agreement one. Refusals: a CSR without
//! keyUsage (4.00) and a serial that makes no system title (4.03).
//!
//! On PostgreSQL (`[storage] backend = "postgres"`, a throwaway cluster from est-test-tools):
//! the same meter's two certificates are both active in the database, a second node sees them
//! with their slots, a retry on the second node gets the first node's certificate back, and a
//! new key-agreement certificate issued by the second node supersedes only that slot.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};

use est_server::dlms_config::DlmsRuleSection;
use est_tests::*;

fn with_rule(c: &mut est_server::config::Config) {
    c.dlms.rules = vec![
        DlmsRuleSection {
            serial_prefix: "ABC".into(),
            flag_id: "ABC".into(),
            curve: String::new(),
        },
        // Suite 2 only.
        DlmsRuleSection {
            serial_prefix: "XYZ".into(),
            flag_id: "XYZ".into(),
            curve: "P-384".into(),
        },
    ];
}

/// A DER CSR for a fresh key on `curve` with subject `/serialNumber=<serial>`, requesting
/// keyUsage `ku` (none when empty).
fn csr(work: &Path, name: &str, serial: &str, curve: &str, ku: &str) -> PathBuf {
    let key = work.join(format!("{name}.key"));
    let out = work.join(format!("{name}.csr.der"));
    let subj = format!("/serialNumber={serial}");
    let curve_opt = format!("ec_paramgen_curve:{curve}");
    let ku_opt = format!("keyUsage=critical,{ku}");
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        &curve_opt,
        "-nodes",
        "-keyout",
        path_str(&key).unwrap(),
        "-subj",
        &subj,
        "-outform",
        "DER",
        "-out",
        path_str(&out).unwrap(),
    ];
    if !ku.is_empty() {
        args.extend(["-addext", &ku_opt]);
    }
    openssl(&args).unwrap();
    out
}

struct Device {
    work: PathBuf,
    chain: PathBuf,
    key: PathBuf,
    trust: PathBuf,
}

impl Device {
    fn new(srv: &TestServer, serial: &str) -> Self {
        let fleet = srv.mint(&[serial]).unwrap();
        let dev = fleet.join(serial);
        let work = srv.dir.path().join(format!("work-{serial}"));
        std::fs::create_dir_all(&work).unwrap();
        Self {
            work,
            chain: dev.join("idevid-chain.pem"),
            key: dev.join("idevid.key"),
            trust: fleet.join("implicit-ta.pem"),
        }
    }

    /// POST /sen with `csr`; (the run, the certificate's `openssl x509 -text` if any).
    async fn sen(&self, srv: &TestServer, csr: &Path, name: &str) -> (CoapRun, Option<String>) {
        self.sen_at(&srv.url("sen"), csr, name).await
    }

    /// [`Self::sen`] to the node at `url` (its /sen); the certificate is left in `<name>.der`.
    async fn sen_at(&self, url: &str, csr: &Path, name: &str) -> (CoapRun, Option<String>) {
        let creds = Creds {
            cert: &self.chain,
            key: &self.key,
            trust: &self.trust,
        };
        let der = self.work.join(format!("{name}.der"));
        let run = post_csr(Libcoap::Gnutls, &creds, url, csr, &der)
            .await
            .unwrap();
        if run
            .payload
            .as_ref()
            .is_none_or(|p| p.first() != Some(&0x30))
        {
            return (run, None);
        }
        let pem = der_to_pem(&der).unwrap();
        let text = openssl(&["x509", "-in", path_str(&pem).unwrap(), "-noout", "-text"]).unwrap();
        (run, Some(text))
    }
}

/// The text of the extension `name` in `openssl x509 -text` (the line after its header).
fn ext_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = text.lines();
    lines.find(|l| l.trim_start().starts_with(name))?;
    lines.next().map(str::trim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlms_signing_and_key_agreement_certificates_field_by_field() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start_p384(with_rule).await.expect("server");
    let serial = "ABC0000012345";
    let d = Device::new(&srv, serial);

    let sign_csr = csr(&d.work, "sign", serial, "P-256", "digitalSignature");
    let (run, sign) = d.sen(&srv, &sign_csr, "sign").await;
    let sign = sign.unwrap_or_else(|| panic!("{run:?}"));
    let ka_csr = csr(&d.work, "ka", serial, "P-256", "keyAgreement");
    let (run, ka) = d.sen(&srv, &ka_csr, "ka").await;
    let ka = ka.unwrap_or_else(|| panic!("{run:?}"));

    // 0x414243 = "ABC", 12345 = 0x3039 in 5 octets.
    for (text, usage) in [(&sign, "Digital Signature"), (&ka, "Key Agreement")] {
        assert!(
            text.contains("Subject: CN = 4142430000003039, serialNumber = ABC0000012345"),
            "{text}"
        );
        assert!(
            text.contains("Signature Algorithm: ecdsa-with-SHA256"),
            "{text}"
        );
        assert!(text.contains("NIST CURVE: P-256"), "{text}");
        assert_eq!(
            ext_value(text, "X509v3 Key Usage: critical"),
            Some(usage),
            "{text}"
        );
        assert!(!text.contains("Extended Key Usage"), "{text}");
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(
            text.contains("Issuer: O = est-server, CN = EST Issuing CA\n"),
            "{text}"
        );
    }
    let certs = srv.store().list_certificates(10).unwrap();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert!(
        certs.iter().all(|c| c.status.as_str() == "active"),
        "{certs:?}"
    );
    let mut slots: Vec<&str> = certs.iter().map(|c| c.slot.as_str()).collect();
    slots.sort_unstable();
    assert_eq!(slots, ["dlms-key-agreement", "dlms-signing"]);

    // Suite 2: a P-384 key-agreement CSR, issued by the P-384 CA with SHA-384; it replaces
    // the key-agreement certificate only.
    let ka384_csr = csr(&d.work, "ka384", serial, "P-384", "keyAgreement");
    let (run, ka384) = d.sen(&srv, &ka384_csr, "ka384").await;
    let ka384 = ka384.unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        ka384.contains("Signature Algorithm: ecdsa-with-SHA384"),
        "{ka384}"
    );
    assert!(ka384.contains("NIST CURVE: P-384"), "{ka384}");
    assert!(ka384.contains("CN = EST Issuing CA P-384"), "{ka384}");
    assert_eq!(
        ext_value(&ka384, "X509v3 Key Usage: critical"),
        Some("Key Agreement")
    );
    openssl_verify(
        &srv.data_dir.join("ca/issuing-ca-p384.pem"),
        &d.work.join("ka384.pem"),
    )
    .unwrap();
    openssl_verify(&srv.ca_pem(), &d.work.join("sign.pem")).unwrap();
    let certs = srv.store().list_certificates(10).unwrap();
    let active: Vec<&str> = certs
        .iter()
        .filter(|c| c.status.as_str() == "active")
        .map(|c| c.slot.as_str())
        .collect();
    assert_eq!(active.len(), 2, "{certs:?}");
    assert_eq!(
        certs
            .iter()
            .filter(|c| c.status.as_str() == "superseded")
            .count(),
        1
    );

    // A TLS CSR (both usages): EKU clientAuth + serverAuth.
    let tls_csr = csr(
        &d.work,
        "tls",
        serial,
        "P-256",
        "digitalSignature,keyAgreement",
    );
    let (run, tls) = d.sen(&srv, &tls_csr, "tls").await;
    let tls = tls.unwrap_or_else(|| panic!("{run:?}"));
    assert_eq!(
        ext_value(&tls, "X509v3 Key Usage: critical"),
        Some("Digital Signature, Key Agreement")
    );
    assert_eq!(
        ext_value(&tls, "X509v3 Extended Key Usage"),
        Some("TLS Web Client Authentication, TLS Web Server Authentication")
    );

    // No keyUsage requested: 4.00.
    let none_csr = csr(&d.work, "none", serial, "P-256", "");
    let (run, cert) = d.sen(&srv, &none_csr, "none").await;
    assert!(cert.is_none());
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    // keyCertSign requested: 4.00.
    let bad_csr = csr(&d.work, "bad", serial, "P-256", "keyCertSign");
    let (run, _) = d.sen(&srv, &bad_csr, "bad").await;
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");

    // A serial the rule selects but that makes no system title: 4.03, nothing issued.
    let odd = Device::new(&srv, "ABC12X");
    let odd_csr = csr(&odd.work, "odd", "ABC12X", "P-256", "digitalSignature");
    let (run, cert) = odd.sen(&srv, &odd_csr, "odd").await;
    assert!(cert.is_none());
    assert_eq!(run.error_code(), Some("4.03"), "{run:?}");
    assert!(srv
        .store()
        .list_certificates(20)
        .unwrap()
        .iter()
        .all(|c| c.device_id != "ABC12X"));

    // A suite-2 device class: a P-256 CSR is refused (4.00), a P-384 one accepted.
    let s2 = Device::new(&srv, "XYZ7");
    let p256_csr = csr(&s2.work, "p256", "XYZ7", "P-256", "digitalSignature");
    let (run, cert) = s2.sen(&srv, &p256_csr, "p256").await;
    assert!(cert.is_none());
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    let p384_csr = csr(&s2.work, "p384", "XYZ7", "P-384", "digitalSignature");
    let (run, text) = s2.sen(&srv, &p384_csr, "p384").await;
    let text = text.unwrap_or_else(|| panic!("{run:?}"));
    // "XYZ" = 58 59 5A, 7 in 5 octets.
    assert!(
        text.contains("Subject: CN = 58595A0000000007, serialNumber = XYZ7"),
        "{text}"
    );
    assert!(text.contains("ecdsa-with-SHA384"), "{text}");

    // A device no rule selects still gets today's LDevID.
    let plain = Device::new(&srv, "SNPLAIN1");
    let plain_csr = csr(&plain.work, "plain", "SNPLAIN1", "P-256", "");
    let (run, text) = plain.sen(&srv, &plain_csr, "plain").await;
    let text = text.unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        text.contains("Subject: CN = SNPLAIN1, serialNumber = SNPLAIN1"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    srv.stop().await;
}

/// The DLMS profile on PostgreSQL, over two nodes of one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlms_certificate_slots_on_postgres_across_two_nodes() {
    if !require_tools() {
        return;
    }
    let Some(pg) = est_test_tools::pg::TestPostgres::start_or_skip(
        "dlms_certificate_slots_on_postgres_across_two_nodes",
    ) else {
        return;
    };
    let url = pg.create_database("dlms").unwrap();
    let srv = TestServer::start(move |c| {
        with_rule(c);
        c.storage.backend = "postgres".into();
        c.storage.url = url;
        c.storage.pool_size = 4;
    })
    .await
    .expect("node A on PostgreSQL with [[dlms.rules]]");
    assert_eq!(srv.store().backend_name(), "postgres");
    let b = srv.start_another_node().await.expect("node B");
    let url_b = format!("coaps://{}/.well-known/est/sen", b.local_addr);
    let serial = "ABC0000054321";
    let d = Device::new(&srv, serial);

    // Node A issues the signing and the key-agreement certificate.
    let sign_csr = csr(&d.work, "sign", serial, "P-256", "digitalSignature");
    let (run, sign) = d.sen(&srv, &sign_csr, "sign").await;
    let sign = sign.unwrap_or_else(|| panic!("{run:?}"));
    assert_eq!(
        ext_value(&sign, "X509v3 Key Usage: critical"),
        Some("Digital Signature")
    );
    let ka_csr = csr(&d.work, "ka", serial, "P-256", "keyAgreement");
    let (run, ka) = d.sen(&srv, &ka_csr, "ka").await;
    let ka = ka.unwrap_or_else(|| panic!("{run:?}"));
    assert_eq!(
        ext_value(&ka, "X509v3 Key Usage: critical"),
        Some("Key Agreement")
    );
    openssl_verify(&srv.ca_pem(), &d.work.join("sign.pem")).unwrap();
    openssl_verify(&srv.ca_pem(), &d.work.join("ka.pem")).unwrap();

    // Both active in PostgreSQL, each in its slot.
    let rows = |sql: &str| pg.psql("dlms", sql).unwrap();
    let by_slot = format!(
        "SELECT slot || ' ' || status FROM certificates WHERE device_id = '{serial}' ORDER BY slot, issued_at, seq"
    );
    assert_eq!(
        rows(&by_slot),
        "dlms-key-agreement active\ndlms-signing active"
    );

    // Node B sees them, slots included.
    let seen: Vec<(String, String)> = {
        let mut v: Vec<(String, String)> = b
            .store
            .list_certificates(10)
            .unwrap()
            .into_iter()
            .filter(|c| c.device_id == serial)
            .map(|c| (c.slot, c.status.as_str().to_owned()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        seen,
        [
            ("dlms-key-agreement".to_owned(), "active".to_owned()),
            ("dlms-signing".to_owned(), "active".to_owned())
        ]
    );

    // The meter retries its signing CSR on node B: the same certificate, nothing new.
    let (run, again) = d.sen_at(&url_b, &sign_csr, "sign-again").await;
    assert_eq!(again.unwrap_or_else(|| panic!("{run:?}")), sign);
    assert_eq!(
        std::fs::read(d.work.join("sign-again.der")).unwrap(),
        std::fs::read(d.work.join("sign.der")).unwrap()
    );
    assert_eq!(
        rows(&format!(
            "SELECT count(*) FROM certificates WHERE device_id = '{serial}'"
        )),
        "2"
    );

    // A new key-agreement key, enrolled on node B: it supersedes the key-agreement
    // certificate only; the signing one stays active.
    let ka2_csr = csr(&d.work, "ka2", serial, "P-256", "keyAgreement");
    let (run, ka2) = d.sen_at(&url_b, &ka2_csr, "ka2").await;
    let ka2 = ka2.unwrap_or_else(|| panic!("{run:?}"));
    assert_eq!(
        ext_value(&ka2, "X509v3 Key Usage: critical"),
        Some("Key Agreement")
    );
    assert_eq!(
        rows(&by_slot),
        "dlms-key-agreement superseded\ndlms-key-agreement active\ndlms-signing active"
    );
    // One active certificate per slot, whatever node issued it.
    assert_eq!(
        rows(&format!(
            "SELECT count(*) FROM certificates WHERE device_id = '{serial}' AND status = 'active' GROUP BY slot HAVING count(*) > 1"
        )),
        ""
    );
    b.shutdown().await;
    srv.stop().await;
}
