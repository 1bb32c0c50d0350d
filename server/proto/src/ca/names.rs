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
