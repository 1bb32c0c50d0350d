//! C509 certificates and certification requests
//! (draft-ietf-cose-cbor-encoded-cert-18).
//!
//! # Wire forms
//!
//! * [`certificate_der_to_c509`] returns the unwrapped CBOR sequence
//!   `~C509Certificate` (Section 3.1): the 140-byte form of the Appendix A.1
//!   example, the content of a `C509CertData` byte string and what TLS carries.
//! * The media type `application/cose-c509-cert` (Section 8.16, our
//!   [`CONTENT_FORMAT_C509_CERT_DEFAULT`]) carries `COSE_C509`, i.e. each
//!   certificate wrapped in a byte string (one) or an array of byte strings
//!   (a chain): build it with [`crate::cose::cose_c509_chain`].
//! * `application/cose-c509-pkcs10` ([`CONTENT_FORMAT_C509_PKCS10_DEFAULT`])
//!   carries the CBOR array `C509CertificationRequest` (Section 4).
//!
//! # Content-Formats
//!
//! Draft -18 leaves every CoAP Content-Format as TBD (Section 8.19). Until IANA
//! assigns them we use numbers from the CoAP "Experimental Use" range
//! 65000-65535, chosen as 65000 + the draft's TBD placeholder number so they are
//! easy to trace back: TBD3 -> 65003, TBD15 -> 65015, TBD4 -> 65004,
//! TBD19 -> 65019. These must be replaced once the RFC is published.

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

/// CoAP Content-Format for `application/cose-c509-cert` (COSE_C509). Draft
/// value TBD3; experimental-range stand-in, see the module docs.
pub const CONTENT_FORMAT_C509_CERT_DEFAULT: u16 = 65003;
/// CoAP Content-Format for `application/cose-c509-cert; usage=chain` (TBD15).
pub const CONTENT_FORMAT_C509_CERT_CHAIN: u16 = 65015;
/// CoAP Content-Format for `application/cose-c509-pkcs10`
/// (C509CertificationRequest). Draft value TBD4.
pub const CONTENT_FORMAT_C509_PKCS10_DEFAULT: u16 = 65004;
/// CoAP Content-Format for `application/cose-c509-crtemplate` (TBD19).
pub const CONTENT_FORMAT_C509_CRTEMPLATE: u16 = 65019;

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
    let back = C509Certificate::from_sequence(&c.to_sequence())?;
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

/// DER X.509 certificate -> C509 type 3, as the unwrapped CBOR sequence
/// `~C509Certificate` (wrap with [`crate::cose::cose_c509_chain`] for the
/// `application/cose-c509-cert` Content-Format, or use
/// [`certificate_der_to_c509_array`] for the `C509Certificate` array).
pub fn certificate_der_to_c509(der: &[u8]) -> Result<Vec<u8>, ConvertError> {
    Ok(certificate_from_der(der)?.to_sequence())
}

/// DER X.509 certificate -> C509 type 3 as the CBOR array `C509Certificate`.
pub fn certificate_der_to_c509_array(der: &[u8]) -> Result<Vec<u8>, ConvertError> {
    Ok(certificate_from_der(der)?.to_array())
}

/// C509 type 3 (`~C509Certificate` sequence or `C509Certificate` array) ->
/// the exact original DER. Type 2 has no DER equivalent and is refused.
pub fn certificate_c509_to_der(c509: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let c = C509Certificate::from_either(c509)?;
    certificate_to_der(&c)
}

/// Issue a natively signed (type 2) C509 certificate: `sign` receives the
/// TBSCertificate CBOR sequence (Section 3.1.11) and returns the signature as
/// produced by the signer (DER Ecdsa-Sig-Value for ECDSA, raw for EdDSA).
/// Returns `~C509Certificate`.
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
    let out = c.to_sequence();
    // Refuse to emit something our own decoder would reject.
    C509Certificate::from_sequence(&out)?;
    Ok(out)
}

/// Verify a natively signed (type 2) certificate with the issuer's P-256
/// public key (SEC1 bytes, compressed or not). Only ecdsa-with-SHA256 is
/// supported. Validity dates are not checked here (the caller owns the clock).
pub fn verify_native_certificate(
    c509: &[u8],
    issuer_public_key_sec1: &[u8],
) -> Result<C509Certificate, ConvertError> {
    let c = C509Certificate::from_either(c509)?;
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
