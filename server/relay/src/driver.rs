//! The tokio driver: the sockets, the clock and the metrics line around a [`Relay`].
//!
//! ```text
//!   join sockets (one per interface) ─┐
//!   JPY socket (stateless)           ─┼─ reader tasks ─► channel ─► Relay::handle_* (one task owns the core)
//!   circuit sockets (stateful)       ─┘                              │
//!   timer ─► Relay::handle_timeout                                     ▼
//!                       events: open/close circuit sockets; transmits: send_to on the right socket
//! ```
//!
//! IPv4 meters on a dual-stack (`[::]`) join socket arrive as `::ffff:a.b.c.d`: the driver
//! hands the core plain IPv4 addresses (so their JPY header is the short IPv4 one) and maps
//! them back when sending.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::FileConfig;
use crate::relay::{CircuitId, Destination, DropReason, Event, Metrics, Mode, Relay};
use crate::tokio_clock::{now, sleep_until};
use crate::MeterAddr;

/// Datagrams queued from the reader tasks to the core.
const INBOUND_QUEUE: usize = 4096;
/// Receive buffer of the join and JPY sockets.
const RECV_BUFFER: usize = 65_536;
/// Receive buffer of a circuit's socket (one per meter in stateful mode, so kept small): the
/// registrar's datagrams to a meter must cross the mesh, and est-server's are at most its
/// `dtls.mtu_bytes` (1,152 by default).
const CIRCUIT_RECV_BUFFER: usize = 2048;

enum Inbound {
    Meter(u8, SocketAddr, Vec<u8>),
    Jpy(SocketAddr, Vec<u8>),
    Circuit(CircuitId, SocketAddr, Vec<u8>),
}

/// A snapshot of the relay's counters and gauges.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub metrics: Metrics,
    pub circuits_now: usize,
    pub active_registrar: Option<SocketAddr>,
    pub state_bytes: usize,
    pub socket_errors: u64,
}

/// A relay that is running.
pub struct RunningRelay {
    /// The join sockets' addresses, in interface order.
    pub join_addrs: Vec<SocketAddr>,
    /// The JPY socket's address (stateless mode).
    pub jpy_addr: Option<SocketAddr>,
    pub mode: Mode,
    snapshot: Arc<Mutex<Snapshot>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningRelay {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the relay and waits for its task.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }

    /// Waits until the relay stops (it only stops on [`RunningRelay::shutdown`] or a fatal error).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// `a` in the family of a socket bound to `local`.
fn for_socket(a: SocketAddr, local: SocketAddr) -> SocketAddr {
    match (a, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => a,
    }
}

async fn bind(addr: SocketAddr, rcvbuf: usize) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr).await?;
    if rcvbuf > 0 {
        let _ = socket2::SockRef::from(&s).set_recv_buffer_size(rcvbuf);
    }
    Ok(s)
}

fn spawn_reader(
    socket: Arc<UdpSocket>,
    buffer: usize,
    tx: mpsc::Sender<Inbound>,
    wrap: impl Fn(SocketAddr, Vec<u8>) -> Inbound + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; buffer];
        loop {
            match socket.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    let d = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                    if tx.send(wrap(canonical(from), d)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // ICMP errors surface as ECONNREFUSED on Linux; keep reading.
                    tracing::debug!(error = %e, "relay socket receive error");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    })
}

/// Binds every socket and starts the relay.
pub async fn start(file: &FileConfig) -> anyhow::Result<RunningRelay> {
    let mut config = file.relay_config().map_err(anyhow::Error::msg)?;
    let mode = config.mode;
    let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
    let mut join = Vec::new();
    let mut readers = Vec::new();
    for (i, addr) in file.listen.iter().enumerate() {
        let s = Arc::new(
            bind(*addr, file.socket_receive_buffer_bytes)
                .await
                .map_err(|e| anyhow::anyhow!("binding join port {addr}: {e}"))?,
        );
        let iface = i as u8;
        readers.push(spawn_reader(
            s.clone(),
            RECV_BUFFER,
            tx.clone(),
            move |from, d| Inbound::Meter(iface, from, d),
        ));
        join.push(s);
    }
    let join_addrs = join
        .iter()
        .map(|s| s.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    if let (None, Some(first)) = (file.join_port, join_addrs.first()) {
        // The port the system chose, when the configuration asked for any.
        config.join_port = first.port();
    }
    let relay = Relay::new(config, now()).map_err(anyhow::Error::msg)?;
    let backhaul_ip = file.backhaul_ip();
    let jpy = if mode == Mode::Stateless {
        let addr = file
            .jpy_bind
            .unwrap_or_else(|| SocketAddr::new(backhaul_ip, 0));
        let s = Arc::new(
            bind(addr, file.socket_receive_buffer_bytes)
                .await
                .map_err(|e| anyhow::anyhow!("binding the JPY socket {addr}: {e}"))?,
        );
        readers.push(spawn_reader(
            s.clone(),
            RECV_BUFFER,
            tx.clone(),
            Inbound::Jpy,
        ));
        Some(s)
    } else {
        None
    };
    let jpy_addr = jpy.as_ref().map(|s| s.local_addr()).transpose()?;
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let (stop, stop_rx) = watch::channel(false);
    let driver = Driver {
        relay,
        join,
        jpy,
        circuits: HashMap::new(),
        circuit_ip: file.circuit_bind_ip.unwrap_or(backhaul_ip),
        tx,
        readers,
        snapshot: snapshot.clone(),
        socket_errors: 0,
        metrics_every: Duration::from_secs(file.metrics_log_interval_secs),
    };
    let task = tokio::spawn(driver.run(rx, stop_rx));
    Ok(RunningRelay {
        join_addrs,
        jpy_addr,
        mode,
        snapshot,
        stop,
        task,
    })
}

struct CircuitSocket {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

struct Driver {
    relay: Relay,
    join: Vec<Arc<UdpSocket>>,
    jpy: Option<Arc<UdpSocket>>,
    circuits: HashMap<CircuitId, CircuitSocket>,
    circuit_ip: IpAddr,
    tx: mpsc::Sender<Inbound>,
    readers: Vec<JoinHandle<()>>,
    snapshot: Arc<Mutex<Snapshot>>,
    socket_errors: u64,
    metrics_every: Duration,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(if self.metrics_every.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.metrics_every
        });
        tick.tick().await;
        let mut snap_tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let timer = sleep_until(self.relay.poll_timeout());
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = timer => self.relay.handle_timeout(now()),
                Some(msg) = rx.recv() => {
                    self.inbound(msg);
                    // Whatever else is queued, without waiting (bounded, so timers still run).
                    for _ in 0..64 {
                        match rx.try_recv() {
                            Ok(m) => self.inbound(m),
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick(), if !self.metrics_every.is_zero() => self.log_metrics(),
                _ = snap_tick.tick() => self.publish(),
            }
            self.flush().await;
        }
        for (_, c) in self.circuits.drain() {
            c.reader.abort();
        }
        for r in &self.readers {
            r.abort();
        }
        self.publish();
    }

    fn inbound(&mut self, msg: Inbound) {
        let t = now();
        match msg {
            Inbound::Meter(iface, from, d) => {
                self.relay.handle_meter(t, MeterAddr::new(from, iface), &d)
            }
            Inbound::Jpy(from, d) => self.relay.handle_jpy(t, from, &d),
            Inbound::Circuit(c, from, d) => self.relay.handle_circuit(t, c, from, &d),
        }
    }

    async fn flush(&mut self) {
        while let Some(ev) = self.relay.poll_event() {
            match ev {
                Event::CircuitOpened { circuit, meter } => {
                    match bind(SocketAddr::new(self.circuit_ip, 0), 0).await {
                        Ok(s) => {
                            let s = Arc::new(s);
                            let reader = spawn_reader(
                                s.clone(),
                                CIRCUIT_RECV_BUFFER,
                                self.tx.clone(),
                                move |from, d| Inbound::Circuit(circuit, from, d),
                            );
                            tracing::debug!(%meter, port = ?s.local_addr().ok(), "circuit opened");
                            self.circuits
                                .insert(circuit, CircuitSocket { socket: s, reader });
                        }
                        Err(e) => {
                            self.socket_errors += 1;
                            tracing::warn!(error = %e, %meter, "cannot open a circuit socket");
                        }
                    }
                }
                Event::CircuitClosed(c) => {
                    if let Some(c) = self.circuits.remove(&c) {
                        c.reader.abort();
                    }
                }
                Event::FailedOver { .. } => {}
            }
        }
        while let Some(t) = self.relay.poll_transmit() {
            let (socket, to) = match t.destination {
                Destination::Meter(m) => match self.join.get(usize::from(m.interface)) {
                    Some(s) => (s.clone(), m.addr),
                    None => continue,
                },
                Destination::Jpy(r) => match &self.jpy {
                    Some(s) => (s.clone(), r),
                    None => continue,
                },
                Destination::Circuit { circuit, registrar } => match self.circuits.get(&circuit) {
                    Some(c) => (c.socket.clone(), registrar),
                    None => continue,
                },
            };
            let to = match socket.local_addr() {
                Ok(local) => for_socket(to, local),
                Err(_) => to,
            };
            if let Err(e) = socket.send_to(&t.payload, to).await {
                self.socket_errors += 1;
                tracing::debug!(error = %e, %to, "relay send error");
            }
        }
    }

    fn publish(&self) {
        let s = Snapshot {
            metrics: self.relay.metrics().clone(),
            circuits_now: self.relay.circuits(),
            active_registrar: Some(self.relay.active_registrar()),
            state_bytes: self.relay.state_bytes(),
            socket_errors: self.socket_errors,
        };
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = s;
    }

    fn log_metrics(&self) {
        let m = self.relay.metrics();
        let d = |r: DropReason| m.dropped(r);
        tracing::info!(
            target: "metrics",
            from_meters = m.from_meters,
            forwarded_to_registrar = m.forwarded_to_registrar,
            forwarded_to_meters = m.forwarded_to_meters,
            bytes_from_meters = m.bytes_from_meters,
            bytes_to_registrars = m.bytes_to_registrars,
            bytes_from_registrars = m.bytes_from_registrars,
            bytes_to_meters = m.bytes_to_meters,
            overhead_bytes_up = m.overhead_bytes_up,
            overhead_bytes_down = m.overhead_bytes_down,
            discovery_answered = m.discovery_answered,
            dropped_total = m.dropped_total(),
            dropped_not_dtls = d(DropReason::NotDtls),
            dropped_too_large = d(DropReason::TooLarge),
            dropped_rate_meter = d(DropReason::RateMeter),
            dropped_rate_global = d(DropReason::RateGlobal),
            dropped_circuit_cap_meter = d(DropReason::CircuitCapMeter),
            dropped_circuit_cap_interface = d(DropReason::CircuitCapInterface),
            dropped_circuit_cap_total = d(DropReason::CircuitCapTotal),
            dropped_no_key = d(DropReason::NoKey),
            dropped_unknown_source = d(DropReason::UnknownSource),
            dropped_not_jpy = d(DropReason::NotJpy),
            dropped_header_malformed = d(DropReason::HeaderMalformed),
            dropped_header_stale = d(DropReason::HeaderStale),
            dropped_header_auth = d(DropReason::HeaderAuth),
            dropped_unknown_circuit = d(DropReason::UnknownCircuit),
            failovers = m.failovers,
            active_registrar = %self.relay.active_registrar(),
            circuits_now = self.relay.circuits(),
            circuits_opened = m.circuits_opened,
            circuits_expired = m.circuits_expired,
            key_rotations = m.key_rotations,
            state_bytes = self.relay.state_bytes(),
            socket_errors = self.socket_errors,
            "metrics"
        );
    }
}
