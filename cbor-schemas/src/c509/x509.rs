//! Conversion between the C509 model and DER X.509 / PKCS#10 structures
//! (draft-ietf-cose-cbor-encoded-cert-18 Sections 3.1-3.3, 4).
//!
//! Every field conversion here is written so that DER -> C509 -> DER gives the
//! same bytes; the public entry points additionally re-run the reverse
//! conversion and compare, so an input this code cannot represent exactly is
//! refused with [`ConvertError::NotInvertible`] instead of producing a C509
//! item that would decode to a different certificate.

use std::time::Duration;

use const_oid::ObjectIdentifier as Oid;
use der::asn1::{Any, BitString, GeneralizedTime, Ia5String, Null, OctetString, UtcTime};
use der::{Decode, Encode, Tag, Tagged};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::name::{GeneralName as X509GeneralName, OtherName};
use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
use x509_cert::time::Time;

use super::model::{
    AlgorithmIdentifier, AuthorityKeyIdentifier, BasicConstraints, Extension, ExtensionValue,
    GeneralName, KeyPurpose, Name, RdnAttribute, SpecialText,
};
use super::registry::{self, AttrSyntax};
use crate::error::ConvertError;

fn unsupported(s: impl Into<String>) -> ConvertError {
    ConvertError::Unsupported(s.into())
}

fn oid_from_bytes(b: &[u8]) -> Result<Oid, ConvertError> {
    Oid::from_bytes(b).map_err(|_| ConvertError::Malformed("OID"))
}

// ---------------------------------------------------------------- Name ----

/// hardwareModuleName (RFC 4108 Section 5).
#[derive(Clone, Debug, Eq, PartialEq, der::Sequence)]
struct HardwareModuleName {
    hw_type: Oid,
    hw_serial_num: OctetString,
}

/// X.509 Name -> C509 Name (Section 3.1.4). `native` selects the type-2 rules
/// (all attribute types non-negative).
pub(crate) fn name_to_c509(
    name: &x509_cert::name::Name,
    native: bool,
) -> Result<Name, ConvertError> {
    let mut attrs = Vec::with_capacity(name.0.len());
    for rdn in &name.0 {
        let atv = match rdn.0.as_slice() {
            [one] => one,
            _ => {
                return Err(unsupported(
                    "RelativeDistinguishedName with more than one attribute",
                ))
            }
        };
        let Some((value, name_str, syntax)) = registry::rdn_by_oid(&atv.oid) else {
            attrs.push(RdnAttribute::Unregistered {
                oid: atv.oid.as_bytes().to_vec(),
                value: atv.value.to_der()?,
            });
            continue;
        };
        let text = std::str::from_utf8(atv.value.value())
            .map_err(|_| unsupported(format!("{name_str} is not valid UTF-8")))?;
        let attr_type = match (syntax, atv.value.tag()) {
            (AttrSyntax::Directory, Tag::Utf8String) => value,
            (AttrSyntax::Directory, Tag::PrintableString) => {
                if native {
                    value
                } else {
                    -value
                }
            }
            (AttrSyntax::Ia5, Tag::Ia5String) => value,
            (_, t) => {
                return Err(unsupported(format!(
                    "{name_str} with string type {t} (C509 supports utf8String, printableString, IA5String)"
                )))
            }
        };
        attrs.push(RdnAttribute::Registered {
            attr_type,
            value: SpecialText::from_text(text),
        });
    }
    if let [RdnAttribute::Registered {
        attr_type: 1,
        value,
    }] = attrs.as_slice()
    {
        return Ok(Name::CommonName(value.clone()));
    }
    Ok(Name::Attributes(attrs))
}

/// C509 Name -> X.509 Name. For natively signed items the string type is not
/// carried; countryName, serialNumber and dnQualifier become PrintableString
/// (their X.520 syntax), IA5 attributes IA5String, everything else UTF8String.
pub(crate) fn name_from_c509(
    name: &Name,
    native: bool,
) -> Result<x509_cert::name::Name, ConvertError> {
    let single;
    let attrs: &[RdnAttribute] = match name {
        Name::CommonName(v) => {
            single = [RdnAttribute::Registered {
                attr_type: 1,
                value: v.clone(),
            }];
            &single
        }
        Name::Attributes(a) => a,
    };
    let mut rdns = Vec::with_capacity(attrs.len());
    for a in attrs {
        let atv = match a {
            RdnAttribute::Unregistered { oid, value } => AttributeTypeAndValue {
                oid: oid_from_bytes(oid)?,
                value: Any::from_der(value)?,
            },
            RdnAttribute::Registered { attr_type, value } => {
                if native && *attr_type < 0 {
                    return Err(ConvertError::Malformed(
                        "negative attribute type in a natively signed item",
                    ));
                }
                let abs = attr_type
                    .checked_abs()
                    .ok_or(ConvertError::Malformed("RDN attribute type"))?;
                let (oid, _, syntax) = registry::rdn_by_value(abs)
                    .ok_or(ConvertError::Malformed("RDN attribute type"))?;
                let text = value.to_text()?;
                let tag = match syntax {
                    AttrSyntax::Ia5 => {
                        if *attr_type < 0 {
                            return Err(ConvertError::Malformed("negative type for IA5 attribute"));
                        }
                        Tag::Ia5String
                    }
                    AttrSyntax::Directory if *attr_type < 0 => Tag::PrintableString,
                    AttrSyntax::Directory
                        if native
                            && matches!(attr_type, 3 | 4 | 16)
                            && text.bytes().all(is_printable) =>
                    {
                        Tag::PrintableString
                    }
                    AttrSyntax::Directory => Tag::Utf8String,
                };
                AttributeTypeAndValue {
                    oid,
                    value: Any::new(tag, text.as_bytes())?,
                }
            }
        };
        let set = der::asn1::SetOfVec::try_from(vec![atv])?;
        rdns.push(RelativeDistinguishedName(set));
    }
    Ok(RdnSequence(rdns))
}

fn is_printable(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&c)
}

// ---------------------------------------------------------- algorithms ----

pub(crate) fn sig_alg_to_c509(
    a: &AlgorithmIdentifierOwned,
) -> Result<AlgorithmIdentifier, ConvertError> {
    if a.parameters.is_none() {
        if let Some(s) = registry::sig_by_oid(&a.oid) {
            return Ok(AlgorithmIdentifier::Int(s.value));
        }
    }
    if registry::sig_by_oid(&a.oid).is_none()
        && a.oid
            .as_bytes()
            .starts_with(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01])
    {
        return Err(unsupported(format!("RSA signature algorithm {}", a.oid)));
    }
    generic_alg(a)
}

fn generic_alg(a: &AlgorithmIdentifierOwned) -> Result<AlgorithmIdentifier, ConvertError> {
    Ok(match &a.parameters {
        None => AlgorithmIdentifier::Oid(a.oid.as_bytes().to_vec()),
        Some(p) => AlgorithmIdentifier::OidWithParameters(a.oid.as_bytes().to_vec(), p.to_der()?),
    })
}

pub(crate) fn sig_alg_from_c509(
    a: &AlgorithmIdentifier,
) -> Result<AlgorithmIdentifierOwned, ConvertError> {
    Ok(match a {
        AlgorithmIdentifier::Int(v) => {
            let s = registry::sig_by_value(*v).ok_or_else(|| {
                ConvertError::UnsupportedAlgorithm(format!("C509 signature algorithm {v}"))
            })?;
            AlgorithmIdentifierOwned {
                oid: s.oid,
                parameters: None,
            }
        }
        other => generic_alg_back(other)?,
    })
}

fn generic_alg_back(a: &AlgorithmIdentifier) -> Result<AlgorithmIdentifierOwned, ConvertError> {
    match a {
        AlgorithmIdentifier::Oid(o) => Ok(AlgorithmIdentifierOwned {
            oid: oid_from_bytes(o)?,
            parameters: None,
        }),
        AlgorithmIdentifier::OidWithParameters(o, p) => Ok(AlgorithmIdentifierOwned {
            oid: oid_from_bytes(o)?,
            parameters: Some(Any::from_der(p)?),
        }),
        AlgorithmIdentifier::Int(_) => Err(ConvertError::Malformed("algorithm")),
    }
}

/// True when the C509 signature algorithm is ECDSA (r||s encoding applies).
pub(crate) fn is_ecdsa(a: &AlgorithmIdentifier) -> bool {
    matches!(a, AlgorithmIdentifier::Int(v) if registry::sig_by_value(*v).is_some_and(|s| s.ecdsa))
}

// ----------------------------------------------------------- signature ----

/// Ecdsa-Sig-Value (RFC 5480 / RFC 3279).
#[derive(der::Sequence)]
struct EcdsaSigValue<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

/// DER Ecdsa-Sig-Value -> r||s, each left-padded to the smallest group-order
/// size (32 P-256, 48 P-384, 66 P-521) that fits both (Section 3.2.2).
pub fn ecdsa_der_to_raw(der_sig: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let v = EcdsaSigValue::from_der(der_sig)
        .map_err(|_| ConvertError::Malformed("ECDSA signature DER"))?;
    if v.to_der()? != der_sig {
        return Err(ConvertError::NotCanonicalDer);
    }
    let r = v.r.as_bytes();
    let s = v.s.as_bytes();
    let longest = r.len().max(s.len());
    let size = [32usize, 48, 66]
        .into_iter()
        .find(|n| *n >= longest)
        .ok_or(ConvertError::Malformed("ECDSA signature integer too long"))?;
    let mut out = vec![0u8; 2 * size];
    let (ro, so) = out.split_at_mut(size);
    ro.get_mut(size - r.len()..)
        .ok_or(ConvertError::Malformed("ECDSA r"))?
        .copy_from_slice(r);
    so.get_mut(size - s.len()..)
        .ok_or(ConvertError::Malformed("ECDSA s"))?
        .copy_from_slice(s);
    Ok(out)
}

/// r||s -> DER Ecdsa-Sig-Value (leading zeros removed, 0x00 added where the
/// high bit is set, as DER INTEGER requires).
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, ConvertError> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || ![64usize, 96, 132].contains(&raw.len()) {
        return Err(ConvertError::Malformed("ECDSA r||s length"));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let v = EcdsaSigValue {
        r: der::asn1::UintRef::new(r)?,
        s: der::asn1::UintRef::new(s)?,
    };
    Ok(v.to_der()?)
}

pub(crate) fn sig_value_to_c509(
    alg: &AlgorithmIdentifier,
    bits: &BitString,
) -> Result<Vec<u8>, ConvertError> {
    let raw = bits
        .as_bytes()
        .ok_or_else(|| unsupported("signature BIT STRING with unused bits"))?;
    if is_ecdsa(alg) {
        ecdsa_der_to_raw(raw)
    } else {
        Ok(raw.to_vec())
    }
}

pub(crate) fn sig_value_from_c509(
    alg: &AlgorithmIdentifier,
    v: &[u8],
) -> Result<BitString, ConvertError> {
    let der_bytes = if is_ecdsa(alg) {
        ecdsa_raw_to_der(v)?
    } else {
        v.to_vec()
    };
    Ok(BitString::from_bytes(&der_bytes)?)
}

// ---------------------------------------------------------- public key ----

/// How EC points are written (Section 3.2.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum KeyForm {
    /// Type 3 certificates: compress uncompressed P-256 points with 0xFE/0xFD.
    ReencodedCompressed,
    /// Natively signed certificates: compress with 0x02/0x03.
    NativeCompressed,
    /// Keep the key bytes as in the DER (used for requests, following C509TV-03).
    AsIs,
}

pub(crate) fn spki_to_c509(
    spki: &SubjectPublicKeyInfoOwned,
    form: KeyForm,
) -> Result<(AlgorithmIdentifier, Vec<u8>), ConvertError> {
    if spki.algorithm.oid == registry::RSA_ENCRYPTION {
        return Err(unsupported(
            "RSA public keys (rsaEncryption) are not implemented",
        ));
    }
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| unsupported("subjectPublicKey BIT STRING with unused bits"))?;
    // Outer None: parameters present but not an OID (never a registered algorithm).
    let params_oid: Option<Option<Oid>> = match &spki.algorithm.parameters {
        None => Some(None),
        Some(p) if p.tag() == Tag::ObjectIdentifier => p.decode_as::<Oid>().ok().map(Some),
        Some(_) => None,
    };
    let known = params_oid.and_then(|po| {
        registry::PK_ALGS
            .iter()
            .find(|(_, o, p, _)| *o == spki.algorithm.oid && *p == po)
    });
    let Some((value, _, _, _)) = known else {
        return Ok((generic_alg(&spki.algorithm)?, key.to_vec()));
    };
    // Re-encoding must reproduce the parameters exactly.
    let alg = AlgorithmIdentifier::Int(*value);
    if *value == 1 && form != KeyForm::AsIs && key.len() == 65 && key.first() == Some(&0x04) {
        if let Ok(pk) = p256::PublicKey::from_sec1_bytes(key) {
            let c = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&pk, true);
            let mut out = c.as_bytes().to_vec();
            if form == KeyForm::ReencodedCompressed {
                if let Some(b) = out.first_mut() {
                    *b = if *b == 0x02 { 0xFE } else { 0xFD };
                }
            }
            return Ok((alg, out));
        }
    }
    Ok((alg, key.to_vec()))
}

/// Turn a C509 P-256 key (02/03/04/FE/FD forms) into SEC1 bytes as they
/// appear in DER: FE/FD decompress to 04, others stay.
pub(crate) fn p256_key_to_sec1(key: &[u8], native: bool) -> Result<Vec<u8>, ConvertError> {
    match key.first() {
        Some(0xFE) | Some(0xFD) if !native => {
            let mut c = key.to_vec();
            if let Some(b) = c.first_mut() {
                *b = if *b == 0xFE { 0x02 } else { 0x03 };
            }
            let pk = p256::PublicKey::from_sec1_bytes(&c)
                .map_err(|_| ConvertError::Malformed("P-256 point"))?;
            Ok(
                p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&pk, false)
                    .as_bytes()
                    .to_vec(),
            )
        }
        Some(0x02) | Some(0x03) if native => {
            // Natively signed: no DER original; expose the uncompressed point.
            let pk = p256::PublicKey::from_sec1_bytes(key)
                .map_err(|_| ConvertError::Malformed("P-256 point"))?;
            Ok(
                p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&pk, false)
                    .as_bytes()
                    .to_vec(),
            )
        }
        Some(0x02) | Some(0x03) | Some(0x04) => Ok(key.to_vec()),
        _ => Err(ConvertError::Malformed("P-256 public key prefix")),
    }
}

pub(crate) fn spki_from_c509(
    alg: &AlgorithmIdentifier,
    key: &[u8],
    native: bool,
) -> Result<SubjectPublicKeyInfoOwned, ConvertError> {
    let algorithm = match alg {
        AlgorithmIdentifier::Int(v) => {
            let (oid, params, _) = registry::pk_by_value(*v).ok_or_else(|| {
                ConvertError::UnsupportedAlgorithm(format!("C509 public key algorithm {v}"))
            })?;
            AlgorithmIdentifierOwned {
                oid,
                parameters: params.map(|p| Any::encode_from(&p)).transpose()?,
            }
        }
        other => generic_alg_back(other)?,
    };
    let key_bytes = if matches!(alg, AlgorithmIdentifier::Int(1)) {
        p256_key_to_sec1(key, native)?
    } else {
        key.to_vec()
    };
    Ok(SubjectPublicKeyInfoOwned {
        algorithm,
        subject_public_key: BitString::from_bytes(&key_bytes)?,
    })
}

// ---------------------------------------------------------------- time ----

/// 99991231235959Z, "no well-defined expiration date" (RFC 5280 4.1.2.5).
const NO_EXPIRY: u64 = 253_402_300_799;
/// 2050-01-01T00:00:00Z: first instant RFC 5280 encodes as GeneralizedTime.
const GENERALIZED_FROM: u64 = 2_524_608_000;

pub(crate) fn time_to_c509(t: &Time) -> u64 {
    t.to_unix_duration().as_secs()
}

pub(crate) fn not_after_to_c509(t: &Time) -> Option<u64> {
    match time_to_c509(t) {
        NO_EXPIRY => None,
        s => Some(s),
    }
}

pub(crate) fn time_from_c509(secs: u64) -> Result<Time, ConvertError> {
    let d = Duration::from_secs(secs);
    if secs < GENERALIZED_FROM {
        Ok(Time::UtcTime(UtcTime::from_unix_duration(d)?))
    } else {
        Ok(Time::GeneralTime(GeneralizedTime::from_unix_duration(d)?))
    }
}

pub(crate) fn not_after_from_c509(t: Option<u64>) -> Result<Time, ConvertError> {
    time_from_c509(t.unwrap_or(NO_EXPIRY))
}

// -------------------------------------------------------------- serial ----

/// DER INTEGER content of a serial -> ~biguint bytes.
pub(crate) fn serial_to_c509<P: x509_cert::certificate::Profile>(
    s: &x509_cert::serial_number::SerialNumber<P>,
) -> Result<Vec<u8>, ConvertError> {
    let any = Any::from_der(&s.to_der()?)?;
    let content = any.value();
    if content.first().is_some_and(|b| b & 0x80 != 0) {
        return Err(unsupported("negative serial number"));
    }
    let start = content
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(content.len());
    Ok(content.get(start..).unwrap_or_default().to_vec())
}

/// ~biguint bytes -> DER INTEGER SerialNumber.
pub(crate) fn serial_from_c509(
    b: &[u8],
) -> Result<x509_cert::serial_number::SerialNumber, ConvertError> {
    let mut content = Vec::with_capacity(b.len() + 1);
    if b.is_empty() || b.first().is_some_and(|x| x & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(b);
    let any = Any::new(Tag::Integer, content)?;
    Ok(x509_cert::serial_number::SerialNumber::from_der(
        &any.to_der()?,
    )?)
}

// ---------------------------------------------------------- extensions ----

fn key_usage_to_c509(der_value: &[u8]) -> Result<u64, ConvertError> {
    let bs = BitString::from_der(der_value)?;
    let mut v = 0u64;
    for (i, bit) in bs.bits().enumerate() {
        if bit {
            if i > 8 {
                return Err(unsupported("keyUsage bit beyond decipherOnly"));
            }
            v |= 1 << i;
        }
    }
    if v == 0 {
        return Err(unsupported("keyUsage without any bit set"));
    }
    Ok(v)
}

fn key_usage_from_c509(v: u64) -> Result<Vec<u8>, ConvertError> {
    if v == 0 || v > 0x1FF {
        return Err(ConvertError::Malformed("keyUsage value"));
    }
    let highest = 63 - v.leading_zeros() as usize;
    let nbytes = highest / 8 + 1;
    let mut bytes = vec![0u8; nbytes];
    for i in 0..=highest {
        if v >> i & 1 == 1 {
            if let Some(b) = bytes.get_mut(i / 8) {
                *b |= 0x80 >> (i % 8);
            }
        }
    }
    let unused = (7 - highest % 8) as u8;
    Ok(BitString::new(unused, bytes)?.to_der()?)
}

fn general_name_to_c509(
    g: &X509GeneralName,
    native: bool,
) -> Result<Option<GeneralName>, ConvertError> {
    Ok(Some(match g {
        X509GeneralName::OtherName(o) => {
            if o.type_id == registry::ID_ON_HARDWARE_MODULE_NAME {
                match o.value.decode_as::<HardwareModuleName>() {
                    Ok(h) if h.to_der()? == o.value.to_der()? => GeneralName::HardwareModuleName {
                        hw_type: h.hw_type.as_bytes().to_vec(),
                        hw_serial_num: h.hw_serial_num.as_bytes().to_vec(),
                    },
                    _ => return Ok(None),
                }
            } else if o.type_id == registry::ID_ON_SMTP_UTF8_MAILBOX
                && o.value.tag() == Tag::Utf8String
            {
                GeneralName::SmtpUtf8Mailbox(
                    String::from_utf8(o.value.value().to_vec())
                        .map_err(|_| ConvertError::Malformed("UTF8String"))?,
                )
            } else if o.type_id == registry::ID_ON_MAC_ADDRESS && o.value.tag() == Tag::OctetString
            {
                GeneralName::MacAddress(o.value.value().to_vec())
            } else {
                GeneralName::OtherName {
                    type_id: o.type_id.as_bytes().to_vec(),
                    value: o.value.to_der()?,
                }
            }
        }
        X509GeneralName::Rfc822Name(s) => GeneralName::Rfc822Name(s.to_string()),
        X509GeneralName::DnsName(s) => GeneralName::DnsName(s.to_string()),
        X509GeneralName::DirectoryName(n) => GeneralName::DirectoryName(name_to_c509(n, native)?),
        X509GeneralName::UniformResourceIdentifier(s) => GeneralName::Uri(s.to_string()),
        X509GeneralName::IpAddress(o) => GeneralName::IpAddress(o.as_bytes().to_vec()),
        X509GeneralName::RegisteredId(o) => GeneralName::RegisteredId(o.as_bytes().to_vec()),
        X509GeneralName::EdiPartyName(_) => return Ok(None),
    }))
}

/// GeneralNames -> C509; `None` when some name has no C509 encoding (the
/// caller then uses the generic extension form, Section 3.3).
fn general_names_to_c509(
    der_value: &[u8],
    native: bool,
) -> Result<Option<Vec<GeneralName>>, ConvertError> {
    let Ok(names) = Vec::<X509GeneralName>::from_der(der_value) else {
        return Ok(None);
    };
    if names.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(names.len());
    for g in &names {
        match general_name_to_c509(g, native)? {
            Some(x) => out.push(x),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

fn general_name_from_c509(g: &GeneralName, native: bool) -> Result<X509GeneralName, ConvertError> {
    let ia5 = |s: &str| Ia5String::new(s).map_err(ConvertError::from);
    Ok(match g {
        GeneralName::MacAddress(b) => X509GeneralName::OtherName(OtherName {
            type_id: registry::ID_ON_MAC_ADDRESS,
            value: Any::new(Tag::OctetString, b.as_slice())?,
        }),
        GeneralName::SmtpUtf8Mailbox(t) => X509GeneralName::OtherName(OtherName {
            type_id: registry::ID_ON_SMTP_UTF8_MAILBOX,
            value: Any::new(Tag::Utf8String, t.as_bytes())?,
        }),
        GeneralName::HardwareModuleName {
            hw_type,
            hw_serial_num,
        } => X509GeneralName::OtherName(OtherName {
            type_id: registry::ID_ON_HARDWARE_MODULE_NAME,
            value: Any::encode_from(&HardwareModuleName {
                hw_type: oid_from_bytes(hw_type)?,
                hw_serial_num: OctetString::new(hw_serial_num.as_slice())?,
            })?,
        }),
        GeneralName::OtherName { type_id, value } => X509GeneralName::OtherName(OtherName {
            type_id: oid_from_bytes(type_id)?,
            value: Any::from_der(value)?,
        }),
        GeneralName::Rfc822Name(t) => X509GeneralName::Rfc822Name(ia5(t)?),
        GeneralName::DnsName(t) => X509GeneralName::DnsName(ia5(t)?),
        GeneralName::DirectoryName(n) => X509GeneralName::DirectoryName(name_from_c509(n, native)?),
        GeneralName::Uri(t) => X509GeneralName::UniformResourceIdentifier(ia5(t)?),
        GeneralName::IpAddress(b) => X509GeneralName::IpAddress(OctetString::new(b.as_slice())?),
        GeneralName::RegisteredId(o) => X509GeneralName::RegisteredId(oid_from_bytes(o)?),
    })
}

fn general_names_from_c509(
    g: &[GeneralName],
    native: bool,
) -> Result<Vec<X509GeneralName>, ConvertError> {
    g.iter()
        .map(|x| general_name_from_c509(x, native))
        .collect()
}

fn generic(e: &x509_cert::ext::Extension) -> Extension {
    Extension {
        critical: e.critical,
        value: ExtensionValue::Generic {
            oid: e.extn_id.as_bytes().to_vec(),
            value: e.extn_value.as_bytes().to_vec(),
        },
    }
}

/// X.509 extension -> C509 extension (Sections 3.1.10 and 3.3).
pub(crate) fn extension_to_c509(
    e: &x509_cert::ext::Extension,
    native: bool,
) -> Result<Extension, ConvertError> {
    let Some((id, name, implemented)) = registry::ext_by_oid(&e.extn_id) else {
        return Ok(generic(e));
    };
    if !implemented {
        return Err(unsupported(format!(
            "extension {name} (C509 value {id}): its specific C509 encoding is not implemented"
        )));
    }
    let v = e.extn_value.as_bytes();
    let value = match id {
        1 => ExtensionValue::SubjectKeyIdentifier(OctetString::from_der(v)?.as_bytes().to_vec()),
        2 => ExtensionValue::KeyUsage(key_usage_to_c509(v)?),
        3 | 25 => match general_names_to_c509(v, native)? {
            Some(g) if id == 3 => ExtensionValue::SubjectAltName(g),
            Some(g) => ExtensionValue::IssuerAltName(g),
            None => return Ok(generic(e)),
        },
        4 => {
            let bc = x509_cert::ext::pkix::BasicConstraints::from_der(v)?;
            ExtensionValue::BasicConstraints(match (bc.ca, bc.path_len_constraint) {
                (false, None) => BasicConstraints::NotCa,
                (false, Some(_)) => {
                    return Err(unsupported(
                        "basicConstraints cA=false with pathLenConstraint",
                    ))
                }
                (true, p) => BasicConstraints::Ca {
                    path_len: p.map(u64::from),
                },
            })
        }
        7 => {
            let a = x509_cert::ext::pkix::AuthorityKeyIdentifier::from_der(v)?;
            match (
                a.key_identifier,
                a.authority_cert_issuer,
                a.authority_cert_serial_number,
            ) {
                (Some(k), None, None) => {
                    ExtensionValue::AuthorityKeyIdentifier(AuthorityKeyIdentifier {
                        key_identifier: k.as_bytes().to_vec(),
                        issuer_and_serial: None,
                    })
                }
                (Some(k), Some(names), Some(serial)) => {
                    let mut g = Vec::with_capacity(names.len());
                    for n in &names {
                        match general_name_to_c509(n, native)? {
                            Some(x) => g.push(x),
                            None => return Ok(generic(e)),
                        }
                    }
                    ExtensionValue::AuthorityKeyIdentifier(AuthorityKeyIdentifier {
                        key_identifier: k.as_bytes().to_vec(),
                        issuer_and_serial: Some((g, serial_to_c509(&serial)?)),
                    })
                }
                // Section 3.3: other combinations have no CBOR encoding; use the OID form.
                _ => return Ok(generic(e)),
            }
        }
        8 => {
            let eku = x509_cert::ext::pkix::ExtendedKeyUsage::from_der(v)?;
            if eku.0.is_empty() {
                return Err(unsupported("empty extKeyUsage"));
            }
            ExtensionValue::ExtKeyUsage(
                eku.0
                    .iter()
                    .map(|o| match registry::eku_by_oid(o) {
                        Some(i) => KeyPurpose::Int(i),
                        None => KeyPurpose::Oid(o.as_bytes().to_vec()),
                    })
                    .collect(),
            )
        }
        30 => ExtensionValue::InhibitAnyPolicy(u64::from(u32::from_der(v)?)),
        36 => {
            Null::from_der(v)?;
            ExtensionValue::OcspNoCheck
        }
        _ => return Err(unsupported(format!("extension {name}"))),
    };
    Ok(Extension {
        critical: e.critical,
        value,
    })
}

/// C509 extension -> X.509 extension.
pub(crate) fn extension_from_c509(
    x: &Extension,
    native: bool,
) -> Result<x509_cert::ext::Extension, ConvertError> {
    let (oid, der_value) = match &x.value {
        ExtensionValue::Generic { oid, value } => (oid_from_bytes(oid)?, value.clone()),
        v => {
            let id = x.registry_value().unwrap_or(0);
            let (oid, _, _) =
                registry::ext_by_value(id).ok_or(ConvertError::Malformed("extension id"))?;
            let der_value = match v {
                ExtensionValue::SubjectKeyIdentifier(b) => {
                    OctetString::new(b.as_slice())?.to_der()?
                }
                ExtensionValue::KeyUsage(k) => key_usage_from_c509(*k)?,
                ExtensionValue::SubjectAltName(g) | ExtensionValue::IssuerAltName(g) => {
                    general_names_from_c509(g, native)?.to_der()?
                }
                ExtensionValue::BasicConstraints(bc) => {
                    let (ca, path_len_constraint) = match bc {
                        BasicConstraints::NotCa => (false, None),
                        BasicConstraints::Ca { path_len } => (
                            true,
                            path_len
                                .map(u8::try_from)
                                .transpose()
                                .map_err(|_| ConvertError::Malformed("pathLenConstraint > 255"))?,
                        ),
                    };
                    x509_cert::ext::pkix::BasicConstraints {
                        ca,
                        path_len_constraint,
                    }
                    .to_der()?
                }
                ExtensionValue::AuthorityKeyIdentifier(a) => {
                    let (issuer, serial) = match &a.issuer_and_serial {
                        None => (None, None),
                        Some((g, s)) => (
                            Some(general_names_from_c509(g, native)?),
                            Some(serial_from_c509(s)?),
                        ),
                    };
                    x509_cert::ext::pkix::AuthorityKeyIdentifier {
                        key_identifier: Some(OctetString::new(a.key_identifier.as_slice())?),
                        authority_cert_issuer: issuer,
                        authority_cert_serial_number: serial,
                    }
                    .to_der()?
                }
                ExtensionValue::ExtKeyUsage(p) => {
                    let mut oids = Vec::with_capacity(p.len());
                    for k in p {
                        oids.push(match k {
                            KeyPurpose::Int(i) => {
                                registry::eku_by_value(*i)
                                    .ok_or(ConvertError::Malformed("extKeyUsage value"))?
                                    .0
                            }
                            KeyPurpose::Oid(o) => oid_from_bytes(o)?,
                        });
                    }
                    x509_cert::ext::pkix::ExtendedKeyUsage(oids).to_der()?
                }
                ExtensionValue::InhibitAnyPolicy(n) => u32::try_from(*n)
                    .map_err(|_| ConvertError::Malformed("inhibitAnyPolicy"))?
                    .to_der()?,
                ExtensionValue::OcspNoCheck => Null.to_der()?,
                ExtensionValue::Generic { .. } => return Err(ConvertError::Malformed("extension")),
            };
            (oid, der_value)
        }
    };
    Ok(x509_cert::ext::Extension {
        extn_id: oid,
        critical: x.critical,
        extn_value: OctetString::new(der_value)?,
    })
}
