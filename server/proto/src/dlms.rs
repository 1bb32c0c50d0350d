//! The `dlms` certificate profile (DLMS/COSEM, IEC 62056-5-3 security suites 1 and 2, as
//! public implementations such as Gurux's X.509 parser enforce it; the standard itself was
//! not available to us, see /work/shared/docs/protocol-brief.md §7):
//!
//! * subject CN = the 8-byte system title as 16 uppercase hex digits (followed by the
//!   device's serialNumber, which the server needs to recognise the device at `/sren`);
//! * keyUsage digitalSignature (signing certificate) or keyAgreement (key-agreement
//!   certificate), without extKeyUsage; a TLS certificate gets digitalSignature|keyAgreement
//!   and extKeyUsage clientAuth + serverAuth. Which one is decided by the keyUsage the CSR
//!   requests (extensionRequest);
//! * signed ecdsa-with-SHA256 by the P-256 CA or ecdsa-with-SHA384 by the P-384 CA, following
//!   the curve of the CSR's key (suite 1 / suite 2).
//!
//! System title derivation (the README documents it): the first 3 octets are the
//! manufacturer's three-letter FLAG ID as ASCII (configured per rule); the other 5 are the
//! device serial — the IDevID subject's serialNumber with the rule's prefix removed, which
//! must be 1 to 13 decimal digits of value below 2^40 — as a 40-bit big-endian number.
//! Example: FLAG ID "ABC", prefix "ABC", serialNumber "ABC0000012345" → 41 42 43 00 00 00 30 39
//! → CN=4142430000003039.

use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
use x509_cert::ext::Extension;

use crate::ca::oid;

/// A device-class rule: devices whose serial starts with `serial_prefix` get the `dlms`
/// profile with this manufacturer FLAG ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlmsRule {
    /// Prefix of the IDevID serialNumber selecting the rule (non-empty).
    pub serial_prefix: String,
    /// The three-letter FLAG ID (uppercase A-Z), the system title's first 3 octets.
    pub flag_id: [u8; 3],
    /// The curve the rule's CSRs must use (P-256 = security suite 1, P-384 = suite 2); `None`
    /// accepts both, each certificate then signed by the CA on its key's curve.
    pub curve: Option<crate::ca::Curve>,
}

/// Why a DLMS certificate cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DlmsError {
    #[error("FLAG ID must be three uppercase letters A-Z, got {0:?}")]
    BadFlagId(String),
    #[error("serial {0:?} cannot make a DLMS system title: after the prefix it must be 1 to 13 decimal digits below 2^40")]
    BadSerial(String),
    #[error("the dlms profile needs a keyUsage in the CSR's extensionRequest: digitalSignature (signing), keyAgreement (key agreement) or both (TLS)")]
    NoKeyUsage,
    #[error(
        "the dlms profile allows only digitalSignature and keyAgreement in the requested keyUsage"
    )]
    BadKeyUsage,
    #[error(
        "this device class uses {wanted} keys (DLMS security suite {suite}), the CSR's key is not"
    )]
    WrongCurve { wanted: crate::ca::Curve, suite: u8 },
}

/// Which DLMS certificate a CSR asks for (certificate_type of the Security Setup class).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlmsCertType {
    /// certificate_type 0: digitalSignature, no EKU.
    Signing,
    /// certificate_type 1: keyAgreement, no EKU.
    KeyAgreement,
    /// certificate_type 2: digitalSignature|keyAgreement with EKU.
    Tls,
}

impl DlmsCertType {
    /// The store slot ([`crate::store::IssuedCert::slot`]): one active certificate per type.
    pub fn slot(self) -> &'static str {
        match self {
            DlmsCertType::Signing => "dlms-signing",
            DlmsCertType::KeyAgreement => "dlms-key-agreement",
            DlmsCertType::Tls => "dlms-tls",
        }
    }

    /// The type the CSR's requested keyUsage asks for.
    pub fn from_requested(extensions: &[Extension]) -> Result<Self, DlmsError> {
        use der::Decode;
        let ext = extensions
            .iter()
            .find(|e| e.extn_id == oid::CE_KEY_USAGE)
            .ok_or(DlmsError::NoKeyUsage)?;
        let ku =
            KeyUsage::from_der(ext.extn_value.as_bytes()).map_err(|_| DlmsError::BadKeyUsage)?;
        let allowed = KeyUsages::DigitalSignature | KeyUsages::KeyAgreement;
        if !(ku.0 & !allowed).is_empty() {
            return Err(DlmsError::BadKeyUsage);
        }
        match (ku.digital_signature(), ku.key_agreement()) {
            (true, false) => Ok(DlmsCertType::Signing),
            (false, true) => Ok(DlmsCertType::KeyAgreement),
            (true, true) => Ok(DlmsCertType::Tls),
            (false, false) => Err(DlmsError::NoKeyUsage),
        }
    }
}

/// Parse a configured FLAG ID ("ABC").
pub fn parse_flag_id(s: &str) -> Result<[u8; 3], DlmsError> {
    match s.as_bytes() {
        [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok([*a, *b, *c]),
        _ => Err(DlmsError::BadFlagId(s.to_owned())),
    }
}

impl DlmsRule {
    /// Refuses a request key on another curve than the rule's.
    pub fn check_curve(&self, key: Option<crate::ca::Curve>) -> Result<(), DlmsError> {
        match self.curve {
            Some(wanted) if key != Some(wanted) => Err(DlmsError::WrongCurve {
                wanted,
                suite: match wanted {
                    crate::ca::Curve::P256 => 1,
                    crate::ca::Curve::P384 => 2,
                },
            }),
            _ => Ok(()),
        }
    }

    /// Whether the rule selects `device_id`.
    pub fn matches(&self, device_id: &str) -> bool {
        device_id.starts_with(&self.serial_prefix)
    }

    /// The 8-byte system title of `device_id` (see the module documentation).
    pub fn system_title(&self, device_id: &str) -> Result<[u8; 8], DlmsError> {
        let bad = || DlmsError::BadSerial(device_id.to_owned());
        let digits = device_id
            .strip_prefix(&self.serial_prefix)
            .ok_or_else(bad)?;
        if digits.is_empty() || digits.len() > 13 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        if n >= 1 << 40 {
            return Err(bad());
        }
        let mut title = [0u8; 8];
        title[..3].copy_from_slice(&self.flag_id);
        title[3..].copy_from_slice(&n.to_be_bytes()[3..]);
        Ok(title)
    }
}

/// The subject CN: the system title as 16 uppercase hex digits.
pub fn system_title_cn(title: &[u8; 8]) -> String {
    hex::encode_upper(title)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use der::Encode;

    fn rule() -> DlmsRule {
        DlmsRule {
            serial_prefix: "ABC".into(),
            flag_id: parse_flag_id("ABC").unwrap(),
            curve: None,
        }
    }

    #[test]
    fn system_title_from_serial() {
        let t = rule().system_title("ABC0000012345").unwrap();
        assert_eq!(t, [0x41, 0x42, 0x43, 0, 0, 0, 0x30, 0x39]);
        assert_eq!(system_title_cn(&t), "4142430000003039");
        let max = rule().system_title("ABC1099511627775").unwrap();
        assert_eq!(system_title_cn(&max), "414243FFFFFFFFFF");
        for bad in [
            "ABC",
            "ABC1099511627776",
            "ABC12a",
            "XYZ123",
            "ABC12345678901234",
            "ABC-1",
        ] {
            assert_eq!(
                rule().system_title(bad),
                Err(DlmsError::BadSerial(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn curve_pin() {
        use crate::ca::Curve;
        let any = rule();
        assert!(any.check_curve(Some(Curve::P384)).is_ok());
        let suite2 = DlmsRule {
            curve: Some(Curve::P384),
            ..rule()
        };
        assert!(suite2.check_curve(Some(Curve::P384)).is_ok());
        assert_eq!(
            suite2.check_curve(Some(Curve::P256)),
            Err(DlmsError::WrongCurve {
                wanted: Curve::P384,
                suite: 2
            })
        );
    }

    #[test]
    fn flag_ids() {
        assert_eq!(parse_flag_id("GRX").unwrap(), *b"GRX");
        for bad in ["", "AB", "ABCD", "abc", "A1C"] {
            assert!(parse_flag_id(bad).is_err(), "{bad}");
        }
    }

    fn ku_ext(ku: KeyUsages) -> Extension {
        Extension {
            extn_id: oid::CE_KEY_USAGE,
            critical: true,
            extn_value: der::asn1::OctetString::new(KeyUsage(ku.into()).to_der().unwrap()).unwrap(),
        }
    }

    #[test]
    fn type_from_requested_key_usage() {
        use DlmsCertType as T;
        assert_eq!(
            T::from_requested(&[ku_ext(KeyUsages::DigitalSignature)]),
            Ok(T::Signing)
        );
        assert_eq!(
            T::from_requested(&[ku_ext(KeyUsages::KeyAgreement)]),
            Ok(T::KeyAgreement)
        );
        let both = KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyAgreement);
        let ext = Extension {
            extn_value: der::asn1::OctetString::new(both.to_der().unwrap()).unwrap(),
            ..ku_ext(KeyUsages::KeyAgreement)
        };
        assert_eq!(T::from_requested(&[ext]), Ok(T::Tls));
        assert_eq!(T::from_requested(&[]), Err(DlmsError::NoKeyUsage));
        assert_eq!(
            T::from_requested(&[ku_ext(KeyUsages::KeyCertSign)]),
            Err(DlmsError::BadKeyUsage)
        );
    }
}
