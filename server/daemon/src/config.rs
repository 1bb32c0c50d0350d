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
    pub hsm: crate::hsm::HsmSection,
    pub enrollment: EnrollmentSection,
    pub revocation: RevocationSection,
    pub metrics: MetricsSection,
    pub relay: RelaySection,
    pub ca_p384: crate::p384::CaP384Section,
    pub dlms: crate::dlms_config::DlmsSection,
    /// `[[profiles]]`: certificate profiles (none by default).
    pub profiles: Vec<crate::profiles_config::ProfileSection>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// TCP address of the `/metrics` HTTP endpoint, e.g. "127.0.0.1:9184"; "" = off.
    pub listen: String,
}

impl MetricsSection {
    /// The address to listen on, if the endpoint is on.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let t = self.listen.trim();
        if t.is_empty() {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| {
            invalid(
                "metrics.listen",
                format!("{t:?} is not an address:port (e.g. \"127.0.0.1:9184\")"),
            )
        })
    }
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
    /// tokio worker threads (the DTLS engine, CoAP sessions, signing); 0 = one per CPU core.
    pub worker_threads: usize,
    /// Warn (at start and in every metrics line) when the issuing CA or the DTLS server
    /// certificate has fewer days left than this.
    pub certificate_warn_days: u32,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5684)),
            log_format: "text".into(),
            metrics_log_interval_secs: 60,
            worker_threads: 0,
            certificate_warn_days: 30,
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
    /// SO_RCVBUF asked for the UDP socket; 0 leaves the OS default.
    pub socket_receive_buffer_bytes: usize,
    /// Independent DTLS engines (each a task, so handshakes use several cores).
    pub engine_shards: usize,
    /// Send the whole chain of `pki.server_cert` in the handshake (true) or only the server's
    /// own certificate (false: meters must hold its issuer as their Implicit TA).
    pub send_chain: bool,
    /// RFC 7924 cached_info: a meter naming our certificate by its current fingerprint gets
    /// the fingerprint instead of the chain.
    pub cached_info: bool,
    /// The TLS certificate type number for C509 certificates (RFC 7250 negotiation; the draft's
    /// TBD5, a Private Use value 224..=255); 0 turns C509 in the handshake off.
    pub c509_certificate_type: u8,
    /// Established sessions waiting for a session task; over it a new session is closed.
    pub accept_queue_sessions: usize,
    /// Plaintext datagrams queued for one session task; over it they are dropped.
    pub session_queue_datagrams: usize,
    /// Bytes queued for one session task (at least `mtu_bytes`).
    pub session_queue_bytes: usize,
    /// Commands (sends, closes) from session tasks to the DTLS driver.
    pub command_queue_len: usize,
    /// Datagrams waiting for one engine shard (with `engine_shards` > 1).
    pub shard_inbox_datagrams: usize,
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
            socket_receive_buffer_bytes: 4 * 1024 * 1024,
            engine_shards: 1,
            send_chain: true,
            cached_info: true,
            c509_certificate_type: 224,
            accept_queue_sessions: 1024,
            session_queue_datagrams: 32,
            session_queue_bytes: 32 * 1024,
            command_queue_len: 4096,
            shard_inbox_datagrams: 1024,
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
    pub max_pending_requests: usize,
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
            max_pending_requests: 4,
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
    pub cose_c509_content_format: u16,
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
            cose_c509_content_format: d.cose_c509_content_format,
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
    /// CRLs of the manufacturer CAs (DER or PEM); IDevIDs they list are refused at the
    /// handshake. Each must verify against one of `manufacturer_cas`.
    pub manufacturer_crls: Vec<PathBuf>,
}

impl Default for PkiSection {
    fn default() -> Self {
        Self {
            issuing_ca_cert: "ca/issuing-ca.pem".into(),
            issuing_ca_key: "ca/issuing-ca.key".into(),
            server_cert: "dtls/server.pem".into(),
            server_key: "dtls/server.key".into(),
            manufacturer_cas: vec!["manufacturers/demo-manufacturer-ca.pem".into()],
            manufacturer_crls: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `"sqlite"` (the embedded default: one node, one file) or `"postgres"` (N nodes on one
    /// database).
    pub backend: String,
    /// The SQLite file (backend `"sqlite"`).
    pub database: PathBuf,
    /// Most commits grouped into one transaction (both backends).
    pub max_batch: usize,
    /// PostgreSQL connection string (backend `"postgres"`): a URL
    /// (`postgres://user:password@host:5432/est`) or libpq key=value pairs
    /// (`host=/run/postgresql dbname=est user=est`).
    pub url: String,
    /// PostgreSQL connections per node (backend `"postgres"`): half write the commits, the
    /// others serve the reads of enrollments and operator commands.
    pub pool_size: usize,
    /// How long a PostgreSQL read or commit may take, connecting included, before the
    /// enrollment is answered 5.03 + Max-Age (the meter retries later).
    pub timeout_ms: u64,
    /// The CA certificate(s) (PEM or DER) the PostgreSQL server's certificate must chain to,
    /// for `sslmode=verify-ca` or `verify-full` in `url` (relative to the data directory);
    /// "" = none.
    pub ca_file: PathBuf,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: "sqlite".into(),
            database: "est.sqlite3".into(),
            max_batch: 256,
            url: String::new(),
            pool_size: 16,
            timeout_ms: 5000,
            ca_file: PathBuf::new(),
        }
    }
}

impl StorageSection {
    /// Whether the PostgreSQL backend is configured.
    pub fn is_postgres(&self) -> bool {
        self.backend == "postgres"
    }
}

/// `[enrollment]`: how often one device may be issued a certificate.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollmentSection {
    /// Certificates (sen, sren, skg, skc) one device may be issued per `period_secs`,
    /// counted from the store; 0 = no limit.
    pub max_per_device_per_period: u32,
    pub period_secs: u64,
}

impl Default for EnrollmentSection {
    fn default() -> Self {
        Self {
            max_per_device_per_period: 0,
            period_secs: 86_400,
        }
    }
}

/// `[revocation]`: our CRL and how revocations reach the running server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RevocationSection {
    /// Where the CRL is written (DER; the same CRL in PEM beside it, with `.pem` appended).
    pub crl_file: PathBuf,
    /// nextUpdate = thisUpdate + this. The server re-issues the CRL on every revocation and
    /// when half of this has passed.
    pub crl_validity_hours: u32,
    /// CoAP resource that serves the CRL (GET), e.g. "/crl"; "" = not served.
    pub coap_path: String,
    /// Content-Format of the CRL resource (no CoAP number is registered for
    /// application/pkix-crl; 65005 is in the experimental range).
    pub content_format: u16,
    /// URIs put in a cRLDistributionPoints extension of every certificate the P-256 issuing CA
    /// issues (its CRL); [] = none.
    pub distribution_points: Vec<String>,
    /// The same for the P-384 issuing CA of `[ca_p384]`: the URIs of its own CRL (served at
    /// `coap_path` with "-p384"); [] (default) = none.
    pub distribution_points_p384: Vec<String>,
    /// How often the running server looks for revocations made by the CLI.
    pub poll_interval_secs: u64,
    /// Audit rows for handshakes refused by revocation, per second at most (the rest are
    /// counted and logged): a revoked certificate is public, so anyone can present one.
    pub max_handshake_audit_per_sec: u32,
}

impl Default for RevocationSection {
    fn default() -> Self {
        Self {
            crl_file: "crl/issuing-ca.crl".into(),
            crl_validity_hours: 24,
            coap_path: "/crl".into(),
            content_format: est_proto::est::CF_PKIX_CRL_DEFAULT,
            distribution_points: Vec::new(),
            distribution_points_p384: Vec::new(),
            poll_interval_secs: 2,
            max_handshake_audit_per_sec: 10,
        }
    }
}

impl RevocationSection {
    /// `coap_path` as path segments (empty: not served).
    pub fn coap_segments(&self) -> Vec<String> {
        self.coap_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The PEM copy of the CRL file.
    pub fn crl_pem_file(&self) -> PathBuf {
        Self::pem_path(&self.crl_file)
    }

    /// `file` with ".pem" appended.
    pub fn pem_path(file: &Path) -> PathBuf {
        let mut p = file.to_path_buf().into_os_string();
        p.push(".pem");
        PathBuf::from(p)
    }

    /// The P-384 issuing CA's CRL file (DER): `crl_file` with "-p384" before its extension
    /// (`crl/issuing-ca.crl` → `crl/issuing-ca-p384.crl`); the PEM copy adds ".pem".
    pub fn crl_p384_file(&self) -> PathBuf {
        let stem = self
            .crl_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match self.crl_file.extension() {
            Some(ext) => format!("{stem}-p384.{}", ext.to_string_lossy()),
            None => format!("{stem}-p384"),
        };
        self.crl_file.with_file_name(name)
    }

    /// The CoAP resource of the P-384 issuing CA's CRL: `coap_path` with "-p384" appended
    /// (`/crl` → `/crl-p384`); empty when `coap_path` is.
    pub fn coap_p384_segments(&self) -> Vec<String> {
        let mut segs = self.coap_segments();
        if let Some(last) = segs.last_mut() {
            last.push_str("-p384");
        }
        segs
    }
}

/// `[relay]`: est-server as the registrar of stateless join proxies (DCU relays,
/// draft-ietf-anima-constrained-join-proxy). Off unless `jpy_listen` is set.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySection {
    /// UDP address of the JPY port; `None`: no JPY listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpy_listen: Option<SocketAddr>,
    /// Join proxies allowed to send JPY (addresses or prefixes, "192.0.2.0/24").
    pub allowed_proxies: Vec<String>,
    /// The `jpy://` URI announced by `GET /.well-known/core?rt=brski.rjp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpy_uri: Option<String>,
    /// Longest JPY header accepted.
    pub max_header_bytes: usize,
    pub max_half_open_per_relay: usize,
    pub max_sessions_per_relay: usize,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            jpy_listen: None,
            allowed_proxies: Vec::new(),
            jpy_uri: None,
            max_header_bytes: 64,
            max_half_open_per_relay: 512,
            max_sessions_per_relay: 20_000,
        }
    }
}

impl RelaySection {
    /// `allowed_proxies` parsed.
    pub fn allowed_prefixes(&self) -> Result<Vec<est_dtls::IpPrefix>, ConfigError> {
        self.allowed_proxies
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|e: String| invalid("relay.allowed_proxies", e))
            })
            .collect()
    }

    /// The URI to announce, given the JPY socket's bound address: `jpy_uri` if set, else
    /// `jpy://ADDR:PORT` of the socket when it is bound to a specific address.
    pub fn announced_uri(&self, bound: SocketAddr) -> Option<String> {
        match &self.jpy_uri {
            Some(u) => Some(u.clone()),
            None if bound.ip().is_unspecified() => None,
            None => Some(format!("jpy://{bound}")),
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
# Threads running the DTLS engine, the CoAP sessions and the certificate signing (tokio
# workers); 0 = one per CPU core. The durable commit runs on the store's own writer thread
# either way. On a box shared with other busy work (a load generator, say), 1 costs about 10%
# less CPU per enrollment than 2 (fewer thread hand-offs; docs/benchmarks.md), but caps the
# server near one core.
worker_threads = 0
# Days left on the issuing CA and on the DTLS server certificate are logged at start and in
# every metrics line; under this many, as a warning. (An expired CA refuses to start.)
certificate_warn_days = 30

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
# SO_RCVBUF asked for the UDP socket: room for bursts of handshake flights while the driver is
# busy (0 = the OS default, often 208 KiB). Linux caps it at net.core.rmem_max; a smaller
# buffer than asked is logged at start.
socket_receive_buffer_bytes = 4194304
# Independent DTLS engines ("shards"), each driven by a task of its own. One engine does every
# handshake's ECDHE, signatures and chain checks on one core: about 3,000 handshakes/s at most
# (docs/benchmarks.md), whatever the machine. With N > 1 a dispatcher reads the socket and
# hands each datagram to a shard: by the shard byte the Connection ID carries after
# cid_prefix_hex (so cid_length must leave that byte and 2 random bytes), otherwise by a keyed
# hash of the peer (address and port, or join proxy and header). Every cap above
# (max_half_open_*, max_sessions*, max_log_lines_per_sec) is shared out among the shards,
# rounded up; max_sessions_per_identity holds across all shards. Set it to the cores the server may
# use (1..256); 1 = no dispatcher (the least CPU per handshake on a 1-2 core machine).
engine_shards = 1
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
# sends its IDevID as C509 (285 B instead of 547 for `factory mint` ones) and gets ours as C509;
# the chain is verified as its exact DER equivalent (the type-3 re-encoding is lossless). The
# draft leaves the type number unassigned (TBD5): this is a Private Use value of the TLS
# Certificate Types registry (224-255), which both ends must agree on. 0 = off (X.509 only);
# clients that do not offer it get X.509 either way.
c509_certificate_type = 224
# The DTLS driver's queues (docs/limits.md adds them up). Established sessions waiting for a
# session task (max_sessions where that is lower); over it a new session is closed at once
# (est_dtls_sessions_dropped_accept_queue_full).
accept_queue_sessions = 1024
# Decrypted datagrams waiting for one session's task: at most this many and this many bytes
# (at least mtu_bytes); the rest are dropped (est_dtls_dropped_queue_full) and the meter's CoAP
# retransmits. The byte budget bounds what a session that does not keep up can hold: DTLS
# allows 16 KiB records. 32768 holds 28 full 1,152-byte datagrams.
session_queue_datagrams = 32
session_queue_bytes = 32768
# Commands from session tasks to the driver (datagrams to send, closes). A sending task waits
# for room; a close request from a dropped session is lost when it is full
# (est_dtls_close_commands_dropped) and that session ends at idle_timeout_secs. With
# engine_shards > 1, another shard's order to close a session of an identity over its limit
# waits for room (est_dtls_supersedes_deferred); the identity holds one session over its limit
# until then.
command_queue_len = 4096
# With engine_shards > 1: datagrams the dispatcher has handed to one shard that it has not yet
# taken; over it they are dropped (est_dtls_dropped_queue_full), like a full socket buffer.
shard_inbox_datagrams = 1024

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
# Requests of one session being worked on at once (a meter has one: NSTART = 1, RFC 7252
# §4.7); more get 5.03 + Max-Age. At least 1 and below max_dedup_entries.
max_pending_requests = 4
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
# CoAP Content-Formats for C509 (draft-ietf-cose-cbor-encoded-cert-20). The draft leaves the
# numbers unassigned; the defaults are in the experimental range 65000-65535 and must match
# what the meters use. Replace them once IANA assigns numbers. The three must differ.
# application/cose-c509-cert+cbor: one certificate, the CBOR array C509Certificate (/sen and
# /sren answers to C509 requests, /crts with this Accept).
c509_cert_content_format = 65003
# application/cose-c509+cbor: COSE_C509, a bag or chain of certificates (/crts lists every
# issuing CA; /sen and /sren put the one certificate in it when asked with this Accept).
cose_c509_content_format = 65015
# application/cose-c509-pkcs10+cbor: C509 certification requests (C509CertificationRequest).
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
# The manufacturers' CRLs (DER or PEM), each signed by one of manufacturer_cas: IDevIDs they
# list are refused at the handshake. Re-read on SIGHUP.
manufacturer_crls = []

[storage]
# Where issued certificates, the audit log and the device allowlist are kept:
#   "sqlite"   - one file in the data directory (WAL, synchronous=FULL); one node.
#   "postgres" - a PostgreSQL database shared by any number of est-server nodes (set url).
backend = "sqlite"
# SQLite database file (backend "sqlite").
database = "est.sqlite3"
# Most commits grouped into one transaction (one fsync) by the store's writer(s).
max_batch = 256
# PostgreSQL connection string (backend "postgres"), a URL or libpq key=value pairs, e.g.
#   url = "postgres://est:secret@db.example:5432/est"
#   url = "host=/run/postgresql dbname=est user=est"
# The schema is created and migrated at start (table schema_migrations).
url = ""
# PostgreSQL connections per node: half write the commits, the rest serve the reads.
pool_size = 16
# A PostgreSQL read or commit (connecting included) that takes longer is answered 5.03 with
# Max-Age: the meter retries later; no certificate leaves without being committed.
timeout_ms = 5000
# TLS to PostgreSQL: sslmode in url, as libpq (TLS over rustls; no sslmode = "prefer"):
#   sslmode=disable     - never TLS
#   sslmode=prefer      - TLS if the server offers it (never on a unix socket), checked as require
#   sslmode=require     - always TLS; the server's certificate is checked against ca_file if
#                         set, else not at all (encrypted, not authenticated: a warning at start)
#   sslmode=verify-ca   - always TLS; the certificate must chain to ca_file
#   sslmode=verify-full - as verify-ca, and be valid for the host in url (use this one)
# e.g. url = "postgres://est:secret@db.example:5432/est?sslmode=verify-full"
# The CA certificate(s) (PEM or DER) of the PostgreSQL server, required by verify-ca and
# verify-full; relative to the data directory. "" = none.
ca_file = ""

[hsm]
# The issuing CA's private key on a PKCS#11 token (an HSM) instead of pki.issuing_ca_key:
# certificates and CRLs are signed on the token and the key never leaves it.
# `est-server init --hsm-module M --hsm-token T [--hsm-key-label L]` creates the key there
# (or uses the one already there) and fills this section in.
enabled = false
# The PKCS#11 module, e.g. SoftHSM2's /usr/lib/softhsm/libsofthsm2.so.
module = ""
# Label of the token holding the key.
token_label = ""
# Label (CKA_LABEL) of the CA's EC P-256 key pair.
key_label = "est-issuing-ca"
# The user PIN is never written here: it is read from pin_file (mode 0600; relative to the
# data directory) when that is set, else from the environment variable named by pin_env.
pin_file = ""
pin_env = "EST_HSM_PIN"
# PKCS#11 sessions kept open for signing (how many signatures can run at once), 1..=64.
sessions = 4
[enrollment]
# Certificates (sen, sren, skg, skc) one device may be issued per period_secs, counted from
# the store; beyond it 5.03 with Max-Age = when its oldest one leaves the period (audited).
# A retried request with the same CSR still gets its certificate back. 0 = no limit.
max_per_device_per_period = 0
period_secs = 86400

[revocation]
# `est-server certs revoke` and `est-server devices block` revoke; the X.509 v2 CRL (signed by
# the issuing CA, with reason codes and a cRLNumber) is written here as DER, and as PEM with
# ".pem" appended. Re-issued on every revocation and when half its validity has passed.
crl_file = "crl/issuing-ca.crl"
# nextUpdate = thisUpdate + crl_validity_hours.
crl_validity_hours = 24
# CoAP resource serving the CRL over the same coaps port (GET); "" = not served.
coap_path = "/crl"
# Its Content-Format: application/pkix-crl has no registered CoAP number, so by default one
# from the experimental range; Accept 42 (application/octet-stream) gets the same bytes.
content_format = 65005
# cRLDistributionPoints URIs put in every certificate the P-256 issuing CA issues (where its
# CRL is), e.g. ["coaps://est.example.net/crl", "http://pki.example.net/est.crl"];
# [] = no extension.
distribution_points = []
# The same for the P-384 issuing CA of [ca_p384]: its own CRL, e.g.
# ["coaps://est.example.net/crl-p384", "http://pki.example.net/est-p384.crl"];
# [] (the default) = no extension on its certificates.
distribution_points_p384 = []
# How often the running server checks the store for revocations made by the CLI (it then
# re-reads them for the handshake checks and re-issues the CRL if the CLI has not).
poll_interval_secs = 2
# Audit rows for handshakes refused because of a revocation or a block, per second at most;
# the rest are counted in the metrics line.
max_handshake_audit_per_sec = 10

[metrics]
# Prometheus endpoint: http://<listen>/metrics (OpenMetrics text) with every transport counter
# and gauge, the CoAP sessions' counters summed, EST outcomes by reason, the store writer,
# enrollments in flight, handshake refusals by reason and the certificates' days left.
# "" = off; e.g. "127.0.0.1:9184". The metrics log line ([server] metrics_log_interval_secs)
# is kept either way.
listen = ""
[relay]
# est-server as the registrar of DCU relays in stateless mode (est-relay --mode stateless,
# draft-ietf-anima-constrained-join-proxy): each meter's DTLS datagrams arrive wrapped in JPY
# messages [header, datagram] on this UDP port, and every answer goes back wrapped with the
# meter's header echoed. The draft defines no default port. Unset (the default): no JPY port.
# Relays in stateful mode need nothing here: they use the coaps port (list them in
# allowed_proxies anyway so that their meters count under the per-relay caps below).
# jpy_listen = "0.0.0.0:7634"
# Join proxies allowed to send JPY, as addresses or prefixes: ["192.0.2.10", "10.20.0.0/16",
# "2001:db8:1::/48"]. JPY from any other source is dropped and counted (jpy_dropped_not_allowed
# in the metrics line). Required with jpy_listen.
allowed_proxies = []
# The URI announced to join proxies discovering the registrar
# (GET /.well-known/core?rt=brski.rjp answers <jpy_uri>;rt=brski.rjp). Unset: "jpy://" and
# jpy_listen's address when it names one (nothing is announced for an unspecified address).
# jpy_uri = "jpy://[2001:db8::52]:7634"
# Longest JPY header accepted (bytes; the draft: SHOULD be at most 32, est-relay's are 24..36).
# Every datagram to a relayed meter is kept this much plus 6 bytes below dtls.mtu_bytes.
max_header_bytes = 64
# A relay's meters count as many peers, under these caps instead of the per-IP ones: handshakes
# past the cookie exchange, and established sessions, of one relay's meters (the global
# dtls.max_half_open_handshakes and dtls.max_sessions still apply).
max_half_open_per_relay = 512
max_sessions_per_relay = 20000

[ca_p384]
# A P-384 issuing CA beside the P-256 one (DLMS/COSEM security suite 2): CSRs whose key is on
# P-384 are issued by it, signed ecdsa-with-SHA384; its LDevIDs may /sren, and /crts lists it
# after the P-256 CA. `est-server ca create-p384` creates it and sets enabled = true.
# It signs its own CRL (the certificates it issued): [revocation] crl_file with "-p384"
# (crl/issuing-ca-p384.crl and .pem), served at coap_path with "-p384" (/crl-p384).
enabled = false
cert = "ca/issuing-ca-p384.pem"
# PKCS#8 P-384 key, mode 0600 (unused with hsm_key_label).
key = "ca/issuing-ca-p384.key"
# Label (CKA_LABEL) of its P-384 key pair on the PKCS#11 token of [hsm] instead of the key
# file: module, token, PIN (never written here) and sessions are [hsm]'s, which must be
# enabled. Certificates and CRLs of this CA are then signed on the token (CKM_ECDSA over a
# SHA-384 digest). `est-server ca create-p384 --hsm-key-label L` generates the key there (or
# uses the one already there) and sets this. "" (default): the key file above.
hsm_key_label = ""

[dlms]
# Device-class rules selecting the `dlms` certificate profile (DLMS/COSEM, after Gurux's
# checks): subject CN = the 8-byte system title as 16 uppercase hex digits (then the
# serialNumber); keyUsage digitalSignature (signing CSR) or keyAgreement (key-agreement CSR),
# without extKeyUsage, or both plus EKU clientAuth+serverAuth (TLS CSR), as the CSR's
# requested keyUsage says (a CSR without one is refused with 4.00); signed ecdsa-with-SHA256
# (P-256 key) or ecdsa-with-SHA384 (P-384 key, needs [ca_p384]). Signing, key-agreement and TLS
# certificates of a meter are active side by side. The system title is the FLAG ID (3 ASCII
# letters) followed by the serialNumber minus serial_prefix, which must be 1-13 decimal digits
# below 2^40, as 5 big-endian octets; other serials are refused with 4.03. First match wins;
# other devices get the LDevID of [policy]. Example:
#   [[dlms.rules]]
#   serial_prefix = "ABC"
#   flag_id = "ABC"
#   curve = "P-384"   # "P-256" (suite 1), "P-384" (suite 2; needs [ca_p384]) or "" for both
rules = []

# [[profiles]]: certificate profiles (none by default: every device not taken by a
# [[dlms.rules]] entry gets the built-in LDevID of [policy], exactly as without this section).
# Each profile is chosen by its [[profiles.select]] rules; profiles are tried in file order,
# their rules in order, and the first rule that matches wins. A rule matches when every field
# it sets matches:
#   manufacturer_ca - the manufacturer CA the meter's IDevID chain ends in: a file listed in
#                     [pki] manufacturer_cas, "sha256:<hex>" (SHA-256 of the CA certificate,
#                     DER; `openssl x509 -noout -fingerprint -sha256`) or "subject:<RFC 4514
#                     subject>"; one naming no configured manufacturer CA stops the start.
#                     Only at /sen, /skg and /skc: at /sren the meter presents its LDevID.
#   serial_prefix   - the device class: a prefix of the IDevID subject's serialNumber.
# Fields of a profile (defaults after "="):
#   name               (required) unique, printable; written in the audit row of each issuance
#   curves = []        request key curves accepted, "P-256" / "P-384"; [] accepts both. Another
#                      curve is refused with 4.00 and a diagnostic naming the profile.
#   signature_hash = "auto"   "auto": the CA on the key's curve (P-256 CA, ecdsa-with-SHA256, or
#                      P-384 CA, ecdsa-with-SHA384); "SHA-256": the P-256 CA signs;
#                      "SHA-384": the P-384 CA signs (needs [ca_p384] enabled, as does "auto"
#                      with curves = ["P-384"]).
#   validity_days = 0  days; 0 = [policy] ldevid_validity_days
#   key_usage = ["digitalSignature"]   plus "keyAgreement" if wanted; digitalSignature is
#                      required (the meter signs its DTLS handshake with the certificate)
#   extended_key_usage = ["clientAuth"]   names (clientAuth, serverAuth, codeSigning,
#                      emailProtection, timeStamping, OCSPSigning) or dotted OIDs; ["none"] for
#                      no extension. When present it must include clientAuth (for /sren).
#   subject = []       RDNs "ATTR=VALUE", most significant first; [] = the built-in subject.
#                      ATTR: C, ST, L, O, OU, CN, serialNumber. VALUE: text with placeholders
#                      {idevid.X} (the authenticating certificate's subject) or {csr.X} (the
#                      CSR's), X one of CN, O, OU, serialNumber; {{ and }} are literal braces.
#                      Unknown placeholders are refused at load. It must contain
#                      "serialNumber={idevid.serialNumber}". A missing CSR attribute is 4.00,
#                      a missing IDevID one 4.03. /sren keeps the renewed certificate's subject.
#   san = "idevid"     subjectAltName hardwareModuleName: "idevid" (copied from the IDevID),
#                      "csr" (from the CSR; one contradicting the IDevID's is refused, 4.03),
#                      or "none".
# Example:
#   [[profiles]]
#   name = "acme-meters"
#   curves = ["P-256"]
#   signature_hash = "SHA-256"
#   validity_days = 730
#   key_usage = ["digitalSignature", "keyAgreement"]
#   extended_key_usage = ["clientAuth"]
#   subject = ["O=Example Utility", "OU=Acme meters", "CN={idevid.serialNumber}",
#              "serialNumber={idevid.serialNumber}"]
#   san = "none"
#   [[profiles.select]]
#   manufacturer_ca = "manufacturers/acme-ca.pem"
#
#   [[profiles]]
#   name = "gateways-p384"
#   curves = ["P-384"]
#   signature_hash = "SHA-384"
#   [[profiles.select]]
#   serial_prefix = "GW"
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
        if self.coap.max_pending_requests == 0
            || self.coap.max_pending_requests >= self.coap.max_dedup_entries
        {
            return Err(invalid(
                "coap.max_pending_requests",
                format!(
                    "must be at least 1 and below coap.max_dedup_entries ({}): every pending \
                     request holds a duplicate-detection entry until it is answered",
                    self.coap.max_dedup_entries
                ),
            ));
        }
        self.coap_config()
            .validate()
            .map_err(|e| invalid("coap", e.to_string()))?;
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
        let e = &self.est;
        if e.cose_c509_content_format == e.c509_cert_content_format
            || e.c509_pkcs10_content_format == e.c509_cert_content_format
            || e.c509_pkcs10_content_format == e.cose_c509_content_format
        {
            return Err(invalid(
                "est.cose_c509_content_format",
                format!(
                    "the C509 Content-Formats must differ (cert {}, cose {}, pkcs10 {})",
                    e.c509_cert_content_format,
                    e.cose_c509_content_format,
                    e.c509_pkcs10_content_format
                ),
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
        self.hsm.validate()?;
        self.ca_p384.validate(&self.hsm)?;
        self.dlms.validate()?;
        crate::profiles_config::validate(self)?;
        self.metrics.listen_addr()?;
        if self.enrollment.period_secs == 0 {
            return Err(invalid("enrollment.period_secs", "must be positive"));
        }
        if self.revocation.crl_validity_hours == 0 {
            return Err(invalid("revocation.crl_validity_hours", "must be positive"));
        }
        if self.revocation.poll_interval_secs == 0 {
            return Err(invalid("revocation.poll_interval_secs", "must be positive"));
        }
        if self.revocation.crl_file.as_os_str().is_empty() {
            return Err(invalid("revocation.crl_file", "must name a file"));
        }
        for (field, uris) in [
            (
                "revocation.distribution_points",
                &self.revocation.distribution_points,
            ),
            (
                "revocation.distribution_points_p384",
                &self.revocation.distribution_points_p384,
            ),
        ] {
            for u in uris {
                if !u.contains("://") || !u.is_ascii() {
                    return Err(invalid(field, format!("{u:?} is not an ASCII URI")));
                }
            }
        }
        self.validate_relay()?;
        self.validate_storage()?;
        Ok(())
    }

    /// `[relay]`.
    fn validate_relay(&self) -> Result<(), ConfigError> {
        let r = &self.relay;
        let prefixes = r.allowed_prefixes()?;
        if r.jpy_listen.is_some() && prefixes.is_empty() {
            return Err(invalid(
                "relay.allowed_proxies",
                "is empty: every JPY message would be dropped; list the relays' addresses or \
                 prefixes",
            ));
        }
        if !(1..=255).contains(&r.max_header_bytes) {
            return Err(invalid("relay.max_header_bytes", "must be within 1..=255"));
        }
        if self.dtls.mtu_bytes < r.max_header_bytes + 7 + 256 {
            return Err(invalid(
                "relay.max_header_bytes",
                format!(
                    "with dtls.mtu_bytes = {} it leaves under 256 bytes for a relayed meter's \
                     datagrams",
                    self.dtls.mtu_bytes
                ),
            ));
        }
        if r.max_half_open_per_relay == 0 || r.max_sessions_per_relay == 0 {
            return Err(invalid(
                "relay.max_*_per_relay",
                "limits must be at least 1",
            ));
        }
        if let Some(u) = &r.jpy_uri {
            if !u.starts_with("jpy://") {
                return Err(invalid("relay.jpy_uri", "must start with jpy://"));
            }
        }
        Ok(())
    }

    /// `[storage]`: a known backend, and for PostgreSQL a connection string that parses.
    fn validate_storage(&self) -> Result<(), ConfigError> {
        let st = &self.storage;
        match st.backend.as_str() {
            "sqlite" => {}
            "postgres" => {
                if st.url.trim().is_empty() {
                    return Err(invalid(
                        "storage.url",
                        "backend \"postgres\" needs a connection string, e.g. \
                         \"postgres://est@db.example/est\"",
                    ));
                }
                let mode = match crate::store::pg_tls::parse_url(&st.url) {
                    Ok((_, mode)) => mode,
                    Err(e) => {
                        return Err(invalid(
                            "storage.url",
                            format!("not a PostgreSQL connection string: {e}"),
                        ))
                    }
                };
                if mode.verifies() && st.ca_file.as_os_str().is_empty() {
                    return Err(invalid(
                        "storage.ca_file",
                        format!(
                            "sslmode={} in storage.url needs the CA of the PostgreSQL server's \
                             certificate",
                            mode.as_str()
                        ),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "storage.backend",
                    "must be \"sqlite\" or \"postgres\"",
                ))
            }
        }
        if !(1..=1024).contains(&st.pool_size) {
            return Err(invalid("storage.pool_size", "must be within 1..=1024"));
        }
        if !(100..=600_000).contains(&st.timeout_ms) {
            return Err(invalid(
                "storage.timeout_ms",
                "must be within 100..=600000 (0.1 s to 10 min)",
            ));
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
        if !(1..=256).contains(&d.engine_shards) {
            return Err(invalid("dtls.engine_shards", "must be within 1..=256"));
        }
        if d.engine_shards > 1 && d.cid_length > 0 {
            let prefix = d.cid_prefix()?.len();
            if prefix + 3 > d.cid_length {
                return Err(invalid(
                    "dtls.cid_length",
                    format!(
                        "{} leaves no room for the shard byte and 2 random bytes after the \
                         {prefix}-byte cid_prefix_hex with dtls.engine_shards = {}: at least {}",
                        d.cid_length,
                        d.engine_shards,
                        prefix + 3
                    ),
                ));
            }
        }
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
        for (field, v) in [
            ("dtls.accept_queue_sessions", d.accept_queue_sessions),
            ("dtls.session_queue_datagrams", d.session_queue_datagrams),
            ("dtls.session_queue_bytes", d.session_queue_bytes),
            ("dtls.command_queue_len", d.command_queue_len),
            ("dtls.shard_inbox_datagrams", d.shard_inbox_datagrams),
        ] {
            if v == 0 {
                return Err(invalid(field, "queues must hold at least 1"));
            }
        }
        if d.session_queue_bytes < d.mtu_bytes {
            return Err(invalid(
                "dtls.session_queue_bytes",
                format!(
                    "{} is below dtls.mtu_bytes ({}): a full-size datagram would never fit",
                    d.session_queue_bytes, d.mtu_bytes
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
            max_pending_requests: self.coap.max_pending_requests,
            max_block2_szx: self.coap.max_block2_szx,
            max_block1_szx: self.coap.max_block1_szx,
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
            cose_c509_content_format: self.est.cose_c509_content_format,
            c509_pkcs10_content_format: self.est.c509_pkcs10_content_format,
            max_enrollments_per_device: self.enrollment.max_per_device_per_period,
            enrollment_period: Duration::from_secs(self.enrollment.period_secs),
            crl_path: self.revocation.coap_segments(),
            crl_content_format: self.revocation.content_format,
            crl_p384_path: if self.ca_p384.enabled {
                self.revocation.coap_p384_segments()
            } else {
                Vec::new()
            },
            // jpy_uri is set by the service once the JPY socket is bound
            // (RelaySection::announced_uri).
            ..est_proto::est::EstConfig::default()
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
            dlms_rules: self.dlms.rules(),
            // Needs the manufacturer CAs loaded: crate::profiles_config::build, at start.
            profiles: est_proto::profile::Profiles::default(),
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
    fn relay_section() {
        let cfg = Config::parse(
            "[relay]\njpy_listen = \"127.0.0.1:7634\"\nallowed_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\nmax_header_bytes = 40\nmax_half_open_per_relay = 100\nmax_sessions_per_relay = 5000\n",
            Path::new("x"),
        )
        .expect("parses");
        assert_eq!(
            cfg.relay.jpy_listen,
            Some("127.0.0.1:7634".parse().unwrap())
        );
        let p = cfg.relay.allowed_prefixes().unwrap();
        assert!(p[0].contains("10.9.8.7".parse().unwrap()));
        assert!(p[1].contains("192.0.2.7".parse().unwrap()));
        assert_eq!(
            cfg.relay
                .announced_uri("127.0.0.1:7634".parse().unwrap())
                .as_deref(),
            Some("jpy://127.0.0.1:7634")
        );
        assert_eq!(
            cfg.relay.announced_uri("0.0.0.0:7634".parse().unwrap()),
            None
        );
        assert_eq!(
            cfg.relay
                .announced_uri("[2001:db8::52]:7634".parse().unwrap())
                .as_deref(),
            Some("jpy://[2001:db8::52]:7634")
        );
        for (bad, field) in [
            (
                "[relay]\njpy_listen = \"127.0.0.1:7634\"\n",
                "relay.allowed_proxies",
            ),
            (
                "[relay]\nallowed_proxies = [\"10.0.0.0/40\"]\n",
                "relay.allowed_proxies",
            ),
            ("[relay]\nmax_header_bytes = 0\n", "relay.max_header_bytes"),
            (
                "[dtls]\nmtu_bytes = 300\n[relay]\nmax_header_bytes = 64\n",
                "relay.max_header_bytes",
            ),
            ("[relay]\njpy_uri = \"coaps://x\"\n", "relay.jpy_uri"),
        ] {
            let err = Config::parse(bad, Path::new("x")).unwrap_err();
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn worker_threads_is_bounded() {
        let cfg = Config::parse("[server]\nworker_threads = 1\n", Path::new("x")).expect("parses");
        assert_eq!(cfg.server.worker_threads, 1);
        let err = Config::parse("[server]\nworker_threads = 5000\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("server.worker_threads"), "{err}");
    }

    #[test]
    fn storage_backend_is_checked() {
        let err = |t: &str| {
            Config::parse(&format!("[storage]\n{t}\n"), Path::new("x"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("backend = \"mysql\"").contains("storage.backend"));
        assert!(err("backend = \"postgres\"").contains("storage.url"));
        assert!(
            err("backend = \"postgres\"\nurl = \"postgres://a@b/c?bogus=1\"")
                .contains("storage.url")
        );
        assert!(err("pool_size = 0").contains("storage.pool_size"));
        assert!(err("timeout_ms = 10").contains("storage.timeout_ms"));
        for url in [
            "postgres://est:secret@db.example:5432/est",
            "host=/run/postgresql dbname=est user=est",
        ] {
            let cfg = Config::parse(
                &format!("[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 4\n"),
                Path::new("x"),
            )
            .expect("parses");
            assert!(cfg.storage.is_postgres());
            assert_eq!(cfg.storage.pool_size, 4);
        }
        assert!(
            !Config::default().storage.is_postgres(),
            "SQLite stays the default"
        );
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

    #[test]
    fn storage_tls_settings_are_checked() {
        let parse = |url: &str, ca: &str| {
            Config::parse(
                &format!(
                    "[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\nca_file = \"{ca}\"\n"
                ),
                Path::new("x"),
            )
        };
        for mode in ["verify-ca", "verify-full"] {
            let url = format!("postgres://est@db.example/est?sslmode={mode}");
            let err = parse(&url, "").unwrap_err().to_string();
            assert!(
                err.contains("storage.ca_file") && err.contains(mode),
                "{err}"
            );
            let cfg = parse(&url, "pg-ca.pem").unwrap();
            assert_eq!(cfg.storage.ca_file, Path::new("pg-ca.pem"));
        }
        for mode in ["disable", "prefer", "require"] {
            parse(&format!("host=db.example dbname=est sslmode={mode}"), "").unwrap();
        }
        let err = parse("host=db sslmode=verify", "ca.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.url"), "{err}");
        assert_eq!(Config::default().storage.ca_file, Path::new(""));
    }

    /// Both backends keep DLMS certificate slots (PostgreSQL since its migration 4).
    #[test]
    fn dlms_rules_load_on_both_backends() {
        let text = "[storage]\nbackend = \"postgres\"\nurl = \"host=/tmp dbname=est\"\n\n[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"ABC\"\n";
        for backend in ["postgres", "sqlite"] {
            let text = text.replace("\"postgres\"", &format!("\"{backend}\""));
            let cfg = Config::parse(&text, Path::new("x")).unwrap();
            assert_eq!(cfg.storage.backend, backend);
            assert_eq!(cfg.dlms.rules.len(), 1);
        }
    }

    #[test]
    fn engine_shards_are_checked_against_the_cid() {
        let ok = Config::parse("[dtls]\nengine_shards = 4\n", Path::new("x")).unwrap();
        assert_eq!(ok.dtls.engine_shards, 4);
        assert_eq!(
            crate::service::dtls_server_config(&ok.dtls)
                .unwrap()
                .engine_shards,
            4
        );
        // No CIDs: nothing to carry the shard byte.
        Config::parse(
            "[dtls]\nengine_shards = 4\ncid_length = 0\n",
            Path::new("x"),
        )
        .unwrap();
        for (text, field) in [
            ("[dtls]\nengine_shards = 0\n", "dtls.engine_shards"),
            ("[dtls]\nengine_shards = 257\n", "dtls.engine_shards"),
            (
                "[dtls]\nengine_shards = 2\ncid_length = 2\n",
                "dtls.cid_length",
            ),
            (
                "[dtls]\nengine_shards = 2\ncid_length = 4\ncid_prefix_hex = \"abcd\"\n",
                "dtls.cid_length",
            ),
        ] {
            let err = Config::parse(text, Path::new("x")).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        Config::parse(
            "[dtls]\nengine_shards = 2\ncid_length = 5\ncid_prefix_hex = \"abcd\"\n",
            Path::new("x"),
        )
        .unwrap();
    }

    #[test]
    fn pending_requests_stay_below_the_dedup_entries() {
        let err = |t: &str| {
            Config::parse(&format!("[coap]\n{t}\n"), Path::new("x"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("max_pending_requests = 0").contains("coap.max_pending_requests"));
        assert!(err("max_dedup_entries = 4").contains("coap.max_pending_requests"));
        assert!(err("max_dedup_entries = 0").contains("coap.max_pending_requests"));
        let ok = Config::parse(
            "[coap]\nmax_dedup_entries = 8\nmax_pending_requests = 7\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(ok.coap_config().max_pending_requests, 7);
        let d = Config::parse("[dtls]\nsocket_receive_buffer_bytes = 0\n", Path::new("x")).unwrap();
        assert_eq!(
            crate::service::dtls_server_config(&d.dtls)
                .unwrap()
                .socket_receive_buffer_bytes,
            0
        );
    }

    #[test]
    fn c509_content_formats_are_configurable_and_must_differ() {
        let d = Config::parse("", Path::new("x")).unwrap();
        let e = d.est_config();
        assert_eq!(
            (
                e.c509_cert_content_format,
                e.cose_c509_content_format,
                e.c509_pkcs10_content_format
            ),
            (65003, 65015, 65004)
        );
        let c = Config::parse(
            "[est]\nc509_cert_content_format = 65200\ncose_c509_content_format = 65201\n",
            Path::new("x"),
        )
        .unwrap()
        .est_config();
        assert_eq!(
            (c.c509_cert_content_format, c.cose_c509_content_format),
            (65200, 65201)
        );
        let err = Config::parse("[est]\ncose_c509_content_format = 65003\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("est.cose_c509_content_format"), "{err}");
        assert!(err.contains("must differ"), "{err}");
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
    fn driver_queues_are_settings_checked_against_the_mtu_and_capped_by_max_sessions() {
        let d = DtlsSection::default();
        assert_eq!(d.accept_queue_sessions, 1024);
        assert_eq!(d.session_queue_datagrams, 32);
        assert_eq!(d.session_queue_bytes, 32 * 1024);
        assert_eq!(d.command_queue_len, 4096);
        assert_eq!(d.shard_inbox_datagrams, 1024);
        for field in [
            "accept_queue_sessions",
            "session_queue_datagrams",
            "session_queue_bytes",
            "command_queue_len",
            "shard_inbox_datagrams",
        ] {
            let err = dtls_err(&format!("{field} = 0"));
            assert!(err.contains(&format!("dtls.{field}")), "{err}");
        }
        let err = dtls_err("session_queue_bytes = 1151");
        assert!(err.contains("dtls.session_queue_bytes"), "{err}");
        assert!(err.contains("dtls.mtu_bytes"), "{err}");
        // At the edges: accepted, and carried into the transport's configuration; no more
        // sessions than max_sessions ever wait to be accepted.
        let cfg = Config::parse(
            "[dtls]\nmax_sessions = 100\nmax_half_open_handshakes = 10\nmax_half_open_per_ip = 10\n\
             max_sessions_per_ip = 100\naccept_queue_sessions = 101\nsession_queue_datagrams = 1\n\
             session_queue_bytes = 1152\ncommand_queue_len = 1\nshard_inbox_datagrams = 1\n",
            Path::new("x"),
        )
        .unwrap();
        let t = crate::service::dtls_server_config(&cfg.dtls).unwrap();
        assert_eq!(t.accept_queue_sessions, 100);
        assert_eq!(t.session_queue_datagrams, 1);
        assert_eq!(t.session_queue_bytes, 1152);
        assert_eq!(t.command_queue_len, 1);
        assert_eq!(t.shard_inbox_datagrams, 1);
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
