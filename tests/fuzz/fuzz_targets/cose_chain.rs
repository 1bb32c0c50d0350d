//! COSE_C509 / COSE_X509 chains and the c5c / x5chain header readers.
#![no_main]

use cbor_schemas::cose;
use coset::CborSerializable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = cose::decode_cose_c509(data) {
        assert_eq!(cose::cose_c509_chain(&certs).ok().as_deref(), Some(data));
    }
    if let Ok(certs) = cose::decode_cose_x509(data) {
        assert_eq!(cose::cose_x509_chain(&certs).ok().as_deref(), Some(data));
    }
    if let Ok(msg) = coset::CoseSign1::from_slice(data) {
        let _ = cose::c5c(&msg.protected.header);
        let _ = cose::c5c(&msg.unprotected);
        let _ = cose::x5chain(&msg.protected.header);
        let _ = cose::x5chain(&msg.unprotected);
    }
});
