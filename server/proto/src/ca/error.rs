//! Typed errors of the `ca` module.

use const_oid::ObjectIdentifier;

/// Why a PKCS#10 certification request was refused by [`super::parse_and_verify_csr`].
///
/// The EST layer maps these to CoAP codes (RFC 9148 §5.5: a request the server cannot accept is 4.00).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The request is longer than the configured limit; nothing was parsed.
    #[error("CSR of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the request.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// Not a DER PKCS#10 request (bad tag or length, trailing bytes, unparseable attribute, ...).
    #[error("malformed CSR: {0}")]
    Malformed(der::Error),
    /// The subject public key is not an uncompressed id-ecPublicKey point on secp256r1 (RFC 7925 §4.4.2).
    #[error("unsupported CSR key: {0}")]
    UnsupportedKey(&'static str),
    /// The request is not signed with ecdsa-with-SHA256 (parameters absent, RFC 5758 §3.2).
    #[error("unsupported CSR signature algorithm {0}")]
    UnsupportedSignatureAlgorithm(ObjectIdentifier),
    /// The self-signature does not verify with the enclosed key: no proof of possession.
    #[error("CSR signature does not verify")]
    BadSignature,
}

impl From<der::Error> for CsrError {
    fn from(e: der::Error) -> Self {
        CsrError::Malformed(e)
    }
}

/// Errors of CA operations: key handling, certificate construction, signing, CMS encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// DER encoding or decoding failed.
    #[error("DER: {0}")]
    Der(#[from] der::Error),
    /// A private key was refused (not PKCS#8 P-256, or inconsistent).
    #[error("private key rejected: {0}")]
    KeyRejected(String),
    /// The signer failed to produce a signature.
    #[error("signing failed")]
    SigningFailed,
    /// The signer's public key is not the one in the CA certificate.
    #[error("the signing key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The certificate given as a CA is not a CA (basicConstraints cA, keyUsage keyCertSign).
    #[error("not a CA certificate: {0}")]
    NotACa(&'static str),
    /// Validity period unusable (notBefore not before notAfter, before 1970, after 9999).
    #[error("invalid validity: {0}")]
    InvalidValidity(&'static str),
    /// A name or name component cannot be encoded as asked.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A CMS message is not what was expected.
    #[error("unexpected CMS content: {0}")]
    UnexpectedCms(&'static str),
    /// A CRL that does not parse, is not from the expected CA, or whose signature does not
    /// verify.
    #[error("CRL refused: {0}")]
    BadCrl(String),
}
