//! In-memory tests of the `ca` module (no openssl, no files). Interop with OpenSSL and
//! rustls-webpki is in `server/proto/tests/ca_openssl.rs` and `ca_webpki.rs`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::{Decode, Encode, Tag};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use x509_cert::time::Time;

use super::*;

/// 2026-09-21T22:13:20Z: fixed "now" of the tests.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn hw_type() -> ObjectIdentifier {
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6715.10.1")
}

struct Pki {
    ca: IssuingCa,
}

fn pki(seed: u64) -> Pki {
    let mut r = rng(seed);
    let (cert, key) =
        generate_root_ca("Test Root", "Example Meters", t0(), 10 * YEAR, &mut r).unwrap();
    let ca = IssuingCa::new(
        cert,
        Box::new(RingP256Signer::from_pkcs8_der(&key).unwrap()),
    )
    .unwrap();
    Pki { ca }
}

fn device_signer(seed: u64) -> RingP256Signer {
    RingP256Signer::from_pkcs8_der(&generate_p256_pkcs8(&mut rng(seed)).unwrap()).unwrap()
}

/// Check `cert`'s signature with `issuer_spki` using ring over the TBS bytes as encoded.
fn signature_verifies(cert: &Certificate, issuer: &Certificate) -> bool {
    let tbs = cert.tbs_certificate.to_der().unwrap();
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(&tbs, cert.signature.raw_bytes())
        .is_ok()
}

fn ext_critical(cert: &Certificate, id: ObjectIdentifier) -> Option<bool> {
    cert.tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id == id)
        .map(|e| e.critical)
}

#[test]
fn generated_pkcs8_is_accepted_by_ring_and_p256() {
    use p256::pkcs8::DecodePrivateKey;
    let der = generate_p256_pkcs8(&mut rng(1)).unwrap();
    let signer = RingP256Signer::from_pkcs8_der(&der).unwrap();
    let sk = p256::SecretKey::from_pkcs8_der(&der).unwrap();
    let pk = sk.public_key();
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    assert_eq!(
        signer.public_key_sec1(),
        pk.to_encoded_point(false).as_bytes()
    );
    // Same seed, same key: key generation is a function of the supplied RNG only.
    assert_eq!(der, generate_p256_pkcs8(&mut rng(1)).unwrap());
    assert_ne!(der, generate_p256_pkcs8(&mut rng(2)).unwrap());
}

#[test]
fn ring_signature_verifies_and_signer_spki_is_p256() {
    let signer = device_signer(3);
    let msg = b"hello";
    let sig = signer.sign(msg).unwrap();
    assert!(
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, signer.public_key_sec1())
            .verify(msg, &sig)
            .is_ok()
    );
    let spki = SubjectPublicKeyInfoOwned::from_der(signer.public_key_spki_der()).unwrap();
    assert_eq!(spki.algorithm.oid, oid::ID_EC_PUBLIC_KEY);
    assert_eq!(
        spki.algorithm
            .parameters
            .unwrap()
            .decode_as::<ObjectIdentifier>()
            .unwrap(),
        oid::SECP256R1
    );
    assert!(format!("{signer:?}").starts_with("RingP256Signer"));
}

#[test]
fn pkcs8_pem_and_garbage_keys() {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let sk = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
    let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
    assert!(RingP256Signer::from_pkcs8_pem(&pem).is_ok());
    assert!(matches!(
        RingP256Signer::from_pkcs8_der(b"\x30\x00"),
        Err(CaError::KeyRejected(_))
    ));
    assert!(matches!(
        RingP256Signer::from_pkcs8_pem(
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"
        ),
        Err(CaError::KeyRejected(_))
    ));
}

#[test]
fn root_ca_profile() {
    let p = pki(10);
    let cert = p.ca.certificate();
    let tbs = &cert.tbs_certificate;
    assert_eq!(tbs.version, x509_cert::certificate::Version::V3);
    assert_eq!(tbs.issuer, tbs.subject);
    assert_eq!(common_name(&tbs.subject).as_deref(), Some("Test Root"));
    assert_eq!(
        organization(&tbs.subject).as_deref(),
        Some("Example Meters")
    );
    let (crit, bc) = tbs.get::<BasicConstraints>().unwrap().unwrap();
    assert!(crit && bc.ca && bc.path_len_constraint.is_none());
    let (crit, ku) = tbs.get::<KeyUsage>().unwrap().unwrap();
    assert!(crit && ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    let (_, ski) = tbs.get::<SubjectKeyIdentifier>().unwrap().unwrap();
    assert_eq!(ski.0.as_bytes(), p.ca.key_identifier());
    assert_eq!(p.ca.key_identifier().len(), 20);
    assert!(signature_verifies(cert, cert), "self-signature");
    assert_eq!(cert.signature_algorithm.oid, oid::ECDSA_WITH_SHA256);
    assert!(cert.signature_algorithm.parameters.is_none());
    assert_eq!(p.ca.not_after(), t0() + 10 * YEAR);
    assert!(matches!(tbs.validity.not_before, Time::UtcTime(_)));
}

fn issue_for(
    p: &Pki,
    device: &RingP256Signer,
    hmn: Option<HardwareModuleName>,
    serial: SerialNumber,
) -> Vec<u8> {
    let subject = name_from_attrs(&[
        (oid::AT_COMMON_NAME, "meter-0001"),
        (oid::AT_SERIAL_NUMBER, "SN0001"),
    ])
    .unwrap();
    let csr = build_csr(device, &subject, hmn.as_ref(), Some("dGxzLXVuaXF1ZQ==")).unwrap();
    let parsed = parse_and_verify_csr(&csr, 4096).unwrap();
    let params = IssueParams::from_csr(&parsed, serial, t0(), t0() + YEAR);
    assert_eq!(params.hardware_module, hmn);
    assert_eq!(
        (params.key_agreement, params.extended_key_usage_client_auth),
        (false, true)
    );
    p.ca.issue(&params).unwrap()
}

#[test]
fn issued_end_entity_profile() {
    let p = pki(20);
    let device = device_signer(21);
    let hmn = HardwareModuleName::new(hw_type(), b"SN0001").unwrap();
    let serial = random_serial(&mut rng(22));
    let der = issue_for(&p, &device, Some(hmn.clone()), serial.clone());
    let cert = Certificate::from_der(&der).unwrap();
    let tbs = &cert.tbs_certificate;

    assert_eq!(tbs.version, x509_cert::certificate::Version::V3);
    assert_eq!(tbs.serial_number, serial);
    assert_eq!(&tbs.issuer, p.ca.subject());
    assert_eq!(common_name(&tbs.subject).as_deref(), Some("meter-0001"));
    assert_eq!(serial_number_attr(&tbs.subject).as_deref(), Some("SN0001"));
    assert_eq!(
        tbs.subject_public_key_info.subject_public_key.raw_bytes(),
        device.public_key_sec1()
    );
    assert!(signature_verifies(&cert, p.ca.certificate()));
    assert_eq!(tbs.validity.not_before.to_system_time(), t0());
    assert_eq!(tbs.validity.not_after.to_system_time(), t0() + YEAR);

    let (crit, bc) = tbs.get::<BasicConstraints>().unwrap().unwrap();
    assert!(crit && !bc.ca);
    let (crit, ku) = tbs.get::<KeyUsage>().unwrap().unwrap();
    assert!(crit && ku.digital_signature() && !ku.key_agreement() && !ku.key_cert_sign());
    let (crit, eku) = tbs.get::<ExtendedKeyUsage>().unwrap().unwrap();
    assert!(!crit);
    assert_eq!(eku.0, vec![oid::KP_CLIENT_AUTH]);
    let (_, ski) = tbs.get::<SubjectKeyIdentifier>().unwrap().unwrap();
    let expect_ski = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        device.public_key_sec1(),
    );
    assert_eq!(ski.0.as_bytes(), expect_ski.as_ref());
    let (_, aki) = tbs.get::<AuthorityKeyIdentifier>().unwrap().unwrap();
    assert_eq!(
        aki.key_identifier.unwrap().as_bytes(),
        p.ca.key_identifier()
    );
    assert_eq!(ext_critical(&cert, oid::CE_SUBJECT_ALT_NAME), Some(false));
    assert_eq!(hardware_module_from_cert(&cert), Some(hmn));
    // Exactly these six extensions, in the documented order.
    let ids: Vec<_> = tbs
        .extensions
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.extn_id)
        .collect();
    assert_eq!(
        ids,
        vec![
            oid::CE_BASIC_CONSTRAINTS,
            oid::CE_KEY_USAGE,
            oid::CE_EXT_KEY_USAGE,
            oid::CE_SUBJECT_KEY_IDENTIFIER,
            oid::CE_AUTHORITY_KEY_IDENTIFIER,
            oid::CE_SUBJECT_ALT_NAME
        ]
    );
}

#[test]
fn issue_options_key_agreement_no_eku_no_san() {
    let p = pki(30);
    let device = device_signer(31);
    let spki = SubjectPublicKeyInfoOwned::from_der(device.public_key_spki_der()).unwrap();
    let subject = name_from_attrs(&[(oid::AT_COMMON_NAME, "m")]).unwrap();
    let mut params = IssueParams::new(
        subject,
        spki,
        random_serial(&mut rng(32)),
        t0(),
        t0() + YEAR,
    );
    params.key_agreement = true;
    params.extended_key_usage_client_auth = false;
    let cert = Certificate::from_der(&p.ca.issue(&params).unwrap()).unwrap();
    let (_, ku) = cert.tbs_certificate.get::<KeyUsage>().unwrap().unwrap();
    assert!(ku.digital_signature() && ku.key_agreement());
    assert!(cert
        .tbs_certificate
        .get::<ExtendedKeyUsage>()
        .unwrap()
        .is_none());
    assert_eq!(ext_critical(&cert, oid::CE_SUBJECT_ALT_NAME), None);
    assert_eq!(hardware_module_from_cert(&cert), None);
}

#[test]
fn empty_subject_needs_san_which_is_then_critical() {
    let p = pki(40);
    let device = device_signer(41);
    let spki = SubjectPublicKeyInfoOwned::from_der(device.public_key_spki_der()).unwrap();
    let empty = Name::default();
    let mut params = IssueParams::new(empty, spki, random_serial(&mut rng(42)), t0(), t0() + YEAR);
    assert!(matches!(p.ca.issue(&params), Err(CaError::InvalidName(_))));
    params.hardware_module = Some(HardwareModuleName::new(hw_type(), &[1, 2, 3, 4]).unwrap());
    let cert = Certificate::from_der(&p.ca.issue(&params).unwrap()).unwrap();
    assert_eq!(ext_critical(&cert, oid::CE_SUBJECT_ALT_NAME), Some(true));
}

#[test]
fn validity_is_clamped_to_ca_and_checked() {
    let p = pki(50);
    let device = device_signer(51);
    let spki = SubjectPublicKeyInfoOwned::from_der(device.public_key_spki_der()).unwrap();
    let subject = name_from_attrs(&[(oid::AT_COMMON_NAME, "m")]).unwrap();
    let mut params = IssueParams::new(
        subject,
        spki,
        random_serial(&mut rng(52)),
        t0(),
        idevid_no_expiry(),
    );
    let cert = Certificate::from_der(&p.ca.issue(&params).unwrap()).unwrap();
    assert_eq!(
        cert.tbs_certificate.validity.not_after.to_system_time(),
        p.ca.not_after()
    );
    params.not_after = params.not_before;
    assert!(matches!(
        p.ca.issue(&params),
        Err(CaError::InvalidValidity(_))
    ));
    params.not_before = UNIX_EPOCH - Duration::from_secs(1);
    params.not_after = t0();
    assert!(matches!(
        p.ca.issue(&params),
        Err(CaError::InvalidValidity(_))
    ));
}

#[test]
fn utctime_through_2049_generalizedtime_from_2050() {
    use issue::to_time;
    // 2049-12-31T23:59:59Z and 2050-01-01T00:00:00Z.
    let last_utc = UNIX_EPOCH + Duration::from_secs(2_524_607_999);
    let first_gen = UNIX_EPOCH + Duration::from_secs(2_524_608_000);
    assert!(matches!(to_time(last_utc).unwrap(), Time::UtcTime(_)));
    assert!(matches!(to_time(first_gen).unwrap(), Time::GeneralTime(_)));
    let forever = to_time(idevid_no_expiry()).unwrap();
    assert_eq!(forever.to_der().unwrap(), b"\x18\x0f99991231235959Z");
    // Sub-second parts are dropped, not rounded.
    let t = to_time(t0() + Duration::from_millis(999)).unwrap();
    assert_eq!(t.to_system_time(), t0());
    assert!(to_time(idevid_no_expiry() + Duration::from_secs(1)).is_err());
}

#[test]
fn serials_are_positive_16_octets_and_distinct() {
    let mut r = rng(60);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let s = random_serial(&mut r);
        let b = s.as_bytes();
        assert_eq!(b.len(), 16);
        assert!((0x40..0x80).contains(&b[0]), "first octet {:#x}", b[0]);
        // DER INTEGER content is the same 16 octets: positive, no 0x00 pad.
        let der = s.to_der().unwrap();
        assert_eq!(&der[..2], &[0x02, 16]);
        assert!(seen.insert(b.to_vec()));
    }
}

#[test]
fn ca_key_mismatch_and_non_ca_are_refused() {
    let mut r = rng(70);
    let (cert, _key) = generate_root_ca("A", "", t0(), YEAR, &mut r).unwrap();
    let other = generate_p256_pkcs8(&mut r).unwrap();
    let err = IssuingCa::new(
        cert,
        Box::new(RingP256Signer::from_pkcs8_der(&other).unwrap()),
    )
    .unwrap_err();
    assert_eq!(err, CaError::KeyMismatch);

    // An end-entity certificate with its own key is not a CA.
    let p = pki(71);
    let (ee, ee_key) =
        mint_idevid(&p.ca, "SN1", hw_type(), t0(), idevid_no_expiry(), &mut r).unwrap();
    let err = IssuingCa::new(
        ee,
        Box::new(RingP256Signer::from_pkcs8_der(&ee_key).unwrap()),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::NotACa(_)));
    assert!(matches!(
        IssuingCa::new(vec![0x30, 0x00], Box::new(device_signer(72))),
        Err(CaError::Der(_))
    ));
}

#[test]
fn sub_ca_chain_and_server_cert() {
    let p = pki(80);
    let mut r = rng(81);
    let (sub_cert, sub_key) = generate_sub_ca(
        &p.ca,
        "Issuing CA 1",
        "Example Meters",
        t0(),
        5 * YEAR,
        &mut r,
    )
    .unwrap();
    let sub = IssuingCa::new(
        sub_cert,
        Box::new(RingP256Signer::from_pkcs8_der(&sub_key).unwrap()),
    )
    .unwrap();
    let (_, bc) = sub
        .certificate()
        .tbs_certificate
        .get::<BasicConstraints>()
        .unwrap()
        .unwrap();
    assert_eq!((bc.ca, bc.path_len_constraint), (true, Some(0)));
    assert!(signature_verifies(sub.certificate(), p.ca.certificate()));
    let (_, aki) = sub
        .certificate()
        .tbs_certificate
        .get::<AuthorityKeyIdentifier>()
        .unwrap()
        .unwrap();
    assert_eq!(
        aki.key_identifier.unwrap().as_bytes(),
        p.ca.key_identifier()
    );

    let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let (srv, srv_key) =
        generate_server_cert(&sub, &["localhost".to_string()], &ips, t0(), YEAR, &mut r).unwrap();
    let srv_signer = RingP256Signer::from_pkcs8_der(&srv_key).unwrap();
    assert_eq!(
        p256_spki_from_pkcs8(&srv_key).unwrap().to_der().unwrap(),
        srv_signer.public_key_spki_der()
    );
    let srv = Certificate::from_der(&srv).unwrap();
    assert!(signature_verifies(&srv, sub.certificate()));
    assert_eq!(
        common_name(&srv.tbs_certificate.subject).as_deref(),
        Some("localhost")
    );
    let (_, eku) = srv
        .tbs_certificate
        .get::<ExtendedKeyUsage>()
        .unwrap()
        .unwrap();
    assert_eq!(eku.0, vec![oid::KP_SERVER_AUTH]);
    let san = subject_alt_name_from_cert(&srv).unwrap().unwrap();
    assert_eq!(san.0.len(), 3);
    assert!(generate_server_cert(&sub, &[], &[], t0(), YEAR, &mut r).is_err());
    assert!(
        generate_server_cert(&sub, &["bad\u{e9}".to_string()], &[], t0(), YEAR, &mut r).is_err()
    );
}

#[test]
fn minted_idevid_carries_serial_number_and_hardware_module() {
    let p = pki(90);
    let (der, key) = mint_idevid(
        &p.ca,
        "WT1234",
        hw_type(),
        t0(),
        idevid_no_expiry(),
        &mut rng(91),
    )
    .unwrap();
    let cert = Certificate::from_der(&der).unwrap();
    let subject = &cert.tbs_certificate.subject;
    assert_eq!(serial_number_attr(subject).as_deref(), Some("WT1234"));
    assert_eq!(common_name(subject).as_deref(), Some("WT1234"));
    assert_eq!(organization(subject).as_deref(), Some("Example Meters"));
    assert_eq!(
        hardware_module_from_cert(&cert),
        Some(HardwareModuleName::new(hw_type(), b"WT1234").unwrap())
    );
    assert!(signature_verifies(&cert, p.ca.certificate()));
    // Key in the PKCS#8 matches the certificate.
    let signer = RingP256Signer::from_pkcs8_der(&key).unwrap();
    assert_eq!(
        cert.tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap(),
        signer.public_key_spki_der()
    );
    // serialNumber is a PrintableString: a character outside its set is refused.
    assert!(matches!(
        mint_idevid(
            &p.ca,
            "SN_1",
            hw_type(),
            t0(),
            idevid_no_expiry(),
            &mut rng(92)
        ),
        Err(CaError::InvalidName(_))
    ));
}

// ---------------------------------------------------------------- CSR

fn sample_csr(seed: u64) -> (RingP256Signer, Vec<u8>) {
    let device = device_signer(seed);
    let subject = name_from_attrs(&[
        (oid::AT_COMMON_NAME, "meter-0001"),
        (oid::AT_SERIAL_NUMBER, "SN0001"),
    ])
    .unwrap();
    let hmn = HardwareModuleName::new(hw_type(), b"SN0001").unwrap();
    let csr = build_csr(&device, &subject, Some(&hmn), Some("dGxzLXVuaXF1ZQ==")).unwrap();
    (device, csr)
}

#[test]
fn built_csr_parses_and_verifies() {
    let (device, csr) = sample_csr(100);
    let parsed = parse_and_verify_csr(&csr, 4096).unwrap();
    assert_eq!(parsed.der, csr);
    assert_eq!(parsed.digest, csr_digest(&csr));
    assert_eq!(common_name(&parsed.subject).as_deref(), Some("meter-0001"));
    assert_eq!(parsed.public_key_sec1(), device.public_key_sec1());
    assert_eq!(
        parsed.hardware_module,
        Some(HardwareModuleName::new(hw_type(), b"SN0001").unwrap())
    );
    assert_eq!(
        parsed.challenge_password.as_deref(),
        Some(&b"dGxzLXVuaXF1ZQ=="[..])
    );
    assert!(parsed.requested_san_present);
    assert_eq!(parsed.requested_extensions.len(), 1);

    let plain = build_csr(&device, &parsed.subject, None, None).unwrap();
    let parsed2 = parse_and_verify_csr(&plain, 4096).unwrap();
    assert!(!parsed2.requested_san_present && parsed2.hardware_module.is_none());
    assert!(parsed2.challenge_password.is_none());
    assert_ne!(parsed2.digest, parsed.digest);
}

#[test]
fn csr_size_limit() {
    let (_, csr) = sample_csr(101);
    assert_eq!(
        parse_and_verify_csr(&csr, csr.len() - 1),
        Err(CsrError::TooLarge {
            len: csr.len(),
            max: csr.len() - 1
        })
    );
    assert!(parse_and_verify_csr(&csr, csr.len()).is_ok());
}

#[test]
fn csr_trailing_bytes_and_truncation_are_malformed() {
    let (_, csr) = sample_csr(102);
    let mut trailing = csr.clone();
    trailing.push(0);
    assert!(matches!(
        parse_and_verify_csr(&trailing, 4096),
        Err(CsrError::Malformed(_))
    ));
    for cut in [0, 1, 2, 10, csr.len() / 2, csr.len() - 1] {
        assert!(
            matches!(
                parse_and_verify_csr(&csr[..cut], 4096),
                Err(CsrError::Malformed(_))
            ),
            "cut {cut}"
        );
    }
}

#[test]
fn csr_tampered_subject_is_bad_signature() {
    let (_, csr) = sample_csr(103);
    let pos = csr.windows(10).position(|w| w == b"meter-0001").unwrap();
    let mut tampered = csr.clone();
    tampered[pos + 9] = b'2';
    assert_eq!(
        parse_and_verify_csr(&tampered, 4096),
        Err(CsrError::BadSignature)
    );
    // A signature from another key over the same info.
    let (_, other) = sample_csr(104);
    let req_a = x509_cert::request::CertReq::from_der(&csr).unwrap();
    let req_b = x509_cert::request::CertReq::from_der(&other).unwrap();
    let swapped = x509_cert::request::CertReq {
        signature: req_b.signature,
        ..req_a
    };
    assert_eq!(
        parse_and_verify_csr(&swapped.to_der().unwrap(), 4096),
        Err(CsrError::BadSignature)
    );
}

#[test]
fn csr_other_algorithms_are_unsupported() {
    let (_, csr) = sample_csr(105);
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    // ecdsa-with-SHA384 over a P-256 key.
    req.algorithm.oid = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
    assert_eq!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedSignatureAlgorithm(req.algorithm.oid))
    );
    // Parameters present (NULL) are refused too (RFC 5758 §3.2: MUST be absent).
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.algorithm.parameters = Some(der::Any::null());
    assert!(matches!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedSignatureAlgorithm(_))
    ));
    // P-384 named curve.
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.info.public_key.algorithm.parameters =
        Some(der::Any::encode_from(&ObjectIdentifier::new_unwrap("1.3.132.0.34")).unwrap());
    assert!(matches!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));
    // Compressed point.
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    let mut point = req.info.public_key.subject_public_key.raw_bytes()[..33].to_vec();
    point[0] = 0x02;
    req.info.public_key.subject_public_key = der::asn1::BitString::from_bytes(&point).unwrap();
    assert_eq!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedKey("compressed EC point"))
    );
    // Not an EC key at all (rsaEncryption OID).
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.info.public_key.algorithm.oid = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    assert!(matches!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));
}

#[test]
fn csr_point_not_on_curve_is_bad_signature() {
    let (_, csr) = sample_csr(106);
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    let mut point = req.info.public_key.subject_public_key.raw_bytes().to_vec();
    point[64] ^= 1;
    req.info.public_key.subject_public_key = der::asn1::BitString::from_bytes(&point).unwrap();
    assert_eq!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::BadSignature)
    );
}

/// C509 test vectors draft (C509TV, "ECDSA With SHA256" certification request; source in
/// docs/design.md §4): 253-byte CSR, CN=ecdsa-p256, extensionRequest SAN dNSName example.com.
const C509TV_CSR_PEM: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIH6MIGgAgEAMBUxEzARBgNVBAMMCmVjZHNhLXAyNTYwWTATBgcqhkjOPQIBBggq
hkjOPQMBBwNCAAT0E1lqhxJZlbTg2Le++8TW7bEfYa8IqzJAjU/5+QeN26s2Na/U
ltVlaiLv3D1ZxEgqmYNrs1j79Mp405MENshXoCkwJwYJKoZIhvcNAQkOMRowGDAW
BgNVHREEDzANggtleGFtcGxlLmNvbTAKBggqhkjOPQQDAgNJADBGAiEAiiXoqruk
sZuODRWWpHbCxC9QaPXzRXYGgG4vKEoi5ucCIQDV7zUSEnMONXpslIgD2G+1pK+m
0zKj5RlqeIHj1cykkA==
-----END CERTIFICATE REQUEST-----
";

#[test]
fn c509tv_csr_vector_parses_and_verifies() {
    let (label, der) = der::pem::decode_vec(C509TV_CSR_PEM.as_bytes()).unwrap();
    assert_eq!(label, "CERTIFICATE REQUEST");
    assert_eq!(der.len(), 253);
    let parsed = parse_and_verify_csr(&der, 1024).unwrap();
    assert_eq!(common_name(&parsed.subject).as_deref(), Some("ecdsa-p256"));
    assert!(parsed.requested_san_present && parsed.hardware_module.is_none());
    assert_eq!(&parsed.public_key_sec1()[..4], &[0x04, 0xF4, 0x13, 0x59]);
    let san = parsed.requested_san.unwrap();
    assert!(
        matches!(&san.0[..], [x509_cert::ext::pkix::name::GeneralName::DnsName(d)] if d.as_str() == "example.com")
    );
}

/// RFC 9148 App. A.2 / C509 draft App. A.2 IEEE 802.1AR certificate (577 bytes; source in
/// docs/design.md §4).
const DEVID_802_1AR_HEX: &str = "
30 82 02 3D 30 82 01 E2 A0 03 02 01 02 02 08 7E 76 61 D7 B5 4E 46 32
30 0A 06 08 2A 86 48 CE 3D 04 03 02 30 5D 31 0B 30 09 06 03 55 04 06
13 02 55 53 31 0B 30 09 06 03 55 04 08 0C 02 43 41 31 14 30 12 06 03
55 04 0A 0C 0B 45 78 61 6D 70 6C 65 20 49 6E 63 31 16 30 14 06 03 55
04 0B 0C 0D 63 65 72 74 69 66 69 63 61 74 69 6F 6E 31 13 30 11 06 03
55 04 03 0C 0A 38 30 32 2E 31 41 52 20 43 41 30 20 17 0D 31 39 30 31
33 31 31 31 32 39 31 36 5A 18 0F 39 39 39 39 31 32 33 31 32 33 35 39
35 39 5A 30 5C 31 0B 30 09 06 03 55 04 06 13 02 55 53 31 0B 30 09 06
03 55 04 08 0C 02 43 41 31 0B 30 09 06 03 55 04 07 0C 02 4C 41 31 14
30 12 06 03 55 04 0A 0C 0B 65 78 61 6D 70 6C 65 20 49 6E 63 31 0C 30
0A 06 03 55 04 0B 0C 03 49 6F 54 31 0F 30 0D 06 03 55 04 05 13 06 57
74 31 32 33 34 30 59 30 13 06 07 2A 86 48 CE 3D 02 01 06 08 2A 86 48
CE 3D 03 01 07 03 42 00 04 C8 B4 21 F1 1C 25 E4 7E 3A C5 71 23 BF 2D
9F DC 49 4F 02 8B C3 51 CC 80 C0 3F 15 0B F5 0C FF 95 8D 75 41 9D 81
A6 A2 45 DF FA E7 90 BE 95 CF 75 F6 02 F9 15 26 18 F8 16 A2 B2 3B 56
38 E5 9F D9 A3 81 8A 30 81 87 30 09 06 03 55 1D 13 04 02 30 00 30 1D
06 03 55 1D 0E 04 16 04 14 96 60 0D 87 16 BF 7F D0 E7 52 D0 AC 76 07
77 AD 66 5D 02 A0 30 1F 06 03 55 1D 23 04 18 30 16 80 14 68 D1 65 51
F9 51 BF C8 2A 43 1D 0D 9F 08 BC 2D 20 5B 11 60 30 0E 06 03 55 1D 0F
01 01 FF 04 04 03 02 05 A0 30 2A 06 03 55 1D 11 04 23 30 21 A0 1F 06
08 2B 06 01 05 05 07 08 04 A0 13 30 11 06 09 2B 06 01 04 01 B4 3B 0A
01 04 04 01 02 03 04 30 0A 06 08 2A 86 48 CE 3D 04 03 02 03 49 00 30
46 02 21 00 C0 D8 19 96 D2 50 7D 69 3F 3C 48 EA A5 EE 94 91 BD A6 DB
21 40 99 D9 81 17 C6 3B 36 13 74 CD 86 02 21 00 A7 74 98 9F 4C 32 1A
5C F2 5D 83 2A 4D 33 6A 08 AD 67 DF 20 F1 50 64 21 18 8A 0A DE 6D 34
92 36";

fn devid_vector() -> Vec<u8> {
    let hex: String = DEVID_802_1AR_HEX.split_whitespace().collect();
    hex::decode(hex).unwrap()
}

#[test]
fn rfc9148_devid_vector_names_and_hardware_module() {
    let der = devid_vector();
    assert_eq!(der.len(), 577);
    let cert = Certificate::from_der(&der).unwrap();
    let subject = &cert.tbs_certificate.subject;
    assert_eq!(serial_number_attr(subject).as_deref(), Some("Wt1234"));
    assert_eq!(organization(subject).as_deref(), Some("example Inc"));
    assert_eq!(common_name(subject), None);
    assert_eq!(
        common_name(&cert.tbs_certificate.issuer).as_deref(),
        Some("802.1AR CA")
    );
    assert_eq!(
        hardware_module_from_cert(&cert),
        Some(HardwareModuleName::new(hw_type(), &[1, 2, 3, 4]).unwrap())
    );
    assert_eq!(
        cert.tbs_certificate.validity.not_after.to_system_time(),
        idevid_no_expiry()
    );
}

// ---------------------------------------------------------------- certs-only

#[test]
fn certs_only_round_trip_and_dedup() {
    let p = pki(110);
    let vector = devid_vector();
    let ca = p.ca.certificate_der();
    let p7 = certs_only(&[&vector, ca, &vector]).unwrap();
    let mut back = certs_from_certs_only(&p7).unwrap();
    assert_eq!(back.len(), 2);
    back.sort();
    let mut expect = vec![vector.clone(), ca.to_vec()];
    expect.sort();
    assert_eq!(back, expect);

    // Structure: ContentInfo id-signedData, SignedData v1 with no digests and no signers.
    let ci = cms::content_info::ContentInfo::from_der(&p7).unwrap();
    assert_eq!(ci.content_type, oid::CMS_SIGNED_DATA);
    let sd = ci
        .content
        .decode_as::<cms::signed_data::SignedData>()
        .unwrap();
    assert_eq!(sd.version, cms::content_info::CmsVersion::V1);
    assert!(sd.digest_algorithms.is_empty() && sd.signer_infos.0.is_empty());
    assert_eq!(sd.encap_content_info.econtent_type, oid::CMS_DATA);
    assert!(sd.encap_content_info.econtent.is_none());

    // RFC 9148 App. A.2 wraps this 577-byte DevID in a 626-byte reply. Ours is 624 bytes:
    // 4+11 (ContentInfo, id-signedData) + 4 ([0]) + 4 (SignedData) + 3 (version 1) + 2 (empty
    // digestAlgorithms) + 13 (encapContentInfo id-data) + 4 ([0] certificates) + 577 + 2 (empty
    // signerInfos). The RFC's (OpenSSL-made) example also carries an empty `crls [1]` (A1 00),
    // which RFC 5652 §5.1 makes OPTIONAL.
    let one = certs_only(&[&vector]).unwrap();
    assert_eq!(one.len(), 624);
    assert_eq!(&one[one.len() - 2..], &[0x31, 0x00]);
    assert_eq!(certs_from_certs_only(&one).unwrap(), vec![vector.clone()]);
    assert_eq!(
        certs_from_certs_only(&certs_only(&[]).unwrap()).unwrap(),
        Vec::<Vec<u8>>::new()
    );
}

#[test]
fn certs_only_encoding_equals_the_cms_crate_schema() {
    // Our raw-certificate SignedData must be byte-identical to what the cms crate's types encode.
    use cms::cert::CertificateChoices;
    use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignedData, SignerInfos};
    let p = pki(111);
    let (idev, _) =
        mint_idevid(&p.ca, "SN111", hw_type(), t0(), t0() + YEAR, &mut rng(112)).unwrap();
    let certs = [idev.as_slice(), p.ca.certificate_der(), &devid_vector()];
    let choices: Vec<_> = certs
        .iter()
        .map(|d| CertificateChoices::Certificate(Certificate::from_der(d).unwrap()))
        .collect();
    let sd = SignedData {
        version: cms::content_info::CmsVersion::V1,
        digest_algorithms: der::asn1::SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: oid::CMS_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet::try_from(choices).unwrap()),
        crls: None,
        signer_infos: SignerInfos(der::asn1::SetOfVec::new()),
    };
    let ci = cms::content_info::ContentInfo {
        content_type: oid::CMS_SIGNED_DATA,
        content: der::Any::encode_from(&sd).unwrap(),
    };
    assert_eq!(certs_only(&certs).unwrap(), ci.to_der().unwrap());
}

/// What `certs_from_certs_only` returned before it read certificates as TLVs: the cms
/// crate's types, each certificate decoded and re-encoded. The reference for the
/// differential test below.
fn certs_from_certs_only_with_cms(der: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ci = cms::content_info::ContentInfo::from_der(der).ok()?;
    if ci.content_type != oid::CMS_SIGNED_DATA {
        return None;
    }
    let sd = ci
        .content
        .decode_as::<cms::signed_data::SignedData>()
        .ok()?;
    let mut out = Vec::new();
    for choice in sd.certificates.map(|s| s.0.into_vec()).unwrap_or_default() {
        if let cms::cert::CertificateChoices::Certificate(c) = choice {
            out.push(c.to_der().ok()?);
        }
    }
    Some(out)
}

/// Differential: on a certs-only message and on every one-bit flip and every truncation of
/// it, whatever the cms crate's full decode reads, the TLV reader reads too (the same
/// certificates, byte for byte as carried rather than re-encoded); what
/// only the TLV reader accepts (a certificate whose TBS does not decode) still has a
/// certificate's outer shape. A message with crls and an attribute-certificate choice reads
/// as its certificates.
#[test]
fn certs_only_reads_what_the_cms_crate_reads() {
    let p = pki(113);
    let p7 = certs_only(&[p.ca.certificate_der(), &devid_vector()]).unwrap();
    let mut inputs = vec![p7.clone()];
    for i in 0..p7.len() {
        inputs.push(p7[..i].to_vec());
        for bit in 0..8 {
            let mut m = p7.clone();
            m[i] ^= 1 << bit;
            inputs.push(m);
        }
    }
    let mut agreed = 0;
    for m in &inputs {
        let ours = certs_from_certs_only(m);
        match certs_from_certs_only_with_cms(m) {
            Some(reference) => {
                // The same certificates; the cms crate's are re-encoded (a TBS that is not
                // canonical DER, e.g. an explicit v1 version, comes back normalised), ours
                // are as carried.
                let ours: Vec<Vec<u8>> = ours
                    .unwrap_or_else(|e| panic!("{e}: {}", hex::encode(m)))
                    .iter()
                    .map(|c| Certificate::from_der(c).unwrap().to_der().unwrap())
                    .collect();
                assert_eq!(ours, reference, "{}", hex::encode(m));
                agreed += 1;
            }
            None => {
                for c in ours.unwrap_or_default() {
                    assert!(super::pkcs7::CertificateShape::from_der(&c).is_ok());
                }
            }
        }
    }
    assert!(agreed > 1, "the mutations are not all refused");

    // crls [1] (empty) and an attribute certificate ([1] IMPLICIT in CertificateChoices),
    // spliced in by hand: SET OF is ordered by encoding, so the [1] choice (A1) sorts last.
    let ca = p.ca.certificate_der();
    let attr_cert: &[u8] = &[0xA1, 0x03, 0x02, 0x01, 0x00];
    let set_body = [ca, attr_cert].concat();
    let mut sd_body = vec![0x02, 0x01, 0x01, 0x31, 0x00];
    sd_body.extend_from_slice(&[0x30, 0x0B, 0x06, 0x09]);
    sd_body.extend_from_slice(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x01]);
    sd_body.extend(tlv(0xA0, &set_body));
    sd_body.extend_from_slice(&[0xA1, 0x00, 0x31, 0x00]);
    let sd = tlv(0x30, &sd_body);
    let mut ci_body = vec![
        0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x02,
    ];
    ci_body.extend(tlv(0xA0, &sd));
    let msg = tlv(0x30, &ci_body);
    assert_eq!(certs_from_certs_only(&msg).unwrap(), vec![ca.to_vec()]);
}

#[test]
fn certs_only_rejects_garbage_and_non_signed_data() {
    assert!(matches!(
        certs_only(&[b"\x30\x03\x02\x01\x01"]),
        Err(CaError::Der(_))
    ));
    assert!(certs_from_certs_only(b"\x30\x00").is_err());
    let ci = cms::content_info::ContentInfo {
        content_type: oid::CMS_DATA,
        content: der::Any::encode_from(&der::asn1::OctetString::new(vec![1u8]).unwrap()).unwrap(),
    };
    assert_eq!(
        certs_from_certs_only(&ci.to_der().unwrap()),
        Err(CaError::UnexpectedCms("ContentInfo is not id-signedData"))
    );
}

#[test]
fn name_helpers() {
    let n = name_from_attrs(&[
        (oid::AT_COUNTRY_NAME, "DE"),
        (oid::AT_ORGANIZATION_NAME, "Zähler GmbH"),
        (oid::AT_COMMON_NAME, "outer"),
        (oid::AT_COMMON_NAME, "inner"),
    ])
    .unwrap();
    assert_eq!(common_name(&n).as_deref(), Some("inner"));
    assert_eq!(organization(&n).as_deref(), Some("Zähler GmbH"));
    assert_eq!(serial_number_attr(&n), None);
    assert_eq!(n.to_string(), "CN=inner,CN=outer,O=Zähler GmbH,C=DE");
    assert!(name_from_attrs(&[(oid::AT_COUNTRY_NAME, "Ü")]).is_err());
    assert!(name_from_attrs(&[(oid::AT_COMMON_NAME, "")]).is_err());
}

// ------------------------------------------------- CSR decoding cost bounds (hand-made DER)

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    let n = body.len();
    if n < 0x80 {
        v.push(n as u8);
    } else if n < 0x100 {
        v.extend([0x81, n as u8]);
    } else {
        v.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    v.extend_from_slice(body);
    v
}

/// A CSR signed by `device` whose subject is one RDN SET of `count` commonName-like attributes
/// (OIDs 1.2.3.<i>), in ascending or descending order, and whose attributes are `attrs` (raw).
fn handmade_csr(device: &RingP256Signer, count: usize, ascending: bool, attrs: &[u8]) -> Vec<u8> {
    let mut set = Vec::new();
    let order: Vec<usize> = if ascending {
        (0..count).collect()
    } else {
        (0..count).rev().collect()
    };
    for i in order {
        let oid = [
            0x06,
            0x04,
            0x2A,
            0x03,
            0x80 | (i >> 7) as u8,
            (i & 0x7f) as u8,
        ];
        set.extend(tlv(0x30, &[&oid[..], &[0x0C, 0x01, b'x']].concat()));
    }
    let name = tlv(0x30, &tlv(0x31, &set));
    let info = tlv(
        0x30,
        &[
            &[0x02, 0x01, 0x00][..],
            &name,
            device.public_key_spki_der(),
            &tlv(0xA0, attrs),
        ]
        .concat(),
    );
    let sig = device.sign(&info).unwrap();
    let alg = [
        0x30, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02,
    ];
    let bits = tlv(0x03, &[&[0u8][..], &sig].concat());
    tlv(0x30, &[&info[..], &alg, &bits].concat())
}

#[test]
fn csr_small_unsorted_set_is_accepted_and_verified_over_received_bytes() {
    // Not DER (SET OF out of order), but small: decoded (der sorts it) and the signature is checked
    // over the bytes as received, not over the re-sorted encoding.
    let device = device_signer(120);
    let csr = handmade_csr(&device, 5, false, &[]);
    let parsed = parse_and_verify_csr(&csr, 4096).unwrap();
    assert_eq!(parsed.subject.0.len(), 1);
    assert_eq!(parsed.subject.0[0].0.len(), 5);
    // The re-encoding is sorted, so it is not what was signed.
    let reencoded = parsed.subject.to_der().unwrap();
    assert!(!csr
        .windows(reencoded.len())
        .any(|w| w == reencoded.as_slice()));
}

#[test]
fn csr_large_unsorted_set_is_refused_before_decoding() {
    let device = device_signer(121);
    let big_unsorted = handmade_csr(&device, 200, false, &[]);
    assert_eq!(
        parse_and_verify_csr(&big_unsorted, 8192),
        Err(CsrError::Malformed(Tag::Set.value_error()))
    );
    // The same set in DER order is fine (the decoder's sort is then linear).
    let big_sorted = handmade_csr(&device, 200, true, &[]);
    assert_eq!(
        parse_and_verify_csr(&big_sorted, 8192).unwrap().subject.0[0]
            .0
            .len(),
        200
    );
}

#[test]
fn csr_deep_nesting_is_refused() {
    let device = device_signer(122);
    // An unknown attribute whose value nests 40 SEQUENCEs.
    let mut v = vec![0x05, 0x00];
    for _ in 0..40 {
        v = tlv(0x30, &v);
    }
    let attr = tlv(
        0x30,
        &[&[0x06, 0x03, 0x2A, 0x03, 0x04][..], &tlv(0x31, &v)].concat(),
    );
    let csr = handmade_csr(&device, 1, true, &attr);
    assert!(matches!(
        parse_and_verify_csr(&csr, 8192),
        Err(CsrError::Malformed(_))
    ));
    // 10 levels are fine.
    let mut v = vec![0x05, 0x00];
    for _ in 0..10 {
        v = tlv(0x30, &v);
    }
    let attr = tlv(
        0x30,
        &[&[0x06, 0x03, 0x2A, 0x03, 0x04][..], &tlv(0x31, &v)].concat(),
    );
    assert!(parse_and_verify_csr(&handmade_csr(&device, 1, true, &attr), 8192).is_ok());
}

// ---------------------------------------------------------------- properties

mod props {
    use super::*;
    use proptest::prelude::*;

    fn seed() -> proptest::test_runner::RngSeed {
        crate::test_support::proptest_seed(0x0ca5_eed5)
    }

    fn csr_and_signer() -> &'static (RingP256Signer, Vec<u8>) {
        static CELL: std::sync::OnceLock<(RingP256Signer, Vec<u8>)> = std::sync::OnceLock::new();
        CELL.get_or_init(|| sample_csr(200))
    }

    proptest! {
        // Fixed seed: the same cases on every run (override with PROPTEST_RNG_SEED to explore).
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: seed(), ..ProptestConfig::default() })]

        /// Any single-byte change, truncation or insertion of a valid CSR is refused without panic
        /// (the only acceptable outcome is an error: every byte is covered by DER or the signature).
        #[test]
        fn mutated_csr_is_refused(pos in 0usize..400, byte in any::<u8>(), kind in 0u8..3) {
            let (_, csr) = csr_and_signer();
            let pos = pos % csr.len();
            let mut m = csr.clone();
            match kind {
                0 => { if m[pos] == byte { return Ok(()); } m[pos] = byte; }
                1 => m.truncate(pos),
                _ => m.insert(pos, byte),
            }
            prop_assert!(parse_and_verify_csr(&m, 4096).is_err());
        }

        /// Arbitrary bytes never panic, and a verdict is reproducible.
        #[test]
        fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let a = parse_and_verify_csr(&data, 4096);
            prop_assert_eq!(a, parse_and_verify_csr(&data, 4096));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, rng_seed: seed(), ..ProptestConfig::default() })]

        /// CSR -> issue round trip for arbitrary UTF-8 common names and serials: the issued
        /// certificate carries exactly the requested subject and hardwareModuleName.
        #[test]
        fn csr_to_certificate_round_trip(
            cn in "\\PC{1,40}",
            serial in "[A-Za-z0-9 ]{1,24}",
            hw_serial in proptest::collection::vec(any::<u8>(), 0..32),
            seed in any::<u64>(),
        ) {
            let p = pki(300);
            let device = device_signer(seed);
            let subject = name_from_attrs(&[(oid::AT_COMMON_NAME, &cn), (oid::AT_SERIAL_NUMBER, &serial)]).unwrap();
            let hmn = HardwareModuleName::new(hw_type(), &hw_serial).unwrap();
            let csr = parse_and_verify_csr(&build_csr(&device, &subject, Some(&hmn), None).unwrap(), 4096).unwrap();
            prop_assert_eq!(common_name(&csr.subject), Some(cn.clone()));
            let der = p.ca.issue(&IssueParams::from_csr(&csr, random_serial(&mut rng(seed)), t0(), t0() + YEAR)).unwrap();
            let cert = Certificate::from_der(&der).unwrap();
            prop_assert_eq!(&cert.tbs_certificate.subject, &subject);
            prop_assert_eq!(common_name(&cert.tbs_certificate.subject), Some(cn));
            prop_assert_eq!(serial_number_attr(&cert.tbs_certificate.subject), Some(serial));
            prop_assert_eq!(hardware_module_from_cert(&cert), Some(hmn));
            prop_assert!(signature_verifies(&cert, p.ca.certificate()));
        }
    }
}

/// A P-384 issuing CA (self-signed with ecdsa-with-SHA384).
fn p384_ca() -> IssuingCa {
    let signer = RingP384Signer::from_pkcs8_der(&generate_p384_pkcs8().unwrap()).unwrap();
    let cert = self_signed_ca(
        &signer,
        "P-384 CA",
        "Example",
        t0(),
        10 * YEAR,
        &mut rng(300),
    )
    .unwrap();
    IssuingCa::new(cert, Box::new(signer)).unwrap()
}

#[test]
fn p384_csr_is_accepted_and_p384_ca_signs_with_sha384() {
    let ca = p384_ca();
    let root = Certificate::from_der(ca.certificate_der()).unwrap();
    assert_eq!(root.signature_algorithm.oid, oid::ECDSA_WITH_SHA384);
    assert_eq!(
        Curve::of_spki(&root.tbs_certificate.subject_public_key_info),
        Some(Curve::P384)
    );
    // A P-384 device key; its CSR is signed ecdsa-with-SHA384.
    let device = RingP384Signer::from_pkcs8_der(&generate_p384_pkcs8().unwrap()).unwrap();
    let subject = name_from_attrs(&[(oid::AT_SERIAL_NUMBER, "P384-1")]).unwrap();
    let csr = build_csr(&device, &subject, None, None).unwrap();
    let req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    assert_eq!(req.algorithm.oid, oid::ECDSA_WITH_SHA384);
    let parsed = parse_and_verify_csr(&csr, 4096).unwrap();
    assert_eq!(parsed.curve(), Some(Curve::P384));
    assert_eq!(parsed.public_key_sec1().len(), 97);
    let params = IssueParams::from_csr(&parsed, random_serial(&mut rng(301)), t0(), t0() + YEAR);
    let cert = Certificate::from_der(&ca.issue(&params).unwrap()).unwrap();
    assert_eq!(cert.signature_algorithm.oid, oid::ECDSA_WITH_SHA384);
    assert_eq!(cert.tbs_certificate.signature.oid, oid::ECDSA_WITH_SHA384);
    let tbs = cert.tbs_certificate.to_der().unwrap();
    let ca_key = root
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_ASN1, ca_key)
        .verify(&tbs, cert.signature.raw_bytes())
        .unwrap();
    // Tampered: bad signature.
    let pos = csr.windows(6).position(|w| w == b"P384-1").unwrap();
    let mut tampered = csr.clone();
    tampered[pos + 5] = b'2';
    assert_eq!(
        parse_and_verify_csr(&tampered, 4096),
        Err(CsrError::BadSignature)
    );
    // A P-384 key with a P-256-length point, and an unsupported curve (secp521r1).
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.info.public_key.subject_public_key =
        der::asn1::BitString::from_bytes(&parsed.public_key_sec1()[..65]).unwrap();
    assert!(matches!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.info.public_key.algorithm.parameters =
        Some(der::Any::encode_from(&ObjectIdentifier::new_unwrap("1.3.132.0.35")).unwrap());
    assert!(matches!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedKey(_))
    ));
    // ecdsa-with-SHA512 is not accepted on P-384.
    let mut req = x509_cert::request::CertReq::from_der(&csr).unwrap();
    req.algorithm.oid = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
    assert_eq!(
        parse_and_verify_csr(&req.to_der().unwrap(), 4096),
        Err(CsrError::UnsupportedSignatureAlgorithm(req.algorithm.oid))
    );
}

#[test]
fn signer_from_pkcs8_tells_the_curves_apart() {
    let (c, s) = signer_from_pkcs8_der(&generate_p384_pkcs8().unwrap()).unwrap();
    assert_eq!(
        (c, s.signature_algorithm()),
        (Curve::P384, oid::ECDSA_WITH_SHA384)
    );
    let (c, s) = signer_from_pkcs8_der(&generate_p256_pkcs8(&mut rng(302)).unwrap()).unwrap();
    assert_eq!(
        (c, s.signature_algorithm()),
        (Curve::P256, oid::ECDSA_WITH_SHA256)
    );
    assert!(signer_from_pkcs8_der(b"not a key").is_err());
}
