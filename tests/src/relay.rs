//! DCU relays (issue #12) as processes: `est-server run` with a JPY port as the registrar and
//! `est-relay` in front of it, both children of the test, over real UDP on loopback.
//!
//! ```text
//!   Pki             `est-server init` + `factory mint`: one issuing CA and manufacturer CA,
//!                   shared by every registrar of a test (each gets a copy of the data directory)
//!   Registrar       `est-server run --listen 127.0.0.1:0` with `[relay] jpy_listen`; its coaps
//!                   and JPY addresses read from its output; JSON log with a metrics line a second
//!   RelayProcess    `est-relay --listen 127.0.0.1:0 --registrar ... --mode ...`; the same
//! ```

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::front_door::{est_server_bin, json_u64, run_ok, workspace_bin};

/// The est-relay binary (`EST_RELAY_BIN`, else built like est-server).
pub fn est_relay_bin() -> Result<PathBuf> {
    workspace_bin("est-relay", "est-relay", "EST_RELAY_BIN")
}

/// A data directory made by `est-server init` with a minted fleet: the CAs every registrar of
/// a test shares.
pub struct Pki {
    pub data_dir: PathBuf,
    pub fleet_dir: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl Pki {
    pub fn new(devices: usize) -> Result<Pki> {
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
        Ok(Pki {
            data_dir,
            fleet_dir,
            tmp,
        })
    }

    /// The minted serials, sorted.
    pub fn serials(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&self.fleet_dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("idevid.key").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }

    /// The issuing CA (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir.join("ca/issuing-ca.pem")
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        // Every registrar keeps its own store.
        if name.to_string_lossy().starts_with("est.sqlite3") {
            continue;
        }
        let target = to.join(&name);
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// A child's stdout, line by line, read by a thread (the child never blocks on the pipe).
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn new(stdout: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// The first line containing `needle`, within `within`.
    fn wait_for(&self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .0
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("no line with {needle:?} within {within:?}"))?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }
}

/// The address after `prefix` in `line`.
fn addr_after(line: &str, prefix: &str) -> Result<SocketAddr> {
    let rest = line
        .split(prefix)
        .nth(1)
        .with_context(|| format!("{prefix:?} in {line:?}"))?;
    let a = rest
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap_or_default();
    a.parse()
        .with_context(|| format!("address after {prefix:?} in {line:?}"))
}

/// The metrics lines (JSON) of a log file.
fn metrics_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"target\":\"metrics\""))
        .map(str::to_string)
        .collect()
}

/// Waits for a metrics line written after this call (at most 4 s) and returns `field` of the
/// last one.
fn fresh_metric(log: &Path, field: &str) -> Option<u64> {
    let before = metrics_lines(log).len();
    let deadline = Instant::now() + Duration::from_secs(4);
    while metrics_lines(log).len() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    metrics_lines(log).last().and_then(|l| json_u64(l, field))
}

/// `est-server run` as a registrar (killed on drop).
pub struct Registrar {
    child: Child,
    pub coaps: SocketAddr,
    pub jpy: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Registrar {
    /// A registrar on a copy of `pki`'s data directory; `relay` is the body of its `[relay]`
    /// table (empty: no JPY port), `dtls` of its `[dtls]` table.
    pub fn start(pki: &Pki, relay: &str, dtls: &str) -> Result<Registrar> {
        let bin = est_server_bin()?;
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("est-data");
        copy_dir(&pki.data_dir, &data_dir)?;
        let config = tmp.path().join("registrar.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlog_format = \"json\"\nmetrics_log_interval_secs = 1\n\n[dtls]\n{dtls}\n\n[relay]\n{relay}\n"
            ),
        )?;
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
        let lines = Lines::new(child.stdout.take().context("stdout")?);
        let started = (|| -> Result<(SocketAddr, Option<SocketAddr>)> {
            let l = lines.wait_for("listening on coaps://", Duration::from_secs(60))?;
            let coaps = addr_after(&l, "coaps://")?;
            let jpy = if relay.contains("jpy_listen") {
                let l = lines.wait_for("jpy://", Duration::from_secs(10))?;
                Some(addr_after(&l, "jpy://")?)
            } else {
                None
            };
            Ok((coaps, jpy))
        })();
        // Keep draining its output.
        std::thread::spawn(move || while lines.0.recv().is_ok() {});
        let (coaps, jpy) = match started {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{e:#}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Ok(Registrar {
            child,
            coaps,
            jpy,
            data_dir,
            log,
            _tmp: tmp,
        })
    }

    /// `coaps://ADDR/.well-known/est/<op>`.
    pub fn url(&self, op: &str) -> String {
        format!("coaps://{}/.well-known/est/{op}", self.coaps)
    }

    /// `field` of the next metrics line.
    pub fn metric(&self, field: &str) -> Option<u64> {
        fresh_metric(&self.log, field)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `est-server audit` of this registrar's store.
    pub fn audit(&self) -> Result<String> {
        run_ok(
            Command::new(est_server_bin()?)
                .arg("audit")
                .arg("--data-dir")
                .arg(&self.data_dir),
        )
    }

    /// `est-server certs list` of this registrar's store.
    pub fn certs(&self) -> Result<String> {
        run_ok(
            Command::new(est_server_bin()?)
                .args(["certs", "list"])
                .arg("--data-dir")
                .arg(&self.data_dir),
        )
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `est-relay` as a child (killed on drop).
pub struct RelayProcess {
    child: Child,
    /// Its join port (where meters send).
    pub join: SocketAddr,
    pub log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl RelayProcess {
    /// `mode` "stateless" or "stateful"; `extra` is more of its TOML configuration.
    pub fn start(mode: &str, registrars: &[SocketAddr], extra: &str) -> Result<RelayProcess> {
        let bin = est_relay_bin()?;
        let tmp = tempfile::tempdir()?;
        let config = tmp.path().join("relay.toml");
        std::fs::write(
            &config,
            format!("log_format = \"json\"\nmetrics_log_interval_secs = 1\n{extra}\n"),
        )?;
        let log = tmp.path().join("est-relay.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--mode", mode]);
        for r in registrars {
            cmd.arg("--registrar").arg(r.to_string());
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting est-relay")?;
        let lines = Lines::new(child.stdout.take().context("stdout")?);
        let started = lines
            .wait_for("listening on ", Duration::from_secs(60))
            .and_then(|l| addr_after(&l, "listening on "));
        std::thread::spawn(move || while lines.0.recv().is_ok() {});
        let join = match started {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{e:#}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Ok(RelayProcess {
            child,
            join,
            log,
            _tmp: tmp,
        })
    }

    /// `coaps://JOIN/.well-known/est/<op>`: the registrar's EST resources through the relay.
    pub fn url(&self, op: &str) -> String {
        format!("coaps://{}/.well-known/est/{op}", self.join)
    }

    /// `field` of the next metrics line.
    pub fn metric(&self, field: &str) -> Option<u64> {
        fresh_metric(&self.log, field)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
