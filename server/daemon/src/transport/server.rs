//! The tokio driver around the est-dtls [`Endpoint`]: one task owns the socket, the endpoint
//! and its timer; sessions talk to it over bounded channels.
//!
//! ```text
//!   socket.recv_from ─► Endpoint::handle(now, from, datagram)
//!   timer            ─► Endpoint::handle_timeout(now)
//!   DtlsSession::send/close ─► command queue ─► Endpoint::send / close
//!   after each: poll_transmit ─► socket.send_to;  poll_event ─► accept queue / session queues
//! ```
//!
//! The driver holds no protocol logic: cookies, limits, retransmission, CID routing and
//! session replacement are the endpoint's (and unit-tested there on virtual time). Time is
//! tokio's clock, so the same code runs under turmoil's simulated time.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use est_dtls::{ConnectionHandle, Endpoint, Event, RefusalReason};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    build_engine_config, CipherSuiteName, CloseReason, DatagramSocket, DtlsServerConfig,
    PeerVerification, TransportError,
};

/// Completed sessions waiting for [`DtlsListener::accept`]; over it new sessions are closed.
const ACCEPT_QUEUE: usize = 1024;
/// Plaintext datagrams queued per session before further ones are dropped (CoAP retransmits).
const SESSION_QUEUE: usize = 32;
/// Commands from sessions to the driver.
const COMMAND_QUEUE: usize = 4096;
/// Largest datagram read from the socket.
const RECV_BUFFER_BYTES: usize = 65_536;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters of the transport, a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportMetrics {
    /// Handshakes admitted past the cookie exchange.
    pub handshakes_started: u64,
    pub handshakes_completed: u64,
    /// Refused or failed past the cookie (bad certificate, alert, no common suite ...).
    pub handshakes_failed: u64,
    pub handshakes_timed_out: u64,
    /// Half-open handshakes that gave way to newer ones at the half-open cap.
    pub handshakes_abandoned: u64,
    pub half_open_now: u64,
    pub sessions_now: u64,
    /// Connections the endpoint holds state for (half-open + established).
    pub tracked_addresses_now: u64,
    /// Always 0: the engine needs no tombstones (kept for the metrics line's shape).
    pub tombstones_now: u64,
    pub sessions_replaced: u64,
    pub sessions_idle_closed: u64,
    /// Sessions closed by the per-identity limit.
    pub sessions_superseded: u64,
    /// Our last flight sent again because the peer repeated its own (RFC 6347 §4.2.4).
    pub final_flight_resends: u64,
    pub dropped_garbage: u64,
    /// ClientHellos with a valid cookie refused or dropped by a limit.
    pub dropped_over_limit: u64,
    pub dropped_unknown_peer: u64,
    /// Replayed records.
    pub dropped_duplicates: u64,
    /// A session's receive queue or the accept queue was full.
    pub dropped_queue_full: u64,
    pub socket_errors: u64,
    /// HelloVerifyRequests sent (stateless).
    pub hello_verify_sent: u64,
    /// Invalid cookies (from another address, or too old).
    pub bad_cookies: u64,
    pub refused_bad_certificate: u64,
    pub refused_unknown_ca: u64,
    pub refused_no_common_suite: u64,
    pub refused_no_ems: u64,
    /// Malformed handshake messages past the cookie.
    pub refused_decode_error: u64,
    /// A CertificateVerify or Finished that did not verify.
    pub refused_bad_signature_or_finished: u64,
    /// The client ended the handshake with a fatal alert.
    pub refused_peer_alert: u64,
    /// Any other refusal (no common group or signature scheme, renegotiation, ...).
    pub refused_other: u64,
    pub records_bad_mac: u64,
    pub peer_address_changes: u64,
    pub log_lines_suppressed: u64,
    /// Certificates in the client chains received (a client that sends its issuer counts 2).
    pub peer_certificates_received: u64,
    /// Handshakes where we sent our certificate's RFC 7924 fingerprint instead of the chain.
    pub cached_info_hits: u64,
    /// Handshakes whose client certificate came as C509 (RFC 7250 negotiation).
    pub c509_client_certificates: u64,
}

fn snapshot(ep: &Endpoint, driver: &DriverCounters) -> TransportMetrics {
    let m = ep.metrics();
    let g = ep.gauges();
    TransportMetrics {
        handshakes_started: m.cookies_verified,
        handshakes_completed: m.handshakes_completed,
        handshakes_failed: m.refused_total()
            - m.refused(RefusalReason::Timeout)
            - m.refused(RefusalReason::BadCookie),
        handshakes_timed_out: m.refused(RefusalReason::Timeout),
        handshakes_abandoned: m.half_open_evicted,
        half_open_now: g.half_open as u64,
        sessions_now: g.established as u64,
        tracked_addresses_now: (g.half_open + g.established) as u64,
        tombstones_now: 0,
        sessions_replaced: m.sessions_replaced,
        sessions_idle_closed: m.sessions_closed_idle,
        sessions_superseded: m.sessions_superseded,
        final_flight_resends: m.flights_resent_on_repeat,
        dropped_garbage: m.records_malformed + m.client_hello_malformed,
        dropped_over_limit: m.refused(RefusalReason::Limit),
        dropped_unknown_peer: m.dropped_unknown_peer,
        dropped_duplicates: m.records_replayed,
        dropped_queue_full: driver.queue_full.load(Ordering::Relaxed),
        socket_errors: driver.socket_errors.load(Ordering::Relaxed),
        hello_verify_sent: m.hello_verify_sent,
        bad_cookies: m.refused(RefusalReason::BadCookie),
        refused_bad_certificate: m.refused(RefusalReason::BadCertificate),
        refused_unknown_ca: m.refused(RefusalReason::UnknownCa),
        refused_no_common_suite: m.refused(RefusalReason::NoCommonSuite),
        refused_no_ems: m.refused(RefusalReason::NoExtendedMasterSecret),
        refused_decode_error: m.refused(RefusalReason::Decode),
        refused_bad_signature_or_finished: m.refused(RefusalReason::BadSignatureOrFinished),
        refused_peer_alert: m.refused(RefusalReason::PeerAlert),
        refused_other: m.refused(RefusalReason::Other),
        records_bad_mac: m.records_bad_mac,
        peer_address_changes: m.peer_address_changes,
        log_lines_suppressed: m.log_lines_suppressed,
        peer_certificates_received: m.peer_certificates_received,
        cached_info_hits: m.cached_info_hits,
        c509_client_certificates: m.c509_client_certificates,
    }
}

#[derive(Default)]
struct DriverCounters {
    queue_full: AtomicU64,
    socket_errors: AtomicU64,
}

enum Command {
    Send(ConnectionHandle, Vec<u8>),
    Close(ConnectionHandle),
}

/// What the driver keeps per established session.
struct SessionLink {
    data_tx: mpsc::Sender<Vec<u8>>,
    closed_tx: watch::Sender<Option<CloseReason>>,
    peer: Arc<Mutex<SocketAddr>>,
}

struct Shared {
    local_addr: io::Result<SocketAddr>,
    metrics: Mutex<TransportMetrics>,
    counters: DriverCounters,
    shutdown: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    max_datagram: usize,
}

/// A DTLS server on one datagram socket.
pub struct DtlsListener {
    shared: Arc<Shared>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<DtlsSession>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl DtlsListener {
    /// Start serving DTLS on `socket`.
    pub async fn bind<S: DatagramSocket>(
        socket: S,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        let engine_config = build_engine_config(&config)?;
        let endpoint = Endpoint::new(
            Arc::new(engine_config),
            tokio::time::Instant::now().into_std(),
        )
        .map_err(|e| TransportError::Config(e.to_string()))?;
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            local_addr: socket.local_addr(),
            metrics: Mutex::new(TransportMetrics::default()),
            counters: DriverCounters::default(),
            shutdown,
            commands: command_tx,
            max_datagram: config.mtu_bytes,
        });
        let driver = Driver {
            socket,
            endpoint,
            shared: Arc::clone(&shared),
            accept_tx,
            sessions: HashMap::new(),
        };
        let task = tokio::spawn(driver.run(command_rx));
        Ok(DtlsListener {
            shared,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            task: Mutex::new(Some(task)),
        })
    }

    /// Bind a tokio UDP socket on `addr` (with `socket_receive_buffer_bytes`) and serve DTLS on it.
    pub async fn bind_udp(
        addr: SocketAddr,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        if config.socket_receive_buffer_bytes > 0 {
            // Best effort: the kernel may cap it (net.core.rmem_max) without an error.
            let sock = socket2::SockRef::from(&socket);
            if let Err(e) = sock.set_recv_buffer_size(config.socket_receive_buffer_bytes) {
                tracing::warn!(error = %e, "could not set SO_RCVBUF on the DTLS socket");
            }
        }
        Self::bind(socket, config).await
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.shared.local_addr {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// The next session whose handshake completed and whose client certificate was verified.
    pub async fn accept(&self) -> Result<DtlsSession, TransportError> {
        let mut shutdown = self.shared.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(TransportError::ListenerClosed);
        }
        let mut rx = self.accept_rx.lock().await;
        tokio::select! {
            session = rx.recv() => session.ok_or(TransportError::ListenerClosed),
            _ = shutdown.wait_for(|stopped| *stopped) => Err(TransportError::ListenerClosed),
        }
    }

    pub fn metrics(&self) -> TransportMetrics {
        *lock(&self.shared.metrics)
    }

    /// Stop receiving, abort handshakes, send close_notify to established sessions and forget
    /// all peers.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            // The driver sees the flag, closes everything and returns.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
        }
    }
}

impl Drop for DtlsListener {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

struct Driver<S: DatagramSocket> {
    socket: S,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    accept_tx: mpsc::Sender<DtlsSession>,
    sessions: HashMap<ConnectionHandle, SessionLink>,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl<S: DatagramSocket> Driver<S> {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            let deadline = self
                .endpoint
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // Biased: the timer goes before the socket. A flood that keeps the socket readable
            // would otherwise starve it (no retransmission, no stall or idle timeout while the
            // flood lasts). A due timer now fires first; a pending one costs what it did.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = timer => self.endpoint.handle_timeout(now()),
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        if let Some(d) = buf.get(..n) {
                            self.endpoint.handle(now(), from, d);
                        }
                    }
                    Err(e) => {
                        self.shared.counters.socket_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "DTLS socket receive error");
                    }
                },
                Some(cmd) = commands.recv() => self.command(cmd),
            }
            // Whatever else is queued, without waiting.
            while let Ok(cmd) = commands.try_recv() {
                self.command(cmd);
            }
            self.flush().await;
        }
        self.endpoint.shutdown(now());
        self.flush().await;
        for (_, link) in self.sessions.drain() {
            link.closed_tx.send_replace(Some(CloseReason::Shutdown));
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send(h, data) => {
                if let Err(e) = self.endpoint.send(now(), h, &data) {
                    tracing::debug!(error = %e, "DTLS send refused");
                }
            }
            Command::Close(h) => self.endpoint.close(now(), h),
        }
    }

    async fn flush(&mut self) {
        while let Some(t) = self.endpoint.poll_transmit() {
            if let Err(e) = self.socket.send_to(&t.payload, t.destination).await {
                self.shared
                    .counters
                    .socket_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, peer = %t.destination, "DTLS socket send error");
            }
        }
        while let Some(ev) = self.endpoint.poll_event() {
            self.event(ev);
        }
        // Closing a session from an event may queue a close_notify.
        while let Some(t) = self.endpoint.poll_transmit() {
            let _ = self.socket.send_to(&t.payload, t.destination).await;
        }
        *lock(&self.shared.metrics) = snapshot(&self.endpoint, &self.shared.counters);
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected(h) => {
                let peer_certificates = Arc::new(self.endpoint.take_peer_certificates(h));
                let Some(conn) = self.endpoint.connection(h) else {
                    return;
                };
                let (data_tx, data_rx) = mpsc::channel(SESSION_QUEUE);
                let (closed_tx, closed_rx) = watch::channel(None);
                let peer = Arc::new(Mutex::new(conn.peer()));
                let verification: Option<PeerVerification> =
                    conn.verified().and_then(|v| v.context.clone());
                let session = DtlsSession {
                    handle: h,
                    peer: Arc::clone(&peer),
                    peer_certificates,
                    peer_verification: verification,
                    cipher_suite: conn.cipher_suite().map(CipherSuiteName::from_engine),
                    data_rx: tokio::sync::Mutex::new(data_rx),
                    closed_rx,
                    commands: self.shared.commands.clone(),
                    max_datagram: conn.max_datagram().min(self.shared.max_datagram),
                };
                if self.accept_tx.try_send(session).is_err() {
                    self.shared
                        .counters
                        .queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    self.endpoint.close(now(), h);
                    return;
                }
                self.sessions.insert(
                    h,
                    SessionLink {
                        data_tx,
                        closed_tx,
                        peer,
                    },
                );
            }
            Event::Data(h, d) => {
                if let Some(link) = self.sessions.get(&h) {
                    if link.data_tx.try_send(d).is_err() {
                        self.shared
                            .counters
                            .queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Event::AddressChanged { conn, to, .. } => {
                if let Some(link) = self.sessions.get(&conn) {
                    *lock(&link.peer) = to;
                }
            }
            Event::Closed(h, reason) => {
                if let Some(link) = self.sessions.remove(&h) {
                    link.closed_tx
                        .send_replace(Some(CloseReason::from_engine(&reason)));
                }
            }
        }
    }
}

/// An established, mutually authenticated DTLS session with one peer.
pub struct DtlsSession {
    handle: ConnectionHandle,
    peer: Arc<Mutex<SocketAddr>>,
    peer_certificates: Arc<Vec<Vec<u8>>>,
    peer_verification: Option<PeerVerification>,
    cipher_suite: Option<CipherSuiteName>,
    data_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    closed_rx: watch::Receiver<Option<CloseReason>>,
    commands: mpsc::Sender<Command>,
    max_datagram: usize,
}

impl std::fmt::Debug for DtlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsSession")
            .field("peer_addr", &self.peer_addr())
            .field("cipher_suite", &self.cipher_suite)
            .field("peer_certificates", &self.peer_certificates.len())
            .finish()
    }
}

impl DtlsSession {
    /// The peer's current address (it follows a Connection ID session across NAT rebinding).
    pub fn peer_addr(&self) -> SocketAddr {
        *lock(&self.peer)
    }

    /// The client's certificates, DER, leaf first, as sent and verified in the handshake.
    pub fn peer_certificates(&self) -> &[Vec<u8>] {
        &self.peer_certificates
    }

    /// The same chain, shared (the session holds the only copy).
    pub fn peer_certificates_shared(&self) -> Arc<Vec<Vec<u8>>> {
        Arc::clone(&self.peer_certificates)
    }

    /// What the configured [`super::ClientChainVerifier`] established for the chain.
    pub fn peer_verification(&self) -> Option<&PeerVerification> {
        self.peer_verification.as_ref()
    }

    pub fn cipher_suite(&self) -> Option<CipherSuiteName> {
        self.cipher_suite
    }

    fn close_reason(&self) -> Option<CloseReason> {
        *self.closed_rx.borrow()
    }

    /// Receive one plaintext datagram as its own buffer (no receive buffer is held between
    /// datagrams). `Err(Closed)` once the session ended.
    pub async fn recv_datagram(&self) -> Result<Vec<u8>, TransportError> {
        let mut rx = self.data_rx.lock().await;
        let mut closed = self.closed_rx.clone();
        tokio::select! {
            biased;
            d = rx.recv() => d.ok_or_else(|| {
                TransportError::Closed(self.close_reason().unwrap_or(CloseReason::Shutdown))
            }),
            _ = closed.wait_for(Option::is_some) => rx.try_recv().map_err(|_| {
                TransportError::Closed(self.close_reason().unwrap_or(CloseReason::LocalClose))
            }),
        }
    }

    /// Receive one plaintext datagram into `buf`. `Err(Closed)` once the session ended.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let d = self.recv_datagram().await?;
        let dst = buf
            .get_mut(..d.len())
            .ok_or(TransportError::BufferTooSmall)?;
        dst.copy_from_slice(&d);
        Ok(d.len())
    }

    /// Send one plaintext datagram (application data is never fragmented).
    pub async fn send(&self, datagram: &[u8]) -> Result<(), TransportError> {
        if let Some(reason) = self.close_reason() {
            return Err(TransportError::Closed(reason));
        }
        if datagram.len() > self.max_datagram {
            return Err(TransportError::DatagramTooLarge {
                len: datagram.len(),
                max_bytes: self.max_datagram,
            });
        }
        self.commands
            .send(Command::Send(self.handle, datagram.to_vec()))
            .await
            .map_err(|_| TransportError::ListenerClosed)
    }

    /// Send close_notify and forget the peer.
    pub async fn close(&self) {
        if self.close_reason().is_none() {
            let _ = self.commands.send(Command::Close(self.handle)).await;
        }
    }
}

impl Drop for DtlsSession {
    fn drop(&mut self) {
        if self.close_reason().is_none() {
            let _ = self.commands.try_send(Command::Close(self.handle));
        }
    }
}
