//! application/multipart-core (RFC 8710): no panic; decode -> encode identity.
#![no_main]

use cbor_schemas::multipart;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parts) = multipart::decode_parts(data) {
        if parts.iter().all(|(_, p)| p.is_some()) {
            let owned = multipart::decode(data).expect("no null part");
            let borrowed: Vec<(u16, &[u8])> =
                owned.iter().map(|(c, b)| (*c, b.as_slice())).collect();
            assert_eq!(multipart::encode(&borrowed), data);
        }
    }
});
