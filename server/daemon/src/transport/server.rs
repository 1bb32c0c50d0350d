//! The DTLS server: demultiplexer, per-peer virtual connections, handshake tasks, sessions.
//! See the module docs of [`super`] for the defects of webrtc-dtls handled here.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use webrtc_dtls::config::{ClientAuthType, Config, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;
use webrtc_dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use webrtc_util::conn::Conn;

use super::record::{self, ClientRandom, FirstRecord};
use super::{
    dtls_cipher_suites, ensure_crypto_provider, load_certificate, root_store, CipherSuiteName,
    ClientChainVerifier, CloseReason, DatagramSocket, DtlsServerConfig, PeerCertificateHook,
    PeerVerification, TransportError,
};

/// webrtc-dtls reads datagrams into 8 KiB buffers (`INBOUND_BUFFER_SIZE`); larger ones are no use.
const RECV_BUFFER_BYTES: usize = 8192;
/// Datagrams queued per peer before the demultiplexer drops (a handshake flight is a few).
const PEER_QUEUE_DATAGRAMS: usize = 32;
/// RFC 6347 §4.2.4 leaves the pace to us; the Addendum's rule: at most once per 500 ms per peer.
const FINAL_FLIGHT_RESEND_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// A final flight is CCS + Finished (two small records); anything beyond this is not one.
const FINAL_FLIGHT_MAX_DATAGRAMS: usize = 8;
/// Client randoms of superseded handshakes remembered per address, so their late ClientHellos
/// do not start yet another candidate.
const RETIRED_RANDOMS_PER_ADDRESS: usize = 4;
/// Completed sessions waiting for `accept()`.
const ACCEPT_QUEUE: usize = 1024;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Counters of the transport, a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportMetrics {
    /// Peers created by a ClientHello (including candidates beside an existing session).
    pub handshakes_started: u64,
    pub handshakes_completed: u64,
    /// The engine reported an error (bad certificate, alert, policy hook refusal ...).
    pub handshakes_failed: u64,
    pub handshakes_timed_out: u64,
    /// Candidates dropped because a newer ClientHello from the same address replaced them, or
    /// handshakes aborted by shutdown.
    pub handshakes_abandoned: u64,
    pub half_open_now: u64,
    pub sessions_now: u64,
    /// Addresses the demultiplexer holds state for (peers, candidates' addresses, tombstones).
    pub tracked_addresses_now: u64,
    /// Of those, tombstones of recently closed peers.
    pub tombstones_now: u64,
    /// Sessions closed because the same address proved return routability for a new handshake.
    pub sessions_replaced: u64,
    pub sessions_idle_closed: u64,
    /// Times our saved final flight was sent again (RFC 6347 §4.2.4).
    pub final_flight_resends: u64,
    /// Not a well-formed sequence of DTLS records (garbage, truncated record, TLS, CID records).
    pub dropped_garbage: u64,
    /// New ClientHellos refused by `max_half_open_handshakes` or `max_sessions`.
    pub dropped_over_limit: u64,
    /// Records other than a ClientHello from an address without a peer.
    pub dropped_unknown_peer: u64,
    /// Late or duplicate handshake records swallowed (after completion, or in a tombstone).
    pub dropped_duplicates: u64,
    /// A peer's queue was full.
    pub dropped_queue_full: u64,
    pub socket_errors: u64,
}

#[derive(Default)]
struct Counters {
    handshakes_started: AtomicU64,
    handshakes_completed: AtomicU64,
    handshakes_failed: AtomicU64,
    handshakes_timed_out: AtomicU64,
    handshakes_abandoned: AtomicU64,
    half_open_now: AtomicU64,
    sessions_now: AtomicU64,
    sessions_replaced: AtomicU64,
    sessions_idle_closed: AtomicU64,
    final_flight_resends: AtomicU64,
    dropped_garbage: AtomicU64,
    dropped_over_limit: AtomicU64,
    dropped_unknown_peer: AtomicU64,
    dropped_duplicates: AtomicU64,
    dropped_queue_full: AtomicU64,
    socket_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn drop_one(counter: &AtomicU64) {
    // Saturating: a logic slip must not wrap a gauge to 2^64.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
}

impl Counters {
    fn snapshot(&self) -> TransportMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportMetrics {
            handshakes_started: get(&self.handshakes_started),
            handshakes_completed: get(&self.handshakes_completed),
            handshakes_failed: get(&self.handshakes_failed),
            handshakes_timed_out: get(&self.handshakes_timed_out),
            handshakes_abandoned: get(&self.handshakes_abandoned),
            half_open_now: get(&self.half_open_now),
            sessions_now: get(&self.sessions_now),
            tracked_addresses_now: 0,
            tombstones_now: 0,
            sessions_replaced: get(&self.sessions_replaced),
            sessions_idle_closed: get(&self.sessions_idle_closed),
            final_flight_resends: get(&self.final_flight_resends),
            dropped_garbage: get(&self.dropped_garbage),
            dropped_over_limit: get(&self.dropped_over_limit),
            dropped_unknown_peer: get(&self.dropped_unknown_peer),
            dropped_duplicates: get(&self.dropped_duplicates),
            dropped_queue_full: get(&self.dropped_queue_full),
            socket_errors: get(&self.socket_errors),
        }
    }
}

/// The listener settings we act on ourselves (the rest went into the webrtc-dtls `Config`).
#[derive(Clone)]
struct Settings {
    mtu_bytes: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_half_open_handshakes: u64,
    max_sessions: u64,
    final_flight_resend: bool,
    final_flight_retention: Duration,
    tombstone_duration: Duration,
    /// Our own client-chain validation, run per connection (see [`ClientChainVerifier`]).
    client_verification: Option<ClientVerification>,
}

#[derive(Clone)]
struct ClientVerification {
    verifier: ClientChainVerifier,
    hook: Option<PeerCertificateHook>,
}

/// The chain a connection's verifier accepted, and what it established.
type VerifiedSlot = Arc<Mutex<Option<(Vec<Vec<u8>>, PeerVerification)>>>;

type DtlsVerifyFn = Arc<
    dyn Fn(
            &[Vec<u8>],
            &[rustls::pki_types::CertificateDer<'static>],
        ) -> Result<(), webrtc_dtls::Error>
        + Send
        + Sync,
>;

/// Runs a policy function, turning a panic into a refusal instead of killing the handshake task.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, webrtc_dtls::Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("peer certificate hook panicked".to_string()))
        .map_err(webrtc_dtls::Error::Other)
}

impl ClientVerification {
    /// webrtc-dtls's `verify_peer_certificate` for one connection: validates once (its flight-4
    /// parser may call again with the same chain) and keeps the result in `slot`.
    fn per_connection(&self, slot: VerifiedSlot) -> DtlsVerifyFn {
        let verifier = self.verifier.clone();
        let hook = self.hook.clone();
        Arc::new(move |certs: &[Vec<u8>], _| {
            let mut held = lock(&slot);
            if held
                .as_ref()
                .is_some_and(|(chain, _)| chain.as_slice() == certs)
            {
                return Ok(());
            }
            let established = guarded(|| verifier(certs))?;
            if let Some(hook) = &hook {
                guarded(|| hook(certs))?;
            }
            *held = Some((certs.to_vec(), established));
            Ok(())
        })
    }
}

/// Our server's final flight (RFC 6347 §4.2.4), kept to answer a retransmitted flight 5.
#[derive(Debug, Default)]
struct SavedFlight {
    datagrams: Vec<Vec<u8>>,
    /// Until when we keep it.
    keep_until: Option<Instant>,
    last_resend: Option<Instant>,
}

impl SavedFlight {
    fn is_held(&self, now: Instant) -> bool {
        !self.datagrams.is_empty() && self.keep_until.is_some_and(|t| now < t)
    }

    fn release(&mut self) {
        self.datagrams = Vec::new();
        self.keep_until = None;
    }

    /// The datagrams to send again, if the rate limit allows it now.
    fn take_resend(&mut self, now: Instant) -> Option<Vec<Vec<u8>>> {
        if !self.is_held(now) {
            return None;
        }
        if self
            .last_resend
            .is_some_and(|t| now.duration_since(t) < FINAL_FLIGHT_RESEND_MIN_INTERVAL)
        {
            return None;
        }
        self.last_resend = Some(now);
        Some(self.datagrams.clone())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Established,
    Dead,
}

struct PeerState {
    phase: Phase,
    last_activity: Instant,
    /// We have written our ChangeCipherSpec: the rest of the handshake is the final flight.
    capturing_final_flight: bool,
    final_flight: SavedFlight,
    /// Application data arrived (the client has our Finished) — possibly before the handshake
    /// task noticed the completion, hence remembered here.
    peer_sent_application_data: bool,
    server_hello_sent: bool,
    cipher_suite: Option<u16>,
    conn: Weak<DTLSConn>,
    handshake_task: Option<AbortHandle>,
}

/// One remote address's DTLS association (or handshake attempt).
struct Peer {
    id: u64,
    addr: SocketAddr,
    client_random: ClientRandom,
    inbound_tx: mpsc::Sender<Vec<u8>>,
    inbound_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    /// Replaced by a newer handshake from the same address: anything it still writes is dropped
    /// (the client has moved on; old-epoch records would only confuse its new handshake).
    superseded: AtomicBool,
    state: Mutex<PeerState>,
    closed: watch::Sender<Option<CloseReason>>,
}

impl Peer {
    fn phase(&self) -> Phase {
        lock(&self.state).phase
    }

    fn touch(&self, now: Instant) {
        lock(&self.state).last_activity = now;
    }

    fn close_reason(&self) -> Option<CloseReason> {
        *self.closed.borrow()
    }
}

/// What the demultiplexer remembers about an address.
enum Slot {
    Live {
        primary: Arc<Peer>,
        /// A handshake from a new client random, waiting to prove return routability.
        candidate: Option<Arc<Peer>>,
        retired_randoms: Vec<ClientRandom>,
    },
    Tombstone(Tombstone),
}

struct Tombstone {
    until: Instant,
    client_random: ClientRandom,
    final_flight: SavedFlight,
}

struct Table {
    slots: HashMap<SocketAddr, Slot>,
    tombstones: usize,
}

struct Shared {
    socket: Arc<dyn DatagramSocket>,
    settings: Settings,
    dtls_config: Config,
    table: Mutex<Table>,
    counters: Counters,
    accept_tx: mpsc::Sender<DtlsSession>,
    shutdown: watch::Sender<bool>,
    next_peer_id: AtomicU64,
}

/// Counts a handshake as half-open for as long as its task lives (also when the task is aborted
/// or panics), and forgets the peer if the task ends without completing or cleaning up.
struct HalfOpenGuard {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
}

impl Drop for HalfOpenGuard {
    fn drop(&mut self) {
        drop_one(&self.shared.counters.half_open_now);
        if self.peer.phase() == Phase::Handshaking {
            // Only reachable if the handshake task panicked (e.g. in a policy hook).
            bump(&self.shared.counters.handshakes_failed);
            self.shared
                .remove_peer(&self.peer, CloseReason::PeerClosed, false);
        }
    }
}

/// A DTLS server on one datagram socket. Dropping it stops the receive loop (sessions can still
/// send but no longer receive); [`DtlsListener::shutdown`] also closes sessions in order.
pub struct DtlsListener {
    shared: Arc<Shared>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<DtlsSession>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl DtlsListener {
    /// Start serving DTLS on `socket`.
    pub async fn bind<S: DatagramSocket>(
        socket: S,
        config: DtlsServerConfig,
    ) -> Result<Self, TransportError> {
        ensure_crypto_provider();
        let (settings, dtls_config) = build_server_config(&config)?;
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            socket: Arc::new(socket),
            settings,
            dtls_config,
            table: Mutex::new(Table {
                slots: HashMap::new(),
                tombstones: 0,
            }),
            counters: Counters::default(),
            accept_tx,
            shutdown,
            next_peer_id: AtomicU64::new(1),
        });
        let receiver = tokio::spawn(Arc::clone(&shared).receive_loop());
        let sweeper = tokio::spawn(Arc::clone(&shared).sweep_loop());
        Ok(DtlsListener {
            shared,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            tasks: Mutex::new(vec![receiver, sweeper]),
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
        self.shared.socket.local_addr()
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
        let mut metrics = self.shared.counters.snapshot();
        let table = lock(&self.shared.table);
        metrics.tracked_addresses_now = to_u64(table.slots.len());
        metrics.tombstones_now = to_u64(table.tombstones);
        metrics
    }

    /// Stop receiving, abort handshakes, send close_notify to established sessions (best effort,
    /// at most one second) and forget all peers.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let peers: Vec<Arc<Peer>> = {
            let mut table = lock(&self.shared.table);
            table.tombstones = 0;
            table
                .slots
                .drain()
                .flat_map(|(_, slot)| match slot {
                    Slot::Live {
                        primary, candidate, ..
                    } => vec![Some(primary), candidate],
                    Slot::Tombstone(_) => Vec::new(),
                })
                .flatten()
                .collect()
        };
        let mut conns = Vec::new();
        for peer in peers {
            let conn = lock(&peer.state).conn.upgrade();
            if let Some(phase) = self.shared.mark_dead(&peer, CloseReason::Shutdown, true) {
                if phase == Phase::Handshaking {
                    bump(&self.shared.counters.handshakes_abandoned);
                }
            }
            conns.extend(conn);
        }
        let close_all = async {
            for conn in conns {
                let _ = conn.close().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), close_all).await;
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

fn build_server_config(config: &DtlsServerConfig) -> Result<(Settings, Config), TransportError> {
    let nonzero = |d: Duration, name: &str| {
        if d.is_zero() {
            Err(TransportError::Config(format!("{name} must not be zero")))
        } else {
            Ok(())
        }
    };
    nonzero(config.flight_interval, "flight_interval")?;
    nonzero(config.handshake_timeout, "handshake_timeout")?;
    nonzero(config.idle_timeout, "idle_timeout")?;
    if config.mtu_bytes < 256 {
        return Err(TransportError::Config(format!(
            "mtu_bytes {} is below 256",
            config.mtu_bytes
        )));
    }
    if config.max_half_open_handshakes == 0 || config.max_sessions == 0 {
        return Err(TransportError::Config(
            "max_half_open_handshakes and max_sessions must be at least 1".into(),
        ));
    }
    let certificate =
        load_certificate(&config.certificate_chain_der, &config.private_key_pkcs8_der)?;
    let client_verification =
        config
            .client_chain_verifier
            .clone()
            .map(|verifier| ClientVerification {
                verifier,
                hook: config.verify_peer_certificate.clone(),
            });
    let (client_auth, client_cas, verify_peer_certificate) = if client_verification.is_some() {
        // Our verifier is installed per connection (run_handshake).
        (
            ClientAuthType::RequireAnyClientCert,
            rustls::RootCertStore::empty(),
            None,
        )
    } else {
        let hook = config.verify_peer_certificate.clone().map(|hook| {
            Arc::new(
                move |certs: &[Vec<u8>], _: &[rustls::pki_types::CertificateDer<'static>]| {
                    guarded(|| hook(certs))
                },
            ) as DtlsVerifyFn
        });
        (
            ClientAuthType::RequireAndVerifyClientCert,
            root_store(&config.client_trust_anchors_der, "client_trust_anchors_der")?,
            hook,
        )
    };
    let dtls_config = Config {
        certificates: vec![certificate],
        cipher_suites: dtls_cipher_suites(&config.cipher_suites)?,
        client_auth,
        client_cas,
        extended_master_secret: if config.extended_master_secret_required {
            ExtendedMasterSecretType::Require
        } else {
            ExtendedMasterSecretType::Request
        },
        flight_interval: config.flight_interval,
        mtu: config.mtu_bytes,
        verify_peer_certificate,
        srtp_protection_profiles: if config.answer_use_srtp {
            vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
            ]
        } else {
            Vec::new()
        },
        ..Config::default()
    };
    let settings = Settings {
        mtu_bytes: config.mtu_bytes,
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
        max_half_open_handshakes: to_u64(config.max_half_open_handshakes),
        max_sessions: to_u64(config.max_sessions),
        final_flight_resend: config.final_flight_resend,
        final_flight_retention: config.final_flight_retention,
        tombstone_duration: config.tombstone_duration,
        client_verification,
    };
    Ok((settings, dtls_config))
}

/// What the receive loop does after routing a datagram.
enum Action {
    Nothing,
    Send(SocketAddr, Vec<Vec<u8>>),
}

impl Shared {
    async fn receive_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let received = tokio::select! {
                _ = shutdown.wait_for(|stopped| *stopped) => return,
                r = self.socket.recv_from(&mut buf) => r,
            };
            let (n, from) = match received {
                Ok(r) => r,
                Err(e) => {
                    bump(&self.counters.socket_errors);
                    tracing::warn!(error = %e, "DTLS socket receive error");
                    // Never spin on a persistent error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let datagram = buf.get(..n).unwrap_or(&[]);
            if let Action::Send(to, datagrams) = self.route(from, datagram, Instant::now()) {
                for d in datagrams {
                    if let Err(e) = self.socket.send_to(&d, to).await {
                        bump(&self.counters.socket_errors);
                        tracing::debug!(peer = %to, error = %e, "final flight resend failed");
                    }
                }
            }
        }
    }

    /// Route one received datagram. Runs on the receive task only.
    fn route(self: &Arc<Self>, from: SocketAddr, datagram: &[u8], now: Instant) -> Action {
        let parsed = match record::parse_datagram(datagram) {
            Ok(p) => p,
            Err(why) => {
                bump(&self.counters.dropped_garbage);
                tracing::trace!(peer = %from, ?why, "dropped malformed datagram");
                return Action::Nothing;
            }
        };
        let mut table = lock(&self.table);
        let table = &mut *table;
        let hello_random = match parsed.first {
            FirstRecord::ClientHello { random } => Some(random),
            _ => None,
        };

        // Tombstones: expire, let a ClientHello with a new random through, answer or swallow the rest.
        if let Some(Slot::Tombstone(t)) = table.slots.get_mut(&from) {
            let fresh_hello = matches!(hello_random, Some(Some(r)) if r != t.client_random);
            if t.until > now && !fresh_hello {
                if parsed.is_flight_retransmission() {
                    if let Some(flight) = t.final_flight.take_resend(now) {
                        bump(&self.counters.final_flight_resends);
                        bump(&self.counters.dropped_duplicates);
                        return Action::Send(from, flight);
                    }
                }
                bump(&self.counters.dropped_duplicates);
                return Action::Nothing;
            }
            table.slots.remove(&from);
            table.tombstones = table.tombstones.saturating_sub(1);
        }

        let Some(Slot::Live {
            primary,
            candidate,
            retired_randoms,
        }) = table.slots.get_mut(&from)
        else {
            // Unknown address: only a ClientHello that shows its random may create a peer.
            return match hello_random {
                Some(Some(random)) => {
                    if let Some(peer) = self.admit_handshake(from, random, datagram, false) {
                        table.slots.insert(
                            from,
                            Slot::Live {
                                primary: peer,
                                candidate: None,
                                retired_randoms: Vec::new(),
                            },
                        );
                    }
                    Action::Nothing
                }
                _ => {
                    bump(&self.counters.dropped_unknown_peer);
                    Action::Nothing
                }
            };
        };

        if let Some(random) = hello_random {
            let target = match random {
                // A continuation fragment: it belongs to whichever handshake is in progress.
                None => candidate.clone().or_else(|| {
                    (primary.phase() == Phase::Handshaking).then(|| Arc::clone(primary))
                }),
                Some(r) if r == primary.client_random => {
                    // Retransmitted ClientHello (or ClientHello with cookie) of this handshake;
                    // after completion a late duplicate.
                    (primary.phase() == Phase::Handshaking).then(|| Arc::clone(primary))
                }
                Some(r) if candidate.as_ref().is_some_and(|c| c.client_random == r) => {
                    candidate.clone()
                }
                Some(r) if retired_randoms.contains(&r) => None,
                Some(r) => {
                    // A new handshake from an address that has a session or a handshake: start a
                    // candidate; it replaces the primary only after the cookie exchange (RFC 6347
                    // §4.2.1) proved that the ClientHello really came from this address.
                    if let Some(old) = candidate.take() {
                        push_retired(retired_randoms, old.client_random);
                        if self.mark_dead(&old, CloseReason::Replaced, true)
                            == Some(Phase::Handshaking)
                        {
                            bump(&self.counters.handshakes_abandoned);
                        }
                    }
                    *candidate = self.admit_handshake(from, r, datagram, true);
                    return Action::Nothing;
                }
            };
            match target {
                Some(peer) => self.forward(&peer, datagram, now),
                None => bump(&self.counters.dropped_duplicates),
            }
            return Action::Nothing;
        }

        // Not a ClientHello: it belongs to the primary.
        let peer = Arc::clone(primary);
        let mut st = lock(&peer.state);
        match st.phase {
            Phase::Handshaking => {
                if parsed.first == FirstRecord::ApplicationData {
                    st.peer_sent_application_data = true;
                }
                drop(st);
                self.forward(&peer, datagram, now);
            }
            Phase::Established => {
                if self.settings.final_flight_resend && parsed.is_flight_retransmission() {
                    // The client did not get our final flight and sent its flight 5 again.
                    st.last_activity = now;
                    let resend = st.final_flight.take_resend(now);
                    drop(st);
                    bump(&self.counters.dropped_duplicates);
                    if let Some(flight) = resend {
                        bump(&self.counters.final_flight_resends);
                        return Action::Send(from, flight);
                    }
                    return Action::Nothing;
                }
                if parsed.first == FirstRecord::ApplicationData {
                    // The client only sends application data once it has our Finished.
                    st.peer_sent_application_data = true;
                    st.final_flight.release();
                }
                drop(st);
                self.forward(&peer, datagram, now);
            }
            Phase::Dead => {
                drop(st);
                bump(&self.counters.dropped_duplicates);
            }
        }
        Action::Nothing
    }

    fn forward(&self, peer: &Peer, datagram: &[u8], now: Instant) {
        peer.touch(now);
        if peer.inbound_tx.try_send(datagram.to_vec()).is_err() {
            bump(&self.counters.dropped_queue_full);
        }
    }

    /// Create a peer for a new ClientHello and start its handshake, if the limits allow.
    fn admit_handshake(
        self: &Arc<Self>,
        addr: SocketAddr,
        client_random: ClientRandom,
        first_datagram: &[u8],
        beside_existing: bool,
    ) -> Option<Arc<Peer>> {
        let half_open = self.counters.half_open_now.load(Ordering::Relaxed);
        let sessions = self.counters.sessions_now.load(Ordering::Relaxed);
        let over_sessions = !beside_existing && sessions + half_open >= self.settings.max_sessions;
        if half_open >= self.settings.max_half_open_handshakes || over_sessions {
            bump(&self.counters.dropped_over_limit);
            tracing::debug!(peer = %addr, half_open, sessions, "ClientHello dropped: over limit");
            return None;
        }
        let (inbound_tx, inbound_rx) = mpsc::channel(PEER_QUEUE_DATAGRAMS);
        let (closed, _) = watch::channel(None);
        let now = Instant::now();
        let peer = Arc::new(Peer {
            id: self.next_peer_id.fetch_add(1, Ordering::Relaxed),
            addr,
            client_random,
            inbound_tx,
            inbound_rx: tokio::sync::Mutex::new(inbound_rx),
            superseded: AtomicBool::new(false),
            state: Mutex::new(PeerState {
                phase: Phase::Handshaking,
                last_activity: now,
                capturing_final_flight: false,
                final_flight: SavedFlight::default(),
                peer_sent_application_data: false,
                server_hello_sent: false,
                cipher_suite: None,
                conn: Weak::new(),
                handshake_task: None,
            }),
            closed,
        });
        if peer.inbound_tx.try_send(first_datagram.to_vec()).is_err() {
            bump(&self.counters.dropped_queue_full);
        }
        self.counters.half_open_now.fetch_add(1, Ordering::Relaxed);
        bump(&self.counters.handshakes_started);
        let guard = HalfOpenGuard {
            shared: Arc::clone(self),
            peer: Arc::clone(&peer),
        };
        let task = tokio::spawn(Arc::clone(self).run_handshake(Arc::clone(&peer), guard));
        lock(&peer.state).handshake_task = Some(task.abort_handle());
        Some(peer)
    }

    async fn run_handshake(self: Arc<Self>, peer: Arc<Peer>, guard: HalfOpenGuard) {
        let conn: Arc<dyn Conn + Send + Sync> = Arc::new(PeerConn {
            shared: Arc::clone(&self),
            peer: Arc::clone(&peer),
        });
        let mut dtls_config = self.dtls_config.clone();
        let verified_slot: VerifiedSlot = Arc::default();
        if let Some(verification) = &self.settings.client_verification {
            dtls_config.verify_peer_certificate =
                Some(verification.per_connection(Arc::clone(&verified_slot)));
        }
        let outcome = tokio::time::timeout(
            self.settings.handshake_timeout,
            DTLSConn::new(conn, dtls_config, false, None),
        )
        .await;
        let dtls = match outcome {
            Ok(Ok(dtls)) => Arc::new(dtls),
            Ok(Err(e)) => {
                bump(&self.counters.handshakes_failed);
                tracing::debug!(peer = %peer.addr, error = %e, "DTLS handshake failed");
                self.remove_peer(&peer, CloseReason::PeerClosed, false);
                return;
            }
            Err(_) => {
                bump(&self.counters.handshakes_timed_out);
                tracing::debug!(peer = %peer.addr, "DTLS handshake timed out");
                self.remove_peer(&peer, CloseReason::PeerClosed, false);
                return;
            }
        };
        let peer_certificates = dtls.connection_state().await.peer_certificates;
        let verified = lock(&verified_slot).take();
        let peer_verification = match verified {
            Some((chain, established)) if chain == peer_certificates => Some(established),
            _ if self.settings.client_verification.is_some() => {
                // Unreachable with webrtc-dtls 0.12 (RequireAnyClientCert demands a certificate
                // and CertificateVerify, which runs our verifier); refuse rather than assume.
                bump(&self.counters.handshakes_failed);
                tracing::warn!(peer = %peer.addr, "handshake completed without our chain verification");
                let _ = dtls.close().await;
                self.remove_peer(&peer, CloseReason::PeerClosed, false);
                return;
            }
            _ => None,
        };
        let now = Instant::now();
        let cipher_suite = {
            let mut st = lock(&peer.state);
            if st.phase != Phase::Handshaking {
                // Replaced or shut down while completing.
                return;
            }
            st.phase = Phase::Established;
            st.handshake_task = None;
            st.last_activity = now;
            st.conn = Arc::downgrade(&dtls);
            st.capturing_final_flight = false;
            if st.peer_sent_application_data {
                st.final_flight.release();
            } else if !st.final_flight.datagrams.is_empty() {
                st.final_flight.keep_until = Some(now + self.settings.final_flight_retention);
            }
            st.cipher_suite
        };
        self.counters.sessions_now.fetch_add(1, Ordering::Relaxed);
        bump(&self.counters.handshakes_completed);
        drop(guard);
        let session = DtlsSession {
            conn: dtls,
            peer,
            shared: Arc::clone(&self),
            peer_certificates,
            peer_verification,
            cipher_suite: cipher_suite.and_then(CipherSuiteName::from_iana_code),
        };
        // If the listener is gone the session is dropped, which removes the peer.
        let _ = self.accept_tx.send(session).await;
    }

    /// Mark a peer dead (idempotent). Returns its phase before, if it was alive.
    fn mark_dead(&self, peer: &Peer, reason: CloseReason, abort_task: bool) -> Option<Phase> {
        let (before, task) = {
            let mut st = lock(&peer.state);
            let before = st.phase;
            if before == Phase::Dead {
                return None;
            }
            st.phase = Phase::Dead;
            (before, st.handshake_task.take())
        };
        if before == Phase::Established {
            drop_one(&self.counters.sessions_now);
        }
        if reason == CloseReason::Replaced {
            peer.superseded.store(true, Ordering::SeqCst);
            if before == Phase::Established {
                bump(&self.counters.sessions_replaced);
            }
        }
        if abort_task {
            if let Some(task) = task {
                task.abort();
            }
        }
        peer.closed.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
        Some(before)
    }

    /// Forget a peer: its candidate (if any) takes over the address, else a tombstone does.
    fn remove_peer(&self, peer: &Arc<Peer>, reason: CloseReason, abort_task: bool) {
        let now = Instant::now();
        {
            let mut table = lock(&self.table);
            let table = &mut *table;
            let mut make_tombstone = false;
            if let Some(Slot::Live {
                primary,
                candidate,
                retired_randoms,
            }) = table.slots.get_mut(&peer.addr)
            {
                if primary.id == peer.id {
                    if let Some(next) = candidate.take() {
                        push_retired(retired_randoms, primary.client_random);
                        *primary = next;
                    } else {
                        make_tombstone = true;
                    }
                } else if candidate.as_ref().is_some_and(|c| c.id == peer.id) {
                    *candidate = None;
                    push_retired(retired_randoms, peer.client_random);
                }
            }
            if make_tombstone {
                table.slots.remove(&peer.addr);
                if table.tombstones < usize::try_from(self.settings.max_sessions).unwrap_or(0) {
                    let final_flight = std::mem::take(&mut lock(&peer.state).final_flight);
                    let mut until = now + self.settings.tombstone_duration;
                    if let Some(t) = final_flight.keep_until {
                        if final_flight.is_held(now) && t > until {
                            until = t;
                        }
                    }
                    table.slots.insert(
                        peer.addr,
                        Slot::Tombstone(Tombstone {
                            until,
                            client_random: peer.client_random,
                            final_flight,
                        }),
                    );
                    table.tombstones += 1;
                }
            }
        }
        self.mark_dead(peer, reason, abort_task);
    }

    /// A candidate wrote its ServerHello: the client echoed the cookie, so it owns the address.
    fn promote(&self, peer: &Arc<Peer>) {
        let old = {
            let mut table = lock(&self.table);
            match table.slots.get_mut(&peer.addr) {
                Some(Slot::Live {
                    primary,
                    candidate,
                    retired_randoms,
                }) if candidate.as_ref().is_some_and(|c| c.id == peer.id) => {
                    let next = candidate.take();
                    push_retired(retired_randoms, primary.client_random);
                    next.map(|next| std::mem::replace(primary, next))
                }
                _ => None,
            }
        };
        if let Some(old) = old {
            tracing::debug!(peer = %peer.addr, "session replaced by a new handshake");
            if self.mark_dead(&old, CloseReason::Replaced, true) == Some(Phase::Handshaking) {
                bump(&self.counters.handshakes_abandoned);
            }
        }
    }

    /// Our own outgoing datagram for `peer`: note the suite, promote candidates, save the final flight.
    fn observe_outgoing(&self, peer: &Arc<Peer>, datagram: &[u8]) {
        let Ok(parsed) = record::parse_datagram(datagram) else {
            return;
        };
        let mut promote = false;
        {
            let mut st = lock(&peer.state);
            if st.phase != Phase::Handshaking {
                return;
            }
            if let FirstRecord::ServerHello { cipher_suite } = parsed.first {
                st.cipher_suite = cipher_suite.or(st.cipher_suite);
                promote = !st.server_hello_sent;
                st.server_hello_sent = true;
            }
            if self.settings.final_flight_resend
                && (st.capturing_final_flight || parsed.contains_change_cipher_spec)
            {
                st.capturing_final_flight = true;
                if st.final_flight.datagrams.len() < FINAL_FLIGHT_MAX_DATAGRAMS {
                    st.final_flight.datagrams.push(datagram.to_vec());
                }
            }
        }
        if promote {
            self.promote(peer);
        }
    }

    async fn sweep_loop(self: Arc<Self>) {
        let shortest = self.settings.idle_timeout.min(
            self.settings
                .tombstone_duration
                .max(Duration::from_millis(40)),
        );
        let interval = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stopped| *stopped) => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = Instant::now();
            let mut idle = Vec::new();
            {
                let mut table = lock(&self.table);
                let mut expired_tombstones = 0usize;
                table.slots.retain(|_, slot| match slot {
                    Slot::Tombstone(t) => {
                        let keep = t.until > now;
                        if !keep {
                            expired_tombstones += 1;
                        }
                        keep
                    }
                    Slot::Live { primary, .. } => {
                        let mut st = lock(&primary.state);
                        if st.phase == Phase::Established {
                            if !st.final_flight.is_held(now) {
                                st.final_flight.release();
                            }
                            if now.duration_since(st.last_activity) >= self.settings.idle_timeout {
                                idle.push(Arc::clone(primary));
                            }
                        }
                        true
                    }
                });
                table.tombstones = table.tombstones.saturating_sub(expired_tombstones);
            }
            for peer in idle {
                let conn = lock(&peer.state).conn.upgrade();
                bump(&self.counters.sessions_idle_closed);
                self.remove_peer(&peer, CloseReason::IdleTimeout, false);
                if let Some(conn) = conn {
                    // Sends close_notify and stops the engine's reader task.
                    tokio::spawn(async move {
                        let _ = conn.close().await;
                    });
                }
            }
        }
    }
}

fn push_retired(retired: &mut Vec<ClientRandom>, random: ClientRandom) {
    if retired.contains(&random) {
        return;
    }
    if retired.len() >= RETIRED_RANDOMS_PER_ADDRESS {
        retired.remove(0);
    }
    retired.push(random);
}

/// The virtual connection webrtc-dtls runs on: inbound datagrams come from the demultiplexer's
/// queue, outbound ones go straight to the shared socket (observed on the way).
struct PeerConn {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
}

#[async_trait]
impl Conn for PeerConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("not applicable".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let mut rx = self.peer.inbound_rx.lock().await;
        match rx.recv().await {
            Some(datagram) => {
                let n = datagram.len().min(buf.len());
                buf.get_mut(..n)
                    .unwrap_or(&mut [])
                    .copy_from_slice(datagram.get(..n).unwrap_or(&[]));
                Ok(n)
            }
            // Never an error: webrtc-dtls's reader loop spins on errors. Its task ends when the
            // DTLSConn is closed or dropped.
            None => std::future::pending().await,
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.peer.addr))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if self.peer.superseded.load(Ordering::SeqCst) {
            return Ok(buf.len());
        }
        self.shared.observe_outgoing(&self.peer, buf);
        Ok(self.shared.socket.send_to(buf, self.peer.addr).await?)
    }

    async fn send_to(&self, _buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other("not applicable".into()))
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.shared.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer.addr)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// An established, mutually authenticated DTLS session with one peer.
pub struct DtlsSession {
    conn: Arc<DTLSConn>,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    peer_certificates: Vec<Vec<u8>>,
    peer_verification: Option<PeerVerification>,
    cipher_suite: Option<CipherSuiteName>,
}

impl std::fmt::Debug for DtlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsSession")
            .field("peer_addr", &self.peer.addr)
            .field("cipher_suite", &self.cipher_suite)
            .field("peer_certificates", &self.peer_certificates.len())
            .finish()
    }
}

impl DtlsSession {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer.addr
    }

    /// The client's certificates, DER, leaf first, as sent and verified in the handshake.
    pub fn peer_certificates(&self) -> &[Vec<u8>] {
        &self.peer_certificates
    }

    /// What the configured [`ClientChainVerifier`] established for [`Self::peer_certificates`]
    /// (`None` without one).
    pub fn peer_verification(&self) -> Option<&PeerVerification> {
        self.peer_verification.as_ref()
    }

    /// The negotiated suite (read from our ServerHello on its way out).
    pub fn cipher_suite(&self) -> Option<CipherSuiteName> {
        self.cipher_suite
    }

    /// Receive one plaintext datagram. `Err(Closed)` once the session ended (peer close_notify
    /// or fatal alert, idle timeout, replacement, shutdown, our own close).
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut closed = self.peer.closed.subscribe();
        if let Some(reason) = *closed.borrow_and_update() {
            return Err(TransportError::Closed(reason));
        }
        tokio::select! {
            read = self.conn.read(buf, None) => match read {
                Ok(n) => Ok(n),
                Err(webrtc_dtls::Error::ErrBufferTooSmall) => Err(TransportError::BufferTooSmall),
                Err(e) => {
                    if let Some(reason) = self.peer.close_reason() {
                        return Err(TransportError::Closed(reason));
                    }
                    tracing::debug!(peer = %self.peer.addr, error = %e, "DTLS session ended");
                    self.shared.remove_peer(&self.peer, CloseReason::PeerClosed, false);
                    Err(TransportError::Closed(self.peer.close_reason().unwrap_or(CloseReason::PeerClosed)))
                }
            },
            _ = closed.wait_for(Option::is_some) => Err(TransportError::Closed(
                self.peer.close_reason().unwrap_or(CloseReason::LocalClose),
            )),
        }
    }

    /// Send one plaintext datagram (at most `mtu_bytes`; application data is never fragmented).
    pub async fn send(&self, datagram: &[u8]) -> Result<(), TransportError> {
        if let Some(reason) = self.peer.close_reason() {
            return Err(TransportError::Closed(reason));
        }
        let max_bytes = self.shared.settings.mtu_bytes;
        if datagram.len() > max_bytes {
            return Err(TransportError::DatagramTooLarge {
                len: datagram.len(),
                max_bytes,
            });
        }
        self.peer.touch(Instant::now());
        self.conn
            .write(datagram, None)
            .await
            .map(|_| ())
            .map_err(|e| TransportError::Dtls(e.to_string()))
    }

    /// Send close_notify and forget the peer (its saved final flight survives in the tombstone).
    pub async fn close(&self) {
        if self.peer.close_reason().is_none() {
            let _ = self.conn.close().await;
        }
        self.shared
            .remove_peer(&self.peer, CloseReason::LocalClose, false);
    }
}

impl Drop for DtlsSession {
    fn drop(&mut self) {
        if self.peer.phase() != Phase::Dead {
            self.shared
                .remove_peer(&self.peer, CloseReason::LocalClose, false);
        }
    }
}
