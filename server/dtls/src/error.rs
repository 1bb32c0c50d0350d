//! Errors of the engine and, in one place, the alert each one sends and the refusal counter it
//! bumps (architecture principle 2: typed errors mapped to the wire once).

use thiserror::Error;

use crate::crypto::CryptoError;
use crate::wire::{alert, DecodeError};

/// Why a handshake or session failed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Error {
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    #[error("unexpected message: {0}")]
    UnexpectedMessage(&'static str),
    #[error("no cipher suite in common")]
    NoCommonSuite,
    #[error("no elliptic curve group in common")]
    NoCommonGroup,
    #[error("no signature scheme in common")]
    NoCommonSignatureScheme,
    #[error("the peer did not offer extended_master_secret (RFC 7627), which is required")]
    NoExtendedMasterSecret,
    #[error("the client sent no certificate, which is required")]
    NoCertificate,
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// No certificate type in common (RFC 7250 §4.2: unsupported_certificate).
    #[error("no certificate type in common")]
    UnsupportedCertificate,
    #[error("certificate not issued by a trusted CA: {0}")]
    UnknownCa(String),
    #[error("certificate expired or not yet valid: {0}")]
    CertificateExpired(String),
    #[error("certificate not authorized: {0}")]
    AccessDenied(String),
    #[error("certificate revoked: {0}")]
    CertificateRevoked(String),
    #[error("handshake signature does not verify")]
    BadSignature,
    #[error("Finished verify_data does not match")]
    BadFinished,
    #[error("invalid ECDH public key")]
    BadPublicKey,
    #[error("illegal parameter: {0}")]
    IllegalParameter(&'static str),
    /// The ServerHello carries an extension the ClientHello did not offer (RFC 5246 §7.4.1.4).
    #[error("extension {0} in the ServerHello was not offered")]
    UnsupportedExtension(u16),
    #[error("protocol version other than DTLS 1.2")]
    ProtocolVersion,
    #[error("renegotiation refused")]
    Renegotiation,
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("the peer sent a fatal alert ({0})")]
    PeerAlert(u8),
    #[error("handshake timed out")]
    Timeout,
    #[error("refused by a limit: {0}")]
    Limit(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::BadRecordMac => Error::Internal("record MAC in handshake path".into()),
            CryptoError::BadPublicKey => Error::BadPublicKey,
            CryptoError::BadSignature => Error::BadSignature,
            CryptoError::BadCertificate(s) => Error::BadCertificate(s),
            CryptoError::Unsupported(s) => Error::Unsupported(s),
            CryptoError::BadKey(s) => Error::Internal(s),
            CryptoError::Internal => Error::Internal("crypto".into()),
        }
    }
}

/// The counters refusals are sorted into (issue #10 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    BadCertificate,
    UnknownCa,
    NoCommonSuite,
    NoExtendedMasterSecret,
    Timeout,
    Limit,
    BadCookie,
    Decode,
    BadSignatureOrFinished,
    PeerAlert,
    Other,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 11] = [
        RefusalReason::BadCertificate,
        RefusalReason::UnknownCa,
        RefusalReason::NoCommonSuite,
        RefusalReason::NoExtendedMasterSecret,
        RefusalReason::Timeout,
        RefusalReason::Limit,
        RefusalReason::BadCookie,
        RefusalReason::Decode,
        RefusalReason::BadSignatureOrFinished,
        RefusalReason::PeerAlert,
        RefusalReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::BadCertificate => "bad_certificate",
            RefusalReason::UnknownCa => "unknown_ca",
            RefusalReason::NoCommonSuite => "no_common_suite",
            RefusalReason::NoExtendedMasterSecret => "no_ems",
            RefusalReason::Timeout => "timeout",
            RefusalReason::Limit => "limit",
            RefusalReason::BadCookie => "bad_cookie",
            RefusalReason::Decode => "decode_error",
            RefusalReason::BadSignatureOrFinished => "bad_signature_or_finished",
            RefusalReason::PeerAlert => "peer_alert",
            RefusalReason::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl Error {
    /// The fatal alert description we send for this error, or `None` to fail silently.
    pub fn alert(&self) -> Option<u8> {
        Some(match self {
            Error::Decode(_) => alert::DECODE_ERROR,
            Error::UnexpectedMessage(_) => alert::UNEXPECTED_MESSAGE,
            Error::NoCommonSuite
            | Error::NoCommonGroup
            | Error::NoCommonSignatureScheme
            | Error::NoExtendedMasterSecret
            | Error::NoCertificate
            | Error::Renegotiation
            | Error::Limit(_) => alert::HANDSHAKE_FAILURE,
            Error::BadCertificate(_) => alert::BAD_CERTIFICATE,
            Error::UnsupportedCertificate => alert::UNSUPPORTED_CERTIFICATE,
            Error::UnknownCa(_) => alert::UNKNOWN_CA,
            Error::CertificateExpired(_) => alert::CERTIFICATE_EXPIRED,
            Error::AccessDenied(_) => alert::ACCESS_DENIED,
            Error::CertificateRevoked(_) => alert::CERTIFICATE_REVOKED,
            Error::BadSignature | Error::BadFinished => alert::DECRYPT_ERROR,
            Error::BadPublicKey | Error::IllegalParameter(_) => alert::ILLEGAL_PARAMETER,
            Error::UnsupportedExtension(_) => alert::UNSUPPORTED_EXTENSION,
            Error::ProtocolVersion => alert::PROTOCOL_VERSION,
            Error::Unsupported(_) => alert::HANDSHAKE_FAILURE,
            Error::Internal(_) => alert::INTERNAL_ERROR,
            Error::PeerAlert(_) | Error::Timeout => return None,
        })
    }

    /// The refusal counter this error belongs to.
    pub fn refusal_reason(&self) -> RefusalReason {
        match self {
            Error::Decode(_)
            | Error::UnexpectedMessage(_)
            | Error::IllegalParameter(_)
            | Error::UnsupportedExtension(_) => RefusalReason::Decode,
            Error::NoCommonSuite | Error::NoCommonGroup | Error::NoCommonSignatureScheme => {
                RefusalReason::NoCommonSuite
            }
            Error::NoExtendedMasterSecret => RefusalReason::NoExtendedMasterSecret,
            Error::NoCertificate
            | Error::BadCertificate(_)
            | Error::UnsupportedCertificate
            | Error::CertificateExpired(_)
            | Error::AccessDenied(_)
            | Error::CertificateRevoked(_) => RefusalReason::BadCertificate,
            Error::UnknownCa(_) => RefusalReason::UnknownCa,
            Error::BadSignature | Error::BadFinished | Error::BadPublicKey => {
                RefusalReason::BadSignatureOrFinished
            }
            Error::PeerAlert(_) => RefusalReason::PeerAlert,
            Error::Timeout => RefusalReason::Timeout,
            Error::Limit(_) => RefusalReason::Limit,
            Error::ProtocolVersion
            | Error::Renegotiation
            | Error::Unsupported(_)
            | Error::Internal(_) => RefusalReason::Other,
        }
    }
}

/// A certificate-verification failure reported by a verifier, sorted by the alert it maps to.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CertError {
    #[error("{0}")]
    BadCertificate(String),
    #[error("{0}")]
    UnknownCa(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    AccessDenied(String),
    /// The certificate (or its device) was revoked: alert certificate_revoked (44).
    #[error("{0}")]
    Revoked(String),
}

impl From<CertError> for Error {
    fn from(e: CertError) -> Self {
        match e {
            CertError::BadCertificate(s) => Error::BadCertificate(s),
            CertError::UnknownCa(s) => Error::UnknownCa(s),
            CertError::Expired(s) => Error::CertificateExpired(s),
            CertError::AccessDenied(s) => Error::AccessDenied(s),
            CertError::Revoked(s) => Error::CertificateRevoked(s),
        }
    }
}
