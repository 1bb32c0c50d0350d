//! Shared test helpers: test vectors and CDDL validation with the `cddl` crate.
#![allow(dead_code, clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::PathBuf;

/// Load `testdata/<name>.hex`.
pub(crate) fn vector(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(format!("{name}.hex"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    hex::decode(s.trim()).expect("hex")
}

/// Validate one CBOR item against a rule of the project's CDDL files.
pub(crate) fn check_cddl(rule: &str, item: &[u8]) -> Result<(), String> {
    cbor_schemas::schema::check(rule, item)
}

/// Assert that `item` validates against `rule`.
pub(crate) fn assert_cddl(rule: &str, item: &[u8]) {
    if let Err(e) = check_cddl(rule, item) {
        panic!(
            "{rule} CDDL validation failed for {}: {e}",
            hex::encode(item)
        );
    }
}

/// Validate the CBOR array `C509Certificate` (the draft -20 wire form).
pub(crate) fn assert_c509_certificate(item: &[u8]) {
    assert_cddl("C509Certificate", item);
}

/// Prepend a CBOR array header of `n` items (n < 24).
pub(crate) fn wrap_array(seq: &[u8], n: u8) -> Vec<u8> {
    assert!(n < 24);
    let mut v = vec![0x80 | n];
    v.extend_from_slice(seq);
    v
}

/// Validate COSE_C509 and each certificate in it.
pub(crate) fn assert_cose_c509(item: &[u8]) {
    if let Err(e) = cbor_schemas::schema::check_cose_c509(item) {
        panic!(
            "COSE_C509 CDDL validation failed for {}: {e}",
            hex::encode(item)
        );
    }
}
