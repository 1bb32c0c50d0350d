//! Test and bootstrap PKI generation: root and subordinate CAs, DTLS server certificates, and
//! IEEE 802.1AR IDevIDs as a meter factory mints them. Used by `est-server init`,
//! `est-server factory mint` and the test PKI tool.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use const_oid::ObjectIdentifier;
use der::asn1::{Ia5String, OctetString};
use der::Decode;
use rand::{CryptoRng, RngCore};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{KeyUsage, KeyUsages};

use super::error::CaError;
use super::issue::{
    basic_constraints, extended_key_usage, key_usage, random_serial, sign_certificate,
    subject_alt_name, subject_key_identifier, CertTemplate, IssuingCa,
};
use super::names::{name_from_attrs, organization, HardwareModuleName};
use super::oid;
use super::signer::{generate_p256_pkcs8, RingP256Signer, Signer};

/// Seconds from the Unix epoch to 9999-12-31T23:59:59Z; see [`idevid_no_expiry`].
pub const IDEVID_NO_EXPIRY_UNIX_SECS: u64 = 253_402_300_799;

/// 9999-12-31T23:59:59Z, the notAfter of a certificate with "no well-defined expiration date"
/// (RFC 5280 §4.1.2.5; IEEE 802.1AR uses it for IDevIDs). Encoded as GeneralizedTime 99991231235959Z.
pub fn idevid_no_expiry() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(IDEVID_NO_EXPIRY_UNIX_SECS)
}

fn end_of(not_before: SystemTime, validity: Duration) -> Result<SystemTime, CaError> {
    not_before
        .checked_add(validity)
        .ok_or(CaError::InvalidValidity("notBefore + validity overflows"))
}

/// A fresh P-256 key: its PKCS#8, its signer and its SPKI.
fn new_key<R: RngCore + CryptoRng + ?Sized>(
    rng: &mut R,
) -> Result<(Vec<u8>, RingP256Signer, SubjectPublicKeyInfoOwned), CaError> {
    let pkcs8 = generate_p256_pkcs8(rng)?;
    let signer = RingP256Signer::from_pkcs8_der(&pkcs8)?;
    let spki = SubjectPublicKeyInfoOwned::from_der(signer.public_key_spki_der())?;
    Ok((pkcs8, signer, spki))
}

/// `[O=organization,] CN=common_name`.
fn org_cn(common_name: &str, org: &str) -> Result<x509_cert::name::Name, CaError> {
    let mut attrs = Vec::with_capacity(2);
    if !org.is_empty() {
        attrs.push((oid::AT_ORGANIZATION_NAME, org));
    }
    attrs.push((oid::AT_COMMON_NAME, common_name));
    name_from_attrs(&attrs)
}

/// CA keyUsage: keyCertSign and cRLSign (RFC 5280 §4.2.1.3; rustls-webpki insists on keyCertSign).
fn ca_key_usage() -> Result<x509_cert::ext::Extension, CaError> {
    key_usage(KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))
}

/// Self-signed root CA `O=organization, CN=common_name`: basicConstraints cA (critical, no path
/// length), keyUsage keyCertSign+cRLSign (critical), subjectKeyIdentifier. Returns (cert DER, PKCS#8 DER).
pub fn generate_root_ca<R: RngCore + CryptoRng + ?Sized>(
    common_name: &str,
    organization: &str,
    not_before: SystemTime,
    validity: Duration,
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let (pkcs8, signer, _) = new_key(rng)?;
    let cert = self_signed_ca(
        &signer,
        common_name,
        organization,
        not_before,
        validity,
        rng,
    )?;
    Ok((cert, pkcs8))
}

/// The root CA certificate of [`generate_root_ca`] for a key held elsewhere (an HSM): signed by
/// `signer` itself. Returns the certificate DER.
pub fn self_signed_ca<R: RngCore + CryptoRng + ?Sized>(
    signer: &dyn Signer,
    common_name: &str,
    organization: &str,
    not_before: SystemTime,
    validity: Duration,
    rng: &mut R,
) -> Result<Vec<u8>, CaError> {
    let spki = SubjectPublicKeyInfoOwned::from_der(signer.public_key_spki_der())?;
    let subject = org_cn(common_name, organization)?;
    let extensions = vec![
        basic_constraints(true, None)?,
        ca_key_usage()?,
        subject_key_identifier(&spki)?,
    ];
    sign_certificate(
        signer,
        &subject.clone(),
        CertTemplate {
            subject,
            public_key: spki,
            serial: random_serial(rng),
            not_before,
            not_after: end_of(not_before, validity)?,
            extensions,
        },
    )
}

/// Subordinate (issuing) CA signed by `parent`: basicConstraints cA with pathLenConstraint 0
/// (critical), keyUsage keyCertSign+cRLSign (critical), SKI, AKI. Returns (cert DER, PKCS#8 DER).
pub fn generate_sub_ca<R: RngCore + CryptoRng + ?Sized>(
    parent: &IssuingCa,
    common_name: &str,
    organization: &str,
    not_before: SystemTime,
    validity: Duration,
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let (pkcs8, _signer, spki) = new_key(rng)?;
    let extensions = vec![
        basic_constraints(true, Some(0))?,
        ca_key_usage()?,
        subject_key_identifier(&spki)?,
        parent.authority_key_identifier()?,
    ];
    let cert = parent.sign(CertTemplate {
        subject: org_cn(common_name, organization)?,
        public_key: spki,
        serial: random_serial(rng),
        not_before,
        not_after: end_of(not_before, validity)?,
        extensions,
    })?;
    Ok((cert, pkcs8))
}

/// DTLS server certificate: subject CN = the first DNS name (or IP address), subjectAltName with all
/// DNS names and IP addresses, extKeyUsage id-kp-serverAuth, keyUsage digitalSignature (critical),
/// basicConstraints cA=false (critical), SKI, AKI. Returns (cert DER, PKCS#8 DER).
pub fn generate_server_cert<R: RngCore + CryptoRng + ?Sized>(
    ca: &IssuingCa,
    dns_names: &[String],
    ip_addrs: &[IpAddr],
    not_before: SystemTime,
    validity: Duration,
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let cn = match (dns_names.first(), ip_addrs.first()) {
        (Some(dns), _) => dns.clone(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => {
            return Err(CaError::InvalidName(
                "a server certificate needs a DNS name or an IP address".into(),
            ))
        }
    };
    let mut san = Vec::with_capacity(dns_names.len().saturating_add(ip_addrs.len()));
    for dns in dns_names {
        let ia5 = Ia5String::new(dns)
            .map_err(|_| CaError::InvalidName(format!("DNS name {dns:?} is not IA5")))?;
        san.push(GeneralName::DnsName(ia5));
    }
    for ip in ip_addrs {
        let octets = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        san.push(GeneralName::IpAddress(OctetString::new(octets)?));
    }
    let (pkcs8, _signer, spki) = new_key(rng)?;
    let subject = name_from_attrs(&[(oid::AT_COMMON_NAME, &cn)])?;
    let extensions = vec![
        basic_constraints(false, None)?,
        key_usage(KeyUsage(KeyUsages::DigitalSignature.into()))?,
        extended_key_usage(vec![oid::KP_SERVER_AUTH])?,
        subject_key_identifier(&spki)?,
        ca.authority_key_identifier()?,
        subject_alt_name(&subject, san)?,
    ];
    let cert = ca.sign(CertTemplate {
        subject,
        public_key: spki,
        serial: random_serial(rng),
        not_before,
        not_after: end_of(not_before, validity)?,
        extensions,
    })?;
    Ok((cert, pkcs8))
}

/// What a meter factory does: mint an IEEE 802.1AR IDevID for device `serial`.
///
/// Subject `[O=<manufacturer CA's O>,] CN=<serial>, serialNumber=<serial>` (serialNumber is a
/// PrintableString, so `serial` must use its character set); subjectAltName otherName
/// hardwareModuleName { hw_type, hwSerialNum = the serial's bytes } (RFC 4108); keyUsage
/// digitalSignature (critical); extKeyUsage id-kp-clientAuth; basicConstraints cA=false (critical);
/// SKI; AKI. Use [`idevid_no_expiry`] as `not_after` for the 802.1AR "no expiration" notAfter
/// (clamped to the manufacturer CA's notAfter). Returns (cert DER, PKCS#8 DER).
pub fn mint_idevid<R: RngCore + CryptoRng + ?Sized>(
    manufacturer_ca: &IssuingCa,
    serial: &str,
    hw_type: ObjectIdentifier,
    not_before: SystemTime,
    not_after: SystemTime,
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let maker = organization(manufacturer_ca.subject());
    let mut attrs = Vec::with_capacity(3);
    if let Some(maker) = maker.as_deref() {
        attrs.push((oid::AT_ORGANIZATION_NAME, maker));
    }
    attrs.push((oid::AT_COMMON_NAME, serial));
    attrs.push((oid::AT_SERIAL_NUMBER, serial));
    let subject = name_from_attrs(&attrs)?;
    let hmn = HardwareModuleName::new(hw_type, serial.as_bytes())?;

    let (pkcs8, _signer, spki) = new_key(rng)?;
    let extensions = vec![
        basic_constraints(false, None)?,
        key_usage(KeyUsage(KeyUsages::DigitalSignature.into()))?,
        extended_key_usage(vec![oid::KP_CLIENT_AUTH])?,
        subject_key_identifier(&spki)?,
        manufacturer_ca.authority_key_identifier()?,
        subject_alt_name(&subject, vec![hmn.to_general_name()?])?,
    ];
    let cert = manufacturer_ca.sign(CertTemplate {
        subject,
        public_key: spki,
        serial: random_serial(rng),
        not_before,
        not_after,
        extensions,
    })?;
    Ok((cert, pkcs8))
}
