//! Fuzz target: `est_proto::ca::parse_and_verify_csr` on arbitrary bytes.
//!
//! Invariants: no panic; a request over the limit is `TooLarge` without parsing; an accepted
//! request is the input byte for byte, its digest is `csr_digest(input)`, its key is an
//! uncompressed P-256 (65-byte) or P-384 (97-byte) point, and parsing it again gives the same
//! result (determinism). The `dlms` profile's reading of the requested keyUsage and its system
//! title derivation from the subject's serialNumber never panic either.
//! Seeds (committed; `corpus/` is git-ignored): `seeds/csr_der/` holds the C509 test-vector CSR and an
//! `openssl req` CSR with every attribute we read. Run: `cargo fuzz run csr_der corpus/csr_der seeds/csr_der`.
#![no_main]

use est_proto::ca::{csr_digest, parse_and_verify_csr, serial_number_attr, CsrError};
use est_proto::dlms::{system_title_cn, DlmsCertType, DlmsRule};
use libfuzzer_sys::fuzz_target;

const MAX_CSR: usize = 2048;

fuzz_target!(|data: &[u8]| {
    match parse_and_verify_csr(data, MAX_CSR) {
        Ok(csr) => {
            assert!(data.len() <= MAX_CSR);
            assert_eq!(csr.der, data);
            assert_eq!(csr.digest, csr_digest(data));
            let curve = csr.curve().expect("an accepted key is on P-256 or P-384");
            assert_eq!(csr.public_key_sec1().len(), curve.uncompressed_point_len());
            let _ = DlmsCertType::from_requested(&csr.requested_extensions);
            if let Some(serial) = serial_number_attr(&csr.subject) {
                let rule = DlmsRule {
                    serial_prefix: "ABC".into(),
                    flag_id: *b"ABC",
                    curve: None,
                };
                let _ = rule.check_curve(csr.curve());
                if let Ok(title) = rule.system_title(&serial) {
                    assert_eq!(&title[..3], b"ABC");
                    assert_eq!(system_title_cn(&title).len(), 16);
                }
            }
            assert_eq!(csr.requested_san_present, csr.requested_san.is_some());
            assert_eq!(parse_and_verify_csr(data, MAX_CSR).as_ref(), Ok(&csr));
        }
        Err(CsrError::TooLarge { len, max }) => {
            assert_eq!((len, max), (data.len(), MAX_CSR));
            assert!(data.len() > MAX_CSR);
        }
        Err(_) => assert!(data.len() <= MAX_CSR),
    }
});
