//! The figures of docs/benchmarks.md, "DCU relay": the relay core's CPU per datagram (no I/O),
//! and the `est-relay` process's CPU per relayed datagram and its RSS with 1,000 and 10,000
//! meters, stateless and stateful, against a registrar that echoes.
//!
//! ```text
//! cargo build --release -p est-relay
//! cargo run --release -p est-relay --example relay_bench [-- PATH/TO/est-relay]
//! ```
//!
//! Everything runs on loopback; the meters are UDP sockets of this process (one per meter, so
//! 10,000 meters need an open-files limit above 10,000), the registrar a thread that answers
//! every datagram (JPY: same header, same content).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness: a setup failure aborts the run with its message"
)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use est_relay::{jpy, MeterAddr, Mode, Rate, Relay, RelayConfig};

/// A DTLS record about the size of a meter's handshake datagram.
fn datagram(tag: u8, len: usize) -> Vec<u8> {
    let mut r = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1];
    r.extend_from_slice(&((len - 13) as u16).to_be_bytes());
    r.push(1);
    r.resize(len, tag);
    r
}

fn core_bench(mode: Mode, n: usize) -> (f64, f64) {
    let registrar: SocketAddr = "192.0.2.1:7634".parse().unwrap();
    let t0 = Instant::now();
    let mut relay = Relay::new(
        RelayConfig {
            mode,
            registrars: vec![registrar],
            per_meter_rate: Rate::UNLIMITED,
            global_rate: Rate::UNLIMITED,
            max_circuits: 2000,
            max_circuits_per_interface: 2000,
            ..RelayConfig::default()
        },
        t0,
    )
    .unwrap();
    let meters: Vec<MeterAddr> = (0..1000u32)
        .map(|i| {
            MeterAddr::new(
                format!("[fe80::2:0:{:x}:{:x}]:5684", i >> 16, i & 0xffff)
                    .parse()
                    .unwrap(),
                0,
            )
        })
        .collect();
    let d = datagram(7, 200);
    let mut replies = Vec::with_capacity(n);
    let start = Instant::now();
    for &meter in meters.iter().cycle().take(n) {
        relay.handle_meter(t0, meter, &d);
        while let Some(t) = relay.poll_transmit() {
            replies.push(t);
        }
        while relay.poll_event().is_some() {}
    }
    let up = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    for t in &replies {
        match t.destination {
            est_relay::Destination::Jpy(from) => relay.handle_jpy(t0, from, &t.payload),
            est_relay::Destination::Circuit { circuit, registrar } => {
                relay.handle_circuit(t0, circuit, registrar, &t.payload)
            }
            est_relay::Destination::Meter(_) => {}
        }
        while relay.poll_transmit().is_some() {}
    }
    let down = start.elapsed().as_nanos() as f64 / replies.len().max(1) as f64;
    assert_eq!(relay.metrics().forwarded_to_meters as usize, n);
    (up, down)
}

/// (utime + stime) of a process in seconds, and its VmRSS and VmHWM in kB.
fn proc_stats(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name in parentheses: utime is the 14th field, stime the 15th.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // f[0] is field 3 (state): utime = field 14 = f[11], stime = f[12]. CLK_TCK is 100 on Linux.
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kb("VmRSS:"), kb("VmHWM:"))
}

/// A registrar that answers every datagram with itself (a JPY message keeps its header).
fn echo_registrar(stop: Arc<AtomicBool>, seen: Arc<AtomicU64>) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                seen.fetch_add(1, Ordering::Relaxed);
                // recv_from's n never exceeds the buffer.
                let d = buf.get(..n).unwrap_or_default();
                if let Ok(j) = jpy::decode(d, 64) {
                    let _ = s.send_to(&jpy::encode(&j.header, &j.content), from);
                } else {
                    let _ = s.send_to(d, from);
                }
            }
        }
    });
    addr
}

struct RelayChild {
    child: Child,
    join: SocketAddr,
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(bin: &str, mode: &str, registrar: SocketAddr, extra: &str) -> RelayChild {
    let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{mode}.toml"));
    std::fs::write(
        &cfg,
        format!("metrics_log_interval_secs = 0\nsocket_receive_buffer_bytes = 8388608\n{extra}\n"),
    )
    .unwrap();
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--mode", mode, "--config"])
        .arg(&cfg)
        .arg("--registrar")
        .arg(registrar.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("est-relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let join = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    RelayChild { child, join }
}

/// `meters` sockets each send `per_meter` datagrams through the relay (paced); returns the
/// relay's CPU seconds, the datagrams the registrar saw, and its RSS/HWM after.
fn process_run(bin: &str, mode: &str, meters: usize, per_meter: usize) -> (f64, u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let registrar = echo_registrar(stop.clone(), seen.clone());
    let relay = start_relay(
        bin,
        mode,
        registrar,
        "meter_rate_per_sec = 0.0\nglobal_rate_per_sec = 0.0\nmax_circuits = 20000\n\
         max_circuits_per_interface = 20000\nmax_circuits_per_meter = 20000\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    let pid = relay.child.id();
    let (cpu0, rss0, _) = proc_stats(pid);
    let sockets: Vec<UdpSocket> = (0..meters)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let d = datagram(9, 200);
    for round in 0..per_meter {
        for (i, s) in sockets.iter().enumerate() {
            let _ = s.send_to(&d, relay.join);
            if i % 200 == 199 {
                // Pacing: about 20,000 datagrams a second, below what loopback drops.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = round;
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (cpu1, rss1, hwm) = proc_stats(pid);
    stop.store(true, Ordering::Relaxed);
    let _ = rss0;
    (cpu1 - cpu0, seen.load(Ordering::Relaxed), rss1, hwm)
}

fn main() {
    let bin = std::env::args().nth(1).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        // target/release/examples/relay_bench -> target/release/est-relay
        exe.parent()
            .and_then(|p| p.parent())
            .unwrap()
            .join("est-relay")
            .to_string_lossy()
            .into_owned()
    });
    println!("## core (no I/O), 200-byte datagrams, 1,000 meters");
    for mode in [Mode::Stateless, Mode::Stateful] {
        let (up, down) = core_bench(mode, 200_000);
        let mode = mode.to_string();
        println!("{mode:<10} meter -> registrar {up:>7.0} ns/datagram, registrar -> meter {down:>7.0} ns/datagram");
    }
    println!("\n## est-relay process ({bin}), 200-byte datagrams, echoing registrar");
    for mode in ["stateless", "stateful"] {
        for (meters, per_meter) in [(1_000usize, 50usize), (10_000, 5)] {
            let (cpu, seen, rss, hwm) = process_run(&bin, mode, meters, per_meter);
            let relayed = 2 * seen; // each seen datagram went up and came back down
            println!(
                "{mode:<10} {meters:>6} meters: {seen} datagrams up and back, CPU {cpu:.2} s = {:.1} µs per relayed datagram; RSS {} kB (peak {} kB)",
                cpu * 1e6 / relayed.max(1) as f64,
                rss,
                hwm
            );
        }
    }
}
