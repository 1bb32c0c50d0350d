//! Enrollment policy: who may enroll, who may re-enroll, and what the issued
//! certificate says about them.
//!
//! Every decision here is explicit and returns a typed [`PolicyError`] that the EST
//! layer maps to 4.03 (or 4.00 for a malformed request). The DTLS layer has already
//! verified the client's chain against the union of all trust anchors (manufacturer CAs
//! and our issuing CA); the policy verifies it again against the anchor set that fits
//! the operation, because `/sen` must only accept manufacturer IDevIDs and `/sren` only
//! our own LDevIDs (RFC 9148 §3; RFC 7030 §4.2.2 for re-enrollment).

use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use der::asn1::{PrintableStringRef, Utf8StringRef};
use der::{Decode, Encode};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::Certificate;

use crate::ca::{self, HardwareModuleName};

/// id-at-serialNumber (X.520).
pub const OID_SERIAL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.5");
/// id-at-commonName.
pub const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
/// id-at-organizationName.
pub const OID_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
/// ecdsa-with-SHA256.
const OID_ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// Policy settings (the `[policy]` table of the server configuration).
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Accept IDevIDs whose validity period has ended (RFC 9148 §3 allows it; 802.1AR
    /// IDevIDs often outlive their notAfter). Default `false`.
    pub accept_expired_idevid: bool,
    /// Only devices imported with `est-server devices import` may enroll. Default `false`.
    pub require_device_allowlist: bool,
    /// Validity of issued LDevIDs. Default 365 days.
    pub ldevid_validity: Duration,
    /// notBefore is set this far in the past to tolerate meters' clock drift. Default 5 min.
    pub not_before_backdate: Duration,
    /// Organization (O) put in issued LDevID subjects; none when empty.
    pub ldevid_organization: String,
    /// Add keyAgreement to the KeyUsage of issued certificates (for ECDH-based DLMS suites).
    pub key_agreement: bool,
    /// Longest client chain accepted (leaf plus intermediates), default 4.
    pub max_chain_len: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            accept_expired_idevid: false,
            require_device_allowlist: false,
            ldevid_validity: Duration::from_secs(365 * 24 * 3600),
            not_before_backdate: Duration::from_secs(300),
            ldevid_organization: String::new(),
            key_agreement: false,
            max_chain_len: 4,
        }
    }
}

/// Why the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no client certificate")]
    NoClientCertificate,
    #[error("client certificate is malformed")]
    MalformedCertificate,
    #[error("client certificate chain is longer than allowed")]
    ChainTooLong,
    #[error("client certificate is not issued by a trusted {0}")]
    UntrustedIssuer(&'static str),
    #[error("client certificate signature does not verify")]
    BadCertificateSignature,
    #[error("client certificate has expired")]
    Expired,
    #[error("client certificate is not yet valid")]
    NotYetValid,
    #[error("client certificate subject has no serialNumber")]
    MissingSerialNumber,
    #[error("device serialNumber is not printable")]
    InvalidSerialNumber,
    #[error("device is not on the allowlist")]
    NotAllowlisted,
    #[error("CSR subject serialNumber does not match the authenticated device")]
    CsrSerialMismatch,
    #[error("CSR subject differs from the certificate being renewed")]
    SubjectMismatch,
    #[error("CSR subjectAltName differs from the certificate being renewed")]
    SubjectAltNameMismatch,
    #[error("certificate being renewed is unknown to this CA")]
    UnknownCertificate,
    #[error("certificate being renewed is {0}")]
    CertificateNotActive(&'static str),
}

/// A parsed trust anchor.
#[derive(Clone, Debug)]
pub struct TrustAnchor {
    der: Vec<u8>,
    subject_der: Vec<u8>,
    public_key: Vec<u8>,
}

impl TrustAnchor {
    /// Parse a CA certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, PolicyError> {
        let cert = Certificate::from_der(der).map_err(|_| PolicyError::MalformedCertificate)?;
        let subject_der = cert
            .tbs_certificate
            .subject
            .to_der()
            .map_err(|_| PolicyError::MalformedCertificate)?;
        let public_key = cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec();
        Ok(Self {
            der: der.to_vec(),
            subject_der,
            public_key,
        })
    }

    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The subject Name, DER.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }
}

/// The authenticated device behind a DTLS session, as the policy established it.
#[derive(Clone, Debug)]
pub struct Device {
    /// The device's identity: the serialNumber of its certificate's subject.
    pub device_id: String,
    /// hardwareModuleName from the client certificate's subjectAltName, if any.
    pub hardware_module: Option<HardwareModuleName>,
    /// The client (leaf) certificate.
    pub certificate: Certificate,
    /// Its serial, lower-case hex.
    pub certificate_serial_hex: String,
}

/// The enrollment policy, with its trust anchors.
pub struct Policy {
    config: PolicyConfig,
    manufacturer_anchors: Vec<TrustAnchor>,
    operational_anchor: TrustAnchor,
}

impl Policy {
    /// `manufacturer_cas`: the CAs whose IDevIDs may use `/sen`. `issuing_ca`: our CA,
    /// whose LDevIDs may use `/sren`.
    pub fn new(
        config: PolicyConfig,
        manufacturer_cas: &[Vec<u8>],
        issuing_ca: &[u8],
    ) -> Result<Self, PolicyError> {
        let manufacturer_anchors = manufacturer_cas
            .iter()
            .map(|d| TrustAnchor::from_der(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            manufacturer_anchors,
            operational_anchor: TrustAnchor::from_der(issuing_ca)?,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The manufacturer trust anchors.
    pub fn manufacturer_anchors(&self) -> &[TrustAnchor] {
        &self.manufacturer_anchors
    }

    /// Authenticate a device for `/sen` (and server-side key generation): the chain must
    /// lead to a configured manufacturer CA, each certificate within validity (the leaf
    /// may be expired when `accept_expired_idevid` is set).
    pub fn authenticate_manufacturer(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<Device, PolicyError> {
        let leaf = self.verify_chain(
            chain,
            &self.manufacturer_anchors,
            now,
            self.config.accept_expired_idevid,
            "manufacturer CA",
        )?;
        device_from_leaf(leaf)
    }

    /// Authenticate a device for `/sren`: the leaf must be issued by our CA and within
    /// validity. Whether it is still the device's current certificate is checked by the
    /// caller against the store.
    pub fn authenticate_operational(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<Device, PolicyError> {
        let leaf = self.verify_chain(
            chain,
            std::slice::from_ref(&self.operational_anchor),
            now,
            false,
            "issuing CA (an LDevID is required)",
        )?;
        device_from_leaf(leaf)
    }

    /// The subject of the LDevID issued to `device`: set by policy from the
    /// authenticated identity, never copied from the CSR.
    pub fn ldevid_subject(&self, device: &Device) -> Result<Name, PolicyError> {
        let mut rdns = Vec::new();
        if !self.config.ldevid_organization.is_empty() {
            rdns.push(utf8_rdn(
                OID_ORGANIZATION,
                &self.config.ldevid_organization,
            )?);
        }
        rdns.push(utf8_rdn(OID_COMMON_NAME, &device.device_id)?);
        rdns.push(printable_rdn(OID_SERIAL_NUMBER, &device.device_id)?);
        Ok(RdnSequence(rdns))
    }

    /// A CSR for `/sen` may leave its subject empty or say anything, but if it names a
    /// serialNumber it must be the authenticated device's: a contradiction is a
    /// misconfigured or misbehaving device, and we refuse rather than guess.
    pub fn check_enroll_csr_subject(
        &self,
        device: &Device,
        csr_subject: &Name,
    ) -> Result<(), PolicyError> {
        match ca::serial_number_attr(csr_subject) {
            Some(sn) if sn != device.device_id => Err(PolicyError::CsrSerialMismatch),
            _ => Ok(()),
        }
    }

    /// RFC 7030 §4.2.2: the re-enrollment request's subject MUST be identical to the
    /// certificate being renewed. If the CSR carries a hardwareModuleName it must match
    /// the certificate's too; a CSR without subjectAltName is accepted and the
    /// certificate's hardwareModuleName is carried over.
    pub fn check_reenroll_csr(
        &self,
        current: &Device,
        csr_subject: &Name,
        csr_hardware_module: Option<&HardwareModuleName>,
    ) -> Result<(), PolicyError> {
        let a = csr_subject
            .to_der()
            .map_err(|_| PolicyError::MalformedCertificate)?;
        let b = current
            .certificate
            .tbs_certificate
            .subject
            .to_der()
            .map_err(|_| PolicyError::MalformedCertificate)?;
        if a != b {
            return Err(PolicyError::SubjectMismatch);
        }
        if let Some(hw) = csr_hardware_module {
            if current.hardware_module.as_ref() != Some(hw) {
                return Err(PolicyError::SubjectAltNameMismatch);
            }
        }
        Ok(())
    }

    fn verify_chain(
        &self,
        chain: &[Vec<u8>],
        anchors: &[TrustAnchor],
        now: SystemTime,
        leaf_may_be_expired: bool,
        what: &'static str,
    ) -> Result<Certificate, PolicyError> {
        let Some(first) = chain.first() else {
            return Err(PolicyError::NoClientCertificate);
        };
        if chain.len() > self.config.max_chain_len {
            return Err(PolicyError::ChainTooLong);
        }
        let leaf = Certificate::from_der(first).map_err(|_| PolicyError::MalformedCertificate)?;
        check_validity(&leaf, now, leaf_may_be_expired)?;
        // Walk up the presented chain until a certificate is issued by an anchor.
        let mut current = leaf.clone();
        let mut rest = chain.iter().skip(1);
        loop {
            let issuer_der = current
                .tbs_certificate
                .issuer
                .to_der()
                .map_err(|_| PolicyError::MalformedCertificate)?;
            if let Some(anchor) = anchors.iter().find(|a| a.subject_der == issuer_der) {
                verify_signed_by(&current, &anchor.public_key)?;
                return Ok(leaf);
            }
            let Some(next_der) = rest.next() else {
                return Err(PolicyError::UntrustedIssuer(what));
            };
            let next =
                Certificate::from_der(next_der).map_err(|_| PolicyError::MalformedCertificate)?;
            let next_subject = next
                .tbs_certificate
                .subject
                .to_der()
                .map_err(|_| PolicyError::MalformedCertificate)?;
            if next_subject != issuer_der {
                return Err(PolicyError::UntrustedIssuer(what));
            }
            verify_signed_by(
                &current,
                next.tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .raw_bytes(),
            )?;
            check_validity(&next, now, false)?;
            current = next;
        }
    }
}

fn device_from_leaf(leaf: Certificate) -> Result<Device, PolicyError> {
    let device_id = ca::serial_number_attr(&leaf.tbs_certificate.subject)
        .ok_or(PolicyError::MissingSerialNumber)?;
    if device_id.is_empty() || PrintableStringRef::new(&device_id).is_err() {
        return Err(PolicyError::InvalidSerialNumber);
    }
    let hardware_module = ca::hardware_module_from_cert(&leaf);
    let certificate_serial_hex = hex::encode(leaf.tbs_certificate.serial_number.as_bytes());
    Ok(Device {
        device_id,
        hardware_module,
        certificate: leaf,
        certificate_serial_hex,
    })
}

fn check_validity(
    cert: &Certificate,
    now: SystemTime,
    may_be_expired: bool,
) -> Result<(), PolicyError> {
    let v = &cert.tbs_certificate.validity;
    if now < v.not_before.to_system_time() {
        return Err(PolicyError::NotYetValid);
    }
    if !may_be_expired && now > v.not_after.to_system_time() {
        return Err(PolicyError::Expired);
    }
    Ok(())
}

fn verify_signed_by(cert: &Certificate, issuer_public_key: &[u8]) -> Result<(), PolicyError> {
    if cert.signature_algorithm.oid != OID_ECDSA_WITH_SHA256 {
        return Err(PolicyError::BadCertificateSignature);
    }
    let tbs = cert
        .tbs_certificate
        .to_der()
        .map_err(|_| PolicyError::MalformedCertificate)?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or(PolicyError::MalformedCertificate)?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        issuer_public_key,
    )
    .verify(&tbs, sig)
    .map_err(|_| PolicyError::BadCertificateSignature)
}

fn utf8_rdn(oid: ObjectIdentifier, value: &str) -> Result<RelativeDistinguishedName, PolicyError> {
    let v = Utf8StringRef::new(value).map_err(|_| PolicyError::InvalidSerialNumber)?;
    rdn(oid, der::Any::from(v))
}

fn printable_rdn(
    oid: ObjectIdentifier,
    value: &str,
) -> Result<RelativeDistinguishedName, PolicyError> {
    let v = PrintableStringRef::new(value).map_err(|_| PolicyError::InvalidSerialNumber)?;
    rdn(oid, der::Any::from(v))
}

fn rdn(oid: ObjectIdentifier, value: der::Any) -> Result<RelativeDistinguishedName, PolicyError> {
    let atv = AttributeTypeAndValue { oid, value };
    RelativeDistinguishedName::try_from(vec![atv]).map_err(|_| PolicyError::InvalidSerialNumber)
}
