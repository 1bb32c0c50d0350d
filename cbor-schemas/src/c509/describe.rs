//! Human-readable dump of a C509 item with the size of every field
//! (used by `est-server c509 decode --info`).

use std::fmt::Write as _;

use super::model::{
    C509Certificate, C509CertificationRequest, CrAttribute, Extension, Name, TbsCertificate,
};
use crate::error::DecodeError;

fn cbor_len(f: impl FnOnce(&mut crate::cbor::Enc) -> crate::cbor::EncResult) -> usize {
    let mut e = crate::cbor::encoder();
    let _ = f(&mut e);
    e.into_writer().len()
}

fn alg_str(a: &super::model::AlgorithmIdentifier, sig: bool) -> String {
    match a {
        super::model::AlgorithmIdentifier::Int(v) => {
            format!("{v} ({})", super::registry::alg_name(*v, sig))
        }
        other => format!("{other:?}"),
    }
}

fn name_str(n: &Name) -> String {
    match n {
        Name::CommonName(t) => format!("CN={}", t.to_text().unwrap_or_else(|_| "?".into())),
        Name::Attributes(a) => format!("{a:?}"),
    }
}

fn ext_line(out: &mut String, e: &Extension) {
    let size = cbor_len(|enc| super::model::encode_extensions(enc, std::slice::from_ref(e)));
    let _ = writeln!(
        out,
        "    - {}{:?} ({} B as the only extension)",
        if e.critical { "critical " } else { "" },
        e.value,
        size
    );
}

fn describe_tbs(out: &mut String, t: &TbsCertificate) {
    let kind = match t.certificate_type {
        2 => "natively signed",
        _ => "CBOR re-encoded X.509",
    };
    let _ = writeln!(
        out,
        "  c509CertificateType: {} ({kind})",
        t.certificate_type
    );
    let _ = writeln!(
        out,
        "  serialNumber: {} ({} B)",
        hex::encode(&t.serial_number),
        t.serial_number.len()
    );
    let _ = writeln!(
        out,
        "  issuerSignatureAlgorithm: {}",
        alg_str(&t.issuer_signature_algorithm, true)
    );
    match &t.issuer {
        None => {
            let _ = writeln!(out, "  issuer: null (same as subject)");
        }
        Some(n) => {
            let _ = writeln!(
                out,
                "  issuer: {} ({} B)",
                name_str(n),
                cbor_len(|e| n.encode(e))
            );
        }
    }
    let _ = writeln!(out, "  notBefore: {} (POSIX seconds)", t.not_before);
    match t.not_after {
        None => {
            let _ = writeln!(out, "  notAfter: null (99991231235959Z)");
        }
        Some(s) => {
            let _ = writeln!(out, "  notAfter: {s} (POSIX seconds)");
        }
    }
    let _ = writeln!(
        out,
        "  subject: {} ({} B)",
        name_str(&t.subject),
        cbor_len(|e| t.subject.encode(e))
    );
    let _ = writeln!(
        out,
        "  subjectPublicKeyAlgorithm: {}",
        alg_str(&t.subject_public_key_algorithm, false)
    );
    let _ = writeln!(
        out,
        "  subjectPublicKey: {} ({} B)",
        hex::encode(&t.subject_public_key),
        t.subject_public_key.len()
    );
    let _ = writeln!(
        out,
        "  extensions: {} ({} B)",
        t.extensions.len(),
        cbor_len(|e| super::model::encode_extensions(e, &t.extensions))
    );
    for e in &t.extensions {
        ext_line(out, e);
    }
}

/// Describe a C509 item: `C509Certificate`, `C509CertificationRequest` or
/// `COSE_C509` (one certificate or a chain), or draft -18's unwrapped
/// `~C509Certificate` (a diagnostic aid for old files; no -20 wire form uses it).
pub fn describe(bytes: &[u8]) -> Result<String, DecodeError> {
    let mut out = String::new();
    let first = bytes.first().copied().ok_or(DecodeError::Truncated)?;
    match (first >> 5, first & 0x1f) {
        (4, 11) => {
            let c = C509Certificate::from_array(bytes)?;
            let _ = writeln!(out, "C509Certificate (CBOR array), {} bytes", bytes.len());
            describe_tbs(&mut out, &c.tbs);
            let _ = writeln!(out, "  issuerSignatureValue: {} B", c.signature.len());
        }
        (4, 7) => {
            let c = C509CertificationRequest::from_array(bytes)?;
            let t = &c.tbs;
            let _ = writeln!(out, "C509CertificationRequest, {} bytes", bytes.len());
            let _ = writeln!(out, "  c509CertificationRequestType: {}", t.request_type);
            let _ = writeln!(
                out,
                "  subjectSignatureAlgorithm: {}",
                alg_str(&t.subject_signature_algorithm, true)
            );
            let _ = writeln!(
                out,
                "  subject: {} ({} B)",
                name_str(&t.subject),
                cbor_len(|e| t.subject.encode(e))
            );
            let _ = writeln!(
                out,
                "  subjectPublicKeyAlgorithm: {}",
                alg_str(&t.subject_public_key_algorithm, false)
            );
            let _ = writeln!(
                out,
                "  subjectPublicKey: {} ({} B)",
                hex::encode(&t.subject_public_key),
                t.subject_public_key.len()
            );
            for a in &t.attributes {
                match a {
                    CrAttribute::ExtensionRequest(x) => {
                        let _ = writeln!(out, "  extensionRequest: {} extension(s)", x.len());
                        for e in x {
                            ext_line(&mut out, e);
                        }
                    }
                    other => {
                        let _ = writeln!(out, "  attribute: {other:?}");
                    }
                }
            }
            let _ = writeln!(out, "  subjectSignatureValue: {} B", c.signature.len());
        }
        (2, _) | (4, _) => {
            let certs = crate::cose::decode_cose_c509(bytes)?;
            let _ = writeln!(
                out,
                "COSE_C509 with {} certificate(s), {} bytes",
                certs.len(),
                bytes.len()
            );
            for (i, c) in certs.iter().enumerate() {
                let _ = writeln!(out, "certificate #{i}: C509Certificate, {} bytes", c.len());
                let cert = C509Certificate::from_array(c)?;
                describe_tbs(&mut out, &cert.tbs);
                let _ = writeln!(out, "  issuerSignatureValue: {} B", cert.signature.len());
            }
        }
        _ => {
            let c = C509Certificate::from_sequence(bytes)?;
            let _ = writeln!(
                out,
                "~C509Certificate (CBOR sequence, the draft -18 form), {} bytes",
                bytes.len()
            );
            describe_tbs(&mut out, &c.tbs);
            let _ = writeln!(out, "  issuerSignatureValue: {} B", c.signature.len());
        }
    }
    Ok(out)
}
