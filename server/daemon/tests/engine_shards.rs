//! `engine_shards` > 1 over real UDP: a dispatcher hands datagrams to several est-dtls
//! endpoints. Sessions spread over the shards, each echoes, and a meter that moves to another
//! source port mid-session keeps its session by Connection ID, whichever shard its new address
//! hashes to; one device identity holds at most `max_sessions_per_identity` sessions across all
//! the shards, also when the shard holding the oldest session has a full command queue (the
//! supersede waits for room and is applied once it drains, or ends with the listener). The
//! meters are est-dtls's own client mode, driven here over tokio sockets.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod transport_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use est_dtls::{Client, ClientConfig, CloseReason, ConnEvent, SigningKey, Verified};
use est_server::transport::{
    DatagramSocket, DtlsListener, DtlsServerConfig, DtlsSession, TransportError,
};
use tokio::net::UdpSocket;
use transport_support::TestPki;

const METERS: usize = 24;
const SHARDS: usize = 4;

async fn start(config: DtlsServerConfig) -> (Arc<DtlsListener>, SocketAddr) {
    let listener = Arc::new(
        DtlsListener::bind_udp("127.0.0.1:0".parse().unwrap(), config)
            .await
            .expect("bind"),
    );
    let addr = listener.local_addr().unwrap();
    let l = Arc::clone(&listener);
    tokio::spawn(async move {
        while let Ok(session) = l.accept().await {
            tokio::spawn(echo(session));
        }
    });
    (listener, addr)
}

async fn echo(session: DtlsSession) {
    while let Ok(d) = session.recv_datagram().await {
        if session.send(&d).await.is_err() {
            break;
        }
    }
}

fn client_config(pki: &TestPki) -> Arc<ClientConfig> {
    client_config_of(
        &pki.device,
        vec![pki.device.cert_der.clone(), pki.device_sub_ca_der.clone()],
    )
}

/// A meter with `device`'s key, sending `chain`.
fn client_config_of(device: &transport_support::Issued, chain: Vec<Vec<u8>>) -> Arc<ClientConfig> {
    let key = SigningKey::from_pkcs8(&device.key_pkcs8_der).expect("device key");
    // The server's authentication is not what is tested here.
    let accept_any: est_dtls::ChainVerifier = Arc::new(|_chain: &[Vec<u8>]| {
        Ok(Verified {
            identity: Vec::new(),
            context: None,
            leaf: None,
        })
    });
    let mut c = ClientConfig::new(chain, Arc::new(key), accept_any);
    c.connection_id = Some(Vec::new());
    Arc::new(c)
}

/// One meter: a sans-IO client and the socket it currently sends from.
struct Meter {
    client: Client,
    socket: UdpSocket,
    received: Vec<Vec<u8>>,
    /// How the session ended, if it did.
    closed: Option<CloseReason>,
    /// Datagrams received from the server.
    datagrams_in: usize,
}

impl Meter {
    async fn connect(server: SocketAddr, config: Arc<ClientConfig>) -> Meter {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = Client::connect(Instant::now(), server, config).expect("client");
        let mut m = Meter {
            client,
            socket,
            received: Vec::new(),
            closed: None,
            datagrams_in: 0,
        };
        m.run_until(|m| m.client.is_established()).await;
        m
    }

    fn flush(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(d) = self.client.poll_transmit() {
            out.push(d);
        }
        out
    }

    /// Drives the client (sends, timers, receives) until `done`, for at most 20 s. A session
    /// that ends before `done` fails the test.
    async fn run_until(&mut self, done: impl Fn(&Meter) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 2048];
        loop {
            for d in self.flush() {
                self.socket.send_to(&d, self.client.server()).await.unwrap();
            }
            while let Some(ev) = self.client.poll_event() {
                match ev {
                    ConnEvent::Data(d) => self.received.push(d),
                    ConnEvent::Closed(r) => self.closed = Some(r),
                    _ => {}
                }
            }
            if done(self) {
                return;
            }
            if let Some(r) = &self.closed {
                panic!("session closed: {r:?}");
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            let wake = self
                .client
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = r.unwrap();
                    self.datagrams_in += 1;
                    self.client.handle_datagram(Instant::now(), from, &buf[..n]);
                }
                _ = tokio::time::sleep_until(wake) => self.client.handle_timeout(Instant::now()),
            }
        }
    }

    async fn echo(&mut self, payload: &[u8]) {
        let before = self.received.len();
        self.client.send(Instant::now(), payload).expect("send");
        self.run_until(|m| m.received.len() > before).await;
        assert_eq!(self.received.last().map(Vec::as_slice), Some(payload));
    }

    /// As a NAT rebinding: the same session from a new source port.
    async fn rebind(&mut self) {
        self.socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_shards_and_keep_their_shard_across_a_port_change() {
    let pki = TestPki::generate();
    let config = DtlsServerConfig {
        engine_shards: SHARDS,
        // Every meter here has the same certificate.
        max_sessions_per_identity: 1000,
        ..pki.server_config()
    };
    let (listener, server) = start(config).await;
    let cfg = client_config(&pki);

    let mut meters = Vec::new();
    for _ in 0..METERS {
        meters.push(Meter::connect(server, Arc::clone(&cfg)).await);
    }
    for (i, m) in meters.iter_mut().enumerate() {
        m.echo(format!("before {i}").as_bytes()).await;
    }
    let per_shard: Vec<u64> = listener
        .shard_metrics()
        .iter()
        .map(|m| m.sessions_now)
        .collect();
    assert_eq!(per_shard.len(), SHARDS);
    assert_eq!(
        per_shard.iter().sum::<u64>(),
        METERS as u64,
        "{per_shard:?}"
    );
    // A keyed hash of 24 source ports over 4 shards: more than one shard serves (all on one
    // has probability 4 x (1/4)^24).
    assert!(
        per_shard.iter().filter(|&&n| n > 0).count() > 1,
        "{per_shard:?}"
    );

    // Every meter moves to a new port (most land on another shard by hash): the CID's shard
    // byte routes their records home, and the session goes on without a new handshake.
    for (i, m) in meters.iter_mut().enumerate() {
        m.rebind().await;
        m.echo(format!("after {i}").as_bytes()).await;
    }
    let total = listener.metrics();
    assert_eq!(total.peer_address_changes, METERS as u64);
    assert_eq!(total.handshakes_completed, METERS as u64);
    assert_eq!(total.sessions_now, METERS as u64);
    assert_eq!(total.dropped_queue_full, 0);
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_is_shared_out_among_shards() {
    let pki = TestPki::generate();
    let config = DtlsServerConfig {
        engine_shards: 2,
        max_sessions: 4,
        max_half_open_handshakes: 4,
        max_sessions_per_identity: 1000,
        ..pki.server_config()
    };
    let (listener, server) = start(config).await;
    let cfg = client_config(&pki);
    // Each shard holds at most 2; keep connecting until one shard is full and refuses.
    let mut meters = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = Client::connect(Instant::now(), server, Arc::clone(&cfg)).unwrap();
        let mut m = Meter {
            client,
            socket,
            received: Vec::new(),
            closed: None,
            datagrams_in: 0,
        };
        let outcome = tokio::spawn(async move {
            m.run_until(|m| m.client.is_established()).await;
            m
        })
        .await;
        match outcome {
            Ok(m) => meters.push(m),
            Err(_) => refused += 1,
        }
    }
    let per_shard: Vec<u64> = listener
        .shard_metrics()
        .iter()
        .map(|m| m.sessions_now)
        .collect();
    assert!(per_shard.iter().all(|&n| n <= 2), "{per_shard:?}");
    assert_eq!(meters.len() as u64, per_shard.iter().sum::<u64>());
    assert!(
        meters.len() <= 4 && refused >= 8,
        "{} held, {refused} refused",
        meters.len()
    );
    assert!(listener.metrics().dropped_over_limit >= 8);
    listener.shutdown().await;
}

/// Waits (up to 5 s) until the shards' metrics show `completed` handshakes and `expected`
/// established sessions in all. A shard publishes its metrics after handling the events of a
/// datagram, a moment after the client saw its Finished; a superseded session on another shard
/// closes when that shard takes the command.
async fn settle(listener: &DtlsListener, completed: u64, expected: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = listener.metrics();
        let now = m.sessions_now;
        if m.handshakes_completed == completed && now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} sessions held after {} handshakes, {expected} expected after {completed}; \
             per shard {:?}",
            m.handshakes_completed,
            listener
                .shard_metrics()
                .iter()
                .map(|m| m.sessions_now)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_holds_at_most_its_limit_across_all_shards() {
    const LIMIT: usize = 2;
    const OPENED: usize = 12;
    let pki = TestPki::generate();
    let config = DtlsServerConfig {
        engine_shards: SHARDS,
        max_sessions_per_identity: LIMIT,
        // Two devices, two identities (the SHA-256 of each leaf): the test device and the
        // "rogue" one, whose root is trusted here.
        client_trust_anchors_der: vec![pki.root_der.clone(), pki.rogue_root_der.clone()],
        ..pki.server_config()
    };
    let (listener, server) = start(config).await;
    let cfg = client_config(&pki);

    // One device opens session after session, each from a new source port (a keyed hash of
    // the port picks its shard). After each, the identity holds min(opened, LIMIT) in all.
    let mut meters = Vec::new();
    for i in 0..OPENED {
        meters.push(Meter::connect(server, Arc::clone(&cfg)).await);
        settle(&listener, (i + 1) as u64, (i + 1).min(LIMIT) as u64).await;
    }
    let total = listener.metrics();
    assert_eq!(total.handshakes_completed, OPENED as u64);
    assert_eq!(total.sessions_superseded, (OPENED - LIMIT) as u64);
    assert_eq!(total.sessions_now, LIMIT as u64);
    let shards = listener.shard_metrics();
    // The sessions were spread over the shards (all 12 on one: probability 4 x (1/4)^12), so
    // the limit held across shards, not within one.
    assert!(
        shards.iter().filter(|m| m.handshakes_completed > 0).count() > 1,
        "{shards:?}"
    );
    // The oldest went, each told with close_notify; the newest LIMIT still work.
    for m in &mut meters[..OPENED - LIMIT] {
        m.run_until(|m| m.closed.is_some()).await;
        assert_eq!(m.closed, Some(CloseReason::PeerClosed));
    }
    for (i, m) in meters[OPENED - LIMIT..].iter_mut().enumerate() {
        m.echo(format!("newest {i}").as_bytes()).await;
    }

    // Another meter (another identity) gets in, and its sessions count apart: LIMIT of them
    // close none of the first device's, nor each other.
    let other_cfg = client_config_of(&pki.rogue_device, vec![pki.rogue_device.cert_der.clone()]);
    let mut others = Vec::new();
    for i in 0..LIMIT {
        others.push(Meter::connect(server, Arc::clone(&other_cfg)).await);
        settle(&listener, (OPENED + i + 1) as u64, (LIMIT + i + 1) as u64).await;
    }
    for (i, m) in others.iter_mut().enumerate() {
        m.echo(format!("other {i}").as_bytes()).await;
    }
    for (i, m) in meters[OPENED - LIMIT..].iter_mut().enumerate() {
        m.echo(format!("newest again {i}").as_bytes()).await;
    }
    let total = listener.metrics();
    assert_eq!(total.sessions_superseded, (OPENED - LIMIT) as u64);
    assert_eq!(total.sessions_now, 2 * LIMIT as u64);
    listener.shutdown().await;
}

/// The server's UDP socket, with a gate: while `hold` names an address, a send to it waits
/// (as a send on a full socket buffer would), so the engine shard that sends there stalls in
/// its flush and takes no commands.
struct GatedSocket {
    inner: UdpSocket,
    hold: tokio::sync::watch::Sender<Option<SocketAddr>>,
    /// Sends waiting at the gate now.
    waiting: AtomicUsize,
}

#[async_trait]
impl DatagramSocket for GatedSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.inner.recv_from(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> std::io::Result<usize> {
        let mut hold = self.hold.subscribe();
        let held = *hold.borrow_and_update() == Some(target);
        if held {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _ = hold.wait_for(|h| *h != Some(target)).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.send_to(buf, target).await
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Waits (up to 5 s) for `cond`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two shards, one identity limited to one session, command queues of one: the old session's
/// shard (X) stalled at the gate with its queue full, and a new session of the same device on
/// the other shard (Y), whose supersede of the old one waits for room on X's queue.
struct Deferred {
    gated: Arc<GatedSocket>,
    listener: DtlsListener,
    old: Meter,
    old_session: DtlsSession,
    new: Meter,
    new_session: DtlsSession,
}

async fn deferred_supersede() -> Deferred {
    let pki = TestPki::generate();
    let config = DtlsServerConfig {
        engine_shards: 2,
        max_sessions_per_identity: 1,
        command_queue_len: 1,
        ..pki.server_config()
    };
    let gated = Arc::new(GatedSocket {
        inner: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        hold: tokio::sync::watch::channel(None).0,
        waiting: AtomicUsize::new(0),
    });
    let listener = DtlsListener::bind(Arc::clone(&gated), config)
        .await
        .expect("bind");
    let server = listener.local_addr().unwrap();
    let cfg = client_config(&pki);

    // The old session, on the shard its source port hashes to (X).
    let old = Meter::connect(server, Arc::clone(&cfg)).await;
    let old_session = listener.accept().await.unwrap();
    settle(&listener, 1, 1).await;

    // Stall X: it sends a datagram to the old meter and waits at the gate ...
    gated
        .hold
        .send_replace(Some(old.socket.local_addr().unwrap()));
    old_session.send(b"one").await.unwrap();
    eventually("shard X waits at the gate", || {
        gated.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    // ... so the next command fills its queue (room for one), where it stays.
    tokio::time::timeout(Duration::from_secs(1), old_session.send(b"two"))
        .await
        .expect("room for one command")
        .unwrap();

    // A new session of the same device on the other shard (Y). A meter whose port hashes to X
    // gets no answer while X is stalled: try other ports until one is answered.
    let mut new = None;
    for _ in 0..30 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = Client::connect(Instant::now(), server, Arc::clone(&cfg)).unwrap();
        let mut m = Meter {
            client,
            socket,
            received: Vec::new(),
            closed: None,
            datagrams_in: 0,
        };
        let answered = tokio::time::timeout(
            Duration::from_millis(1500),
            m.run_until(|m| m.datagrams_in > 0),
        )
        .await;
        if answered.is_ok() {
            m.run_until(|m| m.client.is_established()).await;
            new = Some(m);
            break;
        }
    }
    let new = new.expect("a port that hashes to the shard that is not stalled");
    let new_session = listener.accept().await.unwrap();

    // Y counted the new session, pushed the old one out of the registry and found X's queue
    // full: the supersede waits for room.
    eventually("the supersede is deferred", || {
        listener.metrics().supersedes_deferred == 1
    })
    .await;
    // Not applied yet: X is still stalled, the old session open (the identity is one over).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), old_session.recv_datagram())
            .await
            .is_err(),
        "the old session ended before its shard took the supersede"
    );
    assert_eq!(listener.metrics().sessions_superseded, 0);
    Deferred {
        gated,
        listener,
        old,
        old_session,
        new,
        new_session,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supersede_that_finds_the_other_shards_command_queue_full_is_applied_once_it_drains() {
    let Deferred {
        gated,
        listener,
        mut old,
        old_session,
        mut new,
        new_session,
    } = deferred_supersede().await;

    // Release X: it sends both datagrams, takes the waiting supersede and closes the old
    // session with close_notify.
    gated.hold.send_replace(None);
    old.run_until(|m| m.closed.is_some()).await;
    assert_eq!(old.received, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(old.closed, Some(CloseReason::PeerClosed));
    match old_session.recv_datagram().await {
        Err(TransportError::Closed(CloseReason::Superseded)) => {}
        other => panic!("the old session should end superseded: {other:?}"),
    }
    // The identity is back within its limit; the new session works.
    settle(&listener, 2, 1).await;
    let total = listener.metrics();
    assert_eq!(total.sessions_superseded, 1);
    assert_eq!(total.supersedes_deferred, 1);
    tokio::spawn(echo(new_session));
    new.echo(b"still here").await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supersede_still_waiting_at_shutdown_ends_with_the_listener() {
    let runtime = tokio::runtime::Handle::current().metrics();
    assert_eq!(runtime.num_alive_tasks(), 0);
    let Deferred {
        gated,
        listener,
        mut old,
        old_session,
        new: _new,
        new_session: _new_session,
    } = deferred_supersede().await;
    // The dispatcher, two shard drivers and the waiting supersede.
    assert_eq!(runtime.num_alive_tasks(), 4);

    // Shutdown begins while X is still stalled; X gets out of its send a moment later, sees
    // the flag before its queue and closes every session it holds for the shutdown: the
    // supersede is never applied, and its task ends when X drops its queue.
    let release = Arc::clone(&gated);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.hold.send_replace(None);
    });
    listener.shutdown().await;
    old.run_until(|m| m.closed.is_some()).await;
    assert_eq!(old.closed, Some(CloseReason::PeerClosed));
    match old_session.recv_datagram().await {
        Err(TransportError::Closed(CloseReason::Shutdown)) => {}
        other => panic!("the old session should end with the shutdown: {other:?}"),
    }
    let total = listener.metrics();
    assert_eq!(total.supersedes_deferred, 1);
    assert_eq!(total.sessions_superseded, 0);
    // Nothing outlives the listener: no task is left waiting for room.
    eventually("every task ended", || runtime.num_alive_tasks() == 0).await;
    drop(listener);
}
