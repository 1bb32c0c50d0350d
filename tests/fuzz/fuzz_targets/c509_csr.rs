//! C509 certification requests: no panic on any input; decode -> encode is the
//! identity; PoP verification and the X.509 views never panic; a type-3 request
//! that converts to PKCS#10 converts back to the same bytes.
#![no_main]

use cbor_schemas::c509::{self, C509Csr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = C509Csr::decode(data) {
        assert_eq!(csr.request().to_array(), data);
        let _ = csr.verify_pop();
        let _ = csr.subject();
        let _ = csr.subject_public_key_info();
        let _ = csr.extension_request();
        let _ = csr.hardware_module_name();
        if let Ok(der) = csr.to_der() {
            if let Ok(again) = c509::csr_der_to_c509(&der) {
                assert_eq!(c509::csr_c509_to_der(&again).ok(), Some(der));
            }
        }
    }
    let _ = c509::csr_der_to_c509(data);
});
