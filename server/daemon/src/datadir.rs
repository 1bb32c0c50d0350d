//! The data directory: keys, certificates, configuration and the store.
//!
//! ```text
//! est-data/
//!   est-server.toml                          documented configuration (all defaults)
//!   ca/issuing-ca.pem, ca/issuing-ca.key     P-256 issuing CA (signs LDevIDs and our DTLS cert)
//!   ca/issuing-ca-p384.{pem,key}             P-384 issuing CA, if `ca create-p384` made it
//!   dtls/server.pem, dtls/server.key         the server's DTLS certificate
//!   manufacturers/demo-manufacturer-ca.pem   stands for a meter maker's IDevID CA
//!   manufacturers/demo-manufacturer-ca.key   its key, used only by `factory mint`
//!   est.sqlite3                              issued certificates, audit log, allowlist
//!                                            (not with [storage] backend = "postgres")
//! ```
//! Every file and directory is created with an explicit mode whatever the umask (see
//! [`crate::safefs`]): the data directory and key directories 0700, private keys and the
//! store 0600, certificates and the configuration 0644. Keys get their mode before any
//! byte is written and are never logged; `run` refuses a CA or DTLS key that group or
//! others can read.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use der::pem::LineEnding;
use est_proto::ca::{self, IssuingCa, RingP256Signer};
use x509_cert::der::{Decode, Encode};

use crate::config::{Config, StorageSection, DEFAULT_CONFIG_TOML};
use crate::hsm::{self, HsmSection};
use crate::safefs;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "est-data";
/// Configuration file name inside the data directory.
pub const CONFIG_FILE: &str = "est-server.toml";

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Write `contents` to a new file readable by the owner only (0600 from creation on).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    safefs::write_file(path, contents, safefs::PRIVATE_FILE)
}

/// Write a certificate, the configuration or another public file (0644, whatever the umask).
pub fn write_public(path: &Path, contents: &[u8]) -> Result<()> {
    safefs::write_file(path, contents, safefs::PUBLIC_FILE)
}

/// Create a directory (and missing parents) with mode 0700.
pub fn create_private_dir(path: &Path) -> Result<()> {
    safefs::create_dir(path, safefs::PRIVATE_DIR)
}

/// PEM text of a certificate.
pub fn cert_pem(der: &[u8]) -> Result<String> {
    der::pem::encode_string("CERTIFICATE", LineEnding::LF, der)
        .map_err(|e| anyhow::anyhow!("PEM encoding: {e}"))
}

/// PEM text of a PKCS#8 private key.
pub fn key_pem(pkcs8: &[u8]) -> Result<String> {
    der::pem::encode_string("PRIVATE KEY", LineEnding::LF, pkcs8)
        .map_err(|e| anyhow::anyhow!("PEM encoding: {e}"))
}

/// All certificates in a PEM file (DER each), or the file itself if it is DER.
pub fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.first() == Some(&0x30) {
        return Ok(vec![bytes]);
    }
    let certs = x509_cert::Certificate::load_pem_chain(&bytes)
        .with_context(|| format!("parsing PEM certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    certs
        .iter()
        .map(|c| c.to_der().map_err(anyhow::Error::from))
        .collect()
}

/// A PKCS#8 private key from a PEM or DER file. Its permissions are checked by
/// [`load_with`] for the keys the server runs with, not here.
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.first() == Some(&0x30) {
        return Ok(bytes);
    }
    let text = std::str::from_utf8(&bytes).context("key file is neither DER nor PEM")?;
    let (label, der) = der::pem::decode_vec(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM key: {e}", path.display()))?;
    if label != "PRIVATE KEY" {
        bail!(
            "{}: expected a PKCS#8 \"PRIVATE KEY\", found {label:?}",
            path.display()
        );
    }
    Ok(der)
}

/// An issuing CA from its certificate and key files.
pub fn load_ca(cert: &Path, key: &Path) -> Result<IssuingCa> {
    let cert_der = read_certs(cert)?
        .into_iter()
        .next()
        .context("CA certificate file is empty")?;
    let signer = RingP256Signer::from_pkcs8_der(&read_key(key)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    IssuingCa::new(cert_der, Box::new(signer))
        .map_err(|e| anyhow::anyhow!("{} / {}: {e}", cert.display(), key.display()))
}

/// The issuing CA whose key is on the token `h` names.
pub fn load_hsm_ca(data_dir: &Path, cert: &Path, h: &HsmSection) -> Result<IssuingCa> {
    let cert_der = read_certs(cert)?
        .into_iter()
        .next()
        .context("CA certificate file is empty")?;
    let pin = h.read_pin(data_dir)?;
    let signer = hsm::Pkcs11Signer::open(&hsm_key_ref(h, &pin)).with_context(|| {
        format!(
            "opening the CA key {:?} on token {:?}",
            h.key_label, h.token_label
        )
    })?;
    IssuingCa::new(cert_der, Box::new(signer))
        .map_err(|e| anyhow::anyhow!("{} / HSM key {:?}: {e}", cert.display(), h.key_label))
}

/// What `init` created.
#[derive(Debug)]
pub struct InitReport {
    pub data_dir: PathBuf,
    pub created: bool,
}

/// Create a data directory with a fresh PKI and configuration. Does nothing if one
/// already exists there (its configuration file is the marker).
pub fn init(data_dir: &Path, server_names: &[String]) -> Result<InitReport> {
    init_with(data_dir, server_names, None)
}

/// [`init`], with the issuing CA's key on a PKCS#11 token when `hsm` is given (enabled): the
/// key labelled `hsm.key_label` is used, or generated on the token if there is none, and the
/// configuration written names the token instead of a key file.
pub fn init_with(
    data_dir: &Path,
    server_names: &[String],
    hsm: Option<&HsmSection>,
) -> Result<InitReport> {
    init_with_storage(data_dir, server_names, hsm, &StorageSection::default())
}

/// [`init_with`], the store being the one `storage` names. With PostgreSQL the database is
/// reached and its schema migrated first (an unreachable database stops `init` before it
/// writes anything), no SQLite file is created, and the configuration (which then holds the
/// connection string, perhaps with a password) is written 0600.
pub fn init_with_storage(
    data_dir: &Path,
    server_names: &[String],
    hsm: Option<&HsmSection>,
    storage: &StorageSection,
) -> Result<InitReport> {
    let config_path = data_dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Ok(InitReport {
            data_dir: data_dir.to_path_buf(),
            created: false,
        });
    }
    let cfg = Config {
        storage: storage.clone(),
        ..Config::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("the storage settings: {e}"))?;
    if storage.is_postgres() {
        let store = crate::store::open_configured(storage, data_dir)
            .map_err(|e| anyhow::anyhow!("opening the PostgreSQL store: {e}"))?;
        tracing::info!(
            backend = store.backend_name(),
            "the store's schema is ready"
        );
        store.close();
    }
    create_private_dir(data_dir)?;
    let mut rng = rand::rngs::OsRng;
    let now = SystemTime::now();
    // Backdate a little: meters' clocks drift.
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);

    // Issuing CA.
    let ca_cert_path = data_dir.join(&cfg.pki.issuing_ca_cert);
    let issuing = match hsm {
        None => {
            let (ca_cert, ca_key) = ca::generate_root_ca(
                "EST Issuing CA",
                "est-server",
                not_before,
                20 * YEAR,
                &mut rng,
            )
            .map_err(|e| anyhow::anyhow!("generating the issuing CA: {e}"))?;
            let ca_key_path = data_dir.join(&cfg.pki.issuing_ca_key);
            create_private_dir(parent(&ca_key_path)?)?;
            write_private(&ca_key_path, key_pem(&ca_key)?.as_bytes())?;
            IssuingCa::new(ca_cert, Box::new(RingP256Signer::from_pkcs8_der(&ca_key)?))?
        }
        Some(h) => {
            let (signer, origin) =
                hsm::Pkcs11Signer::open_or_generate(&hsm_key_ref(h, &h.read_pin(data_dir)?))?;
            tracing::info!(token = %h.token_label, key = %h.key_label, ?origin, "issuing CA key on the HSM");
            let ca_cert = ca::self_signed_ca(
                &signer,
                "EST Issuing CA",
                "est-server",
                not_before,
                20 * YEAR,
                &mut rng,
            )
            .map_err(|e| anyhow::anyhow!("signing the issuing CA certificate on the HSM: {e}"))?;
            create_private_dir(parent(&ca_cert_path)?)?;
            IssuingCa::new(ca_cert, Box::new(signer))?
        }
    };
    write_public(
        &ca_cert_path,
        cert_pem(issuing.certificate_der())?.as_bytes(),
    )?;

    // The server's DTLS certificate, issued by the same CA, so a meter's Implicit TA
    // (RFC 9148 §3) and the Explicit TA from /crts are the same certificate.
    let mut dns: Vec<String> = vec!["localhost".into()];
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for name in server_names {
        match name.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(name.clone()),
        }
    }
    let (srv_cert, srv_key) =
        ca::generate_server_cert(&issuing, &dns, &ips, not_before, 2 * YEAR, &mut rng)
            .map_err(|e| anyhow::anyhow!("generating the server certificate: {e}"))?;
    let srv_cert_path = data_dir.join(&cfg.pki.server_cert);
    let srv_key_path = data_dir.join(&cfg.pki.server_key);
    create_private_dir(parent(&srv_key_path)?)?;
    write_private(&srv_key_path, key_pem(&srv_key)?.as_bytes())?;
    write_public(&srv_cert_path, cert_pem(&srv_cert)?.as_bytes())?;

    // The demo manufacturer CA (stands for a meter maker's IDevID CA).
    let (mfr_cert, mfr_key) = ca::generate_root_ca(
        "Demo Meter Manufacturer CA",
        "Demo Meters Ltd",
        not_before,
        25 * YEAR,
        &mut rng,
    )
    .map_err(|e| anyhow::anyhow!("generating the manufacturer CA: {e}"))?;
    let mfr_cert_path = data_dir.join(
        cfg.pki
            .manufacturer_cas
            .first()
            .ok_or_else(|| anyhow::anyhow!("[pki] manufacturer_cas is empty"))?,
    );
    let mfr_key_path = mfr_cert_path.with_extension("key");
    create_private_dir(parent(&mfr_key_path)?)?;
    write_private(&mfr_key_path, key_pem(&mfr_key)?.as_bytes())?;
    write_public(&mfr_cert_path, cert_pem(&mfr_cert)?.as_bytes())?;

    // The store (PostgreSQL's was migrated above).
    if !storage.is_postgres() {
        let db_path = resolve(data_dir, &cfg.storage.database);
        let store = crate::store::SqliteStore::open(&db_path, 1)
            .map_err(|e| anyhow::anyhow!("creating the store: {e}"))?;
        store.close();
        safefs::set_mode(&db_path, safefs::PRIVATE_FILE)?;
    }

    // The configuration last: its presence marks a complete data directory.
    let mut config_text = match hsm {
        None => DEFAULT_CONFIG_TOML.to_owned(),
        Some(h) => config_with_hsm(h)?,
    };
    if storage != &StorageSection::default() {
        config_text = config_with_storage(&config_text, storage)?;
    }
    if storage.is_postgres() {
        write_private(&config_path, config_text.as_bytes())?;
    } else {
        write_public(&config_path, config_text.as_bytes())?;
    }
    Ok(InitReport {
        data_dir: data_dir.to_path_buf(),
        created: true,
    })
}

fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_owned()).to_string()
}

/// `text` (a configuration in the layout of [`DEFAULT_CONFIG_TOML`]) with the values of the
/// keys of `[section]` that `value_of` gives replaced; comments and other lines are kept.
fn with_section_values(
    text: &str,
    section: &str,
    value_of: impl Fn(&str) -> Option<String>,
) -> Result<String> {
    let header = format!("[{section}]");
    if !text.lines().any(|l| l.trim_end() == header) {
        bail!("the default configuration has no {header} section");
    }
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        // Only the section's lines: other sections have keys of the same names.
        if line.starts_with('[') {
            inside = line.trim_end() == header;
        }
        let key = line.split_once(" = ").map(|(k, _)| k).filter(|_| inside);
        match key.and_then(|k| Some((k, value_of(k)?))) {
            Some((k, value)) => out.push_str(&format!("{k} = {value}\n")),
            None => out.push_str(line),
        }
    }
    Ok(out)
}

/// The default configuration text with its `[hsm]` section filled in from `h`.
fn config_with_hsm(h: &HsmSection) -> Result<String> {
    let out = with_section_values(DEFAULT_CONFIG_TOML, "hsm", |key| {
        Some(match key {
            "enabled" => "true".to_owned(),
            "module" => toml_string(&h.module.to_string_lossy()),
            "token_label" => toml_string(&h.token_label),
            "key_label" => toml_string(&h.key_label),
            "pin_file" => toml_string(&h.pin_file.to_string_lossy()),
            "pin_env" => toml_string(&h.pin_env),
            "sessions" => h.sessions.to_string(),
            _ => return None,
        })
    })?;
    // What we wrote must read back as exactly what was asked.
    let parsed: Config = toml::from_str(&out).context("rendering the [hsm] configuration")?;
    if &parsed.hsm != h {
        bail!("rendering the [hsm] configuration lost a setting");
    }
    Ok(out)
}

/// `text` with its `[storage]` section set to `st`.
fn config_with_storage(text: &str, st: &StorageSection) -> Result<String> {
    let out = with_section_values(text, "storage", |key| {
        Some(match key {
            "backend" => toml_string(&st.backend),
            "database" => toml_string(&st.database.to_string_lossy()),
            "max_batch" => st.max_batch.to_string(),
            "url" => toml_string(&st.url),
            "pool_size" => st.pool_size.to_string(),
            "timeout_ms" => st.timeout_ms.to_string(),
            "ca_file" => toml_string(&st.ca_file.to_string_lossy()),
            _ => return None,
        })
    })?;
    let parsed: Config = toml::from_str(&out).context("rendering the [storage] configuration")?;
    if &parsed.storage != st {
        bail!("rendering the [storage] configuration lost a setting");
    }
    Ok(out)
}

/// The token and key `h` names, with `pin`.
pub fn hsm_key_ref<'a>(h: &'a HsmSection, pin: &'a cryptoki::types::AuthPin) -> hsm::HsmKeyRef<'a> {
    hsm::HsmKeyRef {
        module: &h.module,
        token_label: &h.token_label,
        key_label: &h.key_label,
        pin,
        sessions: h.sessions,
        curve: est_proto::ca::Curve::P256,
    }
}

fn parent(p: &Path) -> Result<&Path> {
    p.parent().context("path has no parent directory")
}

/// Everything the server needs from the data directory, loaded and checked.
pub struct Loaded {
    pub config: Config,
    pub data_dir: PathBuf,
    pub issuing_ca: IssuingCa,
    /// The P-384 issuing CA (`[ca_p384]`), when enabled.
    pub issuing_ca_p384: Option<IssuingCa>,
    pub server_chain: Vec<Vec<u8>>,
    pub server_key_pkcs8: Vec<u8>,
    pub manufacturer_cas: Vec<Vec<u8>>,
    pub database: PathBuf,
}

/// Resolve a configured path against the data directory.
pub fn resolve(data_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        data_dir.join(p)
    }
}

/// The configuration file to use: `explicit`, else the data directory's.
pub fn load_config(data_dir: &Path, explicit: Option<&Path>) -> Result<Config> {
    let path = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join(CONFIG_FILE));
    Ok(Config::load(&path)?)
}

/// How [`load_with`] treats private keys that group or others can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyPermissions {
    /// Refuse to load them (the default).
    #[default]
    Strict,
    /// Load them with a warning (`run --allow-insecure-key-permissions`).
    AllowInsecure,
}

/// Load keys and certificates named by `config`, refusing private keys that group or
/// others can read.
pub fn load(data_dir: &Path, config: Config) -> Result<Loaded> {
    load_with(data_dir, config, KeyPermissions::Strict)
}

/// [`load`], with the permission check of the CA and DTLS keys as given.
pub fn load_with(data_dir: &Path, config: Config, keys: KeyPermissions) -> Result<Loaded> {
    let allow_insecure = keys == KeyPermissions::AllowInsecure;
    let ca_cert = resolve(data_dir, &config.pki.issuing_ca_cert);
    let server_key = resolve(data_dir, &config.pki.server_key);
    safefs::check_key_permissions(&server_key, allow_insecure)?;
    let issuing_ca = if config.hsm.enabled {
        load_hsm_ca(data_dir, &ca_cert, &config.hsm)?
    } else {
        let ca_key = resolve(data_dir, &config.pki.issuing_ca_key);
        safefs::check_key_permissions(&ca_key, allow_insecure)?;
        load_ca(&ca_cert, &ca_key)?
    };
    let issuing_ca_p384 = crate::p384::load(data_dir, &config, allow_insecure)?;
    let server_chain = read_certs(&resolve(data_dir, &config.pki.server_cert))?;
    let server_key_pkcs8 = read_key(&server_key)?;
    let mut manufacturer_cas = Vec::new();
    for p in &config.pki.manufacturer_cas {
        manufacturer_cas.extend(read_certs(&resolve(data_dir, p))?);
    }
    // Distinct subjects: the policy tells IDevIDs from LDevIDs by their issuer.
    let ours = issuing_ca.certificate().tbs_certificate.subject.to_der()?;
    for m in &manufacturer_cas {
        let c = x509_cert::Certificate::from_der(m)?;
        if c.tbs_certificate.subject.to_der()? == ours {
            bail!("a manufacturer CA has the same subject as the issuing CA; they must differ");
        }
    }
    let database = resolve(data_dir, &config.storage.database);
    Ok(Loaded {
        config,
        data_dir: data_dir.to_path_buf(),
        issuing_ca,
        issuing_ca_p384,
        server_chain,
        server_key_pkcs8,
        manufacturer_cas,
        database,
    })
}
