//! The TOML configuration: typed, defaulted from the RFCs, units in the names, validated
//! with clear messages at the edge.
//!
//! [`DEFAULT_CONFIG_TOML`] is the documented file `est-server init` writes; a test checks
//! that it parses to exactly [`Config::default`], so the documentation cannot drift.

use std::net::{IpAddr, SocketAddr};
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

/// `[dtls]`: the DTLS 1.2 engine (`est-dtls`). Every setting is documented, with its default,
/// in [`DEFAULT_CONFIG_TOML`]; [`Config::validate`] checks them together.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DtlsSection {
    /// Cipher suites, in the server's order of preference: "ccm8"
    /// (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, RFC 7925 mandatory), "gcm" (..._AES_128_GCM_SHA256),
    /// "gcm256" (..._AES_256_GCM_SHA384).
    pub cipher_suites: Vec<String>,
    pub mtu_bytes: usize,
    /// Initial handshake retransmission timeout; doubles up to `retransmit_max_ms`.
    pub flight_interval_ms: u64,
    pub retransmit_max_ms: u64,
    pub handshake_timeout_secs: u64,
    /// A handshake past the cookie that receives nothing for this long is abandoned.
    pub handshake_stall_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_half_open_handshakes: usize,
    pub max_half_open_per_ip: usize,
    pub max_sessions: usize,
    pub max_sessions_per_identity: usize,
    pub max_sessions_per_ip: usize,
    /// Source addresses exempt from the per-IP limits (DCU relays).
    pub session_limit_exempt_ips: Vec<IpAddr>,
    pub cookie_rotation_secs: u64,
    /// Length of the Connection IDs we issue (RFC 9146); 0 turns Connection ID off.
    pub cid_length: usize,
    /// Hex bytes every CID we issue starts with (a node id); shorter than `cid_length`.
    pub cid_prefix_hex: String,
    pub max_log_lines_per_sec: u32,
    pub final_flight_retention_secs: u64,
    pub extended_master_secret_required: bool,
    /// Answer a ClientHello's use_srtp extension (RFC 5764) rather than refuse the handshake.
    pub answer_use_srtp: bool,
    /// Send the whole chain of `pki.server_cert` in the handshake (true) or only the server's
    /// own certificate (false: meters must hold its issuer as their Implicit TA).
    pub send_chain: bool,
    /// RFC 7924 cached_info: a meter naming our certificate by its current fingerprint gets
    /// the fingerprint instead of the chain.
    pub cached_info: bool,
    /// The TLS certificate type number for C509 certificates (RFC 7250 negotiation; the draft's
    /// TBD5, a Private Use value 224..=255); 0 turns C509 in the handshake off.
    pub c509_certificate_type: u8,
}

/// Largest Connection ID the engine issues.
pub const MAX_CID_LENGTH: usize = 32;

impl DtlsSection {
    /// The offered suites, in the configured order; an unknown name is refused with the field
    /// named. The one place that reads `dtls.cipher_suites`.
    pub fn cipher_suite_names(&self) -> Result<Vec<CipherSuiteName>, ConfigError> {
        let known = CipherSuiteName::ALL
            .iter()
            .map(|s| format!("\"{}\"", s.config_name()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut out: Vec<CipherSuiteName> = Vec::new();
        for s in &self.cipher_suites {
            let suite = match CipherSuiteName::from_config_name(s) {
                Some(suite) => suite,
                None if s == "ccm" => {
                    return Err(invalid(
                        "dtls.cipher_suites",
                        format!(
                            "\"ccm\" (TLS_ECDHE_ECDSA_WITH_AES_128_CCM, 16-byte tag) is not \
                             implemented by the DTLS engine; use \"ccm8\" (the RFC 7925 suite) \
                             or one of {known}"
                        ),
                    ))
                }
                None => {
                    return Err(invalid(
                        "dtls.cipher_suites",
                        format!("unknown suite {s:?} (use one of {known})"),
                    ))
                }
            };
            if out.contains(&suite) {
                return Err(invalid(
                    "dtls.cipher_suites",
                    format!("{s:?} is listed twice"),
                ));
            }
            out.push(suite);
        }
        Ok(out)
    }

    /// `cid_prefix_hex` as bytes.
    pub fn cid_prefix(&self) -> Result<Vec<u8>, ConfigError> {
        let t = self.cid_prefix_hex.trim();
        if !t.len().is_multiple_of(2) || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "dtls.cid_prefix_hex",
                format!("{t:?} is not an even number of hex digits"),
            ));
        }
        Ok((0..t.len())
            .step_by(2)
            .filter_map(|i| t.get(i..i + 2))
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect())
    }
}

impl Default for DtlsSection {
    fn default() -> Self {
        Self {
            cipher_suites: vec!["ccm8".into(), "gcm".into()],
            mtu_bytes: 1152,
            flight_interval_ms: 1000,
            retransmit_max_ms: 60_000,
            handshake_timeout_secs: 60,
            handshake_stall_timeout_secs: 30,
            idle_timeout_secs: 120,
            max_half_open_handshakes: 1024,
            max_half_open_per_ip: 1024,
            max_sessions: 20_000,
            max_sessions_per_identity: 4,
            max_sessions_per_ip: 20_000,
            session_limit_exempt_ips: Vec::new(),
            cookie_rotation_secs: 60,
            cid_length: 4,
            cid_prefix_hex: String::new(),
            max_log_lines_per_sec: 20,
            final_flight_retention_secs: 240,
            extended_master_secret_required: true,
            answer_use_srtp: false,
            send_chain: true,
            cached_info: true,
            c509_certificate_type: 224,
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
# Cipher suites, in the server's order of preference (the first the client also offers wins):
# "ccm8" = TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (mandatory in RFC 7925 and RFC 9148),
# "gcm" = TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "gcm256" = TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384.
# List only "ccm8" to force it. (The 16-byte-tag AES_128_CCM suite is not implemented.)
cipher_suites = ["ccm8", "gcm"]
# Largest DTLS datagram we send (handshake messages are fragmented to fit, 256..16384).
mtu_bytes = 1152
# Handshake flight retransmission: the first resend after flight_interval_ms (or after three
# times the round trip the cookie exchange measured, if longer: RFC 6298's first RTO, so slow
# paths get no early resends), then the interval doubles up to retransmit_max_ms (RFC 6347
# §4.2.4.1).
flight_interval_ms = 1000
retransmit_max_ms = 60000
# A handshake not finished after this long is abandoned and its state freed. Meters on slow
# meshes back off exponentially from several seconds (RFC 7925 §11 recommends 9 s): their
# fourth flight can come ~50 s after the first.
handshake_timeout_secs = 60
# A handshake past the cookie exchange that receives nothing for this long is abandoned
# (at most handshake_timeout_secs); it must outlast a backed-off meter's gap between two
# retransmissions. At the half-open cap the oldest handshake gives way anyway.
handshake_stall_timeout_secs = 30
# A session with no traffic for this long is closed.
idle_timeout_secs = 120
# Handshakes past the cookie exchange at once (at most max_sessions); at the cap the oldest
# gives way to the newest. Before the cookie exchange the server keeps no state at all.
max_half_open_handshakes = 1024
# ... of them from one source IP address (at most max_half_open_handshakes).
max_half_open_per_ip = 1024
# Established sessions plus handshakes in progress; over it a handshake is refused with a
# fatal alert.
max_sessions = 20000
# Established sessions of one device (its serial number); a new one replaces the oldest.
max_sessions_per_identity = 4
# Established sessions from one source IP address (at most max_sessions). Meters behind one
# NAT share an address; lower it where meters have their own.
max_sessions_per_ip = 20000
# Source addresses exempt from both per-IP limits, e.g. DCU relays: ["192.0.2.10", "2001:db8::1"].
session_limit_exempt_ips = []
# The stateless cookie key (RFC 6347 §4.2.1) is replaced this often; a cookie stays valid
# for one to two intervals.
cookie_rotation_secs = 60
# Length of the Connection IDs we issue (RFC 9146, 1..32 bytes); 0 = Connection ID off.
# With a CID a meter whose NAT changes its address or port keeps its session.
cid_length = 4
# Bytes every CID we issue starts with, in hex (a node id for CID-routing load balancers);
# must be shorter than cid_length. "" = none.
cid_prefix_hex = ""
# Log lines about remote peers (refusals, alerts) per second, in total; the rest are only
# counted (log_lines_suppressed in the metrics line).
max_log_lines_per_sec = 20
# How long our final handshake flight is kept to answer a client that repeats its last
# flight (RFC 6347 §4.2.4: 2 x MSL), unless its application data shows it has ours.
final_flight_retention_secs = 240
# Refuse clients that do not offer extended_master_secret (RFC 7627, advised by RFC 9148 §3).
extended_master_secret_required = true
# DTLS stacks written for WebRTC (dimpl, for one) offer the use_srtp extension (RFC 5764) on
# every handshake and give up when the server does not answer it. true: echo one SRTP profile
# and go on (no SRTP keys are ever exported; the session carries CoAP only). Needed only for
# such WebRTC-derived clients; meters' stacks (Mbed TLS, wolfSSL, tinydtls, OpenSSL) never
# offer it. false: the offer is ignored, and such clients give up.
answer_use_srtp = false
# Send the whole chain of pki.server_cert in the handshake (true), or only the server's own
# certificate (false). false saves the bytes of every intermediate on every handshake (a few
# hundred each, several 802.15.4 frames on a mesh), but then every meter must hold the server
# certificate's issuer as a trust anchor (its Implicit TA, RFC 9148 §3): a meter that holds
# only the root fails the handshake (unknown_ca). With a file holding one certificate (what
# `est-server init` writes) both are the same.
send_chain = true
# RFC 7924 cached_info, which RFC 7925 §4.4 makes REQUIRED: a meter that already holds our
# certificate names it by its SHA-256 fingerprint and gets the 33-byte fingerprint instead of
# the chain; a stale fingerprint gets the full chain. false: the extension is ignored.
cached_info = true
# C509 certificates inside the handshake (draft-ietf-cose-cbor-encoded-cert, negotiated with
# RFC 7250's client_certificate_type and server_certificate_type): a meter that offers C509
# sends its IDevID as C509 (284 B instead of 547 for `factory mint` ones) and gets ours as C509;
# the chain is verified as its exact DER equivalent (the type-3 re-encoding is lossless). The
# draft leaves the type number unassigned (TBD5): this is a Private Use value of the TLS
# Certificate Types registry (224-255), which both ends must agree on. 0 = off (X.509 only);
# clients that do not offer it get X.509 either way.
c509_certificate_type = 224

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
        self.validate_dtls()?;
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

    /// `[dtls]`: each value in range and the settings consistent with each other.
    fn validate_dtls(&self) -> Result<(), ConfigError> {
        let d = &self.dtls;
        if d.c509_certificate_type != 0 && d.c509_certificate_type < 224 {
            return Err(invalid(
                "dtls.c509_certificate_type",
                format!(
                    "{} is not in the Private Use range 224..=255 of the TLS Certificate Types \
                     registry (0 turns C509 off)",
                    d.c509_certificate_type
                ),
            ));
        }
        if d.cipher_suites.is_empty() {
            return Err(invalid(
                "dtls.cipher_suites",
                "at least one suite is needed",
            ));
        }
        d.cipher_suite_names()?;
        if !(256..=16384).contains(&d.mtu_bytes) {
            return Err(invalid("dtls.mtu_bytes", "must be within 256..=16384"));
        }
        if d.flight_interval_ms == 0 {
            return Err(invalid("dtls.flight_interval_ms", "must be positive"));
        }
        if d.retransmit_max_ms < d.flight_interval_ms {
            return Err(invalid(
                "dtls.retransmit_max_ms",
                format!(
                    "{} is below dtls.flight_interval_ms ({}): the retransmission interval \
                     starts at flight_interval_ms and doubles up to retransmit_max_ms",
                    d.retransmit_max_ms, d.flight_interval_ms
                ),
            ));
        }
        for (field, v) in [
            ("dtls.handshake_timeout_secs", d.handshake_timeout_secs),
            (
                "dtls.handshake_stall_timeout_secs",
                d.handshake_stall_timeout_secs,
            ),
            ("dtls.idle_timeout_secs", d.idle_timeout_secs),
            ("dtls.cookie_rotation_secs", d.cookie_rotation_secs),
            (
                "dtls.final_flight_retention_secs",
                d.final_flight_retention_secs,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if d.handshake_stall_timeout_secs > d.handshake_timeout_secs {
            return Err(invalid(
                "dtls.handshake_stall_timeout_secs",
                format!(
                    "{} exceeds dtls.handshake_timeout_secs ({}), which ends every handshake first",
                    d.handshake_stall_timeout_secs, d.handshake_timeout_secs
                ),
            ));
        }
        if d.handshake_stall_timeout_secs.saturating_mul(1000) <= d.flight_interval_ms {
            return Err(invalid(
                "dtls.handshake_stall_timeout_secs",
                format!(
                    "must be longer than dtls.flight_interval_ms ({} ms), or a handshake is \
                     abandoned before a lost flight can be resent",
                    d.flight_interval_ms
                ),
            ));
        }
        for (field, v) in [
            ("dtls.max_half_open_handshakes", d.max_half_open_handshakes),
            ("dtls.max_half_open_per_ip", d.max_half_open_per_ip),
            ("dtls.max_sessions", d.max_sessions),
            (
                "dtls.max_sessions_per_identity",
                d.max_sessions_per_identity,
            ),
            ("dtls.max_sessions_per_ip", d.max_sessions_per_ip),
        ] {
            if v == 0 {
                return Err(invalid(field, "limits must be at least 1"));
            }
        }
        if d.max_half_open_handshakes > d.max_sessions {
            return Err(invalid(
                "dtls.max_half_open_handshakes",
                format!(
                    "{} exceeds dtls.max_sessions ({}), which counts handshakes in progress too",
                    d.max_half_open_handshakes, d.max_sessions
                ),
            ));
        }
        if d.max_half_open_per_ip > d.max_half_open_handshakes {
            return Err(invalid(
                "dtls.max_half_open_per_ip",
                format!(
                    "{} exceeds dtls.max_half_open_handshakes ({})",
                    d.max_half_open_per_ip, d.max_half_open_handshakes
                ),
            ));
        }
        if d.max_sessions_per_ip > d.max_sessions {
            return Err(invalid(
                "dtls.max_sessions_per_ip",
                format!(
                    "{} exceeds dtls.max_sessions ({})",
                    d.max_sessions_per_ip, d.max_sessions
                ),
            ));
        }
        if d.max_sessions_per_identity > d.max_sessions {
            return Err(invalid(
                "dtls.max_sessions_per_identity",
                format!(
                    "{} exceeds dtls.max_sessions ({})",
                    d.max_sessions_per_identity, d.max_sessions
                ),
            ));
        }
        if let Some(ip) = d
            .session_limit_exempt_ips
            .iter()
            .find(|ip| ip.is_unspecified())
        {
            return Err(invalid(
                "dtls.session_limit_exempt_ips",
                format!("{ip} is no source address; list the relays' own addresses"),
            ));
        }
        if d.cid_length > MAX_CID_LENGTH {
            return Err(invalid(
                "dtls.cid_length",
                format!("must be at most {MAX_CID_LENGTH} (0 = Connection ID off)"),
            ));
        }
        let prefix = d.cid_prefix()?;
        if d.cid_length == 0 && !prefix.is_empty() {
            return Err(invalid(
                "dtls.cid_prefix_hex",
                "must be empty when dtls.cid_length = 0 (Connection ID off)",
            ));
        }
        if d.cid_length > 0 && prefix.len() >= d.cid_length {
            return Err(invalid(
                "dtls.cid_prefix_hex",
                format!(
                    "{} bytes, must be shorter than dtls.cid_length ({}) to leave room for \
                     the per-session part",
                    prefix.len(),
                    d.cid_length
                ),
            ));
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
        dtls.cipher_suites = vec!["ccm8".into(), "chacha".into()];
        let err = dtls.cipher_suite_names().unwrap_err();
        assert!(
            err.to_string().contains("dtls.cipher_suites") && err.to_string().contains("chacha"),
            "{err}"
        );
    }

    fn dtls_err(toml: &str) -> String {
        Config::parse(&format!("[dtls]\n{toml}\n"), Path::new("x"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn cipher_suites_are_named_in_preference_order_and_ccm_is_refused_with_alternatives() {
        let cfg = Config::parse(
            "[dtls]\ncipher_suites = [\"gcm256\", \"ccm8\", \"gcm\"]\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            cfg.dtls.cipher_suite_names().unwrap(),
            [
                CipherSuiteName::Gcm256,
                CipherSuiteName::Ccm8,
                CipherSuiteName::Gcm
            ]
        );
        let err = dtls_err("cipher_suites = [\"ccm8\", \"ccm\"]");
        assert!(
            err.contains("dtls.cipher_suites")
                && err.contains("not implemented")
                && err.contains("\"ccm8\"")
                && err.contains("\"gcm\"")
                && err.contains("\"gcm256\""),
            "{err}"
        );
        assert!(dtls_err("cipher_suites = []").contains("at least one"));
        assert!(dtls_err("cipher_suites = [\"gcm\", \"gcm\"]").contains("twice"));
    }

    #[test]
    fn dtls_cross_field_rules_name_both_fields() {
        let err = dtls_err("flight_interval_ms = 2000\nretransmit_max_ms = 1000");
        assert!(
            err.contains("dtls.retransmit_max_ms") && err.contains("flight_interval_ms"),
            "{err}"
        );
        let err = dtls_err("handshake_timeout_secs = 5\nhandshake_stall_timeout_secs = 6");
        assert!(
            err.contains("dtls.handshake_stall_timeout_secs")
                && err.contains("handshake_timeout_secs"),
            "{err}"
        );
        let err = dtls_err("flight_interval_ms = 5000\nhandshake_stall_timeout_secs = 5");
        assert!(err.contains("dtls.handshake_stall_timeout_secs"), "{err}");
        let err = dtls_err("max_sessions = 100");
        assert!(
            err.contains("dtls.max_half_open_handshakes") && err.contains("max_sessions"),
            "{err}"
        );
        let err = dtls_err(
            "max_sessions = 100\nmax_half_open_handshakes = 10\nmax_half_open_per_ip = 10",
        );
        assert!(err.contains("dtls.max_sessions_per_ip"), "{err}");
        let err = dtls_err("max_half_open_per_ip = 2000");
        assert!(err.contains("dtls.max_half_open_per_ip"), "{err}");
        let err = dtls_err("max_sessions_per_identity = 0");
        assert!(err.contains("dtls.max_sessions_per_identity"), "{err}");
        let err = dtls_err("cookie_rotation_secs = 0");
        assert!(err.contains("dtls.cookie_rotation_secs"), "{err}");
        let err = dtls_err("final_flight_retention_secs = 0");
        assert!(err.contains("dtls.final_flight_retention_secs"), "{err}");
        // A consistent set of lower limits is fine.
        Config::parse(
            "[dtls]\nmax_sessions = 100\nmax_half_open_handshakes = 10\n\
             max_half_open_per_ip = 10\nmax_sessions_per_ip = 100\n",
            Path::new("x"),
        )
        .unwrap();
    }

    #[test]
    fn connection_id_settings() {
        let cfg = Config::parse(
            "[dtls]\ncid_length = 6\ncid_prefix_hex = \"0A0b\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(cfg.dtls.cid_prefix().unwrap(), [0x0a, 0x0b]);
        assert_eq!(
            DtlsSection::default().cid_prefix().unwrap(),
            Vec::<u8>::new()
        );
        let err = dtls_err("cid_length = 2\ncid_prefix_hex = \"0a0b\"");
        assert!(
            err.contains("dtls.cid_prefix_hex") && err.contains("cid_length"),
            "{err}"
        );
        let err = dtls_err("cid_length = 0\ncid_prefix_hex = \"0a\"");
        assert!(err.contains("dtls.cid_prefix_hex"), "{err}");
        assert!(dtls_err("cid_prefix_hex = \"abc\"").contains("hex"));
        assert!(dtls_err("cid_prefix_hex = \"zz\"").contains("hex"));
        assert!(dtls_err("cid_length = 33").contains("dtls.cid_length"));
        // 0 turns Connection ID off.
        Config::parse("[dtls]\ncid_length = 0\n", Path::new("x")).unwrap();
    }

    #[test]
    fn exempt_ips_are_addresses() {
        let cfg = Config::parse(
            "[dtls]\nsession_limit_exempt_ips = [\"192.0.2.10\", \"2001:db8::1\"]\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(cfg.dtls.session_limit_exempt_ips.len(), 2);
        let err = dtls_err("session_limit_exempt_ips = [\"relay-1\"]");
        assert!(err.contains("session_limit_exempt_ips"), "{err}");
        let err = dtls_err("session_limit_exempt_ips = [\"0.0.0.0\"]");
        assert!(err.contains("dtls.session_limit_exempt_ips"), "{err}");
        // C509 in the handshake: a Private Use type number, or 0 (off).
        for ok in [0u8, 224, 255] {
            Config::parse(
                &format!("[dtls]\nc509_certificate_type = {ok}\n"),
                Path::new("x"),
            )
            .unwrap();
        }
        let err = dtls_err("c509_certificate_type = 2");
        assert!(err.contains("dtls.c509_certificate_type"), "{err}");
    }

    #[test]
    fn documented_dtls_defaults() {
        let d = DtlsSection::default();
        assert_eq!(d.retransmit_max_ms, 60_000);
        assert_eq!(d.handshake_stall_timeout_secs, 30);
        assert_eq!(d.handshake_timeout_secs, 60);
        assert!(d.send_chain && d.cached_info);
        assert_eq!(d.c509_certificate_type, 224);
        assert_eq!(d.max_half_open_per_ip, 1024);
        assert_eq!(d.max_sessions_per_identity, 4);
        assert_eq!(d.max_sessions_per_ip, 20_000);
        assert!(d.session_limit_exempt_ips.is_empty());
        assert_eq!(d.cookie_rotation_secs, 60);
        assert_eq!(d.cid_length, 4);
        assert_eq!(d.cid_prefix_hex, "");
        assert_eq!(d.max_log_lines_per_sec, 20);
        assert_eq!(d.final_flight_retention_secs, 240);
        assert!(d.extended_master_secret_required);
        assert!(!d.answer_use_srtp);
        // Every field of the section is written out in the documented file.
        let table = toml::to_string(&d).unwrap();
        for line in table.lines() {
            let key = line.split('=').next().unwrap().trim();
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("\n{key} = ")),
                "{key} is not documented in DEFAULT_CONFIG_TOML"
            );
        }
    }
}
