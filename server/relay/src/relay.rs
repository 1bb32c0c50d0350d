//! The join proxy, sans-IO: datagrams and `now` in; datagrams, events and the next timer out.
//!
//! ```text
//!   meter ──handle_meter(now, meter, d)──► rate limits ─► CoAP discovery? answer it
//!                                          └─► looks like DTLS? ─► stateless: JPY [seal(meter), d] ─► active registrar
//!                                                                  stateful:  circuit of the meter ─► its registrar
//!   registrar ──handle_jpy(now, from, m)────────► known registrar? JPY? header opens? ─► meter
//!   registrar ──handle_circuit(now, c, from, d)─► circuit's registrar? ─► meter
//!   handle_timeout(now): key rotation, registrar failover, circuit expiry
//! ```
//!
//! Everything dropped is dropped silently and counted by reason ([`DropReason`]).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use crate::header::{HeaderKeys, MeterAddr, OpenError, MAX_HEADER_LEN};
use crate::ratelimit::{Limiter, Rate, Refused};
use crate::{discovery, filter, jpy};

/// Stateless (JPY) or stateful (a UDP circuit per meter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Stateless,
    Stateful,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "stateless" => Ok(Mode::Stateless),
            "stateful" => Ok(Mode::Stateful),
            _ => Err(format!("unknown mode {s:?} (stateless or stateful)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Stateless => "stateless",
            Mode::Stateful => "stateful",
        })
    }
}

/// The core's settings (the driver's TOML maps onto these; defaults in [`RelayConfig::default`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RelayConfig {
    pub mode: Mode,
    /// Registrars in order of preference: their JPY port (stateless) or their coaps port
    /// (stateful). The first is used until it stops answering.
    pub registrars: Vec<SocketAddr>,
    /// The join port announced to meters in discovery answers.
    pub join_port: u16,
    /// Answer meters' `GET /.well-known/core?brski-jp=*`.
    pub answer_discovery: bool,
    /// Header key rotation (stateless).
    pub key_rotation: Duration,
    /// A ClientHello relayed to the active registrar and nothing at all heard back from it
    /// for this long: fail over to the next registrar.
    pub failover_after: Duration,
    /// Datagrams from one meter IP address (token bucket, hashed table; see [`crate::ratelimit`]).
    pub per_meter_rate: Rate,
    /// Datagrams from the whole mesh.
    pub global_rate: Rate,
    /// Slots of the per-address table (rounded up to a power of two).
    pub rate_limit_slots: usize,
    /// Largest datagram relayed from a meter.
    pub max_meter_datagram: usize,
    /// Stateful: a circuit is closed this long after the last datagram in either direction.
    pub circuit_idle_timeout: Duration,
    /// Stateful: circuits of one meter IP address (the draft: SHOULD be at most 2).
    pub max_circuits_per_meter: usize,
    /// Stateful: circuits per interface (the draft: SHOULD be at most 10).
    pub max_circuits_per_interface: usize,
    /// Stateful: circuits in total (each is a UDP socket in the driver).
    pub max_circuits: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            mode: Mode::Stateless,
            registrars: Vec::new(),
            join_port: 0,
            answer_discovery: true,
            key_rotation: Duration::from_secs(24 * 3600),
            failover_after: Duration::from_secs(6),
            per_meter_rate: Rate {
                per_sec: 20.0,
                burst: 40.0,
            },
            global_rate: Rate {
                per_sec: 2000.0,
                burst: 4000.0,
            },
            rate_limit_slots: 4096,
            max_meter_datagram: 1280,
            circuit_idle_timeout: Duration::from_secs(30),
            max_circuits_per_meter: 2,
            max_circuits_per_interface: 10,
            max_circuits: 1024,
        }
    }
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.registrars.is_empty() {
            return Err("at least one registrar is needed".into());
        }
        for (i, r) in self.registrars.iter().enumerate() {
            if r.port() == 0 {
                return Err(format!(
                    "registrar {r}: a port is needed (JPY has no default port)"
                ));
            }
            if self
                .registrars
                .get(..i)
                .is_some_and(|before| before.contains(r))
            {
                return Err(format!("registrar {r} is listed twice"));
            }
        }
        if self.key_rotation < Duration::from_secs(1) {
            return Err("key_rotation must be at least 1 s".into());
        }
        if self.failover_after.is_zero() {
            return Err("failover_after must be positive".into());
        }
        // The per-meter burst is split over two buckets (crate::ratelimit).
        for (name, r, min) in [
            ("per_meter_rate", self.per_meter_rate, 2.0),
            ("global_rate", self.global_rate, 1.0),
        ] {
            if !r.is_unlimited() && r.burst < min {
                return Err(format!("{name}: burst must be at least {min}"));
            }
        }
        if self.max_meter_datagram < 64 {
            return Err("max_meter_datagram must be at least 64".into());
        }
        if self.circuit_idle_timeout.is_zero() {
            return Err("circuit_idle_timeout must be positive".into());
        }
        if self.max_circuits_per_meter == 0
            || self.max_circuits_per_interface == 0
            || self.max_circuits == 0
        {
            return Err("circuit caps must be positive".into());
        }
        Ok(())
    }
}

/// Identifies a stateful circuit: the driver gives each its own UDP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircuitId(pub u64);

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// To a meter, from the listening socket of its interface.
    Meter(MeterAddr),
    /// A JPY message to a registrar, from the proxy's one JPY socket.
    Jpy(SocketAddr),
    /// To a registrar from the circuit's own socket.
    Circuit {
        circuit: CircuitId,
        registrar: SocketAddr,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub destination: Destination,
    pub payload: Vec<u8>,
}

/// What the driver must do besides sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Open a UDP socket for the circuit (before sending its first datagram).
    CircuitOpened {
        circuit: CircuitId,
        meter: MeterAddr,
    },
    /// Close the circuit's socket.
    CircuitClosed(CircuitId),
    /// The active registrar changed.
    FailedOver { from: SocketAddr, to: SocketAddr },
}

macro_rules! drop_reasons {
    ($($name:ident => $text:literal, $doc:literal;)*) => {
        /// Why a datagram was dropped.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DropReason { $(#[doc = $doc] $name,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// The name in the metrics line.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => $text,)* }
            }
        }
    };
}

drop_reasons! {
    NotDtls => "not_dtls", "From a meter: not DTLS records (and not a CoAP discovery request).";
    TooLarge => "too_large", "From a meter: over `max_meter_datagram`.";
    RateMeter => "rate_meter", "From a meter: its address's rate limit.";
    RateGlobal => "rate_global", "From a meter: the global rate limit.";
    CircuitCapMeter => "circuit_cap_meter", "Stateful: the meter address has its circuits already.";
    CircuitCapInterface => "circuit_cap_interface", "Stateful: the interface has its circuits already.";
    CircuitCapTotal => "circuit_cap_total", "Stateful: the proxy has its circuits already.";
    NoKey => "no_key", "Stateless: no header key (RNG failure).";
    UnknownSource => "unknown_source", "To a meter: not from a configured registrar (or not the circuit's).";
    NotJpy => "not_jpy", "To a meter: not a JPY message.";
    HeaderMalformed => "header_malformed", "To a meter: a header of a length we never make.";
    HeaderStale => "header_stale", "To a meter: a header of an expired key (a replay of something old).";
    HeaderAuth => "header_auth", "To a meter: a header that failed authentication (tampered, forged, or from another registrar).";
    UnknownCircuit => "unknown_circuit", "To a meter: on a circuit that has closed.";
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Datagrams (and their UDP payload bytes) received from meters.
    pub from_meters: u64,
    pub bytes_from_meters: u64,
    /// Meters' datagrams relayed to a registrar, and the bytes sent for them on the backhaul
    /// (JPY headers and CBOR included).
    pub forwarded_to_registrar: u64,
    pub bytes_to_registrars: u64,
    /// Datagrams (and bytes) received on the backhaul.
    pub from_registrars: u64,
    pub bytes_from_registrars: u64,
    /// Registrars' datagrams relayed to meters, and their bytes on the mesh.
    pub forwarded_to_meters: u64,
    pub bytes_to_meters: u64,
    /// Bytes the proxy added on the backhaul (JPY headers and CBOR) to relayed datagrams,
    /// towards the registrar and back.
    pub overhead_bytes_up: u64,
    pub overhead_bytes_down: u64,
    pub discovery_answered: u64,
    pub failovers: u64,
    pub circuits_opened: u64,
    pub circuits_expired: u64,
    pub key_rotations: u64,
    dropped: HashMap<&'static str, u64>,
}

impl Metrics {
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped.get(r.name()).copied().unwrap_or(0)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    fn drop(&mut self, r: DropReason) {
        *self.dropped.entry(r.name()).or_insert(0) += 1;
    }
}

struct Circuit {
    meter: MeterAddr,
    registrar: usize,
    last_activity: Instant,
}

struct Failover {
    active: usize,
    /// The first ClientHello relayed to the active registrar since it was last heard from.
    unanswered_since: Option<Instant>,
}

/// The join proxy.
pub struct Relay {
    config: RelayConfig,
    rng: SystemRandom,
    keys: HeaderKeys,
    limiter: Limiter,
    failover: Failover,
    circuits: HashMap<CircuitId, Circuit>,
    by_meter: HashMap<MeterAddr, CircuitId>,
    per_ip: HashMap<IpAddr, usize>,
    per_interface: HashMap<u8, usize>,
    /// One entry per circuit: when to look at it next (moved lazily on activity).
    expiries: BTreeSet<(Instant, CircuitId)>,
    next_circuit: u64,
    transmits: std::collections::VecDeque<Transmit>,
    events: std::collections::VecDeque<Event>,
    metrics: Metrics,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("mode", &self.config.mode)
            .field("active_registrar", &self.active_registrar())
            .field("circuits", &self.circuits.len())
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(config: RelayConfig, now: Instant) -> Result<Relay, String> {
        config.validate()?;
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, now, config.key_rotation);
        let mut hash_key = [0u8; 16];
        rng.fill(&mut hash_key)
            .map_err(|_| "RNG failure".to_string())?;
        let limiter = Limiter::new(
            now,
            config.per_meter_rate,
            config.global_rate,
            config.rate_limit_slots,
            hash_key,
        );
        Ok(Relay {
            config,
            rng,
            keys,
            limiter,
            failover: Failover {
                active: 0,
                unanswered_since: None,
            },
            circuits: HashMap::new(),
            by_meter: HashMap::new(),
            per_ip: HashMap::new(),
            per_interface: HashMap::new(),
            expiries: BTreeSet::new(),
            next_circuit: 1,
            transmits: Default::default(),
            events: Default::default(),
            metrics: Metrics::default(),
        })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The registrar new traffic goes to.
    pub fn active_registrar(&self) -> SocketAddr {
        self.registrar(self.failover.active)
    }

    /// The registrar at `index`, which is the failover's active one or a circuit's.
    #[allow(
        clippy::indexing_slicing,
        reason = "every registrar index is `failover.active` or a copy of it: it starts at 0 and advances modulo the list's length, and `RelayConfig::validate` refuses an empty list"
    )]
    fn registrar(&self, index: usize) -> SocketAddr {
        self.config.registrars[index]
    }

    pub fn circuits(&self) -> usize {
        self.circuits.len()
    }

    /// The meter a circuit serves.
    pub fn circuit_meter(&self, c: CircuitId) -> Option<MeterAddr> {
        self.circuits.get(&c).map(|c| c.meter)
    }

    /// The header keys (tests and tools).
    pub fn keys(&self) -> &HeaderKeys {
        &self.keys
    }

    /// Rotates the header key now (an operator's command; tests).
    pub fn rotate_key(&mut self, now: Instant) {
        self.keys.rotate(&self.rng, now);
        self.metrics.key_rotations += 1;
    }

    /// Memory the proxy holds for meters, in bytes, approximately: the fixed rate-limit table
    /// plus, stateful, each circuit's entries (its socket's kernel buffers not included).
    pub fn state_bytes(&self) -> usize {
        const PER_CIRCUIT: usize = std::mem::size_of::<(CircuitId, Circuit)>()
            + std::mem::size_of::<(MeterAddr, CircuitId)>()
            + std::mem::size_of::<(Instant, CircuitId)>()
            + std::mem::size_of::<(IpAddr, usize)>();
        self.limiter.table_bytes() + self.circuits.len() * PER_CIRCUIT
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = None::<Instant>;
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if self.config.mode == Mode::Stateless {
            consider(self.keys.next_rotation());
        }
        if let Some(since) = self.failover.unanswered_since {
            consider(since + self.config.failover_after);
        }
        if let Some(&(at, _)) = self.expiries.first() {
            consider(at);
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.config.mode == Mode::Stateless && self.keys.rotate_if_due(&self.rng, now) {
            self.metrics.key_rotations += 1;
            tracing::info!(generation = ?self.keys.current_generation(), "JPY header key rotated");
        }
        if let Some(since) = self.failover.unanswered_since {
            if now >= since + self.config.failover_after {
                self.fail_over();
            }
        }
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.remove(&(at, id));
            let Some(c) = self.circuits.get(&id) else {
                continue;
            };
            let due = c.last_activity + self.config.circuit_idle_timeout;
            if due > now {
                self.expiries.insert((due, id));
            } else {
                self.close_circuit(id);
                self.metrics.circuits_expired += 1;
            }
        }
    }

    fn fail_over(&mut self) {
        self.failover.unanswered_since = None;
        let n = self.config.registrars.len();
        if n < 2 {
            return;
        }
        let from = self.active_registrar();
        self.failover.active = (self.failover.active + 1) % n;
        let to = self.active_registrar();
        self.metrics.failovers += 1;
        tracing::warn!(%from, %to, "registrar not answering: failing over");
        self.events.push_back(Event::FailedOver { from, to });
    }

    fn hello_sent(&mut self, now: Instant, registrar: usize) {
        if registrar == self.failover.active && self.failover.unanswered_since.is_none() {
            self.failover.unanswered_since = Some(now);
        }
    }

    fn heard_from(&mut self, registrar: usize) {
        if registrar == self.failover.active {
            self.failover.unanswered_since = None;
        }
    }

    /// A datagram from a meter.
    pub fn handle_meter(&mut self, now: Instant, from: MeterAddr, datagram: &[u8]) {
        self.metrics.from_meters += 1;
        self.metrics.bytes_from_meters += datagram.len() as u64;
        match self.limiter.admit(now, from.addr.ip()) {
            Ok(()) => {}
            Err(Refused::PerAddress) => return self.metrics.drop(DropReason::RateMeter),
            Err(Refused::Global) => return self.metrics.drop(DropReason::RateGlobal),
        }
        if self.config.answer_discovery && discovery::looks_like_coap(datagram) {
            if let Some(reply) = discovery::answer(datagram, self.config.join_port) {
                self.metrics.discovery_answered += 1;
                self.transmits.push_back(Transmit {
                    destination: Destination::Meter(from),
                    payload: reply,
                });
            } else {
                self.metrics.drop(DropReason::NotDtls);
            }
            return;
        }
        if datagram.len() > self.config.max_meter_datagram {
            return self.metrics.drop(DropReason::TooLarge);
        }
        if !filter::looks_like_dtls(datagram) {
            return self.metrics.drop(DropReason::NotDtls);
        }
        let hello = filter::is_client_hello(datagram);
        match self.config.mode {
            Mode::Stateless => self.wrap(now, from, datagram, hello),
            Mode::Stateful => self.circuit_send(now, from, datagram, hello),
        }
    }

    fn wrap(&mut self, now: Instant, from: MeterAddr, datagram: &[u8], hello: bool) {
        if self.keys.rotate_if_due(&self.rng, now) {
            self.metrics.key_rotations += 1;
        }
        let registrar = self.failover.active;
        let to = self.registrar(registrar);
        let Some(header) = self.keys.seal(&from, to) else {
            return self.metrics.drop(DropReason::NoKey);
        };
        let payload = jpy::encode(&header, datagram);
        if hello {
            self.hello_sent(now, registrar);
        }
        self.metrics.forwarded_to_registrar += 1;
        self.metrics.bytes_to_registrars += payload.len() as u64;
        self.metrics.overhead_bytes_up += (payload.len() - datagram.len()) as u64;
        self.transmits.push_back(Transmit {
            destination: Destination::Jpy(to),
            payload,
        });
    }

    fn circuit_send(&mut self, now: Instant, from: MeterAddr, datagram: &[u8], hello: bool) {
        let id = match self.by_meter.get(&from) {
            Some(&id) => id,
            None => match self.open_circuit(now, from) {
                Ok(id) => id,
                Err(r) => return self.metrics.drop(r),
            },
        };
        let active = self.failover.active;
        let Some(c) = self.circuits.get_mut(&id) else {
            return;
        };
        c.last_activity = now;
        // A new handshake goes to the registrar in use now (the circuit keeps its port).
        if hello && c.registrar != active {
            c.registrar = active;
        }
        let registrar = c.registrar;
        if hello {
            self.hello_sent(now, registrar);
        }
        self.metrics.forwarded_to_registrar += 1;
        self.metrics.bytes_to_registrars += datagram.len() as u64;
        self.transmits.push_back(Transmit {
            destination: Destination::Circuit {
                circuit: id,
                registrar: self.registrar(registrar),
            },
            payload: datagram.to_vec(),
        });
    }

    fn open_circuit(&mut self, now: Instant, meter: MeterAddr) -> Result<CircuitId, DropReason> {
        let ip = meter.addr.ip();
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_circuits_per_meter {
            return Err(DropReason::CircuitCapMeter);
        }
        if self
            .per_interface
            .get(&meter.interface)
            .copied()
            .unwrap_or(0)
            >= self.config.max_circuits_per_interface
        {
            return Err(DropReason::CircuitCapInterface);
        }
        if self.circuits.len() >= self.config.max_circuits {
            return Err(DropReason::CircuitCapTotal);
        }
        let id = CircuitId(self.next_circuit);
        self.next_circuit += 1;
        self.circuits.insert(
            id,
            Circuit {
                meter,
                registrar: self.failover.active,
                last_activity: now,
            },
        );
        self.by_meter.insert(meter, id);
        *self.per_ip.entry(ip).or_insert(0) += 1;
        *self.per_interface.entry(meter.interface).or_insert(0) += 1;
        self.expiries
            .insert((now + self.config.circuit_idle_timeout, id));
        self.metrics.circuits_opened += 1;
        self.events
            .push_back(Event::CircuitOpened { circuit: id, meter });
        Ok(id)
    }

    fn close_circuit(&mut self, id: CircuitId) {
        let Some(c) = self.circuits.remove(&id) else {
            return;
        };
        if self.by_meter.get(&c.meter) == Some(&id) {
            self.by_meter.remove(&c.meter);
        }
        dec(&mut self.per_ip, c.meter.addr.ip());
        dec(&mut self.per_interface, c.meter.interface);
        self.events.push_back(Event::CircuitClosed(id));
    }

    fn registrar_index(&self, addr: SocketAddr) -> Option<usize> {
        self.config.registrars.iter().position(|r| *r == addr)
    }

    /// A datagram on the JPY socket (stateless mode's replies).
    pub fn handle_jpy(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let _ = now;
        self.metrics.from_registrars += 1;
        self.metrics.bytes_from_registrars += datagram.len() as u64;
        let Some(registrar) = self.registrar_index(from) else {
            return self.metrics.drop(DropReason::UnknownSource);
        };
        let Ok(msg) = jpy::decode(datagram, MAX_HEADER_LEN) else {
            return self.metrics.drop(DropReason::NotJpy);
        };
        let meter = match self.keys.open(&msg.header, from) {
            Ok(m) => m,
            Err(OpenError::Malformed) => return self.metrics.drop(DropReason::HeaderMalformed),
            Err(OpenError::StaleKey) => return self.metrics.drop(DropReason::HeaderStale),
            Err(OpenError::AuthFailed) => return self.metrics.drop(DropReason::HeaderAuth),
        };
        self.heard_from(registrar);
        let content = msg.content.into_owned();
        self.metrics.overhead_bytes_down += (datagram.len() - content.len()) as u64;
        self.relay_to_meter(meter, content);
    }

    /// A datagram on a circuit's socket (stateful mode's replies).
    pub fn handle_circuit(
        &mut self,
        now: Instant,
        circuit: CircuitId,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        self.metrics.from_registrars += 1;
        self.metrics.bytes_from_registrars += datagram.len() as u64;
        let Some(c) = self.circuits.get_mut(&circuit) else {
            return self.metrics.drop(DropReason::UnknownCircuit);
        };
        if self.config.registrars.get(c.registrar) != Some(&from) {
            return self.metrics.drop(DropReason::UnknownSource);
        }
        c.last_activity = now;
        let (meter, registrar) = (c.meter, c.registrar);
        self.heard_from(registrar);
        self.relay_to_meter(meter, datagram.to_vec());
    }

    fn relay_to_meter(&mut self, meter: MeterAddr, payload: Vec<u8>) {
        self.metrics.forwarded_to_meters += 1;
        self.metrics.bytes_to_meters += payload.len() as u64;
        self.transmits.push_back(Transmit {
            destination: Destination::Meter(meter),
            payload,
        });
    }
}

fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K) {
    if let Some(n) = map.get_mut(&k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&k);
        }
    }
}
