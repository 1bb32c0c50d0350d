//! The P-384 issuing CA beside the P-256 one (DLMS/COSEM security suite 2): its `[ca_p384]`
//! configuration section, its creation (`est-server ca create-p384`) and its loading.
//!
//! A CSR whose key is on P-384 is issued by this CA (ecdsa-with-SHA384); P-256 keys and server
//! key generation stay with the main issuing CA. The data directory gains
//! `ca/issuing-ca-p384.pem` (0644) and `ca/issuing-ca-p384.key` (PKCS#8, 0600).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use est_proto::ca::{self, Curve, IssuingCa, RingP384Signer};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::datadir::{self, cert_pem, key_pem, resolve, write_private, write_public};
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
    /// Its PKCS#8 private key (PEM, mode 0600), relative to the data directory.
    pub key: PathBuf,
}

impl Default for CaP384Section {
    fn default() -> Self {
        Self {
            enabled: false,
            cert: "ca/issuing-ca-p384.pem".into(),
            key: "ca/issuing-ca-p384.key".into(),
        }
    }
}

impl CaP384Section {
    /// Field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && (self.cert.as_os_str().is_empty() || self.key.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid {
                field: "ca_p384",
                message: "cert and key must be set when enabled".into(),
            });
        }
        Ok(())
    }
}

/// Load the P-384 issuing CA when `[ca_p384] enabled`; refuses a key group or others can read
/// unless `allow_insecure`, and a key or certificate that is not P-384.
pub fn load(data_dir: &Path, cfg: &Config, allow_insecure: bool) -> Result<Option<IssuingCa>> {
    let s = &cfg.ca_p384;
    if !s.enabled {
        return Ok(None);
    }
    let cert_path = resolve(data_dir, &s.cert);
    let key_path = resolve(data_dir, &s.key);
    safefs::check_key_permissions(&key_path, allow_insecure)?;
    let cert_der = datadir::read_certs(&cert_path)?
        .into_iter()
        .next()
        .context("P-384 CA certificate file is empty")?;
    let signer = RingP384Signer::from_pkcs8_der(&datadir::read_key(&key_path)?)
        .map_err(|e| anyhow::anyhow!("{}: not a P-384 key: {e}", key_path.display()))?;
    let ca = IssuingCa::new(cert_der, Box::new(signer))
        .map_err(|e| anyhow::anyhow!("{} / {}: {e}", cert_path.display(), key_path.display()))?;
    if ca.curve() != Some(Curve::P384) {
        bail!("{}: the [ca_p384] CA is not on P-384", cert_path.display());
    }
    Ok(Some(ca))
}

/// Create the P-384 issuing CA at the paths of `[ca_p384]` (a self-signed root, 20 years,
/// ecdsa-with-SHA384) and enable it in the data directory's configuration file. Refuses to
/// overwrite an existing key or certificate.
pub fn create(data_dir: &Path, now: SystemTime) -> Result<PathBuf> {
    let config_path = data_dir.join(datadir::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let cfg = Config::parse(&text, &config_path)?;
    let cert_path = resolve(data_dir, &cfg.ca_p384.cert);
    let key_path = resolve(data_dir, &cfg.ca_p384.key);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!("{} already exists; not overwritten", p.display());
        }
    }
    let pkcs8 = ca::generate_p384_pkcs8().map_err(|e| anyhow::anyhow!("{e}"))?;
    let signer = RingP384Signer::from_pkcs8_der(&pkcs8).map_err(|e| anyhow::anyhow!("{e}"))?;
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    let cert = ca::self_signed_ca(
        &signer,
        "EST Issuing CA P-384",
        "est-server",
        not_before,
        20 * YEAR,
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| anyhow::anyhow!("signing the P-384 CA certificate: {e}"))?;
    for p in [&cert_path, &key_path] {
        if let Some(dir) = p.parent() {
            if !dir.exists() {
                datadir::create_private_dir(dir)?;
            }
        }
    }
    write_private(&key_path, key_pem(&pkcs8)?.as_bytes())?;
    write_public(&cert_path, cert_pem(&cert)?.as_bytes())?;
    let enabled = enable_in(&text)?;
    let check = Config::parse(&enabled, &config_path)?;
    if !check.ca_p384.enabled {
        bail!("enabling [ca_p384] in {} failed", config_path.display());
    }
    write_public(&config_path, enabled.as_bytes())?;
    Ok(cert_path)
}

/// The configuration text with `[ca_p384] enabled = true` (the section is appended when the
/// file has none).
fn enable_in(text: &str) -> Result<String> {
    let Some(at) = text.find("\n[ca_p384]\n") else {
        let mut out = text.to_owned();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("\n[ca_p384]\nenabled = true\n");
        return Ok(out);
    };
    let (head, section) = text.split_at(at + 1);
    let end = section[1..].find("\n[").map_or(section.len(), |i| i + 2);
    let (body, tail) = section.split_at(end);
    let mut out = String::from(head);
    let mut done = false;
    for line in body.split_inclusive('\n') {
        if line.trim_start().starts_with("enabled") && line.contains('=') {
            out.push_str("enabled = true\n");
            done = true;
        } else {
            out.push_str(line);
        }
    }
    if !done {
        bail!("the [ca_p384] section has no enabled line");
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
        let out = enable_in(text).unwrap();
        let cfg = Config::parse(&out, Path::new("t")).unwrap();
        assert!(cfg.ca_p384.enabled);
        assert!(!cfg.hsm.enabled);
        let appended = enable_in("[server]\n").unwrap();
        let cfg = Config::parse(&appended, Path::new("t")).unwrap();
        assert!(cfg.ca_p384.enabled);
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
