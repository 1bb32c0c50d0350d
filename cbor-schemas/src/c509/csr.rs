//! C509 Certification Requests (draft-ietf-cose-cbor-encoded-cert-20 Section 4; unchanged from -18).

use const_oid::ObjectIdentifier as Oid;
use der::asn1::{Any, SetOfVec};
use der::{Decode, Encode, Tag, Tagged};
use x509_cert::attr::Attribute;
use x509_cert::request::{CertReq, CertReqInfo};

use super::model::{
    AlgorithmIdentifier, C509CertificationRequest, CrAttribute, ExtensionValue, GeneralName,
    TbsCertificationRequest,
};
use super::registry;
use super::x509::{self, KeyForm};
use super::{check_der_size, verify_es256, TYPE_NATIVE, TYPE_REENCODED};
use crate::error::{ConvertError, DecodeError};

/// A decoded C509 certification request, the parsed form the server works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C509Csr {
    request: C509CertificationRequest,
}

impl C509Csr {
    /// Decode `C509CertificationRequest` (the CBOR array carried by
    /// `application/cose-c509-pkcs10+cbor`), strictly.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(C509Csr {
            request: C509CertificationRequest::from_array(bytes)?,
        })
    }

    /// Wrap an already built request.
    pub fn from_request(request: C509CertificationRequest) -> Self {
        C509Csr { request }
    }

    /// The underlying C509 structure.
    pub fn request(&self) -> &C509CertificationRequest {
        &self.request
    }

    /// c509CertificationRequestType: 2 natively signed, 3 re-encoded PKCS#10.
    pub fn csr_type(&self) -> u8 {
        // decode() only accepts 2 and 3.
        u8::try_from(self.request.tbs.request_type).unwrap_or(0)
    }

    fn native(&self) -> bool {
        self.request.tbs.request_type == TYPE_NATIVE
    }

    /// Proof of possession: verify subjectSignatureValue with the request's own
    /// key. Type 2 signs the TBSCertificationRequest CBOR sequence (Section 4.1);
    /// type 3 signs the DER CertificationRequestInfo (RFC 2986), rebuilt exactly.
    /// Only ecdsa-with-SHA256 with a P-256 key (C509 values 0 and 1) is accepted.
    pub fn verify_pop(&self) -> Result<(), ConvertError> {
        let tbs = &self.request.tbs;
        if tbs.subject_public_key_algorithm != AlgorithmIdentifier::Int(1) {
            return Err(ConvertError::UnsupportedAlgorithm(format!(
                "public key algorithm {:?} (only P-256)",
                tbs.subject_public_key_algorithm
            )));
        }
        let key = x509::p256_key_to_sec1(&tbs.subject_public_key, false)?;
        let msg = if self.native() {
            tbs.to_cbor_sequence()
        } else {
            self.cert_req_info()?.to_der()?
        };
        verify_es256(
            &tbs.subject_signature_algorithm,
            &key,
            &msg,
            &self.request.signature,
        )
    }

    /// Subject as an X.509 Name (for policy). For type 2 the string types follow
    /// the X.520 syntax of each attribute (see module `x509`).
    pub fn subject(&self) -> Result<x509_cert::name::Name, ConvertError> {
        x509::name_from_c509(&self.request.tbs.subject, self.native())
    }

    /// SubjectPublicKeyInfo in X.509 form (P-256 keys are given uncompressed
    /// when the C509 form is compressed; for type 3 it is exactly the DER one).
    pub fn subject_public_key_info(&self) -> Result<spki::SubjectPublicKeyInfoOwned, ConvertError> {
        let t = &self.request.tbs;
        x509::spki_from_c509(
            &t.subject_public_key_algorithm,
            &t.subject_public_key,
            self.native(),
        )
    }

    /// The requested extensions (extensionRequest attribute) as X.509 extensions.
    pub fn extension_request(&self) -> Result<Vec<x509_cert::ext::Extension>, ConvertError> {
        let mut out = Vec::new();
        for a in &self.request.tbs.attributes {
            if let CrAttribute::ExtensionRequest(exts) = a {
                for e in exts {
                    out.push(x509::extension_from_c509(e, self.native())?);
                }
            }
        }
        Ok(out)
    }

    /// subjectAltName general names requested in the extensionRequest.
    pub fn subject_alt_names(&self) -> Vec<GeneralName> {
        let mut out = Vec::new();
        for a in &self.request.tbs.attributes {
            if let CrAttribute::ExtensionRequest(exts) = a {
                for e in exts {
                    if let ExtensionValue::SubjectAltName(g) = &e.value {
                        out.extend(g.iter().cloned());
                    }
                }
            }
        }
        out
    }

    /// hardwareModuleName (RFC 4108) from the requested subjectAltName:
    /// (hwType, hwSerialNum).
    pub fn hardware_module_name(&self) -> Option<(Oid, Vec<u8>)> {
        self.subject_alt_names().into_iter().find_map(|g| match g {
            GeneralName::HardwareModuleName {
                hw_type,
                hw_serial_num,
            } => Oid::from_bytes(&hw_type).ok().map(|o| (o, hw_serial_num)),
            _ => None,
        })
    }

    /// challengePassword attribute, if any.
    pub fn challenge_password(&self) -> Option<&str> {
        self.request.tbs.attributes.iter().find_map(|a| match a {
            CrAttribute::ChallengePassword { password, .. } => Some(password.as_str()),
            _ => None,
        })
    }

    /// RFC 2986 CertificationRequestInfo equivalent (Section 4: "the CA MAY
    /// transform the C509CertificationRequest into a CertificationRequestInfo").
    /// Exact for type 3.
    pub fn cert_req_info(&self) -> Result<CertReqInfo, ConvertError> {
        let t = &self.request.tbs;
        let native = self.native();
        let mut attrs = Vec::with_capacity(t.attributes.len());
        for a in &t.attributes {
            let (oid, value) = match a {
                CrAttribute::ExtensionRequest(exts) => {
                    let x: Vec<x509_cert::ext::Extension> = exts
                        .iter()
                        .map(|e| x509::extension_from_c509(e, native))
                        .collect::<Result<_, _>>()?;
                    (registry::EXTENSION_REQUEST, Any::encode_from(&x)?)
                }
                CrAttribute::ChallengePassword {
                    printable,
                    password,
                } => {
                    let tag = if *printable {
                        Tag::PrintableString
                    } else {
                        Tag::Utf8String
                    };
                    (
                        registry::CHALLENGE_PASSWORD,
                        Any::new(tag, password.as_bytes())?,
                    )
                }
                CrAttribute::Unregistered { oid, value } => (
                    Oid::from_bytes(oid).map_err(|_| ConvertError::Malformed("OID"))?,
                    Any::from_der(value)?,
                ),
            };
            attrs.push(Attribute {
                oid,
                values: SetOfVec::try_from(vec![value])?,
            });
        }
        Ok(CertReqInfo {
            version: x509_cert::request::Version::V1,
            subject: self.subject()?,
            public_key: self.subject_public_key_info()?,
            attributes: SetOfVec::try_from(attrs)?,
        })
    }

    /// DER PKCS#10 of a type-3 request (the exact original).
    pub fn to_der(&self) -> Result<Vec<u8>, ConvertError> {
        if self.native() {
            return Err(ConvertError::WrongType {
                expected: "3 (CBOR re-encoded PKCS#10)",
                found: self.request.tbs.request_type,
            });
        }
        let info = self.cert_req_info()?;
        let algorithm = x509::sig_alg_from_c509(&self.request.tbs.subject_signature_algorithm)?;
        let signature = x509::sig_value_from_c509(
            &self.request.tbs.subject_signature_algorithm,
            &self.request.signature,
        )?;
        Ok(CertReq {
            info,
            algorithm,
            signature,
        }
        .to_der()?)
    }
}

/// DER PKCS#10 -> C509 type 3 `C509CertificationRequest` (CBOR array).
/// The public key is kept as in the DER (uncompressed), as in the
/// draft-ietf-cose-c509-test-vectors-03 example.
pub fn csr_der_to_c509(der: &[u8]) -> Result<Vec<u8>, ConvertError> {
    check_der_size(der)?;
    let req = CertReq::from_der(der)?;
    if req.to_der()? != der {
        return Err(ConvertError::NotCanonicalDer);
    }
    if req.info.version != x509_cert::request::Version::V1 {
        return Err(ConvertError::Unsupported(
            "PKCS#10 version other than v1(0)".into(),
        ));
    }
    let subject_signature_algorithm = x509::sig_alg_to_c509(&req.algorithm)?;
    let (pk_alg, pk) = x509::spki_to_c509(&req.info.public_key, KeyForm::AsIs)?;
    let mut attributes = Vec::with_capacity(req.info.attributes.len());
    for a in req.info.attributes.iter() {
        let value = match a.values.as_slice() {
            [v] => v,
            _ => {
                return Err(ConvertError::Unsupported(
                    "CSR attribute with other than one value".into(),
                ))
            }
        };
        attributes.push(if a.oid == registry::EXTENSION_REQUEST {
            let exts: Vec<x509_cert::ext::Extension> = value.decode_as()?;
            CrAttribute::ExtensionRequest(
                exts.iter()
                    .map(|e| x509::extension_to_c509(e, false))
                    .collect::<Result<_, _>>()?,
            )
        } else if a.oid == registry::CHALLENGE_PASSWORD {
            let printable = match value.tag() {
                Tag::PrintableString => true,
                Tag::Utf8String => false,
                t => {
                    return Err(ConvertError::Unsupported(format!(
                        "challengePassword as {t}"
                    )))
                }
            };
            CrAttribute::ChallengePassword {
                printable,
                password: String::from_utf8(value.value().to_vec())
                    .map_err(|_| ConvertError::Malformed("challengePassword"))?,
            }
        } else if a.oid == registry::PRIVATE_KEY_POSSESSION {
            return Err(ConvertError::Unsupported(
                "privateKeyPossessionStatement attribute".into(),
            ));
        } else {
            CrAttribute::Unregistered {
                oid: a.oid.as_bytes().to_vec(),
                value: value.to_der()?,
            }
        });
    }
    let signature = x509::sig_value_to_c509(&subject_signature_algorithm, &req.signature)?;
    let c = C509CertificationRequest {
        tbs: TbsCertificationRequest {
            request_type: TYPE_REENCODED,
            subject_signature_algorithm,
            subject: x509::name_to_c509(&req.info.subject, false)?,
            subject_public_key_algorithm: pk_alg,
            subject_public_key: pk,
            attributes,
        },
        signature,
    };
    let out = c.to_array();
    if C509Csr::decode(&out)?.to_der()? != der {
        return Err(ConvertError::NotInvertible(
            "PKCS#10 -> C509 -> PKCS#10 differs",
        ));
    }
    Ok(out)
}

/// C509 type 3 request -> the exact DER PKCS#10 (type 2 has no DER form).
pub fn csr_c509_to_der(c509: &[u8]) -> Result<Vec<u8>, ConvertError> {
    C509Csr::decode(c509)?.to_der()
}

/// Build a natively signed (type 2) request: `sign` gets the
/// TBSCertificationRequest CBOR sequence and returns a DER ECDSA signature.
/// Returns the `C509CertificationRequest` array.
pub fn sign_native_csr(
    tbs: &TbsCertificationRequest,
    sign: impl Fn(&[u8]) -> Vec<u8>,
) -> Result<Vec<u8>, ConvertError> {
    if tbs.request_type != TYPE_NATIVE {
        return Err(ConvertError::WrongType {
            expected: "2 (natively signed)",
            found: tbs.request_type,
        });
    }
    let sig = sign(&tbs.to_cbor_sequence());
    let signature = if x509::is_ecdsa(&tbs.subject_signature_algorithm) {
        x509::ecdsa_der_to_raw(&sig)?
    } else {
        sig
    };
    let out = C509CertificationRequest {
        tbs: tbs.clone(),
        signature,
    }
    .to_array();
    C509Csr::decode(&out)?;
    Ok(out)
}
