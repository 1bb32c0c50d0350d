//! Typed errors of the crate: [`DecodeError`] for malformed CBOR input and
//! [`ConvertError`] for everything that goes wrong when converting between
//! C509 and DER, signing or verifying.

/// A CBOR item could not be decoded into one of the structures of this crate.
///
/// Decoders are strict: they reject trailing bytes, indefinite lengths,
/// non-deterministic encodings (RFC 8949 Section 4.2.1, which C509 requires
/// in draft-ietf-cose-cbor-encoded-cert-20 Section 2), values outside the
/// registries this crate implements and oversized input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended in the middle of an item.
    #[error("truncated CBOR input")]
    Truncated,
    /// The bytes are not well-formed CBOR (message from minicbor).
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    /// Bytes remain after the last item of the structure.
    #[error("{0} trailing byte(s) after the CBOR item")]
    TrailingBytes(usize),
    /// An indefinite-length array, map, byte or text string was found.
    #[error("indefinite-length CBOR item in {0}")]
    IndefiniteLength(&'static str),
    /// The item is valid but not in the single deterministic encoding.
    #[error("not deterministically encoded: {0}")]
    NotDeterministic(&'static str),
    /// The CBOR major type does not fit the field.
    #[error("unexpected CBOR type for {field}: expected {expected}")]
    UnexpectedType {
        /// Field being decoded.
        field: &'static str,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// A number does not fit the range allowed for the field.
    #[error("value out of range for {0}")]
    OutOfRange(&'static str),
    /// A registry value this crate does not implement (or that is reserved).
    #[error("unsupported {registry} value {value}")]
    UnsupportedValue {
        /// Registry (C509 IANA registry name).
        registry: &'static str,
        /// The value found.
        value: i64,
    },
    /// An array has the wrong number of items.
    #[error("wrong number of items in {0}")]
    Length(&'static str),
    /// Input larger than the configured limit.
    #[error("input of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Any other structural violation.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl From<minicbor::decode::Error> for DecodeError {
    fn from(e: minicbor::decode::Error) -> Self {
        if e.is_end_of_input() {
            DecodeError::Truncated
        } else {
            DecodeError::Malformed(e.to_string())
        }
    }
}

/// Conversion between C509 and X.509/PKCS#10, signing or verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The CBOR input was malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The DER input was malformed (or a DER structure could not be built).
    #[error("DER: {0}")]
    Der(String),
    /// The DER input is not in canonical DER (re-encoding it changes the bytes),
    /// so no lossless C509 re-encoding exists.
    #[error("input is not canonical DER")]
    NotCanonicalDer,
    /// The certificate or request uses a feature C509 (or this crate) cannot represent.
    #[error("cannot be represented in C509: {0}")]
    Unsupported(String),
    /// The conversion would not reproduce the exact input bytes.
    #[error("C509 re-encoding is not invertible for this input: {0}")]
    NotInvertible(&'static str),
    /// The operation needs another C509 type (e.g. DER output from a natively signed item).
    #[error("wrong C509 type: expected {expected}, found {found}")]
    WrongType {
        /// Type(s) accepted by the operation.
        expected: &'static str,
        /// Type found in the input.
        found: i64,
    },
    /// A signature or public key value is malformed.
    #[error("malformed signature or key: {0}")]
    Malformed(&'static str),
    /// The algorithm is not supported for this operation.
    #[error("unsupported algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// Signature verification (proof of possession) failed.
    #[error("signature verification failed")]
    BadSignature,
    /// An empty certificate chain was given.
    #[error("empty certificate chain")]
    EmptyChain,
    /// Internal encoder failure (should not happen with in-memory buffers).
    #[error("CBOR encoding failed")]
    Encode,
}

impl From<der::Error> for ConvertError {
    fn from(e: der::Error) -> Self {
        ConvertError::Der(e.to_string())
    }
}
