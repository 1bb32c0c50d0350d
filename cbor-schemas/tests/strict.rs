//! Decoder strictness, conversion refusals, COSE headers and multipart-core.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod common;

use cbor_schemas::c509::{self, C509Certificate, C509Csr};
use cbor_schemas::{cose, multipart, ConvertError, DecodeError};
use common::*;
use der::{Decode, Encode};

fn splice(v: &[u8], at: usize, remove: usize, insert: &[u8]) -> Vec<u8> {
    let mut out = v[..at].to_vec();
    out.extend_from_slice(insert);
    out.extend_from_slice(&v[at + remove..]);
    out
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut arr = vector("rfc7925.c509");
    arr.push(0xf6);
    assert_eq!(
        C509Certificate::from_array(&arr),
        Err(DecodeError::TrailingBytes(1))
    );
    assert!(c509::certificate_c509_to_der(&arr).is_err());
    let mut csr = vector("c509tv-csr-type3.c509");
    csr.push(0x01);
    assert_eq!(C509Csr::decode(&csr), Err(DecodeError::TrailingBytes(1)));
}

#[test]
fn indefinite_lengths_are_rejected() {
    let csr = vector("c509tv-csr-type3.c509");
    // Indefinite outer array.
    let mut indef = splice(&csr, 0, 1, &[0x9f]);
    indef.push(0xff);
    assert_eq!(
        C509Csr::decode(&indef),
        Err(DecodeError::IndefiniteLength("C509CertificationRequest"))
    );
    let c = vector("rfc7925.c509");
    let mut indef = splice(&c, 0, 1, &[0x9f]);
    indef.push(0xff);
    assert_eq!(
        C509Certificate::from_array(&indef),
        Err(DecodeError::IndefiniteLength("C509Certificate"))
    );
    // Indefinite byte string for the serial number.
    let indef_bytes = splice(&c, 2, 4, &[0x5f, 0x43, 0x01, 0xf5, 0x0d, 0xff]);
    assert_eq!(
        C509Certificate::from_array(&indef_bytes),
        Err(DecodeError::IndefiniteLength("certificateSerialNumber"))
    );
}

#[test]
fn non_deterministic_encodings_are_rejected() {
    let c = vector("rfc7925.c509");
    // Type 3 as a two-byte integer.
    let long_int = splice(&c, 1, 1, &[0x18, 0x03]);
    assert!(matches!(
        C509Certificate::from_array(&long_int),
        Err(DecodeError::NotDeterministic(_))
    ));
    // Serial with a leading zero.
    let lead0 = splice(&c, 2, 4, &[0x44, 0x00, 0x01, 0xf5, 0x0d]);
    assert!(matches!(
        C509Certificate::from_array(&lead0),
        Err(DecodeError::NotDeterministic(_))
    ));
    // Issuer "RFC test CA" as [1, "RFC test CA"] instead of the text form.
    let arr_cn = splice(&c, 7, 12, &[&[0x82, 0x01][..], &c[7..19]].concat());
    assert!(matches!(
        C509Certificate::from_array(&arr_cn),
        Err(DecodeError::NotDeterministic(_))
    ));
    // keyUsage only, as an array [2, 1] instead of the int 1.
    let ext_at = c.len() - 66 - 1;
    assert_eq!(c[ext_at], 0x01);
    let ku_arr = splice(&c, ext_at, 1, &[0x82, 0x02, 0x01]);
    assert!(matches!(
        C509Certificate::from_array(&ku_arr),
        Err(DecodeError::NotDeterministic(_))
    ));
}

#[test]
fn out_of_range_values_are_rejected() {
    let c = vector("rfc7925.c509");
    assert!(matches!(
        C509Certificate::from_array(&splice(&c, 1, 1, &[0x04])),
        Err(DecodeError::UnsupportedValue { value: 4, .. })
    ));
    assert!(matches!(
        C509Certificate::from_array(&splice(&c, 1, 1, &[0x20])),
        Err(DecodeError::UnsupportedValue { value: -1, .. })
    ));
    // keyUsage beyond decipherOnly.
    let ext_at = c.len() - 67;
    assert!(matches!(
        C509Certificate::from_array(&splice(&c, ext_at, 1, &[0x19, 0x04, 0x00])),
        Err(DecodeError::OutOfRange(_))
    ));
    // notBefore negative.
    let nb = 19;
    assert_eq!(c[nb], 0x1a);
    assert!(C509Certificate::from_array(&splice(&c, nb, 5, &[0x20])).is_err());
    // multipart Content-Format over 65535.
    assert_eq!(
        multipart::decode(&[0x82, 0x1a, 0x00, 0x01, 0x00, 0x00, 0x40]),
        Err(DecodeError::OutOfRange("Content-Format (uint .size 2)"))
    );
}

#[test]
fn every_truncation_fails_cleanly() {
    for name in [
        "rfc7925.c509",
        "ieee8021ar.c509",
        "rfc7925-native.c509",
        "rfc7925-native-certdata.c509",
    ] {
        let v = vector(name);
        for n in 0..v.len() {
            assert!(
                C509Certificate::from_array(&v[..n]).is_err(),
                "{name} prefix {n}"
            );
            assert!(cose::decode_cose_c509(&v[..n]).is_err());
            assert!(c509::describe(&v[..n]).is_err());
        }
    }
    let v = vector("c509tv-csr-type2.c509");
    for n in 0..v.len() {
        assert!(C509Csr::decode(&v[..n]).is_err());
    }
}

#[test]
fn oversized_input_is_rejected() {
    let big = vec![0u8; cbor_schemas::MAX_INPUT_BYTES + 1];
    assert!(matches!(
        C509Csr::decode(&big),
        Err(DecodeError::TooLarge(_))
    ));
    assert!(matches!(
        multipart::decode(&big),
        Err(DecodeError::TooLarge(_))
    ));
}

// ------------------------------------------------------ DER refusals ----

fn base_cert() -> x509_cert::Certificate {
    x509_cert::Certificate::from_der(&vector("rfc7925.der")).unwrap()
}

#[test]
fn unimplemented_registered_extension_fails_with_a_clear_error() {
    let mut cert = base_cert();
    let exts = cert.tbs_certificate.extensions.as_mut().unwrap();
    exts.push(x509_cert::ext::Extension {
        extn_id: const_oid::db::rfc5280::ID_CE_CRL_DISTRIBUTION_POINTS,
        critical: false,
        extn_value: der::asn1::OctetString::new(vec![0x30, 0x00]).unwrap(),
    });
    let err = c509::certificate_der_to_c509(&cert.to_der().unwrap()).unwrap_err();
    assert!(
        matches!(&err, ConvertError::Unsupported(m) if m.contains("cRLDistributionPoints")),
        "{err}"
    );
}

#[test]
fn unregistered_extension_uses_the_oid_form_and_round_trips() {
    let mut cert = base_cert();
    let exts = cert.tbs_certificate.extensions.as_mut().unwrap();
    exts.push(x509_cert::ext::Extension {
        extn_id: const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.1"),
        critical: true,
        extn_value: der::asn1::OctetString::new(vec![0x05, 0x00]).unwrap(),
    });
    let der = cert.to_der().unwrap();
    let c = c509::certificate_der_to_c509(&der).unwrap();
    assert_c509_certificate(&c);
    assert_eq!(c509::certificate_c509_to_der(&c).unwrap(), der);
    let parsed = C509Certificate::from_array(&c).unwrap();
    assert!(matches!(
        parsed.tbs.extensions.last().map(|e| (&e.value, e.critical)),
        Some((c509::ExtensionValue::Generic { .. }, true))
    ));
}

#[test]
fn multi_valued_rdn_and_bmpstring_are_refused() {
    use x509_cert::attr::AttributeTypeAndValue;
    let mut cert = base_cert();
    let cn = cert.tbs_certificate.subject.0[0].0.get(0).unwrap().clone();
    let o = AttributeTypeAndValue {
        oid: const_oid::db::rfc4519::O,
        value: der::asn1::Any::new(der::Tag::Utf8String, "x".as_bytes()).unwrap(),
    };
    cert.tbs_certificate.subject.0[0] = x509_cert::name::RelativeDistinguishedName(
        der::asn1::SetOfVec::try_from(vec![cn, o]).unwrap(),
    );
    let err = c509::certificate_der_to_c509(&cert.to_der().unwrap()).unwrap_err();
    assert!(
        matches!(err, ConvertError::Unsupported(ref m) if m.contains("more than one")),
        "{err}"
    );

    let mut cert = base_cert();
    let bmp = AttributeTypeAndValue {
        oid: const_oid::db::rfc4519::CN,
        value: der::asn1::Any::new(der::Tag::BmpString, vec![0, b'a']).unwrap(),
    };
    cert.tbs_certificate.subject.0[0] = x509_cert::name::RelativeDistinguishedName(
        der::asn1::SetOfVec::try_from(vec![bmp]).unwrap(),
    );
    assert!(matches!(
        c509::certificate_der_to_c509(&cert.to_der().unwrap()),
        Err(ConvertError::Unsupported(_))
    ));
}

#[test]
fn generalized_time_before_2050_is_not_invertible() {
    let mut cert = base_cert();
    cert.tbs_certificate.validity.not_after = x509_cert::time::Time::GeneralTime(
        der::asn1::GeneralizedTime::from_unix_duration(std::time::Duration::from_secs(
            1_900_000_000,
        ))
        .unwrap(),
    );
    assert!(matches!(
        c509::certificate_der_to_c509(&cert.to_der().unwrap()),
        Err(ConvertError::NotInvertible(_))
    ));
}

#[test]
fn garbage_der_is_an_error() {
    assert!(matches!(
        c509::certificate_der_to_c509(&[0x30, 0x03, 0x02, 0x01]),
        Err(ConvertError::Der(_))
    ));
    assert!(c509::csr_der_to_c509(&[]).is_err());
}

// ------------------------------------------------------------ COSE ----

#[test]
fn cose_c509_chain_of_two_validates_and_round_trips() {
    let leaf = vector("rfc7925.c509");
    let ca = vector("rfc7925-native.c509");
    let chain = cose::cose_c509_chain(&[leaf.clone(), ca.clone()]).unwrap();
    assert_eq!(chain[0], 0x82);
    assert_cose_c509(&chain);
    assert_eq!(
        cose::decode_cose_c509(&chain).unwrap(),
        vec![leaf.clone(), ca]
    );
    // A single cert wrapped in an array is not deterministic.
    let mut one = vec![0x81, 0x58, 141];
    one.extend_from_slice(&leaf);
    assert!(cose::decode_cose_c509(&one).is_err());
    assert_eq!(cose::cose_c509_chain(&[]), Err(ConvertError::EmptyChain));
    // From DER: the same bytes as converting one by one.
    let from_der =
        cose::cose_c509_chain_from_der(&[vector("rfc7925.der"), vector("ieee8021ar.der")]).unwrap();
    assert_eq!(
        from_der,
        cose::cose_c509_chain(&[vector("rfc7925.c509"), vector("ieee8021ar.c509")]).unwrap()
    );
    assert_cose_c509(&from_der);
    // COSE_X509 of the same chain, for comparison of sizes (RFC 9360).
    let x509 = cose::cose_x509_chain(&[vector("rfc7925.der"), vector("ieee8021ar.der")]).unwrap();
    println!(
        "chain of 2: COSE_X509 {} B, COSE_C509 {} B",
        x509.len(),
        from_der.len()
    );
    assert!(cose::cose_c509_chain(&[vec![1, 2, 3]]).is_err());
}

#[test]
fn c5c_and_x5chain_in_a_cose_sign1_header() {
    use coset::{CborSerializable, CoseSign1Builder, HeaderBuilder};
    let c509_chain = vec![vector("rfc7925.c509"), vector("ieee8021ar.c509")];
    let der_chain = vec![vector("rfc7925.der")];
    let mut protected = HeaderBuilder::new()
        .algorithm(coset::iana::Algorithm::ES256)
        .build();
    cose::set_c5c(&mut protected, &c509_chain).unwrap();
    let mut unprotected = coset::Header::default();
    cose::set_x5chain(&mut unprotected, &der_chain).unwrap();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .unprotected(unprotected)
        .payload(b"hello".to_vec())
        .signature(vec![0; 64])
        .build();
    let bytes = sign1.to_vec().unwrap();
    let back = coset::CoseSign1::from_slice(&bytes).unwrap();
    assert_eq!(cose::c5c(&back.protected.header).unwrap(), Some(c509_chain));
    assert_eq!(cose::x5chain(&back.unprotected).unwrap(), Some(der_chain));
    assert_eq!(cose::c5c(&back.unprotected).unwrap(), None);
    // The protected header map carries the chain as the CDDL says.
    let map = back.protected.original_data.clone().unwrap();
    assert_cddl("ChainHeaderMap", &map);
    let x5 = cose::cose_x509_chain(&[vector("rfc7925.der")]).unwrap();
    assert_cddl("COSE_X509", &x5);
    assert_eq!(
        cose::decode_cose_x509(&x5).unwrap(),
        vec![vector("rfc7925.der")]
    );
}

// ------------------------------------------------------- multipart ----

#[test]
fn multipart_rfc9148_example_byte_for_byte() {
    // RFC 9148 Section 4.3: [284, h'0123456789abcdef', 281, h'fedcba9876543210']
    let want = hex::decode("8419011C480123456789ABCDEF190119 48FEDCBA9876543210".replace(' ', ""))
        .unwrap();
    let k = hex::decode("0123456789abcdef").unwrap();
    let c = hex::decode("fedcba9876543210").unwrap();
    let got = multipart::encode(&[(284, &k), (281, &c)]);
    assert_eq!(got, want);
    assert_cddl("multipart-core", &got);
    assert_eq!(multipart::decode(&want).unwrap(), vec![(284, k), (281, c)]);
}

#[test]
fn multipart_strictness() {
    // null part: allowed by RFC 8710, visible via decode_parts only.
    let with_null = [0x82, 0x18, 0x3c, 0xf6];
    assert_cddl("multipart-core", &with_null);
    assert_eq!(
        multipart::decode_parts(&with_null).unwrap(),
        vec![(60, None)]
    );
    assert!(multipart::decode(&with_null).is_err());
    assert_eq!(
        multipart::decode(&[0x81, 0x01]),
        Err(DecodeError::Length("multipart-core (pairs)"))
    );
    assert_eq!(
        multipart::decode(&[0x80, 0x00]),
        Err(DecodeError::TrailingBytes(1))
    );
    assert!(matches!(
        multipart::decode(&[0x9f, 0xff]),
        Err(DecodeError::IndefiniteLength(_))
    ));
    assert!(matches!(
        multipart::decode(&[0x82, 0x18, 0x01, 0x40]),
        Err(DecodeError::NotDeterministic(_))
    ));
    assert_eq!(multipart::decode(&[0x80]).unwrap(), vec![]);
}

#[test]
fn fuzz_regressions_do_not_panic() {
    // SPKI parameters that are not an OID used to panic (const-oid new_unwrap).
    let cert = vector("regress-spki-params-cert.der");
    let _ = c509::certificate_der_to_c509(&cert);
    let csr = vector("regress-spki-params-csr.der");
    let _ = c509::csr_der_to_c509(&csr);
}

/// The JPY schema (jpy.cddl, the draft's CDDL verbatim) against the draft's appendix
/// example and against what it must refuse. est-relay and est-server check their own
/// messages against it in their tests.
#[test]
fn jpy_messages_validate_against_the_drafts_cddl() {
    use cbor_schemas::schema::check_jpy;
    // [h'd01914bcc376a88ffecc50ca6017b0c1', h'16fefd0000000000000000002f' ...] (60 bytes).
    let mut hvr = hex::decode("16fefd0000000000000000002f").unwrap();
    hvr.resize(60, 0);
    let mut m = hex::decode("8250d01914bcc376a88ffecc50ca6017b0c1583c").unwrap();
    m.extend_from_slice(&hvr);
    check_jpy(&m).unwrap();
    // Empty header and content are still bstr.
    check_jpy(&[0x82, 0x40, 0x40]).unwrap();
    for bad in [
        "814101",         // one element
        "83410141024103", // three elements: the CDDL says two (a registrar tolerates more)
        "82614101",       // text header
        "824101f6",       // null content
        "a0",             // not an array
    ] {
        assert!(check_jpy(&hex::decode(bad).unwrap()).is_err(), "{bad}");
    }
}

// ------------------------------------------- draft -20 registry range ----

#[test]
fn registry_values_inside_the_range_decode_and_outside_are_refused() {
    let c = vector("rfc7925.c509");
    // [1] c509CertificateType, [6] issuerSignatureAlgorithm (0 = ecdsa-with-SHA256).
    assert_eq!((c[1], c[6]), (0x03, 0x00));
    // issuerSignatureAlgorithm at both ends of -32768..=32767: decoded and kept...
    for (bytes, v) in [
        (&[0x19, 0x7f, 0xff][..], 32767),
        (&[0x39, 0x7f, 0xff][..], -32768),
        (&[0x19, 0x01, 0x00][..], 256),
    ] {
        let item = splice(&c, 6, 1, bytes);
        let parsed = C509Certificate::from_array(&item).unwrap();
        assert_eq!(
            parsed.tbs.issuer_signature_algorithm,
            c509::AlgorithmIdentifier::Int(v)
        );
        assert_eq!(parsed.to_array(), item);
        // ...but an unregistered algorithm has no DER form.
        assert!(matches!(
            c509::certificate_c509_to_der(&item),
            Err(ConvertError::UnsupportedAlgorithm(_)) | Err(ConvertError::Unsupported(_))
        ));
    }
    // ...and one step outside is refused before any lookup.
    for bytes in [
        &[0x19, 0x80, 0x00][..],
        &[0x39, 0x80, 0x00][..],
        &[0x1a, 0, 1, 0, 0][..],
    ] {
        assert_eq!(
            C509Certificate::from_array(&splice(&c, 6, 1, bytes)),
            Err(DecodeError::OutOfRange("AlgorithmIdentifier")),
            "{}",
            hex::encode(bytes)
        );
    }
    // c509CertificateType: unregistered inside the range, refused outside it.
    assert_eq!(
        C509Certificate::from_array(&splice(&c, 1, 1, &[0x19, 0x7f, 0xff])),
        Err(DecodeError::UnsupportedValue {
            registry: "C509 Certificate Types",
            value: 32767
        })
    );
    assert_eq!(
        C509Certificate::from_array(&splice(&c, 1, 1, &[0x19, 0x80, 0x00])),
        Err(DecodeError::OutOfRange("c509CertificateType"))
    );
    // extensionID: [32767, 0] is an unregistered extension, [32768, 0] out of range,
    // [-32769, 0] too.
    let ext_at = c.len() - 66 - 1;
    assert_eq!(
        C509Certificate::from_array(&splice(&c, ext_at, 1, &[0x82, 0x19, 0x7f, 0xff, 0x00])),
        Err(DecodeError::UnsupportedValue {
            registry: "C509 Extensions",
            value: 32767
        })
    );
    for id in [&[0x19, 0x80, 0x00][..], &[0x39, 0x80, 0x00][..]] {
        let field = [&[0x82][..], id, &[0x00][..]].concat();
        assert_eq!(
            C509Certificate::from_array(&splice(&c, ext_at, 1, &field)),
            Err(DecodeError::OutOfRange("extensionID"))
        );
    }
    // Subject public key algorithm (byte before `58 21`) and an RDN attribute type.
    let spka = c.len() - 66 - 1 - 35 - 1;
    assert_eq!(c[spka], 0x01);
    assert_eq!(
        C509Certificate::from_array(&splice(&c, spka, 1, &[0x19, 0x80, 0x00])),
        Err(DecodeError::OutOfRange("AlgorithmIdentifier"))
    );
    let ieee = vector("ieee8021ar.c509");
    // 8B 03 48 <8-byte serial> 00, then issuer = [-4, "US", ...]: the first attribute type
    // is at [13] (after `8A`).
    assert_eq!((ieee[12], ieee[13]), (0x8a, 0x23));
    assert_eq!(
        C509Certificate::from_array(&splice(&ieee, 13, 1, &[0x39, 0x80, 0x00])),
        Err(DecodeError::OutOfRange("RDN attributeType"))
    );
    // Requests: the request type.
    let csr = vector("c509tv-csr-type3.c509");
    assert_eq!(csr[1], 0x03);
    assert_eq!(
        C509Csr::decode(&splice(&csr, 1, 1, &[0x19, 0x80, 0x00])),
        Err(DecodeError::OutOfRange("c509CertificationRequestType"))
    );
}

// ------------------------------------ draft -20 extensions in OID form ----

/// `[h'551d0f', h'03020780']`: the keyUsage extension {digitalSignature} of the
/// A.1 example in the generic OID form, non-critical.
const KEY_USAGE_OID_FORM: &[u8] = &[0x82, 0x43, 0x55, 0x1d, 0x0f, 0x44, 0x03, 0x02, 0x07, 0x80];

#[test]
fn type3_registered_extension_in_oid_form_gives_the_same_der() {
    // A type-3 certificate may carry a registered extension in the OID form (for
    // example one issued before the extension was registered); it must convert to
    // exactly the DER the specific form gives.
    let c = vector("rfc7925.c509");
    let ext_at = c.len() - 66 - 1;
    let oid_form = splice(&c, ext_at, 1, KEY_USAGE_OID_FORM);
    assert_c509_certificate(&oid_form);
    let parsed = C509Certificate::from_array(&oid_form).unwrap();
    assert!(matches!(
        parsed.tbs.extensions.as_slice(),
        [c509::Extension {
            critical: false,
            value: c509::ExtensionValue::Generic { .. }
        }]
    ));
    assert_eq!(
        c509::certificate_c509_to_der(&oid_form).unwrap(),
        vector("rfc7925.der")
    );
    // Critical: the value in a one-element array.
    let crit = [
        &[0x82, 0x43, 0x55, 0x1d, 0x0f, 0x81][..],
        &KEY_USAGE_OID_FORM[5..],
    ]
    .concat();
    let der = x509_cert::Certificate::from_der(
        &c509::certificate_c509_to_der(&splice(&c, ext_at, 1, &crit)).unwrap(),
    )
    .unwrap();
    let ext = &der.tbs_certificate.extensions.as_ref().unwrap()[0];
    assert!(ext.critical);
    assert_eq!(ext.extn_id, const_oid::db::rfc5280::ID_CE_KEY_USAGE);
}

#[test]
fn natively_signed_items_refuse_the_oid_form_of_an_implemented_extension() {
    let n = vector("rfc7925-native.c509");
    let ext_at = n.len() - 66 - 1;
    assert_eq!(n[ext_at], 0x01);
    assert_eq!(
        C509Certificate::from_array(&splice(&n, ext_at, 1, KEY_USAGE_OID_FORM)),
        Err(DecodeError::NotDeterministic(
            "registered extension in the OID form in a natively signed item"
        ))
    );
    // An unregistered (private) OID has no specific form: fine in a native item too.
    let oid = const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.1");
    let oid = oid.as_bytes();
    assert!(oid.len() < 24);
    let private = [
        &[0x82, 0x40 | oid.len() as u8][..],
        oid,
        &[0x42, 0x05, 0x00][..],
    ]
    .concat();
    let item = splice(&n, ext_at, 1, &private);
    let parsed = C509Certificate::from_array(&item).unwrap();
    assert_eq!(parsed.to_array(), item);
}

#[test]
fn private_oid_extensions_from_openssl_round_trip_to_identical_der() {
    // A certificate whose extensions have no registry value: made by the openssl
    // CLI (1.3.6.1.4.1.99999.7 non-critical, .8 critical). Under CI=true a missing
    // openssl fails the test.
    let Some(der) = openssl_cert_with_private_extensions() else {
        return;
    };
    let c = c509::certificate_der_to_c509(&der).unwrap();
    assert_c509_certificate(&c);
    let parsed = C509Certificate::from_array(&c).unwrap();
    let generic: Vec<(bool, String)> = parsed
        .tbs
        .extensions
        .iter()
        .filter_map(|e| match &e.value {
            c509::ExtensionValue::Generic { oid, .. } => Some((
                e.critical,
                const_oid::ObjectIdentifier::from_bytes(oid)
                    .unwrap()
                    .to_string(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        generic,
        vec![
            (false, "1.3.6.1.4.1.99999.7".to_string()),
            (true, "1.3.6.1.4.1.99999.8".to_string())
        ]
    );
    assert_eq!(c509::certificate_c509_to_der(&c).unwrap(), der);
    // And as part of a COSE_C509 chain.
    let chain = cose::cose_c509_chain_from_der(&[der.clone(), vector("rfc7925.der")]).unwrap();
    let back = cose::decode_cose_c509(&chain).unwrap();
    assert_eq!(c509::certificate_c509_to_der(&back[0]).unwrap(), der);
}

/// A self-signed P-256 certificate with two private-OID extensions, from the openssl
/// CLI; None when openssl is missing and CI is not set (panics under CI=true).
fn openssl_cert_with_private_extensions() -> Option<Vec<u8>> {
    if !est_test_tools::require_tools(&["openssl"]) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("c509-oid-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, pem) = est_test_tools::openssl::self_signed(
        &dir,
        "c",
        "P-256",
        "/CN=private-oid-test",
        &[
            "1.3.6.1.4.1.99999.7=DER:0500",
            "1.3.6.1.4.1.99999.8=critical,DER:020101",
            "keyUsage=critical,digitalSignature",
        ],
    )
    .unwrap();
    let der = est_test_tools::openssl::pem_to_der(&pem).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(der)
}
