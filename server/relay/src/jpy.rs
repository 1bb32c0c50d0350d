//! The JPY message (draft-ietf-anima-constrained-join-proxy-21, "JPY Message Structure"):
//!
//! ```cddl
//! jpy_message =
//! [
//!    jpy_header  : bstr,
//!    jpy_content : bstr,
//! ]
//! ```
//!
//! The schema is checked in tests against `cbor-schemas/cddl/jpy.cddl` (the CDDL above,
//! verbatim). We always encode a definite-length array of two definite-length byte strings
//! in the shortest form. On decoding, as the draft's "Processing by Registrar" asks, an
//! array of two *or more* elements is accepted and only the first two are used; the other
//! elements must still be well-formed CBOR and nothing may follow the array. Indefinite-length
//! arrays and byte strings are valid CBOR for the CDDL and are accepted as well.

use minicbor::data::Type;
use minicbor::Decoder;

/// Largest CBOR overhead of a JPY message around its header and content: the array head (1)
/// plus the two byte-string heads (up to 3 each for lengths below 65,536).
pub const MAX_CBOR_OVERHEAD: usize = 7;

/// Total bytes a JPY message adds to a datagram carrying `content_len` bytes with a header
/// of `header_len` bytes: the header itself plus the CBOR heads.
pub fn overhead(header_len: usize, content_len: usize) -> usize {
    1 + bstr_head_len(header_len) + header_len + bstr_head_len(content_len)
}

/// The worst case of [`overhead`] for any content up to 65,535 bytes: `header_len + 6`
/// (38 bytes for the draft's 32-byte header).
pub fn max_overhead(header_len: usize) -> usize {
    1 + bstr_head_len(header_len) + header_len + 3
}

fn bstr_head_len(len: usize) -> usize {
    match len {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn push_bstr_head(out: &mut Vec<u8>, len: usize) {
    const MAJOR: u8 = 0x40;
    match len {
        0..=23 => out.push(MAJOR | len as u8),
        24..=0xff => {
            out.push(MAJOR | 24);
            out.push(len as u8);
        }
        0x100..=0xffff => {
            out.push(MAJOR | 25);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(MAJOR | 26);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(MAJOR | 27);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Encodes `[header, content]`.
pub fn encode(header: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(overhead(header.len(), content.len()) + content.len());
    encode_into(&mut out, header, content);
    out
}

/// Appends `[header, content]` to `out`.
pub fn encode_into(out: &mut Vec<u8>, header: &[u8], content: &[u8]) {
    out.push(0x82);
    push_bstr_head(out, header.len());
    out.extend_from_slice(header);
    push_bstr_head(out, content.len());
    out.extend_from_slice(content);
}

/// Why a datagram is not a JPY message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JpyError {
    #[error("not a CBOR array")]
    NotAnArray,
    #[error("array of {0} element(s); a JPY message has at least 2")]
    TooShort(u64),
    #[error("element {0} is not a byte string")]
    NotBytes(usize),
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    #[error("{0} byte(s) after the array")]
    TrailingBytes(usize),
    #[error("header of {0} bytes is over the limit")]
    HeaderTooLong(usize),
}

/// A decoded JPY message. The header and content borrow from the datagram when they were
/// definite-length byte strings (always, for what we and the draft's examples send).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jpy<'a> {
    pub header: std::borrow::Cow<'a, [u8]>,
    pub content: std::borrow::Cow<'a, [u8]>,
}

fn malformed(e: minicbor::decode::Error) -> JpyError {
    JpyError::Malformed(e.to_string())
}

/// Depth limit for the extra elements we skip (minicbor's `skip` recurses).
const MAX_SKIP_DEPTH: usize = 16;

fn read_bytes<'a>(
    d: &mut Decoder<'a>,
    index: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, JpyError> {
    match d.datatype().map_err(malformed)? {
        Type::Bytes => Ok(std::borrow::Cow::Borrowed(d.bytes().map_err(malformed)?)),
        Type::BytesIndef => {
            let mut v = Vec::new();
            for chunk in d.bytes_iter().map_err(malformed)? {
                v.extend_from_slice(chunk.map_err(malformed)?);
            }
            Ok(std::borrow::Cow::Owned(v))
        }
        _ => Err(JpyError::NotBytes(index)),
    }
}

/// Skips one well-formed item, refusing nesting deeper than [`MAX_SKIP_DEPTH`].
fn skip_item(d: &mut Decoder<'_>, depth: usize) -> Result<(), JpyError> {
    if depth > MAX_SKIP_DEPTH {
        return Err(JpyError::Malformed("nested too deeply".into()));
    }
    match d.datatype().map_err(malformed)? {
        Type::Array => {
            let n = d.array().map_err(malformed)?.unwrap_or(0);
            for _ in 0..n {
                skip_item(d, depth + 1)?;
            }
        }
        Type::ArrayIndef => {
            d.array().map_err(malformed)?;
            while d.datatype().map_err(malformed)? != Type::Break {
                skip_item(d, depth + 1)?;
            }
            d.skip().map_err(malformed)?;
        }
        Type::Map => {
            let n = d.map().map_err(malformed)?.unwrap_or(0);
            for _ in 0..n.saturating_mul(2) {
                skip_item(d, depth + 1)?;
            }
        }
        Type::MapIndef => {
            d.map().map_err(malformed)?;
            while d.datatype().map_err(malformed)? != Type::Break {
                skip_item(d, depth + 1)?;
                skip_item(d, depth + 1)?;
            }
            d.skip().map_err(malformed)?;
        }
        Type::Tag => {
            d.tag().map_err(malformed)?;
            skip_item(d, depth + 1)?;
        }
        Type::Break => return Err(JpyError::Malformed("unexpected break".into())),
        _ => d.skip().map_err(malformed)?,
    }
    Ok(())
}

/// Decodes a JPY message: an array of at least two elements whose first two are byte strings;
/// the header may be at most `max_header_len` bytes.
pub fn decode(datagram: &[u8], max_header_len: usize) -> Result<Jpy<'_>, JpyError> {
    let mut d = Decoder::new(datagram);
    let len = match d.datatype().map_err(malformed)? {
        Type::Array => Some(d.array().map_err(malformed)?.unwrap_or(0)),
        Type::ArrayIndef => {
            d.array().map_err(malformed)?;
            None
        }
        _ => return Err(JpyError::NotAnArray),
    };
    if let Some(n) = len {
        if n < 2 {
            return Err(JpyError::TooShort(n));
        }
    }
    let next_is_break = |d: &Decoder<'_>| -> Result<bool, JpyError> {
        Ok(len.is_none() && d.datatype().map_err(malformed)? == Type::Break)
    };
    if next_is_break(&d)? {
        return Err(JpyError::TooShort(0));
    }
    let header = read_bytes(&mut d, 0)?;
    if header.len() > max_header_len {
        return Err(JpyError::HeaderTooLong(header.len()));
    }
    if next_is_break(&d)? {
        return Err(JpyError::TooShort(1));
    }
    let content = read_bytes(&mut d, 1)?;
    match len {
        Some(n) => {
            for _ in 2..n {
                skip_item(&mut d, 1)?;
            }
        }
        None => {
            while d.datatype().map_err(malformed)? != Type::Break {
                skip_item(&mut d, 1)?;
            }
            d.skip().map_err(malformed)?;
        }
    }
    let rest = datagram.len() - d.position().min(datagram.len());
    if rest > 0 {
        return Err(JpyError::TrailingBytes(rest));
    }
    Ok(Jpy { header, content })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drafts_appendix_example_decodes() {
        // Appendix "Stateless Join Proxy JPY Message Examples": a 16-byte header and the
        // start of the 427-byte ClientHello (here padded to its length), then the return
        // message with a 60-byte HelloVerifyRequest.
        let header = hex::decode("d01914bcc376a88ffecc50ca6017b0c1").unwrap();
        let mut hello = hex::decode("16fefd0000000000000000019e").unwrap();
        hello.resize(427, 0);
        let msg = encode(&header, &hello);
        assert_eq!(&msg[..4], &[0x82, 0x50, 0xd0, 0x19]);
        assert_eq!(&msg[18..21], &[0x59, 0x01, 0xab]);
        let j = decode(&msg, 32).unwrap();
        assert_eq!(&*j.header, &header[..]);
        assert_eq!(&*j.content, &hello[..]);
        let mut hvr = hex::decode("16fefd0000000000000000002f").unwrap();
        hvr.resize(60, 0);
        let back = encode(&header, &hvr);
        assert_eq!(&back[18..20], &[0x58, 0x3c]);
        assert_eq!(back.len() - hvr.len(), overhead(16, 60));
    }

    #[test]
    fn overhead_is_at_most_38_bytes_for_a_32_byte_header() {
        assert_eq!(max_overhead(32), 38);
        for content in [0, 1, 23, 24, 255, 256, 1280, 65_535] {
            assert!(overhead(32, content) <= 38);
            let m = encode(&[7; 32], &vec![1; content]);
            assert_eq!(m.len(), content + overhead(32, content));
        }
    }

    #[test]
    fn more_than_two_elements_are_accepted_and_ignored() {
        // [h'01', h'0203', 7, {"a": [1, 2]}]
        let m = hex::decode("844101420203 07 a1616182 0102".replace(' ', "")).unwrap();
        let j = decode(&m, 32).unwrap();
        assert_eq!(&*j.header, &[1]);
        assert_eq!(&*j.content, &[2, 3]);
    }

    #[test]
    fn indefinite_lengths_are_cbor_too() {
        // [_ (_ h'01', h'02'), h'0304']
        let m = hex::decode("9f5f41014102ff420304ff").unwrap();
        let j = decode(&m, 32).unwrap();
        assert_eq!(&*j.header, &[1, 2]);
        assert_eq!(&*j.content, &[3, 4]);
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, JpyError)] = &[
            ("a0", JpyError::NotAnArray),
            ("814101", JpyError::TooShort(1)),
            ("80", JpyError::TooShort(0)),
            ("9f4101ff", JpyError::TooShort(1)),
            ("82014101", JpyError::NotBytes(0)),
            ("82410161ab", JpyError::NotBytes(1)),
            ("8241014102ff", JpyError::TrailingBytes(1)),
        ];
        for (h, want) in cases {
            let m = hex::decode(h).unwrap();
            assert_eq!(decode(&m, 32).unwrap_err(), *want, "{h}");
        }
        assert!(matches!(
            decode(&hex::decode("82420101").unwrap(), 32),
            Err(JpyError::Malformed(_))
        ));
        assert_eq!(
            decode(&encode(&[0; 33], &[1]), 32).unwrap_err(),
            JpyError::HeaderTooLong(33)
        );
        // Deep nesting in an ignored element.
        let mut deep = hex::decode("8341014102").unwrap();
        deep.extend(std::iter::repeat_n(0x81, 100));
        deep.push(0);
        assert!(decode(&deep, 32).is_err());
    }

    proptest::proptest! {
        #[test]
        fn round_trip(header in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
                      content in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let m = encode(&header, &content);
            let j = decode(&m, 64).unwrap();
            proptest::prop_assert_eq!(&*j.header, &header[..]);
            proptest::prop_assert_eq!(&*j.content, &content[..]);
            proptest::prop_assert_eq!(m.len(), content.len() + overhead(header.len(), content.len()));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode(&bytes, 32);
        }
    }
}
