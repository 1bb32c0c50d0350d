//! The fleet runner: starts meters on their schedule under a concurrency limit, groups them behind
//! DCUs, collects outcomes, and measures memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use crate::driver::{run_meter, DriverConfig, MeterOutcome};
use crate::link::{LinkCounters, LinkParams};
use crate::meter::{FailureReason, Meter, MeterConfig};
use crate::net::{Dcu, DcuMode, MeterLink, RelayReport};
use crate::phases::PhaseTable;
use crate::pki::DeviceIdentity;
use crate::schedule::{mix64, MeterPlan};

/// Everything a fleet run needs besides the schedule.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub concurrency: usize,
    pub driver: DriverConfig,
    pub meter: MeterConfig,
    /// The shared backhaul of each DCU (if the schedule assigns DCUs).
    pub dcu_link: LinkParams,
    /// How the DCUs carry their meters' traffic: routed, or relayed by est-relay's core.
    pub dcu_mode: DcuMode,
    /// The server's JPY port, for [`DcuMode::RelayStateless`].
    pub jpy_server: Option<std::net::SocketAddr>,
    pub progress: bool,
}

/// Reads a field of /proc/self/status in kB (Linux); `None` elsewhere.
pub fn proc_status_kb(field: &str) -> Option<u64> {
    parse_status_kb(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// The value of a `Field:   1234 kB` line of a /proc/<pid>/status or /proc/meminfo text.
pub fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// The machine-readable summary of a run (`--json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub meters: u64,
    pub enrolled: u64,
    pub renewed: u64,
    pub failed: u64,
    pub failures_by_reason: BTreeMap<String, u64>,
    pub wall_s: f64,
    pub enrollments_per_s: f64,
    pub handshake: Percentiles,
    pub enrollment: Percentiles,
    pub renewal: Percentiles,
    pub handshakes: u64,
    pub handshakes_failed: u64,
    /// NAT rebindings applied (`--nat-rebind`); with a Connection ID they cost no handshake.
    #[serde(default)]
    pub nat_rebinds: u64,
    pub session_retries: u64,
    pub busy_retries: u64,
    pub coap_requests: u64,
    pub coap_retransmissions: u64,
    /// Meter links, summed: up = meter -> server.
    pub up: LinkCounters,
    pub down: LinkCounters,
    /// Per enrolled meter (all traffic of all meters / enrolled meters).
    pub bytes_up_per_enrollment: f64,
    pub bytes_down_per_enrollment: f64,
    pub datagrams_per_enrollment: f64,
    pub frames_per_enrollment: f64,
    /// The meter links' traffic by session, phase and direction (all meters; its rows add up
    /// to `up` and `down`). See [`crate::phases`].
    #[serde(default)]
    pub phases: PhaseTable,
    pub dcus: u64,
    pub dcu_up: LinkCounters,
    pub dcu_down: LinkCounters,
    /// How the DCUs carried the traffic.
    #[serde(default)]
    pub dcu_mode: DcuMode,
    /// The DCUs' join proxies (relay modes).
    #[serde(default)]
    pub relay: RelayReport,
    pub peak_in_flight: u64,
    pub rss_before_kb: u64,
    pub rss_peak_kb: u64,
    /// (peak RSS - RSS before) / meters.
    pub rss_per_meter_kb: f64,
    /// (peak RSS - RSS before) / peak concurrent meters.
    pub rss_per_concurrent_meter_kb: f64,
}

/// Result of a run: the summary and every meter's outcome.
#[derive(Debug, Clone)]
pub struct FleetResult {
    pub summary: Summary,
    pub outcomes: Vec<MeterOutcome>,
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds, valid for new_with_bounds (low >= 1, high >= 2 * low, sigfig <= 5)"
)]
fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits; values above are clamped by `saturating_record`.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

/// Summarises outcomes (pure: used by the runner and by tests).
pub fn summarize(outcomes: &[MeterOutcome]) -> Summary {
    let mut s = Summary {
        meters: outcomes.len() as u64,
        ..Summary::default()
    };
    let (mut hh, mut he, mut hr) = (new_hist(), new_hist(), new_hist());
    for o in outcomes {
        if o.enrolled {
            s.enrolled += 1;
            // Enrolled, then the /sren step failed.
            if let Some(f) = &o.failure {
                *s.failures_by_reason
                    .entry(format!("renewal: {}", f.label()))
                    .or_default() += 1;
            }
        } else {
            s.failed += 1;
            let label = o
                .failure
                .as_ref()
                .map_or_else(|| "unfinished".to_string(), FailureReason::label);
            *s.failures_by_reason.entry(label).or_default() += 1;
        }
        if o.renewed {
            s.renewed += 1;
        }
        if let Some(v) = o.stats.handshake_us {
            hh.saturating_record(v.max(1));
        }
        if let Some(v) = o.stats.enroll_us {
            he.saturating_record(v.max(1));
        }
        if let Some(v) = o.stats.renew_us {
            hr.saturating_record(v.max(1));
        }
        s.handshakes += u64::from(o.stats.handshakes);
        s.handshakes_failed += u64::from(o.stats.handshakes_failed);
        s.nat_rebinds += u64::from(o.nat_rebinds);
        s.session_retries += u64::from(o.stats.session_retries);
        s.busy_retries += u64::from(o.stats.busy_retries);
        s.coap_requests += o.coap.requests;
        s.coap_retransmissions += o.coap.retransmissions;
        s.up += o.link_up;
        s.down += o.link_down;
        s.phases.merge(&o.phases);
    }
    s.handshake = Percentiles::of(&hh);
    s.enrollment = Percentiles::of(&he);
    s.renewal = Percentiles::of(&hr);
    let per = |x: u64| {
        if s.enrolled == 0 {
            0.0
        } else {
            x as f64 / s.enrolled as f64
        }
    };
    s.bytes_up_per_enrollment = per(s.up.bytes);
    s.bytes_down_per_enrollment = per(s.down.bytes);
    s.datagrams_per_enrollment = per(s.up.datagrams + s.down.datagrams);
    s.frames_per_enrollment = per(s.up.frames + s.down.frames);
    s
}

/// Runs a fleet: `plans[i]` uses `devices[i]`.
pub async fn run_fleet(
    plans: Vec<MeterPlan>,
    devices: Vec<DeviceIdentity>,
    cfg: FleetConfig,
    run_seed: u64,
) -> FleetResult {
    let rss_before = proc_status_kb("VmRSS:").unwrap_or(0);
    let n = plans.len() as u64;
    let cfg = Arc::new(cfg);
    let sem = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let in_flight = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let rss_peak = Arc::new(AtomicU64::new(rss_before));

    // DCUs, created by index before the meters start.
    let mut per_dcu: BTreeMap<u64, usize> = BTreeMap::new();
    for p in &plans {
        if let Some(d) = p.dcu {
            *per_dcu.entry(d).or_default() += 1;
        }
    }
    let registrar = match cfg.dcu_mode {
        DcuMode::RelayStateless => cfg.jpy_server.unwrap_or(cfg.driver.server),
        _ => cfg.driver.server,
    };
    let mut dcus: HashMap<u64, Arc<Dcu>> = HashMap::new();
    for (&d, &meters) in &per_dcu {
        let dcu = Dcu::with_mode(
            d,
            cfg.dcu_link.clone(),
            mix64(run_seed ^ 0xdc0 ^ d),
            cfg.dcu_mode,
            registrar,
            cfg.driver.bind.ip(),
            meters,
        )
        .await;
        match dcu {
            Ok(dcu) => {
                dcus.insert(d, dcu);
            }
            Err(e) => tracing::error!(dcu = d, error = %e, "cannot start the DCU's relay"),
        }
    }

    let bar = if cfg.progress {
        let b = ProgressBar::new(n);
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} done  {msg}")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        ProgressBar::hidden()
    };

    // RSS sampler (VmHWM is the kernel's own peak; sampling VmRSS also works where HWM was reset).
    let sampler = {
        let rss_peak = rss_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = proc_status_kb("VmRSS:") {
                    rss_peak.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<MeterOutcome>();
    let start = Instant::now();
    for (plan, device) in plans.into_iter().zip(devices) {
        let tx = tx.clone();
        let sem = sem.clone();
        let cfg = cfg.clone();
        let in_flight = in_flight.clone();
        let peak = peak.clone();
        let dcu = plan.dcu.and_then(|d| dcus.get(&d).cloned());
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + plan.start())).await;
            let Ok(_permit) = sem.acquire_owned().await else {
                return;
            };
            let now_in = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now_in, Ordering::Relaxed);
            let outcome = match Meter::new(cfg.meter.clone(), &device, plan.seed) {
                Ok(meter) => {
                    let mut driver = cfg.driver.clone();
                    if driver.dtls.flight_interval_auto {
                        let i = crate::dtls::auto_flight_interval(
                            &plan.link,
                            dcu.as_ref().map(|_| &cfg.dcu_link),
                        );
                        driver.dtls.flight_interval = i;
                        // webrtc-dtls resends at a fixed interval: 8 of them; the others back
                        // off (1 + 2 + 4 + 8 intervals for four resends).
                        let intervals = match driver.dtls.backend {
                            crate::dtls::DtlsBackend::Webrtc => 8,
                            _ => 15,
                        };
                        driver.dtls.handshake_timeout =
                            driver.dtls.handshake_timeout.max(i * intervals);
                    }
                    if driver.ack_timeout_auto {
                        let block = 16usize << driver.coap.block1_szx.min(6);
                        driver.coap.coap.ack_timeout = crate::dtls::auto_ack_timeout(
                            &plan.link,
                            dcu.as_ref().map(|_| &cfg.dcu_link),
                            block,
                        );
                    }
                    let link = MeterLink::new(plan.link.clone(), mix64(plan.seed ^ 0x11), dcu);
                    run_meter(plan.index, meter, link, &driver, plan.seed).await
                }
                Err(e) => MeterOutcome {
                    index: plan.index,
                    serial: device.serial.clone(),
                    enrolled: false,
                    renewed: false,
                    failure: Some(FailureReason::Credentials(e.to_string())),
                    stats: Default::default(),
                    coap: Default::default(),
                    link_up: Default::default(),
                    link_down: Default::default(),
                    ldevid_sha256: None,
                    ldevid_serial: None,
                    nat_rebinds: 0,
                    phases: Default::default(),
                },
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(outcome);
        });
    }
    drop(tx);

    let mut outcomes = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let (mut ok, mut failed) = (0u64, 0u64);
    while let Some(o) = rx.recv().await {
        if o.enrolled {
            ok += 1;
        } else {
            failed += 1;
        }
        bar.inc(1);
        bar.set_message(format!(
            "enrolled {ok}  failed {failed}  in flight {}",
            in_flight.load(Ordering::Relaxed)
        ));
        outcomes.push(o);
    }
    let wall = start.elapsed();
    bar.finish_and_clear();
    sampler.abort();
    if let Some(r) = proc_status_kb("VmRSS:") {
        rss_peak.fetch_max(r, Ordering::Relaxed);
    }
    outcomes.sort_by_key(|o| o.index);

    let mut summary = summarize(&outcomes);
    summary.wall_s = wall.as_secs_f64();
    summary.enrollments_per_s = if wall.is_zero() {
        0.0
    } else {
        summary.enrolled as f64 / wall.as_secs_f64()
    };
    summary.dcus = dcus.len() as u64;
    summary.dcu_mode = cfg.dcu_mode;
    let mut relayed_meters = 0u64;
    for d in dcus.values() {
        let (u, dn) = d.counters();
        summary.dcu_up += u;
        summary.dcu_down += dn;
        if let Some(r) = d.relay_report() {
            let s = &mut summary.relay;
            s.forwarded_up += r.forwarded_up;
            s.forwarded_down += r.forwarded_down;
            s.overhead_bytes_up += r.overhead_bytes_up;
            s.overhead_bytes_down += r.overhead_bytes_down;
            s.dropped += r.dropped;
            s.failovers += r.failovers;
            s.circuits_opened += r.circuits_opened;
            s.state_bytes += r.state_bytes;
            relayed_meters += u64::from(d.meters());
        }
    }
    if relayed_meters > 0 {
        summary.relay.state_bytes_per_meter =
            summary.relay.state_bytes as f64 / relayed_meters as f64;
    }
    summary.peak_in_flight = peak.load(Ordering::Relaxed);
    summary.rss_before_kb = rss_before;
    summary.rss_peak_kb = rss_peak.load(Ordering::Relaxed);
    let delta = summary.rss_peak_kb.saturating_sub(rss_before) as f64;
    summary.rss_per_meter_kb = if n == 0 { 0.0 } else { delta / n as f64 };
    summary.rss_per_concurrent_meter_kb = if summary.peak_in_flight == 0 {
        0.0
    } else {
        delta / summary.peak_in_flight as f64
    };
    FleetResult { summary, outcomes }
}

/// The human summary table.
pub fn render_summary(s: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "meters            {:>10}", s.meters);
    let _ = writeln!(o, "enrolled          {:>10}", s.enrolled);
    if s.renewed > 0 {
        let _ = writeln!(o, "renewed (/sren)   {:>10}", s.renewed);
    }
    let _ = writeln!(o, "failed            {:>10}", s.failed);
    for (reason, count) in &s.failures_by_reason {
        let _ = writeln!(o, "  {reason:<30} {count:>8}");
    }
    let _ = writeln!(
        o,
        "wall time         {:>10.1} s   ({:.1} enrollments/s)",
        s.wall_s, s.enrollments_per_s
    );
    let _ = writeln!(
        o,
        "latency (ms)            p50        p90        p99        max      count"
    );
    for (name, p) in [
        ("  handshake", &s.handshake),
        ("  enrollment", &s.enrollment),
        ("  renewal", &s.renewal),
    ] {
        if p.count > 0 {
            let _ = writeln!(
                o,
                "{name:<16}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11}",
                p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, p.count
            );
        }
    }
    let _ = writeln!(
        o,
        "handshakes        {:>10}   (failed {}, session retries {}, 5.03 retries {})",
        s.handshakes, s.handshakes_failed, s.session_retries, s.busy_retries
    );
    if s.nat_rebinds > 0 {
        let _ = writeln!(
            o,
            "nat rebinds       {:>10}   (a new source port mid-enrollment)",
            s.nat_rebinds
        );
    }
    let _ = writeln!(
        o,
        "coap requests     {:>10}   (retransmissions {})",
        s.coap_requests, s.coap_retransmissions
    );
    let _ = writeln!(
        o,
        "meter links       up {} B in {} datagrams / {} frames (lost {}, queue drops {}); down {} B in {} datagrams / {} frames (lost {}, queue drops {})",
        s.up.bytes, s.up.datagrams, s.up.frames, s.up.lost, s.up.queue_drops,
        s.down.bytes, s.down.datagrams, s.down.frames, s.down.lost, s.down.queue_drops
    );
    let _ = writeln!(
        o,
        "per enrollment    {:.0} B up, {:.0} B down, {:.1} datagrams, {:.1} 802.15.4 frames",
        s.bytes_up_per_enrollment,
        s.bytes_down_per_enrollment,
        s.datagrams_per_enrollment,
        s.frames_per_enrollment
    );
    if s.enrolled > 0 && s.phases != PhaseTable::default() {
        o.push_str(&crate::phases::render(&s.phases, s.enrolled));
    }
    if s.dcus > 0 {
        let mode = match s.dcu_mode {
            DcuMode::Router => "router",
            DcuMode::RelayStateless => "relay-stateless",
            DcuMode::RelayStateful => "relay-stateful",
        };
        let _ = writeln!(
            o,
            "DCUs              {:>10}   ({mode}) backhaul up {} B in {} datagrams / {} frames (queue drops {}), down {} B in {} datagrams / {} frames (queue drops {})",
            s.dcus,
            s.dcu_up.bytes,
            s.dcu_up.datagrams,
            s.dcu_up.frames,
            s.dcu_up.queue_drops,
            s.dcu_down.bytes,
            s.dcu_down.datagrams,
            s.dcu_down.frames,
            s.dcu_down.queue_drops
        );
        let per = |x: u64| {
            if s.enrolled == 0 {
                0.0
            } else {
                x as f64 / s.enrolled as f64
            }
        };
        let _ = writeln!(
            o,
            "backhaul per enrollment {:.0} B, {:.1} datagrams, {:.1} frames",
            per(s.dcu_up.bytes + s.dcu_down.bytes),
            per(s.dcu_up.datagrams + s.dcu_down.datagrams),
            per(s.dcu_up.frames + s.dcu_down.frames)
        );
        if s.dcu_mode != DcuMode::Router {
            let r = &s.relay;
            let _ = writeln!(
                o,
                "relay             {} datagrams up, {} down; overhead {:.1} B per datagram ({} B up, {} B down); dropped {}; circuits {}; state {} B ({:.1} B per meter)",
                r.forwarded_up,
                r.forwarded_down,
                r.overhead_per_datagram(),
                r.overhead_bytes_up,
                r.overhead_bytes_down,
                r.dropped,
                r.circuits_opened,
                r.state_bytes,
                r.state_bytes_per_meter
            );
        }
    }
    let _ = writeln!(
        o,
        "memory            RSS {} -> peak {} kB: {:.1} kB per meter, {:.1} kB per concurrent meter (peak in flight {})",
        s.rss_before_kb, s.rss_peak_kb, s.rss_per_meter_kb, s.rss_per_concurrent_meter_kb, s.peak_in_flight
    );
    o
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::driver::DriverConfig;
    use crate::dtls::DtlsClientConfig;
    use crate::schedule::{build_schedule, Arrival, FleetPlan};
    use crate::testutil::{server, FakeEst};
    use est_proto::coap::ClientConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fleet_behind_dcus_enrolls_and_every_certificate_is_distinct() {
        let mut est = FakeEst::new(31);
        let devices: Vec<DeviceIdentity> =
            (0..24).map(|i| est.device(&format!("SN3{i:05}"))).collect();
        let srv = server::spawn(est).await;
        let plan = FleetPlan {
            arrival: Arrival::Ramp {
                over: Duration::from_millis(500),
            },
            link: "latency=5ms,jitter=2ms,rate=250kbps".parse().unwrap(),
            max_hops: 2,
            meters_per_dcu: Some(8),
        };
        let serials: Vec<String> = devices.iter().map(|d| d.serial.clone()).collect();
        let plans = build_schedule(&plan, &serials, 9);
        let cfg = FleetConfig {
            concurrency: 6,
            driver: DriverConfig {
                server: srv.addr,
                failover: Vec::new(),
                bind: "127.0.0.1:0".parse().unwrap(),
                dtls: DtlsClientConfig {
                    trust_anchors_der: vec![srv.trust_anchor_der.clone()],
                    handshake_timeout: Duration::from_secs(10),
                    ..DtlsClientConfig::default()
                },
                coap: ClientConfig {
                    block1_szx: 4,
                    block2_szx: Some(4),
                    ..ClientConfig::default()
                },
                ack_timeout_auto: false,
                nat_rebind: false,
            },
            meter: MeterConfig::default(),
            dcu_link: "latency=2ms,rate=512kbps".parse().unwrap(),
            dcu_mode: DcuMode::Router,
            jpy_server: None,
            progress: false,
        };
        let r = tokio::time::timeout(Duration::from_secs(60), run_fleet(plans, devices, cfg, 9))
            .await
            .unwrap();
        let s = &r.summary;
        assert_eq!(s.meters, 24);
        assert_eq!(s.enrolled, 24, "{}", render_summary(s));
        assert_eq!(s.failed, 0);
        assert_eq!(s.dcus, 3);
        assert!(s.peak_in_flight <= 6 && s.peak_in_flight >= 1);
        assert_eq!(s.enrollment.count, 24);
        assert!(s.enrollment.p50_ms > 0.0 && s.enrollment.max_ms >= s.enrollment.p99_ms);
        assert!(s.frames_per_enrollment > s.datagrams_per_enrollment);
        // All DCU traffic is meter traffic: the DCUs carried the datagrams the meters' links
        // delivered, except the last close_notify of a session that may still be in flight.
        let delivered = s.up.datagrams - s.up.lost - s.up.queue_drops;
        assert!(s.dcu_up.datagrams <= delivered);
        assert!(s.dcu_up.datagrams + s.handshakes >= delivered);
        // Every meter holds a distinct certificate that the server issued.
        let est = srv.est.lock().unwrap();
        assert_eq!(est.issued.len(), 24);
        let mut hashes: Vec<String> = r
            .outcomes
            .iter()
            .map(|o| o.ldevid_sha256.clone().unwrap())
            .collect();
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), 24);
        let text = render_summary(s);
        assert!(text.contains("enrolled") && text.contains("p99"));
    }

    #[test]
    fn summary_counts_failures_by_reason() {
        let mk = |i: u64, failure: Option<FailureReason>| MeterOutcome {
            index: i,
            serial: format!("S{i}"),
            enrolled: failure.is_none(),
            renewed: false,
            failure,
            stats: crate::meter::MeterStats {
                handshake_us: Some(1000 * (i + 1)),
                enroll_us: Some(10_000 * (i + 1)),
                handshakes: 1,
                ..Default::default()
            },
            coap: Default::default(),
            link_up: LinkCounters {
                datagrams: 10,
                bytes: 1000,
                frames: 20,
                ..Default::default()
            },
            link_down: Default::default(),
            ldevid_sha256: None,
            ldevid_serial: None,
            nat_rebinds: 0,
            phases: Default::default(),
        };
        let outcomes: Vec<MeterOutcome> = (0..10)
            .map(|i| match i {
                0 | 1 => mk(i, Some(FailureReason::HandshakeTimeout)),
                2 => mk(
                    i,
                    Some(FailureReason::Rejected {
                        resource: "/sen".into(),
                        code: "4.03".into(),
                    }),
                ),
                _ => mk(i, None),
            })
            .collect();
        let s = summarize(&outcomes);
        assert_eq!((s.meters, s.enrolled, s.failed), (10, 7, 3));
        assert_eq!(s.failures_by_reason.get("handshake timeout"), Some(&2));
        assert_eq!(s.failures_by_reason.get("4.03 /sen"), Some(&1));
        assert_eq!(s.handshake.count, 10);
        assert!((s.handshake.max_ms - 10.0).abs() < 0.1);
        assert!((s.bytes_up_per_enrollment - 10_000.0 / 7.0).abs() < 1e-9);
        assert!((s.frames_per_enrollment - 200.0 / 7.0).abs() < 1e-9);
    }
}
