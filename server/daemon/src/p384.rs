//! The P-384 issuing CA beside the P-256 one (DLMS/COSEM security suite 2): its `[ca_p384]`
//! configuration section, its creation (`est-server ca create-p384`) and its loading.
//!
//! A CSR whose key is on P-384 is issued by this CA (ecdsa-with-SHA384); P-256 keys and server
//! key generation stay with the main issuing CA. The data directory gains
//! `ca/issuing-ca-p384.pem` (0644) and `ca/issuing-ca-p384.key` (PKCS#8, 0600), or, with
//! `hsm_key_label`, only the certificate: the key is then a P-384 key pair on the PKCS#11
//! token of `[hsm]` (crate::hsm), generated there by `est-server ca create-p384
//! --hsm-key-label L` or found by its label, and every certificate and CRL of this CA is
//! signed on the token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use est_proto::ca::{self, Curve, IssuingCa, RingP384Signer};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::datadir::{self, cert_pem, key_pem, resolve, write_private, write_public};
use crate::hsm::{HsmSection, Pkcs11Signer};
use crate::safefs;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `[ca_p384]`: the P-384 issuing CA.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaP384Section {
    /// Load the P-384 CA and issue P-384 requests with it. Default false.
    pub enabled: bool,
    /// Its certificate (PEM), relative to the data directory.
    pub cert: PathBuf,
    /// Its PKCS#8 private key (PEM, mode 0600), relative to the data directory; unused with
    /// `hsm_key_label`.
    pub key: PathBuf,
    /// Label (CKA_LABEL) of its P-384 key pair on the PKCS#11 token of `[hsm]` (module, token,
    /// PIN and sessions from there; `[hsm] enabled` required). "" (default): the key is the
    /// file `key`.
    pub hsm_key_label: String,
}

impl Default for CaP384Section {
    fn default() -> Self {
        Self {
            enabled: false,
            cert: "ca/issuing-ca-p384.pem".into(),
            key: "ca/issuing-ca-p384.key".into(),
            hsm_key_label: String::new(),
        }
    }
}

impl CaP384Section {
    /// Field checks; a key on the token needs `[hsm]` (`hsm`) enabled.
    pub fn validate(&self, hsm: &HsmSection) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.into(),
        };
        if !self.enabled {
            return Ok(());
        }
        if self.cert.as_os_str().is_empty()
            || (self.hsm_key_label.is_empty() && self.key.as_os_str().is_empty())
        {
            return Err(invalid(
                "ca_p384",
                "cert and key (or hsm_key_label) must be set when enabled",
            ));
        }
        if !self.hsm_key_label.is_empty() {
            if !hsm.enabled {
                return Err(invalid(
                    "ca_p384.hsm_key_label",
                    "the P-384 CA key is on the token of [hsm], which must be enabled \
                     (module, token_label, pin_file or pin_env)",
                ));
            }
            if self.hsm_key_label == hsm.key_label {
                return Err(invalid(
                    "ca_p384.hsm_key_label",
                    "must differ from [hsm] key_label (the P-256 CA key)",
                ));
            }
            if !self.hsm_key_label.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "ca_p384.hsm_key_label",
                    "must be printable ASCII without spaces",
                ));
            }
        }
        Ok(())
    }
}

/// The P-384 key labelled `label` on the token of `[hsm]` (generated there first when
/// `generate` and there is none).
fn hsm_signer(
    data_dir: &Path,
    hsm: &HsmSection,
    label: &str,
    generate: bool,
) -> Result<(Pkcs11Signer, crate::hsm::KeyOrigin)> {
    let pin = hsm.read_pin(data_dir)?;
    let key = crate::hsm::HsmKeyRef {
        module: &hsm.module,
        token_label: &hsm.token_label,
        key_label: label,
        pin: &pin,
        sessions: hsm.sessions,
        curve: Curve::P384,
    };
    let opened = if generate {
        Pkcs11Signer::open_or_generate(&key)
    } else {
        Pkcs11Signer::open(&key).map(|s| (s, crate::hsm::KeyOrigin::Existing))
    };
    opened.with_context(|| format!("the P-384 CA key {label:?} on token {:?}", hsm.token_label))
}

/// Load the P-384 issuing CA when `[ca_p384] enabled`; refuses a key group or others can read
/// unless `allow_insecure`, and a key or certificate that is not P-384.
pub fn load(data_dir: &Path, cfg: &Config, allow_insecure: bool) -> Result<Option<IssuingCa>> {
    let s = &cfg.ca_p384;
    if !s.enabled {
        return Ok(None);
    }
    let cert_path = resolve(data_dir, &s.cert);
    let cert_der = datadir::read_certs(&cert_path)?
        .into_iter()
        .next()
        .context("P-384 CA certificate file is empty")?;
    let ca = if s.hsm_key_label.is_empty() {
        let key_path = resolve(data_dir, &s.key);
        safefs::check_key_permissions(&key_path, allow_insecure)?;
        let signer = RingP384Signer::from_pkcs8_der(&datadir::read_key(&key_path)?)
            .map_err(|e| anyhow::anyhow!("{}: not a P-384 key: {e}", key_path.display()))?;
        IssuingCa::new(cert_der, Box::new(signer))
            .map_err(|e| anyhow::anyhow!("{} / {}: {e}", cert_path.display(), key_path.display()))?
    } else {
        let (signer, _) = hsm_signer(data_dir, &cfg.hsm, &s.hsm_key_label, false)?;
        IssuingCa::new(cert_der, Box::new(signer)).map_err(|e| {
            anyhow::anyhow!(
                "{} / HSM key {:?}: {e}",
                cert_path.display(),
                s.hsm_key_label
            )
        })?
    };
    if ca.curve() != Some(Curve::P384) {
        bail!("{}: the [ca_p384] CA is not on P-384", cert_path.display());
    }
    Ok(Some(ca))
}

/// Create the P-384 issuing CA at the paths of `[ca_p384]` (a self-signed root, 20 years,
/// ecdsa-with-SHA384) with its key in a file, and enable it in the data directory's
/// configuration file. Refuses to overwrite an existing key or certificate.
pub fn create(data_dir: &Path, now: SystemTime) -> Result<PathBuf> {
    create_with(data_dir, now, None)
}

/// [`create`], or with `hsm_key_label` the CA's key on the PKCS#11 token of `[hsm]` (which
/// must be enabled): the P-384 key pair labelled so is used, or generated there if there is
/// none, the CA certificate is signed on the token, no key file is written, and the
/// configuration gains `hsm_key_label` (never the PIN). Refuses to overwrite an existing
/// certificate (or key file).
pub fn create_with(
    data_dir: &Path,
    now: SystemTime,
    hsm_key_label: Option<&str>,
) -> Result<PathBuf> {
    let config_path = data_dir.join(datadir::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let cfg = Config::parse(&text, &config_path)?;
    let cert_path = resolve(data_dir, &cfg.ca_p384.cert);
    let key_path = resolve(data_dir, &cfg.ca_p384.key);
    let mut ours = vec![&cert_path];
    if hsm_key_label.is_none() {
        ours.push(&key_path);
    }
    for p in &ours {
        if p.exists() {
            bail!("{} already exists; not overwritten", p.display());
        }
    }
    // The configuration as it will be, checked before anything is made.
    let enabled = enable_in(&text, hsm_key_label)?;
    let check = Config::parse(&enabled, &config_path)?;
    if !check.ca_p384.enabled || check.ca_p384.hsm_key_label != hsm_key_label.unwrap_or("") {
        bail!("enabling [ca_p384] in {} failed", config_path.display());
    }
    let (signer, pkcs8): (Box<dyn ca::Signer>, Option<Vec<u8>>) = match hsm_key_label {
        None => {
            let pkcs8 = ca::generate_p384_pkcs8().map_err(|e| anyhow::anyhow!("{e}"))?;
            let signer =
                RingP384Signer::from_pkcs8_der(&pkcs8).map_err(|e| anyhow::anyhow!("{e}"))?;
            (Box::new(signer), Some(pkcs8))
        }
        Some(label) => {
            let (signer, origin) = hsm_signer(data_dir, &check.hsm, label, true)?;
            tracing::info!(key = label, ?origin, "P-384 CA key on the token");
            (Box::new(signer), None)
        }
    };
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    let cert = ca::self_signed_ca(
        signer.as_ref(),
        "EST Issuing CA P-384",
        "est-server",
        not_before,
        20 * YEAR,
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| anyhow::anyhow!("signing the P-384 CA certificate: {e}"))?;
    for p in &ours {
        if let Some(dir) = p.parent() {
            if !dir.exists() {
                datadir::create_private_dir(dir)?;
            }
        }
    }
    if let Some(pkcs8) = pkcs8 {
        write_private(&key_path, key_pem(&pkcs8)?.as_bytes())?;
    }
    write_public(&cert_path, cert_pem(&cert)?.as_bytes())?;
    write_public(&config_path, enabled.as_bytes())?;
    Ok(cert_path)
}

/// The configuration text with `[ca_p384] enabled = true`, and `hsm_key_label` set when given
/// (the section, or the line, is appended when the file has none).
fn enable_in(text: &str, hsm_key_label: Option<&str>) -> Result<String> {
    let label_line =
        hsm_key_label.map(|l| format!("hsm_key_label = {}\n", toml::Value::String(l.to_owned())));
    let Some(at) = text.find("\n[ca_p384]\n") else {
        let mut out = text.to_owned();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("\n[ca_p384]\nenabled = true\n");
        if let Some(l) = &label_line {
            out.push_str(l);
        }
        return Ok(out);
    };
    let (head, section) = text.split_at(at + 1);
    let end = section[1..].find("\n[").map_or(section.len(), |i| i + 2);
    let (body, tail) = section.split_at(end);
    let mut out = String::from(head);
    let mut done = false;
    let mut label_done = label_line.is_none();
    for line in body.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with("enabled") && line.contains('=') {
            out.push_str("enabled = true\n");
            done = true;
        } else if let (Some(l), true) = (&label_line, t.starts_with("hsm_key_label")) {
            out.push_str(l);
            label_done = true;
        } else {
            out.push_str(line);
        }
    }
    if !done {
        bail!("the [ca_p384] section has no enabled line");
    }
    if !label_done {
        if let Some(l) = &label_line {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(l);
        }
    }
    out.push_str(tail);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn enable_flips_only_the_p384_section() {
        let text = crate::config::DEFAULT_CONFIG_TOML;
        let out = enable_in(text, None).unwrap();
        let cfg = Config::parse(&out, Path::new("t")).unwrap();
        assert!(cfg.ca_p384.enabled);
        assert!(cfg.ca_p384.hsm_key_label.is_empty());
        assert!(!cfg.hsm.enabled);
        let appended = enable_in("[server]\n", None).unwrap();
        let cfg = Config::parse(&appended, Path::new("t")).unwrap();
        assert!(cfg.ca_p384.enabled);
        // With a key on the token: the label is set (the line replaced, or added to a
        // section without one), and [hsm] must be enabled for the configuration to load.
        let hsm = "[hsm]\nenabled = true\nmodule = \"m.so\"\ntoken_label = \"t\"\n";
        for base in [
            format!("{hsm}\n[ca_p384]\nenabled = false\n"),
            format!("{hsm}\n[ca_p384]\nenabled = false\nhsm_key_label = \"\"\n\n[enrollment]\n"),
        ] {
            let out = enable_in(&base, Some("ca-p384 \"2026\"")).unwrap();
            let e = Config::parse(&out, Path::new("t")).unwrap_err().to_string();
            assert!(e.contains("printable ASCII"), "{e}");
            let out = enable_in(&base, Some("ca-p384-2026")).unwrap();
            let cfg = Config::parse(&out, Path::new("t")).unwrap();
            assert!(cfg.ca_p384.enabled && cfg.hsm.enabled, "{out}");
            assert_eq!(cfg.ca_p384.hsm_key_label, "ca-p384-2026");
            // Only the [ca_p384] section changed.
            assert!(out.starts_with(hsm), "{out}");
        }
        // Without [hsm] enabled, or with the P-256 key's label: refused at load.
        let out = enable_in(text, Some("ca-p384")).unwrap();
        let e = Config::parse(&out, Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("[hsm]"), "{e}");
        let base = format!("{hsm}\n[ca_p384]\nenabled = false\n");
        let out = enable_in(&base, Some("est-issuing-ca")).unwrap();
        let e = Config::parse(&out, Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("must differ"), "{e}");
    }

    #[test]
    fn create_then_load_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        datadir::init(&data, &[]).unwrap();
        let cfg = datadir::load_config(&data, None).unwrap();
        assert!(load(&data, &cfg, false).unwrap().is_none());
        create(&data, SystemTime::now()).unwrap();
        let cfg = datadir::load_config(&data, None).unwrap();
        let ca = load(&data, &cfg, false).unwrap().unwrap();
        assert_eq!(ca.curve(), Some(Curve::P384));
        // Not twice.
        assert!(create(&data, SystemTime::now()).is_err());
        // A P-256 key named as the P-384 one is refused.
        let mut wrong = cfg.clone();
        wrong.ca_p384.key = cfg.pki.issuing_ca_key.clone();
        let e = load(&data, &wrong, false).err().unwrap();
        assert!(format!("{e:#}").contains("not a P-384 key"), "{e:#}");
        // A key others can read is refused.
        let key = resolve(&data, &cfg.ca_p384.key);
        safefs::set_mode(&key, 0o644).unwrap();
        assert!(load(&data, &cfg, false).is_err());
    }
}
