//! The run's report: JSON (machine-readable), a self-contained HTML page with SVG plots, and a
//! concise table for stdout.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::core_bench::CallgrindResult;
use crate::crypto::Ceiling;
use crate::steps::{HoldResult, StepResult};

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    /// /proc/loadavg when the run started and ended (other work on the box skews the figures).
    pub loadavg_at_start: String,
    #[serde(default)]
    pub loadavg_at_end: String,
}

impl Machine {
    pub(crate) fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb = client_sim::fleet::parse_status_kb(&meminfo, "MemTotal:").unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Machine {
            loadavg_at_start: loadavg(),
            loadavg_at_end: String::new(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            mem_total_gib: mem_kb as f64 / 1024.0 / 1024.0,
            kernel,
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Our server and libcoap doing the same exchange in the same run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct PeerComparison {
    pub concurrency: usize,
    pub ours: Option<StepResult>,
    pub libcoap: Option<StepResult>,
    /// ours.rate / libcoap.rate.
    pub ratio: Option<f64>,
    /// Full enrollments/s at peak / libcoap handshake+GET rate (the 1.7x target).
    pub enroll_peak_over_libcoap: Option<f64>,
    pub libcoap_command: String,
    /// Why the comparison was skipped or is incomplete.
    pub note: Option<String>,
    /// The profile of our handshake+GET step, on its way to [`Report::perf`].
    #[serde(skip)]
    pub perf: Option<Result<PerfProfile, String>>,
}

/// A perf profile of the server during one step, grouped by component.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct PerfProfile {
    /// Which step: "enroll" (closed loop) or "discover" (our handshake+GET).
    pub mode: String,
    pub concurrency: usize,
    /// The flat `perf report` beside the report.
    pub report_path: String,
    /// Server CPU per operation in that step (ms).
    pub server_cpu_ms_per_op: Option<f64>,
    /// (component, share of the samples in %), largest first.
    pub components: Vec<(String, f64)>,
}

impl PerfProfile {
    /// Each component's share of the step's server CPU per operation, in ms.
    pub(crate) fn ms_per_op(&self) -> Vec<(String, f64)> {
        let per_op = self.server_cpu_ms_per_op.unwrap_or(0.0);
        self.components
            .iter()
            .map(|(name, pct)| (name.clone(), per_op * pct / 100.0))
            .collect()
    }
}

/// Where a full enrollment's server CPU beyond a bare handshake+GET goes: per component, the
/// enrollment step's ms per op minus the handshake+GET step's (largest difference first).
pub(crate) fn est_over_handshake(enroll: &PerfProfile, hs: &PerfProfile) -> Vec<(String, f64)> {
    let mut diff: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for (name, ms) in enroll.ms_per_op() {
        *diff.entry(name).or_default() += ms;
    }
    for (name, ms) in hs.ms_per_op() {
        *diff.entry(name).or_default() -= ms;
    }
    let mut v: Vec<(String, f64)> = diff.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// A target of the issue and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct TargetCheck {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
    pub note: String,
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct Report {
    pub run_id: String,
    pub date_utc: String,
    pub command: String,
    pub machine: Machine,
    pub server_mode: String,
    pub server_addr: String,
    pub server_bin: Option<String>,
    pub server_cpus: Option<String>,
    pub client_cpus: Option<String>,
    /// The load generator's DTLS client library (client-sim backend): "dimpl", "webrtc" or
    /// "openssl" (empty in reports written before the field existed: webrtc).
    #[serde(default)]
    pub client_dtls: String,
    /// Where the server's issuing CA key was: "file (ring)" or "SoftHSM2 token (PKCS#11)"
    /// (empty in reports written before the field existed, and for --server runs).
    #[serde(default)]
    pub ca_key: String,
    pub devices: usize,
    pub step_duration_s: f64,
    pub warmup_s: f64,
    pub crypto: Option<Ceiling>,
    pub steps: Vec<StepResult>,
    pub peak_rate: f64,
    pub peak_concurrency: usize,
    /// peak enrollments/s / crypto ceiling of the box.
    pub ratio_to_ceiling: Option<f64>,
    /// model crypto cost / server CPU per enrollment at peak: the share of the server's time
    /// spent in the curve operations the model counts.
    pub crypto_share_of_server_cpu: Option<f64>,
    pub peer: Option<PeerComparison>,
    pub hold: Option<HoldResult>,
    pub callgrind: Option<CallgrindResult>,
    /// The DTLS engine's instructions per session under callgrind (`loadtest dtls-bench`),
    /// server side and meter side.
    #[serde(default)]
    pub dtls_callgrind: Option<crate::dtls_bench::DtlsCounts>,
    /// Native wall time of one `enroll_once` (µs), median of a short run.
    pub core_native_us: Option<f64>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
    /// perf profiles of the server (`--perf-step N`): the N-meter enrollment step and, when N is
    /// the peer comparison's concurrency, our handshake+GET step.
    #[serde(default)]
    pub perf: Vec<PerfProfile>,
    /// `--store postgres`: the same closed-loop step on SQLite and on PostgreSQL (group commit
    /// on and off, one node and `--nodes`), in this run.
    #[serde(default)]
    pub store_comparison: Vec<StoreRow>,
}

/// One row of the storage comparison.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct StoreRow {
    /// `sqlite` or `postgres`.
    pub store: String,
    pub nodes: usize,
    /// `[storage] max_batch` (1 = no group commit).
    pub max_batch: usize,
    pub step: crate::steps::StepResult,
}

/// The storage comparison as a text table (empty without one).
pub(crate) fn render_store_table(r: &Report) -> String {
    let mut o = String::new();
    if r.store_comparison.is_empty() {
        return o;
    }
    let _ = writeln!(
        o,
        "\nstorage (closed loop, same run): cpu ms/op = est-server nodes + PostgreSQL processes per enrollment; db = PostgreSQL's part"
    );
    let _ = writeln!(
        o,
        "{:<9} {:>5} {:>9} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "store",
        "nodes",
        "max_batch",
        "conc",
        "ops/s",
        "cpu ms",
        "db ms",
        "p50 ms",
        "p99 ms",
        "errors"
    );
    for row in &r.store_comparison {
        let s = &row.step;
        let _ = writeln!(
            o,
            "{:<9} {:>5} {:>9} {:>5} {:>8.0} {:>8} {:>8} {:>8.1} {:>8.1} {:>6}",
            row.store,
            row.nodes,
            row.max_batch,
            s.concurrency,
            s.rate_per_s,
            fmt_opt(s.server_cpu_ms_per_op, 3),
            fmt_opt(s.db_cpu_ms_per_op, 3),
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.errors
        );
    }
    o
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// The stdout table.
/// "load generator: client-sim, openssl DTLS client (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8)".
pub(crate) fn load_generator(r: &Report) -> String {
    let backend = if r.client_dtls.is_empty() {
        "webrtc"
    } else {
        r.client_dtls.as_str()
    };
    let suite = match backend {
        "dimpl" => "AES_128_GCM",
        "webrtc" | "openssl" | "native" => "AES_128_CCM_8",
        _ => "?",
    };
    format!("load generator: client-sim, {backend} DTLS client (TLS_ECDHE_ECDSA_WITH_{suite})")
}

pub(crate) fn render_table(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", load_generator(r));
    if !r.ca_key.is_empty() {
        let _ = writeln!(o, "issuing CA key: {}", r.ca_key);
    }
    let _ = writeln!(
        o,
        "columns: cpu ms/op = server CPU per operation; gen ms/op = the load generator's CPU per operation; srv / box = cores busy in the server / on the whole machine"
    );
    let _ = writeln!(
        o,
        "{:<10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8} {:>7} {:>7}",
        "target",
        "conc",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "cpu ms/op",
        "gen ms/op",
        "srv",
        "box",
        "rss MB",
        "B/op",
        "errors",
        "retries"
    );
    let all = r.steps.iter().chain(
        r.peer
            .iter()
            .flat_map(|p| p.ours.iter().chain(p.libcoap.iter())),
    );
    for s in all {
        let name = if s.mode == "enroll" && s.arrival_rate.is_some() {
            "open-loop".to_string()
        } else if s.mode == "enroll" {
            "enroll".to_string()
        } else if s.target.starts_with("libcoap") {
            "libcoap hs".to_string()
        } else {
            "ours hs".to_string()
        };
        let _ = writeln!(
            o,
            "{:<10} {:>5} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8.0} {:>7} {:>7}",
            name,
            if s.arrival_rate.is_some() {
                "-".to_string()
            } else {
                s.concurrency.to_string()
            },
            s.rate_per_s,
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.max_ms,
            fmt_opt(s.server_cpu_ms_per_op, 3),
            fmt_opt(s.client_cpu_ms_per_op(), 3),
            fmt_opt(s.server_cores_busy, 2),
            fmt_opt(s.machine_cores_busy, 2),
            fmt_opt(s.server_rss_peak_kb.map(|k| k as f64 / 1024.0), 1),
            s.bytes_up_per_op + s.bytes_down_per_op,
            s.errors,
            s.retries
        );
    }
    if let Some(c) = &r.crypto {
        let _ = writeln!(
            o,
            "crypto: sign {:.1} us, verify {:.1} us, ECDH {:.1} us -> {:.0} us/enrollment (2S+3V+1E), ceiling {:.0}/s per core, {:.0}/s on {} cores; peak/ceiling {}",
            c.sign.us_per_op,
            c.verify.us_per_op,
            c.ecdh.us_per_op,
            c.model_us_per_enrollment,
            c.ceiling_per_core,
            c.ceiling,
            c.server_cores,
            fmt_opt(r.ratio_to_ceiling, 2)
        );
    }
    if let Some(p) = &r.peer {
        match (&p.ours, &p.libcoap, &p.note) {
            (Some(a), Some(b), _) => {
                let _ = writeln!(
                    o,
                    "peer (handshake + GET /.well-known/core, {} meters): ours {:.0}/s, libcoap {:.0}/s, ratio {}; full enrollments at peak / libcoap = {}",
                    p.concurrency,
                    a.rate_per_s,
                    b.rate_per_s,
                    fmt_opt(p.ratio, 2),
                    fmt_opt(p.enroll_peak_over_libcoap, 2)
                );
            }
            (_, _, Some(n)) => {
                let _ = writeln!(o, "peer: {n}");
            }
            _ => {}
        }
    }
    if let Some(h) = &r.hold {
        let _ = writeln!(
            o,
            "held {} of {} sessions at once: server RSS {} MB ({} kB/session), opened in {:.1} s",
            h.held,
            h.requested,
            fmt_opt(h.server_rss_held_kb.map(|k| k as f64 / 1024.0), 1),
            fmt_opt(h.server_kb_per_session, 1),
            h.open_s
        );
    }
    if let Some(c) = &r.callgrind {
        let _ = writeln!(
            o,
            "core path (callgrind): {} instructions per enrollment ({} iterations)",
            c.instructions_per_enrollment, c.iterations
        );
    }
    if let Some(d) = &r.dtls_callgrind {
        let _ = writeln!(
            o,
            "DTLS engine (callgrind): {} instructions per session on the server, {} on the meter",
            d.server, d.client
        );
    }
    for t in &r.targets {
        let mark = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let _ = writeln!(
            o,
            "target {:<44} {:<7} measured {} ({})",
            t.name, mark, t.measured, t.note
        );
    }
    o.push_str(&render_store_table(r));
    o
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Closed-loop enrollment steps (the concurrency axis).
fn enroll_steps(r: &Report) -> Vec<&StepResult> {
    r.steps
        .iter()
        .filter(|s| s.mode == "enroll" && s.arrival_rate.is_none())
        .collect()
}

fn plot_throughput(r: &Report, out: &mut String) -> PlotResult {
    let steps = enroll_steps(r);
    let max_c = steps
        .iter()
        .map(|s| s.concurrency)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let mut max_y = steps.iter().map(|s| s.rate_per_s).fold(1.0, f64::max);
    // Only finite figures shape the axes and get drawn: plotters does not return on an
    // infinite or NaN range.
    let ceiling = r
        .crypto
        .as_ref()
        .map(|c| c.ceiling)
        .filter(|c| c.is_finite());
    if let Some(c) = ceiling {
        max_y = max_y.max(c);
    }
    let libcoap = r
        .peer
        .as_ref()
        .and_then(|p| p.libcoap.as_ref())
        .map(|s| s.rate_per_s);
    if let Some(l) = libcoap {
        max_y = max_y.max(l);
    }
    let root = SVGBackend::with_string(out, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Full enrollments/s vs concurrent meters",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d((1.0f64..max_c * 1.2).log_scale(), 0.0f64..max_y * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("concurrent meters (log)")
        .y_desc("per second")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            steps
                .iter()
                .map(|s| (s.concurrency.max(1) as f64, s.rate_per_s)),
            PALETTE[0].stroke_width(2),
        ))?
        .label("enrollments/s (ours)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[0]));
    chart.draw_series(steps.iter().map(|s| {
        Circle::new(
            (s.concurrency.max(1) as f64, s.rate_per_s),
            3,
            PALETTE[0].filled(),
        )
    }))?;
    if let Some(c) = ceiling {
        chart
            .draw_series(LineSeries::new(
                [(1.0, c), (max_c * 1.2, c)],
                PALETTE[3].stroke_width(1),
            ))?
            .label("crypto ceiling (2S+3V+1E, all cores)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[3]));
    }
    if let Some(l) = libcoap {
        chart
            .draw_series(LineSeries::new(
                [(1.0, l), (max_c * 1.2, l)],
                PALETTE[1].stroke_width(1),
            ))?
            .label("libcoap handshake+GET/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[1]));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_cdf(r: &Report, out: &mut String) -> PlotResult {
    let steps: Vec<&StepResult> = r.steps.iter().filter(|s| s.mode == "enroll").collect();
    let max_x = steps
        .iter()
        .flat_map(|s| s.latency.cdf.iter().map(|p| p.0))
        .fold(2.0, f64::max);
    let min_x = steps
        .iter()
        .flat_map(|s| s.latency.cdf.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .fold(max_x, f64::min)
        .max(0.01);
    let root = SVGBackend::with_string(out, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Enrollment latency CDF per step", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((min_x * 0.8..max_x * 1.2).log_scale(), 0.0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log)")
        .y_desc("fraction")
        .draw()?;
    for (s, &color) in steps.iter().zip(PALETTE.iter().cycle()) {
        chart
            .draw_series(LineSeries::new(
                s.latency.cdf.iter().map(|&(x, q)| (x.max(min_x), q)),
                color.stroke_width(2),
            ))?
            .label(match s.arrival_rate {
                Some(rate) => format!("open loop {rate:.0}/s"),
                None if s.concurrency == 1 => "1 meter".to_string(),
                None => format!("{} meters", s.concurrency),
            })
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_cpu(r: &Report, out: &mut String) -> PlotResult {
    let steps = enroll_steps(r);
    let pts: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|s| {
            s.server_cpu_ms_per_op
                .map(|c| (s.concurrency.max(1) as f64, c))
        })
        .collect();
    let max_c = steps
        .iter()
        .map(|s| s.concurrency)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let model_ms = r
        .crypto
        .as_ref()
        .map(|c| c.model_us_per_enrollment / 1000.0)
        .filter(|m| m.is_finite());
    let max_y = pts
        .iter()
        .map(|p| p.1)
        .chain(model_ms)
        .chain([1.0])
        .fold(0.1, f64::max);
    let root = SVGBackend::with_string(out, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Server CPU per full enrollment", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d((1.0f64..max_c * 1.2).log_scale(), 0.0f64..max_y * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("concurrent meters (log)")
        .y_desc("CPU ms")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            pts.iter().copied(),
            PALETTE[2].stroke_width(2),
        ))?
        .label("server CPU ms / enrollment")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[2]));
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, PALETTE[2].filled())))?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, 1.0), (max_c * 1.2, 1.0)],
            PALETTE[3].stroke_width(1),
        ))?
        .label("target 1.0 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[3]));
    if let Some(m) = model_ms {
        chart
            .draw_series(LineSeries::new(
                [(1.0, m), (max_c * 1.2, m)],
                PALETTE[4].stroke_width(1),
            ))?
            .label("crypto model (2S+3V+1E)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[4]));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The self-contained HTML report (inline SVG, no scripts, no external resources).
pub(crate) fn render_html(r: &Report) -> String {
    let mut svgs = Vec::new();
    for f in [plot_throughput, plot_cdf, plot_cpu] {
        let mut s = String::new();
        match f(r, &mut s) {
            Ok(()) => svgs.push(s),
            Err(e) => svgs.push(format!("<p>plot failed: {}</p>", esc(&e.to_string()))),
        }
    }
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>loadtest {id}</title>\
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}th{{background:#eee}}.missed{{color:#b00}}.met{{color:#070}}\
pre{{background:#f6f6f6;padding:6px;overflow-x:auto}}</style></head><body>\
<h1>EST-coaps load test {id}</h1><p>{date} &middot; {cpus} CPUs ({model}), {mem:.1} GiB, Linux {kernel}, load average at start {load}, at end {load_end}</p>\
<p>{generator}</p><pre>{cmd}</pre>",
        generator = esc(&load_generator(r)),
        id = esc(&r.run_id),
        date = esc(&r.date_utc),
        cpus = r.machine.cpus,
        model = esc(&r.machine.cpu_model),
        mem = r.machine.mem_total_gib,
        kernel = esc(&r.machine.kernel),
        load = esc(&r.machine.loadavg_at_start),
        load_end = esc(&r.machine.loadavg_at_end),
        cmd = esc(&r.command)
    );
    h.push_str("<h2>Targets</h2><table><tr><th>target</th><th>goal</th><th>measured</th><th>status</th><th>note</th></tr>");
    for t in &r.targets {
        let (cls, txt) = match t.met {
            Some(true) => ("met", "met"),
            Some(false) => ("missed", "missed"),
            None => ("", "not measured"),
        };
        let _ = write!(
            h,
            "<tr><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td class=\"{cls}\">{txt}</td><td style=\"text-align:left\">{}</td></tr>",
            esc(&t.name),
            esc(&t.target),
            esc(&t.measured),
            esc(&t.note)
        );
    }
    h.push_str("</table><h2>Steps</h2><table><tr><th>target</th><th>mode</th><th>meters</th><th>ops/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>handshake p50 ms</th><th>server CPU ms/op</th><th>server cores busy</th><th>load generator CPU ms/op</th><th>machine cores busy</th><th>server peak RSS MB</th><th>B up/op</th><th>B down/op</th><th>datagrams/op</th><th>errors</th><th>retries</th></tr>");
    let all = r.steps.iter().chain(
        r.peer
            .iter()
            .flat_map(|p| p.ours.iter().chain(p.libcoap.iter())),
    );
    for s in all {
        let _ = write!(
            h,
            "<tr><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.target),
            match s.arrival_rate {
                Some(rate) => format!("{} (open loop, {rate:.0}/s offered)", s.mode),
                None => s.mode.clone(),
            },
            match s.arrival_rate {
                // Open loop: arrivals decide the concurrency; this is only its cap.
                Some(_) => format!("up to {}", s.concurrency),
                None => s.concurrency.to_string(),
            },
            s.rate_per_s,
            s.latency.p50_ms,
            s.latency.p90_ms,
            s.latency.p99_ms,
            s.latency.max_ms,
            s.handshake.p50_ms,
            fmt_opt(s.server_cpu_ms_per_op, 3),
            fmt_opt(s.server_cores_busy, 2),
            fmt_opt(s.client_cpu_ms_per_op(), 3),
            fmt_opt(s.machine_cores_busy, 2),
            fmt_opt(s.server_rss_peak_kb.map(|k| k as f64 / 1024.0), 1),
            s.bytes_up_per_op,
            s.bytes_down_per_op,
            s.datagrams_per_op,
            s.errors,
            s.retries
        );
    }
    h.push_str("</table>");
    for svg in &svgs {
        h.push_str("<div>");
        h.push_str(svg);
        h.push_str("</div>");
    }
    h.push_str("<h2>Crypto ceiling, peer, memory, core path</h2><pre>");
    h.push_str(&esc(&render_table(r)));
    h.push_str("</pre>");
    if !r.notes.is_empty() {
        h.push_str("<h2>Notes</h2><ul>");
        for n in &r.notes {
            let _ = write!(h, "<li>{}</li>", esc(n));
        }
        h.push_str("</ul>");
    }
    h.push_str("<p>Raw figures: report.json beside this file.</p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::steps::Latency;
    use std::time::Duration;

    fn step(c: usize, rate: f64) -> StepResult {
        StepResult {
            target: "est-server".into(),
            mode: "enroll".into(),
            concurrency: c,
            rate_per_s: rate,
            server_cpu_ms_per_op: Some(1.2),
            latency: Latency {
                count: 10,
                p50_ms: 3.0,
                p99_ms: 9.0,
                max_ms: 12.0,
                cdf: vec![(1.0, 0.0), (3.0, 0.5), (9.0, 0.99), (12.0, 1.0)],
                ..Latency::default()
            },
            ..StepResult::default()
        }
    }

    #[test]
    fn plots_finish_when_the_crypto_figures_are_not_finite() {
        let mut r = Report {
            steps: vec![step(1, 50.0)],
            ..Report::default()
        };
        let mut c = crate::crypto::measure(Duration::ZERO, 2.0).unwrap();
        assert!(
            c.ceiling.is_finite() && c.ceiling > 0.0,
            "zero budget: {c:?}"
        );
        c.ceiling = f64::INFINITY;
        c.model_us_per_enrollment = f64::NAN;
        r.crypto = Some(c);
        let h = render_html(&r);
        assert_eq!(h.matches("<svg").count(), 3, "{h}");
    }

    #[test]
    fn table_shows_the_load_generators_cpu_per_operation() {
        let mut s = step(64, 1000.0);
        s.completed = 500;
        s.client_cpu_s = Some(0.4);
        assert_eq!(s.client_cpu_ms_per_op(), Some(0.8));
        let r = Report {
            steps: vec![s, step(8, 300.0)],
            ..Report::default()
        };
        let t = render_table(&r);
        let row = t.lines().find(|l| l.contains(" 1000.0 ")).unwrap();
        assert!(row.contains(" 0.800 "), "{t}");
        // No generator CPU sampled (or nothing completed): a dash, not a made-up figure.
        let other = t.lines().find(|l| l.contains(" 300.0 ")).unwrap();
        assert_eq!(other.matches(" - ").count(), 4, "{t}");
    }

    #[test]
    fn html_is_self_contained_with_three_svg_plots_and_the_table() {
        let open_loop = StepResult {
            arrival_rate: Some(205.0),
            ..step(4096, 204.9)
        };
        let r = Report {
            run_id: "t<1>".into(),
            steps: vec![step(1, 50.0), step(8, 300.0), step(64, 410.5), open_loop],
            targets: vec![TargetCheck {
                name: "rate".into(),
                target: ">= 1000/s".into(),
                measured: "410.5/s".into(),
                met: Some(false),
                note: "x".into(),
            }],
            client_dtls: "openssl".into(),
            ca_key: String::new(),
            ..Report::default()
        };
        let h = render_html(&r);
        assert!(h.contains(
            "load generator: client-sim, openssl DTLS client (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8)"
        ));
        assert_eq!(h.matches("<svg").count(), 3, "{h}");
        assert!(!h.contains("plot failed"));
        assert!(h.contains("t&lt;1&gt;") && !h.contains("t<1>"));
        assert!(!h.contains("<script") && !h.contains("src=\"http"));
        assert!(h.contains("410.5") && h.contains("missed"));
        // The open-loop step says so, and that its meter count is only a cap.
        assert!(
            h.contains(
                "<td>enroll (open loop, 205/s offered)</td><td>up to 4096</td><td>204.9</td>"
            ),
            "{h}"
        );
        let t = render_table(&r);
        assert!(t.lines().count() >= 5 && t.contains("MISSED"), "{t}");
        assert!(
            t.starts_with(
                "load generator: client-sim, openssl DTLS client (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8)\n"
            ),
            "{t}"
        );
        // The JSON round-trips.
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&j).unwrap(), r);
    }
}
