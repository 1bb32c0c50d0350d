//! The front door under attack (issue #10, "Admission control ... Bar"): the machinery that
//! `tests/front_door.rs` and the `front-door` binary drive against a real `est-server` process
//! over real UDP on loopback.
//!
//! ```text
//!   flood()            one thread: ClientHellos without a cookie from many 127.1.x.y sources
//!   SilentPeer         echoes the cookie (ClientHello, HelloVerifyRequest, ClientHello + cookie)
//!                      and then says nothing: a half-open handshake held by the server
//!   open_sessions()    one device's credentials, many completed handshakes kept open
//!   enroll()           a legitimate meter: client-sim's EST meter on the native DTLS backend
//!   ServerProcess      `est-server run` as a child: its address, RSS, metrics log, socket drops
//! ```
//!
//! Every source address is in 127.0.0.0/8 (Linux lets a socket bind any of them without setup),
//! every loop is bounded in count and time.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use client_sim::driver::{run_meter_over, DriverConfig, MeterOutcome};
use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use client_sim::meter::{Meter, MeterConfig};
use client_sim::pki::DeviceIdentity;
use est_dtls::wire::{self, content_type as ct, extension_type as ext, handshake_type as hs};
use est_dtls::{Client, ClientConfig, SigningKey, Verified};
use est_proto::coap::ClientConfig as CoapClientConfig;

// ---------------------------------------------------------------------------------------------
// Knobs
// ---------------------------------------------------------------------------------------------

/// `name` from the environment as a number, else `default` (a measurement run sets these).
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Source address number `i` of `block`: 127.`block`.x.y, y in 1..=254.
pub fn source_ip(block: u8, i: usize) -> Ipv4Addr {
    let hi = u8::try_from((i / 254) % 256).unwrap_or(0);
    let lo = u8::try_from(i % 254 + 1).unwrap_or(1);
    Ipv4Addr::new(127, block, hi, lo)
}

// ---------------------------------------------------------------------------------------------
// ClientHellos
// ---------------------------------------------------------------------------------------------

/// Bytes 27..59 of a ClientHello datagram: record header (13) + handshake header (12) +
/// client_version (2), then the 32-byte random.
pub const RANDOM_OFFSET: usize = wire::RECORD_HEADER_LEN + wire::HANDSHAKE_HEADER_LEN + 2;

/// A ClientHello the server admits past its cookie: DTLS 1.2, CCM_8 and GCM, secp256r1,
/// ecdsa_secp256r1_sha256, extended_master_secret (what a meter offers).
pub fn client_hello(random: [u8; 32], cookie: &[u8]) -> wire::ClientHello {
    wire::ClientHello {
        client_version: wire::DTLS_1_2,
        random,
        session_id: Vec::new(),
        cookie: cookie.to_vec(),
        cipher_suites: vec![0xC0AE, 0xC02B],
        compression_methods: vec![0],
        extensions: vec![
            wire::Extension {
                typ: ext::SUPPORTED_GROUPS,
                data: wire::supported_groups_body(&[23]),
            },
            wire::Extension {
                typ: ext::EC_POINT_FORMATS,
                data: vec![1, 0],
            },
            wire::Extension {
                typ: ext::SIGNATURE_ALGORITHMS,
                data: wire::signature_algorithms_body(&[0x0403]),
            },
            wire::Extension {
                typ: ext::EXTENDED_MASTER_SECRET,
                data: Vec::new(),
            },
        ],
    }
}

/// One datagram holding `ch` whole: handshake message `message_seq`, record sequence
/// `record_seq`, epoch 0.
pub fn client_hello_datagram(ch: &wire::ClientHello, message_seq: u16, record_seq: u64) -> Vec<u8> {
    let msg = wire::handshake_message(hs::CLIENT_HELLO, message_seq, &ch.encode());
    let mut out = Vec::with_capacity(wire::RECORD_HEADER_LEN + msg.len());
    wire::push_record(
        &mut out,
        ct::HANDSHAKE,
        wire::DTLS_1_0,
        0,
        record_seq,
        &[],
        &msg,
    );
    out
}

/// The first handshake message type of an epoch-0 handshake record, if `datagram` starts
/// with one.
pub fn first_handshake_type(datagram: &[u8]) -> Option<u8> {
    let (rec, _) = wire::parse_record(datagram, 0).ok()?;
    if rec.content_type != ct::HANDSHAKE || rec.epoch != 0 {
        return None;
    }
    rec.fragment.first().copied()
}

/// The cookie of a HelloVerifyRequest datagram.
pub fn hello_verify_cookie(datagram: &[u8]) -> Option<Vec<u8>> {
    let (rec, _) = wire::parse_record(datagram, 0).ok()?;
    let frags = wire::parse_handshake_fragments(rec.fragment).ok()?;
    let f = frags.into_iter().next()?;
    if f.msg_type != hs::HELLO_VERIFY_REQUEST || !f.is_complete() {
        return None;
    }
    Some(wire::HelloVerifyRequest::parse(f.body).ok()?.cookie)
}

// ---------------------------------------------------------------------------------------------
// 1. Spoofed ClientHello flood
// ---------------------------------------------------------------------------------------------

/// What [`flood`] does.
#[derive(Clone, Debug)]
pub struct FloodConfig {
    pub server: SocketAddr,
    /// Stop after this long (or when the stop flag is set).
    pub duration: Duration,
    /// ClientHellos per second; 0: as fast as one thread can send.
    pub rate_per_sec: u64,
    /// Distinct source addresses (127.1.x.y), one socket each (at most [`socket_budget`]).
    pub sources: usize,
    /// Sockets re-bound (a new ephemeral port) after each pass over all of them.
    pub rebind_per_pass: usize,
}

/// What [`flood`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    pub sent: u64,
    /// Sends the kernel refused (ENOBUFS, EAGAIN): not counted in `sent`.
    pub send_errors: u64,
    pub elapsed: Duration,
    pub sources: usize,
    /// Distinct (address, port) pairs used.
    pub source_ports: u64,
    pub datagram_bytes: usize,
}

impl FloodReport {
    /// ClientHellos sent per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sockets this process may open for sources: its open-files limit (`/proc/self/limits`) less
/// 1,024 for the runtime, the meters and the test harness.
pub fn socket_budget() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    soft.saturating_sub(1024).max(64)
}

fn bind_source(ip: Ipv4Addr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(ip, 0))?;
    // The generator never reads: the HelloVerifyRequests pile up and the kernel drops them.
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends ClientHellos without a cookie (each with its own random) to `cfg.server` from
/// `cfg.sources` addresses in 127.1.0.0/16, round-robin, from the calling thread, until
/// `cfg.duration` has passed or `stop` is set. Never reads an answer (a spoofer gets none).
pub fn flood(cfg: &FloodConfig, stop: &AtomicBool) -> io::Result<FloodReport> {
    let sources = cfg.sources.clamp(1, 65_000).min(socket_budget());
    let mut sockets = (0..sources)
        .map(|i| bind_source(source_ip(1, i)))
        .collect::<io::Result<Vec<_>>>()?;
    let mut datagram = client_hello_datagram(&client_hello([0x5A; 32], &[]), 0, 0);
    let mut report = FloodReport {
        sources,
        source_ports: sources as u64,
        datagram_bytes: datagram.len(),
        ..FloodReport::default()
    };
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut counter: u64 = 0;
    let mut rebind_next = 0usize;
    'outer: loop {
        for sock in &sockets {
            counter += 1;
            if let Some(r) = datagram.get_mut(RANDOM_OFFSET..RANDOM_OFFSET + 8) {
                r.copy_from_slice(&counter.to_be_bytes());
            }
            match sock.send_to(&datagram, cfg.server) {
                Ok(_) => report.sent += 1,
                Err(_) => report.send_errors += 1,
            }
            if counter.is_multiple_of(256) {
                let now = Instant::now();
                if now >= deadline || stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                if cfg.rate_per_sec > 0 {
                    // Ahead of schedule: sleep until the schedule catches up.
                    let due = Duration::from_secs_f64(report.sent as f64 / cfg.rate_per_sec as f64);
                    let at = start + due;
                    if at > now {
                        std::thread::sleep((at - now).min(deadline - now));
                    }
                }
            }
        }
        // New ports for a few sources each pass.
        for _ in 0..cfg.rebind_per_pass.min(sources) {
            let i = rebind_next % sources;
            rebind_next += 1;
            if let (Ok(s), Some(slot)) = (bind_source(source_ip(1, i)), sockets.get_mut(i)) {
                *slot = s;
                report.source_ports += 1;
            }
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// 2. Cookie-echoing silent peers
// ---------------------------------------------------------------------------------------------

/// A peer that completes the cookie exchange and then stays silent: the server holds a
/// half-open handshake for it (and sends it flight 4, which it ignores).
pub struct SilentPeer {
    socket: UdpSocket,
    server: SocketAddr,
    exchanges: u64,
}

/// How one cookie exchange of a [`SilentPeer`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// The server answered the cookie with its ServerHello: a half-open handshake is held.
    Admitted,
    /// No HelloVerifyRequest came.
    NoHelloVerify,
    /// The cookie was sent but no ServerHello came (refused or dropped by a limit).
    NotAdmitted,
}

impl SilentPeer {
    /// A peer on its own address 127.2.x.y (`index`).
    pub fn new(index: usize, server: SocketAddr) -> io::Result<SilentPeer> {
        let socket = UdpSocket::bind(SocketAddrV4::new(source_ip(2, index), 0))?;
        Ok(SilentPeer {
            socket,
            server,
            exchanges: 0,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Throws away whatever the server sent before (flight 4 retransmissions).
    fn drain(&self) -> io::Result<()> {
        let mut buf = [0u8; 2048];
        self.socket.set_nonblocking(true)?;
        while self.socket.recv_from(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false)
    }

    /// Waits up to `within` for a datagram from the server whose first handshake message is
    /// `msg_type` (e.g. a retransmitted ServerHello); returns it.
    pub fn wait_for(&self, msg_type: u8, within: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) if from == self.server => {
                    let d = buf.get(..n).unwrap_or_default();
                    if first_handshake_type(d) == Some(msg_type) {
                        return Ok(Some(d.to_vec()));
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One cookie exchange with a fresh random: ClientHello, HelloVerifyRequest, ClientHello
    /// with the cookie; then waits (up to `within`) for the ServerHello and says nothing more.
    pub fn echo_cookie(&mut self, within: Duration) -> io::Result<Echo> {
        self.drain()?;
        self.exchanges += 1;
        // Unique per exchange: the exchange number and the peer's address.
        let mut random = [0u8; 32];
        let mut tag = self.exchanges.to_be_bytes().to_vec();
        tag.extend_from_slice(self.socket.local_addr()?.to_string().as_bytes());
        for (r, t) in random.iter_mut().zip(tag) {
            *r = t;
        }
        let ch = client_hello(random, &[]);
        self.socket
            .send_to(&client_hello_datagram(&ch, 0, 0), self.server)?;
        let Some(hvr) = self.wait_for(hs::HELLO_VERIFY_REQUEST, within)? else {
            return Ok(Echo::NoHelloVerify);
        };
        let Some(cookie) = hello_verify_cookie(&hvr) else {
            return Ok(Echo::NoHelloVerify);
        };
        let ch2 = client_hello(random, &cookie);
        self.socket
            .send_to(&client_hello_datagram(&ch2, 1, 1), self.server)?;
        Ok(match self.wait_for(hs::SERVER_HELLO, within)? {
            Some(_) => Echo::Admitted,
            None => Echo::NotAdmitted,
        })
    }
}

/// Counts of a run of cookie exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoCounts {
    pub admitted: u64,
    pub no_hello_verify: u64,
    pub not_admitted: u64,
    pub io_errors: u64,
}

impl EchoCounts {
    pub fn add(&mut self, r: io::Result<Echo>) {
        match r {
            Ok(Echo::Admitted) => self.admitted += 1,
            Ok(Echo::NoHelloVerify) => self.no_hello_verify += 1,
            Ok(Echo::NotAdmitted) => self.not_admitted += 1,
            Err(_) => self.io_errors += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.admitted + self.no_hello_verify + self.not_admitted + self.io_errors
    }
}

/// Keeps the half-open slots churning: `peers` exchange their cookie again, round-robin,
/// at most `rate_per_sec` exchanges a second (0: as fast as one thread can), until `stop` is
/// set or `within` has passed. Each new admission past the cap evicts the oldest half-open
/// handshake, which may be a meter's.
pub fn churn(
    peers: &mut [SilentPeer],
    rate_per_sec: u64,
    within: Duration,
    stop: &AtomicBool,
) -> (EchoCounts, Duration) {
    let mut counts = EchoCounts::default();
    let start = Instant::now();
    let deadline = start + within;
    if peers.is_empty() {
        return (counts, Duration::ZERO);
    }
    let mut i = 0usize;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let n = peers.len();
        if let Some(p) = peers.get_mut(i % n) {
            counts.add(p.echo_cookie(Duration::from_secs(1)));
        }
        i += 1;
        if rate_per_sec > 0 {
            let at = start + Duration::from_secs_f64(counts.total() as f64 / rate_per_sec as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep((at - now).min(deadline.saturating_duration_since(now)));
            }
        }
    }
    (counts, start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// 3. One identity, many sessions
// ---------------------------------------------------------------------------------------------

/// A completed handshake kept open (our engine's client mode over its own UDP socket).
pub struct HeldSession {
    pub socket: tokio::net::UdpSocket,
    pub client: Client,
}

/// The engine's client configuration for `device` (server certificate not checked: this is
/// the attacker's side).
pub fn attacker_config(device: &DeviceIdentity) -> Result<Arc<ClientConfig>> {
    let key = SigningKey::from_pkcs8(&device.key_pkcs8_der)
        .map_err(|e| anyhow::anyhow!("device key: {e}"))?;
    let mut c = ClientConfig::new(
        device.cert_chain_der.clone(),
        Arc::new(key),
        Arc::new(|_chain: &[Vec<u8>]| {
            Ok(Verified {
                identity: Vec::new(),
                context: None,
                leaf: None,
            })
        }),
    );
    c.retransmit = est_dtls::RetransmitConfig {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(4),
    };
    c.handshake_timeout = Duration::from_secs(20);
    Ok(Arc::new(c))
}

/// One full handshake from `bind` to `server`; the session is returned open.
pub async fn handshake(
    bind: SocketAddr,
    server: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<HeldSession> {
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    let mut client =
        Client::connect(Instant::now(), server, config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(d) = client.poll_transmit() {
            socket.send_to(&d, server).await?;
        }
        if client.is_established() {
            return Ok(HeldSession { socket, client });
        }
        if client.is_closed() {
            bail!("handshake from {bind} failed");
        }
        let wake = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(deadline);
        match tokio::time::timeout_at(wake.into(), socket.recv_from(&mut buf)).await {
            Ok(r) => {
                let (n, from) = r?;
                client.handle_datagram(Instant::now(), from, buf.get(..n).unwrap_or_default());
            }
            Err(_) => {
                if Instant::now() >= deadline {
                    bail!("handshake from {bind} timed out");
                }
                client.handle_timeout(Instant::now());
            }
        }
    }
}

/// What [`open_sessions`] left.
#[derive(Default)]
pub struct OpenedSessions {
    /// Handshakes completed.
    pub opened: usize,
    /// Sessions the server closed with close_notify (their sockets are let go).
    pub closed_by_server: usize,
    /// Sessions still open as far as the client knows.
    pub open: Vec<HeldSession>,
}

impl OpenedSessions {
    /// Reads what the server sent each open session; the ones it closed (close_notify: the
    /// per-identity limit superseded them) are counted and let go.
    pub fn sweep(&mut self) {
        let mut buf = vec![0u8; 4096];
        let before = self.open.len();
        self.open.retain_mut(|s| {
            while let Ok((n, from)) = s.socket.try_recv_from(&mut buf) {
                s.client
                    .handle_datagram(Instant::now(), from, buf.get(..n).unwrap_or_default());
            }
            !s.client.is_closed()
        });
        self.closed_by_server += before - self.open.len();
    }
}

/// Opens `count` sessions with `device`'s credentials, `concurrency` handshakes at a time,
/// from sources 127.3.x.y (`ips` distinct addresses, ephemeral ports), and keeps every one the
/// server does not close. Sessions the server closes are swept every 256 (a socket each: the
/// process's file limit).
pub async fn open_sessions(
    server: SocketAddr,
    device: &DeviceIdentity,
    count: usize,
    concurrency: usize,
    ips: usize,
) -> Result<OpenedSessions> {
    let config = attacker_config(device)?;
    let mut out = OpenedSessions::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0usize;
    while out.opened < count {
        while started < count && tasks.len() < concurrency.max(1) {
            let bind = SocketAddr::from((source_ip(3, started % ips.max(1)), 0));
            tasks.spawn(handshake(bind, server, config.clone()));
            started += 1;
        }
        match tasks.join_next().await {
            Some(r) => {
                out.open.push(r.context("handshake task")??);
                out.opened += 1;
                if out.opened.is_multiple_of(256) {
                    out.sweep();
                }
            }
            None => break,
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The legitimate meter
// ---------------------------------------------------------------------------------------------

/// One enrollment of a meter: client-sim's EST meter (`/sen` with a fresh key and PKCS#10) on
/// the native DTLS backend (CCM_8, back-off from 500 ms), one DTLS session, over a UDP socket
/// on 127.0.0.1. `enrolled` means it holds an LDevID that verified against the CA it fetched.
pub async fn enroll(
    server: SocketAddr,
    device: &DeviceIdentity,
    implicit_ta_der: &[Vec<u8>],
    seed: u64,
) -> (MeterOutcome, Duration) {
    let cfg = DriverConfig {
        server,
        failover: Vec::new(),
        bind: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        dtls: DtlsClientConfig {
            trust_anchors_der: implicit_ta_der.to_vec(),
            backend: DtlsBackend::Native,
            flight_interval: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(15),
            ..DtlsClientConfig::default()
        },
        coap: CoapClientConfig::default(),
        ack_timeout_auto: false,
        nat_rebind: false,
    };
    let meter_cfg = MeterConfig {
        // One session: a refused or timed-out handshake is a failed enrollment.
        max_attempts: 1,
        ..MeterConfig::default()
    };
    let start = Instant::now();
    let meter = match Meter::new(meter_cfg, device, seed) {
        Ok(m) => m,
        Err(e) => panic!("meter {}: {e}", device.serial),
    };
    let outcome = run_meter_over(seed, meter, &cfg, seed, move || async move {
        let bind = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        let s = client_sim::net::ConnectedUdp::connect(bind, server).await?;
        let c: Arc<dyn webrtc_util::conn::Conn + Send + Sync> = Arc::new(s);
        Ok(c)
    })
    .await;
    (outcome, start.elapsed())
}

/// Enrollment latencies and failures of a series.
#[derive(Clone, Debug, Default)]
pub struct Enrollments {
    pub ok: usize,
    pub failed: Vec<String>,
    pub latencies: Vec<Duration>,
}

impl Enrollments {
    pub fn add(&mut self, outcome: &MeterOutcome, took: Duration) {
        if outcome.enrolled {
            self.ok += 1;
            self.latencies.push(took);
        } else {
            self.failed.push(format!(
                "{}: {:?} after {took:?}",
                outcome.serial, outcome.failure
            ));
        }
    }

    pub fn total(&self) -> usize {
        self.ok + self.failed.len()
    }

    /// "n/m enrolled, latency p50, p90 and max".
    pub fn summary(&self) -> String {
        let mut l = self.latencies.clone();
        l.sort();
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        format!(
            "{}/{} enrolled, latency p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            self.ok,
            self.total(),
            ms(l.get(l.len() / 2)),
            ms(l.get(l.len() * 9 / 10)),
            ms(l.last())
        )
    }
}

// ---------------------------------------------------------------------------------------------
// est-server as a child process
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The est-server binary: `EST_SERVER_BIN`, else built with cargo into this executable's target
/// directory and profile (a no-op when up to date), once per process.
pub fn est_server_bin() -> Result<PathBuf> {
    workspace_bin("est-server", "est-server", "EST_SERVER_BIN")
}

/// A binary of the workspace: `$env_var` if set, else built with cargo (`-p package --bin
/// bin`) into this executable's target directory and profile, once per process.
pub fn workspace_bin(package: &str, bin: &str, env_var: &str) -> Result<PathBuf> {
    static BINS: std::sync::Mutex<Vec<(String, Result<PathBuf, String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut bins = BINS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = bins.iter().find(|(b, _)| b == bin) {
        return r.clone().map_err(|e| anyhow::anyhow!(e));
    }
    let r = build_bin(package, bin, env_var).map_err(|e| format!("{e:#}"));
    bins.push((bin.to_string(), r.clone()));
    r.map_err(|e| anyhow::anyhow!(e))
}

fn build_bin(package: &str, bin: &str, env_var: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/deps/<test> or target/<profile>/<bin>.
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("executable directory")?.to_path_buf();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let target_dir = profile_dir.parent().context("target directory")?;
    let release = profile_dir.ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .with_context(|| format!("running cargo build -p {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} failed");
    }
    Ok(profile_dir.join(bin))
}

pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `est-server run` (killed on drop) on a fresh data directory with a minted fleet,
/// listening on 127.0.0.1 (a port of the kernel's choosing), logging JSON to a file with a
/// metrics line every second.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub fleet_dir: PathBuf,
    pub log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl ServerProcess {
    /// `dtls` holds `[dtls]` settings (TOML values) on top of the defaults.
    pub fn start(devices: usize, dtls: &[(&str, String)]) -> Result<ServerProcess> {
        let bin = est_server_bin()?;
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("est-data");
        let fleet_dir = tmp.path().join("fleet");
        run_ok(
            Command::new(&bin)
                .arg("init")
                .arg("--data-dir")
                .arg(&data_dir),
        )?;
        run_ok(
            Command::new(&bin)
                .args(["factory", "mint", "--count", &devices.to_string()])
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--out")
                .arg(&fleet_dir),
        )?;
        // Existing settings only; everything else keeps its default.
        let mut toml = String::from(
            "[server]\nlog_format = \"json\"\nmetrics_log_interval_secs = 1\n\n[dtls]\n",
        );
        for (k, v) in dtls {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        let config = tmp.path().join("front-door.toml");
        std::fs::write(&config, toml)?;
        let log = tmp.path().join("est-server.log");
        let mut child = Command::new(&bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting est-server run")?;
        let stdout = child.stdout.take().context("stdout piped")?;
        let addr = match est_test_tools::announced_address(stdout, Duration::from_secs(60)) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        Ok(ServerProcess {
            child,
            addr,
            data_dir,
            fleet_dir,
            log,
            _tmp: tmp,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `/proc/<pid>/status` field in kB (VmRSS: now; VmHWM: the peak so far).
    pub fn status_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        client_sim::fleet::parse_status_kb(&status, field)
    }

    /// Datagrams the kernel dropped because the server's socket buffer was full
    /// (`/proc/net/udp`, the `drops` column of the socket bound to our address).
    pub fn socket_drops(&self) -> Option<u64> {
        let SocketAddr::V4(a) = self.addr else {
            return None;
        };
        let local = format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        );
        let table = std::fs::read_to_string(format!("/proc/{}/net/udp", self.pid())).ok()?;
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))?
            .split_whitespace()
            .last()?
            .parse()
            .ok()
    }

    /// The metrics log lines so far (JSON, one a second).
    pub fn metrics_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"target\":\"metrics\""))
            .map(str::to_string)
            .collect()
    }

    /// `field` of every metrics line so far, in order.
    pub fn metric_series(&self, field: &str) -> Vec<u64> {
        self.metrics_lines()
            .iter()
            .filter_map(|l| json_u64(l, field))
            .collect()
    }

    /// Waits for the next metrics line (at most 3 s) and returns `field` of the last one.
    pub fn fresh_metric(&self, field: &str) -> Option<u64> {
        let before = self.metrics_lines().len();
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.metrics_lines().len() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.metric_series(field).last().copied()
    }

    /// Lines of the log containing `needle`.
    pub fn log_lines_with(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn fleet(&self, limit: Option<usize>) -> Result<client_sim::pki::Fleet> {
        Ok(client_sim::pki::load_fleet(&self.fleet_dir, limit)?)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `"field":` in a JSON line.
pub fn json_u64(line: &str, field: &str) -> Option<u64> {
    let key = format!("\"{field}\":");
    let (_, rest) = line.split_once(key.as_str())?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest.get(..end)?.parse().ok()
}

/// Sets a flag when dropped (stops a generator thread when a test fails half-way).
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_client_hello_is_what_the_server_parses() {
        let d = client_hello_datagram(&client_hello([7; 32], &[]), 0, 0);
        assert_eq!(first_handshake_type(&d), Some(hs::CLIENT_HELLO));
        assert_eq!(
            d.get(RANDOM_OFFSET..RANDOM_OFFSET + 32),
            Some(&[7u8; 32][..])
        );
        let (rec, _) = wire::parse_record(&d, 0).unwrap_or_else(|e| panic!("{e:?}"));
        let frags =
            wire::parse_handshake_fragments(rec.fragment).unwrap_or_else(|e| panic!("{e:?}"));
        let ch = wire::ClientHello::parse(frags[0].body).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(ch.cookie.is_empty() && ch.extension(ext::EXTENDED_MASTER_SECRET).is_some());
        assert!(d.len() < 100, "a ClientHello of {} bytes", d.len());
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        let a: std::collections::HashSet<_> = (0..5000).map(|i| source_ip(1, i)).collect();
        assert_eq!(a.len(), 5000);
        assert!(a.iter().all(|ip| ip.is_loopback()));
    }

    #[test]
    fn the_socket_budget_is_read_from_the_limits() {
        assert!(socket_budget() >= 64);
    }

    #[test]
    fn json_fields_are_read() {
        let l = r#"{"fields":{"message":"metrics","sessions_now":12,"half_open_now":0},"target":"metrics"}"#;
        assert_eq!(json_u64(l, "sessions_now"), Some(12));
        assert_eq!(json_u64(l, "half_open_now"), Some(0));
        assert_eq!(json_u64(l, "nothing"), None);
    }
}
