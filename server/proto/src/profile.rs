//! Certificate profiles: what an issued LDevID says (curve accepted, issuing CA and signature
//! hash, validity, keyUsage, extKeyUsage, subject, subjectAltName) and which devices get
//! which profile (rules by manufacturer CA or device class, first match wins).
//!
//! The daemon's `[[profiles]]` configuration is turned into [`Profiles`] at start; devices
//! that no rule selects get the built-in LDevID profile of `[policy]` (today's behaviour), so
//! a configuration without profiles issues exactly what it did before.
//!
//! # Subject templates
//!
//! A subject is a list of `ATTR=VALUE` relative distinguished names, most significant first
//! (`["O=Example Utility", "CN={idevid.serialNumber}", "serialNumber={idevid.serialNumber}"]`).
//! `ATTR` is one of `C`, `ST`, `L`, `O`, `OU`, `CN`, `serialNumber`. `VALUE` is literal text
//! with placeholders `{SOURCE.ATTR}`, SOURCE `idevid` (the subject of the certificate the
//! meter authenticated with) or `csr` (the subject of its request), ATTR one of `CN`, `O`,
//! `OU`, `serialNumber`; `{{` and `}}` are literal braces. Anything else is refused when the
//! profile is loaded. Every template must contain `serialNumber={idevid.serialNumber}`
//! exactly: the server recognises the device by it at `/sren`. A placeholder whose attribute
//! is missing at issuance refuses the request (4.00 for the CSR, 4.03 for the IDevID).

use std::time::Duration;

use const_oid::ObjectIdentifier;
use der::asn1::{PrintableStringRef, SetOfVec, Utf8StringRef};
use der::Any;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};

use crate::ca::{self, oid, Curve, HardwareModuleName};

/// Which issuing CA signs, and so the signature algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureHash {
    /// The CA on the request key's curve: ecdsa-with-SHA256 (P-256 CA) for P-256 keys,
    /// ecdsa-with-SHA384 (P-384 CA) for P-384 keys. The built-in behaviour.
    Auto,
    /// ecdsa-with-SHA256: the P-256 issuing CA, whatever the key's curve.
    Sha256,
    /// ecdsa-with-SHA384: the P-384 issuing CA (`[ca_p384]`), whatever the key's curve.
    Sha384,
}

impl SignatureHash {
    /// The curve of the CA that signs a request key on `key`.
    pub fn ca_curve(self, key: Curve) -> Curve {
        match self {
            SignatureHash::Auto => key,
            SignatureHash::Sha256 => Curve::P256,
            SignatureHash::Sha384 => Curve::P384,
        }
    }
}

impl std::str::FromStr for SignatureHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "auto" => Ok(SignatureHash::Auto),
            "SHA-256" | "sha256" => Ok(SignatureHash::Sha256),
            "SHA-384" | "sha384" => Ok(SignatureHash::Sha384),
            other => Err(format!(
                "unknown signature hash {other:?} (\"auto\", \"SHA-256\" or \"SHA-384\")"
            )),
        }
    }
}

/// Where the certificate's subjectAltName (an RFC 4108 hardwareModuleName, the only SAN the
/// server reads) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanPolicy {
    /// No subjectAltName.
    None,
    /// The hardwareModuleName of the IDevID (the built-in behaviour).
    Idevid,
    /// The hardwareModuleName of the CSR; refused (4.03) when the IDevID carries a different
    /// one; none when the CSR has none.
    Csr,
}

impl std::str::FromStr for SanPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SanPolicy::None),
            "idevid" => Ok(SanPolicy::Idevid),
            "csr" => Ok(SanPolicy::Csr),
            other => Err(format!(
                "unknown SAN handling {other:?} (\"none\", \"idevid\" or \"csr\")"
            )),
        }
    }
}

/// Why a profile definition is refused (at load).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("subject: {0}")]
    Subject(String),
    #[error("key_usage: {0}")]
    KeyUsage(String),
    #[error("extended_key_usage: {0}")]
    ExtendedKeyUsage(String),
}

/// A subject attribute a template may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attr {
    name: &'static str,
    oid: ObjectIdentifier,
}

const SUBJECT_ATTRS: [Attr; 7] = [
    Attr {
        name: "C",
        oid: oid::AT_COUNTRY_NAME,
    },
    Attr {
        name: "ST",
        oid: ObjectIdentifier::new_unwrap("2.5.4.8"),
    },
    Attr {
        name: "L",
        oid: ObjectIdentifier::new_unwrap("2.5.4.7"),
    },
    Attr {
        name: "O",
        oid: oid::AT_ORGANIZATION_NAME,
    },
    Attr {
        name: "OU",
        oid: oid::AT_ORGANIZATIONAL_UNIT_NAME,
    },
    Attr {
        name: "CN",
        oid: oid::AT_COMMON_NAME,
    },
    Attr {
        name: "serialNumber",
        oid: oid::AT_SERIAL_NUMBER,
    },
];

/// The attributes a placeholder may read.
const PLACEHOLDER_ATTRS: [&str; 4] = ["CN", "O", "OU", "serialNumber"];

fn attr_named(name: &str) -> Option<Attr> {
    SUBJECT_ATTRS.iter().copied().find(|a| a.name == name)
}

/// Whose subject a placeholder reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The authenticated client certificate (the IDevID at `/sen`).
    Idevid,
    /// The certification request.
    Csr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Source, Attr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rdn {
    attr: Attr,
    value: Vec<Piece>,
}

/// A parsed subject template (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectTemplate {
    rdns: Vec<Rdn>,
}

/// Why a template cannot be filled in for one request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("the certificate profile's subject needs {0} from the CSR's subject, which has none")]
    CsrField(&'static str),
    #[error("the certificate profile's subject needs {0} from the client certificate's subject, which has none")]
    IdevidField(&'static str),
    #[error("subject {attr}: {why}")]
    Value { attr: &'static str, why: String },
}

impl SubjectTemplate {
    /// Parse `ATTR=VALUE` entries; refuses unknown attributes and placeholders, unbalanced
    /// braces, an empty template and one without `serialNumber={idevid.serialNumber}`.
    pub fn parse(entries: &[String]) -> Result<Self, ProfileError> {
        let bad = |m: String| ProfileError::Subject(m);
        if entries.is_empty() {
            return Err(bad("must name at least one attribute".into()));
        }
        let mut rdns = Vec::with_capacity(entries.len());
        for e in entries {
            let (name, value) = e
                .split_once('=')
                .ok_or_else(|| bad(format!("{e:?} is not ATTR=VALUE")))?;
            let attr = attr_named(name.trim()).ok_or_else(|| {
                bad(format!(
                    "unknown attribute {name:?} in {e:?} (C, ST, L, O, OU, CN, serialNumber)"
                ))
            })?;
            let value = parse_value(value).map_err(|m| bad(format!("{e:?}: {m}")))?;
            if value.is_empty() {
                return Err(bad(format!("{e:?}: empty value")));
            }
            rdns.push(Rdn { attr, value });
        }
        let identity = rdns.iter().any(|r| {
            r.attr.name == "serialNumber"
                && r.value.len() == 1
                && matches!(r.value.first(), Some(Piece::Field(Source::Idevid, a)) if a.name == "serialNumber")
        });
        if !identity {
            return Err(bad(
                "must contain serialNumber={idevid.serialNumber}: the device is recognised by it \
                 at /sren"
                    .into(),
            ));
        }
        Ok(Self { rdns })
    }

    /// The subject for a request: `idevid` is the authenticated certificate's subject, `csr`
    /// the request's.
    pub fn fill(&self, idevid: &Name, csr: &Name) -> Result<Name, FillError> {
        let mut out = Vec::with_capacity(self.rdns.len());
        for rdn in &self.rdns {
            let mut value = String::new();
            for p in &rdn.value {
                match p {
                    Piece::Text(t) => value.push_str(t),
                    Piece::Field(src, a) => {
                        let (name, missing): (&Name, fn(&'static str) -> FillError) = match src {
                            Source::Idevid => (idevid, FillError::IdevidField),
                            Source::Csr => (csr, FillError::CsrField),
                        };
                        let v = attr_value(name, a.oid).ok_or(missing(a.name))?;
                        value.push_str(&v);
                    }
                }
            }
            out.push(make_rdn(rdn.attr, &value)?);
        }
        Ok(RdnSequence(out))
    }
}

fn attr_value(name: &Name, attr: ObjectIdentifier) -> Option<String> {
    ca::attribute_text(name, attr)
}

fn make_rdn(attr: Attr, value: &str) -> Result<RelativeDistinguishedName, FillError> {
    let bad = |why: String| FillError::Value {
        attr: attr.name,
        why,
    };
    if value.is_empty() || value.len() > 64 {
        return Err(bad("must be 1 to 64 characters".into()));
    }
    let any = if attr.oid == oid::AT_COUNTRY_NAME || attr.oid == oid::AT_SERIAL_NUMBER {
        let s = PrintableStringRef::new(value)
            .map_err(|_| bad(format!("{value:?} is not a PrintableString")))?;
        Any::encode_from(&s).map_err(|e| bad(e.to_string()))?
    } else {
        let s = Utf8StringRef::new(value).map_err(|e| bad(e.to_string()))?;
        Any::encode_from(&s).map_err(|e| bad(e.to_string()))?
    };
    let mut set = SetOfVec::new();
    set.insert(AttributeTypeAndValue {
        oid: attr.oid,
        value: any,
    })
    .map_err(|e| bad(e.to_string()))?;
    Ok(RelativeDistinguishedName(set))
}

fn parse_value(v: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '}' => return Err("unbalanced '}' (write }} for a literal brace)".into()),
            '{' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(
                                "unterminated placeholder (write {{ for a literal brace)".into()
                            )
                        }
                        Some(x) => inner.push(x),
                    }
                }
                let field = parse_placeholder(&inner)?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(field);
            }
            c if c.is_control() => return Err("control characters are not allowed".into()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn parse_placeholder(inner: &str) -> Result<Piece, String> {
    let unknown = || {
        format!(
            "unknown placeholder {{{inner}}} (idevid.X or csr.X, X one of {})",
            PLACEHOLDER_ATTRS.join(", ")
        )
    };
    let (src, attr) = inner.split_once('.').ok_or_else(unknown)?;
    let src = match src {
        "idevid" => Source::Idevid,
        "csr" => Source::Csr,
        _ => return Err(unknown()),
    };
    if !PLACEHOLDER_ATTRS.contains(&attr) {
        return Err(unknown());
    }
    let attr = attr_named(attr).ok_or_else(unknown)?;
    Ok(Piece::Field(src, attr))
}

/// keyUsage bits a profile may set (an EC end-entity key signs or agrees keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUsageBits {
    pub digital_signature: bool,
    pub key_agreement: bool,
}

impl KeyUsageBits {
    /// From names: `digitalSignature` (required), `keyAgreement`.
    pub fn parse(names: &[String]) -> Result<Self, ProfileError> {
        let mut ku = KeyUsageBits {
            digital_signature: false,
            key_agreement: false,
        };
        for n in names {
            match n.as_str() {
                "digitalSignature" => ku.digital_signature = true,
                "keyAgreement" => ku.key_agreement = true,
                other => {
                    return Err(ProfileError::KeyUsage(format!(
                        "unknown or unsupported bit {other:?} (digitalSignature, keyAgreement)"
                    )))
                }
            }
        }
        if !ku.digital_signature {
            return Err(ProfileError::KeyUsage(
                "must include digitalSignature: the meter signs its DTLS handshake with the \
                 certificate (at /sren), which keyUsage must allow (RFC 5246 §7.4.8)"
                    .into(),
            ));
        }
        Ok(ku)
    }
}

/// extKeyUsage purposes from names (`clientAuth`, `serverAuth`, `codeSigning`,
/// `emailProtection`, `timeStamping`, `OCSPSigning`) or dotted OIDs; `["none"]` or `[]` for no
/// extension. When present it must include clientAuth: the DTLS handshake of `/sren` requires
/// it of a client certificate that has an extKeyUsage.
pub fn parse_eku(names: &[String]) -> Result<Vec<ObjectIdentifier>, ProfileError> {
    let bad = |m: String| ProfileError::ExtendedKeyUsage(m);
    if names.len() == 1 && names.first().is_some_and(|n| n == "none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let o = match n.as_str() {
            "clientAuth" => oid::KP_CLIENT_AUTH,
            "serverAuth" => oid::KP_SERVER_AUTH,
            "codeSigning" => ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3"),
            "emailProtection" => ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.4"),
            "timeStamping" => ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8"),
            "OCSPSigning" => ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.9"),
            "none" => return Err(bad("\"none\" must be the only entry".into())),
            dotted => ObjectIdentifier::new(dotted).map_err(|_| {
                bad(format!(
                    "{dotted:?} is neither a known purpose (clientAuth, serverAuth, codeSigning, \
                     emailProtection, timeStamping, OCSPSigning) nor a dotted OID"
                ))
            })?,
        };
        if out.contains(&o) {
            return Err(bad(format!("{n:?} is listed twice")));
        }
        out.push(o);
    }
    if !out.is_empty() && !out.contains(&oid::KP_CLIENT_AUTH) {
        return Err(bad(
            "must include clientAuth (or be \"none\"): the meter could not re-enroll with a \
             certificate whose extKeyUsage lacks it"
                .into(),
        ));
    }
    Ok(out)
}

/// One certificate profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertProfile {
    /// Its name (for logs, the audit trail and diagnostics).
    pub name: String,
    /// Curves accepted for the request key; empty accepts P-256 and P-384.
    pub curves: Vec<Curve>,
    /// Which CA signs.
    pub signature_hash: SignatureHash,
    /// Validity; `None`: `[policy] ldevid_validity_days`.
    pub validity: Option<Duration>,
    /// keyUsage.
    pub key_usage: KeyUsageBits,
    /// extKeyUsage purposes, in order; empty: no extension.
    pub extended_key_usage: Vec<ObjectIdentifier>,
    /// Subject; `None`: the built-in LDevID subject of `[policy]`.
    pub subject: Option<SubjectTemplate>,
    /// subjectAltName handling.
    pub san: SanPolicy,
}

/// Why a request does not fit the profile selected for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProfileRefusal {
    #[error(
        "certificate profile {profile:?} accepts {accepted} keys only; the CSR's key is {got}"
    )]
    Curve {
        profile: String,
        accepted: String,
        got: String,
    },
}

impl CertProfile {
    /// Refuses a request key the profile does not accept.
    pub fn check_curve(&self, key: Option<Curve>) -> Result<(), ProfileRefusal> {
        if self.curves.is_empty() || key.is_some_and(|k| self.curves.contains(&k)) {
            return Ok(());
        }
        Err(ProfileRefusal::Curve {
            profile: self.name.clone(),
            accepted: self
                .curves
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(" or "),
            got: key.map_or("on another curve", |k| k.name()).to_owned(),
        })
    }

    /// The hardwareModuleName to put in subjectAltName, or a refusal (a CSR contradicting the
    /// IDevID under [`SanPolicy::Csr`]).
    pub fn subject_alt_name(
        &self,
        idevid: Option<&HardwareModuleName>,
        csr: Option<&HardwareModuleName>,
    ) -> Result<Option<HardwareModuleName>, crate::policy::PolicyError> {
        match self.san {
            SanPolicy::None => Ok(None),
            SanPolicy::Idevid => Ok(idevid.cloned()),
            SanPolicy::Csr => match (idevid, csr) {
                (Some(i), Some(c)) if i != c => {
                    Err(crate::policy::PolicyError::SubjectAltNameMismatch)
                }
                (_, c) => Ok(c.cloned()),
            },
        }
    }
}

/// What a selection rule matches; every field set must match.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Selector {
    /// SHA-256 fingerprints of the manufacturer CA certificates (trust anchors) one of which
    /// the meter's IDevID chain must end in; `None`: any.
    pub manufacturer_anchors: Option<Vec<[u8; 32]>>,
    /// Prefix of the device's serialNumber; `None`: any.
    pub serial_prefix: Option<String>,
}

/// The profiles and their selection rules.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Profiles {
    profiles: Vec<CertProfile>,
    /// (rule, index into `profiles`), first match wins.
    rules: Vec<(Selector, usize)>,
}

impl Profiles {
    /// Profiles with their rules (each rule names a profile by index); refuses an index out
    /// of range and duplicate names.
    pub fn new(profiles: Vec<CertProfile>, rules: Vec<(Selector, usize)>) -> Result<Self, String> {
        for (i, p) in profiles.iter().enumerate() {
            if profiles.iter().take(i).any(|q| q.name == p.name) {
                return Err(format!("profile {:?} is defined twice", p.name));
            }
        }
        if let Some((_, i)) = rules.iter().find(|(_, i)| *i >= profiles.len()) {
            return Err(format!("a rule names profile #{i}, which does not exist"));
        }
        Ok(Self { profiles, rules })
    }

    /// No profile configured.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// The profiles.
    pub fn profiles(&self) -> &[CertProfile] {
        &self.profiles
    }

    /// The profile named `name`, if one is configured (a re-enrollment keeps the profile its
    /// certificate was issued under).
    pub fn by_name(&self, name: &str) -> Option<&CertProfile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The profile of the first rule matching: the device's identity and, when it
    /// authenticated with an IDevID, the fingerprint of the manufacturer anchor its chain
    /// ends in (`None` at `/sren`, where only rules without a manufacturer CA can match).
    pub fn select(&self, device_id: &str, anchor: Option<&[u8; 32]>) -> Option<&CertProfile> {
        self.rules
            .iter()
            .find(|(s, _)| {
                let by_mfr = match &s.manufacturer_anchors {
                    None => true,
                    Some(set) => anchor.is_some_and(|a| set.contains(a)),
                };
                let by_serial = s
                    .serial_prefix
                    .as_ref()
                    .is_none_or(|p| device_id.starts_with(p.as_str()));
                by_mfr && by_serial
            })
            .and_then(|(_, i)| self.profiles.get(*i))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn name(attrs: &[(ObjectIdentifier, &str)]) -> Name {
        ca::name_from_attrs(attrs).unwrap()
    }

    #[test]
    fn subject_template_fills_in() {
        let t = SubjectTemplate::parse(&s(&[
            "O=Utility {{A}}",
            "OU=Meters",
            "CN=m-{idevid.serialNumber}-{csr.CN}",
            "serialNumber={idevid.serialNumber}",
        ]))
        .unwrap();
        let idevid = name(&[(oid::AT_SERIAL_NUMBER, "SN1")]);
        let csr = name(&[(oid::AT_COMMON_NAME, "east")]);
        let out = t.fill(&idevid, &csr).unwrap();
        assert_eq!(
            out.to_string(),
            "SERIALNUMBER=SN1,CN=m-SN1-east,OU=Meters,O=Utility {A}"
        );
        // A missing CSR field: refused, naming it.
        assert_eq!(
            t.fill(&idevid, &name(&[(oid::AT_ORGANIZATION_NAME, "x")])),
            Err(FillError::CsrField("CN"))
        );
        let t2 =
            SubjectTemplate::parse(&s(&["CN={idevid.O}", "serialNumber={idevid.serialNumber}"]))
                .unwrap();
        assert_eq!(t2.fill(&idevid, &csr), Err(FillError::IdevidField("O")));
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            &[][..],
            &["CN=x"][..],
            &["CN={idevid.serialNumber}"][..],
            &["serialNumber={idevid.serialNumber}", "CN={device}"][..],
            &["serialNumber={idevid.serialNumber}", "CN={csr.L}"][..],
            &["serialNumber={idevid.serialNumber}", "CN={meter.CN}"][..],
            &["serialNumber={idevid.serialNumber}", "CN={idevid.CN"][..],
            &["serialNumber={idevid.serialNumber}", "CN=a}b"][..],
            &["serialNumber={idevid.serialNumber}", "CN="][..],
            &["serialNumber={idevid.serialNumber}", "X=1"][..],
            &["serialNumber={idevid.serialNumber}", "CN"][..],
            &["serialNumber=S-{idevid.serialNumber}"][..],
            &["serialNumber={csr.serialNumber}"][..],
        ] {
            let v: Vec<String> = bad.iter().map(|x| x.to_string()).collect();
            assert!(SubjectTemplate::parse(&v).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filled_values_are_checked() {
        let t = SubjectTemplate::parse(&s(&["C={csr.CN}", "serialNumber={idevid.serialNumber}"]))
            .unwrap();
        let idevid = name(&[(oid::AT_SERIAL_NUMBER, "SN1")]);
        let csr = name(&[(oid::AT_COMMON_NAME, "a_b")]);
        assert!(matches!(
            t.fill(&idevid, &csr),
            Err(FillError::Value { attr: "C", .. })
        ));
        let long = "x".repeat(65);
        let csr = name(&[(oid::AT_COMMON_NAME, &long)]);
        assert!(t.fill(&idevid, &csr).is_err());
    }

    #[test]
    fn key_usage_and_eku_names() {
        let ku = KeyUsageBits::parse(&s(&["digitalSignature", "keyAgreement"])).unwrap();
        assert!(ku.digital_signature && ku.key_agreement);
        assert!(KeyUsageBits::parse(&[]).is_err());
        assert!(KeyUsageBits::parse(&s(&["keyAgreement"])).is_err());
        assert!(KeyUsageBits::parse(&s(&["keyCertSign"])).is_err());
        assert_eq!(parse_eku(&s(&["none"])).unwrap(), Vec::new());
        assert_eq!(parse_eku(&[]).unwrap(), Vec::new());
        assert_eq!(
            parse_eku(&s(&["clientAuth", "1.3.6.1.4.1.99999.7"])).unwrap(),
            vec![
                oid::KP_CLIENT_AUTH,
                ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.7")
            ]
        );
        for bad in [
            &["serverAuth"][..],
            &["clientAuth", "clientAuth"][..],
            &["clientAuth", "none"][..],
            &["clientAuth", "webAuth"][..],
            &["clientAuth", "1.x"][..],
        ] {
            let v: Vec<String> = bad.iter().map(|x| x.to_string()).collect();
            assert!(parse_eku(&v).is_err(), "{bad:?}");
        }
    }

    fn profile(name: &str, curves: Vec<Curve>) -> CertProfile {
        CertProfile {
            name: name.into(),
            curves,
            signature_hash: SignatureHash::Auto,
            validity: None,
            key_usage: KeyUsageBits {
                digital_signature: true,
                key_agreement: false,
            },
            extended_key_usage: vec![oid::KP_CLIENT_AUTH],
            subject: None,
            san: SanPolicy::Idevid,
        }
    }

    #[test]
    fn selection_first_match_wins() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let p = Profiles::new(
            vec![profile("x", vec![]), profile("y", vec![Curve::P384])],
            vec![
                (
                    Selector {
                        manufacturer_anchors: Some(vec![a]),
                        serial_prefix: Some("GW".into()),
                    },
                    1,
                ),
                (
                    Selector {
                        manufacturer_anchors: Some(vec![a]),
                        serial_prefix: None,
                    },
                    0,
                ),
                (
                    Selector {
                        manufacturer_anchors: None,
                        serial_prefix: Some("ZZ".into()),
                    },
                    1,
                ),
            ],
        )
        .unwrap();
        assert_eq!(p.select("GW1", Some(&a)).unwrap().name, "y");
        assert_eq!(p.select("SN1", Some(&a)).unwrap().name, "x");
        assert!(p.select("SN1", Some(&b)).is_none());
        assert!(p.select("SN1", None).is_none());
        assert_eq!(p.select("ZZ1", None).unwrap().name, "y");
        assert_eq!(p.by_name("x").unwrap().name, "x");
        assert!(p.by_name("z").is_none());
        assert!(Profiles::new(vec![profile("x", vec![])], vec![(Selector::default(), 1)]).is_err());
        assert!(Profiles::new(vec![profile("x", vec![]), profile("x", vec![])], vec![]).is_err());
    }

    #[test]
    fn curve_and_san_checks() {
        let p = profile("only384", vec![Curve::P384]);
        assert!(p.check_curve(Some(Curve::P384)).is_ok());
        let e = p.check_curve(Some(Curve::P256)).unwrap_err().to_string();
        assert!(
            e.contains("only384") && e.contains("P-384") && e.contains("P-256"),
            "{e}"
        );
        assert!(profile("any", vec![])
            .check_curve(Some(Curve::P256))
            .is_ok());
        let h1 = HardwareModuleName::new(oid::KP_CLIENT_AUTH, b"1").unwrap();
        let h2 = HardwareModuleName::new(oid::KP_CLIENT_AUTH, b"2").unwrap();
        let mut csr = profile("c", vec![]);
        csr.san = SanPolicy::Csr;
        assert_eq!(
            csr.subject_alt_name(None, Some(&h2)).unwrap(),
            Some(h2.clone())
        );
        assert_eq!(csr.subject_alt_name(Some(&h1), None).unwrap(), None);
        assert!(csr.subject_alt_name(Some(&h1), Some(&h2)).is_err());
        csr.san = SanPolicy::None;
        assert_eq!(csr.subject_alt_name(Some(&h1), Some(&h1)).unwrap(), None);
        csr.san = SanPolicy::Idevid;
        assert_eq!(
            csr.subject_alt_name(Some(&h1), Some(&h2)).unwrap(),
            Some(h1)
        );
    }

    #[test]
    fn signature_hash_and_san_names() {
        assert_eq!("auto".parse(), Ok(SignatureHash::Auto));
        assert_eq!("SHA-384".parse(), Ok(SignatureHash::Sha384));
        assert!("SHA-1".parse::<SignatureHash>().is_err());
        assert_eq!(SignatureHash::Sha256.ca_curve(Curve::P384), Curve::P256);
        assert_eq!(SignatureHash::Auto.ca_curve(Curve::P384), Curve::P384);
        assert_eq!("csr".parse(), Ok(SanPolicy::Csr));
        assert!("all".parse::<SanPolicy>().is_err());
    }
}
