//! The issuing CA: holds the parsed CA certificate and its signer, issues end-entity certificates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::asn1::{AnyRef, BitString, GeneralizedTime, OctetString, UtcTime};
use der::{DateTime, Decode, Encode};
use rand::RngCore;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

use super::error::CaError;
use super::names::HardwareModuleName;
use super::oid;
use super::signer::{ecdsa_with, Signer};

/// What to put in an end-entity (LDevID) certificate; see [`IssuingCa::issue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueParams {
    /// Subject name, copied as given (normally the CSR's subject).
    pub subject: Name,
    /// Subject public key (normally the CSR's key).
    pub public_key: SubjectPublicKeyInfoOwned,
    /// hardwareModuleName to carry in subjectAltName (RFC 4108; IEEE 802.1AR).
    pub hardware_module: Option<HardwareModuleName>,
    /// Serial number; use [`random_serial`].
    pub serial: SerialNumber,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity; clamped to the CA certificate's notAfter.
    pub not_after: SystemTime,
    /// Put digitalSignature in keyUsage (default true; a DLMS key-agreement certificate has
    /// keyAgreement only).
    pub digital_signature: bool,
    /// Add keyAgreement to keyUsage (RFC 7925 §4.4.2 allows digitalSignature or keyAgreement).
    pub key_agreement: bool,
    /// Add extKeyUsage id-kp-clientAuth (default true; rustls-webpki requires it for TLS clients
    /// whenever extKeyUsage is present, and we always want meters to be TLS clients).
    pub extended_key_usage_client_auth: bool,
    /// Add id-kp-serverAuth to extKeyUsage (a DLMS TLS certificate).
    pub extended_key_usage_server_auth: bool,
    /// When set, extKeyUsage is exactly these purposes, in this order (no extension when
    /// empty), instead of what the two flags above say (a configured certificate profile).
    pub extended_key_usages: Option<Vec<const_oid::ObjectIdentifier>>,
}

impl IssueParams {
    /// Parameters with the defaults: no hardwareModuleName, digitalSignature only, EKU clientAuth.
    pub fn new(
        subject: Name,
        public_key: SubjectPublicKeyInfoOwned,
        serial: SerialNumber,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Self {
        Self {
            subject,
            public_key,
            hardware_module: None,
            serial,
            not_before,
            not_after,
            digital_signature: true,
            key_agreement: false,
            extended_key_usage_client_auth: true,
            extended_key_usage_server_auth: false,
            extended_key_usages: None,
        }
    }

    /// Defaults as [`IssueParams::new`], with subject, public key and hardwareModuleName taken from
    /// a verified CSR.
    pub fn from_csr(
        csr: &super::ParsedCsr,
        serial: SerialNumber,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Self {
        let mut params = Self::new(
            csr.subject.clone(),
            csr.public_key.clone(),
            serial,
            not_before,
            not_after,
        );
        params.hardware_module = csr.hardware_module.clone();
        params
    }
}

/// A positive random serial number of 16 octets (RFC 5280 §4.1.2.2: positive, at most 20 octets;
/// CA/B Forum asks for at least 64 random bits; this has 126). The first octet is 0x40..=0x7F: top
/// bit clear (positive without a 0x00 pad) and never zero (fixed length).
#[allow(
    clippy::expect_used,
    reason = "16 octets, top bit clear: within SerialNumber's 20-octet limit, `new` cannot fail"
)]
pub fn random_serial<R: RngCore + ?Sized>(rng: &mut R) -> SerialNumber {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::new(&bytes).expect("16-octet positive serial is always valid")
}

/// An issuing CA: the CA certificate, parsed once, and the [`Signer`] holding its key.
pub struct IssuingCa {
    cert_der: Vec<u8>,
    cert: Certificate,
    signer: Box<dyn Signer>,
    key_id: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// cRLDistributionPoints put in issued end-entity certificates.
    pub(crate) crl_distribution_points: Option<Extension>,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("subject", &self.cert.tbs_certificate.subject.to_string())
            .field("key_id", &hex::encode(&self.key_id))
            .finish_non_exhaustive()
    }
}

impl IssuingCa {
    /// Take a CA certificate (DER) and the signer for its key.
    ///
    /// Refused: a certificate that does not parse, that is not a CA (basicConstraints cA must be
    /// true; keyUsage, when present, must include keyCertSign — RFC 5280 §4.2.1.3/§4.2.1.9), or
    /// whose public key is not the signer's ([`CaError::KeyMismatch`]).
    pub fn new(cert_der: Vec<u8>, signer: Box<dyn Signer>) -> Result<Self, CaError> {
        let cert = Certificate::from_der(&cert_der)?;
        let tbs = &cert.tbs_certificate;

        let signer_spki = SubjectPublicKeyInfoOwned::from_der(signer.public_key_spki_der())?;
        if signer_spki != tbs.subject_public_key_info {
            return Err(CaError::KeyMismatch);
        }

        match tbs.get::<BasicConstraints>()? {
            Some((_, bc)) if bc.ca => {}
            _ => return Err(CaError::NotACa("basicConstraints cA is not true")),
        }
        if let Some((_, ku)) = tbs.get::<KeyUsage>()? {
            if !ku.key_cert_sign() {
                return Err(CaError::NotACa("keyUsage lacks keyCertSign"));
            }
        }

        // The AKI of what we issue is our SKI (RFC 5280 §4.2.1.1); compute it if the CA cert has none.
        let key_id = match tbs.get::<x509_cert::ext::pkix::SubjectKeyIdentifier>()? {
            Some((_, ski)) => ski.0.as_bytes().to_vec(),
            None => key_identifier(&tbs.subject_public_key_info),
        };
        let not_before = tbs.validity.not_before.to_system_time();
        let not_after = tbs.validity.not_after.to_system_time();
        Ok(Self {
            cert_der,
            cert,
            signer,
            key_id,
            not_before,
            not_after,
            crl_distribution_points: None,
        })
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate, parsed.
    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// The curve of the CA's key (P-256 or P-384), if it is one of those.
    pub fn curve(&self) -> Option<super::Curve> {
        super::Curve::of_spki(&self.cert.tbs_certificate.subject_public_key_info)
    }

    /// The CA's subject, which is the issuer of everything it signs.
    pub fn subject(&self) -> &Name {
        &self.cert.tbs_certificate.subject
    }

    /// Start of the CA certificate's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// Whether `now` is within the CA certificate's validity; if not, why (for the
    /// operator and the meter's diagnostic).
    pub fn check_validity(&self, now: SystemTime) -> Result<(), String> {
        let at = |t: SystemTime| {
            crate::store::UtcDateTime::from_unix_seconds(crate::store::unix_seconds(t)).rfc3339()
        };
        if now < self.not_before {
            return Err(format!(
                "issuing CA certificate is not valid before {} (clock now {})",
                at(self.not_before),
                at(now)
            ));
        }
        if now > self.not_after {
            return Err(format!(
                "issuing CA certificate expired at {} (clock now {})",
                at(self.not_after),
                at(now)
            ));
        }
        Ok(())
    }

    /// End of the CA certificate's validity; issued certificates never outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The notAfter a certificate asked to end at `not_after` actually gets: issued certificates
    /// never outlive the CA (rustls-webpki checks every certificate of the chain at the same time).
    pub fn effective_not_after(&self, not_after: SystemTime) -> SystemTime {
        not_after.min(self.not_after)
    }

    /// The CA's key identifier (its SKI), put in the AKI of what it issues.
    pub fn key_identifier(&self) -> &[u8] {
        &self.key_id
    }

    /// The CA's signer.
    pub fn signer(&self) -> &dyn Signer {
        self.signer.as_ref()
    }

    /// Issue an end-entity (LDevID) certificate, DER.
    ///
    /// Profile (RFC 5280, RFC 7925 §4.4.2, IEEE 802.1AR): X.509 v3; the given serial; signature
    /// ecdsa-with-SHA256; issuer = this CA's subject; subject as given; validity as given with
    /// notAfter clamped to the CA's notAfter (UTCTime through 2049, GeneralizedTime from 2050, RFC 5280
    /// §4.1.2.5); extensions, in this order:
    /// basicConstraints cA=false (critical); keyUsage digitalSignature (+keyAgreement) (critical);
    /// extKeyUsage id-kp-clientAuth (if asked); subjectKeyIdentifier = SHA-1 of the subjectPublicKey
    /// bits (RFC 5280 §4.2.1.2 method 1); authorityKeyIdentifier keyIdentifier = the CA's SKI;
    /// cRLDistributionPoints (if set, [`IssuingCa::set_crl_distribution_points`]);
    /// subjectAltName otherName hardwareModuleName (if given; critical when the subject is empty,
    /// RFC 5280 §4.2.1.6).
    pub fn issue(&self, params: &IssueParams) -> Result<Vec<u8>, CaError> {
        let usages = match (params.digital_signature, params.key_agreement) {
            (true, false) => KeyUsages::DigitalSignature.into(),
            (false, true) => KeyUsages::KeyAgreement.into(),
            (true, true) => KeyUsages::DigitalSignature | KeyUsages::KeyAgreement,
            (false, false) => {
                return Err(CaError::InvalidName(
                    "keyUsage would be empty (neither digitalSignature nor keyAgreement)".into(),
                ))
            }
        };
        let mut extensions = Vec::with_capacity(6);
        extensions.push(basic_constraints(false, None)?);
        extensions.push(key_usage(KeyUsage(usages))?);
        let mut purposes = Vec::new();
        if let Some(listed) = &params.extended_key_usages {
            purposes.clone_from(listed);
        } else {
            if params.extended_key_usage_client_auth {
                purposes.push(oid::KP_CLIENT_AUTH);
            }
            if params.extended_key_usage_server_auth {
                purposes.push(oid::KP_SERVER_AUTH);
            }
        }
        if !purposes.is_empty() {
            extensions.push(extended_key_usage(purposes)?);
        }
        extensions.push(subject_key_identifier(&params.public_key)?);
        extensions.push(self.authority_key_identifier()?);
        let san = match &params.hardware_module {
            Some(hmn) => vec![hmn.to_general_name()?],
            None => Vec::new(),
        };
        if let Some(cdp) = &self.crl_distribution_points {
            extensions.push(cdp.clone());
        }
        if !san.is_empty() {
            extensions.push(subject_alt_name(&params.subject, san)?);
        } else if params.subject.0.is_empty() {
            // RFC 5280 §4.1.2.6: an empty subject needs a subjectAltName.
            return Err(CaError::InvalidName(
                "empty subject and no subjectAltName".into(),
            ));
        }
        self.sign(CertTemplate {
            subject: params.subject.clone(),
            public_key: params.public_key.clone(),
            serial: params.serial.clone(),
            not_before: params.not_before,
            not_after: params.not_after,
            extensions,
        })
    }

    /// The authorityKeyIdentifier extension for certificates this CA issues.
    pub(crate) fn authority_key_identifier(&self) -> Result<Extension, CaError> {
        encode_extension(
            oid::CE_AUTHORITY_KEY_IDENTIFIER,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(self.key_id.as_slice())?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )
    }

    /// Sign a certificate with this CA as issuer (notAfter clamped to the CA's notAfter).
    pub(crate) fn sign(&self, mut template: CertTemplate) -> Result<Vec<u8>, CaError> {
        template.not_after = self.effective_not_after(template.not_after);
        sign_certificate(self.signer.as_ref(), self.subject(), template)
    }
}

/// Everything of a TBSCertificate except the issuer and the signature algorithm.
pub(crate) struct CertTemplate {
    pub subject: Name,
    pub public_key: SubjectPublicKeyInfoOwned,
    pub serial: SerialNumber,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub extensions: Vec<Extension>,
}

/// `Certificate` with the TBSCertificate carried as already-encoded bytes, so that the signed bytes
/// are emitted verbatim without a second encoding pass.
#[derive(der::Sequence)]
struct SignedCertificate<'a> {
    tbs_certificate: AnyRef<'a>,
    signature_algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

/// Build the TBSCertificate (RFC 5280 §4.1), sign its DER with `signer`, return the certificate DER.
pub(crate) fn sign_certificate(
    signer: &dyn Signer,
    issuer: &Name,
    template: CertTemplate,
) -> Result<Vec<u8>, CaError> {
    if template.not_before >= template.not_after {
        return Err(CaError::InvalidValidity("notBefore is not before notAfter"));
    }
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: template.serial,
        signature: ecdsa_with(signer.signature_algorithm()),
        issuer: issuer.clone(),
        validity: Validity {
            not_before: to_time(template.not_before)?,
            not_after: to_time(template.not_after)?,
        },
        subject: template.subject,
        subject_public_key_info: template.public_key,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: if template.extensions.is_empty() {
            None
        } else {
            Some(template.extensions)
        },
    };
    let tbs_der = tbs.to_der()?;
    let signature = signer.sign(&tbs_der)?;
    let cert = SignedCertificate {
        tbs_certificate: AnyRef::from_der(&tbs_der)?,
        signature_algorithm: ecdsa_with(signer.signature_algorithm()),
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(cert.to_der()?)
}

/// RFC 5280 §4.1.2.5: UTCTime for dates through 2049, GeneralizedTime from 2050; whole seconds.
pub(crate) fn to_time(t: SystemTime) -> Result<Time, CaError> {
    let since_epoch = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::InvalidValidity("time before 1970"))?;
    let dt = DateTime::from_unix_duration(Duration::from_secs(since_epoch.as_secs()))
        .map_err(|_| CaError::InvalidValidity("time after 9999-12-31T23:59:59Z"))?;
    if dt.year() <= UtcTime::MAX_YEAR {
        Ok(Time::UtcTime(UtcTime::from_date_time(dt)?))
    } else {
        Ok(Time::GeneralTime(GeneralizedTime::from_date_time(dt)))
    }
}

/// RFC 5280 §4.2.1.2 method (1): SHA-1 of the BIT STRING subjectPublicKey (excluding tag, length and
/// unused-bits octet).
pub(crate) fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        spki.subject_public_key.raw_bytes(),
    )
    .as_ref()
    .to_vec()
}

pub(crate) fn encode_extension<T: Encode>(
    extn_id: const_oid::ObjectIdentifier,
    critical: bool,
    value: &T,
) -> Result<Extension, CaError> {
    Ok(Extension {
        extn_id,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// basicConstraints, always critical (RFC 5280 §4.2.1.9 requires it for CAs; RFC 7925 leaves it to
/// CAs, the issue profile marks it critical for end entities too).
pub(crate) fn basic_constraints(ca: bool, path_len: Option<u8>) -> Result<Extension, CaError> {
    encode_extension(
        oid::CE_BASIC_CONSTRAINTS,
        true,
        &BasicConstraints {
            ca,
            path_len_constraint: path_len,
        },
    )
}

/// keyUsage, critical (RFC 5280 §4.2.1.3 SHOULD).
pub(crate) fn key_usage(ku: KeyUsage) -> Result<Extension, CaError> {
    encode_extension(oid::CE_KEY_USAGE, true, &ku)
}

pub(crate) fn extended_key_usage(
    purposes: Vec<const_oid::ObjectIdentifier>,
) -> Result<Extension, CaError> {
    encode_extension(oid::CE_EXT_KEY_USAGE, false, &ExtendedKeyUsage(purposes))
}

pub(crate) fn subject_key_identifier(
    spki: &SubjectPublicKeyInfoOwned,
) -> Result<Extension, CaError> {
    encode_extension(
        oid::CE_SUBJECT_KEY_IDENTIFIER,
        false,
        &OctetString::new(key_identifier(spki))?,
    )
}

/// subjectAltName; critical exactly when the subject is empty (RFC 5280 §4.2.1.6).
pub(crate) fn subject_alt_name(
    subject: &Name,
    names: Vec<GeneralName>,
) -> Result<Extension, CaError> {
    encode_extension(
        oid::CE_SUBJECT_ALT_NAME,
        subject.0.is_empty(),
        &SubjectAltName(names),
    )
}
