//! Certificate profiles (`[[profiles]]`) end to end: meters enroll through libcoap over real
//! UDP + DTLS 1.2 + CoAP, and `openssl x509 -text` shows what the profile chosen for them
//! says (validity, keyUsage, extKeyUsage, subject, subjectAltName, signature).
//!
//! * `vendor-a`, chosen by manufacturer CA A (the demo manufacturer, named by its file):
//!   P-256 only, SHA-256, 30 days, digitalSignature|keyAgreement, clientAuth+serverAuth, a
//!   fixed O/OU with CN from the IDevID, no SAN.
//! * `vendor-b`, chosen by manufacturer CA B (a P-384 maker CA made here with openssl, named by
//!   its SHA-256 fingerprint as openssl prints it): P-384 only, SHA-384 (the P-384 CA),
//!   90 days, digitalSignature, no EKU, CN from the CSR, SAN from the IDevID.
//! * `gateways`, chosen by device class (serial prefix "GW", listed first, so it wins over
//!   vendor-a for a maker-A gateway) and therefore also at /sren: 10 days, no EKU.
//!
//! And the refusals: a CSR on a curve its profile does not accept gets 4.00 with a diagnostic
//! naming the profile, and nothing is stored.
//!
//! At /sren a meter keeps the profile its certificate was issued under (stored with it), also
//! one chosen by manufacturer CA, which its LDevID no longer shows; when that profile has been
//! removed from the configuration the renewal is refused with 4.03.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};

use est_tests::*;

/// Maker B: a self-signed P-384 manufacturer CA in the data directory.
fn maker_b(data_dir: &Path) -> anyhow::Result<()> {
    est_test_tools::openssl::self_signed(
        &data_dir.join("manufacturers"),
        "maker-b",
        "P-384",
        "/O=Maker B/CN=Maker B IDevID CA",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
    .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// A P-384 IDevID for `serial` with a hardwareModuleName, signed by maker B. Returns (key,
/// chain PEM = IDevID + maker B CA).
fn maker_b_idevid(data_dir: &Path, work: &Path, serial: &str) -> (PathBuf, PathBuf) {
    let ca = data_dir.join("manufacturers/maker-b.pem");
    let ca_key = data_dir.join("manufacturers/maker-b.key");
    let san = format!(
        "subjectAltName=otherName:1.3.6.1.5.5.7.8.4;SEQUENCE:hwmod\n\
         [hwmod]\nhwType=OID:1.3.6.1.4.1.99999.42\nhwSerialNum=OCTETSTRING:{serial}\n"
    );
    openssl_idevid(&ca, &ca_key, work, serial, "P-384", &san).unwrap()
}

/// A key on `curve` and its DER CSR for `subject`.
fn csr_on(work: &Path, name: &str, curve: &str, subject: &str) -> (PathBuf, PathBuf) {
    openssl_csr_on(work, name, curve, subject, "-sha256").unwrap()
}

fn profiles_toml(maker_b_fingerprint: &str) -> String {
    format!(
        r#"
[ca_p384]
enabled = true

[[profiles]]
name = "gateways"
validity_days = 10
extended_key_usage = ["none"]
subject = ["O=Utility", "CN=gw-{{idevid.serialNumber}}", "serialNumber={{idevid.serialNumber}}"]
[[profiles.select]]
serial_prefix = "GW"

[[profiles]]
name = "vendor-a"
curves = ["P-256"]
signature_hash = "SHA-256"
validity_days = 30
key_usage = ["digitalSignature", "keyAgreement"]
extended_key_usage = ["clientAuth", "serverAuth"]
subject = ["O=Utility A", "OU=Meters", "CN=A-{{idevid.serialNumber}}", "serialNumber={{idevid.serialNumber}}"]
san = "none"
[[profiles.select]]
manufacturer_ca = "manufacturers/demo-manufacturer-ca.pem"

[[profiles]]
name = "vendor-b"
curves = ["P-384"]
signature_hash = "SHA-384"
validity_days = 90
key_usage = ["digitalSignature"]
extended_key_usage = ["none"]
subject = ["O=Utility B", "CN={{csr.CN}}", "serialNumber={{idevid.serialNumber}}"]
san = "idevid"
[[profiles.select]]
manufacturer_ca = "sha256:{maker_b_fingerprint}"
"#
    )
}

fn text_of(pem: &Path) -> String {
    openssl(&["x509", "-in", path_str(pem).unwrap(), "-noout", "-text"]).unwrap()
}

/// `openssl x509 -checkend`: whether the certificate is still valid `days` from now.
fn valid_in_days(pem: &Path, days: u64) -> bool {
    openssl(&[
        "x509",
        "-in",
        path_str(pem).unwrap(),
        "-noout",
        "-checkend",
        &(days * 86_400).to_string(),
    ])
    .is_ok()
}

fn assert_issued(run: &CoapRun) {
    assert!(
        run.payload
            .as_ref()
            .is_some_and(|p| p.first() == Some(&0x30)),
        "{run:?}"
    );
}

/// A server with the P-384 CA, maker B trusted and the profiles of [`profiles_toml`].
async fn start_with_profiles() -> TestServer {
    let srv = TestServer::start_with(
        |d| {
            est_server::p384::create(d, std::time::SystemTime::now())?;
            maker_b(d)
        },
        |_| {},
    )
    .await
    .expect("server");
    // Restart with maker B trusted and the profiles configured (the fingerprint is openssl's).
    let fp = openssl(&[
        "x509",
        "-in",
        path_str(&srv.data_dir.join("manufacturers/maker-b.pem")).unwrap(),
        "-noout",
        "-fingerprint",
        "-sha256",
    ])
    .unwrap();
    let fp = fp.trim().rsplit('=').next().unwrap().to_string();
    let text = profiles_toml(&fp);
    let extra = est_server::config::Config::parse(&text, Path::new("profiles.toml")).unwrap();
    srv.restart(|c| {
        c.pki
            .manufacturer_cas
            .push("manufacturers/maker-b.pem".into());
        c.ca_p384 = extra.ca_p384.clone();
        c.profiles = extra.profiles.clone();
    })
    .await
    .expect("restart with profiles")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_chosen_by_manufacturer_ca_and_device_class() {
    if !require_tools() {
        return;
    }
    let srv = start_with_profiles().await;
    let p384_ca = srv.data_dir.join("ca/issuing-ca-p384.pem");
    let fleet = srv.mint(&["SNA1", "GW7"]).unwrap();
    let trust = fleet.join("implicit-ta.pem");
    let work = srv.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // --- Maker A's meter: vendor-a.
    let dev = fleet.join("SNA1");
    let creds_a = Creds {
        cert: &dev.join("idevid.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    // A P-384 CSR: vendor-a accepts P-256 only. 4.00 with a diagnostic, nothing stored.
    let (_, csr) = csr_on(&work, "a384", "P-384", "/serialNumber=SNA1");
    let run = post_csr(
        Libcoap::Openssl,
        &creds_a,
        &srv.url("sen"),
        &csr,
        &work.join("x.der"),
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    assert!(
        run.stderr.contains("vendor-a") && run.stderr.contains("P-256"),
        "diagnostic: {run:?}"
    );
    assert!(srv.store().list_certificates(10).unwrap().is_empty());

    let (key_a, csr) = csr_on(&work, "a", "P-256", "/CN=whatever/serialNumber=SNA1");
    let out = work.join("a.der");
    let run = post_csr(Libcoap::Openssl, &creds_a, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let a = der_to_pem(&out).unwrap();
    openssl_verify(&srv.ca_pem(), &a).expect("the P-256 CA signed it");
    assert!(same_public_key(&a, &key_a).unwrap());
    let t = text_of(&a);
    assert!(t.contains("Signature Algorithm: ecdsa-with-SHA256"), "{t}");
    assert!(
        t.contains("Subject: O = Utility A, OU = Meters, CN = A-SNA1, serialNumber = SNA1"),
        "{t}"
    );
    assert!(t.contains("Digital Signature, Key Agreement"), "{t}");
    assert!(
        t.contains("TLS Web Client Authentication, TLS Web Server Authentication"),
        "{t}"
    );
    // The minted IDevID has a hardwareModuleName; san = "none" leaves it out.
    assert!(!t.contains("Subject Alternative Name"), "{t}");
    assert!(valid_in_days(&a, 29) && !valid_in_days(&a, 31), "{t}");

    // --- Maker B's P-384 meter: vendor-b.
    let work_b = work.join("b");
    std::fs::create_dir_all(&work_b).unwrap();
    let (idevid_key, chain) = maker_b_idevid(&srv.data_dir, &work_b, "SNB1");
    let creds_b = Creds {
        cert: &chain,
        key: &idevid_key,
        trust: &trust,
    };
    let (_, csr) = csr_on(&work_b, "b256", "P-256", "/CN=kitchen/serialNumber=SNB1");
    let run = post_csr(
        Libcoap::Gnutls,
        &creds_b,
        &srv.url("sen"),
        &csr,
        &work_b.join("x.der"),
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    assert!(
        run.stderr.contains("vendor-b") && run.stderr.contains("P-384"),
        "diagnostic: {run:?}"
    );
    // A CSR without the CN the subject template takes from it.
    let (_, csr) = csr_on(&work_b, "nocn", "P-384", "/serialNumber=SNB1");
    let run = post_csr(
        Libcoap::Gnutls,
        &creds_b,
        &srv.url("sen"),
        &csr,
        &work_b.join("x.der"),
    )
    .await
    .unwrap();
    assert_eq!(run.error_code(), Some("4.00"), "{run:?}");
    assert!(run.stderr.contains("CN"), "diagnostic: {run:?}");
    assert_eq!(srv.store().list_certificates(10).unwrap().len(), 1);

    let (key_b, csr) = csr_on(&work_b, "b", "P-384", "/CN=kitchen/serialNumber=SNB1");
    let out = work_b.join("b.der");
    let run = post_csr(Libcoap::Gnutls, &creds_b, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let b = der_to_pem(&out).unwrap();
    openssl_verify(&p384_ca, &b).expect("the P-384 CA signed it");
    assert!(same_public_key(&b, &key_b).unwrap());
    let t = text_of(&b);
    assert!(t.contains("Signature Algorithm: ecdsa-with-SHA384"), "{t}");
    assert!(
        t.contains("Issuer: O = est-server, CN = EST Issuing CA P-384"),
        "{t}"
    );
    assert!(
        t.contains("Subject: O = Utility B, CN = kitchen, serialNumber = SNB1"),
        "{t}"
    );
    assert!(t.contains("NIST CURVE: P-384"), "{t}");
    assert!(!t.contains("Key Agreement"), "{t}");
    assert!(t.contains("Digital Signature"), "{t}");
    assert!(!t.contains("Extended Key Usage"), "{t}");
    assert!(t.contains("Subject Alternative Name"), "{t}");
    assert!(t.contains("1.3.6.1.5.5.7.8.4"), "{t}");
    assert!(valid_in_days(&b, 89) && !valid_in_days(&b, 91), "{t}");

    // --- A maker-A gateway: the device-class rule comes first, at /sen and at /sren.
    let dev = fleet.join("GW7");
    let creds_gw = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let (_, csr) = csr_on(&work, "gw", "P-256", "/serialNumber=GW7");
    let out = work.join("gw.der");
    let run = post_csr(Libcoap::Gnutls, &creds_gw, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let gw = der_to_pem(&out).unwrap();
    let t = text_of(&gw);
    assert!(
        t.contains("Subject: O = Utility, CN = gw-GW7, serialNumber = GW7"),
        "{t}"
    );
    assert!(!t.contains("Extended Key Usage"), "{t}");
    assert!(valid_in_days(&gw, 9) && !valid_in_days(&gw, 11), "{t}");
    // Re-enrollment with the gateway's LDevID keeps its profile.
    let gw_key = work.join("gw.key");
    let subject = cert_subject(&gw).unwrap();
    let (_, csr) = csr_on(&work, "gw2", "P-256", &subject);
    // csr_on makes a new key: renew with a new key, authenticated by the old one.
    let creds_ldevid = Creds {
        cert: &gw,
        key: &gw_key,
        trust: &trust,
    };
    let out = work.join("gw2.der");
    let run = post_csr(Libcoap::Gnutls, &creds_ldevid, &srv.url("sren"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let gw2 = der_to_pem(&out).unwrap();
    let t = text_of(&gw2);
    assert!(t.contains("CN = gw-GW7"), "{t}");
    assert!(!t.contains("Extended Key Usage"), "{t}");
    assert!(valid_in_days(&gw2, 9) && !valid_in_days(&gw2, 11), "{t}");

    // Each issuance names its profile in the audit trail.
    let audit = srv.store().recent_audit(20).unwrap();
    for (device, profile) in [
        ("SNA1", "vendor-a"),
        ("SNB1", "vendor-b"),
        ("GW7", "gateways"),
    ] {
        assert!(
            audit.iter().any(|e| e.device_id == device
                && e.outcome == "issued"
                && e.detail.ends_with(&format!("profile {profile}"))),
            "{device}: {audit:?}"
        );
    }
    srv.stop().await;
}

/// What vendor-a issues (P-256 CA, 30 days, digitalSignature|keyAgreement,
/// clientAuth+serverAuth, its subject, no SAN), checked with `openssl x509 -text`.
fn assert_vendor_a(srv: &TestServer, pem: &Path, serial: &str) {
    openssl_verify(&srv.ca_pem(), pem).expect("the P-256 CA signed it");
    let t = text_of(pem);
    assert!(t.contains("Signature Algorithm: ecdsa-with-SHA256"), "{t}");
    assert!(
        t.contains(&format!(
            "Subject: O = Utility A, OU = Meters, CN = A-{serial}, serialNumber = {serial}"
        )),
        "{t}"
    );
    assert!(t.contains("Digital Signature, Key Agreement"), "{t}");
    assert!(
        t.contains("TLS Web Client Authentication, TLS Web Server Authentication"),
        "{t}"
    );
    assert!(!t.contains("Subject Alternative Name"), "{t}");
    assert!(valid_in_days(pem, 29) && !valid_in_days(pem, 31), "{t}");
}

/// What vendor-b issues (P-384 CA, SHA-384, 90 days, digitalSignature only, no EKU, CN from
/// the CSR, SAN from the IDevID).
fn assert_vendor_b(p384_ca: &Path, pem: &Path, serial: &str) {
    openssl_verify(p384_ca, pem).expect("the P-384 CA signed it");
    let t = text_of(pem);
    assert!(t.contains("Signature Algorithm: ecdsa-with-SHA384"), "{t}");
    assert!(
        t.contains(&format!(
            "Subject: O = Utility B, CN = kitchen, serialNumber = {serial}"
        )),
        "{t}"
    );
    assert!(
        t.contains("Digital Signature") && !t.contains("Key Agreement"),
        "{t}"
    );
    assert!(!t.contains("Extended Key Usage"), "{t}");
    assert!(t.contains("Subject Alternative Name"), "{t}");
    assert!(valid_in_days(pem, 89) && !valid_in_days(pem, 91), "{t}");
}

/// /sren with the LDevID `cert`/`key`, a new key on `curve` and the certificate's subject.
async fn renew(
    lib: Libcoap,
    srv: &TestServer,
    work: &Path,
    name: &str,
    cert: &Path,
    key: &Path,
    curve: &str,
) -> (CoapRun, PathBuf, PathBuf) {
    let subject = cert_subject(cert).unwrap();
    let (new_key, csr) = csr_on(work, name, curve, &subject);
    let trust = srv.ca_pem();
    let creds = Creds {
        cert,
        key,
        trust: &trust,
    };
    let out = work.join(format!("{name}.der"));
    let run = post_csr(lib, &creds, &srv.url("sren"), &csr, &out)
        .await
        .unwrap();
    (run, out, new_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_chosen_at_sen_is_kept_at_sren() {
    if !require_tools() {
        return;
    }
    let srv = start_with_profiles().await;
    let p384_ca = srv.data_dir.join("ca/issuing-ca-p384.pem");
    let fleet = srv.mint(&["SNA2"]).unwrap();
    let trust = fleet.join("implicit-ta.pem");
    let work = srv.dir.path().join("keep");
    std::fs::create_dir_all(&work).unwrap();

    // --- Maker A's meter: vendor-a at /sen (chosen by manufacturer CA) ...
    let dev = fleet.join("SNA2");
    let creds_a = Creds {
        cert: &dev.join("idevid.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let (key_a, csr) = csr_on(&work, "a", "P-256", "/serialNumber=SNA2");
    let out = work.join("a.der");
    let run = post_csr(Libcoap::Openssl, &creds_a, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let a = der_to_pem(&out).unwrap();
    assert_vendor_a(&srv, &a, "SNA2");
    // ... and again vendor-a at /sren, authenticated by the LDevID (no manufacturer CA in its
    // chain; no serial-prefix rule selects SNA2).
    let (run, out, key_a2) = renew(Libcoap::Openssl, &srv, &work, "a2", &a, &key_a, "P-256").await;
    assert_issued(&run);
    let a2 = der_to_pem(&out).unwrap();
    assert!(same_public_key(&a2, &key_a2).unwrap());
    assert_vendor_a(&srv, &a2, "SNA2");

    // --- Maker B's P-384 meter keeps vendor-b.
    let (idevid_key, chain) = maker_b_idevid(&srv.data_dir, &work, "SNB2");
    let creds_b = Creds {
        cert: &chain,
        key: &idevid_key,
        trust: &trust,
    };
    let (key_b, csr) = csr_on(&work, "b", "P-384", "/CN=kitchen/serialNumber=SNB2");
    let out = work.join("b.der");
    let run = post_csr(Libcoap::Gnutls, &creds_b, &srv.url("sen"), &csr, &out)
        .await
        .unwrap();
    assert_issued(&run);
    let b = der_to_pem(&out).unwrap();
    assert_vendor_b(&p384_ca, &b, "SNB2");
    let (run, out, key_b2) = renew(Libcoap::Gnutls, &srv, &work, "b2", &b, &key_b, "P-384").await;
    assert_issued(&run);
    let b2 = der_to_pem(&out).unwrap();
    assert_vendor_b(&p384_ca, &b2, "SNB2");

    // The store records each certificate's profile; the audit trail names it.
    let certs = srv.store().list_certificates(10).unwrap();
    for (device, profile) in [("SNA2", "vendor-a"), ("SNB2", "vendor-b")] {
        let mine: Vec<_> = certs.iter().filter(|c| c.device_id == device).collect();
        assert_eq!(mine.len(), 2, "{certs:?}");
        assert!(mine.iter().all(|c| c.profile == profile), "{mine:?}");
    }
    let audit = srv.store().recent_audit(20).unwrap();
    assert!(
        audit.iter().any(|e| e.device_id == "SNA2"
            && e.operation == "sren"
            && e.outcome == "issued"
            && e.detail.ends_with("profile vendor-a")),
        "{audit:?}"
    );

    // --- vendor-a removed from the configuration: SNA2's renewal is refused with 4.03
    // naming it (not issued under another profile), nothing stored; vendor-b still renews.
    let kept: Vec<_> = srv
        .config
        .profiles
        .iter()
        .filter(|p| p.name != "vendor-a")
        .cloned()
        .collect();
    assert_eq!(kept.len(), 2);
    let srv = srv
        .restart(|c| {
            c.pki
                .manufacturer_cas
                .push("manufacturers/maker-b.pem".into());
            c.profiles = kept;
        })
        .await
        .expect("restart without vendor-a");
    let before = srv.store().list_certificates(10).unwrap().len();
    let (run, _, _) = renew(Libcoap::Openssl, &srv, &work, "a3", &a2, &key_a2, "P-256").await;
    assert_eq!(run.error_code(), Some("4.03"), "{run:?}");
    assert!(
        run.stderr.contains("vendor-a") && run.stderr.contains("no longer configured"),
        "diagnostic: {run:?}"
    );
    assert_eq!(srv.store().list_certificates(10).unwrap().len(), before);
    let audit = srv.store().recent_audit(5).unwrap();
    assert!(
        audit.iter().any(|e| e.device_id == "SNA2"
            && e.operation == "sren"
            && e.outcome == "refused"
            && e.code == "4.03"
            && e.detail.contains("vendor-a")),
        "{audit:?}"
    );
    let (run, out, _) = renew(Libcoap::Gnutls, &srv, &work, "b3", &b2, &key_b2, "P-384").await;
    assert_issued(&run);
    assert_vendor_b(&p384_ca, &der_to_pem(&out).unwrap(), "SNB2");
    srv.stop().await;
}
