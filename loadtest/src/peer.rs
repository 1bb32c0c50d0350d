//! The peer: libcoap 4.3's `coap-server-openssl` with certificate-based DTLS, serving its
//! default resources (including `/.well-known/core`) on loopback.
//!
//! It presents our data directory's DTLS certificate (so the meters' Implicit TA verifies it as
//! it verifies est-server) and trusts the manufacturer CA that signed the meters' IDevIDs
//! (`-R`, a trust store: libcoap's `-C` would also be sent to clients as the CA list). libcoap
//! serves plain CoAP on `-p PORT` and coaps on PORT+1.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::Cli;
use crate::perf::{finish_perf, start_perf};
use crate::report::PeerComparison;
use crate::run::{warmup_of, Setup};
use crate::server::{self, command_pinned, ChildServer};
use crate::steps::{self, Mode, StepConfig, Target};

/// The program we compare against.
pub(crate) const LIBCOAP_SERVER: &str = "coap-server-openssl";

/// Starts `coap-server-openssl` on 127.0.0.1:`port` (coaps on `port + 1`).
pub(crate) fn start_libcoap(
    bin: &Path,
    port: u16,
    cert_pem: &Path,
    key_pem: &Path,
    trust_pem: &Path,
    log: &Path,
    cpus: Option<&str>,
) -> Result<ChildServer> {
    let mut cmd = command_pinned(bin, cpus);
    cmd.args(["-A", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(cert_pem)
        .arg("-j")
        .arg(key_pem)
        .arg("-R")
        .arg(trust_pem)
        .args(["-v", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(log).context("libcoap log")?,
        ))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(log)
                .context("libcoap log")?,
        ));
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let coaps_port = port.checked_add(1).context("port + 1 overflows")?;
    Ok(ChildServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], coaps_port)),
        name: "libcoap coap-server-openssl 4.3".into(),
    })
}

/// The command line, for the report.
pub(crate) fn describe(port: u16) -> String {
    format!(
        "{LIBCOAP_SERVER} -A 127.0.0.1 -p {port} -c DATA/dtls/server.pem -j DATA/dtls/server.key -R DATA/manufacturers/demo-manufacturer-ca.pem -v 3"
    )
}

/// The side-by-side comparison: ours, then libcoap, doing handshake + GET /.well-known/core.
pub(crate) async fn compare_peer(
    cli: &Cli,
    setup: &Setup,
    out: &Path,
    concurrency: usize,
    duration: Duration,
    progress: bool,
) -> PeerComparison {
    let mut cmp = PeerComparison {
        concurrency,
        ..PeerComparison::default()
    };
    let step = |label: &str| StepConfig {
        mode: Mode::Discover,
        transport: cli.transport(),
        dtls_backend: cli.client_dtls,
        concurrency,
        duration,
        warmup: warmup_of(duration),
        drain_timeout: Duration::from_secs(20),
        seed: cli.seed ^ 0x9ee2,
        arrival_rate: None,
        progress,
        label: label.into(),
    };
    // With --perf-step at this concurrency, our handshake+GET step is profiled too: set against
    // the enrollment step's profile it shows where the EST work's CPU goes.
    let ours_step = step("ours: handshake+GET");
    let perf = match (cli.perf_step == Some(concurrency), setup.target.pid) {
        (true, Some(pid)) => start_perf(
            pid,
            out,
            "perf-handshake",
            ours_step.warmup,
            duration - ours_step.warmup,
        ),
        _ => None,
    };
    let ours = steps::run_step(&setup.target, &ours_step).await;
    if let Some(p) = perf {
        cmp.perf = Some(finish_perf(p, out, "perf-handshake", &ours).map_err(|e| format!("{e:#}")));
    }
    cmp.ours = Some(ours);
    let Some(data) = &setup.data_dir else {
        cmp.note = Some("libcoap comparison needs a local server (skipped with --server)".into());
        return cmp;
    };
    let Some(bin) = server::on_path(LIBCOAP_SERVER) else {
        cmp.note = Some(format!(
            "{} not installed (apt-get install libcoap3-bin): libcoap comparison skipped",
            LIBCOAP_SERVER
        ));
        return cmp;
    };
    let port = match server::free_udp_port() {
        Ok(p) if p < u16::MAX => p,
        _ => {
            cmp.note = Some("no free UDP port for libcoap".into());
            return cmp;
        }
    };
    cmp.libcoap_command = describe(port);
    let child = start_libcoap(
        &bin,
        port,
        &data.join("dtls/server.pem"),
        &data.join("dtls/server.key"),
        &data.join("manufacturers/demo-manufacturer-ca.pem"),
        &out.join("libcoap.log"),
        cli.server_cpus.as_deref(),
    );
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            cmp.note = Some(format!("libcoap did not start: {e:#}"));
            return cmp;
        }
    };
    let target = Target {
        name: child.name.clone(),
        addr: child.addr,
        devices: setup.target.devices.clone(),
        trust_anchors_der: setup.target.trust_anchors_der.clone(),
        pid: Some(child.pid()),
        more_nodes: Vec::new(),
        db_postmaster: None,
    };
    // Ready when one exchange succeeds (bounded).
    let mut ready = false;
    for _ in 0..20 {
        let probe = StepConfig {
            concurrency: 1,
            duration: Duration::from_millis(300),
            warmup: Duration::ZERO,
            progress: false,
            ..step("probe")
        };
        if steps::run_step(&target, &probe).await.completed > 0 {
            ready = true;
            break;
        }
        if !child.alive() {
            break;
        }
    }
    if !ready {
        let log = std::fs::read_to_string(out.join("libcoap.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        cmp.note = Some(format!("libcoap never answered a handshake + GET: {tail}"));
        return cmp;
    }
    let r = steps::run_step(&target, &step("libcoap: handshake+GET")).await;
    drop(child);
    if let (Some(a), true) = (&cmp.ours, r.rate_per_s > 0.0) {
        cmp.ratio = Some(a.rate_per_s / r.rate_per_s);
    }
    cmp.libcoap = Some(r);
    cmp
}
