//! Fuzz target: `est_proto::ca::certs_from_certs_only` (a meter's reading of a /crts, /sen or
//! /sren response, Content-Format 281) on arbitrary bytes.
//!
//! Invariants: no panic; every certificate returned has a Certificate's outer shape and is a
//! TLV of the input; and, differentially, whatever the cms crate's full decode of the same
//! bytes reads (ContentInfo id-signedData, SignedData, each CertificateChoices::Certificate
//! decoded and re-encoded), ours reads too: the same number of certificates, each decoding
//! to the same certificate.
//! Seeds (committed; `corpus/` is git-ignored): `seeds/certs_only/` holds certs-only messages
//! of one and of two certificates made by `openssl crl2pkcs7 -nocrl` (with its empty `crls`).
//! Run:
//! `cargo fuzz run certs_only corpus/certs_only seeds/certs_only`.
#![no_main]

use der::{Decode, Encode};
use libfuzzer_sys::fuzz_target;

fn with_cms(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ci = cms::content_info::ContentInfo::from_der(data).ok()?;
    if ci.content_type.to_string() != "1.2.840.113549.1.7.2" {
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

fuzz_target!(|data: &[u8]| {
    let ours = est_proto::ca::certs_from_certs_only(data);
    if let Ok(certs) = &ours {
        for c in certs {
            assert!(data.windows(c.len()).any(|w| w == c.as_slice()));
            assert!(c.first() == Some(&0x30));
        }
    }
    if let Some(reference) = with_cms(data) {
        let ours = ours.expect("the cms crate reads it, so must we");
        let reencoded: Vec<Vec<u8>> = ours
            .iter()
            .map(|c| {
                x509_cert::Certificate::from_der(c)
                    .and_then(|c| c.to_der())
                    .expect("a certificate the cms crate decoded")
            })
            .collect();
        assert_eq!(reencoded, reference);
    }
});
