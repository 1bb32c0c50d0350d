//! The TOML configuration of `est-relay`. [`DEFAULT_CONFIG_TOML`] documents every setting
//! with its default (`est-relay --print-config` prints it); a test checks that it parses to
//! exactly [`FileConfig::default`].

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ratelimit::Rate;
use crate::relay::{Mode, RelayConfig};

/// The file, field by field (units in the names).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Vec<SocketAddr>,
    pub registrars: Vec<SocketAddr>,
    pub mode: Mode,
    pub jpy_bind: Option<SocketAddr>,
    pub circuit_bind_ip: Option<IpAddr>,
    pub join_port: Option<u16>,
    pub answer_discovery: bool,
    pub key_rotation_secs: u64,
    pub failover_after_ms: u64,
    pub meter_rate_per_sec: f64,
    pub meter_burst: f64,
    pub global_rate_per_sec: f64,
    pub global_burst: f64,
    pub rate_limit_slots: usize,
    pub max_meter_datagram_bytes: usize,
    pub circuit_idle_timeout_secs: u64,
    pub max_circuits_per_meter: usize,
    pub max_circuits_per_interface: usize,
    pub max_circuits: usize,
    pub socket_receive_buffer_bytes: usize,
    pub metrics_log_interval_secs: u64,
    pub log_format: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        let core = RelayConfig::default();
        FileConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 5684))],
            registrars: Vec::new(),
            mode: core.mode,
            jpy_bind: None,
            circuit_bind_ip: None,
            join_port: None,
            answer_discovery: core.answer_discovery,
            key_rotation_secs: core.key_rotation.as_secs(),
            failover_after_ms: core.failover_after.as_millis() as u64,
            meter_rate_per_sec: core.per_meter_rate.per_sec,
            meter_burst: core.per_meter_rate.burst,
            global_rate_per_sec: core.global_rate.per_sec,
            global_burst: core.global_rate.burst,
            rate_limit_slots: core.rate_limit_slots,
            max_meter_datagram_bytes: core.max_meter_datagram,
            circuit_idle_timeout_secs: core.circuit_idle_timeout.as_secs(),
            max_circuits_per_meter: core.max_circuits_per_meter,
            max_circuits_per_interface: core.max_circuits_per_interface,
            max_circuits: core.max_circuits,
            socket_receive_buffer_bytes: 1024 * 1024,
            metrics_log_interval_secs: 60,
            log_format: "text".into(),
        }
    }
}

/// The documented configuration file; every value is the built-in default.
pub const DEFAULT_CONFIG_TOML: &str = r#"# est-relay configuration (draft-ietf-anima-constrained-join-proxy-21). Every setting is
# shown with its built-in default; delete a line to keep the default. Command-line options
# (--listen, --registrar, --mode) replace the file's values.

# Join ports: UDP addresses where meters send their DTLS datagrams and their CoAP discovery
# (GET /.well-known/core?brski-jp=*). Each entry is one interface of the proxy (its index,
# 0, 1, ..., is sealed into JPY headers). The draft defines no default join port; 5684 is the
# coaps port meters try without discovery. Use "[::]:5684" on an IPv6 mesh, and add
# "[::]:5683" to answer discovery sent to the default CoAP port.
listen = ["0.0.0.0:5684"]

# Registrars, in order of preference: their JPY port (mode "stateless": est-server's
# [relay] jpy_listen) or their coaps port (mode "stateful"). Required (here or --registrar).
# "jpy" has no default port: give one.
registrars = []

# "stateless": each datagram goes to the registrar as a JPY message [header, datagram] from
# one fixed port, the header being the meter's address sealed with AES-128-GCM-SIV under a
# key only this proxy knows; the proxy keeps nothing per meter.
# "stateful": a UDP circuit per meter (its own port towards the registrar), closed
# circuit_idle_timeout_secs after its last datagram; the registrar needs no JPY support.
mode = "stateless"

# Local address JPY messages are sent from (stateless). Unset: the unspecified address of
# the first registrar's family, port chosen by the system, e.g. jpy_bind = "0.0.0.0:7700".
# jpy_bind = "0.0.0.0:0"

# Local address the circuits' sockets bind to (stateful; each gets a port from the system).
# Unset: the unspecified address of the first registrar's family.
# circuit_bind_ip = "0.0.0.0"

# The join port announced in discovery answers (<>;brski-jp=PORT). Unset: the port of the
# first listen address.
# join_port = 5684

# Answer meters' CoAP discovery of the join port.
answer_discovery = true

# The JPY header key is replaced this often; a header stays valid for one to two intervals
# (the draft: change it infrequently, e.g. every 24 h; a meter whose DTLS session spans a
# change becomes a new peer at the registrar).
key_rotation_secs = 86400

# A ClientHello relayed to the registrar in use, and nothing at all heard back from that
# registrar for this long: the next registrar in the list is used from then on.
failover_after_ms = 6000

# Rate limits on datagrams from the mesh (token buckets; 0 = unlimited): per meter IP address
# (a fixed table of rate_limit_slots buckets chosen by a keyed hash, so memory does not grow
# with the meters) and in total.
meter_rate_per_sec = 20.0
meter_burst = 40.0
global_rate_per_sec = 2000.0
global_burst = 4000.0
rate_limit_slots = 4096

# Largest datagram relayed from a meter (the JPY message adds up to 38 bytes to it for a
# link-local or IPv4 meter).
max_meter_datagram_bytes = 1280

# Stateful mode: a circuit closes this long after its last datagram in either direction (the
# draft's default, 30 s); caps on circuits per meter IP address (the draft: at most 2), per
# interface (the draft: at most 10; a DCU serving hundreds of meters at once raises it) and
# in total (each circuit is one UDP socket).
circuit_idle_timeout_secs = 30
max_circuits_per_meter = 2
max_circuits_per_interface = 10
max_circuits = 1024

# SO_RCVBUF asked for each socket the proxy listens on (0 = the system default).
socket_receive_buffer_bytes = 1048576

# One structured "metrics" log line this often (forwarded, dropped by reason, failovers,
# circuits); 0 = never.
metrics_log_interval_secs = 60

# "text" or "json"; RUST_LOG sets the level.
log_format = "text"
"#;

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The core's configuration, validated.
    pub fn relay_config(&self) -> Result<RelayConfig, String> {
        let Some(first_listen) = self.listen.first() else {
            return Err("listen: at least one address is needed".into());
        };
        if self.listen.len() > 256 {
            return Err("listen: at most 256 interfaces".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err("log_format must be \"text\" or \"json\"".into());
        }
        let rate = |per_sec: f64, burst: f64| Rate { per_sec, burst };
        let c = RelayConfig {
            mode: self.mode,
            registrars: self.registrars.clone(),
            join_port: self.join_port.unwrap_or(first_listen.port()),
            answer_discovery: self.answer_discovery,
            key_rotation: Duration::from_secs(self.key_rotation_secs),
            failover_after: Duration::from_millis(self.failover_after_ms),
            per_meter_rate: rate(self.meter_rate_per_sec, self.meter_burst),
            global_rate: rate(self.global_rate_per_sec, self.global_burst),
            rate_limit_slots: self.rate_limit_slots,
            max_meter_datagram: self.max_meter_datagram_bytes,
            circuit_idle_timeout: Duration::from_secs(self.circuit_idle_timeout_secs),
            max_circuits_per_meter: self.max_circuits_per_meter,
            max_circuits_per_interface: self.max_circuits_per_interface,
            max_circuits: self.max_circuits,
        };
        c.validate()?;
        Ok(c)
    }

    /// The unspecified address of the first registrar's family.
    pub fn backhaul_ip(&self) -> IpAddr {
        match self.registrars.first() {
            Some(SocketAddr::V6(_)) => IpAddr::from([0u16; 8]),
            _ => IpAddr::from([0u8; 4]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_file_is_the_default() {
        assert_eq!(
            FileConfig::parse(DEFAULT_CONFIG_TOML).unwrap(),
            FileConfig::default()
        );
    }

    #[test]
    fn every_setting_reaches_the_core() {
        let f = FileConfig::parse(
            r#"listen = ["127.0.0.1:6000", "[::1]:6001"]
registrars = ["192.0.2.1:7634", "192.0.2.2:7634"]
mode = "stateful"
join_port = 6100
answer_discovery = false
key_rotation_secs = 3600
failover_after_ms = 2500
meter_rate_per_sec = 5.0
meter_burst = 6.0
global_rate_per_sec = 70.0
global_burst = 80.0
rate_limit_slots = 128
max_meter_datagram_bytes = 900
circuit_idle_timeout_secs = 40
max_circuits_per_meter = 3
max_circuits_per_interface = 300
max_circuits = 400
"#,
        )
        .unwrap();
        let c = f.relay_config().unwrap();
        assert_eq!(c.mode, Mode::Stateful);
        assert_eq!(c.registrars.len(), 2);
        assert_eq!(c.join_port, 6100);
        assert!(!c.answer_discovery);
        assert_eq!(c.key_rotation, Duration::from_secs(3600));
        assert_eq!(c.failover_after, Duration::from_millis(2500));
        assert_eq!(
            c.per_meter_rate,
            Rate {
                per_sec: 5.0,
                burst: 6.0
            }
        );
        assert_eq!(
            c.global_rate,
            Rate {
                per_sec: 70.0,
                burst: 80.0
            }
        );
        assert_eq!(c.rate_limit_slots, 128);
        assert_eq!(c.max_meter_datagram, 900);
        assert_eq!(c.circuit_idle_timeout, Duration::from_secs(40));
        assert_eq!(c.max_circuits_per_meter, 3);
        assert_eq!(c.max_circuits_per_interface, 300);
        assert_eq!(c.max_circuits, 400);
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = FileConfig::default().relay_config().unwrap_err();
        assert!(e.contains("registrar"), "{e}");
        let e = FileConfig::parse("registrars = [\"192.0.2.1:0\"]\n")
            .unwrap()
            .relay_config()
            .unwrap_err();
        assert!(e.contains("port"), "{e}");
        assert!(FileConfig::parse("mode = \"proxy\"\n").is_err());
        assert!(FileConfig::parse("unknown = 1\n").is_err());
        let e = FileConfig::parse("registrars = [\"192.0.2.1:1\"]\nlog_format = \"xml\"\n")
            .unwrap()
            .relay_config()
            .unwrap_err();
        assert!(e.contains("log_format"), "{e}");
    }
}
