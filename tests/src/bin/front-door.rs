//! Attack a running est-server's front door from this machine, for measurement beside
//! `tests/front_door.rs` (which starts its own server):
//!
//! ```text
//! front-door flood  127.0.0.1:5684 [--secs 10] [--rate 0] [--sources 4096]
//! front-door silent 127.0.0.1:5684 [--secs 10] [--rate 0] [--peers 4096]
//! ```
//!
//! `flood`: ClientHellos without a cookie from `--sources` addresses in 127.1.0.0/16, at `--rate`
//! a second (0: as fast as one thread can send). `silent`: `--peers` peers in 127.2.0.0/16 echo
//! their cookie and go silent, round-robin, at `--rate` exchanges a second (0: flat out).
//! The target must be a loopback address; every run ends after `--secs` (at most an hour).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use est_tests::front_door::{churn, flood, FloodConfig, SilentPeer};

struct Args {
    mode: String,
    server: SocketAddr,
    secs: u64,
    rate: u64,
    count: usize,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("missing mode: flood or silent")?;
    if mode != "flood" && mode != "silent" {
        return Err(format!("unknown mode {mode:?}: flood or silent"));
    }
    let server: SocketAddr = it
        .next()
        .ok_or("missing server address")?
        .parse()
        .map_err(|e| format!("server address: {e}"))?;
    if !server.ip().is_loopback() {
        return Err(format!(
            "{server} is not a loopback address: this tool only targets servers on this machine"
        ));
    }
    let mut a = Args {
        mode,
        server,
        secs: 10,
        rate: 0,
        count: 4096,
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
        match flag.as_str() {
            "--secs" => a.secs = n.clamp(1, 3600),
            "--rate" => a.rate = n,
            "--sources" | "--peers" => {
                a.count = usize::try_from(n)
                    .map_err(|e| e.to_string())?
                    .clamp(1, 60_000)
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("front-door: {e}");
            eprintln!(
                "usage: front-door flood|silent ADDR [--secs S] [--rate N] [--sources|--peers N]"
            );
            return ExitCode::from(2);
        }
    };
    let stop = AtomicBool::new(false);
    let duration = Duration::from_secs(a.secs);
    if a.mode == "flood" {
        let cfg = FloodConfig {
            server: a.server,
            duration,
            rate_per_sec: a.rate,
            sources: a.count,
            rebind_per_pass: 64,
        };
        match flood(&cfg, &stop) {
            Ok(r) => {
                println!(
                    "flood: {} ClientHellos of {} B in {:.2} s = {:.0}/s from {} addresses ({} address:port pairs), {} send errors",
                    r.sent,
                    r.datagram_bytes,
                    r.elapsed.as_secs_f64(),
                    r.rate(),
                    r.sources,
                    r.source_ports,
                    r.send_errors
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("front-door: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        let peers: Result<Vec<SilentPeer>, _> =
            (0..a.count).map(|i| SilentPeer::new(i, a.server)).collect();
        let mut peers = match peers {
            Ok(p) => p,
            Err(e) => {
                eprintln!("front-door: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (counts, took) = churn(&mut peers, a.rate, duration, &stop);
        println!(
            "silent peers: {} cookie exchanges in {:.2} s = {:.0}/s: {counts:?}",
            counts.total(),
            took.as_secs_f64(),
            counts.total() as f64 / took.as_secs_f64().max(1e-9)
        );
        ExitCode::SUCCESS
    }
}
