//! Enrollment policy: who may enroll, who may re-enroll, and what the issued
//! certificate says about them.
//!
//! Every decision here is explicit and returns a typed [`PolicyError`] that the EST
//! layer maps to 4.03 (or 4.00 for a malformed request).
//!
//! A client chain is validated once, during the DTLS handshake, by
//! [`Policy::verify_peer_chain`]: full path validation with rustls-webpki (signatures,
//! validity, basicConstraints, EKU clientAuth, name constraints) against the union of all
//! trust anchors, recording *which* class of anchor the path ends in. The EST layer then
//! requires the class that fits the operation, because `/sen` must only accept
//! manufacturer IDevIDs and `/sren` only our own LDevIDs (RFC 9148 §3; RFC 7030 §4.2.2 for
//! re-enrollment), without verifying the signatures a second time. A caller without a
//! [`VerifiedChain`] (in-memory use) gets the full check against the operation's anchors.

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
    /// Device-class rules selecting the `dlms` profile (first match wins); none by default.
    pub dlms_rules: Vec<crate::dlms::DlmsRule>,
    /// Certificate profiles and the rules selecting them (after `dlms_rules`; devices no
    /// rule selects get the built-in LDevID profile above). None by default.
    pub profiles: crate::profile::Profiles,
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
            dlms_rules: Vec::new(),
            profiles: crate::profile::Profiles::default(),
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
    #[error("device is blocked (decommissioned by the operator)")]
    DeviceBlocked,
    /// The `dlms` profile cannot be applied (e.g. a serial that makes no system title).
    #[error("dlms profile: {0}")]
    Dlms(#[from] crate::dlms::DlmsError),
    /// The selected certificate profile cannot be applied to this device.
    #[error("certificate profile: {0}")]
    Profile(String),
    /// Refused when the commit was made: a revocation or block came in meanwhile.
    #[error("{0}")]
    RevokedMeanwhile(String),
}

/// A parsed trust anchor.
#[derive(Clone, Debug)]
pub struct TrustAnchor {
    der: Vec<u8>,
    subject_der: Vec<u8>,
    /// SHA-256 of `der`: what a [`VerifiedChain`] records of a manufacturer anchor.
    digest: [u8; 32],
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
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        Ok(Self {
            der: der.to_vec(),
            subject_der,
            digest,
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

/// Which class of trust anchor a client chain leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorClass {
    /// A manufacturer CA: the leaf is an IDevID (`/sen`, server-side key generation).
    Manufacturer,
    /// Our issuing CA: the leaf is an LDevID (`/sren`).
    Operational,
}

impl AnchorClass {
    fn what(self) -> &'static str {
        match self {
            AnchorClass::Manufacturer => "manufacturer CA",
            AnchorClass::Operational => "issuing CA (an LDevID is required)",
        }
    }
}

/// A client chain validated by [`Policy::verify_peer_chain`] (at the DTLS handshake). Only
/// the policy makes one; it is bound to the exact chain bytes by a SHA-256 digest, so it
/// cannot vouch for another chain.
#[derive(Clone, Debug)]
pub struct VerifiedChain {
    digest: [u8; 32],
    class: AnchorClass,
    /// SHA-256 of the manufacturer anchor the path ends in (class Manufacturer).
    manufacturer_anchor: Option<[u8; 32]>,
    /// What [`Policy::authenticate`] needs of the leaf, read once here: a few hundred bytes
    /// kept with the session instead of a parsed certificate (about 3.5 kB).
    leaf: LeafFacts,
}

/// What [`Policy::authenticate`] reads of a verified chain's leaf.
#[derive(Clone, Debug)]
struct LeafFacts {
    not_before: SystemTime,
    not_after: SystemTime,
    /// The device identity, or why the leaf has none (refused at the request, after the
    /// validity, as before).
    identity: Result<LeafIdentity, PolicyError>,
}

#[derive(Clone, Debug)]
struct LeafIdentity {
    device_id: String,
    hardware_module: Option<HardwareModuleName>,
    subject_der: Vec<u8>,
    serial_hex: String,
}

impl LeafFacts {
    fn of(leaf: &Certificate) -> LeafFacts {
        let tbs = &leaf.tbs_certificate;
        let identity = (|| {
            let device_id =
                ca::serial_number_attr(&tbs.subject).ok_or(PolicyError::MissingSerialNumber)?;
            if device_id.is_empty() || PrintableStringRef::new(&device_id).is_err() {
                return Err(PolicyError::InvalidSerialNumber);
            }
            Ok(LeafIdentity {
                device_id,
                hardware_module: ca::hardware_module_from_cert(leaf),
                subject_der: tbs
                    .subject
                    .to_der()
                    .map_err(|_| PolicyError::MalformedCertificate)?,
                serial_hex: hex::encode(tbs.serial_number.as_bytes()),
            })
        })();
        LeafFacts {
            not_before: tbs.validity.not_before.to_system_time(),
            not_after: tbs.validity.not_after.to_system_time(),
            identity,
        }
    }
}

impl VerifiedChain {
    /// The class of anchor the validated path ends in.
    pub fn class(&self) -> AnchorClass {
        self.class
    }

    /// SHA-256 of the manufacturer CA certificate (DER) the path ends in, for an IDevID.
    pub fn manufacturer_anchor(&self) -> Option<&[u8; 32]> {
        self.manufacturer_anchor.as_ref()
    }

    fn covers(&self, chain: &[Vec<u8>]) -> bool {
        self.digest == chain_digest(chain)
    }
}

fn chain_digest(chain: &[Vec<u8>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for cert in chain {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The authenticated device behind a DTLS session, as the policy established it.
#[derive(Clone, Debug)]
pub struct Device {
    /// The device's identity: the serialNumber of its certificate's subject.
    pub device_id: String,
    /// hardwareModuleName from the client certificate's subjectAltName, if any.
    pub hardware_module: Option<HardwareModuleName>,
    /// The client (leaf) certificate's subject.
    pub subject: Name,
    /// Its serial, lower-case hex.
    pub certificate_serial_hex: String,
    /// SHA-256 of the manufacturer CA certificate (DER) its chain ends in, when it
    /// authenticated with an IDevID; what certificate profiles select by.
    pub manufacturer_anchor: Option<[u8; 32]>,
}

/// The enrollment policy, with its trust anchors.
pub struct Policy {
    config: PolicyConfig,
    manufacturer_anchors: Vec<TrustAnchor>,
    operational_anchor: TrustAnchor,
    /// rustls-webpki anchors: the manufacturer CAs in order, then our issuing CA (last).
    webpki_anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
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
        let operational_anchor = TrustAnchor::from_der(issuing_ca)?;
        let webpki_anchors = manufacturer_anchors
            .iter()
            .chain(std::iter::once(&operational_anchor))
            .map(|a| {
                let der = rustls_pki_types::CertificateDer::from(a.der.as_slice());
                webpki::anchor_from_trusted_cert(&der)
                    .map(|ta| ta.to_owned())
                    .map_err(|_| PolicyError::MalformedCertificate)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            manufacturer_anchors,
            operational_anchor,
            webpki_anchors,
        })
    }

    /// Validate a client's chain (DER, leaf first, as sent in the DTLS Certificate message)
    /// against every trust anchor, as the DTLS handshake does before it completes: RFC 5280
    /// path validation by rustls-webpki with ECDSA P-256 or P-384 and SHA-256 or SHA-384 (the
    /// RFC 7925 profile, and DLMS/COSEM suite 2), EKU
    /// clientAuth when an EKU is present, the path built only from the presented
    /// certificates. Records whether the path ends in a manufacturer CA or our issuing CA.
    ///
    /// An expired leaf is accepted only when `accept_expired_idevid` is set and the path ends
    /// in a manufacturer CA (RFC 9148 §3 allows this for IDevIDs); the path is then validated
    /// as of the leaf's notAfter and every other presented certificate must be valid now.
    pub fn verify_peer_chain(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<VerifiedChain, PolicyError> {
        self.verify_chain(chain, now).map(|(v, _)| v)
    }

    /// [`Policy::verify_peer_chain`], and the leaf as x509-cert reads it (parsed once the
    /// path is valid): for the handshake, whose engine takes the CertificateVerify key from
    /// it and the session limit the device identity. It is not kept with the
    /// [`VerifiedChain`], which keeps only what [`Policy::authenticate`] needs of it: a
    /// session can stay open for hours, and a parsed certificate costs about 3.5 kB of heap
    /// (docs/benchmarks.md).
    pub fn verify_peer_chain_with_leaf(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<(VerifiedChain, Certificate), PolicyError> {
        self.verify_chain(chain, now)
    }

    fn verify_chain(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<(VerifiedChain, Certificate), PolicyError> {
        let Some(first) = chain.first() else {
            return Err(PolicyError::NoClientCertificate);
        };
        if chain.len() > self.config.max_chain_len {
            return Err(PolicyError::ChainTooLong);
        }
        let leaf_der = rustls_pki_types::CertificateDer::from(first.as_slice());
        let leaf = webpki::EndEntityCert::try_from(&leaf_der)
            .map_err(|_| PolicyError::MalformedCertificate)?;
        let intermediates: Vec<rustls_pki_types::CertificateDer<'_>> = chain
            .iter()
            .skip(1)
            .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
            .collect();
        let validate = |at: SystemTime| -> Result<(AnchorClass, usize), webpki::Error> {
            let secs = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let path = leaf.verify_for_usage(
                SIGNATURE_ALGORITHMS,
                &self.webpki_anchors,
                &intermediates,
                rustls_pki_types::UnixTime::since_unix_epoch(secs),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )?;
            // The anchor webpki chose is an element of our slice: manufacturer CAs first, our
            // issuing CA last.
            let anchor = path.anchor();
            match self
                .webpki_anchors
                .iter()
                .position(|a| std::ptr::eq(a, anchor))
            {
                Some(i) if i < self.manufacturer_anchors.len() => {
                    Ok((AnchorClass::Manufacturer, i))
                }
                Some(i) => Ok((AnchorClass::Operational, i)),
                None => Err(webpki::Error::UnknownIssuer),
            }
        };
        // The leaf as x509-cert reads it, parsed once the path is valid (webpki names what is
        // wrong with a certificate that is not), or for the expired-IDevID rule.
        let mut parsed_leaf = None;
        let (class, index) = match validate(now) {
            Ok(found) => found,
            Err(webpki::Error::CertExpired { .. }) if self.config.accept_expired_idevid => {
                let leaf_cert =
                    Certificate::from_der(first).map_err(|_| PolicyError::MalformedCertificate)?;
                let not_after = leaf_cert
                    .tbs_certificate
                    .validity
                    .not_after
                    .to_system_time();
                let found = validate(not_after).map_err(map_webpki_error)?;
                if found.0 != AnchorClass::Manufacturer {
                    return Err(PolicyError::Expired);
                }
                check_validity(&leaf_cert, now, true)?;
                for der in chain.iter().skip(1) {
                    let c = Certificate::from_der(der)
                        .map_err(|_| PolicyError::MalformedCertificate)?;
                    check_validity(&c, now, false)?;
                }
                parsed_leaf = Some(leaf_cert);
                found
            }
            Err(e) => return Err(map_webpki_error(e)),
        };
        let leaf = match parsed_leaf {
            Some(c) => c,
            None => Certificate::from_der(first).map_err(|_| PolicyError::MalformedCertificate)?,
        };
        let manufacturer_anchor = match class {
            AnchorClass::Manufacturer => self.manufacturer_anchors.get(index).map(|a| a.digest),
            AnchorClass::Operational => None,
        };
        let verified = VerifiedChain {
            digest: chain_digest(chain),
            class,
            manufacturer_anchor,
            leaf: LeafFacts::of(&leaf),
        };
        Ok((verified, leaf))
    }

    /// Authenticate the device behind `chain` for an operation that needs `required`: with a
    /// [`VerifiedChain`] for exactly this chain (from the handshake) the class is compared
    /// and the leaf's validity checked at `now`; without one, the chain is verified here
    /// against the anchors of `required`.
    pub fn authenticate(
        &self,
        required: AnchorClass,
        chain: &[Vec<u8>],
        verified: Option<&VerifiedChain>,
        now: SystemTime,
    ) -> Result<Device, PolicyError> {
        let fresh;
        let verified = match verified {
            Some(v) if v.covers(chain) => v,
            _ => {
                fresh = self.verify_peer_chain(chain, now).map_err(|e| match e {
                    // Name the anchors the operation needed, as the refusal's diagnostic.
                    PolicyError::UntrustedIssuer(_) => {
                        PolicyError::UntrustedIssuer(required.what())
                    }
                    other => other,
                })?;
                &fresh
            }
        };
        if verified.class != required {
            return Err(PolicyError::UntrustedIssuer(required.what()));
        }
        // The leaf as the verification read it (`covers` binds it to these chain bytes).
        let facts = &verified.leaf;
        let may_be_expired =
            required == AnchorClass::Manufacturer && self.config.accept_expired_idevid;
        check_validity_period(facts.not_before, facts.not_after, now, may_be_expired)?;
        let id = facts.identity.clone()?;
        Ok(Device {
            device_id: id.device_id,
            hardware_module: id.hardware_module,
            subject: Name::from_der(&id.subject_der)
                .map_err(|_| PolicyError::MalformedCertificate)?,
            certificate_serial_hex: id.serial_hex,
            manufacturer_anchor: verified.manufacturer_anchor,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The manufacturer trust anchors.
    pub fn manufacturer_anchors(&self) -> &[TrustAnchor] {
        &self.manufacturer_anchors
    }

    /// Our issuing CA, the anchor of LDevIDs.
    pub fn operational_anchor(&self) -> &TrustAnchor {
        &self.operational_anchor
    }

    /// Another issuing CA of ours (e.g. the P-384 one beside the P-256 one): LDevIDs it
    /// issued may `/sren` too.
    pub fn add_operational_anchor(&mut self, der: &[u8]) -> Result<(), PolicyError> {
        let anchor = TrustAnchor::from_der(der)?;
        let cert = rustls_pki_types::CertificateDer::from(anchor.der.as_slice());
        let ta = webpki::anchor_from_trusted_cert(&cert)
            .map(|ta| ta.to_owned())
            .map_err(|_| PolicyError::MalformedCertificate)?;
        // After the manufacturer anchors: verify_peer_chain classes by position.
        self.webpki_anchors.push(ta);
        Ok(())
    }

    /// Authenticate a device for `/sen` (and server-side key generation): the chain must
    /// lead to a configured manufacturer CA, each certificate within validity (the leaf
    /// may be expired when `accept_expired_idevid` is set). Verifies the chain in full.
    pub fn authenticate_manufacturer(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<Device, PolicyError> {
        self.authenticate(AnchorClass::Manufacturer, chain, None, now)
    }

    /// Authenticate a device for `/sren`: the leaf must be issued by our CA and within
    /// validity. Whether it is still the device's current certificate is checked by the
    /// caller against the store. Verifies the chain in full.
    pub fn authenticate_operational(
        &self,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<Device, PolicyError> {
        self.authenticate(AnchorClass::Operational, chain, None, now)
    }

    /// The `dlms` rule selecting `device_id`, if any (first match).
    pub fn dlms_rule(&self, device_id: &str) -> Option<&crate::dlms::DlmsRule> {
        self.config.dlms_rules.iter().find(|r| r.matches(device_id))
    }

    /// The certificate profile selected for `device` (first matching rule), if any: by the
    /// manufacturer CA its IDevID chain ends in and by device class (serial prefix). At
    /// `/sren` the device presents its LDevID, so rules naming a manufacturer CA do not match
    /// there.
    pub fn profile(&self, device: &Device) -> Option<&crate::profile::CertProfile> {
        self.config
            .profiles
            .select(&device.device_id, device.manufacturer_anchor.as_ref())
    }

    /// The subject of a `dlms` certificate: CN = the system title (16 uppercase hex digits),
    /// serialNumber = the device identity.
    pub fn dlms_subject(&self, device: &Device, title: &[u8; 8]) -> Result<Name, PolicyError> {
        Ok(RdnSequence(vec![
            utf8_rdn(OID_COMMON_NAME, &crate::dlms::system_title_cn(title))?,
            printable_rdn(OID_SERIAL_NUMBER, &device.device_id)?,
        ]))
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
}

/// Signature algorithms accepted in client chains: ECDSA on P-256 and P-384 with SHA-256 or
/// SHA-384 (RFC 7925's P-256/SHA-256, and P-384 for DLMS/COSEM security suite 2).
const SIGNATURE_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
];

fn map_webpki_error(e: webpki::Error) -> PolicyError {
    match e {
        webpki::Error::CertExpired { .. } => PolicyError::Expired,
        webpki::Error::CertNotValidYet { .. } => PolicyError::NotYetValid,
        webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmContext(_)
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            PolicyError::BadCertificateSignature
        }
        webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_) => {
            PolicyError::MalformedCertificate
        }
        _ => PolicyError::UntrustedIssuer("trusted CA"),
    }
}

fn check_validity(
    cert: &Certificate,
    now: SystemTime,
    may_be_expired: bool,
) -> Result<(), PolicyError> {
    let v = &cert.tbs_certificate.validity;
    check_validity_period(
        v.not_before.to_system_time(),
        v.not_after.to_system_time(),
        now,
        may_be_expired,
    )
}

fn check_validity_period(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    may_be_expired: bool,
) -> Result<(), PolicyError> {
    if now < not_before {
        return Err(PolicyError::NotYetValid);
    }
    if !may_be_expired && now > not_after {
        return Err(PolicyError::Expired);
    }
    Ok(())
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
