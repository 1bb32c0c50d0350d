//! Integration: a fleet of 200 meters enrolls against a real `est-server` on loopback through
//! emulated links with 20% independent loss in each direction, and the server's store holds every
//! issued certificate exactly once.
//!
//! The `est-server` binary is located next to this test binary (same target directory and profile)
//! after `cargo build -p est-server --bin est-server`, which the test runs itself (a no-op when up to
//! date). Set `EST_SERVER_BIN=/path/to/est-server` to use another build.
//!
//! Run: `cargo test -p client-sim --test est_server_fleet -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::time::Duration;

use client_sim::driver::DriverConfig;
use client_sim::dtls::DtlsClientConfig;
use client_sim::fleet::{render_summary, run_fleet, FleetConfig};
use client_sim::meter::MeterConfig;
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};

const METERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_200_enrolls_at_20_percent_loss_and_store_holds_each_cert_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut srv = support::Running::start(METERS);
    let listen = srv.listen;
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(METERS)).unwrap();
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
            failover: Vec::new(),
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
            ack_timeout_auto: false,
            nat_rebind: false,
        },
        meter: MeterConfig {
            max_attempts: 8,
            retry_backoff: Duration::from_millis(500),
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        dcu_mode: client_sim::net::DcuMode::Router,
        jpy_server: None,
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
    let stored: Vec<String> = srv
        .stop_and_read_store()
        .iter()
        .map(|d| support::sha256_hex(d))
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
