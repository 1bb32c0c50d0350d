//! Integration: a fleet of 200 meters enrolls against a real `est-server` on loopback through
//! emulated links with 20% independent loss in each direction, and the server's store holds every
//! issued certificate exactly once.
//!
//! The `est-server` binary is located next to this test binary (same target directory and profile)
//! after `cargo build -p est-server --bin est-server`, which the test runs itself (a no-op when up to
//! date). Set `EST_SERVER_BIN=/path/to/est-server` to use another build.
//!
//! Run: `cargo test -p client-sim --test est_server_fleet -- --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use client_sim::driver::DriverConfig;
use client_sim::dtls::DtlsClientConfig;
use client_sim::fleet::{render_summary, run_fleet, FleetConfig};
use client_sim::meter::MeterConfig;
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};

const METERS: usize = 200;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// target/<profile>/ of this test binary (target/<profile>/deps/<test>).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

fn est_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EST_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "est-server", "--bin", "est-server"])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("running cargo build -p est-server");
    assert!(status.success(), "cargo build -p est-server failed");
    profile_dir.join("est-server")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning est-server");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_200_enrolls_at_20_percent_loss_and_store_holds_each_cert_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = est_server_bin();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("est-data");
    let fleet_dir = tmp.path().join("fleet");
    run_ok(Command::new(&bin).arg("init").arg("--data-dir").arg(&data));
    run_ok(
        Command::new(&bin)
            .args(["factory", "mint", "--count", &METERS.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .arg("--out")
            .arg(&fleet_dir),
    );
    let port = free_udp_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Server(
        Command::new(&bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting est-server run"),
    );
    // Ready when the port is taken.
    for _ in 0..100 {
        if UdpSocket::bind(listen).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let fleet = pki::load_fleet(&fleet_dir, Some(METERS)).unwrap();
    assert_eq!(fleet.devices.len(), METERS);
    assert!(!fleet.implicit_ta_der.is_empty(), "implicit-ta.pem");
    let plan = FleetPlan {
        arrival: Arrival::Burst,
        link: "loss=0.2,latency=10ms,jitter=5ms".parse().unwrap(),
        max_hops: 1,
        meters_per_dcu: None,
    };
    let serials: Vec<String> = fleet.devices.iter().map(|d| d.serial.clone()).collect();
    let plans = build_schedule(&plan, &serials, 7);
    let cfg = FleetConfig {
        concurrency: 100,
        driver: DriverConfig {
            server: listen,
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls: DtlsClientConfig {
                trust_anchors_der: fleet.implicit_ta_der.clone(),
                flight_interval: Duration::from_millis(500),
                handshake_timeout: Duration::from_secs(15),
                ..DtlsClientConfig::default()
            },
            // ACK_TIMEOUT 1 s instead of 2 s keeps the test short; loopback RTTs are tiny.
            coap: ClientConfig {
                coap: CoapConfig {
                    ack_timeout: Duration::from_secs(1),
                    ..CoapConfig::default()
                },
                ..ClientConfig::default()
            },
        },
        meter: MeterConfig {
            max_attempts: 8,
            retry_backoff: Duration::from_millis(500),
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        progress: false,
    };
    let result = tokio::time::timeout(
        Duration::from_secs(600),
        run_fleet(plans, fleet.devices.clone(), cfg, 7),
    )
    .await
    .expect("fleet run finished");
    let s = &result.summary;
    println!("{}", render_summary(s));
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(s));
    assert!(
        s.up.lost > 0 && s.down.lost > 0,
        "the links did lose datagrams"
    );

    // The store: every issued certificate exactly once.
    drop(server);
    let db = rusqlite::Connection::open_with_flags(
        data.join("est.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db.prepare("SELECT der FROM certificates").unwrap();
    let ders: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    use sha2::Digest;
    let stored: Vec<String> = ders
        .iter()
        .map(|d| hex::encode(sha2::Sha256::digest(d)))
        .collect();
    for o in &result.outcomes {
        let h = o
            .ldevid_sha256
            .as_ref()
            .expect("enrolled meter has an LDevID");
        let n = stored.iter().filter(|s| *s == h).count();
        assert_eq!(n, 1, "meter {} certificate stored {n} times", o.serial);
    }
    assert_eq!(
        stored.len(),
        METERS,
        "one certificate per meter (a retried /sen must not issue twice)"
    );
}
