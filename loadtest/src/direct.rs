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

use client_sim::net::{ConnectedUdp, Tap, Tapped};

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

impl Tap for Counters {
    fn on_send(&self, datagram: &[u8]) -> bool {
        self.up_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        self.up_datagrams.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn on_recv(&self, datagram: &[u8]) {
        self.down_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        self.down_datagrams.fetch_add(1, Ordering::Relaxed);
    }
}

/// A UDP socket connected to the server, counting what passes.
pub(crate) type CountingUdp = Tapped<ConnectedUdp, Arc<Counters>>;

/// Connects a [`CountingUdp`] to `server`.
pub(crate) async fn connect(
    server: SocketAddr,
    counters: Arc<Counters>,
) -> std::io::Result<Arc<CountingUdp>> {
    Ok(Arc::new(Tapped::new(
        ConnectedUdp::to(server).await?,
        counters,
    )))
}
