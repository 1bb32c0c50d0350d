//! `application/multipart-core` (CoAP Content-Format 62, RFC 8710), used by
//! the EST-coaps /skg and /skc responses (RFC 9148 Section 4.8).
//!
//! CDDL (RFC 8710 Section 2, `cddl/multipart-core.cddl`):
//! `multipart-core = [* multipart-part]`,
//! `multipart-part = (type: uint .size 2, part: bytes / null)`.
//! RFC 8710 is a strict format: processing stops on any deviation or
//! residual data, which [`decode`] implements.

use crate::cbor::{self, Reader};
use crate::error::DecodeError;

/// Content-Format of application/multipart-core.
pub const CONTENT_FORMAT_MULTIPART_CORE: u16 = 62;

/// One decoded part: Content-Format and representation (`None` for `null`).
pub type Part = (u16, Option<Vec<u8>>);

/// Encode parts as a multipart-core array.
pub fn encode(parts: &[(u16, &[u8])]) -> Vec<u8> {
    let mut e = cbor::encoder();
    let _ = e.array(2 * parts.len() as u64);
    for (cf, body) in parts {
        let _ = e.u16(*cf);
        let _ = e.bytes(body);
    }
    e.into_writer()
}

/// Decode a multipart-core body whose parts all carry a representation.
/// A `null` part (allowed by RFC 8710 for an omitted representation) is
/// refused here; use [`decode_parts`] to see it.
pub fn decode(bytes: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, DecodeError> {
    decode_parts(bytes)?
        .into_iter()
        .map(|(cf, p)| {
            p.map(|b| (cf, b))
                .ok_or(DecodeError::Invalid("null multipart-core part"))
        })
        .collect()
}

/// Decode a multipart-core body; `None` is a `null` part.
pub fn decode_parts(bytes: &[u8]) -> Result<Vec<Part>, DecodeError> {
    let mut r = Reader::new(bytes)?;
    let n = r.array("multipart-core")?;
    if n % 2 != 0 {
        return Err(DecodeError::Length("multipart-core (pairs)"));
    }
    let mut out = Vec::with_capacity(n / 2);
    for _ in 0..n / 2 {
        let cf = u16::try_from(r.uint("Content-Format")?)
            .map_err(|_| DecodeError::OutOfRange("Content-Format (uint .size 2)"))?;
        let part = if r.is_null()? {
            r.null()?;
            None
        } else {
            Some(r.bytes("representation")?.to_vec())
        };
        out.push((cf, part));
    }
    r.finish()?;
    // Deterministic encoding (shortest heads): re-encode and compare.
    let mut e = cbor::encoder();
    let _ = e.array(2 * out.len() as u64);
    for (cf, p) in &out {
        let _ = e.u16(*cf);
        let _ = match p {
            Some(b) => e.bytes(b),
            None => e.null(),
        };
    }
    if e.into_writer() != bytes {
        return Err(DecodeError::NotDeterministic("multipart-core"));
    }
    Ok(out)
}
