//! The server under test as a child process: locating (or building) `est-server`, a fresh data
//! directory, a minted fleet, optional CPU pinning, readiness, and CPU/RSS figures from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use client_sim::fleet::parse_status_kb;

/// CPU time and memory of a process, from /proc (Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_kb: u64,
    /// VmHWM: the kernel's peak RSS since the process started.
    pub hwm_kb: u64,
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`; 100 on Linux in practice).
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime in ticks from the text of /proc/<pid>/stat. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after the last ')'.
pub(crate) fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace();
    // After ')' come field 3 (state) ... ; utime is field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy CPU seconds of the whole machine so far (all CPUs; everything but idle and iowait),
/// from the first line of /proc/stat.
pub(crate) fn machine_busy_s(ticks_per_s: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy_ticks(stat.lines().next()?).map(|t| t as f64 / ticks_per_s)
}

/// `cpu  user nice system idle iowait irq softirq steal ...` -> busy ticks.
pub(crate) fn parse_machine_busy_ticks(line: &str) -> Option<u64> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some(total.saturating_sub(idle))
}

/// Reads CPU and memory of `pid`; `None` when the process is gone or /proc is unavailable.
pub(crate) fn sample(pid: u32, ticks_per_s: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_s: parse_stat_ticks(&stat)? as f64 / ticks_per_s,
        rss_kb: parse_status_kb(&status, "VmRSS:").unwrap_or(0),
        hwm_kb: parse_status_kb(&status, "VmHWM:").unwrap_or(0),
    })
}

/// Copies the directory `from` (files and subdirectories) to `to`.
pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The processes whose parent is `pid` (PostgreSQL's backends under its postmaster), from
/// /proc.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| parse_stat_ppid(&stat))
                == Some(pid)
        })
        .collect()
}

/// The parent pid (field 4) from the text of /proc/<pid>/stat.
pub(crate) fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Finds `est-server`: an explicit path, next to our own executable (same cargo profile), or
/// built with `cargo build --release -p est-server`.
pub(crate) fn locate_est_server(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--est-server {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("locating our own executable")?;
    // Run through cargo (`cargo run -p loadtest`, CI): make sure the release est-server beside
    // us is current, not a stale build (a no-op when it is).
    if let Some(cargo) = std::env::var_os("CARGO") {
        let target = exe.parent().and_then(Path::parent);
        if let (Some(dir), Some(target)) = (exe.parent(), target) {
            if dir.file_name().is_some_and(|n| n == "release") {
                let status = Command::new(cargo)
                    .args(["build", "--release", "-p", "est-server"])
                    .env("CARGO_TARGET_DIR", target)
                    .status()
                    .context("running cargo build -p est-server")?;
                if !status.success() {
                    bail!("cargo build --release -p est-server failed ({status})");
                }
            }
        }
    }
    if let Some(dir) = exe.parent() {
        let beside = dir.join("est-server");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"));
    eprintln!("loadtest: est-server not found beside {}; building it (cargo build --release -p est-server)", exe.display());
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "-p", "est-server"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("running cargo build -p est-server")?;
    if !status.success() {
        bail!("cargo build --release -p est-server failed ({status})");
    }
    let built = target.join("release").join("est-server");
    if built.is_file() {
        Ok(built)
    } else {
        bail!("built est-server not found at {}", built.display())
    }
}

/// Runs `est-server ARGS...` to completion, failing with its stderr.
pub(crate) fn est_server_cmd(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .envs(server_env())
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`est_test_tools::set_config`] for edits whose values were formatted at run time.
pub(crate) fn set_config(data_dir: &Path, edits: &[(&str, &str, String)]) -> Result<()> {
    let edits: Vec<(&str, &str, &str)> = edits
        .iter()
        .map(|(section, key, value)| (*section, *key, value.as_str()))
        .collect();
    est_test_tools::set_config(data_dir, &edits).map_err(anyhow::Error::msg)
}

/// A server child process that is killed on drop.
pub(crate) struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub name: String,
}

impl ChildServer {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `taskset -c CPUS` in front of a command, when pinning was asked for.
pub(crate) fn command_pinned(bin: &Path, cpus: Option<&str>) -> Command {
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.envs(server_env());
    cmd
}

/// Environment every est-server command of this run gets (SOFTHSM2_CONF for --ca-key softhsm).
static SERVER_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

fn server_env() -> Vec<(String, String)> {
    SERVER_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The SoftHSM2 module of Debian's softhsm2 package.
pub(crate) const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// `est-server init` with the issuing CA key generated on a fresh SoftHSM2 token in
/// `out/softhsm` (its own softhsm2.conf, token "loadtest-ca", PIN in a 0600 file); every later
/// est-server command of the run gets SOFTHSM2_CONF.
pub(crate) fn init_with_softhsm(bin: &Path, out: &Path, data_dir: &Path) -> Result<()> {
    if !Path::new(SOFTHSM_MODULE).exists() {
        bail!("--ca-key softhsm needs {SOFTHSM_MODULE}: apt-get install softhsm2");
    }
    let dir = out.join("softhsm");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).with_context(|| format!("creating {}", tokens.display()))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    let pin = "20261205";
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", "loadtest-ca"])
        .args(["--pin", pin, "--so-pin", "87654321"])
        .stdout(Stdio::null())
        .status()
        .context("running softhsm2-util (apt-get install softhsm2)")?;
    if !status.success() {
        bail!("softhsm2-util --init-token failed: {status}");
    }
    let pin_file = dir.join("pin");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .with_context(|| format!("creating {}", pin_file.display()))?;
        f.write_all(pin.as_bytes())?;
    }
    SERVER_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(("SOFTHSM2_CONF".into(), conf.display().to_string()));
    let d = data_dir.display().to_string();
    let p = pin_file.display().to_string();
    est_server_cmd(
        bin,
        &[
            "init",
            "--data-dir",
            &d,
            "--hsm-module",
            SOFTHSM_MODULE,
            "--hsm-token",
            "loadtest-ca",
            "--hsm-pin-file",
            &p,
        ],
    )?;
    Ok(())
}

/// Starts `est-server run` on 127.0.0.1 port 0 and waits for its "listening on coaps://ADDR" line.
pub(crate) fn start_est_server(
    bin: &Path,
    data_dir: &Path,
    cpus: Option<&str>,
) -> Result<ChildServer> {
    start_est_server_named(bin, data_dir, cpus, "server.log")
}

/// [`start_est_server`] logging to `data_dir/log_name` (several nodes on one data directory).
pub(crate) fn start_est_server_named(
    bin: &Path,
    data_dir: &Path,
    cpus: Option<&str>,
    log_name: &str,
) -> Result<ChildServer> {
    let log_path = data_dir.join(log_name);
    let mut cmd = command_pinned(bin, cpus);
    cmd.args(["run", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(&log_path).context("server log")?,
        ));
    let mut child = cmd.spawn().context("starting est-server run")?;
    let stdout = child.stdout.take().context("est-server stdout")?;
    let announced = est_test_tools::announced_address(stdout, Duration::from_secs(30));
    let mut server = ChildServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        name: "est-server".into(),
    };
    match announced {
        Ok(a) => server.addr = a,
        Err(e) => {
            let alive = server.alive();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{e} (running: {alive}); its log:\n{log}");
        }
    }
    Ok(server)
}

/// Picks a free UDP port on loopback (bind port 0, read it, release it).
pub(crate) fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(s.local_addr()?.port())
}

/// Whether a program is on PATH.
pub(crate) use est_test_tools::find as on_path;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // comm with spaces and a ')' inside, as the kernel prints it.
        let stat = "4242 (est (srv) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 2000000 3000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_excludes_idle_and_iowait() {
        assert_eq!(
            parse_machine_busy_ticks("cpu  100 5 50 1000 20 1 2 3 0 0"),
            Some(161)
        );
        assert_eq!(parse_machine_busy_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert!(machine_busy_s(clock_ticks()).is_some());
    }

    #[test]
    fn own_process_is_sampled() {
        let s = sample(std::process::id(), clock_ticks()).unwrap();
        assert!(s.rss_kb > 0 && s.hwm_kb >= s.rss_kb);
        assert!(s.cpu_s >= 0.0);
        assert_eq!(
            parse_status_kb("Name:\tx\nVmHWM:\t  1234 kB\n", "VmHWM:"),
            Some(1234)
        );
    }
}
