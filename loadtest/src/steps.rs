//! Closed-loop load steps: `concurrency` virtual meters, each starting a new exchange as soon as
//! its previous one ends, for a fixed duration. Two kinds of exchange:
//! * `Enroll`: a full client-sim meter (DTLS handshake with its IDevID, GET /crts, POST /sen,
//!   verification of what comes back), run by `client_sim::driver::run_meter`;
//! * `Discover`: DTLS handshake + one `GET /.well-known/core` (the exchange a bare CoAP server
//!   such as libcoap's can also serve), built here from client-sim's DTLS connector and
//!   est-proto's CoAP client (client-sim has no discovery-only meter).
//!
//! Rates, latencies and server CPU are taken over the steady-state window [warm-up, end]: an
//! exchange counts when it finishes inside the window.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sim::driver::{run_meter, run_meter_over, DriverConfig};
use client_sim::dtls::{self, DtlsBackend, DtlsClientConfig, DtlsSession};
use client_sim::link::{LinkParams, LossModel};
use client_sim::meter::{Credential, KeySource, Meter, MeterConfig};
use client_sim::net::{EmulatedConn, MeterLink};
use client_sim::pki::DeviceIdentity;
use client_sim::schedule::mix64;
use est_proto::coap::{Client, ClientConfig, ClientEvent, Method, Request, ResponseType};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::direct::{self, Counters};
use crate::server::{sample, ProcSample};

/// How the meters' datagrams reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Transport {
    /// A plain connected UDP socket per session (see [`crate::direct`]), same driver.
    Direct,
    /// client-sim's driver and link emulator at zero delay (datagrams pass inline).
    Emulated,
}

/// What each virtual meter does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    Enroll,
    Discover,
}

/// The server and the credentials to reach it.
#[derive(Clone)]
pub(crate) struct Target {
    pub name: String,
    pub addr: SocketAddr,
    pub devices: Arc<Vec<DeviceIdentity>>,
    pub trust_anchors_der: Vec<Vec<u8>>,
    /// The server process, for CPU and RSS (None for a remote server).
    pub pid: Option<u32>,
    /// More nodes of the same service (`--nodes`): enrollments are spread over `addr` and
    /// these (client-sim's failover list), and their CPU counts as server CPU.
    pub more_nodes: Vec<(SocketAddr, u32)>,
    /// The PostgreSQL postmaster the nodes use (`--store postgres`): its CPU and its
    /// children's count as server CPU too, and separately as database CPU.
    pub db_postmaster: Option<u32>,
}

/// CPU and RSS of `pids` summed (the nodes of a service), and of `postmaster` with its child
/// processes (PostgreSQL's backends).
fn group_sample(pids: &[u32], postmaster: Option<u32>, ticks: f64) -> (ProcSample, ProcSample) {
    let mut srv = ProcSample::default();
    for p in pids {
        if let Some(s) = sample(*p, ticks) {
            srv.cpu_s += s.cpu_s;
            srv.rss_kb += s.rss_kb;
            srv.hwm_kb += s.hwm_kb;
        }
    }
    let mut db = ProcSample::default();
    if let Some(pm) = postmaster {
        for p in std::iter::once(pm).chain(crate::server::children_of(pm)) {
            if let Some(s) = sample(p, ticks) {
                db.cpu_s += s.cpu_s;
                db.rss_kb += s.rss_kb;
            }
        }
    }
    (srv, db)
}

/// One finished exchange.
#[derive(Debug, Clone)]
struct Sample {
    end: Instant,
    ok: bool,
    latency_us: u64,
    handshake_us: Option<u64>,
    bytes_up: u64,
    bytes_down: u64,
    datagrams: u64,
    retries: u64,
    error: Option<String>,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (latency ms, cumulative fraction) points of the CDF, for plots.
    pub cdf: Vec<(f64, f64)>,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let mut cdf = Vec::new();
        for q in (0..=100)
            .map(|i| f64::from(i) / 100.0)
            .chain([0.995, 0.999])
        {
            cdf.push((ms(h.value_at_quantile(q)), q));
        }
        cdf.sort_by(|a, b| a.1.total_cmp(&b.1));
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            cdf,
        }
    }
}

/// Figures of one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct StepResult {
    pub target: String,
    pub mode: String,
    pub concurrency: usize,
    /// Open-loop arrival rate, if the step was run at a fixed rate.
    pub arrival_rate: Option<f64>,
    pub duration_s: f64,
    pub window_s: f64,
    /// Successful exchanges that finished inside the window.
    pub completed: u64,
    /// completed / window_s.
    pub rate_per_s: f64,
    /// Exchanges that failed, over the whole step (including warm-up and drain).
    pub errors: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// All finished exchanges of the step (successes + failures).
    pub finished: u64,
    /// Session retries and honoured 5.03s inside exchanges that finished in the window.
    pub retries: u64,
    pub latency: Latency,
    pub handshake: Latency,
    /// Server CPU seconds over the window, and per successful exchange (every node, and the
    /// PostgreSQL processes with `--store postgres`).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_ms_per_op: Option<f64>,
    /// Server CPU / window: cores kept busy.
    pub server_cores_busy: Option<f64>,
    /// Highest VmRSS sampled during the step, and VmHWM at its end (kB).
    pub server_rss_peak_kb: Option<u64>,
    pub server_hwm_kb: Option<u64>,
    /// The load generator's own CPU over the window.
    pub client_cpu_s: Option<f64>,
    /// Busy cores of the whole machine over the window (server + load generator + anything else).
    #[serde(default)]
    pub machine_cores_busy: Option<f64>,
    /// UDP payload bytes per successful exchange, meter -> server and back, and datagrams.
    pub bytes_up_per_op: f64,
    pub bytes_down_per_op: f64,
    pub datagrams_per_op: f64,
    /// Meters built (a fresh key pair and CSR each) during the step: every enrollment's.
    pub meters_built_inline: u64,
    /// Of the server CPU per exchange, what the PostgreSQL processes used (`--store postgres`).
    #[serde(default)]
    pub db_cpu_ms_per_op: Option<f64>,
}

impl StepResult {
    /// The load generator's CPU milliseconds per successful exchange over the window.
    pub(crate) fn client_cpu_ms_per_op(&self) -> Option<f64> {
        self.client_cpu_s
            .filter(|_| self.completed > 0)
            .map(|c| c * 1000.0 / self.completed as f64)
    }
}

/// Step settings shared by all steps of a run.
#[derive(Debug, Clone)]
pub(crate) struct StepConfig {
    pub mode: Mode,
    pub transport: Transport,
    /// The meters' DTLS client library (the load generator's).
    pub dtls_backend: DtlsBackend,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Upper bound on waiting for in-flight exchanges after the step ends.
    pub drain_timeout: Duration,
    pub seed: u64,
    /// Open loop at this many arrivals per second (`concurrency` caps the in-flight count);
    /// `None`: closed loop with `concurrency` meters.
    pub arrival_rate: Option<f64>,
    pub progress: bool,
    pub label: String,
}

/// Zero-delay, loss-free link: loopback as it is, with client-sim's byte and datagram counters.
pub(crate) fn loopback_link() -> LinkParams {
    LinkParams {
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: LossModel::None,
        rate_bps: None,
        max_queue_bytes: None,
        ..LinkParams::default()
    }
}

fn dtls_config(t: &Target, backend: DtlsBackend) -> DtlsClientConfig {
    DtlsClientConfig {
        backend,
        trust_anchors_der: t.trust_anchors_der.clone(),
        server_name: "localhost".into(),
        handshake_timeout: Duration::from_secs(15),
        flight_interval: Duration::from_secs(1),
        ..DtlsClientConfig::default()
    }
}

/// The meters of an enrollment step. Each is built (a fresh key pair, its CSR signed) by the
/// worker right before its enrollment, inside the measured window: the generator's CPU per
/// enrollment includes its keys. The keys come from the OS generator through ring
/// ([`KeySource::System`]): p256's seeded keys cost a few times more, and a load test needs
/// fresh keys, not reproducible ones.
fn meter_config() -> MeterConfig {
    MeterConfig {
        max_attempts: 3,
        retry_backoff: Duration::from_millis(500),
        max_retry_after: Duration::from_secs(10),
        key_source: KeySource::System,
        ..MeterConfig::default()
    }
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds Histogram accepts (low 1, high above 2 x low, 3 significant figures)"
)]
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

/// Handshake + GET /.well-known/core + close. Returns the sample and, with `keep`, the open
/// session (for the concurrent-sessions memory test).
/// Bytes up, bytes down and datagrams, from whichever transport carried them.
fn wire(link: &Arc<MeterLink>, c: &Arc<Counters>) -> (u64, u64, u64) {
    let (up, down) = link.counters();
    let (cu, cd) = c.bytes();
    (
        up.bytes + cu,
        down.bytes + cd,
        up.datagrams + down.datagrams + c.datagrams(),
    )
}

async fn discover_once(
    transport: Transport,
    t: &Target,
    dcfg: &DtlsClientConfig,
    device: &DeviceIdentity,
    seed: u64,
    keep: bool,
) -> (Sample, Option<DtlsSession>) {
    let start = Instant::now();
    let link = MeterLink::new(loopback_link(), seed, None);
    let fail = |e: String, link: &Arc<MeterLink>, c: &Arc<Counters>| {
        let (up, down, dg) = wire(link, c);
        (
            Sample {
                end: Instant::now(),
                ok: false,
                latency_us: 0,
                handshake_us: None,
                bytes_up: up,
                bytes_down: down,
                datagrams: dg,
                retries: 0,
                error: Some(e),
            },
            None,
        )
    };
    let counters = Arc::new(Counters::default());
    let conn: Arc<dyn webrtc_util::Conn + Send + Sync> = match transport {
        Transport::Direct => match direct::connect(t.addr, counters.clone()).await {
            Ok(c) => c,
            Err(e) => return fail(format!("i/o: {e}"), &link, &counters),
        },
        Transport::Emulated => {
            match EmulatedConn::connect(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                t.addr,
                link.clone(),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => return fail(format!("i/o: {e}"), &link, &counters),
            }
        }
    };
    let cred = Credential {
        chain_der: device.cert_chain_der.clone(),
        key_pkcs8_der: device.key_pkcs8_der.clone(),
    };
    let mut session = match dtls::connect_session(conn, dcfg, &cred).await {
        Ok(s) => s,
        Err(e) => return fail(e.label(), &link, &counters),
    };
    let handshake_us = start.elapsed().as_micros() as u64;
    let mut client = Client::new(ClientConfig::default(), seed);
    if let Err(e) = client.start(
        Instant::now(),
        Request::new(Method::Get, "/.well-known/core"),
    ) {
        return fail(format!("coap: {e}"), &link, &counters);
    }
    let mut buf = vec![0u8; 8192];
    let mut result: Result<(), String> = Err("no response".into());
    // Bounded: CoAP gives up after MAX_RETRANSMIT; this caps the loop independently of it.
    for _ in 0..256 {
        let mut lost = None;
        while let Some(d) = client.poll_transmit() {
            if let Err(e) = session.send(&d).await {
                lost = Some(e.to_string());
                break;
            }
        }
        if let Some(e) = lost {
            result = Err(format!("dtls write: {e}"));
            break;
        }
        if let Some(ev) = client.poll_event() {
            result = match ev {
                ClientEvent::Response(r)
                    if r.code == ResponseType::Content && !r.payload.is_empty() =>
                {
                    Ok(())
                }
                ClientEvent::Response(r) => Err(format!("/.well-known/core answered {:?}", r.code)),
                ClientEvent::Failed(e) => Err(format!("coap: {e}")),
            };
            break;
        }
        let deadline = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(10));
        tokio::select! {
            r = session.recv(&mut buf) => match r {
                Ok(n) => {
                    if let Some(d) = buf.get(..n) {
                        client.handle_datagram(Instant::now(), d);
                    }
                }
                Err(e) => { result = Err(format!("dtls read: {e}")); break; }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                client.handle_timeout(Instant::now());
            }
        }
    }
    let latency_us = start.elapsed().as_micros() as u64;
    let kept = if keep && result.is_ok() {
        Some(session)
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(1), session.close()).await;
        None
    };
    let (up, down, dg) = wire(&link, &counters);
    let retries = client.stats().retransmissions;
    (
        Sample {
            end: Instant::now(),
            ok: result.is_ok(),
            latency_us,
            handshake_us: Some(handshake_us),
            bytes_up: up,
            bytes_down: down,
            datagrams: dg,
            retries,
            error: result.err(),
        },
        kept,
    )
}

struct Ctx {
    t: Target,
    cfg: StepConfig,
    driver: DriverConfig,
    dcfg: DtlsClientConfig,
    next: Arc<AtomicUsize>,
    built: Arc<AtomicU64>,
}

/// One exchange of the step's mode; `None` when no device or meter can be had.
async fn one_exchange(ctx: &Ctx, seed: u64) -> Option<Sample> {
    let t = &ctx.t;
    match ctx.cfg.mode {
        Mode::Enroll => {
            ctx.built.fetch_add(1, Ordering::Relaxed);
            let idx = ctx.next.fetch_add(1, Ordering::Relaxed);
            let d = t.devices.get(idx % t.devices.len().max(1))?;
            let meter = Meter::new(meter_config(), d, seed).ok()?;
            let t0 = Instant::now();
            let timeout = Duration::from_secs(120);
            let (res, up, down, dg) = match ctx.cfg.transport {
                Transport::Emulated => {
                    let link = MeterLink::new(loopback_link(), seed, None);
                    let run = run_meter(seed, meter, link, &ctx.driver, seed);
                    match tokio::time::timeout(timeout, run).await {
                        Ok(o) => (
                            Some((o.enrolled, o.failure, o.stats)),
                            o.link_up.bytes,
                            o.link_down.bytes,
                            o.link_up.datagrams + o.link_down.datagrams,
                        ),
                        Err(_) => (None, 0, 0, 0),
                    }
                }
                Transport::Direct => {
                    let c = Arc::new(Counters::default());
                    let server = ctx.driver.server;
                    let open = || {
                        let c = c.clone();
                        async move {
                            let conn: Arc<dyn webrtc_util::Conn + Send + Sync> =
                                direct::connect(server, c).await?;
                            Ok(conn)
                        }
                    };
                    let run = run_meter_over(seed, meter, &ctx.driver, seed, open);
                    let r = tokio::time::timeout(timeout, run).await.ok();
                    let (up, down) = c.bytes();
                    (
                        r.map(|o| (o.enrolled, o.failure, o.stats)),
                        up,
                        down,
                        c.datagrams(),
                    )
                }
            };
            Some(match res {
                Some((enrolled, failure, stats)) => Sample {
                    end: Instant::now(),
                    ok: enrolled,
                    latency_us: stats
                        .enroll_us
                        .unwrap_or_else(|| t0.elapsed().as_micros() as u64),
                    handshake_us: stats.handshake_us,
                    bytes_up: up,
                    bytes_down: down,
                    datagrams: dg,
                    retries: u64::from(stats.session_retries) + u64::from(stats.busy_retries),
                    error: failure.as_ref().map(|f| f.label()),
                },
                None => Sample {
                    end: Instant::now(),
                    ok: false,
                    latency_us: t0.elapsed().as_micros() as u64,
                    handshake_us: None,
                    bytes_up: up,
                    bytes_down: down,
                    datagrams: dg,
                    retries: 0,
                    error: Some("meter timeout (120 s)".into()),
                },
            })
        }
        Mode::Discover => {
            let idx = ctx.next.fetch_add(1, Ordering::Relaxed);
            let d = t.devices.get(idx % t.devices.len().max(1))?;
            Some(
                discover_once(ctx.cfg.transport, t, &ctx.dcfg, d, seed, false)
                    .await
                    .0,
            )
        }
    }
}

/// Runs one step against `t`.
pub(crate) async fn run_step(t: &Target, cfg: &StepConfig) -> StepResult {
    let ticks = crate::server::clock_ticks();
    let self_pid = std::process::id();
    let dcfg = dtls_config(t, cfg.dtls_backend);
    let driver = DriverConfig {
        server: t.addr,
        failover: t.more_nodes.iter().map(|(a, _)| *a).collect(),
        bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        dtls: dcfg.clone(),
        coap: ClientConfig::default(),
        ack_timeout_auto: false,
        nat_rebind: false,
    };
    let built_inline = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let done_ok = Arc::new(AtomicU64::new(0));
    let done_err = Arc::new(AtomicU64::new(0));

    let start = Instant::now();
    let warm_at = start + cfg.warmup;
    let stop_at = start + cfg.duration;

    // Server and own-process sampler: CPU at the window edges, peak RSS throughout.
    let sampler = {
        let pids: Vec<u32> = t
            .pid
            .into_iter()
            .chain(t.more_nodes.iter().map(|(_, p)| *p))
            .collect();
        let postmaster = t.db_postmaster;
        tokio::spawn(async move {
            let mut peak_rss = 0u64;
            let mut at_warm: Option<(ProcSample, ProcSample)> = None;
            let last: (ProcSample, ProcSample, Option<f64>);
            let mut box_warm: Option<f64> = None;
            let mut db_warm = 0.0f64;
            let db_last: f64;
            loop {
                let now = Instant::now();
                let (mut srv, db) = group_sample(&pids, postmaster, ticks);
                srv.cpu_s += db.cpu_s;
                let own = sample(self_pid, ticks).unwrap_or_default();
                peak_rss = peak_rss.max(srv.rss_kb);
                if at_warm.is_none() && now >= warm_at {
                    at_warm = Some((srv, own));
                    box_warm = crate::server::machine_busy_s(ticks);
                    db_warm = db.cpu_s;
                }
                if now >= stop_at {
                    last = (srv, own, crate::server::machine_busy_s(ticks));
                    db_last = db.cpu_s;
                    break;
                }
                let next_edge = if now < warm_at { warm_at } else { stop_at };
                let nap = next_edge
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(100));
                tokio::time::sleep(nap).await;
            }
            let box_busy = match (box_warm, last.2) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            let db_cpu = postmaster.map(|_| db_last - db_warm);
            (peak_rss, at_warm, Some((last.0, last.1)), box_busy, db_cpu)
        })
    };

    let bar = if cfg.progress {
        let b = ProgressBar::new(cfg.duration.as_millis() as u64);
        if let Ok(style) = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {msg}") {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_prefix(cfg.label.clone());
        b
    } else {
        ProgressBar::hidden()
    };
    let ticker = {
        let bar = bar.clone();
        let (ok, err) = (done_ok.clone(), done_err.clone());
        tokio::spawn(async move {
            loop {
                let el = start.elapsed();
                bar.set_position(el.as_millis() as u64);
                let ok = ok.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "{ok} ok, {} errors, {:.0}/s",
                    err.load(Ordering::Relaxed),
                    ok as f64 / el.as_secs_f64().max(1e-3)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let ctx = Arc::new(Ctx {
        t: t.clone(),
        cfg: cfg.clone(),
        driver,
        dcfg,
        next,
        built: built_inline.clone(),
    });
    let record = {
        let (samples, ok_c, err_c) = (samples.clone(), done_ok.clone(), done_err.clone());
        move |s: Sample| {
            if s.ok {
                ok_c.fetch_add(1, Ordering::Relaxed);
            } else {
                err_c.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut v) = samples.lock() {
                v.push(s);
            }
        }
    };
    let mut workers = Vec::new();
    match cfg.arrival_rate {
        // Closed loop: `concurrency` meters, each starting again as soon as it finishes.
        None => {
            for w in 0..cfg.concurrency {
                let (ctx, record) = (ctx.clone(), record.clone());
                workers.push(tokio::spawn(async move {
                    let mut k: u64 = 0;
                    while Instant::now() < stop_at {
                        k += 1;
                        match one_exchange(&ctx, mix64(ctx.cfg.seed ^ ((w as u64) << 32) ^ k)).await
                        {
                            Some(s) => record(s),
                            None => break,
                        }
                    }
                }));
            }
        }
        // Open loop: arrivals at a fixed rate whatever the latency, at most `concurrency` in
        // flight (an arrival that finds them all busy is counted as an error).
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let mut k: u64 = 0;
            let mut next_at = tokio::time::Instant::now();
            while Instant::now() < stop_at {
                tokio::time::sleep_until(next_at).await;
                next_at += interval;
                k += 1;
                if in_flight.load(Ordering::Relaxed) >= cfg.concurrency {
                    record(Sample {
                        end: Instant::now(),
                        ok: false,
                        latency_us: 0,
                        handshake_us: None,
                        bytes_up: 0,
                        bytes_down: 0,
                        datagrams: 0,
                        retries: 0,
                        error: Some("load generator: in-flight cap reached".into()),
                    });
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (ctx, record, in_flight) = (ctx.clone(), record.clone(), in_flight.clone());
                workers.push(tokio::spawn(async move {
                    if let Some(s) = one_exchange(&ctx, mix64(ctx.cfg.seed ^ (1 << 63) ^ k)).await {
                        record(s);
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }));
            }
        }
    }

    let (peak_rss, at_warm, last, box_busy, db_cpu) =
        sampler.await.unwrap_or((0, None, None, None, None));
    // Drain: in-flight exchanges finish (bounded), then stragglers are aborted.
    let drain_until = tokio::time::Instant::now() + cfg.drain_timeout;
    for w in workers {
        let abort = w.abort_handle();
        if tokio::time::timeout_at(drain_until, w).await.is_err() {
            abort.abort();
        }
    }
    ticker.abort();
    bar.finish_and_clear();

    let samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    let window = stop_at.saturating_duration_since(warm_at).as_secs_f64();
    let mut r = StepResult {
        target: t.name.clone(),
        mode: format!("{:?}", cfg.mode).to_lowercase(),
        concurrency: cfg.concurrency,
        arrival_rate: cfg.arrival_rate,
        duration_s: cfg.duration.as_secs_f64(),
        window_s: window,
        meters_built_inline: built_inline.load(Ordering::Relaxed),
        ..StepResult::default()
    };
    let (mut hl, mut hh) = (new_hist(), new_hist());
    let (mut up, mut down, mut dg) = (0u64, 0u64, 0u64);
    for s in &samples {
        r.finished += 1;
        if !s.ok {
            r.errors += 1;
            *r.errors_by_reason
                .entry(s.error.clone().unwrap_or_else(|| "unknown".into()))
                .or_default() += 1;
            continue;
        }
        if s.end < warm_at || s.end > stop_at {
            continue;
        }
        r.completed += 1;
        r.retries += s.retries;
        hl.saturating_record(s.latency_us.max(1));
        if let Some(h) = s.handshake_us {
            hh.saturating_record(h.max(1));
        }
        up += s.bytes_up;
        down += s.bytes_down;
        dg += s.datagrams;
    }
    r.rate_per_s = if window > 0.0 {
        r.completed as f64 / window
    } else {
        0.0
    };
    r.latency = Latency::of(&hl);
    r.handshake = Latency::of(&hh);
    if r.completed > 0 {
        let n = r.completed as f64;
        r.bytes_up_per_op = up as f64 / n;
        r.bytes_down_per_op = down as f64 / n;
        r.datagrams_per_op = dg as f64 / n;
    }
    r.machine_cores_busy = box_busy.filter(|_| window > 0.0).map(|b| b / window);
    if let (Some((s0, o0)), Some((s1, o1))) = (at_warm, last) {
        r.client_cpu_s = Some(o1.cpu_s - o0.cpu_s);
        if t.pid.is_some() {
            let cpu = s1.cpu_s - s0.cpu_s;
            r.server_cpu_s = Some(cpu);
            r.server_cores_busy = (window > 0.0).then(|| cpu / window);
            r.server_cpu_ms_per_op = (r.completed > 0).then(|| cpu * 1000.0 / r.completed as f64);
            r.db_cpu_ms_per_op = db_cpu
                .filter(|_| r.completed > 0)
                .map(|c| c * 1000.0 / r.completed as f64);
            r.server_rss_peak_kb = Some(peak_rss.max(s1.rss_kb));
            r.server_hwm_kb = t.pid.and_then(|p| sample(p, ticks)).map(|s| s.hwm_kb);
        }
    }
    r
}

/// Result of the concurrent-sessions memory test.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct HoldResult {
    pub target: String,
    pub requested: usize,
    /// Sessions established and answered, then held open at once.
    pub held: usize,
    pub failed: usize,
    pub open_s: f64,
    pub server_rss_before_kb: Option<u64>,
    pub server_rss_held_kb: Option<u64>,
    pub server_hwm_kb: Option<u64>,
    /// (held RSS - RSS before) / held sessions.
    pub server_kb_per_session: Option<f64>,
    pub errors_by_reason: BTreeMap<String, u64>,
}

/// Opens `n` sessions (handshake + GET /.well-known/core each, `parallel` at a time), holds
/// them all open, samples the server's memory, then closes them.
pub(crate) async fn hold_sessions(
    transport: Transport,
    backend: DtlsBackend,
    t: &Target,
    n: usize,
    parallel: usize,
    progress: bool,
) -> HoldResult {
    let ticks = crate::server::clock_ticks();
    let dcfg = dtls_config(t, backend);
    let before = t.pid.and_then(|p| sample(p, ticks));
    let bar = if progress {
        let b = ProgressBar::new(n as u64);
        if let Ok(style) = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {msg}")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_prefix(format!("holding {n} sessions"));
        b
    } else {
        ProgressBar::hidden()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<DtlsSession>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (t, dcfg, next, held, errors, bar) = (
            t.clone(),
            dcfg.clone(),
            next.clone(),
            held.clone(),
            errors.clone(),
            bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let Some(d) = t.devices.get(i % t.devices.len().max(1)) else {
                    break;
                };
                let (s, conn) =
                    discover_once(transport, &t, &dcfg, d, mix64(0x401d ^ i as u64), true).await;
                match conn {
                    Some(c) => {
                        if let Ok(mut h) = held.lock() {
                            h.push(c);
                        }
                    }
                    None => {
                        if let Ok(mut e) = errors.lock() {
                            *e.entry(s.error.unwrap_or_else(|| "unknown".into()))
                                .or_default() += 1;
                        }
                    }
                }
                bar.inc(1);
            }
        }));
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(300), task).await;
    }
    let open_s = start.elapsed().as_secs_f64();
    // Let the server settle, then sample while everything is held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = t.pid.and_then(|p| sample(p, ticks));
    let sessions: Vec<DtlsSession> = held
        .lock()
        .map(|mut h| std::mem::take(&mut *h))
        .unwrap_or_default();
    let count = sessions.len();
    bar.set_message("closing");
    // Close them all at once, bounded: close_notify is one datagram each.
    let closing: Vec<_> = sessions
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
            })
        })
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for c in closing {
            let _ = c.await;
        }
    })
    .await;
    bar.finish_and_clear();
    let errors_by_reason = errors.lock().map(|e| e.clone()).unwrap_or_default();
    HoldResult {
        target: t.name.clone(),
        requested: n,
        held: count,
        failed: errors_by_reason.values().sum::<u64>() as usize,
        open_s,
        server_rss_before_kb: before.map(|s| s.rss_kb),
        server_rss_held_kb: during.map(|s| s.rss_kb),
        server_hwm_kb: during.map(|s| s.hwm_kb),
        server_kb_per_session: match (before, during) {
            (Some(b), Some(d)) if count > 0 => {
                Some(d.rss_kb.saturating_sub(b.rss_kb) as f64 / count as f64)
            }
            _ => None,
        },
        errors_by_reason,
    }
}
