//! `[[profiles]]`: certificate profiles and the `[[profiles.select]]` rules choosing them
//! (est_proto::profile), validated at load; manufacturer CAs named by the rules are resolved
//! against the configured trust anchors when the server starts ([`build`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use est_proto::ca::Curve;
use est_proto::profile::{
    parse_eku, CertProfile, KeyUsageBits, Profiles, Selector, SignatureHash, SubjectTemplate,
};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};

/// One `[[profiles]]` entry.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileSection {
    /// Unique name (printable ASCII), written to the audit trail with each issuance.
    pub name: String,
    /// Request key curves accepted: "P-256", "P-384"; empty (default) accepts both. A CSR on
    /// another curve is refused with 4.00 and a diagnostic.
    pub curves: Vec<String>,
    /// "auto" (default: the CA on the key's curve), "SHA-256" (the P-256 CA signs,
    /// ecdsa-with-SHA256) or "SHA-384" (the P-384 CA of `[ca_p384]` signs, ecdsa-with-SHA384).
    pub signature_hash: String,
    /// Validity of issued certificates in days; 0 (default): `[policy] ldevid_validity_days`.
    pub validity_days: u32,
    /// keyUsage bits: "digitalSignature" (required: the meter signs its DTLS handshake with
    /// the certificate), "keyAgreement". Default ["digitalSignature"].
    pub key_usage: Vec<String>,
    /// extKeyUsage: names (clientAuth, serverAuth, codeSigning, emailProtection,
    /// timeStamping, OCSPSigning) or dotted OIDs, in order; ["none"] or [] for no extension.
    /// When present it must include clientAuth. Default ["clientAuth"].
    pub extended_key_usage: Vec<String>,
    /// Subject template, `ATTR=VALUE` per RDN, most significant first (see the documented
    /// example); empty (default): the built-in subject of `[policy]`.
    pub subject: Vec<String>,
    /// subjectAltName (hardwareModuleName): "idevid" (default: copied from the IDevID),
    /// "csr" (copied from the CSR; one contradicting the IDevID's is refused with 4.03) or
    /// "none".
    pub san: String,
    /// The rules selecting this profile; at least one.
    pub select: Vec<SelectSection>,
}

impl Default for ProfileSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            curves: Vec::new(),
            signature_hash: "auto".into(),
            validity_days: 0,
            key_usage: vec!["digitalSignature".into()],
            extended_key_usage: vec!["clientAuth".into()],
            subject: Vec::new(),
            san: "idevid".into(),
            select: Vec::new(),
        }
    }
}

/// One `[[profiles.select]]` rule: every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectSection {
    /// The manufacturer CA the meter's IDevID chain ends in: a file listed in
    /// `[pki] manufacturer_cas` (every certificate in it), "sha256:<64 hex digits>" (the
    /// SHA-256 of one manufacturer CA certificate, DER) or "subject:<RFC 4514 subject>" (as
    /// `openssl x509 -subject -nameopt RFC2253` prints it). "" (default): any.
    pub manufacturer_ca: String,
    /// Prefix of the device's serialNumber (device class). "" (default): any.
    pub serial_prefix: String,
}

/// How a rule names a manufacturer CA.
enum CaRef<'a> {
    File(&'a Path),
    Sha256([u8; 32]),
    Subject(&'a str),
}

fn ca_ref(s: &str) -> Result<CaRef<'_>, String> {
    if let Some(h) = s.strip_prefix("sha256:") {
        let bytes = hex::decode(h.replace(':', ""))
            .map_err(|_| format!("{s:?}: the fingerprint is not hex"))?;
        let fp: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("{s:?}: a SHA-256 fingerprint has 32 bytes"))?;
        return Ok(CaRef::Sha256(fp));
    }
    if let Some(subject) = s.strip_prefix("subject:") {
        if subject.trim().is_empty() {
            return Err(format!("{s:?}: empty subject"));
        }
        return Ok(CaRef::Subject(subject));
    }
    Ok(CaRef::File(Path::new(s)))
}

fn invalid(i: usize, name: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: "profiles",
        message: format!("profile {} ({name:?}): {message}", i + 1),
    }
}

impl ProfileSection {
    /// The profile, its fields checked; cross-field checks against the rest of the
    /// configuration are in [`validate`].
    pub fn profile(&self) -> Result<CertProfile, String> {
        let mut curves = Vec::new();
        for c in &self.curves {
            let c: Curve = c.parse()?;
            if curves.contains(&c) {
                return Err(format!("curves lists {c} twice"));
            }
            curves.push(c);
        }
        if self.validity_days > 36_500 {
            return Err(
                "validity_days must be at most 36500 (0: [policy] ldevid_validity_days)".into(),
            );
        }
        Ok(CertProfile {
            name: self.name.clone(),
            curves,
            signature_hash: self.signature_hash.parse()?,
            validity: (self.validity_days > 0)
                .then(|| std::time::Duration::from_secs(u64::from(self.validity_days) * 86_400)),
            key_usage: KeyUsageBits::parse(&self.key_usage).map_err(|e| e.to_string())?,
            extended_key_usage: parse_eku(&self.extended_key_usage).map_err(|e| e.to_string())?,
            subject: if self.subject.is_empty() {
                None
            } else {
                Some(SubjectTemplate::parse(&self.subject).map_err(|e| e.to_string())?)
            },
            san: self.san.parse()?,
        })
    }
}

/// Every check that needs only the configuration: names unique and printable, each field
/// valid, at least one rule per profile and each rule naming something, a manufacturer CA
/// file that `[pki] manufacturer_cas` lists, and a profile signed by or accepting P-384 only
/// with `[ca_p384]` enabled.
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    for (i, p) in cfg.profiles.iter().enumerate() {
        let bad = |m: String| invalid(i, &p.name, m);
        if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "name must be non-empty printable ASCII without spaces".into()
            ));
        }
        if cfg.profiles.iter().take(i).any(|q| q.name == p.name) {
            return Err(bad("a profile of this name is defined earlier".into()));
        }
        let profile = p.profile().map_err(&bad)?;
        let needs_p384 = profile.signature_hash == SignatureHash::Sha384
            || (profile.signature_hash == SignatureHash::Auto
                && profile.curves.contains(&Curve::P384));
        if needs_p384 && !cfg.ca_p384.enabled {
            return Err(bad(
                "signs with the P-384 issuing CA (signature_hash \"SHA-384\", or \"auto\" with \
                 P-384 keys), which needs [ca_p384] enabled = true (est-server ca create-p384)"
                    .into(),
            ));
        }
        if p.select.is_empty() {
            return Err(bad(
                "has no [[profiles.select]] rule: it would never be used".into(),
            ));
        }
        for (j, r) in p.select.iter().enumerate() {
            let bad = |m: String| bad(format!("select rule {}: {m}", j + 1));
            if r.manufacturer_ca.is_empty() && r.serial_prefix.is_empty() {
                return Err(bad(
                    "names neither manufacturer_ca nor serial_prefix (a profile for every \
                     device is [policy]'s built-in one)"
                        .into(),
                ));
            }
            if !r.serial_prefix.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("serial_prefix must be printable ASCII".into()));
            }
            if !r.manufacturer_ca.is_empty() {
                if let CaRef::File(f) = ca_ref(&r.manufacturer_ca).map_err(&bad)? {
                    if !cfg.pki.manufacturer_cas.iter().any(|m| m == f) {
                        return Err(bad(format!(
                            "manufacturer_ca {:?} is not a file listed in [pki] \
                             manufacturer_cas (or \"sha256:...\" / \"subject:...\")",
                            r.manufacturer_ca
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    out
}

/// The profiles for the policy, the rules' manufacturer CAs resolved to the SHA-256 of
/// trust anchors in `manufacturer_cas` (DER, as loaded): a fingerprint or subject that names
/// none of them is refused.
pub fn build(cfg: &Config, data_dir: &Path, manufacturer_cas: &[Vec<u8>]) -> Result<Profiles> {
    let anchors: Vec<([u8; 32], String)> = manufacturer_cas
        .iter()
        .map(|der| {
            use der::Decode;
            let c = x509_cert::Certificate::from_der(der)?;
            Ok((sha256(der), c.tbs_certificate.subject.to_string()))
        })
        .collect::<Result<_>>()?;
    let mut profiles = Vec::with_capacity(cfg.profiles.len());
    let mut rules = Vec::new();
    for (i, p) in cfg.profiles.iter().enumerate() {
        profiles.push(
            p.profile()
                .map_err(|e| anyhow::anyhow!("profile {:?}: {e}", p.name))?,
        );
        for r in &p.select {
            let manufacturer_anchors = if r.manufacturer_ca.is_empty() {
                None
            } else {
                let ctx = || {
                    format!(
                        "profile {:?}: manufacturer_ca {:?}",
                        p.name, r.manufacturer_ca
                    )
                };
                let set: Vec<[u8; 32]> =
                    match ca_ref(&r.manufacturer_ca).map_err(anyhow::Error::msg)? {
                        CaRef::File(f) => {
                            let path: PathBuf = crate::datadir::resolve(data_dir, f);
                            crate::datadir::read_certs(&path)
                                .with_context(ctx)?
                                .iter()
                                .map(|d| sha256(d))
                                .collect()
                        }
                        CaRef::Sha256(fp) => anchors
                            .iter()
                            .filter(|(a, _)| *a == fp)
                            .map(|(a, _)| *a)
                            .collect(),
                        CaRef::Subject(s) => anchors
                            .iter()
                            .filter(|(_, subj)| subj == s)
                            .map(|(a, _)| *a)
                            .collect(),
                    };
                if set.is_empty() {
                    bail!("{}: names none of the configured manufacturer CAs", ctx());
                }
                Some(set)
            };
            rules.push((
                Selector {
                    manufacturer_anchors,
                    serial_prefix: (!r.serial_prefix.is_empty()).then(|| r.serial_prefix.clone()),
                },
                i,
            ));
        }
    }
    Profiles::new(profiles, rules).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use est_proto::profile::SanPolicy;

    const GOOD: &str = r#"
[ca_p384]
enabled = true

[[profiles]]
name = "vendor-a"
curves = ["P-256"]
signature_hash = "SHA-256"
validity_days = 30
key_usage = ["digitalSignature", "keyAgreement"]
extended_key_usage = ["clientAuth", "serverAuth"]
subject = ["O=Utility", "CN={idevid.serialNumber}", "serialNumber={idevid.serialNumber}"]
san = "none"
[[profiles.select]]
manufacturer_ca = "manufacturers/demo-manufacturer-ca.pem"

[[profiles]]
name = "gateways"
curves = ["P-384"]
signature_hash = "SHA-384"
extended_key_usage = ["none"]
[[profiles.select]]
serial_prefix = "GW"
[[profiles.select]]
manufacturer_ca = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
serial_prefix = "X"
"#;

    #[test]
    fn profiles_parse() {
        let cfg = Config::parse(GOOD, Path::new("t")).unwrap();
        assert_eq!(cfg.profiles.len(), 2);
        assert_eq!(cfg.profiles[1].select.len(), 2);
        let p = cfg.profiles[0].profile().unwrap();
        assert_eq!(
            p.validity,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(p.san, SanPolicy::None);
        assert!(cfg.profiles[1]
            .profile()
            .unwrap()
            .extended_key_usage
            .is_empty());
        // The default configuration has none, and behaves as before.
        let d = Config::parse(crate::config::DEFAULT_CONFIG_TOML, Path::new("t")).unwrap();
        assert!(d.profiles.is_empty());
    }

    #[test]
    fn bad_profiles_are_refused_at_load() {
        let cases = [
            // P-384 signing without [ca_p384].
            (GOOD.replace("[ca_p384]\nenabled = true\n", ""), "ca_p384"),
            (
                GOOD.replace("name = \"gateways\"", "name = \"vendor-a\""),
                "defined earlier",
            ),
            (GOOD.replace("name = \"gateways\"", "name = \"\""), "name"),
            (
                GOOD.replace("curves = [\"P-256\"]", "curves = [\"P-521\"]"),
                "P-521",
            ),
            (
                GOOD.replace("curves = [\"P-256\"]", "curves = [\"P-256\", \"P-256\"]"),
                "twice",
            ),
            (GOOD.replace("\"SHA-256\"", "\"SHA-1\""), "SHA-1"),
            (
                GOOD.replace("validity_days = 30", "validity_days = 40000"),
                "validity_days",
            ),
            (
                GOOD.replace("\"keyAgreement\"]", "\"keyCertSign\"]"),
                "keyCertSign",
            ),
            (
                GOOD.replace("[\"clientAuth\", \"serverAuth\"]", "[\"serverAuth\"]"),
                "clientAuth",
            ),
            (
                GOOD.replace("CN={idevid.serialNumber}\"", "CN={idevid.mac}\""),
                "placeholder",
            ),
            (
                GOOD.replace(", \"serialNumber={idevid.serialNumber}\"", ""),
                "serialNumber",
            ),
            (GOOD.replace("san = \"none\"", "san = \"all\""), "SAN"),
            (
                GOOD.replace("demo-manufacturer-ca.pem", "other.pem"),
                "manufacturer_cas",
            ),
            (GOOD.replace("sha256:00", "sha256:0"), "hex"),
            (
                GOOD.replace("serial_prefix = \"GW\"", "serial_prefix = \"\""),
                "neither",
            ),
            (
                GOOD.replace("serial_prefix = \"GW\"", "serial_prefix = \"G W\""),
                "printable",
            ),
            (
                GOOD.replace("san = \"none\"", "san = \"none\"\ncolour = 1"),
                "colour",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::parse(&text, Path::new("t"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A profile no rule selects.
        let lonely = "[[profiles]]\nname = \"x\"\n";
        let e = Config::parse(lonely, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("never be used"), "{e}");
    }

    /// One profile "a" with one rule naming `manufacturer_ca`.
    fn one_rule(manufacturer_ca: &str) -> Config {
        let text = format!(
            "[[profiles]]\nname = \"a\"\n[[profiles.select]]\nmanufacturer_ca = {manufacturer_ca:?}\n"
        );
        Config::parse(&text, Path::new("t")).unwrap()
    }

    #[test]
    fn build_resolves_manufacturer_cas() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        crate::datadir::init(&data, &[]).unwrap();
        let cfg = crate::datadir::load_config(&data, None).unwrap();
        let loaded = crate::datadir::load(&data, cfg.clone()).unwrap();
        let fp = hex::encode(sha256(&loaded.manufacturer_cas[0]));
        let subject = {
            use der::Decode;
            x509_cert::Certificate::from_der(&loaded.manufacturer_cas[0])
                .unwrap()
                .tbs_certificate
                .subject
                .to_string()
        };
        for named in [
            "manufacturers/demo-manufacturer-ca.pem".to_string(),
            format!("sha256:{fp}"),
            format!("subject:{subject}"),
        ] {
            let p = build(&one_rule(&named), &data, &loaded.manufacturer_cas).unwrap();
            let anchor = sha256(&loaded.manufacturer_cas[0]);
            assert_eq!(p.select("SN1", Some(&anchor)).unwrap().name, "a", "{named}");
            assert!(p.select("SN1", Some(&[0u8; 32])).is_none());
        }
        for unknown in [
            format!("sha256:{}", "00".repeat(32)),
            "subject:CN=Nobody".into(),
        ] {
            let e = build(&one_rule(&unknown), &data, &loaded.manufacturer_cas).unwrap_err();
            assert!(format!("{e:#}").contains("none of the configured"), "{e:#}");
        }
    }
}
