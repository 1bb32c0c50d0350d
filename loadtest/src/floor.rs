//! `loadtest floor`: the server CPU a full enrollment cannot do without on this machine, from
//! parts measured here, to set beside the measured server CPU per enrollment.
//!
//! What any EST-coaps server must do per full enrollment (RFC 9148 over DTLS 1.2 with a
//! client certificate, RFC 7030 proof of possession, a durable record before the answer):
//!
//! * the curve operations: ServerKeyExchange sign, client chain verify, CertificateVerify
//!   verify, ECDHE, CSR verify, certificate sign (2S+3V+1E, [`crate::crypto::measure`] with
//!   the server's own backends);
//! * the datagrams: `--datagrams-in` received and `--datagrams-out` sent, counted as
//!   min(in, out) receive+send pairs. On loopback the
//!   sender's `sendto` also pays for the delivery into the receiver's socket, so the cost is
//!   measured as an echo: one thread answers every datagram it receives while another keeps
//!   `--in-flight` of them outstanding, and the echo thread's CPU per (receive + send) pair is
//!   read from `/proc/thread-self/schedstat` (nanoseconds the scheduler ran it);
//! * the durable commit: one small append and `fdatasync` (what a WAL commit is at its
//!   least) in a file under `--dir`, CPU per commit, divided by `--group`, the enrollments one
//!   commit carries (the server's `est_store_operations / est_store_transactions`).
//!
//! The sum leaves out what no figure here can bound from below and every server still pays:
//! parsing and encoding X.509/PKCS#10, the record layer's AEAD and the PRF, CoAP, the store's
//! own code, allocation and scheduling. It is a floor, not an estimate.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::crypto;

/// What `loadtest floor` measures, and how much of it.
#[derive(Debug, Clone)]
pub(crate) struct FloorArgs {
    pub datagrams: u64,
    pub payload: usize,
    pub in_flight: usize,
    pub datagrams_in: f64,
    pub datagrams_out: f64,
    pub commits: u64,
    pub group: f64,
    pub crypto_budget: Duration,
}

/// The measured parts, microseconds of server CPU.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Floor {
    pub crypto_us: f64,
    pub datagram_pair_us: f64,
    pub datagrams_us: f64,
    pub commit_us: f64,
    pub commit_per_enrollment_us: f64,
}

impl Floor {
    pub(crate) fn total_us(&self) -> f64 {
        self.crypto_us + self.datagrams_us + self.commit_per_enrollment_us
    }
}

/// Nanoseconds the scheduler has run the calling thread (first field of
/// `/proc/thread-self/schedstat`).
pub(crate) fn thread_cpu_ns() -> Result<u64> {
    schedstat_cpu_ns(Path::new("/proc/thread-self/schedstat"))
}

/// Nanoseconds on CPU, the first field of a thread's `schedstat` file.
pub(crate) fn schedstat_cpu_ns(path: &Path) -> Result<u64> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (Linux only)", path.display()))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected {}", path.display()))
}

/// CPU of the echo thread per datagram received and answered, microseconds.
pub(crate) fn datagram_pair_us(pairs: u64, payload: usize, in_flight: usize) -> Result<f64> {
    if pairs == 0 || in_flight == 0 || payload == 0 || payload > 1400 {
        bail!("datagrams and in-flight must be > 0, payload 1..=1400 bytes");
    }
    let echo = UdpSocket::bind("127.0.0.1:0").context("binding the echo socket")?;
    let peer = UdpSocket::bind("127.0.0.1:0").context("binding the peer socket")?;
    let echo_addr = echo.local_addr()?;
    peer.connect(echo_addr)?;
    // A datagram lost in the kernel would stall the peer: it waits at most this long.
    peer.set_read_timeout(Some(Duration::from_secs(2)))?;
    echo.set_read_timeout(Some(Duration::from_secs(2)))?;
    let echo_thread = std::thread::spawn(move || -> Result<f64> {
        let mut buf = [0u8; 2048];
        let start = thread_cpu_ns()?;
        for _ in 0..pairs {
            let (n, from) = echo.recv_from(&mut buf).context("echo receive")?;
            let d = buf.get(..n).context("datagram length")?;
            echo.send_to(d, from).context("echo send")?;
        }
        let ns = thread_cpu_ns()?.saturating_sub(start);
        Ok(ns as f64 / 1000.0 / pairs as f64)
    });
    let out = vec![0x17u8; payload];
    let mut buf = [0u8; 2048];
    let outstanding = (in_flight as u64).min(pairs);
    for _ in 0..outstanding {
        peer.send(&out)?;
    }
    for i in 0..pairs {
        peer.recv(&mut buf)
            .context("peer receive (a datagram lost?)")?;
        if i + outstanding < pairs {
            peer.send(&out)?;
        }
    }
    echo_thread
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
}

/// CPU per durable append (write + fdatasync) of `record` bytes in a file under `dir`,
/// microseconds.
pub(crate) fn commit_us(dir: &Path, commits: u64, record: usize) -> Result<f64> {
    if commits == 0 {
        bail!("commits must be > 0");
    }
    let path = dir.join(format!("loadtest-floor-{}.wal", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let rec = vec![0x5au8; record];
    let start = thread_cpu_ns()?;
    let mut result = Ok(());
    for _ in 0..commits {
        if let Err(e) = f.write_all(&rec).and_then(|()| f.sync_data()) {
            result = Err(e);
            break;
        }
    }
    let ns = thread_cpu_ns()?.saturating_sub(start);
    drop(f);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("appending to {}", path.display()))?;
    Ok(ns as f64 / 1000.0 / commits as f64)
}

/// Receive+send pairs of an enrollment's datagrams, counting none twice.
fn floor_datagrams(datagrams_in: f64, datagrams_out: f64) -> f64 {
    datagrams_in.min(datagrams_out)
}

/// Measures every part.
pub(crate) fn measure(a: &FloorArgs, dir: &Path) -> Result<Floor> {
    if a.group < 1.0 || !a.group.is_finite() {
        bail!("--group is enrollments per commit, at least 1");
    }
    let ceiling = crypto::measure(a.crypto_budget, 1.0)?;
    let pair = datagram_pair_us(a.datagrams, a.payload, a.in_flight)?;
    let commit = commit_us(dir, a.commits, 4096)?;
    Ok(Floor {
        crypto_us: ceiling.model_us_per_enrollment,
        datagram_pair_us: pair,
        // A pair is one receive and one send; min(in, out) pairs count no datagram twice
        // (the rest, |in - out| datagrams, is left out: a floor).
        datagrams_us: pair * floor_datagrams(a.datagrams_in, a.datagrams_out),
        commit_us: commit,
        commit_per_enrollment_us: commit / a.group,
    })
}

/// The printed table.
pub(crate) fn render(a: &FloorArgs, f: &Floor) -> String {
    let mut s = String::new();
    s.push_str("server CPU a full enrollment cannot do without, on this machine (microseconds)\n");
    s.push_str(&format!(
        "  curve operations, 2 sign + 3 verify + 1 ECDHE (ring) {:>8.1}\n",
        f.crypto_us
    ));
    s.push_str(&format!(
        "  datagrams: {:.0} in / {:.0} out at {:.2} us per loopback receive+send {:>8.1}\n",
        a.datagrams_in, a.datagrams_out, f.datagram_pair_us, f.datagrams_us
    ));
    s.push_str(&format!(
        "  durable commit: {:.1} us per append+fdatasync / {:.1} enrollments per commit {:>8.1}\n",
        f.commit_us, a.group, f.commit_per_enrollment_us
    ));
    s.push_str(&format!(
        "  floor (excludes X.509/CSR parsing and encoding, AEAD, PRF, CoAP, the store's code, allocation, scheduling) {:>8.1}\n",
        f.total_us()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny measurements, 5 datagrams in and 4 out, `group` enrollments per commit.
    fn args(group: f64) -> FloorArgs {
        FloorArgs {
            datagrams: 1,
            payload: 1,
            in_flight: 1,
            datagrams_in: 5.0,
            datagrams_out: 4.0,
            commits: 1,
            group,
            crypto_budget: Duration::from_millis(1),
        }
    }

    #[test]
    fn the_floor_is_the_sum_of_its_parts() {
        let f = Floor {
            crypto_us: 290.0,
            datagram_pair_us: 6.0,
            datagrams_us: 30.0,
            commit_us: 80.0,
            commit_per_enrollment_us: 10.0,
        };
        assert!((f.total_us() - 330.0).abs() < 1e-9);
        assert_eq!(floor_datagrams(5.0, 4.0), 4.0);
        let a = args(8.0);
        let text = render(&a, &f);
        assert!(text.contains("330.0"), "{text}");
        assert!(text.contains("5 in / 4 out"), "{text}");
    }

    #[test]
    fn a_loopback_echo_costs_some_cpu_and_returns_every_datagram() {
        let us = datagram_pair_us(2_000, 300, 4).expect("echo runs");
        assert!(us > 0.0 && us.is_finite(), "{us}");
    }

    #[test]
    fn a_durable_append_costs_some_cpu_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let us = commit_us(dir.path(), 20, 4096).expect("appends");
        assert!(us > 0.0 && us.is_finite(), "{us}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(datagram_pair_us(0, 300, 4).is_err());
        assert!(datagram_pair_us(10, 0, 4).is_err());
        assert!(datagram_pair_us(10, 300, 0).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(commit_us(dir.path(), 0, 4096).is_err());
        let a = args(0.5);
        assert!(measure(&a, dir.path()).is_err());
    }
}
