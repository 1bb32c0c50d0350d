//! The draft's (-20) test vectors, byte for byte (see testdata/README.md for sources).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod common;

use cbor_schemas::c509::{self, C509Certificate, C509Csr, Name, SpecialText};
use cbor_schemas::{cose, ConvertError};
use common::*;
use der::{Decode, Encode};

#[test]
fn rfc7925_der_to_c509_type3_byte_for_byte() {
    // Draft -20 Appendix A.1: the type-3 example is the CBOR array C509Certificate.
    let der = vector("rfc7925.der");
    let want = vector("rfc7925.c509");
    assert_eq!((der.len(), want.len()), (316, 141));
    assert_eq!(want[0], 0x8b, "array of 11 items");
    let got = c509::certificate_der_to_c509(&der).unwrap();
    assert_eq!(hex::encode(&got), hex::encode(&want));
    assert_c509_certificate(&got);
}

#[test]
fn rfc7925_c509_type3_to_der_byte_for_byte() {
    let der = vector("rfc7925.der");
    let c = vector("rfc7925.c509");
    assert_eq!(c509::certificate_c509_to_der(&c).unwrap(), der);
    // Parse and re-encode is the identity.
    assert_eq!(C509Certificate::from_array(&c).unwrap().to_array(), c);
}

#[test]
fn draft18_sequence_form_is_refused_on_the_wire() {
    // -18's 140-byte ~C509Certificate (the -20 bytes without the array header) is
    // no longer a wire form: the converter and COSE_C509 refuse it.
    let c = vector("rfc7925.c509");
    let seq = &c[1..];
    assert!(c509::certificate_c509_to_der(seq).is_err());
    let native = vector("rfc7925-native.c509");
    assert!(
        c509::verify_native_certificate(&native[1..], &vector("rfc7925-issuerPublicKey")).is_err()
    );
    // -18's C509CertData: 58 8C + the native sequence.
    let mut old_cert_data = vec![0x58, 0x8c];
    old_cert_data.extend_from_slice(&native[1..]);
    assert!(cose::decode_cose_c509(&old_cert_data).is_err());
    // The model still reads the sequence (it is how the TBS is signed).
    assert_eq!(
        C509Certificate::from_sequence(seq).unwrap(),
        C509Certificate::from_array(&c).unwrap()
    );
}

#[test]
fn rfc7925_type3_fields_match_the_draft_annotation() {
    let c = C509Certificate::from_array(&vector("rfc7925.c509")).unwrap();
    assert_eq!(c.tbs.serial_number, vec![0x01, 0xf5, 0x0d]);
    assert_eq!(c.tbs.not_before, 1_672_531_200);
    assert_eq!(c.tbs.not_after, Some(1_767_225_600));
    assert_eq!(
        c.tbs.subject,
        Name::CommonName(SpecialText::Eui(hex::decode("0123456789ab").unwrap()))
    );
    assert_eq!(c.tbs.subject_public_key.first(), Some(&0xFE));
    // Last 64 bytes = r||s of the DER signature.
    let der = x509_cert::Certificate::from_der(&vector("rfc7925.der")).unwrap();
    let raw = c509::ecdsa_der_to_raw(der.signature.raw_bytes()).unwrap();
    assert_eq!(c.signature, raw);
}

#[test]
fn rfc7925_native_signature_verifies_with_the_issuer_key() {
    let native = vector("rfc7925-native.c509");
    assert_eq!((native.len(), native[0]), (141, 0x8b));
    let issuer_pub = vector("rfc7925-issuerPublicKey");
    // The given private key derives the given compressed public key.
    let sk = p256::ecdsa::SigningKey::from_slice(&vector("rfc7925-issuerPrivateKey")).unwrap();
    assert_eq!(
        sk.verifying_key().to_encoded_point(true).as_bytes(),
        issuer_pub.as_slice()
    );
    let c = c509::verify_native_certificate(&native, &issuer_pub).unwrap();
    assert_eq!(c.tbs.certificate_type, 2);
    // The signed TBS is the 74-byte CBOR sequence between the array header and the
    // signature (58 40 ...).
    assert_eq!(c.tbs.to_cbor_sequence(), native[1..75].to_vec());
    // Tampering breaks it.
    let mut bad = native.clone();
    bad[5] ^= 1; // serial number byte
    let r = c509::verify_native_certificate(&bad, &issuer_pub);
    assert!(matches!(r, Err(ConvertError::BadSignature)), "{r:?}");
    // A native certificate has no DER form.
    assert!(matches!(
        c509::certificate_c509_to_der(&native),
        Err(ConvertError::WrongType { found: 2, .. })
    ));
    assert_c509_certificate(&native);
}

#[test]
fn rfc7925_native_tbs_is_derived_from_the_x509_tbs() {
    // Appendix A.1: identical to the type-3 example except type, point
    // compression prefix and signature.
    let der = x509_cert::Certificate::from_der(&vector("rfc7925.der")).unwrap();
    let tbs = c509::tbs_from_x509(&der.tbs_certificate, 2).unwrap();
    let native = vector("rfc7925-native.c509");
    assert_eq!(
        hex::encode(tbs.to_cbor_sequence()),
        hex::encode(&native[1..75])
    );
}

#[test]
fn native_issuance_signs_and_verifies() {
    use p256::ecdsa::signature::Signer;
    let sk = p256::ecdsa::SigningKey::from_slice(&vector("rfc7925-issuerPrivateKey")).unwrap();
    let der = x509_cert::Certificate::from_der(&vector("rfc7925.der")).unwrap();
    let tbs = c509::tbs_from_x509(&der.tbs_certificate, 2).unwrap();
    let out = c509::sign_native_certificate(&tbs, |m| {
        let s: p256::ecdsa::Signature = sk.sign(m);
        s.to_der().as_bytes().to_vec()
    })
    .unwrap();
    assert_eq!((out.len(), out[0]), (141, 0x8b));
    assert_c509_certificate(&out);
    c509::verify_native_certificate(&out, &vector("rfc7925-issuerPublicKey")).unwrap();
    // Type 3 TBS is refused.
    let t3 = c509::tbs_from_x509(&der.tbs_certificate, 3).unwrap();
    assert!(c509::sign_native_certificate(&t3, |_| vec![]).is_err());
}

#[test]
fn rfc7925_native_cert_data_is_the_array_in_a_byte_string() {
    // Draft -20: C509CertData = bytes .cbor C509Certificate, "58 8D" + the array.
    let native = vector("rfc7925-native.c509");
    let cose = cose::cose_c509_chain(std::slice::from_ref(&native)).unwrap();
    assert_eq!(
        hex::encode(&cose),
        hex::encode(vector("rfc7925-native-certdata.c509"))
    );
    assert_eq!(cose.len(), 143);
    assert_eq!(&cose[..3], &[0x58, 0x8d, 0x8b]);
    assert_cose_c509(&cose);
    assert_eq!(cose::decode_cose_c509(&cose).unwrap(), vec![native]);
}

#[test]
fn ieee8021ar_der_577_to_c509_276_and_back() {
    let der = vector("ieee8021ar.der");
    let want = vector("ieee8021ar.c509");
    assert_eq!((der.len(), want.len()), (577, 276));
    let got = c509::certificate_der_to_c509(&der).unwrap();
    assert_eq!(hex::encode(&got), hex::encode(&want));
    assert_c509_certificate(&got);
    assert_eq!(c509::certificate_c509_to_der(&want).unwrap(), der);
    let c = C509Certificate::from_array(&want).unwrap();
    assert_eq!(c.tbs.not_after, None, "99991231235959Z is null");
    let hw = c.tbs.extensions.iter().find_map(|e| match &e.value {
        c509::ExtensionValue::SubjectAltName(g) => g.first().cloned(),
        _ => None,
    });
    assert_eq!(
        hw,
        Some(c509::GeneralName::HardwareModuleName {
            hw_type: hex::decode("2b06010401b43b0a01").unwrap(),
            hw_serial_num: vec![1, 2, 3, 4],
        })
    );
}

#[test]
fn c509tv_csr_der_to_type3_byte_for_byte_and_back() {
    let der = vector("c509tv-csr.der");
    let want = vector("c509tv-csr-type3.c509");
    assert_eq!((der.len(), want.len()), (253, 164));
    let got = c509::csr_der_to_c509(&der).unwrap();
    assert_eq!(hex::encode(&got), hex::encode(&want));
    assert_cddl("C509CertificationRequest", &got);
    assert_eq!(c509::csr_c509_to_der(&want).unwrap(), der);
}

#[test]
fn c509tv_csr_proof_of_possession_both_types() {
    for (name, ty) in [("c509tv-csr-type3.c509", 3u8), ("c509tv-csr-type2.c509", 2)] {
        let bytes = vector(name);
        assert_cddl("C509CertificationRequest", &bytes);
        let csr = C509Csr::decode(&bytes).unwrap();
        assert_eq!(csr.csr_type(), ty);
        csr.verify_pop().unwrap();
        // Corrupt one signature byte: PoP must fail.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        let bad = C509Csr::decode(&bad).unwrap();
        assert_eq!(bad.verify_pop(), Err(ConvertError::BadSignature));
        // Policy view.
        assert_eq!(csr.subject().unwrap().to_string(), "CN=ecdsa-p256");
        assert_eq!(
            csr.subject_alt_names(),
            vec![c509::GeneralName::DnsName("example.com".into())]
        );
        let exts = csr.extension_request().unwrap();
        assert_eq!(exts.len(), 1);
        assert_eq!(
            exts[0].extn_id,
            const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME
        );
    }
    // The SPKI of the type-3 request is exactly the PKCS#10 one.
    let der = x509_cert::request::CertReq::from_der(&vector("c509tv-csr.der")).unwrap();
    let csr = C509Csr::decode(&vector("c509tv-csr-type3.c509")).unwrap();
    assert_eq!(csr.subject_public_key_info().unwrap(), der.info.public_key);
    assert_eq!(
        csr.cert_req_info().unwrap().to_der().unwrap(),
        der.info.to_der().unwrap()
    );
    // Type 2 has no PKCS#10 form.
    assert!(c509::csr_c509_to_der(&vector("c509tv-csr-type2.c509")).is_err());
}

#[test]
fn c509tv_key_matches_the_request() {
    use p256::pkcs8::DecodePrivateKey;
    let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&vector("c509tv-csr-key.pkcs8")).unwrap();
    let csr = C509Csr::decode(&vector("c509tv-csr-type2.c509")).unwrap();
    assert_eq!(
        sk.verifying_key().to_encoded_point(false).as_bytes(),
        csr.request().tbs.subject_public_key.as_slice()
    );
}

#[test]
fn describe_reports_sizes() {
    let d = c509::describe(&vector("rfc7925.c509")).unwrap();
    assert!(d.contains("C509Certificate (CBOR array), 141 bytes"), "{d}");
    assert!(d.contains("issuerSignatureValue: 64 B"), "{d}");
    let d = c509::describe(&vector("ieee8021ar.c509")).unwrap();
    assert!(d.contains("notAfter: null"), "{d}");
    let d = c509::describe(&vector("c509tv-csr-type3.c509")).unwrap();
    assert!(d.contains("C509CertificationRequest, 164 bytes"), "{d}");
    let d = c509::describe(&vector("rfc7925-native-certdata.c509")).unwrap();
    assert!(
        d.contains("COSE_C509 with 1 certificate(s), 143 bytes"),
        "{d}"
    );
    assert!(
        d.contains("certificate #0: C509Certificate, 141 bytes"),
        "{d}"
    );
    // -18's sequence form is still described, and labelled as such.
    let d = c509::describe(&vector("rfc7925.c509")[1..]).unwrap();
    assert!(d.contains("the draft -18 form), 140 bytes"), "{d}");
}

#[test]
fn cddl_validator_rejects_wrong_items() {
    // The CDDL tie is real: broken items fail validation.
    let c = vector("rfc7925.c509");
    assert!(
        check_cddl("C509Certificate", &c[1..]).is_err(),
        "a bare sequence is not the array"
    );
    let mut arr = c.clone();
    arr[1] = 0x60; // type as text ""
    assert!(check_cddl("C509Certificate", &arr).is_err());
    assert!(check_cddl("C509CertificationRequest", &c).is_err());
    // COSE_C509: the byte string must hold the array (.cbor), not -18's sequence.
    let mut old = vec![0x58, 0x8c];
    old.extend_from_slice(&c[1..]);
    assert!(check_cddl("COSE_C509", &old).is_err());
    let mut new = vec![0x58, 0x8d];
    new.extend_from_slice(&c);
    assert!(check_cddl("COSE_C509", &new).is_ok());
    assert!(check_cddl("multipart-core", &[0x82, 0x19, 0x01, 0x1c, 0x01]).is_err());
}

#[test]
fn rfc7925_cose_sizes() {
    // Draft -18 Section 6.2 gave COSE_X509 319 bytes vs COSE_C509 142 bytes; with
    // -20's C509CertData (the array in a byte string) COSE_C509 is one byte more.
    let der = vector("rfc7925.der");
    assert_eq!(
        cose::cose_x509_chain(std::slice::from_ref(&der))
            .unwrap()
            .len(),
        319
    );
    let c = cose::cose_c509_chain_from_der(&[der]).unwrap();
    assert_eq!(c.len(), 143);
    assert_cose_c509(&c);
}
