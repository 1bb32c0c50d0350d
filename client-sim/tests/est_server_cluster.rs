//! Integration: two `est-server` processes on one PostgreSQL database (a throwaway cluster from
//! est-test-tools), a fleet spread over both (`DriverConfig::failover`, client-sim's
//! `--server A,B`), and failures in the middle of the run:
//!
//! - `kill -9` of one node once a third of the fleet is in the database: its meters fail over
//!   to the other node; every meter enrolls; every certificate a meter received is in
//!   PostgreSQL exactly once; no device has two active certificates.
//! - PostgreSQL stopped (immediate shutdown, as a crash) for a few seconds mid-run, then
//!   started again: the meters are answered 5.03 + Max-Age meanwhile and all enroll after,
//!   with nothing lost.
//!
//! Meters: 2,000 for the kill test (the figure; `EST_CLUSTER_METERS` overrides),
//! 400 for the outage test. Under CI a PostgreSQL that cannot start fails these tests;
//! elsewhere they are skipped.
//!
//! Run: `cargo test -p client-sim --test est_server_cluster -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sim::driver::{DriverConfig, MeterOutcome};
use client_sim::dtls::DtlsClientConfig;
use client_sim::fleet::{render_summary, run_fleet, FleetConfig, FleetResult};
use client_sim::meter::MeterConfig;
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};
use est_test_tools::pg::TestPostgres;

fn meters_from_env(default: usize) -> usize {
    std::env::var("EST_CLUSTER_METERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(cluster: &support::Cluster, meters: usize, seed: u64) -> FleetResult {
    let fleet = pki::load_fleet(&cluster.fleet_dir, Some(meters)).unwrap();
    let plan = FleetPlan {
        arrival: Arrival::Burst,
        link: "lan".parse().unwrap(),
        max_hops: 1,
        meters_per_dcu: None,
    };
    let serials: Vec<String> = fleet.devices.iter().map(|d| d.serial.clone()).collect();
    let plans = build_schedule(&plan, &serials, seed);
    let cfg = FleetConfig {
        concurrency: 150,
        driver: DriverConfig {
            server: cluster.addrs[0],
            failover: cluster.addrs[1..].to_vec(),
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls: DtlsClientConfig {
                trust_anchors_der: fleet.implicit_ta_der.clone(),
                flight_interval: Duration::from_millis(500),
                // A dead node costs a meter this long before it fails over.
                handshake_timeout: Duration::from_secs(4),
                ..DtlsClientConfig::default()
            },
            coap: ClientConfig {
                coap: CoapConfig {
                    ack_timeout: Duration::from_secs(1),
                    ..CoapConfig::default()
                },
                ..ClientConfig::default()
            },
            nat_rebind: false,
            ack_timeout_auto: false,
        },
        meter: MeterConfig {
            max_attempts: 10,
            retry_backoff: Duration::from_millis(300),
            max_busy_retries: 30,
            max_retry_after: Duration::from_secs(2),
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        dcu_mode: client_sim::net::DcuMode::Router,
        jpy_server: None,
        progress: false,
    };
    tokio::time::timeout(
        Duration::from_secs(900),
        run_fleet(plans, fleet.devices, cfg, seed),
    )
    .await
    .expect("fleet run finished")
}

/// The database after the run: every meter's certificate there exactly once, and one active
/// certificate per device.
fn check_database(pg: &TestPostgres, db: &str, outcomes: &[MeterOutcome]) {
    let hashes = pg
        .psql(db, "SELECT encode(sha256(der), 'hex') FROM certificates")
        .unwrap();
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for h in hashes.lines() {
        *stored.entry(h).or_default() += 1;
    }
    for o in outcomes {
        let h = o
            .ldevid_sha256
            .as_deref()
            .expect("an enrolled meter has an LDevID");
        assert_eq!(
            stored.get(h).copied().unwrap_or(0),
            1,
            "meter {}: its certificate must be in PostgreSQL exactly once",
            o.serial
        );
    }
    let doubles = pg
        .psql(
            db,
            "SELECT device_id FROM certificates WHERE status = 'active' GROUP BY device_id HAVING count(*) > 1",
        )
        .unwrap();
    assert!(
        doubles.is_empty(),
        "devices with two active certificates: {doubles}"
    );
    let active: usize = pg
        .psql(
            db,
            "SELECT count(*) FROM certificates WHERE status = 'active'",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(active, outcomes.len(), "one active certificate per meter");
    // The active certificate of each device is the one its meter holds.
    let active_hashes = pg
        .psql(
            db,
            "SELECT encode(sha256(der), 'hex') FROM certificates WHERE status = 'active'",
        )
        .unwrap();
    let active_hashes: std::collections::HashSet<&str> = active_hashes.lines().collect();
    for o in outcomes {
        assert!(
            active_hashes.contains(o.ldevid_sha256.as_deref().unwrap_or_default()),
            "meter {} holds a certificate that is not its device's active one",
            o.serial
        );
    }
}

fn count(pg: &Mutex<TestPostgres>, db: &str) -> usize {
    pg.lock()
        .unwrap()
        .psql(db, "SELECT count(*) FROM certificates")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_postgres_one_killed_mid_run_every_meter_enrolls_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("two nodes, kill -9 of one") else {
        return;
    };
    let meters = meters_from_env(2000);
    let url = pg.create_database("fleet").unwrap();
    let mut cluster = support::Cluster::start(meters, 2, &url, &[]);
    let pg = Arc::new(Mutex::new(pg));
    let victim = cluster.nodes[0].take().expect("node 0");
    let done = Arc::new(AtomicBool::new(false));
    let killer = std::thread::spawn({
        let (pg, done) = (pg.clone(), done.clone());
        move || {
            let mut victim = victim;
            let t0 = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let n = count(&pg, "fleet");
                if n >= meters / 3 {
                    // kill -9: no shutdown, no flush; whatever it acknowledged must be in the
                    // database already.
                    victim.0.kill().expect("kill -9");
                    let _ = victim.0.wait();
                    return Some((n, t0.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        }
    });
    let t = Instant::now();
    let result = run(&cluster, meters, 11).await;
    done.store(true, Ordering::Relaxed);
    let killed = killer.join().expect("killer thread");
    let s = &result.summary;
    println!("{}", render_summary(s));
    println!(
        "{meters} meters over 2 nodes in {:.1} s; node 0 killed: {killed:?}",
        t.elapsed().as_secs_f64()
    );
    let (at, _) = killed.expect("node 0 was killed mid-run");
    assert!(at < meters, "killed before the end of the run");
    assert_eq!(
        s.enrolled,
        meters as u64,
        "every meter enrolls: {}",
        render_summary(s)
    );
    assert!(
        s.session_retries > 0,
        "the killed node's meters failed over"
    );
    let pg = pg.lock().unwrap();
    check_database(&pg, "fleet", &result.outcomes);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_then_restarted_every_meter_enrolls_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = TestPostgres::start_or_skip("PostgreSQL stopped mid-run") else {
        return;
    };
    let meters = 400;
    let url = pg.create_database("outage").unwrap();
    let cluster = support::Cluster::start(
        meters,
        2,
        &url,
        &[
            ("storage", "timeout_ms", "1000"),
            ("est", "overload_retry_after_secs", "1"),
        ],
    );
    let pg = Arc::new(Mutex::new(pg));
    let done = Arc::new(AtomicBool::new(false));
    let outage = std::thread::spawn({
        let (pg, done) = (pg.clone(), done.clone());
        move || {
            while !done.load(Ordering::Relaxed) {
                if count(&pg, "outage") >= meters / 4 {
                    pg.lock().unwrap().stop(true);
                    std::thread::sleep(Duration::from_secs(4));
                    pg.lock().unwrap().restart().expect("PostgreSQL restarts");
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        }
    });
    let result = run(&cluster, meters, 12).await;
    done.store(true, Ordering::Relaxed);
    let had_outage = outage.join().expect("outage thread");
    let s = &result.summary;
    println!("{}", render_summary(s));
    assert!(had_outage, "PostgreSQL was stopped mid-run");
    assert_eq!(
        s.enrolled,
        meters as u64,
        "every meter enrolls: {}",
        render_summary(s)
    );
    assert!(
        s.busy_retries > 0,
        "meters were answered 5.03 + Max-Age while the database was down"
    );
    let pg = pg.lock().unwrap();
    check_database(&pg, "outage", &result.outcomes);
    drop(cluster);
}
