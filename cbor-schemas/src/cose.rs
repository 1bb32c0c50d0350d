//! Certificate chains in COSE header parameters.
//!
//! * `x5chain` (label 33, RFC 9360 Section 2): `COSE_X509 = bstr / [ 2*certs: bstr ]`
//!   of DER certificates.
//! * `c5c` (label 25, draft-ietf-cose-cbor-encoded-cert-20 Section 3.4; IANA
//!   temporary registration): `COSE_C509 = C509CertData / [ 2* C509CertData ]`,
//!   `C509CertData = bytes .cbor C509Certificate`, i.e. each certificate as the
//!   CBOR array `C509Certificate` inside a byte string (`58 8D 8B ...` for the
//!   141-byte Appendix A.1 example). Draft -18 put the unwrapped sequence
//!   `~C509Certificate` there (`58 8C 03 ...`); -20 changed it.
//!   `COSE_C509` is also the body of `application/cose-c509+cbor` (a bag, or a
//!   chain with `usage=chain`); a single certificate alone travels as
//!   `application/cose-c509-cert+cbor`, the bare `C509Certificate` array.
//!
//! The header helpers work on [`coset::Header`]; coset is built on ciborium,
//! so values cross as `coset::cbor::value::Value`.

use coset::cbor::value::Value;
use coset::{Header, Label};

use crate::c509::C509Certificate;
use crate::cbor::{self, Reader};
use crate::error::{ConvertError, DecodeError};

/// c5t: hash of a C509Certificate (COSE_CertHash; -20 hashes the array).
pub const HEADER_C5T: i64 = 22;
/// c5u: URI of a COSE_C509 chain.
pub const HEADER_C5U: i64 = 23;
/// c5b: unordered bag of C509 certificates.
pub const HEADER_C5B: i64 = 24;
/// c5c: ordered chain of C509 certificates.
pub const HEADER_C5C: i64 = 25;
/// x5bag (RFC 9360).
pub const HEADER_X5BAG: i64 = 32;
/// x5chain (RFC 9360).
pub const HEADER_X5CHAIN: i64 = 33;
/// x5t (RFC 9360).
pub const HEADER_X5T: i64 = 34;
/// x5u (RFC 9360).
pub const HEADER_X5U: i64 = 35;

/// Most certificates accepted in one chain.
pub const MAX_CHAIN_LEN: usize = 16;

/// Encode a COSE_X509 / COSE_C509 style value: one bstr, or an array of >= 2.
fn encode_bag(items: &[Vec<u8>]) -> Result<Vec<u8>, ConvertError> {
    let mut e = cbor::encoder();
    match items {
        [] => return Err(ConvertError::EmptyChain),
        [one] => {
            let _ = e.bytes(one);
        }
        many => {
            let _ = e.array(many.len() as u64);
            for c in many {
                let _ = e.bytes(c);
            }
        }
    }
    Ok(e.into_writer())
}

fn decode_bag(bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    use minicbor::data::Type;
    let mut r = Reader::new(bytes)?;
    let out = match r.peek()? {
        Type::Bytes | Type::BytesIndef => vec![r.bytes("certificate")?.to_vec()],
        _ => {
            let n = r.array("certificate chain")?;
            if n < 2 {
                return Err(DecodeError::NotDeterministic(
                    "a single certificate must not be wrapped in an array",
                ));
            }
            if n > MAX_CHAIN_LEN {
                return Err(DecodeError::OutOfRange("certificate chain length"));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(r.bytes("certificate")?.to_vec());
            }
            v
        }
    };
    r.finish()?;
    let again = encode_bag(&out).map_err(|_| DecodeError::Invalid("chain"))?;
    if again != bytes {
        return Err(DecodeError::NotDeterministic("certificate chain"));
    }
    Ok(out)
}

/// COSE_C509 from `C509Certificate` arrays (leaf first). Each element is
/// checked to decode as a C509 certificate. This is the body for the
/// `application/cose-c509+cbor` Content-Format (e.g. /crts in C509).
pub fn cose_c509_chain(certs: &[Vec<u8>]) -> Result<Vec<u8>, ConvertError> {
    for c in certs {
        C509Certificate::from_array(c)?;
    }
    encode_bag(certs)
}

/// COSE_C509 from DER certificates (leaf first), each re-encoded as C509
/// type 3 (losslessly; see [`crate::c509::certificate_der_to_c509`]). Use this
/// for an EST response in `application/cose-c509+cbor`.
pub fn cose_c509_chain_from_der(der_certs: &[Vec<u8>]) -> Result<Vec<u8>, ConvertError> {
    let certs = der_certs
        .iter()
        .map(|d| crate::c509::certificate_der_to_c509(d))
        .collect::<Result<Vec<_>, _>>()?;
    encode_bag(&certs)
}

/// Decode COSE_C509 into its `C509Certificate` arrays, each validated (a
/// draft -18 style `~C509Certificate` sequence inside is refused).
pub fn decode_cose_c509(bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    let certs = decode_bag(bytes)?;
    for c in &certs {
        C509Certificate::from_array(c)?;
    }
    Ok(certs)
}

/// COSE_X509 from DER certificates (leaf first). The DER is not parsed.
pub fn cose_x509_chain(certs: &[Vec<u8>]) -> Result<Vec<u8>, ConvertError> {
    encode_bag(certs)
}

/// Decode COSE_X509 into DER certificates (not parsed).
pub fn decode_cose_x509(bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    decode_bag(bytes)
}

fn bag_value(items: &[Vec<u8>]) -> Result<Value, ConvertError> {
    match items {
        [] => Err(ConvertError::EmptyChain),
        [one] => Ok(Value::Bytes(one.clone())),
        many => Ok(Value::Array(
            many.iter().cloned().map(Value::Bytes).collect(),
        )),
    }
}

fn value_bag(v: &Value) -> Result<Vec<Vec<u8>>, DecodeError> {
    match v {
        Value::Bytes(b) => Ok(vec![b.clone()]),
        Value::Array(a) if a.len() >= 2 && a.len() <= MAX_CHAIN_LEN => a
            .iter()
            .map(|x| match x {
                Value::Bytes(b) => Ok(b.clone()),
                _ => Err(DecodeError::UnexpectedType {
                    field: "certificate",
                    expected: "bytes",
                }),
            })
            .collect(),
        _ => Err(DecodeError::UnexpectedType {
            field: "certificate chain",
            expected: "bstr / [2* bstr]",
        }),
    }
}

fn set(header: &mut Header, label: i64, v: Value) {
    header.rest.retain(|(l, _)| *l != Label::Int(label));
    header.rest.push((Label::Int(label), v));
}

fn get(header: &Header, label: i64) -> Option<&Value> {
    header
        .rest
        .iter()
        .find(|(l, _)| *l == Label::Int(label))
        .map(|(_, v)| v)
}

/// Put a C509 chain (`C509Certificate` arrays, leaf first) in `c5c`.
pub fn set_c5c(header: &mut Header, certs: &[Vec<u8>]) -> Result<(), ConvertError> {
    for c in certs {
        C509Certificate::from_array(c)?;
    }
    set(header, HEADER_C5C, bag_value(certs)?);
    Ok(())
}

/// Read the `c5c` chain back (None when absent); each certificate is validated.
pub fn c5c(header: &Header) -> Result<Option<Vec<Vec<u8>>>, DecodeError> {
    let Some(v) = get(header, HEADER_C5C) else {
        return Ok(None);
    };
    let certs = value_bag(v)?;
    for c in &certs {
        C509Certificate::from_array(c)?;
    }
    Ok(Some(certs))
}

/// Put a DER chain (leaf first) in `x5chain`.
pub fn set_x5chain(header: &mut Header, certs: &[Vec<u8>]) -> Result<(), ConvertError> {
    set(header, HEADER_X5CHAIN, bag_value(certs)?);
    Ok(())
}

/// Read the `x5chain` DER chain back (None when absent).
pub fn x5chain(header: &Header) -> Result<Option<Vec<Vec<u8>>>, DecodeError> {
    get(header, HEADER_X5CHAIN).map(value_bag).transpose()
}
