//! The tokio driver around the est-dtls [`Endpoint`]: one task owns the socket, the endpoint
//! and its timer; sessions talk to it over bounded channels.
//!
//! ```text
//!   socket.recv_from ─► Endpoint::handle(now, from, datagram)
//!   JPY socket       ─► allowlisted proxy? JPY [header, datagram]? ─► Endpoint::handle(now, (proxy, header), datagram)
//!   timer            ─► Endpoint::handle_timeout(now)
//!   DtlsSession::send/close ─► command queue ─► Endpoint::send / close
//!   after each: poll_transmit ─► socket.send_to (a relayed peer: JPY [header, datagram] to its
//!               proxy, from the JPY socket);  poll_event ─► accept queue / session queues
//! ```
//!
//! The driver holds no protocol logic: cookies, limits, retransmission, CID routing and
//! session replacement are the endpoint's (and unit-tested there on virtual time). Time is
//! tokio's clock, so the same code runs under turmoil's simulated time.
//!
//! With `engine_shards` > 1 there are that many endpoints, each driven by a task of its own
//! (one endpoint does all of its handshakes' curve operations on one core), and a dispatcher
//! task owns the sockets' receive side:
//!
//! ```text
//!   socket.recv_from ─► Router::shard(peer, datagram) ─► shard inbox ─► Endpoint::handle
//!                       (the CID's shard byte for a tls12_cid record; otherwise a keyed hash
//!                        of the peer: UDP address and port, or join proxy and JPY header)
//! ```
//!
//! Each shard sends on the shared sockets itself. A shard's CIDs start with the configured
//! prefix and then its own index, so a meter whose NAT rebinds reaches its shard again.
//! `max_sessions_per_identity` holds across the shards: their drivers share an
//! [`IdentityRegistry`] of every established session per identity, and the shard whose new
//! session pushes an identity over the limit closes the oldest wherever it is (its own shard
//! at once, another through that shard's command queue).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use est_dtls::{ConnectionHandle, Endpoint, Event, IpPrefix, PeerAddr, RefusalReason};
use est_relay::tokio_clock::{now, sleep_until};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::identities::{IdentityRegistry, ShardSession};
use super::{
    build_engine_config, CipherSuiteName, CloseReason, DatagramSocket, DtlsServerConfig,
    PeerVerification, TransportError,
};

// The driver's queues are sized by `DtlsServerConfig::{accept_queue_sessions,
// session_queue_datagrams, session_queue_bytes, command_queue_len, shard_inbox_datagrams}`
// ([dtls] in the TOML; docs/limits.md adds them up).
/// Offset of the CID in a DTLS 1.2 record of content type tls12_cid (RFC 9146 §4): type (1),
/// version (2), epoch (2), sequence number (6).
const CID_OFFSET: usize = 11;
/// Content type tls12_cid (RFC 9146).
const CONTENT_TYPE_TLS12_CID: u8 = 25;
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
    /// Datagrams dropped on a full session queue (`session_queue_datagrams` or
    /// `session_queue_bytes`) or a full engine shard inbox (`shard_inbox_datagrams`).
    pub dropped_queue_full: u64,
    /// Sessions closed right after their handshake because the accept queue was full
    /// (`accept_queue_sessions`).
    pub sessions_dropped_accept_queue_full: u64,
    /// Close requests of dropped sessions lost on a full command queue (`command_queue_len`);
    /// such a session ends at its idle timeout instead.
    pub close_commands_dropped: u64,
    /// With several engine shards: per-identity supersedes of a session on another shard that
    /// found that shard's command queue full (`command_queue_len`) and wait for room; each is
    /// applied (counted in `sessions_superseded`) once that shard has worked through the
    /// commands ahead of it, unless the session ended meanwhile or the listener shut down.
    /// Meanwhile the identity holds one session over its limit per waiting supersede.
    pub supersedes_deferred: u64,
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
    /// Datagrams received on the JPY socket (from join proxies).
    pub jpy_received: u64,
    /// ... dropped: not from an allowlisted proxy.
    pub jpy_dropped_not_allowed: u64,
    /// ... dropped: not a JPY message (or a header over the limit).
    pub jpy_dropped_malformed: u64,
    /// DTLS datagrams of relayed meters the endpoint took (JPY content).
    pub relayed_datagrams: u64,
    /// Handshakes whose client certificate came as C509 (RFC 7250 negotiation).
    pub c509_client_certificates: u64,
}

/// The endpoint's part of the metrics (the driver's counters are added once, by
/// [`merged`], whatever the number of shards).
fn snapshot(ep: &Endpoint) -> TransportMetrics {
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
        dropped_queue_full: 0,
        sessions_dropped_accept_queue_full: 0,
        close_commands_dropped: 0,
        supersedes_deferred: 0,
        socket_errors: 0,
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
        jpy_received: 0,
        jpy_dropped_not_allowed: 0,
        jpy_dropped_malformed: 0,
        relayed_datagrams: m.datagrams_relayed,
        c509_client_certificates: m.c509_client_certificates,
    }
}

/// The listener's metrics: every shard's endpoint part summed, plus the driver's counters.
fn merged(shared: &Shared) -> TransportMetrics {
    let mut m = TransportMetrics::default();
    for shard in &shared.shard_metrics {
        let s = *lock(shard);
        m.handshakes_started += s.handshakes_started;
        m.handshakes_completed += s.handshakes_completed;
        m.handshakes_failed += s.handshakes_failed;
        m.handshakes_timed_out += s.handshakes_timed_out;
        m.handshakes_abandoned += s.handshakes_abandoned;
        m.half_open_now += s.half_open_now;
        m.sessions_now += s.sessions_now;
        m.tracked_addresses_now += s.tracked_addresses_now;
        m.tombstones_now += s.tombstones_now;
        m.sessions_replaced += s.sessions_replaced;
        m.sessions_idle_closed += s.sessions_idle_closed;
        m.sessions_superseded += s.sessions_superseded;
        m.final_flight_resends += s.final_flight_resends;
        m.dropped_garbage += s.dropped_garbage;
        m.dropped_over_limit += s.dropped_over_limit;
        m.dropped_unknown_peer += s.dropped_unknown_peer;
        m.dropped_duplicates += s.dropped_duplicates;
        m.hello_verify_sent += s.hello_verify_sent;
        m.bad_cookies += s.bad_cookies;
        m.refused_bad_certificate += s.refused_bad_certificate;
        m.refused_unknown_ca += s.refused_unknown_ca;
        m.refused_no_common_suite += s.refused_no_common_suite;
        m.refused_no_ems += s.refused_no_ems;
        m.refused_decode_error += s.refused_decode_error;
        m.refused_bad_signature_or_finished += s.refused_bad_signature_or_finished;
        m.refused_peer_alert += s.refused_peer_alert;
        m.refused_other += s.refused_other;
        m.records_bad_mac += s.records_bad_mac;
        m.peer_address_changes += s.peer_address_changes;
        m.log_lines_suppressed += s.log_lines_suppressed;
        m.peer_certificates_received += s.peer_certificates_received;
        m.cached_info_hits += s.cached_info_hits;
        m.relayed_datagrams += s.relayed_datagrams;
        m.c509_client_certificates += s.c509_client_certificates;
    }
    let c = &shared.counters;
    m.dropped_queue_full = c.queue_full.load(Ordering::Relaxed);
    m.sessions_dropped_accept_queue_full = c.accept_queue_full.load(Ordering::Relaxed);
    m.close_commands_dropped = c.close_commands_dropped.load(Ordering::Relaxed);
    m.supersedes_deferred = c.supersedes_deferred.load(Ordering::Relaxed);
    m.socket_errors = c.socket_errors.load(Ordering::Relaxed);
    m.jpy_received = c.jpy_received.load(Ordering::Relaxed);
    m.jpy_dropped_not_allowed = c.jpy_not_allowed.load(Ordering::Relaxed);
    m.jpy_dropped_malformed = c.jpy_malformed.load(Ordering::Relaxed);
    m
}

#[derive(Default)]
struct DriverCounters {
    queue_full: AtomicU64,
    accept_queue_full: AtomicU64,
    close_commands_dropped: AtomicU64,
    supersedes_deferred: AtomicU64,
    socket_errors: AtomicU64,
    jpy_received: AtomicU64,
    jpy_not_allowed: AtomicU64,
    jpy_malformed: AtomicU64,
}

enum Command {
    Send(ConnectionHandle, Vec<u8>),
    Close(ConnectionHandle),
    /// Close a session because a newer one of its identity, on another shard, pushed it over
    /// `max_sessions_per_identity`.
    Supersede(ConnectionHandle),
    /// A new server certificate chain and key for the handshakes that start from now on.
    Credentials(Vec<Vec<u8>>, Arc<est_dtls::SigningKey>),
}

/// What the driver keeps per established session.
struct SessionLink {
    data_tx: mpsc::Sender<Vec<u8>>,
    /// Bytes in `data_tx` not yet taken by the session task.
    queued_bytes: Arc<AtomicUsize>,
    closed_tx: watch::Sender<Option<CloseReason>>,
    peer: Arc<Mutex<PeerAddr>>,
    /// The identity the session is registered under in [`Shared::identities`] (several
    /// shards only).
    identity: Option<Vec<u8>>,
}

struct Shared {
    local_addr: io::Result<SocketAddr>,
    jpy_addr: Option<io::Result<SocketAddr>>,
    /// Each engine shard's last snapshot (see [`merged`]).
    shard_metrics: Vec<Mutex<TransportMetrics>>,
    counters: DriverCounters,
    shutdown: watch::Sender<bool>,
    /// Each engine shard's command queue.
    commands: Vec<mpsc::Sender<Command>>,
    max_datagram: usize,
    /// With several engine shards: every shard's established sessions per identity, so that
    /// `max_sessions_per_identity` holds across them. `None` with one shard (its endpoint
    /// enforces the limit alone).
    identities: Option<IdentityRegistry>,
}

/// A DTLS server on one datagram socket.
pub struct DtlsListener {
    shared: Arc<Shared>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<DtlsSession>>,
    /// The engine shards' driver tasks, and the dispatcher's when there are several.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl DtlsListener {
    /// Start serving DTLS on `socket`.
    pub async fn bind<S: DatagramSocket>(
        socket: S,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        Self::bind_with_jpy(socket, None, config).await
    }

    /// Start serving DTLS on `socket` and, on `jpy`, to meters behind stateless join proxies
    /// (draft-ietf-anima-constrained-join-proxy): JPY messages `[header, DTLS datagram]` from
    /// the proxies in `config.jpy_allowed_proxies`, each meter a peer of its own keyed by
    /// (proxy address, header), answered as JPY with its header echoed.
    pub async fn bind_with_jpy<S: DatagramSocket>(
        socket: S,
        jpy: Option<S>,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        let engine_config = build_engine_config(&config)?;
        for (name, v) in [
            ("accept_queue_sessions", config.accept_queue_sessions),
            ("session_queue_datagrams", config.session_queue_datagrams),
            ("session_queue_bytes", config.session_queue_bytes),
            ("command_queue_len", config.command_queue_len),
            ("shard_inbox_datagrams", config.shard_inbox_datagrams),
        ] {
            if v == 0 {
                return Err(TransportError::Config(format!("{name} must be at least 1")));
            }
        }
        let shards = config.engine_shards.max(1);
        check_shards(&engine_config, shards)?;
        let start = tokio::time::Instant::now().into_std();
        let mut endpoints = Vec::with_capacity(shards);
        for shard in 0..shards {
            let cfg = shard_config(&engine_config, shard, shards);
            endpoints.push(
                Endpoint::new(Arc::new(cfg), start)
                    .map_err(|e| TransportError::Config(e.to_string()))?,
            );
        }
        let socket = Arc::new(socket);
        let jpy = jpy.map(|socket| {
            Arc::new(JpySocket {
                socket,
                allowed: config.jpy_allowed_proxies.clone(),
                max_header: config.jpy_max_header_bytes,
            })
        });
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_queue_sessions);
        let (command_txs, command_rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| mpsc::channel(config.command_queue_len))
            .unzip();
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            local_addr: socket.local_addr(),
            jpy_addr: jpy.as_ref().map(|j| j.socket.local_addr()),
            shard_metrics: (0..shards)
                .map(|_| Mutex::new(TransportMetrics::default()))
                .collect(),
            counters: DriverCounters::default(),
            shutdown,
            commands: command_txs.clone(),
            max_datagram: config.mtu_bytes,
            identities: (shards > 1)
                .then(|| IdentityRegistry::new(config.max_sessions_per_identity)),
        });
        let mut tasks = Vec::with_capacity(shards + 1);
        let mut inboxes = Vec::new();
        for (shard, ((endpoint, commands_rx), commands)) in endpoints
            .into_iter()
            .zip(command_rxs)
            .zip(command_txs)
            .enumerate()
        {
            // One shard reads the sockets itself; several get their datagrams from the
            // dispatcher.
            let inbox = (shards > 1).then(|| {
                let (tx, rx) = mpsc::channel(config.shard_inbox_datagrams);
                inboxes.push(tx);
                rx
            });
            let driver = Driver {
                shard,
                socket: Arc::clone(&socket),
                jpy: jpy.clone(),
                endpoint,
                shared: Arc::clone(&shared),
                accept_tx: accept_tx.clone(),
                commands,
                sessions: HashMap::new(),
                session_queue_datagrams: config.session_queue_datagrams,
                session_queue_bytes: config.session_queue_bytes,
            };
            tasks.push(tokio::spawn(driver.run(commands_rx, inbox)));
        }
        if shards > 1 {
            let dispatcher = Dispatcher {
                socket,
                jpy,
                inboxes,
                shared: Arc::clone(&shared),
                router: Router::new(&engine_config, shards),
            };
            tasks.push(tokio::spawn(dispatcher.run()));
        }
        Ok(DtlsListener {
            shared,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            tasks: Mutex::new(tasks),
        })
    }

    /// Bind a tokio UDP socket on `addr` (with `socket_receive_buffer_bytes`) and serve DTLS on it.
    pub async fn bind_udp(
        addr: SocketAddr,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        let socket = udp_socket(addr, config.socket_receive_buffer_bytes).await?;
        Self::bind(socket, config).await
    }

    /// [`DtlsListener::bind_udp`] plus a JPY socket on `jpy_addr`.
    pub async fn bind_udp_with_jpy(
        addr: SocketAddr,
        jpy_addr: SocketAddr,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        let socket = udp_socket(addr, config.socket_receive_buffer_bytes).await?;
        let jpy = udp_socket(jpy_addr, config.socket_receive_buffer_bytes).await?;
        Self::bind_with_jpy(socket, Some(jpy), config).await
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.shared.local_addr {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// The JPY socket's address, if there is one.
    pub fn jpy_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.shared.jpy_addr.as_ref().map(|r| match r {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        })
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
        merged(&self.shared)
    }

    /// Each engine shard's metrics without the driver's counters (which are not per shard),
    /// in shard order: how the load spreads.
    pub fn shard_metrics(&self) -> Vec<TransportMetrics> {
        self.shared.shard_metrics.iter().map(|m| *lock(m)).collect()
    }

    /// Serve handshakes that start from now on with this certificate chain (DER, ours first)
    /// and PKCS#8 key (a renewed server certificate, `est-server dtls renew` + SIGHUP).
    /// Established sessions keep going.
    pub async fn set_credentials(
        &self,
        chain_der: Vec<Vec<u8>>,
        key_pkcs8_der: &[u8],
    ) -> Result<(), TransportError> {
        let Some(leaf) = chain_der.first() else {
            return Err(TransportError::Config("certificate chain is empty".into()));
        };
        let key = est_dtls::SigningKey::from_pkcs8(key_pkcs8_der).map_err(|e| {
            TransportError::Config(format!(
                "private key must be ECDSA P-256 or P-384 PKCS#8: {e}"
            ))
        })?;
        // The certificate must carry this key, or every new handshake would fail.
        let cert = <x509_cert::Certificate as der::Decode>::from_der(leaf)
            .map_err(|e| TransportError::Config(format!("server certificate: {e}")))?;
        if cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            != key.public_key()
        {
            return Err(TransportError::Config(
                "the private key does not match the server certificate".into(),
            ));
        }
        let key = Arc::new(key);
        for commands in &self.shared.commands {
            commands
                .send(Command::Credentials(chain_der.clone(), Arc::clone(&key)))
                .await
                .map_err(|_| TransportError::ListenerClosed)?;
        }
        Ok(())
    }

    /// Stop receiving, abort handshakes, send close_notify to established sessions and forget
    /// all peers.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        // The drivers see the flag, close everything and return.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            futures_util::future::join_all(tasks),
        )
        .await;
    }
}

impl Drop for DtlsListener {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// A tokio UDP socket on `addr` with SO_RCVBUF `rcvbuf` (0: the OS default).
async fn udp_socket(addr: SocketAddr, rcvbuf: usize) -> io::Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind(addr).await?;
    if rcvbuf > 0 {
        // Best effort: the kernel may cap it (net.core.rmem_max) without an error.
        let sock = socket2::SockRef::from(&socket);
        if let Err(e) = sock.set_recv_buffer_size(rcvbuf) {
            tracing::warn!(error = %e, "could not set SO_RCVBUF on a UDP socket");
        }
    }
    Ok(socket)
}

struct JpySocket<S> {
    socket: S,
    allowed: Vec<IpPrefix>,
    max_header: usize,
}

async fn recv_jpy<S: DatagramSocket>(
    jpy: Option<&JpySocket<S>>,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    match jpy {
        Some(j) => j.socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A datagram on the JPY socket: from an allowlisted proxy, a JPY message whose content is the
/// datagram of the peer (proxy, header). `None`: dropped and counted.
fn jpy_message<S: DatagramSocket>(
    jpy: &JpySocket<S>,
    counters: &DriverCounters,
    from: SocketAddr,
    d: &[u8],
) -> Option<(PeerAddr, Vec<u8>)> {
    counters.jpy_received.fetch_add(1, Ordering::Relaxed);
    if !jpy.allowed.iter().any(|p| p.contains(from.ip())) {
        counters.jpy_not_allowed.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // The draft: an array of 2 or more elements, the first two used.
    let Ok(msg) = est_relay::jpy::decode(d, jpy.max_header) else {
        counters.jpy_malformed.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    Some((
        PeerAddr::relayed(from, &msg.header),
        msg.content.into_owned(),
    ))
}

/// The next datagram the dispatcher handed this shard; never without a dispatcher.
async fn recv_inbox(
    inbox: &mut Option<mpsc::Receiver<(PeerAddr, Vec<u8>)>>,
) -> Option<(PeerAddr, Vec<u8>)> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Shards need CIDs with room for their shard byte after the prefix, and some randomness.
fn check_shards(engine: &est_dtls::ServerConfig, shards: usize) -> Result<(), TransportError> {
    if shards > usize::from(u8::MAX) + 1 {
        return Err(TransportError::Config(format!(
            "engine_shards is {shards}: at most 256 (a CID carries the shard in one byte)"
        )));
    }
    if shards > 1 && engine.cid_length > 0 && engine.cid_prefix.len() + 3 > engine.cid_length {
        return Err(TransportError::Config(format!(
            "with {shards} engine shards a Connection ID needs its prefix ({} bytes), a shard \
             byte and at least 2 random bytes: cid_length {} is too short",
            engine.cid_prefix.len(),
            engine.cid_length
        )));
    }
    Ok(())
}

/// Shard `shard` of `shards`: the CIDs it issues carry its index after the configured prefix,
/// and it holds its share of the caps (a host's or relay's peers spread over the shards, so
/// the per-address and per-relay caps are shared out too). The per-identity limit stays whole
/// in each shard's engine: the drivers' [`IdentityRegistry`] holds it across the shards, and
/// an engine that reaches it alone (every session of the identity on its shard) replaces the
/// same oldest session the registry would.
fn shard_config(
    base: &est_dtls::ServerConfig,
    shard: usize,
    shards: usize,
) -> est_dtls::ServerConfig {
    let mut c = base.clone();
    if shards > 1 {
        if c.cid_length > 0 {
            // check_shards: shard < 256.
            c.cid_prefix.push(u8::try_from(shard).unwrap_or(u8::MAX));
        }
        let (b, l) = (&base.limits, &mut c.limits);
        l.max_half_open = b.max_half_open.div_ceil(shards);
        l.max_sessions = b.max_sessions.div_ceil(shards);
        l.max_half_open_per_ip = b.max_half_open_per_ip.div_ceil(shards);
        l.max_sessions_per_ip = b.max_sessions_per_ip.div_ceil(shards);
        l.max_half_open_per_relay = b.max_half_open_per_relay.div_ceil(shards);
        l.max_sessions_per_relay = b.max_sessions_per_relay.div_ceil(shards);
        let n = u32::try_from(shards).unwrap_or(u32::MAX);
        l.max_log_lines_per_sec = b.max_log_lines_per_sec.div_ceil(n);
    }
    c
}

/// Chooses the engine shard of a datagram.
struct Router {
    shards: usize,
    /// Where a tls12_cid record carries the shard byte (after the CID prefix); `None`: no CIDs.
    cid_shard_byte: Option<usize>,
    /// A randomly keyed hash of the peer, so that no one can aim many peers at one shard on
    /// purpose.
    hasher: std::collections::hash_map::RandomState,
}

impl Router {
    fn new(engine: &est_dtls::ServerConfig, shards: usize) -> Self {
        Router {
            shards,
            cid_shard_byte: (engine.cid_length > 0).then(|| CID_OFFSET + engine.cid_prefix.len()),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// A record under a CID this server issued goes to the shard named in it, whatever its
    /// source address; anything else to the shard of its peer (UDP address and port, or join
    /// proxy and JPY header). Peers, not hosts: the meters behind one NAT or one stateful DCU
    /// relay spread over every shard instead of crowding one.
    fn shard(&self, peer: &PeerAddr, datagram: &[u8]) -> usize {
        use std::hash::BuildHasher;
        if let Some(at) = self.cid_shard_byte {
            if datagram.first() == Some(&CONTENT_TYPE_TLS12_CID) {
                if let Some(&b) = datagram.get(at) {
                    let b = usize::from(b);
                    if b < self.shards {
                        return b;
                    }
                }
            }
        }
        let h = self.hasher.hash_one(peer);
        usize::try_from(h % self.shards as u64).unwrap_or(0)
    }
}

/// With several engine shards: reads the sockets and hands each datagram to its shard.
struct Dispatcher<S: DatagramSocket> {
    socket: Arc<S>,
    jpy: Option<Arc<JpySocket<S>>>,
    inboxes: Vec<mpsc::Sender<(PeerAddr, Vec<u8>)>>,
    shared: Arc<Shared>,
    router: Router,
}

impl<S: DatagramSocket> Dispatcher<S> {
    async fn run(self) {
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut jpy_buf = vec![
            0u8;
            if self.jpy.is_some() {
                RECV_BUFFER_BYTES
            } else {
                0
            }
        ];
        let mut shutdown = self.shared.shutdown.subscribe();
        let counters = &self.shared.counters;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        if let Some(d) = buf.get(..n) {
                            self.dispatch(PeerAddr::Direct(from), d.to_vec());
                        }
                    }
                    Err(e) => {
                        counters.socket_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "DTLS socket receive error");
                    }
                },
                r = recv_jpy(self.jpy.as_deref(), &mut jpy_buf) => match (r, &self.jpy) {
                    (Ok((n, from)), Some(jpy)) => {
                        let msg = jpy_buf.get(..n).and_then(|d| jpy_message(jpy, counters, from, d));
                        if let Some((peer, content)) = msg {
                            self.dispatch(peer, content);
                        }
                    }
                    (Ok(_), None) => {}
                    (Err(e), _) => {
                        counters.socket_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "JPY socket receive error");
                    }
                },
            }
        }
    }

    fn dispatch(&self, peer: PeerAddr, datagram: Vec<u8>) {
        let shard = self.router.shard(&peer, &datagram);
        let sent = self
            .inboxes
            .get(shard)
            .is_some_and(|tx| tx.try_send((peer, datagram)).is_ok());
        if !sent {
            self.shared
                .counters
                .queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Driver<S: DatagramSocket> {
    /// This driver's index among the engine shards.
    shard: usize,
    socket: Arc<S>,
    jpy: Option<Arc<JpySocket<S>>>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    accept_tx: mpsc::Sender<DtlsSession>,
    /// This shard's command queue, for the sessions it makes.
    commands: mpsc::Sender<Command>,
    sessions: HashMap<ConnectionHandle, SessionLink>,
    session_queue_datagrams: usize,
    session_queue_bytes: usize,
}

impl<S: DatagramSocket> Driver<S> {
    /// Drives the endpoint: from the sockets (one shard) or from `inbox` (several, behind a
    /// [`Dispatcher`]).
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: Option<mpsc::Receiver<(PeerAddr, Vec<u8>)>>,
    ) {
        let reads_sockets = inbox.is_none();
        let mut buf = vec![0u8; if reads_sockets { RECV_BUFFER_BYTES } else { 0 }];
        let mut jpy_buf = vec![
            0u8;
            if reads_sockets && self.jpy.is_some() {
                RECV_BUFFER_BYTES
            } else {
                0
            }
        ];
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            let timer = sleep_until(self.endpoint.poll_timeout());
            // Biased: the timer goes before the socket. A flood that keeps the socket readable
            // would otherwise starve it (no retransmission, no stall or idle timeout while the
            // flood lasts). A due timer now fires first; a pending one costs what it did.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = timer => self.endpoint.handle_timeout(now()),
                r = self.socket.recv_from(&mut buf), if reads_sockets => match r {
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
                r = recv_jpy(self.jpy.as_deref(), &mut jpy_buf), if reads_sockets => match r {
                    Ok((n, from)) => {
                        let msg = match (&self.jpy, jpy_buf.get(..n)) {
                            (Some(jpy), Some(d)) => {
                                jpy_message(jpy, &self.shared.counters, from, d)
                            }
                            _ => None,
                        };
                        if let Some((peer, content)) = msg {
                            self.endpoint.handle(now(), peer, &content);
                        }
                    }
                    Err(e) => {
                        self.shared.counters.socket_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "JPY socket receive error");
                    }
                },
                Some((peer, d)) = recv_inbox(&mut inbox) => self.endpoint.handle(now(), peer, &d),
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

    async fn send(&self, t: &est_dtls::Transmit) -> io::Result<usize> {
        match &t.destination {
            PeerAddr::Direct(a) => self.socket.send_to(&t.payload, *a).await,
            PeerAddr::Relayed { proxy, header } => match &self.jpy {
                // Every reply to a relayed meter goes back as JPY with its header echoed.
                Some(j) => {
                    let msg = est_relay::jpy::encode(header, &t.payload);
                    j.socket.send_to(&msg, *proxy).await
                }
                None => Err(io::Error::other("no JPY socket")),
            },
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
            Command::Supersede(h) => {
                self.endpoint.supersede(now(), h);
            }
            Command::Credentials(chain, key) => {
                self.endpoint.set_credentials(chain, key);
                tracing::info!("DTLS server certificate replaced for new handshakes");
            }
        }
    }

    async fn flush(&mut self) {
        while let Some(t) = self.endpoint.poll_transmit() {
            if let Err(e) = self.send(&t).await {
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
            let _ = self.send(&t).await;
        }
        if let Some(m) = self.shared.shard_metrics.get(self.shard) {
            *lock(m) = snapshot(&self.endpoint);
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected(h) => {
                let peer_certificates = Arc::new(self.endpoint.take_peer_certificates(h));
                let Some(conn) = self.endpoint.connection(h) else {
                    return;
                };
                let (data_tx, data_rx) = mpsc::channel(self.session_queue_datagrams);
                let queued_bytes = Arc::new(AtomicUsize::new(0));
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
                    queued_bytes: Arc::clone(&queued_bytes),
                    closed_rx,
                    commands: self.commands.clone(),
                    shared: Arc::clone(&self.shared),
                    max_datagram: conn.max_datagram().min(self.shared.max_datagram),
                };
                if self.accept_tx.try_send(session).is_err() {
                    self.shared
                        .counters
                        .accept_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    self.endpoint.close(now(), h);
                    return;
                }
                let identity = self.register_identity(h);
                self.sessions.insert(
                    h,
                    SessionLink {
                        data_tx,
                        queued_bytes,
                        closed_tx,
                        peer,
                        identity,
                    },
                );
            }
            Event::Data(h, d) => {
                if let Some(link) = self.sessions.get(&h) {
                    let len = d.len();
                    let within_budget =
                        link.queued_bytes.load(Ordering::Acquire) + len <= self.session_queue_bytes;
                    if within_budget {
                        link.queued_bytes.fetch_add(len, Ordering::AcqRel);
                    }
                    if !within_budget || link.data_tx.try_send(d).is_err() {
                        if within_budget {
                            link.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                        }
                        // Like a full socket buffer: dropped, the peer retransmits.
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
                    if let (Some(registry), Some(identity)) =
                        (&self.shared.identities, &link.identity)
                    {
                        let session = ShardSession {
                            shard: self.shard,
                            handle: h,
                        };
                        registry.closed(identity, session);
                    }
                    link.closed_tx.send_replace(Some(reason));
                }
            }
        }
    }

    /// With several shards: counts a new session under its identity across every shard and
    /// closes the oldest sessions it pushes over `max_sessions_per_identity`, on this shard at
    /// once, on another through its command queue. Returns the identity it was counted under.
    ///
    /// The over-limit window. The registry stops counting a pushed-out session `old` here, in
    /// the same step that counts the new one, but `old` ends only when its own shard takes the
    /// `Supersede`: on this shard at once (no window); on another, at that shard's next turn of
    /// its loop, i.e. after the datagram or timer it is handling and the socket sends that
    /// follow (one handshake step at most: a signature or key exchange). Meanwhile the new session is already in the accept queue, so the identity holds
    /// one session over its limit for each supersede still in flight: one, unless several new
    /// sessions of the identity complete on other shards before that shard's turn. If that
    /// shard's command queue is full, the window lasts until the shard has worked through the
    /// commands ahead (at most `command_queue_len` plus the senders already waiting, which it
    /// takes in order); counted in `supersedes_deferred`. Closing the window would mean
    /// holding the new session back until the other shard confirms, a round trip between
    /// shards on every session over the limit: not done.
    fn register_identity(&mut self, h: ConnectionHandle) -> Option<Vec<u8>> {
        let registry = self.shared.identities.as_ref()?;
        let identity = self.endpoint.identity(h)?.to_vec();
        let session = ShardSession {
            shard: self.shard,
            handle: h,
        };
        for old in registry.established(&identity, session) {
            if old.shard == self.shard {
                self.endpoint.supersede(now(), old.handle);
                continue;
            }
            let Some(tx) = self.shared.commands.get(old.shard) else {
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(cmd)) =
                tx.try_send(Command::Supersede(old.handle))
            {
                // The other shard's queue is full: the command waits for room rather than
                // being lost (the identity would stay over its limit until the session's idle
                // timeout), in a task of its own, since this driver must not wait on another
                // shard (two shards waiting on each other's full queues would deadlock).
                // Bounded: each task carries a distinct session of that shard (the registry
                // hands every session back once) and that shard's senders get room in the
                // order they asked. A waiting send ends with an error when that shard's driver
                // returns (shutdown) and drops its queue; its sessions are closed then anyway.
                // A session that ends meanwhile makes the late command a no-op (handles are
                // never reused).
                self.shared
                    .counters
                    .supersedes_deferred
                    .fetch_add(1, Ordering::Relaxed);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
        Some(identity)
    }
}

/// An established, mutually authenticated DTLS session with one peer.
pub struct DtlsSession {
    handle: ConnectionHandle,
    peer: Arc<Mutex<PeerAddr>>,
    peer_certificates: Arc<Vec<Vec<u8>>>,
    peer_verification: Option<PeerVerification>,
    cipher_suite: Option<CipherSuiteName>,
    data_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    queued_bytes: Arc<AtomicUsize>,
    closed_rx: watch::Receiver<Option<CloseReason>>,
    commands: mpsc::Sender<Command>,
    /// The listener's counters (a close request lost on a full command queue is counted).
    shared: Arc<Shared>,
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
    /// The peer's current UDP address, its join proxy's for a relayed meter (it follows a
    /// Connection ID session across NAT rebinding).
    pub fn peer_addr(&self) -> SocketAddr {
        lock(&self.peer).socket_addr()
    }

    /// The peer: a UDP address, or (proxy, JPY header) for a meter behind a join proxy.
    pub fn peer(&self) -> PeerAddr {
        lock(&self.peer).clone()
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
        self.closed_rx.borrow().clone()
    }

    /// Receive one plaintext datagram as its own buffer (no receive buffer is held between
    /// datagrams). `Err(Closed)` once the session ended.
    pub async fn recv_datagram(&self) -> Result<Vec<u8>, TransportError> {
        let mut rx = self.data_rx.lock().await;
        let mut closed = self.closed_rx.clone();
        let got = tokio::select! {
            biased;
            d = rx.recv() => d.ok_or_else(|| {
                TransportError::Closed(self.close_reason().unwrap_or(CloseReason::Shutdown))
            }),
            _ = closed.wait_for(Option::is_some) => rx.try_recv().map_err(|_| {
                TransportError::Closed(self.close_reason().unwrap_or(CloseReason::LocalClose))
            }),
        };
        if let Ok(d) = &got {
            self.queued_bytes.fetch_sub(d.len(), Ordering::AcqRel);
        }
        got
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

    /// The largest plaintext datagram [`DtlsSession::send`] takes (less behind a join proxy).
    pub fn max_datagram(&self) -> usize {
        self.max_datagram
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
        if self.close_reason().is_none()
            && self.commands.try_send(Command::Close(self.handle)).is_err()
        {
            self.shared
                .counters
                .close_commands_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
