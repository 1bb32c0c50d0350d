//! The server endpoint: many associations behind one socket.
//!
//! ```text
//!   handle(now, from, datagram)
//!     ├─ tls12_cid record ──────────────► connection by CID (any source address, RFC 9146)
//!     ├─ known address ─────────────────► its connection (a new ClientHello goes stateless)
//!     └─ ClientHello, unknown address ──► stateless cookie check (RFC 6347 §4.2.1)
//!            no/bad cookie: HelloVerifyRequest, nothing kept
//!            valid cookie:  admission limits, then a Connection (flight 4)
//!   poll_transmit() / poll_event() / poll_timeout() / handle_timeout(now)
//! ```
//!
//! Until a ClientHello returns a valid cookie the endpoint keeps nothing for its sender: one
//! HMAC and one HelloVerifyRequest no larger than the ClientHello. Everything after that is
//! bounded by [`crate::Limits`], and every refusal is counted and logged at a bounded rate.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{ServerConfig, Verified};
use crate::conn::{CloseReason, ConnEvent, Connection};
use crate::cookie::CookieKeys;
use crate::crypto::{self, HashAlg};
use crate::error::{Error, RefusalReason};
use crate::metrics::Metrics;
use crate::peer::PeerAddr;
use crate::wire::{
    self, alert, content_type as ct, handshake_type as hs, ClientHello, HelloVerifyRequest,
    DTLS_1_0,
};

/// Identifies a connection of an [`Endpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle(pub u64);

/// A datagram to send: to a UDP address, or (a relayed peer) as a JPY message to its proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub destination: PeerAddr,
    pub payload: Vec<u8>,
}

/// What the endpoint tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A handshake completed: the session is ready ([`Endpoint::connection`] has its details).
    Connected(ConnectionHandle),
    /// Application data of a session.
    Data(ConnectionHandle, Vec<u8>),
    /// A session moved to a new address (Connection ID). Only for sessions announced by
    /// [`Event::Connected`]: a handshake that moves is announced there with its new address.
    AddressChanged {
        conn: ConnectionHandle,
        from: PeerAddr,
        to: PeerAddr,
    },
    /// A session (or a handshake) ended; the handle is no longer valid.
    Closed(ConnectionHandle, CloseReason),
}

/// Gauges of the endpoint's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub half_open: usize,
    pub established: usize,
    pub timers: usize,
}

/// What the per-source limits count a connection under: its source IP address, or the IP
/// address of the join proxy it came through (a proxy's meters are counted apart from any
/// direct traffic of the proxy, under their own caps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    Ip(IpAddr),
    Relay(IpAddr),
}

impl Source {
    fn of(peer: &PeerAddr, limits: &crate::config::Limits) -> Source {
        match peer {
            PeerAddr::Direct(a) if limits.relay_prefixes.iter().any(|p| p.contains(a.ip())) => {
                Source::Relay(a.ip())
            }
            PeerAddr::Direct(a) => Source::Ip(a.ip()),
            PeerAddr::Relayed { proxy, .. } => Source::Relay(proxy.ip()),
        }
    }
}

struct Slot {
    conn: Connection,
    timer: Option<Instant>,
    /// The source the limits counted this connection under.
    ip: Source,
    half_open: bool,
    established: bool,
    identity: Option<Vec<u8>>,
    /// The address key under which `by_addr` maps to this connection.
    addr_key: Option<PeerAddr>,
}

/// Rate limit on log lines about remote peers.
struct LogLimiter {
    window_start: Option<Instant>,
    lines: u32,
    max_per_sec: u32,
}

impl LogLimiter {
    fn allow(&mut self, now: Instant, metrics: &mut Metrics) -> bool {
        match self.window_start {
            Some(s) if now < s + Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(now);
                self.lines = 0;
            }
        }
        if self.lines < self.max_per_sec {
            self.lines += 1;
            true
        } else {
            metrics.log_lines_suppressed += 1;
            false
        }
    }
}

/// The server side of the engine.
pub struct Endpoint {
    config: Arc<ServerConfig>,
    rng: SystemRandom,
    cookies: CookieKeys,
    slots: HashMap<u64, Slot>,
    by_addr: HashMap<PeerAddr, u64>,
    by_cid: HashMap<Vec<u8>, u64>,
    by_identity: HashMap<Vec<u8>, VecDeque<u64>>,
    half_open_per_ip: HashMap<Source, usize>,
    established_per_ip: HashMap<Source, usize>,
    half_open: usize,
    /// Half-open handshakes in admission order (stale entries are skipped lazily).
    half_open_order: VecDeque<u64>,
    established: usize,
    timers: BTreeSet<(Instant, u64)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    metrics: Metrics,
    next_id: u64,
    log: LogLimiter,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("connections", &self.slots.len())
            .field("half_open", &self.half_open)
            .field("established", &self.established)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn new(config: Arc<ServerConfig>, now: Instant) -> Result<Endpoint, Error> {
        config.validate().map_err(Error::Internal)?;
        let rng = SystemRandom::new();
        let cookies = CookieKeys::new(&rng, now);
        let max_log = config.limits.max_log_lines_per_sec;
        Ok(Endpoint {
            config,
            rng,
            cookies,
            slots: HashMap::new(),
            by_addr: HashMap::new(),
            by_cid: HashMap::new(),
            by_identity: HashMap::new(),
            half_open_per_ip: HashMap::new(),
            established_per_ip: HashMap::new(),
            half_open: 0,
            half_open_order: VecDeque::new(),
            established: 0,
            timers: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            metrics: Metrics::default(),
            next_id: 1,
            log: LogLimiter {
                window_start: None,
                lines: 0,
                max_per_sec: max_log,
            },
        })
    }

    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Use `certificate_chain` and `private_key` for every handshake that starts from now on
    /// (a renewed server certificate); sessions and handshakes in progress keep theirs.
    pub fn set_credentials(
        &mut self,
        certificate_chain: Vec<Vec<u8>>,
        private_key: Arc<crate::SigningKey>,
    ) {
        let mut config = ServerConfig::clone(&self.config);
        config.certificate_chain = certificate_chain;
        config.private_key = private_key;
        self.config = Arc::new(config);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            half_open: self.half_open,
            established: self.established,
            timers: self.timers.len(),
        }
    }

    /// A live connection.
    pub fn connection(&self, h: ConnectionHandle) -> Option<&Connection> {
        self.slots.get(&h.0).map(|s| &s.conn)
    }

    /// The identity an established session counts under for `max_sessions_per_identity`: the
    /// verifier's [`Verified::identity`], or the SHA-256 of the peer's leaf certificate.
    /// `None` for a handshake in progress or a closed connection.
    pub fn identity(&self, h: ConnectionHandle) -> Option<&[u8]> {
        self.slots
            .get(&h.0)
            .filter(|s| s.established)
            .and_then(|s| s.identity.as_deref())
    }

    /// Closes an established session (close_notify) because a newer session of the same
    /// identity was established elsewhere (another endpoint of the same server, e.g. another
    /// engine shard): the per-identity limit held across endpoints by their driver. Counted in
    /// `sessions_superseded`, like the replacement this endpoint does on its own. Returns
    /// whether a session was closed (false: the handle is no longer an established session).
    pub fn supersede(&mut self, now: Instant, h: ConnectionHandle) -> bool {
        if !self.slots.get(&h.0).is_some_and(|s| s.established) {
            return false;
        }
        self.close_superseded(now, h.0);
        true
    }

    fn close_superseded(&mut self, now: Instant, id: u64) {
        if let Some(s) = self.slots.get_mut(&id) {
            let mut events = Vec::new();
            s.conn.close_with(
                CloseReason::Superseded,
                true,
                &mut self.metrics,
                &mut events,
            );
            self.metrics.sessions_superseded += 1;
            self.after(now, id, events);
        }
    }

    /// Takes an established session's peer chain out of the engine (it needs it no more once
    /// the handshake is done), so that the application holds the only copy.
    pub fn take_peer_certificates(&mut self, h: ConnectionHandle) -> Vec<Vec<u8>> {
        self.slots
            .get_mut(&h.0)
            .map(|s| s.conn.take_peer_certificates())
            .unwrap_or_default()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next instant [`Endpoint::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, id));
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            slot.timer = None;
            let mut events = Vec::new();
            slot.conn
                .handle_timeout(now, &mut self.metrics, &mut events);
            self.after(now, id, events);
        }
    }

    /// Sends application data on a session.
    pub fn send(&mut self, now: Instant, h: ConnectionHandle, data: &[u8]) -> Result<(), Error> {
        let slot = self
            .slots
            .get_mut(&h.0)
            .ok_or(Error::UnexpectedMessage("no such connection"))?;
        slot.conn.send(now, data)?;
        self.after(now, h.0, Vec::new());
        Ok(())
    }

    /// Closes a session with close_notify.
    pub fn close(&mut self, now: Instant, h: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&h.0) {
            let mut events = Vec::new();
            slot.conn.close(&mut self.metrics, &mut events);
            self.after(now, h.0, events);
        }
    }

    /// Closes every session (close_notify) and abandons every handshake.
    pub fn shutdown(&mut self, now: Instant) {
        let ids: Vec<u64> = self.slots.keys().copied().collect();
        for id in ids {
            if let Some(slot) = self.slots.get_mut(&id) {
                let mut events = Vec::new();
                slot.conn
                    .close_with(CloseReason::Shutdown, true, &mut self.metrics, &mut events);
                self.after(now, id, events);
            }
        }
    }

    /// Handles one datagram from `from`: a UDP address, or a meter behind a join proxy
    /// ([`PeerAddr::Relayed`], the content of a JPY message).
    pub fn handle(&mut self, now: Instant, from: impl Into<PeerAddr>, datagram: &[u8]) {
        let from = from.into();
        self.metrics.datagrams_received += 1;
        if from.is_relayed() {
            self.metrics.datagrams_relayed += 1;
        }
        let cid_len = self.config.cid_length;
        let Some((content, epoch, cid)) = wire::peek_first_record(datagram, cid_len) else {
            self.metrics.records_malformed += 1;
            return;
        };
        if content == ct::TLS12_CID {
            // RFC 9146: routed by CID, whatever the source address.
            match self.by_cid.get(cid).copied() {
                Some(id) => self.deliver(now, id, &from, datagram),
                None => self.metrics.dropped_unknown_peer += 1,
            }
            return;
        }
        let hello = if content == ct::HANDSHAKE && epoch == 0 {
            first_client_hello_random(datagram)
        } else {
            None
        };
        if let Some(&id) = self.by_addr.get(&from) {
            let repeat_of_handshake = match (&hello, self.slots.get(&id)) {
                (Some(random), Some(slot)) => {
                    slot.conn.handshake_client_random() == Some(*random) && !slot.conn.is_closed()
                }
                _ => true,
            };
            if hello.is_none() || repeat_of_handshake {
                self.deliver(now, id, &from, datagram);
                return;
            }
            // A ClientHello with a new random from an address with a session (the meter
            // restarted): RFC 6347 §4.2.8, a new handshake, statelessly until the cookie
            // proves the address; only then is the old association replaced.
        }
        if hello.is_some() {
            self.stateless_client_hello(now, &from, datagram);
        } else {
            self.metrics.dropped_unknown_peer += 1;
        }
    }

    fn deliver(&mut self, now: Instant, id: u64, from: &PeerAddr, datagram: &[u8]) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let mut events = Vec::new();
        slot.conn
            .handle_datagram(now, from, datagram, &mut self.metrics, &mut events);
        self.after(now, id, events);
    }

    /// RFC 6347 §4.2.1: answer a ClientHello without a valid cookie with a HelloVerifyRequest
    /// and keep nothing; admit one with a valid cookie.
    fn stateless_client_hello(&mut self, now: Instant, from: &PeerAddr, datagram: &[u8]) {
        self.cookies
            .rotate_if_due(&self.rng, now, self.config.cookie_rotation_interval);
        let Ok((rec, _)) = wire::parse_record(datagram, 0) else {
            self.metrics.client_hello_malformed += 1;
            return;
        };
        let frag = match wire::parse_handshake_fragments(rec.fragment) {
            Ok(f) => f.into_iter().next(),
            Err(_) => None,
        };
        // A stateless server cannot reassemble: the ClientHello must come whole.
        let Some(frag) = frag.filter(|f| f.msg_type == hs::CLIENT_HELLO && f.is_complete()) else {
            self.metrics.client_hello_malformed += 1;
            return;
        };
        let Ok(ch) = ClientHello::parse(frag.body) else {
            self.metrics.client_hello_malformed += 1;
            return;
        };
        let params = ch.cookie_params();
        // The cookie's age is the HelloVerifyRequest / ClientHello round trip: the path's
        // first RTT sample, which sets the handshake's first retransmission timer.
        let round_trip = match ch.cookie.is_empty() {
            true => None,
            false => self.cookies.verify(now, from, &params, &ch.cookie),
        };
        let Some(round_trip) = round_trip else {
            if !ch.cookie.is_empty() {
                self.metrics.refuse(RefusalReason::BadCookie);
            }
            let hvr = HelloVerifyRequest {
                server_version: DTLS_1_0,
                cookie: self.cookies.generate(now, from, &params).to_vec(),
            };
            let msg =
                wire::handshake_message(hs::HELLO_VERIFY_REQUEST, frag.message_seq, &hvr.encode());
            let mut out = Vec::with_capacity(wire::RECORD_HEADER_LEN + msg.len());
            // RFC 6347 §4.2.1: the HelloVerifyRequest reuses the ClientHello's record sequence.
            wire::push_record(&mut out, ct::HANDSHAKE, DTLS_1_0, 0, rec.seq, &[], &msg);
            self.metrics.hello_verify_sent += 1;
            self.transmits.push_back(Transmit {
                destination: from.clone(),
                payload: out,
            });
            return;
        };
        self.metrics.cookies_verified += 1;
        let limits = &self.config.limits;
        let ip = Source::of(from, limits);
        // Per-source caps: a proxy's meters under the relay caps; a direct source under the
        // per-IP caps unless exempt.
        let (max_half_open_here, max_sessions_here) = match ip {
            Source::Relay(_) => (
                limits.max_half_open_per_relay,
                limits.max_sessions_per_relay,
            ),
            Source::Ip(a) if limits.exempt_ips.contains(&a) => (usize::MAX, usize::MAX),
            Source::Ip(_) => (limits.max_half_open_per_ip, limits.max_sessions_per_ip),
        };
        let replacing = self.by_addr.get(from).copied();
        let live = self.slots.len() - usize::from(replacing.is_some());
        // Admission control (issue #10 §3). Half-open caps drop silently (the meter retries
        // its ClientHello with back-off); a full server refuses cleanly with an alert.
        if live >= limits.max_sessions {
            self.refuse_stateless(now, from, rec.seq, Error::Limit("max_sessions"));
            return;
        }
        {
            if self.half_open_per_ip.get(&ip).copied().unwrap_or(0) >= max_half_open_here {
                self.metrics.refuse(RefusalReason::Limit);
                let which = if matches!(ip, Source::Relay(_)) {
                    "max_half_open_per_relay"
                } else {
                    "max_half_open_per_ip"
                };
                self.log_refusal(now, from, &Error::Limit(which));
                return;
            }
            // The session this handshake would replace frees a place only under the IP it is
            // counted under (it may have moved here from another with a Connection ID).
            let established_here = self.established_per_ip.get(&ip).copied().unwrap_or(0)
                - usize::from(
                    replacing
                        .and_then(|id| self.slots.get(&id))
                        .is_some_and(|s| s.established && s.ip == ip),
                );
            if established_here >= max_sessions_here {
                let which = if matches!(ip, Source::Relay(_)) {
                    "max_sessions_per_relay"
                } else {
                    "max_sessions_per_ip"
                };
                self.refuse_stateless(now, from, rec.seq, Error::Limit(which));
                return;
            }
        }
        if self.half_open >= self.config.limits.max_half_open && !self.evict_half_open(now) {
            self.metrics.refuse(RefusalReason::Limit);
            self.log_refusal(now, from, &Error::Limit("max_half_open"));
            return;
        }
        let own_cid = if self.config.cid_length > 0
            && ch.extension(wire::extension_type::CONNECTION_ID).is_some()
        {
            match self.allocate_cid() {
                Some(c) => c,
                None => {
                    self.refuse_stateless(now, from, rec.seq, Error::Internal("no CID".into()));
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let ch_message = wire::handshake_message(hs::CLIENT_HELLO, frag.message_seq, frag.body);
        let accepted = Connection::accept(
            now,
            from.clone(),
            self.config.clone(),
            &ch,
            &ch_message,
            frag.message_seq,
            rec.seq,
            own_cid,
            round_trip,
            &self.rng,
            &mut self.metrics,
        );
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                self.refuse_stateless(now, from, rec.seq.saturating_add(1), e);
                return;
            }
        };
        if let Some(old) = replacing {
            // The new handshake proved the address: the old association goes (RFC 6347 §4.2.8).
            if self.slots.get(&old).is_some_and(|s| s.conn.is_closed()) {
                self.remove_slot(old);
            } else if let Some(slot) = self.slots.get_mut(&old) {
                let mut events = Vec::new();
                slot.conn
                    .close_with(CloseReason::Replaced, false, &mut self.metrics, &mut events);
                self.metrics.sessions_replaced += 1;
                self.after(now, old, events);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        if !conn.own_cid().is_empty() {
            self.by_cid.insert(conn.own_cid().to_vec(), id);
        }
        self.by_addr.insert(from.clone(), id);
        self.half_open += 1;
        self.half_open_order.push_back(id);
        if self.half_open_order.len() > 2 * self.config.limits.max_half_open {
            let slots = &self.slots;
            self.half_open_order
                .retain(|x| slots.get(x).is_some_and(|s| s.half_open) || *x == id);
        }
        *self.half_open_per_ip.entry(ip).or_insert(0) += 1;
        self.slots.insert(
            id,
            Slot {
                conn,
                timer: None,
                ip,
                half_open: true,
                established: false,
                identity: None,
                addr_key: Some(from.clone()),
            },
        );
        self.after(now, id, Vec::new());
    }

    /// With every half-open slot taken, a handshake past its cookie gives way to the newcomer
    /// (as a SYN cache does), so peers that echo a cookie and go silent cannot keep legitimate
    /// meters out. Which one goes: the oldest handshake of the source holding the most
    /// half-open slots (a source is an IPv4 address or an IPv6 /64; join proxies and relays in
    /// `exempt_ips` are never picked as the heaviest), so one host flooding from many ports or addresses evicts
    /// its own handshakes, not a slow meter's elsewhere. When every source holds one slot the
    /// oldest handshake goes. The evicted peer gets a fatal handshake_failure alert, so a meter
    /// starts over at once instead of retransmitting into the void until its own timeout.
    /// Returns whether one went.
    fn evict_half_open(&mut self, now: Instant) -> bool {
        let exempt = &self.config.limits.exempt_ips;
        let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
        for (src, n) in &self.half_open_per_ip {
            if let Some(f) = fairness_source(*src, exempt) {
                *per_source.entry(f).or_insert(0) += n;
            }
        }
        // Ties go to the lowest source, so the choice does not depend on hash order.
        let heaviest = per_source
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(source, _)| source);
        let slots = &self.slots;
        let pos = self.half_open_order.iter().position(|id| {
            slots.get(id).is_some_and(|s| {
                s.half_open && heaviest.is_none_or(|src| fairness_source(s.ip, exempt) == Some(src))
            })
        });
        let Some(id) = pos.and_then(|p| self.half_open_order.remove(p)) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(&id) else {
            return false;
        };
        let mut events = Vec::new();
        let reason = if heaviest.is_some() {
            "evicted: half-open handshake of the busiest source"
        } else {
            "evicted: oldest half-open handshake"
        };
        slot.conn
            .fail(Error::Limit(reason), &mut self.metrics, &mut events);
        self.metrics.half_open_evicted += 1;
        self.after(now, id, events);
        true
    }

    /// A fatal alert to a peer we keep no state for.
    fn refuse_stateless(&mut self, now: Instant, to: &PeerAddr, seq: u64, err: Error) {
        self.metrics.refuse(err.refusal_reason());
        self.log_refusal(now, to, &err);
        if let Some(desc) = err.alert() {
            let mut out = Vec::with_capacity(15);
            wire::push_record(
                &mut out,
                ct::ALERT,
                wire::DTLS_1_2,
                0,
                seq,
                &[],
                &[alert::FATAL, desc],
            );
            self.transmits.push_back(Transmit {
                destination: to.clone(),
                payload: out,
            });
        }
    }

    fn log_refusal(&mut self, now: Instant, peer: &PeerAddr, err: &Error) {
        if self.log.allow(now, &mut self.metrics) {
            tracing::info!(%peer, reason = err.refusal_reason().name(), error = %err, "DTLS handshake refused");
        }
    }

    fn allocate_cid(&mut self) -> Option<Vec<u8>> {
        let len = self.config.cid_length;
        let prefix = &self.config.cid_prefix;
        for _ in 0..8 {
            let mut cid = prefix.clone();
            let mut rand = vec![0u8; len - prefix.len()];
            self.rng.fill(&mut rand).ok()?;
            cid.extend_from_slice(&rand);
            if !self.by_cid.contains_key(&cid) {
                return Some(cid);
            }
        }
        None
    }

    /// After any call into a connection: queue its datagrams, turn its events into endpoint
    /// events and bookkeeping, and reschedule its timer.
    fn after(&mut self, now: Instant, id: u64, events: Vec<ConnEvent>) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let dest = slot.conn.peer();
        for payload in slot.conn.drain_outbox() {
            self.transmits.push_back(Transmit {
                destination: dest.clone(),
                payload,
            });
        }
        let handle = ConnectionHandle(id);
        for ev in events {
            match ev {
                ConnEvent::Connected => self.on_connected(now, id),
                ConnEvent::Data(d) => self.events.push_back(Event::Data(handle, d)),
                ConnEvent::AddressChanged(old) => self.on_address_changed(id, old),
                ConnEvent::Closed(reason) => {
                    self.on_closed(now, id, &reason);
                    self.events.push_back(Event::Closed(handle, reason));
                    if self.slots.contains_key(&id) {
                        // Draining: kept (no longer counted) until its final flight expires.
                        self.reschedule(id);
                    }
                    return;
                }
            }
        }
        if self
            .slots
            .get(&id)
            .is_some_and(|s| s.conn.is_closed() && !s.conn.is_draining())
        {
            self.remove_slot(id);
            return;
        }
        self.reschedule(id);
    }

    /// Forgets a closed connection entirely (its counts were released by `on_closed`).
    fn remove_slot(&mut self, id: u64) {
        let Some(slot) = self.slots.remove(&id) else {
            return;
        };
        if let Some(t) = slot.timer {
            self.timers.remove(&(t, id));
        }
        if let Some(a) = slot.addr_key {
            if self.by_addr.get(&a) == Some(&id) {
                self.by_addr.remove(&a);
            }
        }
        if !slot.conn.own_cid().is_empty() && self.by_cid.get(slot.conn.own_cid()) == Some(&id) {
            self.by_cid.remove(slot.conn.own_cid());
        }
    }

    fn reschedule(&mut self, id: u64) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let next = slot.conn.poll_timeout();
        if next != slot.timer {
            if let Some(t) = slot.timer {
                self.timers.remove(&(t, id));
            }
            if let Some(t) = next {
                self.timers.insert((t, id));
            }
            slot.timer = next;
        }
    }

    fn on_connected(&mut self, now: Instant, id: u64) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.half_open {
            slot.half_open = false;
            self.half_open -= 1;
            dec(&mut self.half_open_per_ip, slot.ip);
        }
        slot.established = true;
        self.established += 1;
        *self.established_per_ip.entry(slot.ip).or_insert(0) += 1;
        let identity = match slot.conn.verified() {
            Some(Verified { identity, .. }) if !identity.is_empty() => identity.clone(),
            _ => slot
                .conn
                .peer_certificates()
                .first()
                .map(|leaf| crypto::digest(HashAlg::Sha256, leaf))
                .unwrap_or_default(),
        };
        slot.identity = Some(identity.clone());
        self.events
            .push_back(Event::Connected(ConnectionHandle(id)));
        let queue = self.by_identity.entry(identity).or_default();
        queue.push_back(id);
        let max = self.config.limits.max_sessions_per_identity;
        let mut superseded = Vec::new();
        while queue.len() > max {
            if let Some(old) = queue.pop_front() {
                superseded.push(old);
            }
        }
        for old in superseded {
            self.close_superseded(now, old);
        }
    }

    fn on_address_changed(&mut self, id: u64, old: PeerAddr) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let new = slot.conn.peer();
        if slot.addr_key.as_ref() == Some(&old) && self.by_addr.get(&old) == Some(&id) {
            self.by_addr.remove(&old);
        }
        slot.addr_key = None;
        if let std::collections::hash_map::Entry::Vacant(v) = self.by_addr.entry(new.clone()) {
            v.insert(id);
            slot.addr_key = Some(new.clone());
        }
        // A handshake that moves (its Finished came from a new address) is announced by
        // Connected, with the new address; the driver has no handle to move before that.
        if slot.established {
            self.events.push_back(Event::AddressChanged {
                conn: ConnectionHandle(id),
                from: old,
                to: new,
            });
        }
    }

    /// Releases what a closed connection counted against the limits. The slot itself goes
    /// in `after`, unless it is draining (then when its final flight expires).
    fn on_closed(&mut self, now: Instant, id: u64, reason: &CloseReason) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let (half_open, established, identity, ip, peer) = (
            slot.half_open,
            slot.established,
            slot.identity.take(),
            slot.ip,
            slot.conn.peer(),
        );
        slot.half_open = false;
        slot.established = false;
        if half_open {
            self.half_open -= 1;
            dec(&mut self.half_open_per_ip, ip);
        }
        if established {
            self.established -= 1;
            dec(&mut self.established_per_ip, ip);
        }
        if let Some(identity) = &identity {
            if let Some(q) = self.by_identity.get_mut(identity) {
                q.retain(|x| *x != id);
                if q.is_empty() {
                    self.by_identity.remove(identity);
                }
            }
        }
        match reason {
            CloseReason::IdleTimeout => self.metrics.sessions_closed_idle += 1,
            CloseReason::HandshakeFailed(e) => {
                let e = e.clone();
                self.log_refusal(now, &peer, &e);
            }
            _ => {}
        }
        if !self.slots.get(&id).is_some_and(|s| s.conn.is_draining()) {
            self.remove_slot(id);
        }
    }
}

fn dec(map: &mut HashMap<Source, usize>, ip: Source) {
    if let Some(n) = map.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&ip);
        }
    }
}

/// The client random of a datagram's first record if it is an epoch-0 ClientHello fragment
/// (offset 0). Cheap: no full parse.
fn first_client_hello_random(datagram: &[u8]) -> Option<[u8; 32]> {
    // record header 13 + handshake header 12 + client_version 2 = 27
    let (rec, _) = wire::parse_record(datagram, 0).ok()?;
    let body = rec.fragment;
    if *body.first()? != hs::CLIENT_HELLO {
        return None;
    }
    let random = body.get(14..46)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(random);
    Some(out)
}

/// The unit of fairness at the half-open cap: an IPv4 address, or the /64 of an IPv6 address
/// (one host or site commonly holds a whole /64). Meters behind a join proxy and sources in
/// `exempt_ips` have none: they are never picked as the busiest source.
fn fairness_source(src: Source, exempt: &[IpAddr]) -> Option<IpAddr> {
    match src {
        Source::Ip(ip) if exempt.contains(&ip) => None,
        Source::Ip(IpAddr::V4(a)) => Some(IpAddr::V4(a)),
        Source::Ip(IpAddr::V6(a)) => Some(IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) & !((1u128 << 64) - 1),
        ))),
        Source::Relay(_) => None,
    }
}
