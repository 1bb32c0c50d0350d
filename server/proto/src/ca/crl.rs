//! Certificate revocation lists (RFC 5280 §5): the X.509 v2 CRL our issuing CA signs, and
//! the manufacturers' CRLs we verify and read.
//!
//! What we sign: version v2; signature ecdsa-with-SHA256 through the CA's [`Signer`] (the
//! same path as certificates, so an HSM signer signs CRLs too); issuer = the CA's subject;
//! thisUpdate and nextUpdate (UTCTime through 2049, RFC 5280 §5.1.2.4); one entry per revoked
//! certificate with its revocationDate and, unless the reason is unspecified, a reasonCode
//! entry extension (RFC 5280 §5.3.1: unspecified SHOULD be absent); CRL extensions
//! authorityKeyIdentifier (the CA's SKI) and cRLNumber (both required by RFC 5280 §5.2).

use std::time::SystemTime;

use der::asn1::{AnyRef, BitString, OctetString, Uint};
use der::{Decode, Encode};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::crl::CrlDistributionPoints;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlReason};
use x509_cert::serial_number::SerialNumber;
use x509_cert::Certificate;

use super::error::CaError;
use super::issue::{encode_extension, to_time, IssuingCa};
use super::oid;
use super::signer::ecdsa_with;

/// One revoked certificate, as the CRL lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlEntry {
    /// The certificate's serial number, big-endian content bytes (what the store keeps as hex).
    pub serial: Vec<u8>,
    pub revoked_at: SystemTime,
    /// CRLReason code (RFC 5280 §5.3.1); `None` or 0 (unspecified) puts no reasonCode.
    pub reason_code: Option<u8>,
}

/// What to sign into a CRL ([`IssuingCa::sign_crl`]).
#[derive(Clone, Debug)]
pub struct CrlParams<'a> {
    /// cRLNumber, monotonically increasing for this CA (RFC 5280 §5.2.3).
    pub number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
    pub entries: &'a [CrlEntry],
}

fn reason(code: u8) -> Option<CrlReason> {
    Some(match code {
        1 => CrlReason::KeyCompromise,
        2 => CrlReason::CaCompromise,
        3 => CrlReason::AffiliationChanged,
        4 => CrlReason::Superseded,
        5 => CrlReason::CessationOfOperation,
        6 => CrlReason::CertificateHold,
        8 => CrlReason::RemoveFromCRL,
        9 => CrlReason::PrivilegeWithdrawn,
        10 => CrlReason::AaCompromise,
        _ => return None,
    })
}

/// `CertificateList` with the TBSCertList carried as its received (or just encoded) bytes:
/// signing and verification use exactly those bytes.
#[derive(der::Sequence)]
struct SignedCrl<'a> {
    tbs_cert_list: AnyRef<'a>,
    signature_algorithm: spki::AlgorithmIdentifierOwned,
    signature: BitString,
}

impl IssuingCa {
    /// Sign an X.509 v2 CRL (see the module documentation for its profile); returns DER.
    pub fn sign_crl(&self, p: &CrlParams<'_>) -> Result<Vec<u8>, CaError> {
        if p.next_update <= p.this_update {
            return Err(CaError::InvalidValidity(
                "nextUpdate is not after thisUpdate",
            ));
        }
        let mut revoked = Vec::with_capacity(p.entries.len());
        for e in p.entries {
            let extensions = match e.reason_code.and_then(reason) {
                Some(r) => Some(vec![encode_extension(oid::CE_CRL_REASON, false, &r)?]),
                None => None,
            };
            revoked.push(RevokedCert {
                serial_number: SerialNumber::new(&e.serial)?,
                revocation_date: to_time(e.revoked_at)?,
                crl_entry_extensions: extensions,
            });
        }
        let crl_extensions = vec![
            encode_extension(
                oid::CE_AUTHORITY_KEY_IDENTIFIER,
                false,
                &AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(self.key_identifier())?),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
            )?,
            encode_extension(
                oid::CE_CRL_NUMBER,
                false,
                &Uint::new(&p.number.to_be_bytes())?,
            )?,
        ];
        let tbs = TbsCertList {
            version: x509_cert::Version::V2,
            signature: ecdsa_with(self.signer().signature_algorithm()),
            issuer: self.subject().clone(),
            this_update: to_time(p.this_update)?,
            next_update: Some(to_time(p.next_update)?),
            revoked_certificates: if revoked.is_empty() {
                None
            } else {
                Some(revoked)
            },
            crl_extensions: Some(crl_extensions),
        };
        let tbs_der = tbs.to_der()?;
        let signature = self.signer().sign(&tbs_der)?;
        Ok(SignedCrl {
            tbs_cert_list: AnyRef::from_der(&tbs_der)?,
            signature_algorithm: ecdsa_with(self.signer().signature_algorithm()),
            signature: BitString::from_bytes(&signature)?,
        }
        .to_der()?)
    }

    /// Put a cRLDistributionPoints extension (RFC 5280 §4.2.1.13), one distribution point
    /// per URI, in every certificate [`IssuingCa::issue`] makes from now on. Empty: none.
    pub fn set_crl_distribution_points(&mut self, uris: &[String]) -> Result<(), CaError> {
        self.crl_distribution_points = if uris.is_empty() {
            None
        } else {
            let mut points = Vec::with_capacity(uris.len());
            for u in uris {
                let uri = der::asn1::Ia5String::new(u)
                    .map_err(|_| CaError::InvalidName(format!("URI {u:?} is not IA5")))?;
                points.push(DistributionPoint {
                    distribution_point: Some(DistributionPointName::FullName(vec![
                        GeneralName::UniformResourceIdentifier(uri),
                    ])),
                    reasons: None,
                    crl_issuer: None,
                });
            }
            Some(encode_extension(
                oid::CE_CRL_DISTRIBUTION_POINTS,
                false,
                &CrlDistributionPoints(points),
            )?)
        };
        Ok(())
    }
}

/// A CRL whose signature verified against its issuer ([`verify_crl`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCrl {
    /// The issuer's Name, DER: entries apply to certificates with this issuer.
    pub issuer_der: Vec<u8>,
    /// cRLNumber, when present.
    pub number: Option<Vec<u8>>,
    pub this_update: SystemTime,
    pub next_update: Option<SystemTime>,
    /// Revoked serials, big-endian content bytes, with their reason code (when given).
    pub revoked: Vec<(Vec<u8>, Option<u8>)>,
}

/// Parse a DER (or PEM `X509 CRL`) CRL, check that `issuer_cert_der` issued it (issuer name
/// equal to the certificate's subject) and that its signature verifies with that
/// certificate's key: ECDSA P-256 or P-384 with SHA-256 or SHA-384, or RSA PKCS#1 v1.5 with
/// SHA-256 or SHA-384. Revoked serials and reason codes are returned; indirect CRLs and
/// delta CRLs are not supported (a critical extension we do not know refuses the CRL).
pub fn verify_crl(crl: &[u8], issuer_cert_der: &[u8]) -> Result<VerifiedCrl, CaError> {
    let bad = |m: String| CaError::BadCrl(m);
    let der_bytes;
    let crl = if crl.first() == Some(&0x30) {
        crl
    } else {
        let (label, d) = der::pem::decode_vec(crl).map_err(|e| bad(format!("PEM: {e}")))?;
        if label != "X509 CRL" {
            return Err(bad(format!("PEM label {label:?}, expected \"X509 CRL\"")));
        }
        der_bytes = d;
        &der_bytes
    };
    let issuer = Certificate::from_der(issuer_cert_der)?;
    let signed = SignedCrl::from_der(crl).map_err(|e| bad(format!("DER: {e}")))?;
    let list = CertificateList::from_der(crl).map_err(|e| bad(format!("DER: {e}")))?;
    let tbs = &list.tbs_cert_list;
    let issuer_der = tbs.issuer.to_der()?;
    if issuer_der != issuer.tbs_certificate.subject.to_der()? {
        return Err(bad(format!(
            "issued by {}, not by {}",
            tbs.issuer, issuer.tbs_certificate.subject
        )));
    }
    if tbs.signature != list.signature_algorithm {
        return Err(bad("the two signature algorithms differ".into()));
    }
    verify_signature(
        &issuer.tbs_certificate.subject_public_key_info,
        &list.signature_algorithm.oid,
        &signed.tbs_cert_list.to_der()?,
        signed.signature.raw_bytes(),
    )?;
    let mut number = None;
    for ext in tbs.crl_extensions.iter().flatten() {
        if ext.extn_id == oid::CE_CRL_NUMBER {
            number = Some(
                Uint::from_der(ext.extn_value.as_bytes())?
                    .as_bytes()
                    .to_vec(),
            );
        } else if ext.critical {
            return Err(bad(format!(
                "unsupported critical CRL extension {}",
                ext.extn_id
            )));
        }
    }
    let mut revoked = Vec::new();
    for r in tbs.revoked_certificates.iter().flatten() {
        let mut code = None;
        for ext in r.crl_entry_extensions.iter().flatten() {
            if ext.extn_id == oid::CE_CRL_REASON {
                code = Some(CrlReason::from_der(ext.extn_value.as_bytes())? as u8);
            } else if ext.critical {
                return Err(bad(format!(
                    "unsupported critical CRL entry extension {} (indirect CRLs are not supported)",
                    ext.extn_id
                )));
            }
        }
        revoked.push((r.serial_number.as_bytes().to_vec(), code));
    }
    Ok(VerifiedCrl {
        issuer_der,
        number,
        this_update: tbs.this_update.to_system_time(),
        next_update: tbs.next_update.map(|t| t.to_system_time()),
        revoked,
    })
}

fn verify_signature(
    spki: &SubjectPublicKeyInfoOwned,
    alg: &const_oid::ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), CaError> {
    use ring::signature as s;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<const_oid::ObjectIdentifier>().ok());
    let key = spki.subject_public_key.raw_bytes();
    let algorithm: &dyn s::VerificationAlgorithm = match (spki.algorithm.oid, *alg, curve) {
        (oid::ID_EC_PUBLIC_KEY, oid::ECDSA_WITH_SHA256, Some(oid::SECP256R1)) => {
            &s::ECDSA_P256_SHA256_ASN1
        }
        (oid::ID_EC_PUBLIC_KEY, oid::ECDSA_WITH_SHA384, Some(oid::SECP256R1)) => {
            &s::ECDSA_P256_SHA384_ASN1
        }
        (oid::ID_EC_PUBLIC_KEY, oid::ECDSA_WITH_SHA256, Some(oid::SECP384R1)) => {
            &s::ECDSA_P384_SHA256_ASN1
        }
        (oid::ID_EC_PUBLIC_KEY, oid::ECDSA_WITH_SHA384, Some(oid::SECP384R1)) => {
            &s::ECDSA_P384_SHA384_ASN1
        }
        (oid::RSA_ENCRYPTION, oid::SHA256_WITH_RSA, _) => &s::RSA_PKCS1_2048_8192_SHA256,
        (oid::RSA_ENCRYPTION, oid::SHA384_WITH_RSA, _) => &s::RSA_PKCS1_2048_8192_SHA384,
        (key_alg, sig_alg, _) => {
            return Err(CaError::BadCrl(format!(
                "unsupported signature {sig_alg} with key {key_alg}"
            )))
        }
    };
    s::UnparsedPublicKey::new(algorithm, key)
        .verify(message, signature)
        .map_err(|_| CaError::BadCrl("signature does not verify with the issuer's key".into()))
}
