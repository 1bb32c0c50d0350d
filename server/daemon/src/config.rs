//! The TOML configuration: typed, defaulted from the RFCs, units in the names, validated
//! with clear messages at the edge.
//!
//! [`DEFAULT_CONFIG_TOML`] is the documented file `est-server init` writes; a test checks
//! that it parses to exactly [`Config::default`], so the documentation cannot drift.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transport::CipherSuiteName;

/// Configuration errors, with the offending field named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub dtls: DtlsSection,
    pub coap: CoapSection,
    pub est: EstSection,
    pub policy: PolicySection,
    pub pki: PkiSection,
    pub storage: StorageSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// UDP address to listen on for coaps (RFC 7252 §6.2 default port 5684).
    pub listen: SocketAddr,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// A structured `metrics` log line (transport and EST counters) this often; 0 = never.
    pub metrics_log_interval_secs: u64,
    /// tokio worker threads (the DTLS and CoAP I/O); 0 = one per CPU core.
    pub worker_threads: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5684)),
            log_format: "text".into(),
            metrics_log_interval_secs: 60,
            worker_threads: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DtlsSection {
    /// Offered cipher suites: "ccm8" (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, RFC 7925
    /// mandatory), "gcm" (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256), "ccm".
    pub cipher_suites: Vec<String>,
    pub mtu_bytes: usize,
    pub flight_interval_ms: u64,
    pub handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_half_open_handshakes: usize,
    pub max_sessions: usize,
    /// Answer a ClientHello's use_srtp extension (RFC 5764) rather than refuse the handshake.
    pub answer_use_srtp: bool,
}

impl DtlsSection {
    /// The offered suites, in the configured order; an unknown name is refused with the field
    /// named. The one place that reads `dtls.cipher_suites`.
    pub fn cipher_suite_names(&self) -> Result<Vec<CipherSuiteName>, ConfigError> {
        self.cipher_suites
            .iter()
            .map(|s| match s.as_str() {
                "ccm8" => Ok(CipherSuiteName::Ccm8),
                "gcm" => Ok(CipherSuiteName::Gcm),
                "ccm" => Ok(CipherSuiteName::Ccm),
                _ => Err(invalid(
                    "dtls.cipher_suites",
                    format!("unknown suite {s:?} (use \"ccm8\", \"gcm\" or \"ccm\")"),
                )),
            })
            .collect()
    }
}

impl Default for DtlsSection {
    fn default() -> Self {
        Self {
            cipher_suites: vec!["ccm8".into(), "gcm".into()],
            mtu_bytes: 1152,
            flight_interval_ms: 1000,
            handshake_timeout_secs: 30,
            idle_timeout_secs: 120,
            max_half_open_handshakes: 1024,
            max_sessions: 20_000,
            answer_use_srtp: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapSection {
    pub ack_timeout_ms: u64,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    pub exchange_lifetime_secs: u64,
    pub non_lifetime_secs: u64,
    pub max_request_body_bytes: usize,
    pub max_dedup_entries: usize,
    pub max_block2_szx: u8,
    pub max_block1_szx: u8,
}

impl Default for CoapSection {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 2000,
            ack_random_factor: 1.5,
            max_retransmit: 4,
            exchange_lifetime_secs: 247,
            non_lifetime_secs: 145,
            max_request_body_bytes: 16 * 1024,
            max_dedup_entries: 64,
            max_block2_szx: 6,
            max_block1_szx: 6,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EstSection {
    pub max_csr_bytes: usize,
    pub max_concurrent_enrollments: usize,
    pub overload_retry_after_secs: u32,
    pub server_keygen: bool,
    pub c509_cert_content_format: u16,
    pub c509_pkcs10_content_format: u16,
}

impl Default for EstSection {
    fn default() -> Self {
        let d = est_proto::est::EstConfig::default();
        Self {
            max_csr_bytes: d.max_csr_bytes,
            max_concurrent_enrollments: d.max_concurrent_enrollments,
            overload_retry_after_secs: d.overload_retry_after_seconds,
            server_keygen: d.server_keygen,
            c509_cert_content_format: d.c509_cert_content_format,
            c509_pkcs10_content_format: d.c509_pkcs10_content_format,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    pub accept_expired_idevid: bool,
    pub require_device_allowlist: bool,
    pub ldevid_validity_days: u32,
    pub not_before_backdate_secs: u64,
    pub ldevid_organization: String,
    pub key_agreement: bool,
    pub max_chain_len: usize,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            accept_expired_idevid: false,
            require_device_allowlist: false,
            ldevid_validity_days: 365,
            not_before_backdate_secs: 300,
            ldevid_organization: String::new(),
            key_agreement: false,
            max_chain_len: 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PkiSection {
    pub issuing_ca_cert: PathBuf,
    pub issuing_ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub manufacturer_cas: Vec<PathBuf>,
}

impl Default for PkiSection {
    fn default() -> Self {
        Self {
            issuing_ca_cert: "ca/issuing-ca.pem".into(),
            issuing_ca_key: "ca/issuing-ca.key".into(),
            server_cert: "dtls/server.pem".into(),
            server_key: "dtls/server.key".into(),
            manufacturer_cas: vec!["manufacturers/demo-manufacturer-ca.pem".into()],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    pub database: PathBuf,
    pub max_batch: usize,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            database: "est.sqlite3".into(),
            max_batch: 256,
        }
    }
}

/// The documented configuration file written by `est-server init`. Every value here is
/// the built-in default.
pub const DEFAULT_CONFIG_TOML: &str = r#"# est-server configuration. Every setting is shown with its built-in default;
# delete a line to keep the default. Relative paths are relative to the data directory.

[server]
# UDP address for coaps (DTLS). RFC 7252 §6.2: the default coaps port is 5684.
listen = "0.0.0.0:5684"
# Log format: "text" (human) or "json" (one object per line). RUST_LOG sets the level.
log_format = "text"
# Log one structured "metrics" line (handshakes, sessions, drops over limits, final-flight
# resends, certificates issued/replayed/refused, 5.03 answers, enrollments in flight, store
# transactions and the operations grouped into them) this often. 0 turns it off.
metrics_log_interval_secs = 60
# Threads running the DTLS and CoAP I/O (tokio workers); 0 = one per CPU core. Enrollments
# (signing, the durable commit) run on a separate pool either way.
worker_threads = 0

[dtls]
# Cipher suites offered, in order: "ccm8" = TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (mandatory in
# RFC 7925 and RFC 9148), "gcm" = TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "ccm" = ..._CCM.
# The client's order decides among these; list only "ccm8" to force it.
cipher_suites = ["ccm8", "gcm"]
# Largest DTLS datagram we send during the handshake (handshake messages are fragmented to fit).
mtu_bytes = 1152
# Handshake flight retransmission interval.
flight_interval_ms = 1000
# A handshake not finished after this long is abandoned and its state freed.
handshake_timeout_secs = 30
# A session with no traffic for this long is closed.
idle_timeout_secs = 120
# Handshakes in progress at once; further ClientHellos are dropped (and counted) until one ends.
max_half_open_handshakes = 1024
# Established sessions at once; further handshakes are refused.
max_sessions = 20000
# DTLS stacks written for WebRTC (dimpl, for one) offer the use_srtp extension (RFC 5764) on
# every handshake. true: echo it (listing the SRTP profiles) and go on; no SRTP keys are ever
# exported, the session carries CoAP only. false: refuse such clients with a fatal
# insufficient_security alert (webrtc-dtls's behaviour when no profile matches).
answer_use_srtp = true

[coap]
# RFC 7252 §4.8 transmission parameters (used for the derived lifetimes below).
ack_timeout_ms = 2000
ack_random_factor = 1.5
max_retransmit = 4
# How long a Message ID is remembered for duplicate detection (RFC 7252 §4.8.2: 247 s).
exchange_lifetime_secs = 247
non_lifetime_secs = 145
# Largest request body reassembled from Block1 blocks; larger gets 4.13 with Size1.
max_request_body_bytes = 16384
# Remembered responses per session for duplicate detection (oldest evicted first).
max_dedup_entries = 64
# Largest block size exponent we use: block size = 2^(szx+4), 6 = 1024 bytes (RFC 7959).
max_block2_szx = 6
max_block1_szx = 6

[est]
# Largest certification request accepted (bytes); larger gets 4.13.
max_csr_bytes = 4096
# Enrollments processed at once; beyond it a meter gets 5.03 with Max-Age (RFC 9148 §4.7).
max_concurrent_enrollments = 256
# Max-Age (seconds to wait) sent with 5.03 when overloaded.
overload_retry_after_secs = 5
# Serve /skg and /skc (server-side key generation, RFC 9148 §4.8).
server_keygen = true
# Content-Formats for C509 (draft-ietf-cose-cbor-encoded-cert leaves them TBD; these are in
# the experimental range 65000-65535 until IANA assigns numbers).
c509_cert_content_format = 65003
c509_pkcs10_content_format = 65004

[policy]
# Accept manufacturer certificates (IDevIDs) past their notAfter (RFC 9148 §3 allows it).
accept_expired_idevid = false
# Only devices imported with `est-server devices import FILE` may enroll.
require_device_allowlist = false
# Validity of issued operational certificates (LDevIDs).
ldevid_validity_days = 365
# notBefore is set this far in the past, for meters whose clocks run behind.
not_before_backdate_secs = 300
# Organization (O) in issued LDevID subjects; empty for none. The subject is always
# CN=<serial>, serialNumber=<serial> from the authenticated IDevID, never the CSR's.
ldevid_organization = ""
# Add keyAgreement to KeyUsage (for ECDH-based DLMS/COSEM security suites).
key_agreement = false
# Longest client certificate chain accepted (leaf plus intermediates).
max_chain_len = 4

[pki]
issuing_ca_cert = "ca/issuing-ca.pem"
# Private key files must be readable by the server only (mode 0600).
issuing_ca_key = "ca/issuing-ca.key"
server_cert = "dtls/server.pem"
server_key = "dtls/server.key"
# Manufacturer CAs whose IDevIDs may enroll (PEM, one or more certificates per file).
manufacturer_cas = ["manufacturers/demo-manufacturer-ca.pem"]

[storage]
# SQLite database (WAL, synchronous=FULL): issued certificates, audit log, device allowlist.
database = "est.sqlite3"
# Most commits grouped into one fsync by the writer thread.
max_batch = 256
"#;

impl Config {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate TOML text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks, with the field named in the message.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            return Err(invalid("server.log_format", "must be \"text\" or \"json\""));
        }
        if self.server.worker_threads > 1024 {
            return Err(invalid(
                "server.worker_threads",
                "must be at most 1024 (0 = one per CPU core)",
            ));
        }
        if self.dtls.cipher_suites.is_empty() {
            return Err(invalid(
                "dtls.cipher_suites",
                "at least one suite is needed",
            ));
        }
        self.dtls.cipher_suite_names()?;
        if !(256..=16384).contains(&self.dtls.mtu_bytes) {
            return Err(invalid("dtls.mtu_bytes", "must be within 256..=16384"));
        }
        if self.dtls.handshake_timeout_secs == 0 || self.dtls.idle_timeout_secs == 0 {
            return Err(invalid("dtls.*_timeout_secs", "must be positive"));
        }
        if self.dtls.max_half_open_handshakes == 0 || self.dtls.max_sessions == 0 {
            return Err(invalid("dtls.max_*", "limits must be positive"));
        }
        if self.coap.ack_timeout_ms < 1000 {
            return Err(invalid(
                "coap.ack_timeout_ms",
                "RFC 7252 §4.8.1: must not be below 1000 ms",
            ));
        }
        if self.coap.ack_random_factor < 1.0 {
            return Err(invalid("coap.ack_random_factor", "must be >= 1.0"));
        }
        if self.coap.max_block2_szx > 6 || self.coap.max_block1_szx > 6 {
            return Err(invalid(
                "coap.max_block*_szx",
                "SZX is 0..=6 (16..1024 bytes)",
            ));
        }
        if self.coap.max_request_body_bytes < self.est.max_csr_bytes {
            return Err(invalid(
                "coap.max_request_body_bytes",
                "must be at least est.max_csr_bytes",
            ));
        }
        if self.est.max_concurrent_enrollments == 0 {
            return Err(invalid(
                "est.max_concurrent_enrollments",
                "must be positive",
            ));
        }
        if self.policy.ldevid_validity_days == 0 {
            return Err(invalid("policy.ldevid_validity_days", "must be positive"));
        }
        if self.pki.manufacturer_cas.is_empty() {
            return Err(invalid(
                "pki.manufacturer_cas",
                "at least one manufacturer CA is needed, or no device could ever enroll",
            ));
        }
        if self.storage.max_batch == 0 {
            return Err(invalid("storage.max_batch", "must be positive"));
        }
        Ok(())
    }

    /// The CoAP layer's settings.
    pub fn coap_config(&self) -> est_proto::coap::CoapConfig {
        est_proto::coap::CoapConfig {
            ack_timeout: Duration::from_millis(self.coap.ack_timeout_ms),
            ack_random_factor: self.coap.ack_random_factor,
            max_retransmit: self.coap.max_retransmit,
            exchange_lifetime: Duration::from_secs(self.coap.exchange_lifetime_secs),
            non_lifetime: Duration::from_secs(self.coap.non_lifetime_secs),
            max_request_body_bytes: self.coap.max_request_body_bytes,
            max_dedup_entries: self.coap.max_dedup_entries,
            max_block2_szx: self.coap.max_block2_szx,
            max_block1_szx: self.coap.max_block1_szx,
            ..est_proto::coap::CoapConfig::default()
        }
    }

    /// The EST layer's settings.
    pub fn est_config(&self) -> est_proto::est::EstConfig {
        est_proto::est::EstConfig {
            max_csr_bytes: self.est.max_csr_bytes,
            max_concurrent_enrollments: self.est.max_concurrent_enrollments,
            overload_retry_after_seconds: self.est.overload_retry_after_secs,
            server_keygen: self.est.server_keygen,
            c509_cert_content_format: self.est.c509_cert_content_format,
            c509_pkcs10_content_format: self.est.c509_pkcs10_content_format,
        }
    }

    /// The policy's settings.
    pub fn policy_config(&self) -> est_proto::policy::PolicyConfig {
        est_proto::policy::PolicyConfig {
            accept_expired_idevid: self.policy.accept_expired_idevid,
            require_device_allowlist: self.policy.require_device_allowlist,
            ldevid_validity: Duration::from_secs(
                u64::from(self.policy.ldevid_validity_days) * 86_400,
            ),
            not_before_backdate: Duration::from_secs(self.policy.not_before_backdate_secs),
            ldevid_organization: self.policy.ldevid_organization.clone(),
            key_agreement: self.policy.key_agreement,
            max_chain_len: self.policy.max_chain_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_file_is_exactly_the_defaults() {
        let parsed = Config::parse(DEFAULT_CONFIG_TOML, Path::new("default")).expect("parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let parsed = Config::parse("", Path::new("empty")).expect("parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn worker_threads_is_bounded() {
        let cfg = Config::parse("[server]\nworker_threads = 1\n", Path::new("x")).expect("parses");
        assert_eq!(cfg.server.worker_threads, 1);
        let err = Config::parse("[server]\nworker_threads = 5000\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("server.worker_threads"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse("[dtls]\nmtu = 5\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("mtu"), "{err}");
    }

    #[test]
    fn rfc_limits_are_enforced() {
        let err = Config::parse("[coap]\nack_timeout_ms = 500\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("coap.ack_timeout_ms"), "{err}");
        let err = Config::parse("[coap]\nmax_block2_szx = 7\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("szx"), "{err}");
        let err = Config::parse("[dtls]\ncipher_suites = [\"rc4\"]\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("rc4"), "{err}");
        let mut dtls = DtlsSection::default();
        assert_eq!(
            dtls.cipher_suite_names().unwrap(),
            [CipherSuiteName::Ccm8, CipherSuiteName::Gcm]
        );
        dtls.cipher_suites = vec!["ccm".into(), "ccm8".into(), "chacha".into()];
        let err = dtls.cipher_suite_names().unwrap_err();
        assert!(
            err.to_string().contains("dtls.cipher_suites") && err.to_string().contains("chacha"),
            "{err}"
        );
    }
}
