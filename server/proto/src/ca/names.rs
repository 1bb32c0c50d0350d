//! Names: RFC 4108 hardwareModuleName, X.520 attribute helpers.

use const_oid::ObjectIdentifier;
use der::asn1::{OctetString, PrintableStringRef, SetOfVec, Utf8StringRef};
use der::{Any, Decode, Tag, Tagged};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::pkix::name::{GeneralName, OtherName};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::Certificate;

use super::error::CaError;
use super::oid;

/// RFC 4108 §5 `HardwareModuleName`, carried as an `otherName` (type-id id-on-hardwareModuleName,
/// 1.3.6.1.5.5.7.8.4) in subjectAltName. IEEE 802.1AR DevIDs use it to name the device:
///
/// ```text
/// HardwareModuleName ::= SEQUENCE {
///     hwType OBJECT IDENTIFIER,
///     hwSerialNum OCTET STRING }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, der::Sequence)]
pub struct HardwareModuleName {
    /// Hardware type (a vendor OID naming the device model).
    pub hw_type: ObjectIdentifier,
    /// Hardware serial number, as opaque octets.
    pub hw_serial_num: OctetString,
}

impl HardwareModuleName {
    /// Build from a type OID and serial number octets.
    pub fn new(hw_type: ObjectIdentifier, hw_serial_num: &[u8]) -> Result<Self, CaError> {
        Ok(Self {
            hw_type,
            hw_serial_num: OctetString::new(hw_serial_num)?,
        })
    }

    /// The `otherName` GeneralName carrying this value (RFC 4108 §5, RFC 5280 §4.2.1.6).
    pub fn to_general_name(&self) -> Result<GeneralName, CaError> {
        Ok(GeneralName::OtherName(OtherName {
            type_id: oid::HARDWARE_MODULE_NAME,
            value: Any::encode_from(self)?,
        }))
    }
}

/// The first hardwareModuleName in a subjectAltName, if any; an otherName with that type-id whose
/// value does not decode is an error.
pub(crate) fn hardware_module_in_san(
    san: &SubjectAltName,
) -> Result<Option<HardwareModuleName>, der::Error> {
    for gn in &san.0 {
        if let GeneralName::OtherName(on) = gn {
            if on.type_id == oid::HARDWARE_MODULE_NAME {
                return on.value.decode_as::<HardwareModuleName>().map(Some);
            }
        }
    }
    Ok(None)
}

/// The subjectAltName extension of a certificate, decoded, if present.
pub fn subject_alt_name_from_cert(cert: &Certificate) -> Result<Option<SubjectAltName>, CaError> {
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return Ok(None);
    };
    for ext in exts {
        if ext.extn_id == oid::CE_SUBJECT_ALT_NAME {
            return Ok(Some(SubjectAltName::from_der(ext.extn_value.as_bytes())?));
        }
    }
    Ok(None)
}

/// The RFC 4108 hardwareModuleName in the certificate's subjectAltName (IEEE 802.1AR IDevID/LDevID),
/// or `None` when absent or undecodable.
pub fn hardware_module_from_cert(cert: &Certificate) -> Option<HardwareModuleName> {
    let san = subject_alt_name_from_cert(cert).ok()??;
    hardware_module_in_san(&san).ok()?
}

/// The RFC 4514 string of `name`, exactly as x509-cert's `Display` writes it (the store's
/// `subject` column and the audit trail hold it).
///
/// x509-cert looks each attribute's short name up with a scan of const-oid's whole OID
/// database: 6 µs per issued certificate in the server's profile at 64 meters
/// (docs/benchmarks.md, "The store's writer thread"). Here the names of the attributes that certificates of this server carry are
/// looked up once; any other attribute, or a value that is not a directory string, is
/// written by x509-cert itself.
pub fn name_string(name: &Name) -> String {
    let mut out = String::with_capacity(64);
    for (i, rdn) in name.0.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.0.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match (known_attribute_name(&atv.oid), display_value(&atv.value)) {
                (Some(key), Some(value)) => {
                    out.push_str(key);
                    out.push('=');
                    escape_rfc4514(&mut out, value);
                }
                _ => out.push_str(&atv.to_string()),
            }
        }
    }
    out
}

/// The attributes of X.520 and RFC 4519 that subjects commonly carry, whose names
/// [`name_string`] looks up once.
const KNOWN_ATTRIBUTES: [ObjectIdentifier; 14] = {
    use const_oid::db::rfc4519;
    [
        rfc4519::CN,
        rfc4519::SERIAL_NUMBER,
        rfc4519::O,
        rfc4519::OU,
        rfc4519::C,
        rfc4519::L,
        rfc4519::ST,
        rfc4519::STREET,
        rfc4519::DC,
        rfc4519::UID,
        rfc4519::TITLE,
        rfc4519::SN,
        rfc4519::GIVEN_NAME,
        const_oid::db::rfc3280::EMAIL_ADDRESS,
    ]
};

/// The upper-cased shortest name const-oid's database gives the attribute, for
/// [`KNOWN_ATTRIBUTES`]; `None` for any other.
fn known_attribute_name(attr: &ObjectIdentifier) -> Option<&'static str> {
    static NAMES: std::sync::OnceLock<Vec<(ObjectIdentifier, String)>> = std::sync::OnceLock::new();
    NAMES
        .get_or_init(|| {
            KNOWN_ATTRIBUTES
                .into_iter()
                .filter_map(|oid| {
                    // The first of the shortest, as x509-cert picks it.
                    let name = const_oid::db::DB
                        .find_names_for_oid(oid)
                        .reduce(|best, n| if n.len() < best.len() { n } else { best })?;
                    Some((oid, name.to_ascii_uppercase()))
                })
                .collect()
        })
        .iter()
        .find(|(oid, _)| oid == attr)
        .map(|(_, name)| name.as_str())
}

/// The text of a PrintableString, UTF8String, IA5String or TeletexString value (the string
/// types x509-cert writes as text); `None` for any other value.
fn display_value(value: &Any) -> Option<&str> {
    use der::asn1::{Ia5StringRef, TeletexStringRef};
    match value.tag() {
        Tag::PrintableString => PrintableStringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::Utf8String => Utf8StringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::TeletexString => TeletexStringRef::try_from(value).ok().map(|s| s.as_str()),
        _ => None,
    }
}

/// Append `value` with the escapes of RFC 4514 §2.4: a leading '#' or space, a trailing
/// space, the special characters `" + , ; < > \`, and control characters as `\xx`.
fn escape_rfc4514(out: &mut String, value: &str) {
    let last = value.char_indices().last().map(|(i, _)| i);
    for (i, c) in value.char_indices() {
        match c {
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || Some(i) == last => out.push_str("\\ "),
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\x00'..='\x1f' | '\x7f' => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\{:02x}", c as u8);
            }
            _ => out.push(c),
        }
    }
}

/// Text of a directory string attribute value (UTF8String, PrintableString, IA5String; TeletexString
/// only when ASCII; BMPString decoded from UTF-16BE).
fn attr_value_string(value: &Any) -> Option<String> {
    let bytes = value.value();
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::VisibleString => {
            std::str::from_utf8(bytes).ok().map(str::to_owned)
        }
        Tag::TeletexString if bytes.is_ascii() => {
            std::str::from_utf8(bytes).ok().map(str::to_owned)
        }
        Tag::BmpString => {
            if !bytes.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .filter_map(|c| <[u8; 2]>::try_from(c).ok())
                .map(u16::from_be_bytes)
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// The most specific (last in RDNSequence order, i.e. leftmost in the RFC 4514 string form) value of
/// attribute `attr` in `name`, as text.
fn last_attr(name: &Name, attr: ObjectIdentifier) -> Option<String> {
    name.0
        .iter()
        .rev()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == attr)
        .and_then(|atv| attr_value_string(&atv.value))
}

/// The most specific value of attribute `attr` in `name`, as text (directory strings only).
pub fn attribute_text(name: &Name, attr: ObjectIdentifier) -> Option<String> {
    last_attr(name, attr)
}

/// The X.520 serialNumber (2.5.4.5) of a name (802.1AR puts the device serial there).
pub fn serial_number_attr(name: &Name) -> Option<String> {
    last_attr(name, oid::AT_SERIAL_NUMBER)
}

/// The commonName (2.5.4.3) of a name; with several, the most specific one (RFC 7925 §4.4.2 "leftmost").
pub fn common_name(name: &Name) -> Option<String> {
    last_attr(name, oid::AT_COMMON_NAME)
}

/// The organizationName (2.5.4.10) of a name.
pub fn organization(name: &Name) -> Option<String> {
    last_attr(name, oid::AT_ORGANIZATION_NAME)
}

/// Build a Name with one single-valued RDN per `(attribute, value)`, in the order given (most
/// significant first, e.g. C, O, CN). countryName and serialNumber are PrintableString as X.520
/// requires (RFC 5280 App. A); everything else is UTF8String (RFC 5280 §4.1.2.6).
pub fn name_from_attrs(attrs: &[(ObjectIdentifier, &str)]) -> Result<Name, CaError> {
    let mut rdns = Vec::with_capacity(attrs.len());
    for (attr, value) in attrs {
        if value.is_empty() {
            return Err(CaError::InvalidName(format!("empty value for {attr}")));
        }
        let any = if *attr == oid::AT_COUNTRY_NAME || *attr == oid::AT_SERIAL_NUMBER {
            let s = PrintableStringRef::new(value).map_err(|_| {
                CaError::InvalidName(format!("{value:?} is not a PrintableString (for {attr})"))
            })?;
            Any::encode_from(&s)?
        } else {
            Any::encode_from(&Utf8StringRef::new(value)?)?
        };
        let mut set = SetOfVec::new();
        set.insert(AttributeTypeAndValue {
            oid: *attr,
            value: any,
        })?;
        rdns.push(RelativeDistinguishedName(set));
    }
    Ok(RdnSequence(rdns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atv(oid: ObjectIdentifier, value: Any) -> AttributeTypeAndValue {
        AttributeTypeAndValue { oid, value }
    }

    fn text(tag: Tag, s: &str) -> Any {
        Any::new(tag, s.as_bytes()).unwrap()
    }

    /// `name_string` writes what x509-cert's `Display` writes, for every attribute this
    /// server puts in subjects, the escapes of RFC 4514 §2.4, multi-valued RDNs, and the
    /// attributes and values it hands back to x509-cert.
    #[test]
    fn name_string_is_x509_certs_display() {
        use const_oid::db::rfc4519;
        let utf8 = |s: &str| text(Tag::Utf8String, s);
        let printable = |s: &str| text(Tag::PrintableString, s);
        let mut names: Vec<Name> = vec![
            RdnSequence(vec![]),
            name_from_attrs(&[
                (rfc4519::C, "DE"),
                (rfc4519::O, "Stadtwerke Musterstadt"),
                (rfc4519::OU, "Metering"),
                (rfc4519::CN, "ESTLT00000042"),
                (rfc4519::SERIAL_NUMBER, "ESTLT00000042"),
            ])
            .unwrap(),
        ];
        let values = [
            "plain",
            "#leading hash",
            "inner # hash",
            " leading space",
            "trailing space ",
            " ",
            "",
            "a\"b+c,d;e<f>g\\h",
            "ctl\u{1}\u{1f}\u{7f}end",
            "Zähler €",
            "x",
        ];
        // Every attribute of the table, and two that x509-cert writes itself.
        let attrs = KNOWN_ATTRIBUTES.into_iter().chain([
            rfc4519::POSTAL_CODE,
            ObjectIdentifier::new_unwrap("1.3.6.1.4.1.55555.1"),
        ]);
        for attr in attrs {
            for v in values {
                names.push(RdnSequence(vec![RelativeDistinguishedName(
                    SetOfVec::try_from(vec![atv(attr, utf8(v))]).unwrap(),
                )]));
            }
        }
        let mut odd = vec![
            atv(rfc4519::CN, text(Tag::Ia5String, "ia5 #,")),
            atv(rfc4519::CN, text(Tag::TeletexString, "teletex")),
            atv(rfc4519::C, printable("DE")),
            // Not a directory string: written as #hex by x509-cert.
            atv(
                rfc4519::CN,
                Any::new(Tag::OctetString, [1u8, 2, 3].as_slice()).unwrap(),
            ),
            atv(
                rfc4519::CN,
                Any::new(Tag::BmpString, [0u8, 0x41].as_slice()).unwrap(),
            ),
            // Not valid for its tag: x509-cert falls back to #hex, and so does name_string.
            atv(
                rfc4519::CN,
                Any::new(Tag::Utf8String, [0xffu8].as_slice()).unwrap(),
            ),
            atv(
                rfc4519::CN,
                Any::new(Tag::PrintableString, b"a@b".as_slice()).unwrap(),
            ),
        ];
        for a in odd.drain(..) {
            names.push(RdnSequence(vec![RelativeDistinguishedName(
                SetOfVec::try_from(vec![a]).unwrap(),
            )]));
        }
        // A multi-valued RDN beside single-valued ones.
        names.push(RdnSequence(vec![
            RelativeDistinguishedName(
                SetOfVec::try_from(vec![atv(rfc4519::C, printable("NL"))]).unwrap(),
            ),
            RelativeDistinguishedName(
                SetOfVec::try_from(vec![
                    atv(rfc4519::CN, utf8("meter")),
                    atv(rfc4519::SERIAL_NUMBER, printable("SN1")),
                ])
                .unwrap(),
            ),
        ]));
        for name in &names {
            assert_eq!(name_string(name), name.to_string(), "{name:?}");
        }
        assert_eq!(
            name_string(&names[1]),
            "SERIALNUMBER=ESTLT00000042,CN=ESTLT00000042,OU=Metering,O=Stadtwerke Musterstadt,C=DE"
        );
    }
}
