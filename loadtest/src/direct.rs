//! Loopback transport for the load generator (`--direct-udp`): a plain connected UDP socket with
//! byte and datagram counters, handed to client-sim's driver (`driver::run_meter_over`) in place
//! of its link emulator.
//!
//! Why it exists: client-sim's `driver::run_meter` routes datagrams through its link emulator
//! (`net::EmulatedConn`), which used to spawn a task and arm a timer per datagram even at zero
//! latency, and that cost a large share of the handshake rate (docs/benchmarks.md, "Figures
//! behind code comments"). client-sim f2dc69d now passes zero-delay datagrams inline, and both
//! paths measure the same within noise, so the default is the emulated link; this one stays as
//! a cross-check of the harness. The meter loop is the same
//! (client-sim's); only the socket differs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::net::UdpSocket;
use webrtc_util::conn::Conn;

/// Datagram and byte counters of one meter (all its sessions), up = meter -> server.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub up_bytes: AtomicU64,
    pub up_datagrams: AtomicU64,
    pub down_bytes: AtomicU64,
    pub down_datagrams: AtomicU64,
}

impl Counters {
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.up_bytes.load(Ordering::Relaxed),
            self.down_bytes.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn datagrams(&self) -> u64 {
        self.up_datagrams.load(Ordering::Relaxed) + self.down_datagrams.load(Ordering::Relaxed)
    }
}

/// A UDP socket connected to the server, counting what passes.
pub(crate) struct CountingUdp {
    socket: UdpSocket,
    server: SocketAddr,
    counters: Arc<Counters>,
}

impl CountingUdp {
    pub(crate) async fn connect(
        server: SocketAddr,
        counters: Arc<Counters>,
    ) -> std::io::Result<Arc<CountingUdp>> {
        let bind = match (server.is_ipv4(), server.ip().is_loopback()) {
            (true, true) => SocketAddr::from(([127, 0, 0, 1], 0)),
            (true, false) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (false, true) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            (false, false) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        Ok(Arc::new(CountingUdp {
            socket,
            server,
            counters,
        }))
    }
}

#[async_trait]
impl Conn for CountingUdp {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let n = self.socket.recv(buf).await?;
        self.counters
            .down_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        self.counters.down_datagrams.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = Conn::recv(self, buf).await?;
        Ok((n, self.server))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        let n = self.socket.send(buf).await?;
        self.counters
            .up_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        self.counters.up_datagrams.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        Conn::send(self, buf).await
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
