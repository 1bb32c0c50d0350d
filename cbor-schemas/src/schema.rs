//! Validation of CBOR items against the project's CDDL files (feature `cddl-check`).
//!
//! The `.cddl` files under `cbor-schemas/cddl/` are the contract; tests in every crate
//! that emits CBOR run their items through [`check`] with the `cddl` crate, so the
//! schemas and the code cannot drift apart.
//!
//! The files are used as they are, with one rewrite: the `cddl` crate (0.10.7) does not
//! implement the unwrap operator `~` on user-defined tag types (it demands tag 111
//! where `~oid` means the bare byte string, RFC 8610 §3.7), so `~oid` is replaced by a
//! rule that is exactly its unwrapped content, `bstr` (RFC 9090 §2). It does not
//! check the `.cbor` control inside a byte string either, so [`check_cose_c509`]
//! checks each certificate of a COSE_C509 separately.

/// draft-ietf-cose-cbor-encoded-cert-20 structures (certificates, requests, COSE_C509).
pub const C509_CDDL: &str = include_str!("../cddl/c509.cddl");
/// COSE header parameters carrying certificate chains (c5c, x5chain).
pub const COSE_CDDL: &str = include_str!("../cddl/cose-chain.cddl");
/// RFC 8710 application/multipart-core.
pub const MULTIPART_CDDL: &str = include_str!("../cddl/multipart-core.cddl");
/// draft-ietf-anima-constrained-join-proxy JPY messages (est-relay and est-server's JPY port).
pub const JPY_CDDL: &str = include_str!("../cddl/jpy.cddl");

fn doc(rule: &str) -> String {
    let all = format!("{C509_CDDL}\n{COSE_CDDL}\n{MULTIPART_CDDL}\n{JPY_CDDL}")
        .replace("~oid", "unwrapped_oid");
    format!("root = {rule}\n{all}\nunwrapped_oid = bstr\n")
}

/// Validate one CBOR item against `rule` of the project's CDDL.
pub fn check(rule: &str, item: &[u8]) -> Result<(), String> {
    cddl::validate_cbor_from_slice(&doc(rule), item, None).map_err(|e| format!("{e:?}"))
}

/// Validate a JPY message (`jpy_message`).
pub fn check_jpy(item: &[u8]) -> Result<(), String> {
    check("jpy_message", item)
}

/// Validate COSE_C509 and each certificate in it (`.cbor C509Certificate`).
pub fn check_cose_c509(item: &[u8]) -> Result<(), String> {
    check("COSE_C509", item)?;
    for c in crate::cose::decode_cose_c509(item).map_err(|e| e.to_string())? {
        check("C509Certificate", &c)?;
    }
    Ok(())
}
