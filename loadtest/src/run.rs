//! One load-test run: the crypto ceiling, the server (a fresh child or a remote one), the
//! stepped closed-loop and open-loop enrollment steps, the libcoap comparison, held sessions,
//! the core path, and the report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use client_sim::dtls::DtlsBackend;
use est_proto::store::{unix_seconds, UtcDateTime};

use crate::cli::{CaKey, Cli, StoreKind};
use crate::perf::{est_over_handshake_note, finish_perf, perf_summary, start_perf};
use crate::report::{self, Machine, Report};
use crate::server::{self, ChildServer};
use crate::steps::{self, Mode, StepConfig, Target};
use crate::{core_bench, crypto, peer, targets};

/// The run's date (RFC 3339) and id (`YYYYMMDD-HHMMSS`), in UTC.
fn now_strings() -> (String, String) {
    let t = UtcDateTime::from_unix_seconds(unix_seconds(SystemTime::now()));
    (t.rfc3339(), t.compact())
}

/// Re-executes this program under `taskset -c CPUS` (once).
pub(crate) fn reexec_pinned(cpus: &str) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new("taskset")
        .arg("-c")
        .arg(cpus)
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("LOADTEST_PINNED", cpus)
        .status()
        .context("running taskset (util-linux)")?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

pub(crate) fn cpu_count(list: &str) -> f64 {
    // "0", "0,1", "0-3", "0-1,4".
    list.split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => f64::from(b - a + 1),
                _ => 1.0,
            },
            None => 1.0,
        })
        .sum()
}

pub(crate) struct Setup {
    pub target: Target,
    pub server: Option<ChildServer>,
    pub data_dir: Option<PathBuf>,
    pub server_bin: Option<PathBuf>,
}

fn setup_local(cli: &Cli, out: &Path, devices: usize) -> Result<Setup> {
    let bin = server::locate_est_server(cli.est_server.as_deref())?;
    let data = out.join("est-data");
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    let d = data.display().to_string();
    match cli.ca_key {
        CaKey::File => {
            server::est_server_cmd(&bin, &["init", "--data-dir", &d])?;
        }
        CaKey::Softhsm => server::init_with_softhsm(&bin, out, &data)?,
    }
    let mut edits: Vec<(String, String, String)> = Vec::new();
    for kv in &cli.server_config {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--server-config {kv}: expected SECTION.KEY=VALUE"))?;
        let (sec, key) = k
            .split_once('.')
            .with_context(|| format!("--server-config {kv}: expected SECTION.KEY=VALUE"))?;
        edits.push((sec.trim().into(), key.trim().into(), v.trim().into()));
    }
    // dimpl (the default generator) is a WebRTC-derived DTLS stack: it offers use_srtp and gives
    // up unless the server answers it, which est-server does only when told to.
    if cli.client_dtls == DtlsBackend::Dimpl
        && !edits
            .iter()
            .any(|(s, k, _)| s == "dtls" && k == "answer_use_srtp")
    {
        edits.push(("dtls".into(), "answer_use_srtp".into(), "true".into()));
    }
    let edits_ref: Vec<(&str, &str, String)> = edits
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.clone()))
        .collect();
    if !edits_ref.is_empty() {
        server::set_config(&data, &edits_ref)?;
    }
    let fleet_dir = out.join("fleet");
    if fleet_dir.exists() {
        std::fs::remove_dir_all(&fleet_dir)?;
    }
    let f = fleet_dir.display().to_string();
    let count = devices.to_string();
    server::est_server_cmd(
        &bin,
        &[
            "factory",
            "mint",
            "--data-dir",
            &d,
            "--count",
            &count,
            "--out",
            &f,
        ],
    )?;
    let fleet = client_sim::pki::load_fleet(&fleet_dir, None)?;
    let child = server::start_est_server(&bin, &data, cli.server_cpus.as_deref())?;
    Ok(Setup {
        target: Target {
            name: "est-server".into(),
            addr: child.addr,
            devices: Arc::new(fleet.devices),
            trust_anchors_der: fleet.implicit_ta_der,
            pid: Some(child.pid()),
            more_nodes: Vec::new(),
            db_postmaster: None,
        },
        server: Some(child),
        data_dir: Some(data),
        server_bin: Some(bin),
    })
}

fn setup_remote(addr: std::net::SocketAddr, fleet_dir: &Path) -> Result<Setup> {
    let fleet = client_sim::pki::load_fleet(fleet_dir, None)?;
    if fleet.implicit_ta_der.is_empty() {
        bail!("{}: no implicit-ta.pem", fleet_dir.display());
    }
    Ok(Setup {
        target: Target {
            name: format!("est-server at {addr}"),
            addr,
            devices: Arc::new(fleet.devices),
            trust_anchors_der: fleet.implicit_ta_der,
            pid: None,
            more_nodes: Vec::new(),
            db_postmaster: None,
        },
        server: None,
        data_dir: None,
        server_bin: None,
    })
}

fn server_alive(setup: &mut Setup) -> bool {
    setup.server.as_mut().is_none_or(ChildServer::alive)
}

pub(crate) fn warmup_of(d: Duration) -> Duration {
    (d / 5).min(Duration::from_secs(2))
}

/// The run's effective settings: the options, with `--smoke`'s small values in place.
struct Plan {
    smoke: bool,
    progress: bool,
    steps: Vec<usize>,
    duration: Duration,
    devices: usize,
    crypto_budget: Duration,
}

impl Plan {
    fn of(cli: &Cli) -> Self {
        let smoke = cli.smoke;
        Plan {
            smoke,
            progress: !cli.no_progress,
            steps: if smoke { vec![1, 4] } else { cli.steps.clone() },
            duration: if smoke {
                Duration::from_secs(3)
            } else {
                cli.step_duration
            },
            // Every held session is its own meter: the server keeps at most
            // `dtls.max_sessions_per_identity` sessions per device, as a real fleet would see.
            devices: if smoke {
                16
            } else {
                cli.devices.max(cli.hold_sessions).max(1)
            },
            crypto_budget: if smoke {
                Duration::from_millis(100)
            } else {
                cli.crypto_duration
            },
        }
    }
}

pub(crate) async fn run(cli: Cli) -> Result<bool> {
    let (date, run_id) = now_strings();
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/loadtest").join(&run_id));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let plan = Plan::of(&cli);
    let (duration, devices, crypto_budget) = (plan.duration, plan.devices, plan.crypto_budget);
    let machine = Machine::detect();
    let server_cores = cli
        .server_cpus
        .as_deref()
        .map_or(machine.cpus as f64, cpu_count);

    let mut report = Report {
        run_id: run_id.clone(),
        date_utc: date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        server_cpus: cli.server_cpus.clone(),
        client_cpus: cli.client_cpus.clone(),
        client_dtls: cli.client_dtls.name().into(),
        ca_key: if cli.server.is_some() {
            String::new()
        } else {
            cli.ca_key.describe().into()
        },
        devices,
        step_duration_s: duration.as_secs_f64(),
        warmup_s: warmup_of(duration).as_secs_f64(),
        ..Report::default()
    };

    // 1. Crypto ceiling, before any server runs.
    eprintln!(
        "loadtest: measuring the crypto ceiling ({} ms per operation)",
        crypto_budget.as_millis()
    );
    let crypto = tokio::task::spawn_blocking(move || crypto::measure(crypto_budget, server_cores))
        .await
        .context("crypto task")??;
    report.crypto = Some(crypto);

    // 2. The server.
    let mut setup = match (&cli.server, &cli.fleet) {
        (Some(addr), Some(fleet)) => setup_remote(*addr, fleet)?,
        (Some(_), None) => bail!("--server needs --fleet DIR"),
        _ => {
            eprintln!("loadtest: starting a fresh est-server with {devices} minted devices");
            setup_local(&cli, &out, devices)?
        }
    };
    report.server_mode = if setup.server.is_some() {
        "child"
    } else {
        "remote"
    }
    .into();
    report.server_addr = setup.target.addr.to_string();
    report.server_bin = setup.server_bin.as_ref().map(|p| p.display().to_string());
    eprintln!("loadtest: server at coaps://{}", setup.target.addr);

    // 3. Enrollment steps (closed loop).
    let mut ok = enrollment_steps(&cli, &plan, &mut setup, &out, &mut report).await;
    record_peak(&mut report);

    // 4. Open loop at half the peak rate: the latency target.
    if !cli.no_half_rate && report.peak_rate > 0.0 && server_alive(&mut setup) {
        ok &= half_rate_step(&cli, &plan, &setup, &mut report).await;
    }

    // 5. Side by side with libcoap.
    let peer_c = if plan.smoke { 4 } else { cli.peer_concurrency };
    if peer_c > 0 && server_alive(&mut setup) {
        ok &= peer_comparison(&cli, &plan, &setup, &out, peer_c, &mut report).await;
    }

    // 6. Many sessions held at once: server memory.
    let hold_n = if plan.smoke { 50 } else { cli.hold_sessions };
    if hold_n > 0 && server_alive(&mut setup) {
        let h = steps::hold_sessions(
            cli.transport(),
            cli.client_dtls,
            &setup.target,
            hold_n,
            128,
            plan.progress,
        )
        .await;
        if h.held == 0 {
            ok = false;
        }
        report.hold = Some(h);
    }
    // 6b. The storage comparison: SQLite beside PostgreSQL (one node and --nodes).
    if cli.store == StoreKind::Postgres && server_alive(&mut setup) {
        ok &= store_comparison(&cli, &plan, &setup, &out, &mut report).await;
    }
    if !server_alive(&mut setup) {
        eprintln!("loadtest: the server is no longer running");
        ok = false;
    }
    drop(setup.server.take());

    // 7. The core path: native time, and instructions under callgrind.
    ok &= core_path(&cli, &plan, &out, &mut report).await?;

    report.machine.loadavg_at_end = report::loadavg();
    report.targets = targets::targets(&report);
    if plan.smoke {
        report
            .notes
            .push("smoke run: tiny fleet and short steps; the figures are not benchmarks".into());
    }
    write_report(&report, &out)?;
    Ok(ok)
}

/// `--store postgres`: the closed-loop step at `--store-concurrency` on the SQLite server, then
/// on a throwaway PostgreSQL with group commit and without, and on `--nodes` nodes; false when
/// a PostgreSQL step enrolled nothing or PostgreSQL could not start.
async fn store_comparison(
    cli: &Cli,
    plan: &Plan,
    setup: &Setup,
    out: &Path,
    report: &mut Report,
) -> bool {
    use est_test_tools::pg::{PgOptions, TestPostgres};
    let (Some(bin), Some(data)) = (&setup.server_bin, &setup.data_dir) else {
        report
            .notes
            .push("storage comparison: needs a local server (not --server)".into());
        return false;
    };
    let c = if plan.smoke { 4 } else { cli.store_concurrency };
    let nodes = usize::from(cli.nodes);
    let step = |label: String, seed: u64| StepConfig {
        mode: Mode::Enroll,
        transport: cli.transport(),
        dtls_backend: cli.client_dtls,
        concurrency: c,
        duration: plan.duration,
        warmup: warmup_of(plan.duration),
        drain_timeout: Duration::from_secs(30),
        seed,
        arrival_rate: None,
        progress: plan.progress,
        label,
    };
    // est-server's default [storage] max_batch (what `est-server init` writes).
    let max_batch_default = 256;
    let r = steps::run_step(
        &setup.target,
        &step(format!("sqlite, {c} meters"), cli.seed ^ 0x5e11),
    )
    .await;
    report.store_comparison.push(report::StoreRow {
        store: "sqlite".into(),
        nodes: 1,
        max_batch: max_batch_default,
        step: r,
    });
    eprintln!("loadtest: starting a throwaway PostgreSQL (fsync on)");
    let pg = match TestPostgres::start(PgOptions {
        fsync: true,
        max_connections: 100 + 20 * nodes as u32,
        ..PgOptions::default()
    }) {
        Ok(pg) => pg,
        Err(e) => {
            report
                .notes
                .push(format!("storage comparison: PostgreSQL did not start: {e}"));
            return false;
        }
    };
    let postmaster = pg.postmaster_pid();
    let mut ok = true;
    let mut variants = vec![(1usize, max_batch_default), (1, 1)];
    if nodes > 1 {
        variants.push((nodes, max_batch_default));
    }
    for (i, (n, max_batch)) in variants.into_iter().enumerate() {
        let db = format!("loadtest{i}");
        let url = match pg.create_database(&db) {
            Ok(u) => u,
            Err(e) => {
                report.notes.push(format!("storage comparison: {e}"));
                return false;
            }
        };
        let pg_data = out.join(format!("est-data-pg{i}"));
        let _ = std::fs::remove_dir_all(&pg_data);
        let started = server::copy_dir(data, &pg_data).and_then(|()| {
            server::set_config(
                &pg_data,
                &[
                    ("storage", "backend", "\"postgres\"".into()),
                    ("storage", "url", format!("\"{url}\"")),
                    ("storage", "max_batch", max_batch.to_string()),
                ],
            )?;
            (0..n)
                .map(|k| {
                    server::start_est_server_named(
                        bin,
                        &pg_data,
                        cli.server_cpus.as_deref(),
                        &format!("server-{k}.log"),
                    )
                })
                .collect::<Result<Vec<ChildServer>>>()
        });
        let children = match started {
            Ok(c) => c,
            Err(e) => {
                report.notes.push(format!(
                    "storage comparison: est-server on PostgreSQL: {e:#}"
                ));
                return false;
            }
        };
        let Some((first, more)) = children.split_first() else {
            report
                .notes
                .push(format!("storage comparison: x{n} started no est-server"));
            return false;
        };
        let target = steps::Target {
            name: format!("est-server x{n} on postgres"),
            addr: first.addr,
            devices: setup.target.devices.clone(),
            trust_anchors_der: setup.target.trust_anchors_der.clone(),
            pid: Some(first.pid()),
            more_nodes: more.iter().map(|c| (c.addr, c.pid())).collect(),
            db_postmaster: postmaster,
        };
        let label = format!("postgres x{n}, batch {max_batch}, {c} meters");
        let r = steps::run_step(&target, &step(label, cli.seed ^ 0x9e00 ^ i as u64)).await;
        if r.completed == 0 {
            ok = false;
        }
        report.store_comparison.push(report::StoreRow {
            store: "postgres".into(),
            nodes: n,
            max_batch,
            step: r,
        });
        drop(children);
    }
    report.notes.push(format!(
        "storage comparison: PostgreSQL {} (throwaway cluster, fsync on, unix socket, same machine)",
        pg.version().unwrap_or_else(|_| "?".into())
    ));
    ok
}

/// The closed-loop enrollment steps, one per `--steps` entry (profiled with `--perf-step`);
/// false when a step failed or the server exited.
async fn enrollment_steps(
    cli: &Cli,
    plan: &Plan,
    setup: &mut Setup,
    out: &Path,
    report: &mut Report,
) -> bool {
    let (duration, progress) = (plan.duration, plan.progress);
    let mut ok = true;
    for (i, &c) in plan.steps.iter().enumerate() {
        let cfg = StepConfig {
            mode: Mode::Enroll,
            transport: cli.transport(),
            dtls_backend: cli.client_dtls,
            concurrency: c,
            duration,
            warmup: warmup_of(duration),
            drain_timeout: Duration::from_secs(30),
            seed: cli.seed ^ ((i as u64) << 40),
            arrival_rate: None,
            progress,
            label: format!("enroll, {c} meters"),
        };
        let perf = match (cli.perf_step == Some(c), setup.target.pid) {
            (true, Some(pid)) => start_perf(pid, out, "perf", cfg.warmup, duration - cfg.warmup),
            _ => None,
        };
        let r = steps::run_step(&setup.target, &cfg).await;
        if let Some(p) = perf {
            match finish_perf(p, out, "perf", &r) {
                Ok(profile) => {
                    report.notes.push(format!(
                        "perf profile of the server during the {c}-meter step: {}",
                        perf_summary(&profile)
                    ));
                    report.perf.push(profile);
                }
                Err(e) => report.notes.push(format!("perf: {e:#}")),
            }
        }
        if r.completed == 0 || (r.errors as f64) > 0.05 * (r.finished.max(1) as f64) {
            eprintln!(
                "loadtest: step {c}: {} enrolled, {} errors {:?}",
                r.completed, r.errors, r.errors_by_reason
            );
            ok = false;
        }
        report.steps.push(r);
        if !server_alive(setup) {
            eprintln!("loadtest: the server exited during the {c}-meter step");
            ok = false;
            break;
        }
    }
    ok
}

/// The peak step's rate, its ratio to the crypto ceiling and the curve operations' share of its
/// server CPU.
fn record_peak(report: &mut Report) {
    if let Some(peak) = report
        .steps
        .iter()
        .max_by(|a, b| a.rate_per_s.total_cmp(&b.rate_per_s))
    {
        report.peak_rate = peak.rate_per_s;
        report.peak_concurrency = peak.concurrency;
        if let Some(c) = &report.crypto {
            report.ratio_to_ceiling = (c.ceiling > 0.0).then(|| peak.rate_per_s / c.ceiling);
            report.crypto_share_of_server_cpu = peak
                .server_cpu_ms_per_op
                .filter(|x| *x > 0.0)
                .map(|x| c.model_us_per_enrollment / 1000.0 / x);
        }
    }
}

/// The open-loop step at half the peak rate; false when nothing enrolled.
async fn half_rate_step(cli: &Cli, plan: &Plan, setup: &Setup, report: &mut Report) -> bool {
    let duration = plan.duration;
    let rate = report.peak_rate / 2.0;
    let cfg = StepConfig {
        mode: Mode::Enroll,
        transport: cli.transport(),
        dtls_backend: cli.client_dtls,
        concurrency: 4096,
        duration,
        warmup: warmup_of(duration),
        drain_timeout: Duration::from_secs(30),
        seed: cli.seed ^ 0x4a1f,
        arrival_rate: Some(rate),
        progress: plan.progress,
        label: format!("enroll at {rate:.0}/s (open loop)"),
    };
    let r = steps::run_step(&setup.target, &cfg).await;
    let ok = r.completed > 0;
    report.steps.push(r);
    ok
}

/// Handshake + GET side by side with libcoap, with its notes; false when no handshake + GET
/// succeeded against our server.
async fn peer_comparison(
    cli: &Cli,
    plan: &Plan,
    setup: &Setup,
    out: &Path,
    peer_c: usize,
    report: &mut Report,
) -> bool {
    let mut ok = true;
    let d = if plan.smoke {
        Duration::from_secs(2)
    } else {
        cli.peer_duration.unwrap_or(plan.duration)
    };
    let mut cmp = peer::compare_peer(cli, setup, out, peer_c, d, plan.progress).await;
    if let Some(o) = &cmp.ours {
        if o.completed == 0 {
            eprintln!(
                "loadtest: no handshake + GET succeeded against our server: {:?}",
                o.errors_by_reason
            );
            ok = false;
        }
    }
    if let Some(l) = cmp.libcoap.as_ref().filter(|l| l.rate_per_s > 0.0) {
        cmp.enroll_peak_over_libcoap = Some(report.peak_rate / l.rate_per_s);
    }
    if let Some(n) = &cmp.note {
        report.notes.push(format!("peer: {n}"));
    }
    match cmp.perf.take() {
        Some(Ok(profile)) => {
            report.notes.push(format!(
                "perf profile of the server during our handshake+GET step ({peer_c} meters): {}",
                perf_summary(&profile)
            ));
            report.perf.push(profile);
        }
        Some(Err(e)) => report.notes.push(format!("perf (handshake+GET): {e}")),
        None => {}
    }
    if let Some(note) = est_over_handshake_note(report) {
        report.notes.push(note);
    }
    report.peer = Some(cmp);
    ok
}

/// The in-memory core path: its native time, and its instructions under callgrind when asked
/// (or by default when valgrind is installed and this is not a smoke run); false when the
/// native run failed.
async fn core_path(cli: &Cli, plan: &Plan, out: &Path, report: &mut Report) -> Result<bool> {
    let mut ok = true;
    let iters = if plan.smoke { 3 } else { 50 };
    match tokio::task::spawn_blocking(move || core_bench::run_native(iters)).await {
        Ok(Ok(us)) => report.core_native_us = Some(us),
        Ok(Err(e)) => {
            report.notes.push(format!("core bench failed: {e:#}"));
            ok = false;
        }
        Err(e) => report.notes.push(format!("core bench task: {e}")),
    }
    let want_callgrind = cli
        .callgrind
        .unwrap_or(!plan.smoke && server::on_path("valgrind").is_some());
    if want_callgrind {
        eprintln!(
            "loadtest: counting the core path under callgrind ({} iterations)",
            cli.callgrind_iterations
        );
        let exe = std::env::current_exe()?;
        let (iters, out2) = (cli.callgrind_iterations, out.to_path_buf());
        match tokio::task::spawn_blocking(move || core_bench::run_callgrind(&exe, iters, &out2))
            .await
        {
            Ok(Ok(c)) => report.callgrind = Some(c),
            Ok(Err(e)) => report.notes.push(format!("callgrind: {e:#}")),
            Err(e) => report.notes.push(format!("callgrind task: {e}")),
        }
        let exe = std::env::current_exe()?;
        let (iters, out2) = (cli.callgrind_iterations, out.to_path_buf());
        match tokio::task::spawn_blocking(move || {
            crate::dtls_bench::run_callgrind(&exe, iters, &out2)
        })
        .await
        {
            Ok(Ok(c)) => report.dtls_callgrind = Some(c),
            Ok(Err(e)) => report.notes.push(format!("DTLS callgrind: {e:#}")),
            Err(e) => report.notes.push(format!("DTLS callgrind task: {e}")),
        }
    }
    Ok(ok)
}

/// OUT/report.json, OUT/report.html and the table on stdout.
fn write_report(report: &Report, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json)?;
    std::fs::write(out.join("report.html"), report::render_html(report))?;
    print!("{}", report::render_table(report));
    println!(
        "report: {} and {}",
        out.join("report.json").display(),
        out.join("report.html").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_count("0"), 1.0);
        assert_eq!(cpu_count("0-3,6"), 5.0);
    }
}
