//! Interop of the `ca` module with the `openssl` command-line tool (OpenSSL 3): CSRs made by
//! `openssl req` are parsed and verified; certificates and certs-only messages we produce are
//! accepted by `openssl verify`, `openssl x509`, `openssl req -verify` and `openssl pkcs7`.
//!
//! Needs the `openssl` binary on PATH (the CI installs it).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::{Decode, EncodePem};
use est_proto::ca::{
    self, oid, CsrError, HardwareModuleName, IssueParams, IssuingCa, ObjectIdentifier, Signer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Fixed "now" (2026-09-21T22:13:20Z); openssl verify is run with `-attime` just after it.
const NOW: u64 = 1_790_000_000;
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn attime() -> String {
    NOW.saturating_add(60).to_string()
}

fn hw_type() -> ObjectIdentifier {
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6715.10.1")
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }
    fn write_cert_pem(&self, name: &str, der: &[u8]) {
        let cert = ca::Certificate::from_der(der).unwrap();
        self.write(
            name,
            cert.to_pem(der::pem::LineEnding::LF).unwrap().as_bytes(),
        );
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("openssl")
            .args(args)
            .current_dir(self.0.path())
            .output()
            .expect("the openssl binary must be installed")
    }
    /// Run openssl in this directory; panic with its output unless it succeeds. Returns stdout.
    fn openssl(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    fn p256_key(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ]);
    }
}

fn root(seed: u64) -> IssuingCa {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (cert, key) =
        ca::generate_root_ca("Test Root", "Example Meters", t0(), 10 * YEAR, &mut rng).unwrap();
    IssuingCa::new(
        cert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&key).unwrap()),
    )
    .unwrap()
}

const REQ_CONF: &str = "\
[req]
distinguished_name = dn
attributes = attrs
req_extensions = ext
prompt = no
[dn]
CN = meter-0042
serialNumber = SN0042
[attrs]
challengePassword = dGxzLXVuaXF1ZQ==
[ext]
subjectAltName = otherName:1.3.6.1.5.5.7.8.4;SEQUENCE:hmn
[hmn]
hwType = OID:1.3.6.1.4.1.6715.10.1
hwSerialNum = FORMAT:HEX,OCTETSTRING:01020304
";

/// A P-256 key (dev.key) and a DER CSR with a hardwareModuleName SAN and a challengePassword, by
/// `openssl req`.
fn openssl_csr(dir: &Dir) -> Vec<u8> {
    dir.write("req.cnf", REQ_CONF.as_bytes());
    dir.p256_key("dev.key");
    dir.openssl(&[
        "req", "-new", "-config", "req.cnf", "-key", "dev.key", "-outform", "DER", "-out",
        "dev.csr",
    ]);
    dir.read("dev.csr")
}

#[test]
fn openssl_csr_parses_and_verifies() {
    let dir = Dir::new();
    let der = openssl_csr(&dir);
    let csr = ca::parse_and_verify_csr(&der, 4096).unwrap();
    assert_eq!(ca::common_name(&csr.subject).as_deref(), Some("meter-0042"));
    assert_eq!(
        ca::serial_number_attr(&csr.subject).as_deref(),
        Some("SN0042")
    );
    assert_eq!(
        csr.challenge_password.as_deref(),
        Some(&b"dGxzLXVuaXF1ZQ=="[..])
    );
    assert_eq!(
        csr.hardware_module,
        Some(HardwareModuleName::new(hw_type(), &[1, 2, 3, 4]).unwrap())
    );
    assert!(csr.requested_san_present);
    assert_eq!(csr.digest, ca::csr_digest(&der));

    // Tampering with one byte of the subject breaks the proof of possession.
    let pos = der.windows(10).position(|w| w == b"meter-0042").unwrap();
    let mut tampered = der.clone();
    tampered[pos] = b'M';
    assert_eq!(
        ca::parse_and_verify_csr(&tampered, 4096),
        Err(CsrError::BadSignature)
    );

    // Trailing bytes are refused.
    let mut trailing = der.clone();
    trailing.extend_from_slice(&[0x00, 0x00]);
    assert!(matches!(
        ca::parse_and_verify_csr(&trailing, 4096),
        Err(CsrError::Malformed(_))
    ));
}

#[test]
fn openssl_rsa_and_p521_csrs_are_unsupported_p384_accepted() {
    let dir = Dir::new();
    dir.openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:1024",
        "-out",
        "rsa.key",
    ]);
    dir.openssl(&[
        "req", "-new", "-key", "rsa.key", "-subj", "/CN=rsa", "-outform", "DER", "-out", "rsa.csr",
    ]);
    assert!(matches!(
        ca::parse_and_verify_csr(&dir.read("rsa.csr"), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));

    dir.openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-out",
        "p384.key",
    ]);
    dir.openssl(&[
        "req", "-new", "-key", "p384.key", "-subj", "/CN=p384", "-outform", "DER", "-out",
        "p384.csr",
    ]);
    // P-384 (DLMS/COSEM suite 2) is accepted, openssl's default SHA-256 and SHA-384 alike.
    let parsed = ca::parse_and_verify_csr(&dir.read("p384.csr"), 4096).unwrap();
    assert_eq!(parsed.curve(), Some(ca::Curve::P384));
    dir.openssl(&[
        "req",
        "-new",
        "-sha384",
        "-key",
        "p384.key",
        "-subj",
        "/CN=p384",
        "-outform",
        "DER",
        "-out",
        "p384-sha384.csr",
    ]);
    assert!(ca::parse_and_verify_csr(&dir.read("p384-sha384.csr"), 4096).is_ok());
    // A P-256 key signing SHA-384 is not the RFC 7925 profile.
    dir.openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "p256.key",
    ]);
    dir.openssl(&[
        "req",
        "-new",
        "-sha384",
        "-key",
        "p256.key",
        "-subj",
        "/CN=p256",
        "-outform",
        "DER",
        "-out",
        "p256-sha384.csr",
    ]);
    assert!(matches!(
        ca::parse_and_verify_csr(&dir.read("p256-sha384.csr"), 4096),
        Err(CsrError::UnsupportedSignatureAlgorithm(_))
    ));
    // P-521 is not supported.
    dir.openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-521",
        "-out",
        "p521.key",
    ]);
    dir.openssl(&[
        "req", "-new", "-key", "p521.key", "-subj", "/CN=p521", "-outform", "DER", "-out",
        "p521.csr",
    ]);
    assert!(matches!(
        ca::parse_and_verify_csr(&dir.read("p521.csr"), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));
}

#[test]
fn our_csr_and_key_pass_openssl() {
    let dir = Dir::new();
    let key = ca::generate_p256_pkcs8(&mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    let signer = ca::RingP256Signer::from_pkcs8_der(&key).unwrap();
    let subject = ca::name_from_attrs(&[
        (oid::AT_COMMON_NAME, "meter-7"),
        (oid::AT_SERIAL_NUMBER, "SN7"),
    ])
    .unwrap();
    let hmn = HardwareModuleName::new(hw_type(), b"SN7").unwrap();
    let csr = ca::build_csr(&signer, &subject, Some(&hmn), Some("abc+/=")).unwrap();
    dir.write("our.csr", &csr);
    let out = dir.run(&[
        "req", "-inform", "DER", "-in", "our.csr", "-verify", "-noout", "-text",
    ]);
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("verify OK"), "{all}");
    assert!(all.contains("CN = meter-7"), "{all}");
    assert!(all.contains("challengePassword"), "{all}");
    // Our generated PKCS#8 is readable by openssl.
    dir.write("our.key", &key);
    dir.openssl(&["pkey", "-inform", "DER", "-in", "our.key", "-noout"]);
}

#[test]
fn issued_ldevid_passes_openssl_verify_and_shows_extensions() {
    let dir = Dir::new();
    let ca = root(11);
    let csr = ca::parse_and_verify_csr(&openssl_csr(&dir), 4096).unwrap();
    let mut params = IssueParams::new(
        csr.subject.clone(),
        csr.public_key.clone(),
        ca::random_serial(&mut ChaCha20Rng::seed_from_u64(12)),
        t0(),
        t0() + YEAR,
    );
    params.hardware_module = csr.hardware_module.clone();
    let ee = ca.issue(&params).unwrap();
    dir.write_cert_pem("ca.pem", ca.certificate_der());
    dir.write_cert_pem("ee.pem", &ee);
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &attime(),
        "-purpose",
        "sslclient",
        "-CAfile",
        "ca.pem",
        "ee.pem",
    ]);
    assert!(out.contains("ee.pem: OK"), "{out}");

    let text = dir.openssl(&["x509", "-in", "ee.pem", "-noout", "-text"]);
    for needle in [
        "Version: 3 (0x2)",
        "ecdsa-with-SHA256",
        "X509v3 Basic Constraints: critical",
        "CA:FALSE",
        "X509v3 Key Usage: critical",
        "Digital Signature",
        "TLS Web Client Authentication",
        "X509v3 Subject Key Identifier",
        "X509v3 Authority Key Identifier",
        "X509v3 Subject Alternative Name",
        "othername",
        "serialNumber = SN0042",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // The certificate is for the key openssl generated.
    let cert_pub = dir.openssl(&["x509", "-in", "ee.pem", "-noout", "-pubkey"]);
    let key_pub = dir.openssl(&["pkey", "-in", "dev.key", "-pubout"]);
    assert_eq!(cert_pub, key_pub);

    // It does not verify under another CA, nor after the end of its validity.
    dir.write_cert_pem("other.pem", root(13).certificate_der());
    assert!(!dir
        .run(&[
            "verify",
            "-attime",
            &attime(),
            "-CAfile",
            "other.pem",
            "ee.pem"
        ])
        .status
        .success());
    let late = (NOW + YEAR.as_secs() + 1).to_string();
    assert!(!dir
        .run(&["verify", "-attime", &late, "-CAfile", "ca.pem", "ee.pem"])
        .status
        .success());
}

#[test]
fn chain_through_sub_ca_verifies() {
    let dir = Dir::new();
    let root = root(20);
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let (sub_cert, sub_key) = ca::generate_sub_ca(
        &root,
        "Issuing CA",
        "Example Meters",
        t0(),
        5 * YEAR,
        &mut rng,
    )
    .unwrap();
    let sub = IssuingCa::new(
        sub_cert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&sub_key).unwrap()),
    )
    .unwrap();
    let (srv, _) = ca::generate_server_cert(
        &sub,
        &["localhost".to_string()],
        &["127.0.0.1".parse().unwrap()],
        t0(),
        YEAR,
        &mut rng,
    )
    .unwrap();
    let (idev, _) = ca::mint_idevid(
        &sub,
        "SN1",
        hw_type(),
        t0(),
        ca::idevid_no_expiry(),
        &mut rng,
    )
    .unwrap();
    dir.write_cert_pem("root.pem", root.certificate_der());
    dir.write_cert_pem("sub.pem", sub.certificate_der());
    dir.write_cert_pem("srv.pem", &srv);
    dir.write_cert_pem("idev.pem", &idev);
    let at = attime();
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &at,
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "localhost",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "sub.pem",
        "srv.pem",
    ]);
    assert!(out.contains("srv.pem: OK"), "{out}");
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &at,
        "-verify_ip",
        "127.0.0.1",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "sub.pem",
        "srv.pem",
    ]);
    assert!(out.contains("srv.pem: OK"), "{out}");
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &at,
        "-purpose",
        "sslclient",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "sub.pem",
        "idev.pem",
    ]);
    assert!(out.contains("idev.pem: OK"), "{out}");
    let text = dir.openssl(&["x509", "-in", "sub.pem", "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
}

#[test]
fn minted_idevid_chains_to_manufacturer_ca() {
    let dir = Dir::new();
    let mut rng = ChaCha20Rng::seed_from_u64(30);
    // Manufacturer CA valid "forever", like 802.1AR IDevID issuers.
    let validity = ca::idevid_no_expiry().duration_since(t0()).unwrap();
    let (mcert, mkey) =
        ca::generate_root_ca("Meter Factory CA", "ACME Meters", t0(), validity, &mut rng).unwrap();
    let maker = IssuingCa::new(
        mcert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&mkey).unwrap()),
    )
    .unwrap();
    let (idev, key) = ca::mint_idevid(
        &maker,
        "ACM0000001",
        hw_type(),
        t0(),
        ca::idevid_no_expiry(),
        &mut rng,
    )
    .unwrap();
    dir.write_cert_pem("maker.pem", maker.certificate_der());
    dir.write_cert_pem("idev.pem", &idev);
    dir.write("idev.key", &key);
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &attime(),
        "-purpose",
        "sslclient",
        "-CAfile",
        "maker.pem",
        "idev.pem",
    ]);
    assert!(out.contains("idev.pem: OK"), "{out}");
    let text = dir.openssl(&["x509", "-in", "idev.pem", "-noout", "-text"]);
    assert!(text.contains("serialNumber = ACM0000001"), "{text}");
    assert!(text.contains("O = ACME Meters"), "{text}");
    assert!(
        text.contains("Not After : Dec 31 23:59:59 9999 GMT"),
        "{text}"
    );
    assert!(text.contains("othername"), "{text}");
    // hardwareModuleName as RFC 4108 encodes it: otherName type-id, then hwType OID and hwSerialNum.
    let der = ca::Certificate::from_der(&idev).unwrap();
    let san = ca::subject_alt_name_from_cert(&der).unwrap().unwrap();
    let hmn = ca::hardware_module_from_cert(&der).unwrap();
    assert_eq!(san.0.len(), 1);
    assert_eq!(
        hmn,
        HardwareModuleName::new(hw_type(), b"ACM0000001").unwrap()
    );
    // Byte-exact RFC 4108 encoding in the certificate: otherName [0] { id-on-hardwareModuleName,
    // [0] EXPLICIT HardwareModuleName { hwType 1.3.6.1.4.1.6715.10.1, hwSerialNum "ACM0000001" } }.
    let mut expect = vec![
        0xA0, 0x25, 0x06, 0x08, 0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x08, 0x04,
    ];
    expect.extend_from_slice(&[
        0xA0, 0x19, 0x30, 0x17, 0x06, 0x09, 0x2B, 0x06, 0x01, 0x04, 0x01, 0xB4, 0x3B, 0x0A, 0x01,
    ]);
    expect.extend_from_slice(&[0x04, 0x0A]);
    expect.extend_from_slice(b"ACM0000001");
    assert!(idev.windows(expect.len()).any(|w| w == expect.as_slice()));
    // Key and certificate belong together.
    let cert_pub = dir.openssl(&["x509", "-in", "idev.pem", "-noout", "-pubkey"]);
    let key_pub = dir.openssl(&["pkey", "-inform", "DER", "-in", "idev.key", "-pubout"]);
    assert_eq!(cert_pub, key_pub);
}

#[test]
fn certs_only_is_listed_by_openssl_pkcs7() {
    let dir = Dir::new();
    let ca = root(40);
    let (idev, _) = ca::mint_idevid(
        &ca,
        "SN40",
        hw_type(),
        t0(),
        t0() + YEAR,
        &mut ChaCha20Rng::seed_from_u64(41),
    )
    .unwrap();
    let p7 = ca::certs_only(&[&idev, ca.certificate_der()]).unwrap();
    dir.write("out.p7b", &p7);
    let out = dir.openssl(&[
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        "out.p7b",
        "-print_certs",
        "-noout",
    ]);
    assert!(out.contains("CN = SN40"), "{out}");
    assert!(out.contains("CN = Test Root"), "{out}");
    assert_eq!(out.matches("subject=").count(), 2, "{out}");

    // And we read what openssl makes (crl2pkcs7 adds an empty crls field, as in RFC 9148 App. A).
    dir.write_cert_pem("idev.pem", &idev);
    dir.openssl(&[
        "crl2pkcs7",
        "-nocrl",
        "-certfile",
        "idev.pem",
        "-outform",
        "DER",
        "-out",
        "theirs.p7b",
    ]);
    let certs = ca::certs_from_certs_only(&dir.read("theirs.p7b")).unwrap();
    assert_eq!(certs, vec![idev]);
}

#[test]
fn openssl_made_ca_key_and_cert_are_usable() {
    let dir = Dir::new();
    dir.write(
        "ca.cnf",
        b"[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=v3\n[dn]\nCN=OpenSSL CA\n\
          [v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
          subjectKeyIdentifier=hash\n",
    );
    dir.p256_key("ca.key");
    dir.openssl(&[
        "req", "-x509", "-new", "-config", "ca.cnf", "-key", "ca.key", "-days", "36500", "-out",
        "ca.pem",
    ]);
    dir.openssl(&["x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der"]);
    // The same key as PKCS#8 PEM, PKCS#8 DER, SEC1 DER (`pkey -outform DER`) and SEC1 PEM.
    dir.openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        "ca.key",
        "-outform",
        "DER",
        "-out",
        "ca.p8.der",
    ]);
    dir.openssl(&[
        "pkey",
        "-in",
        "ca.key",
        "-outform",
        "DER",
        "-out",
        "ca.sec1.der",
    ]);
    dir.openssl(&["ec", "-in", "ca.key", "-out", "ca.sec1.pem"]);
    let pem = String::from_utf8(dir.read("ca.key")).unwrap();
    let signer = ca::RingP256Signer::from_pkcs8_pem(&pem).unwrap();
    let spki = signer.public_key_spki_der().to_vec();
    let p8 = ca::RingP256Signer::from_pkcs8_der(&dir.read("ca.p8.der")).unwrap();
    assert_eq!(p8.public_key_spki_der(), spki);
    let sec1 = ca::RingP256Signer::from_sec1_der(&dir.read("ca.sec1.der")).unwrap();
    assert_eq!(sec1.public_key_spki_der(), spki);
    let sec1_pem = String::from_utf8(dir.read("ca.sec1.pem")).unwrap();
    assert!(sec1_pem.contains("EC PRIVATE KEY"));
    assert_eq!(
        ca::RingP256Signer::from_pem(&sec1_pem)
            .unwrap()
            .public_key_spki_der(),
        spki
    );
    assert_eq!(
        ca::RingP256Signer::from_pem(&pem)
            .unwrap()
            .public_key_spki_der(),
        spki
    );
    assert!(ca::RingP256Signer::from_pkcs8_der(&dir.read("ca.sec1.der")).is_err());
    let issuing = IssuingCa::new(dir.read("ca.der"), Box::new(signer)).unwrap();

    // A mismatched key is refused.
    dir.p256_key("other.key");
    let other =
        ca::RingP256Signer::from_pkcs8_pem(&String::from_utf8(dir.read("other.key")).unwrap())
            .unwrap();
    assert_eq!(
        IssuingCa::new(dir.read("ca.der"), Box::new(other)).unwrap_err(),
        ca::CaError::KeyMismatch
    );

    // openssl's CA validity starts when `openssl req` ran (wall clock), so this part cannot use the
    // fixed NOW. Nor may it compare our clock reading with openssl's: glibc's time(), which openssl
    // uses, reads the kernel's coarse clock, up to a tick behind the clock_gettime that
    // SystemTime::now reads, so a leaf minted with notBefore = now just after a second boundary
    // was "not yet valid" to an `openssl verify` run a few ms later (seen once in CI). The leaf is
    // backdated an hour, as `factory mint` does, and openssl verifies at an explicit time an hour
    // ahead, inside both validities.
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let (idev, _) = ca::mint_idevid(
        &issuing,
        "SN50",
        hw_type(),
        now - hour,
        now + YEAR,
        &mut ChaCha20Rng::seed_from_u64(51),
    )
    .unwrap();
    dir.write_cert_pem("idev.pem", &idev);
    let at = (now + hour)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let out = dir.openssl(&[
        "verify",
        "-attime",
        &at,
        "-purpose",
        "sslclient",
        "-CAfile",
        "ca.pem",
        "idev.pem",
    ]);
    assert!(out.contains("idev.pem: OK"), "{out}");
    // The AKI of what we issue is the SKI openssl put in its CA certificate.
    let ca_text = dir.openssl(&[
        "x509",
        "-in",
        "ca.pem",
        "-noout",
        "-ext",
        "subjectKeyIdentifier",
    ]);
    let ee_text = dir.openssl(&[
        "x509",
        "-in",
        "idev.pem",
        "-noout",
        "-ext",
        "authorityKeyIdentifier",
    ]);
    let ski_line = ca_text.lines().nth(1).unwrap().trim().to_string();
    assert!(
        ee_text.contains(&ski_line),
        "SKI {ski_line} not in {ee_text}"
    );
}

#[test]
fn our_ski_equals_openssl_hash_method() {
    // RFC 5280 §4.2.1.2 method 1: OpenSSL computes subjectKeyIdentifier=hash the same way, so a
    // certificate openssl makes for our CA's public key gets the SKI we computed.
    let dir = Dir::new();
    let ca = root(60);
    dir.write_cert_pem("ca.pem", ca.certificate_der());
    dir.write("ext.cnf", b"[v3]\nsubjectKeyIdentifier=hash\n");
    dir.p256_key("signer.key");
    let pubkey = dir.openssl(&["x509", "-in", "ca.pem", "-noout", "-pubkey"]);
    dir.write("ca.pub", pubkey.as_bytes());
    dir.openssl(&[
        "x509",
        "-new",
        "-subj",
        "/CN=x",
        "-force_pubkey",
        "ca.pub",
        "-key",
        "signer.key",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "v3",
        "-out",
        "probe.pem",
    ]);
    let text = dir.openssl(&[
        "x509",
        "-in",
        "probe.pem",
        "-noout",
        "-ext",
        "subjectKeyIdentifier",
    ]);
    let ours = ca
        .key_identifier()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(text.contains(&ours), "{ours} vs {text}");
}
