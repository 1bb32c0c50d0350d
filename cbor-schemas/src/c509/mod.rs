//! C509 certificates and certification requests
//! (draft-ietf-cose-cbor-encoded-cert-20).
//!
//! # Wire forms (draft -20)
//!
//! * A certificate is the CBOR array `C509Certificate` (Section 3.1), e.g. the
//!   141-byte form of the Appendix A.1 example that starts with `8B`. This is what
//!   [`certificate_der_to_c509`] returns, what [`certificate_c509_to_der`] takes, what
//!   the body of `application/cose-c509-cert+cbor` is and what the TLS/DTLS
//!   Certificate message carries (`c509_data`, Section 8.20). Draft -18 used the
//!   unwrapped sequence `~C509Certificate` (140 bytes) in TLS and inside
//!   `C509CertData`; -20 does not, and the wire-facing decoders here refuse it.
//! * `application/cose-c509+cbor` carries `COSE_C509` (a bag or chain):
//!   `C509CertData = bytes .cbor C509Certificate`, one byte string or an array of
//!   two or more; build it with [`crate::cose::cose_c509_chain`].
//! * `application/cose-c509-pkcs10+cbor` ([`CONTENT_FORMAT_C509_PKCS10_DEFAULT`])
//!   carries the CBOR array `C509CertificationRequest` (Section 4).
//! * A natively signed (type 2) certificate is still signed over the CBOR sequence
//!   `TBSCertificate` (the array's first ten items, without the array header).
//!
//! # Content-Formats
//!
//! Draft -20 leaves every CoAP Content-Format unassigned. Until IANA assigns them we
//! use numbers from the CoAP "Experimental Use" range 65000-65535; every server
//! setting that uses one is configurable (`[est]` in est-server's configuration):
//! 65003 `application/cose-c509-cert+cbor` (-18's TBD3 for the certificate media
//! type), 65015 `application/cose-c509+cbor` (-18's TBD15, the chain variant),
//! 65004 `application/cose-c509-pkcs10+cbor` (TBD4), 65019
//! `application/cose-c509-crtemplate+cbor` (TBD19). These must be replaced once the
//! RFC is published.
//!
//! # Registry values
//!
//! Every registry-valued integer (types, algorithms, attributes, extensions, key
//! purposes, general names) must lie in [`REGISTRY_MIN`]..=[`REGISTRY_MAX`], the value
//! range of IANA's "CBOR Encoded X.509 (C509)" registries; the decoders refuse
//! anything outside it with [`crate::DecodeError::OutOfRange`]. Inside it, values this
//! crate does not implement are refused with `UnsupportedValue` where the value's
//! meaning decides how the rest of the item is read (extensions, attributes, general
//! names), and kept as numbers otherwise (algorithm identifiers), which the DER
//! conversion then refuses by name.

mod csr;
mod describe;
mod model;
mod registry;
mod x509;

use der::{Decode, Encode};

pub use csr::{csr_c509_to_der, csr_der_to_c509, sign_native_csr, C509Csr};
pub use describe::describe;
pub use model::{
    AlgorithmIdentifier, AuthorityKeyIdentifier, BasicConstraints, C509Certificate,
    C509CertificationRequest, CrAttribute, Extension, ExtensionValue, GeneralName, KeyPurpose,
    Name, RdnAttribute, SpecialText, TbsCertificate, TbsCertificationRequest,
};
pub use x509::{ecdsa_der_to_raw, ecdsa_raw_to_der};

use crate::error::ConvertError;
use x509::KeyForm;

/// Media type of a single certificate, the CBOR array `C509Certificate` (draft -20
/// Section 8.18).
pub const MEDIA_TYPE_C509_CERT: &str = "application/cose-c509-cert+cbor";
/// Media type of a bag or chain, `COSE_C509` (draft -20 Section 8.18).
pub const MEDIA_TYPE_COSE_C509: &str = "application/cose-c509+cbor";
/// Media type of a certification request, `C509CertificationRequest`.
pub const MEDIA_TYPE_C509_PKCS10: &str = "application/cose-c509-pkcs10+cbor";

/// CoAP Content-Format for `application/cose-c509-cert+cbor` (one `C509Certificate`).
/// Unassigned in draft -20; experimental-range stand-in, see the module docs.
pub const CONTENT_FORMAT_C509_CERT_DEFAULT: u16 = 65003;
/// CoAP Content-Format for `application/cose-c509+cbor` (`COSE_C509`, a bag or
/// chain). Unassigned in draft -20; experimental-range stand-in.
pub const CONTENT_FORMAT_COSE_C509_DEFAULT: u16 = 65015;
/// CoAP Content-Format for `application/cose-c509-pkcs10+cbor`
/// (`C509CertificationRequest`). Unassigned in draft -20 (TBD4 in -18).
pub const CONTENT_FORMAT_C509_PKCS10_DEFAULT: u16 = 65004;
/// CoAP Content-Format for `application/cose-c509-crtemplate+cbor` (TBD19 in -18).
pub const CONTENT_FORMAT_C509_CRTEMPLATE: u16 = 65019;

/// Smallest registry value (IANA "CBOR Encoded X.509 (C509)" registries).
pub const REGISTRY_MIN: i64 = -32768;
/// Largest registry value (IANA "CBOR Encoded X.509 (C509)" registries).
pub const REGISTRY_MAX: i64 = 32767;

/// Largest DER input accepted by the converters.
pub const MAX_DER_BYTES: usize = 16 * 1024;

/// c509CertificateType / c509CertificationRequestType 2: natively signed.
pub const TYPE_NATIVE: i64 = 2;
/// c509CertificateType / c509CertificationRequestType 3: CBOR re-encoded DER.
pub const TYPE_REENCODED: i64 = 3;

fn check_der_size(der: &[u8]) -> Result<(), ConvertError> {
    if der.len() > MAX_DER_BYTES {
        return Err(ConvertError::Decode(crate::DecodeError::TooLarge(
            der.len(),
        )));
    }
    Ok(())
}

/// Convert an X.509 TBSCertificate into the C509 TBSCertificate of the given
/// type (3: re-encoding; 2: to be signed natively with
/// [`sign_native_certificate`]).
pub fn tbs_from_x509(
    tbs: &x509_cert::TbsCertificate,
    certificate_type: i64,
) -> Result<TbsCertificate, ConvertError> {
    let native = match certificate_type {
        TYPE_NATIVE => true,
        TYPE_REENCODED => false,
        t => {
            return Err(ConvertError::WrongType {
                expected: "2 or 3",
                found: t,
            })
        }
    };
    if tbs.version != x509_cert::Version::V3 {
        return Err(ConvertError::Unsupported(
            "only X.509 v3 certificates have a C509 encoding".into(),
        ));
    }
    if tbs.issuer_unique_id.is_some() || tbs.subject_unique_id.is_some() {
        return Err(ConvertError::Unsupported(
            "issuerUniqueID/subjectUniqueID".into(),
        ));
    }
    let issuer = if tbs.issuer == tbs.subject {
        None
    } else {
        Some(x509::name_to_c509(&tbs.issuer, native)?)
    };
    let form = if native {
        KeyForm::NativeCompressed
    } else {
        KeyForm::ReencodedCompressed
    };
    let (pk_alg, pk) = x509::spki_to_c509(&tbs.subject_public_key_info, form)?;
    let mut extensions = Vec::new();
    if let Some(exts) = &tbs.extensions {
        if exts.is_empty() {
            return Err(ConvertError::NotInvertible("empty extensions SEQUENCE"));
        }
        for e in exts {
            extensions.push(x509::extension_to_c509(e, native)?);
        }
    }
    Ok(TbsCertificate {
        certificate_type,
        serial_number: x509::serial_to_c509(&tbs.serial_number)?,
        issuer_signature_algorithm: x509::sig_alg_to_c509(&tbs.signature)?,
        issuer,
        not_before: x509::time_to_c509(&tbs.validity.not_before),
        not_after: x509::not_after_to_c509(&tbs.validity.not_after),
        subject: x509::name_to_c509(&tbs.subject, native)?,
        subject_public_key_algorithm: pk_alg,
        subject_public_key: pk,
        extensions,
    })
}

/// Convert a C509 TBSCertificate back to X.509 (exact for type 3; for type 2
/// the string types and key encoding follow [`C509Csr::subject`]'s rules).
pub fn tbs_to_x509(tbs: &TbsCertificate) -> Result<x509_cert::TbsCertificate, ConvertError> {
    let native = tbs.certificate_type == TYPE_NATIVE;
    let subject = x509::name_from_c509(&tbs.subject, native)?;
    let issuer = match &tbs.issuer {
        None => subject.clone(),
        Some(n) => x509::name_from_c509(n, native)?,
    };
    let extensions = if tbs.extensions.is_empty() {
        None
    } else {
        Some(
            tbs.extensions
                .iter()
                .map(|e| x509::extension_from_c509(e, native))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    Ok(x509_cert::TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: x509::serial_from_c509(&tbs.serial_number)?,
        signature: x509::sig_alg_from_c509(&tbs.issuer_signature_algorithm)?,
        issuer,
        validity: x509_cert::time::Validity {
            not_before: x509::time_from_c509(tbs.not_before)?,
            not_after: x509::not_after_from_c509(tbs.not_after)?,
        },
        subject,
        subject_public_key_info: x509::spki_from_c509(
            &tbs.subject_public_key_algorithm,
            &tbs.subject_public_key,
            native,
        )?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions,
    })
}

/// Parse a DER certificate into the type-3 C509 model, checking that the
/// conversion is exactly invertible.
pub fn certificate_from_der(der: &[u8]) -> Result<C509Certificate, ConvertError> {
    check_der_size(der)?;
    let cert = x509_cert::Certificate::from_der(der)?;
    if cert.to_der()? != der {
        return Err(ConvertError::NotCanonicalDer);
    }
    if cert.signature_algorithm != cert.tbs_certificate.signature {
        return Err(ConvertError::Unsupported(
            "signatureAlgorithm differs from tbsCertificate.signature".into(),
        ));
    }
    let tbs = tbs_from_x509(&cert.tbs_certificate, TYPE_REENCODED)?;
    let signature = x509::sig_value_to_c509(&tbs.issuer_signature_algorithm, &cert.signature)?;
    let c = C509Certificate { tbs, signature };
    // Lossless by construction: decode what we would emit and rebuild the DER.
    let back = C509Certificate::from_array(&c.to_array())?;
    if certificate_to_der(&back)? != der {
        return Err(ConvertError::NotInvertible("DER -> C509 -> DER differs"));
    }
    Ok(c)
}

/// DER of a type-3 C509 certificate model.
pub fn certificate_to_der(c: &C509Certificate) -> Result<Vec<u8>, ConvertError> {
    if c.tbs.certificate_type != TYPE_REENCODED {
        return Err(ConvertError::WrongType {
            expected: "3 (CBOR re-encoded X.509)",
            found: c.tbs.certificate_type,
        });
    }
    let tbs = tbs_to_x509(&c.tbs)?;
    let cert = x509_cert::Certificate {
        signature_algorithm: tbs.signature.clone(),
        signature: x509::sig_value_from_c509(&c.tbs.issuer_signature_algorithm, &c.signature)?,
        tbs_certificate: tbs,
    };
    Ok(cert.to_der()?)
}

/// DER X.509 certificate -> C509 type 3, as the CBOR array `C509Certificate`
/// (draft -20: the body of `application/cose-c509-cert+cbor` and of a TLS
/// `c509_data`; wrap it with [`crate::cose::cose_c509_chain`] for
/// `application/cose-c509+cbor`).
pub fn certificate_der_to_c509(der: &[u8]) -> Result<Vec<u8>, ConvertError> {
    Ok(certificate_from_der(der)?.to_array())
}

/// C509 type 3 (the CBOR array `C509Certificate`) -> the exact original DER.
/// Type 2 has no DER equivalent and is refused; so is draft -18's unwrapped
/// sequence `~C509Certificate`, which -20 no longer uses on the wire.
pub fn certificate_c509_to_der(c509: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let c = C509Certificate::from_array(c509)?;
    certificate_to_der(&c)
}

/// Issue a natively signed (type 2) C509 certificate: `sign` receives the
/// TBSCertificate CBOR sequence (Section 3.1.11) and returns the signature as
/// produced by the signer (DER Ecdsa-Sig-Value for ECDSA, raw for EdDSA).
/// Returns the CBOR array `C509Certificate`.
pub fn sign_native_certificate(
    tbs: &TbsCertificate,
    sign: impl Fn(&[u8]) -> Vec<u8>,
) -> Result<Vec<u8>, ConvertError> {
    if tbs.certificate_type != TYPE_NATIVE {
        return Err(ConvertError::WrongType {
            expected: "2 (natively signed)",
            found: tbs.certificate_type,
        });
    }
    let msg = tbs.to_cbor_sequence();
    let sig = sign(&msg);
    let signature = if x509::is_ecdsa(&tbs.issuer_signature_algorithm) {
        x509::ecdsa_der_to_raw(&sig)?
    } else {
        sig
    };
    let c = C509Certificate {
        tbs: tbs.clone(),
        signature,
    };
    let out = c.to_array();
    // Refuse to emit something our own decoder would reject.
    C509Certificate::from_array(&out)?;
    Ok(out)
}

/// Verify a natively signed (type 2) certificate (the CBOR array
/// `C509Certificate`) with the issuer's P-256 public key (SEC1 bytes, compressed
/// or not). Only ecdsa-with-SHA256 is supported. Validity dates are not checked
/// here (the caller owns the clock).
pub fn verify_native_certificate(
    c509: &[u8],
    issuer_public_key_sec1: &[u8],
) -> Result<C509Certificate, ConvertError> {
    let c = C509Certificate::from_array(c509)?;
    if c.tbs.certificate_type != TYPE_NATIVE {
        return Err(ConvertError::WrongType {
            expected: "2 (natively signed)",
            found: c.tbs.certificate_type,
        });
    }
    verify_es256(
        &c.tbs.issuer_signature_algorithm,
        issuer_public_key_sec1,
        &c.tbs.to_cbor_sequence(),
        &c.signature,
    )?;
    Ok(c)
}

/// ECDSA P-256 / SHA-256 verification of an r||s signature.
pub(crate) fn verify_es256(
    alg: &AlgorithmIdentifier,
    sec1_key: &[u8],
    msg: &[u8],
    raw_sig: &[u8],
) -> Result<(), ConvertError> {
    use p256::ecdsa::signature::Verifier;
    if *alg != AlgorithmIdentifier::Int(0) {
        return Err(ConvertError::UnsupportedAlgorithm(format!(
            "{alg:?} (only ecdsa-with-SHA256 is verified)"
        )));
    }
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(sec1_key)
        .map_err(|_| ConvertError::Malformed("P-256 public key"))?;
    let sig = p256::ecdsa::Signature::from_slice(raw_sig)
        .map_err(|_| ConvertError::Malformed("ECDSA P-256 r||s"))?;
    vk.verify(msg, &sig).map_err(|_| ConvertError::BadSignature)
}
