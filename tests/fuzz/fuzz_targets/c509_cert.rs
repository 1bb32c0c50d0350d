//! C509 certificate decoders: arbitrary bytes never panic; whatever decodes
//! re-encodes to the same bytes; a type-3 certificate (the draft -20 array
//! `C509Certificate`) that converts to DER converts back to a C509 form of the
//! same DER. The model's sequence reader (draft -18's `~C509Certificate`, still
//! how a TBS is read) is exercised too.
#![no_main]

use cbor_schemas::c509::{self, C509Certificate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = C509Certificate::from_array(data) {
        assert_eq!(c.to_array(), data);
        if let Ok(der) = c509::certificate_to_der(&c) {
            assert_eq!(c509::certificate_c509_to_der(data).ok().as_ref(), Some(&der));
            if let Ok(again) = c509::certificate_der_to_c509(&der) {
                assert_eq!(c509::certificate_c509_to_der(&again).ok(), Some(der));
            }
        }
        let _ = c509::tbs_to_x509(&c.tbs);
    }
    if let Ok(c) = C509Certificate::from_sequence(data) {
        assert_eq!(c.to_sequence(), data);
    }
    let _ = c509::verify_native_certificate(data, &[0x02; 33]);
    let _ = c509::describe(data);
    // The DER side of the converter must not panic either.
    let _ = c509::certificate_der_to_c509(data);
});
