//! Runtime side of the link emulator: a `webrtc_util::conn::Conn` that carries a meter's datagrams
//! over a real UDP socket through its emulated link (and, optionally, its DCU).
//!
//! ```text
//!   router:          DTLSConn --send--> meter link (up) --> [DCU up, shared FIFO] --> UdpSocket --> server
//!                    DTLSConn <--recv-- meter link (down) <-- [DCU down, shared] <-- UdpSocket <-- server
//!   relay-stateless: DTLSConn --> meter link --> est-relay core (JPY [header, datagram]) --> DCU up --> JPY socket --> server's JPY port
//!   relay-stateful:  DTLSConn --> meter link --> est-relay core (a circuit per meter)   --> DCU up --> circuit socket --> server
//!                    (and back the same way: DCU down --> relay core --> meter link --> DTLSConn)
//! ```
//!
//! Every decision (loss, queueing, delivery time) is taken by the sans-IO [`LinkDirection`]s at the
//! moment the datagram reaches them; a small spawned task per datagram sleeps until the delivery
//! time and passes it on. A datagram reaches the DCU only when it has crossed the meter's own link,
//! so the DCU sees packets from all its meters in arrival order, FIFO. In the relay modes the DCU
//! runs est-relay's own core ([`est_relay::Relay`], the code of the `est-relay` binary): the
//! backhaul carries exactly what a real DCU would send, JPY headers included.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use est_relay::{CircuitId, Destination, MeterAddr, Relay, RelayConfig};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc_util::conn::Conn;

use crate::link::{LinkCounters, LinkDirection, LinkParams, Verdict};
use crate::phases::{Dir, Ledger};

/// How a DCU carries its meters' enrollment traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DcuMode {
    /// An IP router: the meters' datagrams cross the backhaul as they are (the meters are
    /// routable; the behaviour before issue #12).
    #[default]
    Router,
    /// A stateless join proxy: each datagram goes to the server's JPY port wrapped as
    /// `[header, datagram]`.
    RelayStateless,
    /// A stateful join proxy: a UDP circuit (a port of the DCU) per meter to the coaps port.
    RelayStateful,
}

/// The relay's counters, summed over DCUs, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayReport {
    /// Meters' datagrams relayed to the server, and the server's relayed back.
    pub forwarded_up: u64,
    pub forwarded_down: u64,
    /// Bytes the relays added on the backhaul (JPY headers and CBOR), each way.
    pub overhead_bytes_up: u64,
    pub overhead_bytes_down: u64,
    /// Datagrams the relays dropped (rate limits, caps, headers, ...).
    pub dropped: u64,
    pub failovers: u64,
    pub circuits_opened: u64,
    /// The relays' state per meter, bytes: what they hold (fixed tables, circuits) at the end
    /// of the run over the meters behind them.
    pub state_bytes_per_meter: f64,
    pub state_bytes: u64,
}

impl RelayReport {
    /// Bytes added per relayed datagram (both directions).
    pub fn overhead_per_datagram(&self) -> f64 {
        let n = self.forwarded_up + self.forwarded_down;
        if n == 0 {
            0.0
        } else {
            (self.overhead_bytes_up + self.overhead_bytes_down) as f64 / n as f64
        }
    }
}

/// A data concentrator unit: its backhaul is one rate-limited link shared by all its meters;
/// in the relay modes it also runs a join proxy.
#[derive(Debug)]
pub struct Dcu {
    pub index: u64,
    up: Mutex<LinkDirection>,
    down: Mutex<LinkDirection>,
    relay: Option<Arc<RelayDcu>>,
    next_meter: AtomicU32,
}

impl Dcu {
    /// A router DCU.
    pub fn new(index: u64, params: LinkParams, seed: u64) -> Dcu {
        let link = crate::link::Link::new(params, seed);
        Dcu {
            index,
            up: Mutex::new(link.up),
            down: Mutex::new(link.down),
            relay: None,
            next_meter: AtomicU32::new(1),
        }
    }

    /// A DCU in `mode`: a relay towards `registrar` (the server's JPY port for stateless, its
    /// coaps port for stateful), its backhaul sockets bound on `bind_ip`. `meters` is how many
    /// meters it serves (its circuit caps are sized for them).
    pub async fn with_mode(
        index: u64,
        params: LinkParams,
        seed: u64,
        mode: DcuMode,
        registrar: SocketAddr,
        bind_ip: IpAddr,
        meters: usize,
    ) -> std::io::Result<Arc<Dcu>> {
        let mut dcu = Dcu::new(index, params, seed);
        let relay_mode = match mode {
            DcuMode::Router => return Ok(Arc::new(dcu)),
            DcuMode::RelayStateless => est_relay::Mode::Stateless,
            DcuMode::RelayStateful => est_relay::Mode::Stateful,
        };
        let config = RelayConfig {
            mode: relay_mode,
            registrars: vec![registrar],
            join_port: 5684,
            // The mesh links already limit each meter; the whole DCU is not limited here.
            global_rate: est_relay::Rate::UNLIMITED,
            max_circuits_per_interface: meters.max(1) * 2,
            max_circuits: meters.max(1) * 2,
            ..RelayConfig::default()
        };
        let core = Relay::new(config, Instant::now())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let jpy = match relay_mode {
            est_relay::Mode::Stateless => Some(Arc::new(
                UdpSocket::bind(SocketAddr::new(bind_ip, 0)).await?,
            )),
            est_relay::Mode::Stateful => None,
        };
        dcu.relay = Some(Arc::new(RelayDcu {
            core: Mutex::new(core),
            jpy,
            bind_ip,
            circuits: Mutex::new(HashMap::new()),
            meters: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }));
        let dcu = Arc::new(dcu);
        if let Some(relay) = &dcu.relay {
            if let Some(j) = &relay.jpy {
                let reader = tokio::spawn(backhaul_reader(Arc::downgrade(&dcu), j.clone(), None));
                lock(&relay.tasks).push(reader);
            }
            let timer = tokio::spawn(relay_timer(Arc::downgrade(&dcu)));
            lock(&relay.tasks).push(timer);
        }
        Ok(dcu)
    }

    /// (up, down) counters of the DCU's shared link.
    pub fn counters(&self) -> (LinkCounters, LinkCounters) {
        (lock(&self.up).counters(), lock(&self.down).counters())
    }

    /// The relay's counters (zero for a router), with the meters it served.
    pub fn relay_report(&self) -> Option<RelayReport> {
        let relay = self.relay.as_ref()?;
        let core = lock(&relay.core);
        let m = core.metrics();
        Some(RelayReport {
            forwarded_up: m.forwarded_to_registrar,
            forwarded_down: m.forwarded_to_meters,
            overhead_bytes_up: m.overhead_bytes_up,
            overhead_bytes_down: m.overhead_bytes_down,
            dropped: m.dropped_total(),
            failovers: m.failovers,
            circuits_opened: m.circuits_opened,
            state_bytes_per_meter: 0.0,
            state_bytes: core.state_bytes() as u64,
        })
    }

    /// Meters given an address by this DCU.
    pub fn meters(&self) -> u32 {
        self.next_meter.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// A new mesh address for a meter behind this relay: link-local IPv6 (as a Wi-SUN meter
    /// before it joins), its interface identifier naming the DCU and the meter.
    fn new_meter_addr(&self) -> MeterAddr {
        let n = self.next_meter.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            0x0200,
            (self.index & 0xffff) as u16,
            (n >> 16) as u16,
            (n & 0xffff) as u16,
        );
        MeterAddr::new(SocketAddr::V6(SocketAddrV6::new(ip, 5684, 0, 0)), 0)
    }

    fn stop(&self) {
        if let Some(r) = &self.relay {
            for t in lock(&r.tasks).drain(..) {
                t.abort();
            }
            for (_, (_, t)) in lock(&r.circuits).drain() {
                t.abort();
            }
        }
    }
}

impl Drop for Dcu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stateful circuit's socket and its reader task.
type CircuitSocket = (Arc<UdpSocket>, JoinHandle<()>);
/// Where a meter's datagrams go: its link, and its session's receive queue.
type MeterRoute = (Arc<MeterLink>, mpsc::UnboundedSender<Vec<u8>>);

/// The join proxy of a DCU: est-relay's core and the DCU's backhaul sockets.
#[derive(Debug)]
struct RelayDcu {
    core: Mutex<Relay>,
    /// Stateless: the one socket JPY messages leave from.
    jpy: Option<Arc<UdpSocket>>,
    bind_ip: IpAddr,
    /// Stateful: a socket per circuit, and its reader.
    circuits: Mutex<HashMap<CircuitId, CircuitSocket>>,
    /// Where datagrams for each meter go: its link and its session's receive queue.
    meters: Mutex<HashMap<MeterAddr, MeterRoute>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Carries out what the relay core asked for: circuit sockets, then datagrams (to the server
/// over the DCU's backhaul, or to meters over their mesh links).
fn relay_flush(dcu: &Arc<Dcu>) {
    let Some(relay) = &dcu.relay else { return };
    let (events, transmits) = {
        let mut core = lock(&relay.core);
        let events: Vec<_> = std::iter::from_fn(|| core.poll_event()).collect();
        let transmits: Vec<_> = std::iter::from_fn(|| core.poll_transmit()).collect();
        (events, transmits)
    };
    for ev in events {
        match ev {
            est_relay::Event::CircuitOpened { circuit, .. } => {
                let Ok(std_socket) = std::net::UdpSocket::bind(SocketAddr::new(relay.bind_ip, 0))
                else {
                    continue;
                };
                let _ = std_socket.set_nonblocking(true);
                let Ok(socket) = UdpSocket::from_std(std_socket) else {
                    continue;
                };
                let socket = Arc::new(socket);
                let reader = tokio::spawn(backhaul_reader(
                    Arc::downgrade(dcu),
                    socket.clone(),
                    Some(circuit),
                ));
                lock(&relay.circuits).insert(circuit, (socket, reader));
            }
            est_relay::Event::CircuitClosed(c) => {
                if let Some((_, t)) = lock(&relay.circuits).remove(&c) {
                    t.abort();
                }
            }
            est_relay::Event::FailedOver { .. } => {}
        }
    }
    let now = Instant::now();
    for t in transmits {
        match t.destination {
            Destination::Meter(m) => {
                let Some((link, tx)) = lock(&relay.meters).get(&m).cloned() else {
                    continue;
                };
                deliver_down(&link, tx, now, t.payload);
            }
            Destination::Jpy(to) | Destination::Circuit { registrar: to, .. } => {
                let socket = match t.destination {
                    Destination::Circuit { circuit, .. } => {
                        lock(&relay.circuits).get(&circuit).map(|(s, _)| s.clone())
                    }
                    _ => relay.jpy.clone(),
                };
                let Some(socket) = socket else { continue };
                let Verdict::Deliver { at } = lock(&dcu.up).submit(now, t.payload.len()) else {
                    continue;
                };
                tokio::spawn(async move {
                    if at > Instant::now() {
                        sleep_until(at).await;
                    }
                    let _ = socket.send_to(&t.payload, to).await;
                });
            }
        }
    }
}

/// Through the meter's own link down, into its session's queue.
fn deliver_down(
    link: &Arc<MeterLink>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    now: Instant,
    data: Vec<u8>,
) {
    if let Verdict::Deliver { at } = lock(&link.down).submit(now, data.len()) {
        tokio::spawn(async move {
            if at > Instant::now() {
                sleep_until(at).await;
            }
            let _ = tx.send(data);
        });
    }
}

/// Reads the server's datagrams on a relay's backhaul socket (JPY, or one circuit's), passes
/// them through the DCU's downlink and then to the relay core.
async fn backhaul_reader(
    dcu: std::sync::Weak<Dcu>,
    socket: Arc<UdpSocket>,
    circuit: Option<CircuitId>,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(d) = dcu.upgrade() else { return };
        let data = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
        let Verdict::Deliver { at } = lock(&d.down).submit(Instant::now(), n) else {
            continue;
        };
        tokio::spawn(async move {
            if at > Instant::now() {
                sleep_until(at).await;
            }
            let Some(relay) = &d.relay else { return };
            {
                let mut core = lock(&relay.core);
                match circuit {
                    Some(c) => core.handle_circuit(Instant::now(), c, from, &data),
                    None => core.handle_jpy(Instant::now(), from, &data),
                }
            }
            relay_flush(&d);
        });
    }
}

/// The relay core's timers (circuit expiry, key rotation).
async fn relay_timer(dcu: std::sync::Weak<Dcu>) {
    loop {
        let next = {
            let Some(d) = dcu.upgrade() else { return };
            let Some(relay) = &d.relay else { return };
            let core = lock(&relay.core);
            core.poll_timeout()
        };
        let cap = Instant::now() + std::time::Duration::from_secs(1);
        sleep_until(next.map_or(cap, |t| t.min(cap))).await;
        let Some(d) = dcu.upgrade() else { return };
        if let Some(relay) = &d.relay {
            lock(&relay.core).handle_timeout(Instant::now());
        }
        relay_flush(&d);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update; the link state is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-meter link state, shared by the Conn and its reader task.
#[derive(Debug)]
pub struct MeterLink {
    up: Mutex<LinkDirection>,
    down: Mutex<LinkDirection>,
    dcu: Option<Arc<Dcu>>,
    /// Where the datagrams this link counts go, by phase (the driver annotates it too).
    ledger: Arc<Mutex<Ledger>>,
    /// Behind a relay DCU: the meter's mesh address (the same for all its sessions, as a
    /// meter's CoAP port; a NAT rebinding moves it).
    relay_addr: Mutex<Option<MeterAddr>>,
}

impl MeterLink {
    pub fn new(params: LinkParams, seed: u64, dcu: Option<Arc<Dcu>>) -> Arc<MeterLink> {
        let link = crate::link::Link::new(params, seed);
        let relay_addr = dcu
            .as_ref()
            .filter(|d| d.relay.is_some())
            .map(|d| d.new_meter_addr());
        Arc::new(MeterLink {
            up: Mutex::new(link.up),
            down: Mutex::new(link.down),
            dcu,
            ledger: Arc::new(Mutex::new(Ledger::new())),
            relay_addr: Mutex::new(relay_addr),
        })
    }

    /// (up, down) counters of the meter's own link (all sessions of the meter).
    pub fn counters(&self) -> (LinkCounters, LinkCounters) {
        (lock(&self.up).counters(), lock(&self.down).counters())
    }

    /// The meter's phase accounting.
    pub fn ledger(&self) -> Arc<Mutex<Ledger>> {
        self.ledger.clone()
    }

    /// Hands `data` to the meter's own link in direction `dir` at `at` and records it in the
    /// ledger. A delivered down datagram of application data comes with a ticket to pass to
    /// [`MeterLink::delivered`] when it reaches the meter, so that the ledger knows the order
    /// the meter reads datagrams in.
    fn submit(&self, dir: Dir, at: Instant, data: &[u8]) -> (Verdict, Option<u64>) {
        // The ledger's lock is held across the link's decision so that [`MeterLink::snapshot`]
        // sees the counters and the ledger agree.
        let mut ledger = lock(&self.ledger);
        let (verdict, frames) = {
            let mut d = match dir {
                Dir::Up => lock(&self.up),
                Dir::Down => lock(&self.down),
            };
            let frames = d.params().frames.frames(data.len());
            (d.submit(at, data.len()), frames)
        };
        let lost = !matches!(verdict, Verdict::Deliver { .. });
        let ticket = ledger.record(dir, data, frames, lost);
        (verdict, ticket)
    }

    /// The (up, down) counters and the phase table, taken together: the table's rows add up
    /// to the counters.
    pub fn snapshot(&self) -> (LinkCounters, LinkCounters, crate::phases::PhaseTable) {
        let mut ledger = lock(&self.ledger);
        let (up, down) = self.counters();
        (up, down, ledger.finish())
    }

    /// A down datagram reached the meter (see [`MeterLink::submit`]).
    fn delivered(&self, ticket: Option<u64>) {
        if let Some(t) = ticket {
            lock(&self.ledger).delivered(t);
        }
    }
    /// The DCU's relay, when the meter is behind one.
    fn relay(&self) -> Option<&Arc<Dcu>> {
        self.dcu.as_ref().filter(|d| d.relay.is_some())
    }
}

/// How an [`EmulatedConn`] reaches the server.
enum Path {
    /// Its own UDP socket (directly, or through a router DCU).
    Socket {
        /// Swapped by [`EmulatedConn::rebind`] (a NAT giving the meter a new source port).
        socket: Mutex<Arc<UdpSocket>>,
        bind: SocketAddr,
        reader: Mutex<JoinHandle<()>>,
    },
    /// Through its DCU's join proxy, under the meter's mesh address.
    Relay(Arc<Dcu>),
}

/// A UDP "connection" to the server through the emulated link. One per DTLS session.
pub struct EmulatedConn {
    path: Path,
    server: SocketAddr,
    link: Arc<MeterLink>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    closed: AtomicBool,
}

impl EmulatedConn {
    /// Binds a fresh UDP socket on `bind` (normally 127.0.0.1:0) and starts its reader; behind
    /// a relay DCU, registers with the relay instead.
    pub async fn connect(
        bind: SocketAddr,
        server: SocketAddr,
        link: Arc<MeterLink>,
    ) -> std::io::Result<Arc<EmulatedConn>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let path = match link.relay() {
            Some(dcu) => {
                let addr = lock(&link.relay_addr).ok_or_else(|| {
                    std::io::Error::other("meter behind a relay without a mesh address")
                })?;
                if let Some(r) = &dcu.relay {
                    lock(&r.meters).insert(addr, (link.clone(), tx.clone()));
                }
                Path::Relay(dcu.clone())
            }
            None => {
                let socket = Arc::new(UdpSocket::bind(bind).await?);
                let reader =
                    tokio::spawn(read_loop(socket.clone(), server, link.clone(), tx.clone()));
                Path::Socket {
                    socket: Mutex::new(socket),
                    bind,
                    reader: Mutex::new(reader),
                }
            }
        };
        Ok(Arc::new(EmulatedConn {
            path,
            server,
            link,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            closed: AtomicBool::new(false),
        }))
    }

    fn socket(&self) -> Option<Arc<UdpSocket>> {
        match &self.path {
            Path::Socket { socket, .. } => Some(lock(socket).clone()),
            Path::Relay(_) => None,
        }
    }

    /// A NAT rebinding: from now on the meter's datagrams leave from a new socket (a new source
    /// port) and the old one is closed; behind a relay, the meter takes a new mesh address.
    /// Returns the new local address. The DTLS session above does not notice; the server does
    /// (RFC 9146 Connection ID lets it follow).
    pub async fn rebind(&self) -> std::io::Result<SocketAddr> {
        match &self.path {
            Path::Socket {
                socket: sock,
                bind,
                reader,
            } => {
                let socket = Arc::new(UdpSocket::bind(*bind).await?);
                let new_reader = tokio::spawn(read_loop(
                    socket.clone(),
                    self.server,
                    self.link.clone(),
                    self.tx.clone(),
                ));
                let old = std::mem::replace(&mut *lock(reader), new_reader);
                old.abort();
                *lock(sock) = socket.clone();
                socket.local_addr()
            }
            Path::Relay(dcu) => {
                let addr = dcu.new_meter_addr();
                let old = lock(&self.link.relay_addr).replace(addr);
                if let Some(r) = &dcu.relay {
                    let mut meters = lock(&r.meters);
                    if let Some(o) = old {
                        meters.remove(&o);
                    }
                    meters.insert(addr, (self.link.clone(), self.tx.clone()));
                }
                Ok(addr.addr)
            }
        }
    }

    fn stop(&self) {
        match &self.path {
            Path::Socket { reader, .. } => lock(reader).abort(),
            Path::Relay(dcu) => {
                if let (Some(r), Some(addr)) = (&dcu.relay, *lock(&self.link.relay_addr)) {
                    let mut meters = lock(&r.meters);
                    // Only if it is still this session's queue (a newer session may have it).
                    if meters
                        .get(&addr)
                        .is_some_and(|(_, tx)| tx.same_channel(&self.tx))
                    {
                        meters.remove(&addr);
                    }
                }
            }
        }
    }
}

impl Drop for EmulatedConn {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}
/// Receives datagrams from the server and delivers them through DCU down + meter link down.
async fn read_loop(
    socket: Arc<UdpSocket>,
    server: SocketAddr,
    link: Arc<MeterLink>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
) {
    // 8 KiB, as webrtc-util's RECEIVE_MTU: larger than any datagram our server sends.
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        if from != server {
            continue;
        }
        let data = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
        let link = link.clone();
        let tx = tx.clone();
        let now = Instant::now();
        // DCU downlink first (backhaul), then the meter's own mesh link.
        let at_dcu = match &link.dcu {
            Some(dcu) => match lock(&dcu.down).submit(now, n) {
                Verdict::Deliver { at } => Some(at),
                _ => None,
            },
            None => Some(now),
        };
        let Some(at_dcu) = at_dcu else { continue };
        if link.dcu.is_none() {
            // Zero-delay path: deliver inline, keeping datagram order.
            let (v, ticket) = link.submit(Dir::Down, at_dcu, &data);
            match v {
                Verdict::Deliver { at } if at <= Instant::now() => {
                    link.delivered(ticket);
                    let _ = tx.send(data);
                    continue;
                }
                Verdict::Deliver { at } => {
                    tokio::spawn(async move {
                        sleep_until(at).await;
                        link.delivered(ticket);
                        let _ = tx.send(data);
                    });
                    continue;
                }
                _ => continue,
            }
        }
        tokio::spawn(async move {
            if at_dcu > Instant::now() {
                sleep_until(at_dcu).await;
            }
            let (v, ticket) = link.submit(Dir::Down, at_dcu, &data);
            if let Verdict::Deliver { at } = v {
                sleep_until(at).await;
                link.delivered(ticket);
                let _ = tx.send(data);
            }
        });
    }
}

fn to_util_err(e: std::io::Error) -> webrtc_util::Error {
    e.into()
}

#[async_trait]
impl Conn for EmulatedConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(d) => {
                let n = d.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), d.get(..n)) {
                    dst.copy_from_slice(src);
                }
                Ok(n)
            }
            // webrtc-dtls's reader loop spins on recv errors; pend instead and let DTLSConn::close
            // (or drop) end its reader.
            None => std::future::pending().await,
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.server))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(to_util_err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "emulated link closed",
            )));
        }
        let now = Instant::now();
        let (verdict, _) = self.link.submit(Dir::Up, now, buf);
        if let Verdict::Deliver { at } = verdict {
            if let Path::Relay(dcu) = &self.path {
                // Across the mesh to the DCU, then through its relay core.
                let (dcu, data, link) = (dcu.clone(), buf.to_vec(), self.link.clone());
                tokio::spawn(async move {
                    if at > Instant::now() {
                        sleep_until(at).await;
                    }
                    let Some(meter) = *lock(&link.relay_addr) else {
                        return;
                    };
                    if let Some(relay) = &dcu.relay {
                        lock(&relay.core).handle_meter(Instant::now(), meter, &data);
                    }
                    relay_flush(&dcu);
                });
                return Ok(buf.len());
            }
            let Some(socket) = self.socket() else {
                return Ok(buf.len());
            };
            // A zero-delay path (latency 0, unlimited rate, no DCU) sends inline: no task, no timer.
            if self.link.dcu.is_none() && at <= Instant::now() {
                let _ = socket.send_to(buf, self.server).await;
                return Ok(buf.len());
            }
            let data = buf.to_vec();
            let link = self.link.clone();
            let server = self.server;
            tokio::spawn(async move {
                sleep_until(at).await;
                let at = match &link.dcu {
                    Some(dcu) => match lock(&dcu.up).submit(at, data.len()) {
                        Verdict::Deliver { at } => at,
                        _ => return,
                    },
                    None => at,
                };
                if at > Instant::now() {
                    sleep_until(at).await;
                }
                let _ = socket.send_to(&data, server).await;
            });
        }
        // A lost datagram is "sent" as far as the sender can tell.
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        match self.socket() {
            Some(s) => s.local_addr().map_err(to_util_err),
            None => lock(&self.link.relay_addr)
                .map(|m| m.addr)
                .ok_or_else(|| to_util_err(std::io::Error::other("no address"))),
        }
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.closed.store(true, Ordering::Relaxed);
        self.stop();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// A plain UDP socket connected to one server, as a webrtc-util [`Conn`] that knows its remote
/// address (tokio's `UdpSocket` implements `Conn` but reports none, which the native backend
/// needs to address its flights).
pub struct ConnectedUdp {
    socket: UdpSocket,
    server: SocketAddr,
}

impl ConnectedUdp {
    /// Binds `bind` (e.g. `127.0.0.1:0`) and connects to `server`.
    pub async fn connect(bind: SocketAddr, server: SocketAddr) -> std::io::Result<ConnectedUdp> {
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        Ok(ConnectedUdp { socket, server })
    }

    /// Connects to `server` from an ephemeral port of the matching family: loopback for a
    /// loopback server, the unspecified address otherwise.
    pub async fn to(server: SocketAddr) -> std::io::Result<ConnectedUdp> {
        let bind = match (server.is_ipv4(), server.ip().is_loopback()) {
            (true, true) => SocketAddr::from(([127, 0, 0, 1], 0)),
            (true, false) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (false, true) => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            (false, false) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        ConnectedUdp::connect(bind, server).await
    }
}

#[async_trait]
impl Conn for ConnectedUdp {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.recv(buf).await?)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.socket.recv(buf).await?, self.server))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Watches, and may drop, the datagrams of a [`Tapped`] connection: how tests and the load
/// generator count, record or lose traffic on a real socket without writing another [`Conn`].
pub trait Tap: Send + Sync + 'static {
    /// Called with each datagram before it is sent; `false` drops it (the sender is told it
    /// went, as a lossy network would).
    fn on_send(&self, datagram: &[u8]) -> bool {
        let _ = datagram;
        true
    }

    /// Called with each datagram received.
    fn on_recv(&self, datagram: &[u8]) {
        let _ = datagram;
    }
}

impl<T: Tap + ?Sized> Tap for Arc<T> {
    fn on_send(&self, datagram: &[u8]) -> bool {
        (**self).on_send(datagram)
    }

    fn on_recv(&self, datagram: &[u8]) {
        (**self).on_recv(datagram)
    }
}

/// DTLS handshake message type of a datagram's first record, if that record is a plaintext
/// handshake record (content type 22, epoch 0).
pub fn plaintext_handshake_type(datagram: &[u8]) -> Option<u8> {
    (datagram.first() == Some(&22) && datagram.get(3..5) == Some(&[0, 0]))
        .then(|| datagram.get(13).copied())?
}

/// A [`Tap`] for wire-level checks of a DTLS client: keeps every datagram both ways, and drops
/// the first outgoing datagram whose first record is a plaintext handshake message of each
/// listed type (so a test can lose, say, the first ClientHello and the first Certificate).
#[derive(Debug, Default)]
pub struct WireLog {
    drop_types: Mutex<Vec<u8>>,
    sent: Mutex<Vec<Vec<u8>>>,
    received: Mutex<Vec<Vec<u8>>>,
    dropped: AtomicU32,
}

impl WireLog {
    /// A log that drops the first outgoing datagram of each handshake type in `types`.
    pub fn dropping(types: Vec<u8>) -> WireLog {
        WireLog {
            drop_types: Mutex::new(types),
            ..WireLog::default()
        }
    }

    /// Every datagram the client sent, dropped ones included, in order.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        lock(&self.sent).clone()
    }

    /// Every datagram the client received, in order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        lock(&self.received).clone()
    }

    /// How many datagrams were dropped.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Tap for WireLog {
    fn on_send(&self, datagram: &[u8]) -> bool {
        lock(&self.sent).push(datagram.to_vec());
        if let Some(t) = plaintext_handshake_type(datagram) {
            let mut drop = lock(&self.drop_types);
            if let Some(i) = drop.iter().position(|x| *x == t) {
                drop.remove(i);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        true
    }

    fn on_recv(&self, datagram: &[u8]) {
        lock(&self.received).push(datagram.to_vec());
    }
}

/// A connected UDP socket with a [`WireLog`] on it.
pub type LoggedUdp = Tapped<ConnectedUdp, WireLog>;

/// A [`LoggedUdp`] from loopback to `server`, dropping the first datagram of each of `types`.
pub async fn logged_udp(server: SocketAddr, types: Vec<u8>) -> std::io::Result<Arc<LoggedUdp>> {
    Ok(Arc::new(Tapped::new(
        ConnectedUdp::to(server).await?,
        WireLog::dropping(types),
    )))
}

/// A [`Conn`] that passes everything through to `inner` and shows each datagram to a [`Tap`].
pub struct Tapped<C, T> {
    inner: C,
    tap: T,
}

impl<C, T> Tapped<C, T> {
    /// Wraps `inner`, showing its datagrams to `tap`.
    pub fn new(inner: C, tap: T) -> Self {
        Tapped { inner, tap }
    }

    /// The tap, to read what it saw.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    /// The wrapped connection.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

#[async_trait]
impl<C: Conn + Send + Sync + 'static, T: Tap> Conn for Tapped<C, T> {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.inner.connect(addr).await
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let n = self.inner.recv(buf).await?;
        self.tap.on_recv(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (n, from) = self.inner.recv_from(buf).await?;
        self.tap.on_recv(buf.get(..n).unwrap_or_default());
        Ok((n, from))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if !self.tap.on_send(buf) {
            return Ok(buf.len());
        }
        self.inner.send(buf).await
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.tap.on_send(buf) {
            return Ok(buf.len());
        }
        self.inner.send_to(buf, target).await
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr()
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        self.inner.close().await
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::link::{FrameModel, LossModel};
    use std::time::Duration;

    fn params(latency_ms: u64, loss: LossModel, rate: Option<u64>) -> LinkParams {
        LinkParams {
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::ZERO,
            loss,
            rate_bps: rate,
            max_queue_bytes: None,
            frames: FrameModel::default(),
            loss_per_frame: false,
        }
    }

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn round_trip_takes_both_latencies_and_counts() {
        let server = echo().await;
        let link = MeterLink::new(params(50, LossModel::None, None), 1, None);
        let conn = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, link.clone())
            .await
            .unwrap();
        let t = Instant::now();
        conn.send(&[7u8; 100]).await.unwrap();
        let mut buf = [0u8; 256];
        let n = conn.recv(&mut buf).await.unwrap();
        let rtt = t.elapsed();
        assert_eq!(n, 100);
        assert!(rtt >= Duration::from_millis(100), "rtt {rtt:?}");
        // Nothing added beyond the two latencies (a loose bound: a loaded CI box delays timers).
        assert!(rtt < Duration::from_secs(2), "rtt {rtt:?}");
        let (up, down) = link.counters();
        assert_eq!(up.datagrams, 1);
        assert_eq!(up.frames, 2);
        assert_eq!(down.bytes, 100);
    }

    #[tokio::test]
    async fn zero_delay_link_passes_datagrams_inline_in_order() {
        let server = echo().await;
        let link = MeterLink::new(params(0, LossModel::None, None), 1, None);
        let conn = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, link.clone())
            .await
            .unwrap();
        for i in 0..20u8 {
            conn.send(&[i; 10]).await.unwrap();
        }
        let mut buf = [0u8; 64];
        for i in 0..20u8 {
            let n = conn.recv(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i; 10]);
        }
        assert_eq!(link.counters().1.datagrams, 20);
    }

    #[tokio::test]
    async fn total_loss_delivers_nothing_and_dcu_is_shared() {
        let server = echo().await;
        let lossy = MeterLink::new(params(1, LossModel::Independent { p: 1.0 }, None), 1, None);
        let conn = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, lossy.clone())
            .await
            .unwrap();
        conn.send(b"x").await.unwrap();
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), conn.recv(&mut buf))
                .await
                .is_err()
        );
        assert_eq!(lossy.counters().0.lost, 1);

        // Two meters behind one DCU with an 8 kbit/s backhaul: their datagrams queue behind each other.
        let dcu = Arc::new(Dcu::new(0, params(1, LossModel::None, Some(8_000)), 9));
        let a = MeterLink::new(params(1, LossModel::None, None), 2, Some(dcu.clone()));
        let b = MeterLink::new(params(1, LossModel::None, None), 3, Some(dcu.clone()));
        let ca = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, a)
            .await
            .unwrap();
        let cb = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, b)
            .await
            .unwrap();
        let t = Instant::now();
        // 65 B -> 100 on-air bytes = 100 ms at 8 kbit/s, each direction, queued at the DCU.
        ca.send(&[1u8; 65]).await.unwrap();
        cb.send(&[2u8; 65]).await.unwrap();
        let mut buf = [0u8; 128];
        cb.recv(&mut buf).await.unwrap();
        ca.recv(&mut buf).await.unwrap();
        let both = t.elapsed();
        assert!(both >= Duration::from_millis(300), "DCU queueing: {both:?}");
        let (up, down) = dcu.counters();
        assert_eq!(up.datagrams, 2);
        assert_eq!(down.datagrams, 2);
    }
    fn dtls_record(tag: u8) -> Vec<u8> {
        let mut r = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 8];
        r.extend_from_slice(&[tag; 8]);
        r
    }

    /// A registrar that answers each JPY message with the same header and the content
    /// reversed.
    async fn jpy_echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let j = est_relay::jpy::decode(&buf[..n], 64).unwrap();
                let mut c = j.content.to_vec();
                c.reverse();
                let _ = s
                    .send_to(&est_relay::jpy::encode(&j.header, &c), from)
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stateless_relay_dcu_wraps_and_unwraps() {
        let registrar = jpy_echo().await;
        let dcu = Dcu::with_mode(
            0,
            params(1, LossModel::None, None),
            1,
            DcuMode::RelayStateless,
            registrar,
            "127.0.0.1".parse().unwrap(),
            2,
        )
        .await
        .unwrap();
        let link = MeterLink::new(params(1, LossModel::None, None), 2, Some(dcu.clone()));
        let conn = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), registrar, link)
            .await
            .unwrap();
        assert!(conn
            .local_addr()
            .unwrap()
            .ip()
            .to_string()
            .starts_with("fe80::"));
        conn.send(&dtls_record(5)).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let mut want = dtls_record(5);
        want.reverse();
        assert_eq!(&buf[..n], &want[..]);
        let r = dcu.relay_report().unwrap();
        assert_eq!((r.forwarded_up, r.forwarded_down), (1, 1));
        // A link-local meter: a 32-byte header, 36 bytes of JPY around a 21-byte datagram.
        assert_eq!(r.overhead_bytes_up, 36);
        let (up, down) = dcu.counters();
        assert_eq!(up.bytes, 21 + 36);
        assert_eq!(down.bytes, 21 + 36);
    }

    #[tokio::test]
    async fn a_stateful_relay_dcu_gives_each_meter_a_circuit() {
        let server = echo().await;
        let dcu = Dcu::with_mode(
            1,
            params(1, LossModel::None, None),
            1,
            DcuMode::RelayStateful,
            server,
            "127.0.0.1".parse().unwrap(),
            2,
        )
        .await
        .unwrap();
        for i in 0..2u8 {
            let link = MeterLink::new(params(1, LossModel::None, None), 3, Some(dcu.clone()));
            let conn = EmulatedConn::connect("127.0.0.1:0".parse().unwrap(), server, link)
                .await
                .unwrap();
            conn.send(&dtls_record(i)).await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), conn.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &dtls_record(i)[..]);
        }
        let r = dcu.relay_report().unwrap();
        assert_eq!(r.circuits_opened, 2);
        assert_eq!(r.overhead_bytes_up, 0);
    }
}
