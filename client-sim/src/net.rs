//! Runtime side of the link emulator: a `webrtc_util::conn::Conn` that carries a meter's datagrams
//! over a real UDP socket through its emulated link (and, optionally, its DCU's shared uplink).
//!
//! ```text
//!   DTLSConn --send--> meter link (up) --> [DCU up, shared FIFO] --> UdpSocket --> server
//!   DTLSConn <--recv-- meter link (down) <-- [DCU down, shared] <-- UdpSocket <-- server
//! ```
//!
//! Every decision (loss, queueing, delivery time) is taken by the sans-IO [`LinkDirection`]s at the
//! moment the datagram reaches them; a small spawned task per datagram sleeps until the delivery
//! time and passes it on. A datagram reaches the DCU only when it has crossed the meter's own link,
//! so the DCU sees packets from all its meters in arrival order, FIFO.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc_util::conn::Conn;

use crate::link::{LinkCounters, LinkDirection, LinkParams, Verdict};
use crate::phases::{Dir, Ledger};

/// A data concentrator unit: its backhaul is one rate-limited link shared by all its meters.
#[derive(Debug)]
pub struct Dcu {
    pub index: u64,
    up: Mutex<LinkDirection>,
    down: Mutex<LinkDirection>,
}

impl Dcu {
    pub fn new(index: u64, params: LinkParams, seed: u64) -> Dcu {
        let link = crate::link::Link::new(params, seed);
        Dcu {
            index,
            up: Mutex::new(link.up),
            down: Mutex::new(link.down),
        }
    }

    /// (up, down) counters of the DCU's shared link.
    pub fn counters(&self) -> (LinkCounters, LinkCounters) {
        (lock(&self.up).counters(), lock(&self.down).counters())
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
}

impl MeterLink {
    pub fn new(params: LinkParams, seed: u64, dcu: Option<Arc<Dcu>>) -> Arc<MeterLink> {
        let link = crate::link::Link::new(params, seed);
        Arc::new(MeterLink {
            up: Mutex::new(link.up),
            down: Mutex::new(link.down),
            dcu,
            ledger: Arc::new(Mutex::new(Ledger::new())),
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
}

/// A UDP "connection" to the server through the emulated link. One per DTLS session.
pub struct EmulatedConn {
    /// Swapped by [`EmulatedConn::rebind`] (a NAT giving the meter a new source port).
    socket: Mutex<Arc<UdpSocket>>,
    bind: SocketAddr,
    server: SocketAddr,
    link: Arc<MeterLink>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    reader: Mutex<JoinHandle<()>>,
    closed: AtomicBool,
}

impl EmulatedConn {
    /// Binds a fresh UDP socket on `bind` (normally 127.0.0.1:0) and starts its reader.
    pub async fn connect(
        bind: SocketAddr,
        server: SocketAddr,
        link: Arc<MeterLink>,
    ) -> std::io::Result<Arc<EmulatedConn>> {
        let socket = Arc::new(UdpSocket::bind(bind).await?);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(socket.clone(), server, link.clone(), tx.clone()));
        Ok(Arc::new(EmulatedConn {
            socket: Mutex::new(socket),
            bind,
            server,
            link,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            reader: Mutex::new(reader),
            closed: AtomicBool::new(false),
        }))
    }

    fn socket(&self) -> Arc<UdpSocket> {
        lock(&self.socket).clone()
    }

    /// A NAT rebinding: from now on the meter's datagrams leave from a new socket (a new source
    /// port) and the old one is closed. Returns the new local address. The DTLS session above
    /// does not notice; the server does (RFC 9146 Connection ID lets it follow).
    pub async fn rebind(&self) -> std::io::Result<SocketAddr> {
        let socket = Arc::new(UdpSocket::bind(self.bind).await?);
        let reader = tokio::spawn(read_loop(
            socket.clone(),
            self.server,
            self.link.clone(),
            self.tx.clone(),
        ));
        let old = std::mem::replace(&mut *lock(&self.reader), reader);
        old.abort();
        *lock(&self.socket) = socket.clone();
        socket.local_addr()
    }
}

impl Drop for EmulatedConn {
    fn drop(&mut self) {
        lock(&self.reader).abort();
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
            // A zero-delay path (latency 0, unlimited rate, no DCU) sends inline: no task, no timer.
            if self.link.dcu.is_none() && at <= Instant::now() {
                let _ = self.socket().send_to(buf, self.server).await;
                return Ok(buf.len());
            }
            let data = buf.to_vec();
            let socket = self.socket();
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
        self.socket().local_addr().map_err(to_util_err)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.closed.store(true, Ordering::Relaxed);
        lock(&self.reader).abort();
        Ok(())
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
}
