//! Strict CBOR reading and writing helpers shared by all codecs.
//!
//! [`Reader`] wraps a minicbor [`Decoder`] and only accepts definite lengths,
//! checks types before decoding and bounds every allocation by the number of
//! bytes left in the input. Determinism (shortest integer heads, RFC 8949
//! Section 4.2.1) is enforced by the codecs re-encoding what they decoded and
//! comparing with the input.

use minicbor::data::{Tag, Type};
use minicbor::{Decoder, Encoder};

use crate::error::DecodeError;

/// Largest input any decoder in this crate accepts (bytes). A C509 certificate
/// of our profile is below 1 KiB; chains and multipart bodies stay far below this.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// Encoder error type for in-memory buffers (cannot actually fail).
pub(crate) type EncError = minicbor::encode::Error<core::convert::Infallible>;
/// Encoder result.
pub(crate) type EncResult = Result<(), EncError>;
/// Encoder writing to a `Vec<u8>`.
pub(crate) type Enc = Encoder<Vec<u8>>;

/// New encoder over an empty buffer.
pub(crate) fn encoder() -> Enc {
    Encoder::new(Vec::new())
}

/// Strict reader over one input buffer.
pub(crate) struct Reader<'b> {
    d: Decoder<'b>,
}

impl<'b> Reader<'b> {
    pub(crate) fn new(input: &'b [u8]) -> Result<Self, DecodeError> {
        if input.len() > MAX_INPUT_BYTES {
            return Err(DecodeError::TooLarge(input.len()));
        }
        Ok(Reader {
            d: Decoder::new(input),
        })
    }

    pub(crate) fn remaining(&self) -> usize {
        self.d.input().len().saturating_sub(self.d.position())
    }

    pub(crate) fn at_end(&self) -> bool {
        self.remaining() == 0
    }

    /// Fail with [`DecodeError::TrailingBytes`] unless the input is consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    pub(crate) fn peek(&self) -> Result<Type, DecodeError> {
        if self.at_end() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.d.datatype()?)
    }

    pub(crate) fn is_int(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            Type::U8
                | Type::U16
                | Type::U32
                | Type::U64
                | Type::I8
                | Type::I16
                | Type::I32
                | Type::I64
                | Type::Int
        ))
    }

    pub(crate) fn int(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        if !self.is_int()? {
            return Err(DecodeError::UnexpectedType {
                field,
                expected: "int",
            });
        }
        self.d.i64().map_err(|_| DecodeError::OutOfRange(field))
    }

    pub(crate) fn uint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match self.peek()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(self.d.u64()?),
            _ => Err(DecodeError::UnexpectedType {
                field,
                expected: "uint",
            }),
        }
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'b [u8], DecodeError> {
        match self.peek()? {
            Type::Bytes => Ok(self.d.bytes()?),
            Type::BytesIndef => Err(DecodeError::IndefiniteLength(field)),
            _ => Err(DecodeError::UnexpectedType {
                field,
                expected: "bytes",
            }),
        }
    }

    pub(crate) fn text(&mut self, field: &'static str) -> Result<&'b str, DecodeError> {
        match self.peek()? {
            Type::String => Ok(self.d.str()?),
            Type::StringIndef => Err(DecodeError::IndefiniteLength(field)),
            _ => Err(DecodeError::UnexpectedType {
                field,
                expected: "text",
            }),
        }
    }

    /// Definite-length array header; the length is bounded by the bytes left
    /// (every item takes at least one byte), so callers may pre-allocate.
    pub(crate) fn array(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        match self.peek()? {
            Type::Array => {}
            Type::ArrayIndef => return Err(DecodeError::IndefiniteLength(field)),
            _ => {
                return Err(DecodeError::UnexpectedType {
                    field,
                    expected: "array",
                })
            }
        }
        let n = self
            .d
            .array()?
            .ok_or(DecodeError::IndefiniteLength(field))?;
        let n = usize::try_from(n).map_err(|_| DecodeError::OutOfRange(field))?;
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    pub(crate) fn tag(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match self.peek()? {
            Type::Tag => Ok(self.d.tag()?.as_u64()),
            _ => Err(DecodeError::UnexpectedType {
                field,
                expected: "tag",
            }),
        }
    }

    pub(crate) fn is_null(&self) -> Result<bool, DecodeError> {
        Ok(matches!(self.peek()?, Type::Null))
    }

    pub(crate) fn null(&mut self) -> Result<(), DecodeError> {
        Ok(self.d.null()?)
    }
}

/// Write a CBOR tag.
pub(crate) fn tag(e: &mut Enc, n: u64) -> EncResult {
    e.tag(Tag::new(n)).map(|_| ())
}
