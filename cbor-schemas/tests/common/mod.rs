//! Shared test helpers: test vectors and CDDL validation with the `cddl` crate.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

/// Load `testdata/<name>.hex`.
pub fn vector(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(format!("{name}.hex"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    hex::decode(s.trim()).expect("hex")
}

const C509_CDDL: &str = include_str!("../../cddl/c509.cddl");
const COSE_CDDL: &str = include_str!("../../cddl/cose-chain.cddl");
const MULTIPART_CDDL: &str = include_str!("../../cddl/multipart-core.cddl");

/// The CDDL handed to the validator. The files are used as they are, with one
/// rewrite: the `cddl` crate (0.10.7) does not implement the unwrap operator
/// `~` on user-defined tag types (it demands tag 111 where `~oid` means the
/// bare byte string, RFC 8610 Section 3.7), so `~oid` is replaced by a rule
/// that is exactly its unwrapped content, `bstr` (RFC 9090 Section 2).
fn doc(rule: &str) -> String {
    let all =
        format!("{C509_CDDL}\n{COSE_CDDL}\n{MULTIPART_CDDL}").replace("~oid", "unwrapped_oid");
    format!("root = {rule}\n{all}\nunwrapped_oid = bstr\n")
}

/// Validate one CBOR item against a rule of the project's CDDL files.
pub fn check_cddl(rule: &str, item: &[u8]) -> Result<(), String> {
    cddl::validate_cbor_from_slice(&doc(rule), item, None).map_err(|e| format!("{e:?}"))
}

/// Assert that `item` validates against `rule`.
pub fn assert_cddl(rule: &str, item: &[u8]) {
    if let Err(e) = check_cddl(rule, item) {
        panic!(
            "{rule} CDDL validation failed for {}: {e}",
            hex::encode(item)
        );
    }
}

/// Validate `~C509Certificate` (a CBOR sequence): with its array header it
/// must be a `C509Certificate` (RFC 8742: the sequence is the array's items).
pub fn assert_cert_sequence(seq: &[u8]) {
    assert_cddl("C509Certificate", &wrap_array(seq, 11));
}

/// Prepend a CBOR array header of `n` items (n < 24).
pub fn wrap_array(seq: &[u8], n: u8) -> Vec<u8> {
    assert!(n < 24);
    let mut v = vec![0x80 | n];
    v.extend_from_slice(seq);
    v
}

/// Validate COSE_C509 and apply the `.cborseq C509Certificate` control to each
/// certificate (the cddl crate cannot parse `.cborseq`).
pub fn assert_cose_c509(item: &[u8]) {
    assert_cddl("COSE_C509", item);
    for c in cbor_schemas::cose::decode_cose_c509(item).unwrap() {
        assert_cert_sequence(&c);
    }
}
