//! C509 data model and its CBOR codec (draft-ietf-cose-cbor-encoded-cert-20
//! Sections 3.1-3.3 and 4).
//!
//! The types mirror the CDDL in `cddl/c509.cddl`. Decoding is strict: after a
//! structure is decoded it is re-encoded and compared with the input, so every
//! accepted item is in the one deterministic encoding the draft requires
//! (Section 2: "Deterministically Encoded CBOR"; Section 3.6).

use crate::cbor::{self, Enc, EncResult, Reader};
use crate::error::DecodeError;

use super::registry;

/// 99991231235959Z as POSIX seconds; encoded as `null` (Section 3.1.5).
const NO_EXPIRY_SECONDS: u64 = 253_402_300_799;
/// CBOR tag 48: MAC address (RFC 9542 Section 2.4), used for EUI-64 text (Section 3.1.4).
const TAG_MAC_ADDRESS: u64 = 48;
/// CBOR tag 121: challengePassword as PrintableString (Section 4.3.2).
const TAG_PRINTABLE_PASSWORD: u64 = 121;

/// `SpecialText = text / bytes / tag` (Section 3.1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecialText {
    /// Plain text.
    Text(String),
    /// Even-length lowercase hex text, carried as its bytes.
    Bytes(Vec<u8>),
    /// EUI-64 text `HH-HH-...` as tag 48 (6 bytes for the `FF-FE` form, else 8).
    Eui(Vec<u8>),
}

impl SpecialText {
    /// Apply the text optimisations of Section 3.1.4 to a string.
    pub fn from_text(s: &str) -> Self {
        if is_lower_hex_even(s) {
            if let Ok(b) = hex::decode(s) {
                return SpecialText::Bytes(b);
            }
        }
        if let Some(eui) = parse_eui64(s) {
            return SpecialText::Eui(eui);
        }
        SpecialText::Text(s.to_owned())
    }

    /// The text string this value stands for (inverse of [`SpecialText::from_text`]).
    pub fn to_text(&self) -> Result<String, DecodeError> {
        match self {
            SpecialText::Text(t) => Ok(t.clone()),
            SpecialText::Bytes(b) => Ok(hex::encode(b)),
            SpecialText::Eui(b) => match b.as_slice() {
                [a, b2, c, d, e, f] => Ok(format_eui(&[*a, *b2, *c, 0xFF, 0xFE, *d, *e, *f])),
                [_, _, _, _, _, _, _, _] => Ok(format_eui(b)),
                _ => Err(DecodeError::Invalid("tag 48 MAC address length")),
            },
        }
    }

    fn encode(&self, e: &mut Enc) -> EncResult {
        match self {
            SpecialText::Text(t) => e.str(t).map(|_| ()),
            SpecialText::Bytes(b) => e.bytes(b).map(|_| ()),
            SpecialText::Eui(b) => {
                cbor::tag(e, TAG_MAC_ADDRESS)?;
                e.bytes(b).map(|_| ())
            }
        }
    }

    fn decode(r: &mut Reader<'_>, strict_text: bool) -> Result<Self, DecodeError> {
        use minicbor::data::Type;
        match r.peek()? {
            Type::String | Type::StringIndef => {
                let t = r.text("SpecialText")?;
                if strict_text && !matches!(SpecialText::from_text(t), SpecialText::Text(_)) {
                    return Err(DecodeError::NotDeterministic(
                        "text that must use the bytes or tag 48 form",
                    ));
                }
                Ok(SpecialText::Text(t.to_owned()))
            }
            Type::Bytes | Type::BytesIndef => {
                let b = r.bytes("SpecialText")?;
                if strict_text && b.is_empty() {
                    return Err(DecodeError::NotDeterministic("empty bytes SpecialText"));
                }
                Ok(SpecialText::Bytes(b.to_vec()))
            }
            Type::Tag => {
                let t = r.tag("SpecialText")?;
                if t != TAG_MAC_ADDRESS {
                    return Err(DecodeError::UnsupportedValue {
                        registry: "SpecialText tag",
                        value: i64::try_from(t).unwrap_or(i64::MAX),
                    });
                }
                let b = r.bytes("tag 48 MAC address")?;
                match b.len() {
                    6 => {}
                    8 if strict_text && b.get(3..5) == Some(&[0xFF, 0xFE][..]) => {
                        return Err(DecodeError::NotDeterministic(
                            "EUI-64 with FF-FE must use the 6-byte form",
                        ))
                    }
                    8 => {}
                    _ => return Err(DecodeError::Invalid("tag 48 MAC address length")),
                }
                Ok(SpecialText::Eui(b.to_vec()))
            }
            _ => Err(DecodeError::UnexpectedType {
                field: "SpecialText",
                expected: "text / bytes / tag",
            }),
        }
    }
}

fn is_lower_hex_even(s: &str) -> bool {
    s.len() >= 2
        && s.len().is_multiple_of(2)
        && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_eui64(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() != 23 {
        return None;
    }
    let mut out = Vec::with_capacity(8);
    for i in 0..8 {
        let hi = *b.get(i * 3)?;
        let lo = *b.get(i * 3 + 1)?;
        if i < 7 && *b.get(i * 3 + 2)? != b'-' {
            return None;
        }
        let hv = upper_hex_val(hi)?;
        let lv = upper_hex_val(lo)?;
        out.push(hv << 4 | lv);
    }
    if out.get(3..5) == Some(&[0xFF, 0xFE][..]) {
        let mut short = Vec::with_capacity(6);
        short.extend_from_slice(out.get(0..3)?);
        short.extend_from_slice(out.get(5..8)?);
        return Some(short);
    }
    Some(out)
}

fn upper_hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn format_eui(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join("-")
}

/// One `RDNAttribute` (Section 3.1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdnAttribute {
    /// `(attributeType: int, attributeValue: SpecialText)`; |attr_type| is the
    /// C509 RDN Attributes registry value, the sign the string type
    /// (positive utf8String / IA5String, negative printableString).
    Registered {
        /// Signed registry value.
        attr_type: i64,
        /// Value.
        value: SpecialText,
    },
    /// `(attributeType: ~oid, attributeValue: bytes)`: unregistered attribute;
    /// this crate puts the DER encoding (tag, length, value) of the AttributeValue in `value`.
    Unregistered {
        /// OID content bytes (RFC 9090 unwrapped).
        oid: Vec<u8>,
        /// DER TLV of the attribute value.
        value: Vec<u8>,
    },
}

/// `Name = [ * RDNAttribute ] / SpecialText` (Section 3.1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A single utf8String commonName (attribute type +1), encoded as just its value.
    CommonName(SpecialText),
    /// The general array form.
    Attributes(Vec<RdnAttribute>),
}

impl Name {
    /// The same name with every attribute type made non-negative, as natively
    /// signed items require (Section 3.1.4: "in natively signed C509
    /// certificates all CBOR ints SHALL be non-negative").
    pub fn into_native(self) -> Name {
        match self {
            Name::Attributes(a) => {
                let mut attrs: Vec<RdnAttribute> = a
                    .into_iter()
                    .map(|x| match x {
                        RdnAttribute::Registered { attr_type, value } => RdnAttribute::Registered {
                            attr_type: attr_type.checked_abs().unwrap_or(attr_type),
                            value,
                        },
                        other => other,
                    })
                    .collect();
                if let [RdnAttribute::Registered { attr_type: 1, .. }] = attrs.as_slice() {
                    if let Some(RdnAttribute::Registered { value, .. }) = attrs.pop() {
                        return Name::CommonName(value);
                    }
                }
                Name::Attributes(attrs)
            }
            n => n,
        }
    }

    pub(crate) fn encode(&self, e: &mut Enc) -> EncResult {
        match self {
            Name::CommonName(t) => t.encode(e),
            Name::Attributes(attrs) => {
                e.array(2 * attrs.len() as u64)?;
                for a in attrs {
                    match a {
                        RdnAttribute::Registered { attr_type, value } => {
                            e.i64(*attr_type)?;
                            value.encode(e)?;
                        }
                        RdnAttribute::Unregistered { oid, value } => {
                            e.bytes(oid)?;
                            e.bytes(value)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>, strict: bool) -> Result<Self, DecodeError> {
        use minicbor::data::Type;
        if !matches!(r.peek()?, Type::Array | Type::ArrayIndef) {
            return Ok(Name::CommonName(SpecialText::decode(r, strict)?));
        }
        let n = r.array("Name")?;
        if n % 2 != 0 {
            return Err(DecodeError::Length("Name (pairs)"));
        }
        let mut attrs = Vec::with_capacity(n / 2);
        for _ in 0..n / 2 {
            if r.is_int()? {
                let attr_type = registry_int(r, "RDN attributeType")?;
                if registry::rdn_by_value(attr_type.checked_abs().unwrap_or(i64::MAX)).is_none() {
                    return Err(DecodeError::UnsupportedValue {
                        registry: "C509 RDN Attributes",
                        value: attr_type,
                    });
                }
                if !strict && attr_type < 0 {
                    return Err(DecodeError::Invalid(
                        "negative attribute type in a natively signed item",
                    ));
                }
                let value = SpecialText::decode(r, strict)?;
                attrs.push(RdnAttribute::Registered { attr_type, value });
            } else {
                let oid = r.bytes("RDN attributeType ~oid")?.to_vec();
                check_oid(&oid)?;
                let value = r.bytes("RDN attributeValue")?.to_vec();
                attrs.push(RdnAttribute::Unregistered { oid, value });
            }
        }
        if let [RdnAttribute::Registered { attr_type: 1, .. }] = attrs.as_slice() {
            return Err(DecodeError::NotDeterministic(
                "single commonName must be encoded as SpecialText",
            ));
        }
        Ok(Name::Attributes(attrs))
    }
}

/// Read a registry-valued int: every C509 registry holds values in
/// `REGISTRY_MIN..=REGISTRY_MAX` (IANA "CBOR Encoded X.509 (C509)"), so anything
/// outside is refused before its meaning is looked up.
pub(crate) fn registry_int(r: &mut Reader<'_>, field: &'static str) -> Result<i64, DecodeError> {
    let v = r.int(field)?;
    if !(super::REGISTRY_MIN..=super::REGISTRY_MAX).contains(&v) {
        return Err(DecodeError::OutOfRange(field));
    }
    Ok(v)
}

pub(crate) fn check_oid(b: &[u8]) -> Result<(), DecodeError> {
    const_oid::ObjectIdentifier::from_bytes(b)
        .map(|_| ())
        .map_err(|_| DecodeError::Invalid("~oid content"))
}

/// `AlgorithmIdentifier = int / ~oid / [ algorithm: ~oid, parameters: bytes ]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlgorithmIdentifier {
    /// Registry value (C509 Signature / Public Key Algorithms).
    Int(i64),
    /// Unregistered algorithm with absent parameters (OID content bytes).
    Oid(Vec<u8>),
    /// Unregistered algorithm with parameters (OID content bytes, DER parameters).
    OidWithParameters(Vec<u8>, Vec<u8>),
}

impl AlgorithmIdentifier {
    fn encode(&self, e: &mut Enc) -> EncResult {
        match self {
            AlgorithmIdentifier::Int(v) => e.i64(*v).map(|_| ()),
            AlgorithmIdentifier::Oid(o) => e.bytes(o).map(|_| ()),
            AlgorithmIdentifier::OidWithParameters(o, p) => {
                e.array(2)?;
                e.bytes(o)?;
                e.bytes(p).map(|_| ())
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        use minicbor::data::Type;
        if r.is_int()? {
            return Ok(AlgorithmIdentifier::Int(registry_int(
                r,
                "AlgorithmIdentifier",
            )?));
        }
        match r.peek()? {
            Type::Bytes | Type::BytesIndef => {
                let o = r.bytes("AlgorithmIdentifier ~oid")?.to_vec();
                check_oid(&o)?;
                Ok(AlgorithmIdentifier::Oid(o))
            }
            _ => {
                if r.array("AlgorithmIdentifier")? != 2 {
                    return Err(DecodeError::Length("AlgorithmIdentifier"));
                }
                let o = r.bytes("AlgorithmIdentifier ~oid")?.to_vec();
                check_oid(&o)?;
                let p = r.bytes("AlgorithmIdentifier parameters")?.to_vec();
                Ok(AlgorithmIdentifier::OidWithParameters(o, p))
            }
        }
    }
}

/// General name types of the C509 General Names registry (Section 8.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneralName {
    /// -3: otherName id-on-MACAddress (6 or 8 bytes).
    MacAddress(Vec<u8>),
    /// -2: otherName id-on-SmtpUTF8Mailbox.
    SmtpUtf8Mailbox(String),
    /// -1: otherName id-on-hardwareModuleName `[ hwType: ~oid, hwSerialNum: bytes ]` (RFC 4108).
    HardwareModuleName {
        /// hwType OID content bytes.
        hw_type: Vec<u8>,
        /// hwSerialNum.
        hw_serial_num: Vec<u8>,
    },
    /// 0: other otherName `[ ~oid, bytes ]` (bytes = DER TLV of the value in this crate).
    OtherName {
        /// type-id OID content bytes.
        type_id: Vec<u8>,
        /// DER TLV of the value.
        value: Vec<u8>,
    },
    /// 1: rfc822Name.
    Rfc822Name(String),
    /// 2: dNSName.
    DnsName(String),
    /// 4: directoryName.
    DirectoryName(Name),
    /// 6: uniformResourceIdentifier.
    Uri(String),
    /// 7: iPAddress (4 or 16 bytes).
    IpAddress(Vec<u8>),
    /// 8: registeredID (OID content bytes).
    RegisteredId(Vec<u8>),
}

fn encode_general_names(e: &mut Enc, names: &[GeneralName], allow_text_form: bool) -> EncResult {
    if allow_text_form {
        if let [GeneralName::DnsName(d)] = names {
            return e.str(d).map(|_| ());
        }
    }
    e.array(2 * names.len() as u64)?;
    for n in names {
        match n {
            GeneralName::MacAddress(b) => {
                e.i64(-3)?.bytes(b)?;
            }
            GeneralName::SmtpUtf8Mailbox(t) => {
                e.i64(-2)?.str(t)?;
            }
            GeneralName::HardwareModuleName {
                hw_type,
                hw_serial_num,
            } => {
                e.i64(-1)?.array(2)?.bytes(hw_type)?.bytes(hw_serial_num)?;
            }
            GeneralName::OtherName { type_id, value } => {
                e.i64(0)?.array(2)?.bytes(type_id)?.bytes(value)?;
            }
            GeneralName::Rfc822Name(t) => {
                e.i64(1)?.str(t)?;
            }
            GeneralName::DnsName(t) => {
                e.i64(2)?.str(t)?;
            }
            GeneralName::DirectoryName(nm) => {
                e.i64(4)?;
                nm.encode(e)?;
            }
            GeneralName::Uri(t) => {
                e.i64(6)?.str(t)?;
            }
            GeneralName::IpAddress(b) => {
                e.i64(7)?.bytes(b)?;
            }
            GeneralName::RegisteredId(o) => {
                e.i64(8)?.bytes(o)?;
            }
        }
    }
    Ok(())
}

fn decode_general_names(
    r: &mut Reader<'_>,
    allow_text_form: bool,
    strict: bool,
) -> Result<Vec<GeneralName>, DecodeError> {
    use minicbor::data::Type;
    if allow_text_form && matches!(r.peek()?, Type::String | Type::StringIndef) {
        return Ok(vec![GeneralName::DnsName(r.text("dNSName")?.to_owned())]);
    }
    let n = r.array("GeneralNames")?;
    if n == 0 || n % 2 != 0 {
        return Err(DecodeError::Length("GeneralNames"));
    }
    let mut out = Vec::with_capacity(n / 2);
    for _ in 0..n / 2 {
        let t = registry_int(r, "GeneralNameType")?;
        let gn = match t {
            -3 => GeneralName::MacAddress(r.bytes("MACAddress")?.to_vec()),
            -2 => GeneralName::SmtpUtf8Mailbox(r.text("SmtpUTF8Mailbox")?.to_owned()),
            -1 | 0 => {
                if r.array("otherName")? != 2 {
                    return Err(DecodeError::Length("otherName"));
                }
                let o = r.bytes("otherName ~oid")?.to_vec();
                check_oid(&o)?;
                let v = r.bytes("otherName value")?.to_vec();
                if t == -1 {
                    GeneralName::HardwareModuleName {
                        hw_type: o,
                        hw_serial_num: v,
                    }
                } else {
                    GeneralName::OtherName {
                        type_id: o,
                        value: v,
                    }
                }
            }
            1 => GeneralName::Rfc822Name(r.text("rfc822Name")?.to_owned()),
            2 => GeneralName::DnsName(r.text("dNSName")?.to_owned()),
            4 => GeneralName::DirectoryName(Name::decode(r, strict)?),
            6 => GeneralName::Uri(r.text("uniformResourceIdentifier")?.to_owned()),
            7 => GeneralName::IpAddress(r.bytes("iPAddress")?.to_vec()),
            8 => {
                let o = r.bytes("registeredID")?.to_vec();
                check_oid(&o)?;
                GeneralName::RegisteredId(o)
            }
            v => {
                return Err(DecodeError::UnsupportedValue {
                    registry: "C509 General Names",
                    value: v,
                })
            }
        };
        out.push(gn);
    }
    if allow_text_form && matches!(out.as_slice(), [GeneralName::DnsName(_)]) {
        return Err(DecodeError::NotDeterministic(
            "single dNSName must be encoded as text",
        ));
    }
    Ok(out)
}

/// `basicConstraints` (Section 3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicConstraints {
    /// cA = false (encoded -2).
    NotCa,
    /// cA = true, optional pathLenConstraint (encoded -1 or the path length).
    Ca {
        /// pathLenConstraint.
        path_len: Option<u64>,
    },
}

/// `authorityKeyIdentifier` (Section 3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityKeyIdentifier {
    /// keyIdentifier.
    pub key_identifier: Vec<u8>,
    /// authorityCertIssuer and authorityCertSerialNumber (both or neither).
    pub issuer_and_serial: Option<(Vec<GeneralName>, Vec<u8>)>,
}

/// A KeyPurposeId: registry value or OID content bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPurpose {
    /// C509 Extended Key Usages registry value.
    Int(i64),
    /// Unregistered purpose (OID content bytes).
    Oid(Vec<u8>),
}

/// Extension values with a specific C509 encoding, plus the generic form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionValue {
    /// 1 subjectKeyIdentifier.
    SubjectKeyIdentifier(Vec<u8>),
    /// 2 keyUsage: bit i of the BIT STRING (named bit i) is 2^i.
    KeyUsage(u64),
    /// 3 subjectAltName.
    SubjectAltName(Vec<GeneralName>),
    /// 4 basicConstraints.
    BasicConstraints(BasicConstraints),
    /// 7 authorityKeyIdentifier.
    AuthorityKeyIdentifier(AuthorityKeyIdentifier),
    /// 8 extKeyUsage.
    ExtKeyUsage(Vec<KeyPurpose>),
    /// 25 issuerAltName.
    IssuerAltName(Vec<GeneralName>),
    /// 30 inhibitAnyPolicy.
    InhibitAnyPolicy(u64),
    /// 36 id-pkix-ocsp-nocheck (value null).
    OcspNoCheck,
    /// `(extensionID: ~oid, extensionValue: bytes / [ bytes ])`: extnValue content.
    Generic {
        /// OID content bytes.
        oid: Vec<u8>,
        /// extnValue OCTET STRING content.
        value: Vec<u8>,
    },
}

/// One certificate extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Criticality (negative extensionID / `[bytes]` wrapping).
    pub critical: bool,
    /// Value.
    pub value: ExtensionValue,
}

impl Extension {
    /// Registry value of a specific extension (None for the generic form).
    pub fn registry_value(&self) -> Option<i64> {
        Some(match &self.value {
            ExtensionValue::SubjectKeyIdentifier(_) => 1,
            ExtensionValue::KeyUsage(_) => 2,
            ExtensionValue::SubjectAltName(_) => 3,
            ExtensionValue::BasicConstraints(_) => 4,
            ExtensionValue::AuthorityKeyIdentifier(_) => 7,
            ExtensionValue::ExtKeyUsage(_) => 8,
            ExtensionValue::IssuerAltName(_) => 25,
            ExtensionValue::InhibitAnyPolicy(_) => 30,
            ExtensionValue::OcspNoCheck => 36,
            ExtensionValue::Generic { .. } => return None,
        })
    }
}

/// Encode `Extensions = [ * Extension ] / int` (Section 3.1.10).
pub(crate) fn encode_extensions(e: &mut Enc, exts: &[Extension]) -> EncResult {
    // Only keyUsage present: a single int, |value| = bits, sign = criticality.
    if let [Extension {
        critical,
        value: ExtensionValue::KeyUsage(ku),
    }] = exts
    {
        let v = i64::try_from(*ku).unwrap_or(i64::MAX);
        return e.i64(if *critical { -v } else { v }).map(|_| ());
    }
    e.array(2 * exts.len() as u64)?;
    for x in exts {
        if let Some(id) = x.registry_value() {
            e.i64(if x.critical { -id } else { id })?;
        }
        match &x.value {
            ExtensionValue::SubjectKeyIdentifier(b) => {
                e.bytes(b)?;
            }
            ExtensionValue::KeyUsage(v) => {
                e.u64(*v)?;
            }
            ExtensionValue::SubjectAltName(g) | ExtensionValue::IssuerAltName(g) => {
                encode_general_names(e, g, true)?;
            }
            ExtensionValue::BasicConstraints(bc) => {
                match bc {
                    BasicConstraints::NotCa => e.i64(-2)?,
                    BasicConstraints::Ca { path_len: None } => e.i64(-1)?,
                    BasicConstraints::Ca { path_len: Some(p) } => e.u64(*p)?,
                };
            }
            ExtensionValue::AuthorityKeyIdentifier(a) => match &a.issuer_and_serial {
                None => {
                    e.bytes(&a.key_identifier)?;
                }
                Some((names, serial)) => {
                    e.array(3)?.bytes(&a.key_identifier)?;
                    encode_general_names(e, names, false)?;
                    e.bytes(serial)?;
                }
            },
            ExtensionValue::ExtKeyUsage(p) => {
                if p.len() != 1 {
                    e.array(p.len() as u64)?;
                }
                for k in p {
                    match k {
                        KeyPurpose::Int(v) => e.i64(*v)?,
                        KeyPurpose::Oid(o) => e.bytes(o)?,
                    };
                }
            }
            ExtensionValue::InhibitAnyPolicy(v) => {
                e.u64(*v)?;
            }
            ExtensionValue::OcspNoCheck => {
                e.null()?;
            }
            ExtensionValue::Generic { oid, value } => {
                e.bytes(oid)?;
                if x.critical {
                    e.array(1)?;
                }
                e.bytes(value)?;
            }
        }
    }
    Ok(())
}

/// Decode `Extensions`.
pub(crate) fn decode_extensions(
    r: &mut Reader<'_>,
    strict: bool,
) -> Result<Vec<Extension>, DecodeError> {
    use minicbor::data::Type;
    if r.is_int()? {
        let v = r.int("Extensions (keyUsage)")?;
        if v == 0 {
            return Err(DecodeError::Invalid("keyUsage without bits"));
        }
        if v.unsigned_abs() > 0x1FF {
            return Err(DecodeError::OutOfRange("keyUsage"));
        }
        return Ok(vec![Extension {
            critical: v < 0,
            value: ExtensionValue::KeyUsage(v.unsigned_abs()),
        }]);
    }
    let n = r.array("Extensions")?;
    if n % 2 != 0 {
        return Err(DecodeError::Length("Extensions (pairs)"));
    }
    let mut out = Vec::with_capacity(n / 2);
    for _ in 0..n / 2 {
        if !r.is_int()? {
            let oid = r.bytes("extensionID ~oid")?.to_vec();
            check_oid(&oid)?;
            // Draft -20 Section 3.3: a re-encoded (type 3) item may carry a registered
            // extension in the OID form (e.g. issued before the registration); a natively
            // signed one MUST use the specific encoding where this crate has it.
            if !strict {
                if let Some((_, _, true)) = const_oid::ObjectIdentifier::from_bytes(&oid)
                    .ok()
                    .and_then(|o| registry::ext_by_oid(&o))
                {
                    return Err(DecodeError::NotDeterministic(
                        "registered extension in the OID form in a natively signed item",
                    ));
                }
            }
            let (critical, value) = if matches!(r.peek()?, Type::Array | Type::ArrayIndef) {
                if r.array("critical extnValue")? != 1 {
                    return Err(DecodeError::Length("critical extnValue"));
                }
                (true, r.bytes("extnValue")?.to_vec())
            } else {
                (false, r.bytes("extnValue")?.to_vec())
            };
            out.push(Extension {
                critical,
                value: ExtensionValue::Generic { oid, value },
            });
            continue;
        }
        let id = registry_int(r, "extensionID")?;
        let critical = id < 0;
        let value = match id.unsigned_abs() {
            1 => ExtensionValue::SubjectKeyIdentifier(r.bytes("subjectKeyIdentifier")?.to_vec()),
            2 => {
                let v = r.uint("keyUsage")?;
                if v == 0 || v > 0x1FF {
                    return Err(DecodeError::OutOfRange("keyUsage"));
                }
                ExtensionValue::KeyUsage(v)
            }
            3 => ExtensionValue::SubjectAltName(decode_general_names(r, true, strict)?),
            4 => ExtensionValue::BasicConstraints(match r.int("basicConstraints")? {
                -2 => BasicConstraints::NotCa,
                -1 => BasicConstraints::Ca { path_len: None },
                p if p >= 0 => BasicConstraints::Ca {
                    path_len: Some(p.unsigned_abs()),
                },
                _ => return Err(DecodeError::OutOfRange("basicConstraints")),
            }),
            7 => {
                if matches!(r.peek()?, Type::Bytes | Type::BytesIndef) {
                    ExtensionValue::AuthorityKeyIdentifier(AuthorityKeyIdentifier {
                        key_identifier: r.bytes("keyIdentifier")?.to_vec(),
                        issuer_and_serial: None,
                    })
                } else {
                    if r.array("KeyIdentifierArray")? != 3 {
                        return Err(DecodeError::Length("KeyIdentifierArray"));
                    }
                    let key_identifier = r.bytes("keyIdentifier")?.to_vec();
                    let names = decode_general_names(r, false, strict)?;
                    let serial = r.bytes("authorityCertSerialNumber")?.to_vec();
                    check_biguint(&serial)?;
                    ExtensionValue::AuthorityKeyIdentifier(AuthorityKeyIdentifier {
                        key_identifier,
                        issuer_and_serial: Some((names, serial)),
                    })
                }
            }
            8 => {
                let mut purposes = Vec::new();
                let count = if matches!(r.peek()?, Type::Array | Type::ArrayIndef) {
                    let c = r.array("ExtKeyUsageSyntax")?;
                    if c < 2 {
                        return Err(DecodeError::NotDeterministic(
                            "single KeyPurposeId must not be wrapped in an array",
                        ));
                    }
                    c
                } else {
                    1
                };
                for _ in 0..count {
                    if r.is_int()? {
                        let v = registry_int(r, "KeyPurposeId")?;
                        if registry::eku_by_value(v).is_none() {
                            return Err(DecodeError::UnsupportedValue {
                                registry: "C509 Extended Key Usages",
                                value: v,
                            });
                        }
                        purposes.push(KeyPurpose::Int(v));
                    } else {
                        let o = r.bytes("KeyPurposeId ~oid")?.to_vec();
                        check_oid(&o)?;
                        purposes.push(KeyPurpose::Oid(o));
                    }
                }
                ExtensionValue::ExtKeyUsage(purposes)
            }
            25 => ExtensionValue::IssuerAltName(decode_general_names(r, true, strict)?),
            30 => ExtensionValue::InhibitAnyPolicy(r.uint("inhibitAnyPolicy")?),
            36 => {
                r.null()?;
                ExtensionValue::OcspNoCheck
            }
            _ => {
                return Err(DecodeError::UnsupportedValue {
                    registry: "C509 Extensions",
                    value: id,
                })
            }
        };
        out.push(Extension { critical, value });
    }
    if let [Extension {
        value: ExtensionValue::KeyUsage(_),
        ..
    }] = out.as_slice()
    {
        return Err(DecodeError::NotDeterministic(
            "keyUsage as only extension must be a single int",
        ));
    }
    Ok(out)
}

/// `~biguint` must not have leading zero bytes (deterministic encoding).
pub(crate) fn check_biguint(b: &[u8]) -> Result<(), DecodeError> {
    if b.first() == Some(&0) {
        return Err(DecodeError::NotDeterministic("leading zero in ~biguint"));
    }
    Ok(())
}

/// The TBSCertificate CBOR sequence (Section 3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TbsCertificate {
    /// c509CertificateType: 2 natively signed, 3 re-encoded X.509.
    pub certificate_type: i64,
    /// certificateSerialNumber (unsigned big-endian, no leading zeros).
    pub serial_number: Vec<u8>,
    /// issuerSignatureAlgorithm.
    pub issuer_signature_algorithm: AlgorithmIdentifier,
    /// issuer; `None` encodes null (issuer equal to subject).
    pub issuer: Option<Name>,
    /// validityNotBefore, POSIX seconds.
    pub not_before: u64,
    /// validityNotAfter, POSIX seconds; `None` = 99991231235959Z (null).
    pub not_after: Option<u64>,
    /// subject.
    pub subject: Name,
    /// subjectPublicKeyAlgorithm.
    pub subject_public_key_algorithm: AlgorithmIdentifier,
    /// subjectPublicKey (byte-string form; point-compressed for EC keys where possible).
    pub subject_public_key: Vec<u8>,
    /// extensions.
    pub extensions: Vec<Extension>,
}

impl TbsCertificate {
    /// Encode the TBSCertificate CBOR sequence (what a natively signed certificate signs).
    pub fn to_cbor_sequence(&self) -> Vec<u8> {
        let mut e = cbor::encoder();
        // In-memory encoding cannot fail; an error would only drop bytes.
        let _ = self.encode(&mut e);
        e.into_writer()
    }

    fn encode(&self, e: &mut Enc) -> EncResult {
        e.i64(self.certificate_type)?;
        e.bytes(&self.serial_number)?;
        self.issuer_signature_algorithm.encode(e)?;
        match &self.issuer {
            None => {
                e.null()?;
            }
            Some(n) => n.encode(e)?,
        }
        e.u64(self.not_before)?;
        match self.not_after {
            None => e.null()?,
            Some(t) => e.u64(t)?,
        };
        self.subject.encode(e)?;
        self.subject_public_key_algorithm.encode(e)?;
        e.bytes(&self.subject_public_key)?;
        encode_extensions(e, &self.extensions)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let certificate_type = registry_int(r, "c509CertificateType")?;
        if certificate_type != 2 && certificate_type != 3 {
            return Err(DecodeError::UnsupportedValue {
                registry: "C509 Certificate Types",
                value: certificate_type,
            });
        }
        let strict = certificate_type == 3;
        let serial_number = r.bytes("certificateSerialNumber")?.to_vec();
        check_biguint(&serial_number)?;
        let issuer_signature_algorithm = AlgorithmIdentifier::decode(r)?;
        let issuer = if r.is_null()? {
            r.null()?;
            None
        } else {
            Some(Name::decode(r, strict)?)
        };
        let not_before = r.uint("validityNotBefore")?;
        let not_after = if r.is_null()? {
            r.null()?;
            None
        } else {
            match r.uint("validityNotAfter")? {
                NO_EXPIRY_SECONDS => {
                    return Err(DecodeError::NotDeterministic(
                        "99991231235959Z must be encoded as null",
                    ))
                }
                t => Some(t),
            }
        };
        let subject = Name::decode(r, strict)?;
        let subject_public_key_algorithm = AlgorithmIdentifier::decode(r)?;
        let subject_public_key = r.bytes("subjectPublicKey")?.to_vec();
        let extensions = decode_extensions(r, strict)?;
        Ok(TbsCertificate {
            certificate_type,
            serial_number,
            issuer_signature_algorithm,
            issuer,
            not_before,
            not_after,
            subject,
            subject_public_key_algorithm,
            subject_public_key,
            extensions,
        })
    }
}

/// A whole C509 certificate: TBS plus issuerSignatureValue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C509Certificate {
    /// TBSCertificate.
    pub tbs: TbsCertificate,
    /// issuerSignatureValue (r||s for ECDSA).
    pub signature: Vec<u8>,
}

/// Number of items in the C509Certificate array.
const CERT_ITEMS: usize = 11;

impl C509Certificate {
    /// Encode as the unwrapped CBOR sequence `~C509Certificate`.
    pub fn to_sequence(&self) -> Vec<u8> {
        let mut out = self.tbs.to_cbor_sequence();
        let mut e = cbor::encoder();
        let _ = e.bytes(&self.signature);
        out.extend_from_slice(&e.into_writer());
        out
    }

    /// Encode as the CBOR array `C509Certificate`.
    pub fn to_array(&self) -> Vec<u8> {
        let mut out = vec![0x80 | CERT_ITEMS as u8];
        out.extend_from_slice(&self.to_sequence());
        out
    }

    /// Decode the CBOR sequence `~C509Certificate` (exactly, no trailing bytes).
    pub fn from_sequence(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes)?;
        let c = Self::decode_items(&mut r)?;
        r.finish()?;
        c.check_canonical(bytes, false)?;
        Ok(c)
    }

    /// Decode the CBOR array `C509Certificate`.
    pub fn from_array(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes)?;
        if r.array("C509Certificate")? != CERT_ITEMS {
            return Err(DecodeError::Length("C509Certificate"));
        }
        let c = Self::decode_items(&mut r)?;
        r.finish()?;
        c.check_canonical(bytes, true)?;
        Ok(c)
    }

    /// Decode either form: an array header selects `C509Certificate`,
    /// anything else is read as `~C509Certificate`.
    pub fn from_either(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.first().is_some_and(|b| b >> 5 == 4) {
            Self::from_array(bytes)
        } else {
            Self::from_sequence(bytes)
        }
    }

    fn decode_items(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let tbs = TbsCertificate::decode(r)?;
        let signature = r.bytes("issuerSignatureValue")?.to_vec();
        Ok(C509Certificate { tbs, signature })
    }

    fn check_canonical(&self, input: &[u8], array: bool) -> Result<(), DecodeError> {
        let again = if array {
            self.to_array()
        } else {
            self.to_sequence()
        };
        if again != input {
            return Err(DecodeError::NotDeterministic("C509Certificate"));
        }
        Ok(())
    }
}

/// One CR attribute (Section 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrAttribute {
    /// 0 extensionRequest: Extensions.
    ExtensionRequest(Vec<Extension>),
    /// 1 challengePassword: text (utf8String) or tag 121 (printableString).
    ChallengePassword {
        /// true when tagged 121 (PrintableString in DER).
        printable: bool,
        /// The password.
        password: String,
    },
    /// `(attributeType: ~oid, attributeValue: bytes)`; bytes = DER TLV of the single value.
    Unregistered {
        /// OID content bytes.
        oid: Vec<u8>,
        /// DER TLV of the attribute's single value.
        value: Vec<u8>,
    },
}

/// TBSCertificationRequest CBOR sequence (Section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TbsCertificationRequest {
    /// c509CertificationRequestType: 2 natively signed, 3 re-encoded PKCS#10.
    pub request_type: i64,
    /// subjectSignatureAlgorithm.
    pub subject_signature_algorithm: AlgorithmIdentifier,
    /// subject.
    pub subject: Name,
    /// subjectPublicKeyAlgorithm.
    pub subject_public_key_algorithm: AlgorithmIdentifier,
    /// subjectPublicKey.
    pub subject_public_key: Vec<u8>,
    /// attributes.
    pub attributes: Vec<CrAttribute>,
}

/// Number of items in the C509CertificationRequest array.
const CSR_ITEMS: usize = 7;

impl TbsCertificationRequest {
    /// Encode the TBS CBOR sequence (what a natively signed request signs).
    pub fn to_cbor_sequence(&self) -> Vec<u8> {
        let mut e = cbor::encoder();
        let _ = self.encode(&mut e);
        e.into_writer()
    }

    fn encode(&self, e: &mut Enc) -> EncResult {
        e.i64(self.request_type)?;
        self.subject_signature_algorithm.encode(e)?;
        self.subject.encode(e)?;
        self.subject_public_key_algorithm.encode(e)?;
        e.bytes(&self.subject_public_key)?;
        e.array(2 * self.attributes.len() as u64)?;
        for a in &self.attributes {
            match a {
                CrAttribute::ExtensionRequest(x) => {
                    e.i64(0)?;
                    encode_extensions(e, x)?;
                }
                CrAttribute::ChallengePassword {
                    printable,
                    password,
                } => {
                    e.i64(1)?;
                    if *printable {
                        cbor::tag(e, TAG_PRINTABLE_PASSWORD)?;
                    }
                    e.str(password)?;
                }
                CrAttribute::Unregistered { oid, value } => {
                    e.bytes(oid)?.bytes(value)?;
                }
            }
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        use minicbor::data::Type;
        let request_type = registry_int(r, "c509CertificationRequestType")?;
        if request_type != 2 && request_type != 3 {
            return Err(DecodeError::UnsupportedValue {
                registry: "C509 Certification Request Types",
                value: request_type,
            });
        }
        let strict = request_type == 3;
        let subject_signature_algorithm = AlgorithmIdentifier::decode(r)?;
        let subject = Name::decode(r, strict)?;
        let subject_public_key_algorithm = AlgorithmIdentifier::decode(r)?;
        let subject_public_key = r.bytes("subjectPublicKey")?.to_vec();
        let n = r.array("CRAttributes")?;
        if n % 2 != 0 {
            return Err(DecodeError::Length("CRAttributes (pairs)"));
        }
        let mut attributes = Vec::with_capacity(n / 2);
        for _ in 0..n / 2 {
            if !r.is_int()? {
                let oid = r.bytes("CRAttribute ~oid")?.to_vec();
                check_oid(&oid)?;
                let value = r.bytes("CRAttribute value")?.to_vec();
                attributes.push(CrAttribute::Unregistered { oid, value });
                continue;
            }
            match registry_int(r, "CRAttribute type")? {
                0 => attributes.push(CrAttribute::ExtensionRequest(decode_extensions(r, strict)?)),
                1 => {
                    let printable = if matches!(r.peek()?, Type::Tag) {
                        if r.tag("ChallengePassword")? != TAG_PRINTABLE_PASSWORD {
                            return Err(DecodeError::Invalid("ChallengePassword tag"));
                        }
                        if request_type == 2 {
                            return Err(DecodeError::Invalid(
                                "printableString challengePassword in a natively signed request",
                            ));
                        }
                        true
                    } else {
                        false
                    };
                    let password = r.text("ChallengePassword")?.to_owned();
                    attributes.push(CrAttribute::ChallengePassword {
                        printable,
                        password,
                    });
                }
                v => {
                    return Err(DecodeError::UnsupportedValue {
                        registry: "C509 CR Attributes",
                        value: v,
                    })
                }
            }
        }
        Ok(TbsCertificationRequest {
            request_type,
            subject_signature_algorithm,
            subject,
            subject_public_key_algorithm,
            subject_public_key,
            attributes,
        })
    }
}

/// A whole C509 certification request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C509CertificationRequest {
    /// TBS part.
    pub tbs: TbsCertificationRequest,
    /// subjectSignatureValue (r||s for ECDSA).
    pub signature: Vec<u8>,
}

impl C509CertificationRequest {
    /// Encode as the CBOR array `C509CertificationRequest` (media type
    /// application/cose-c509-pkcs10+cbor).
    pub fn to_array(&self) -> Vec<u8> {
        let mut out = vec![0x80 | CSR_ITEMS as u8];
        out.extend_from_slice(&self.tbs.to_cbor_sequence());
        let mut e = cbor::encoder();
        let _ = e.bytes(&self.signature);
        out.extend_from_slice(&e.into_writer());
        out
    }

    /// Decode the CBOR array `C509CertificationRequest`, strictly.
    pub fn from_array(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes)?;
        if r.array("C509CertificationRequest")? != CSR_ITEMS {
            return Err(DecodeError::Length("C509CertificationRequest"));
        }
        let tbs = TbsCertificationRequest::decode(&mut r)?;
        let signature = r.bytes("subjectSignatureValue")?.to_vec();
        r.finish()?;
        let c = C509CertificationRequest { tbs, signature };
        if c.to_array() != bytes {
            return Err(DecodeError::NotDeterministic("C509CertificationRequest"));
        }
        Ok(c)
    }
}
