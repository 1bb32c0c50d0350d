//! Integration (issue #12): meters behind 4 DCUs whose relays run est-relay's own core in
//! process, against a real `est-server` whose `[relay]` JPY port is on. At 20% loss each way
//! on the mesh side every meter enrolls, the store holds each certificate once, and the
//! stateless relays' memory does not grow with the meters (a fixed rate-limit table, nothing
//! per meter). The stateful relays (a UDP circuit per meter to the coaps port) with fewer meters.
//!
//! `EST_RELAY_FLEET_METERS` changes the stateless fleet's size (default 2,000: the fleet run
//! takes about 26 s in a debug build on 2 shared cores, minting the IDevIDs and starting the
//! server a few more).
//!
//! Run: `cargo test -p client-sim --test relay_fleet -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::time::Duration;

use client_sim::driver::DriverConfig;
use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use client_sim::fleet::{render_summary, run_fleet, FleetConfig, FleetResult};
use client_sim::meter::MeterConfig;
use client_sim::net::DcuMode;
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};

const DCUS: usize = 4;

fn meters() -> usize {
    std::env::var("EST_RELAY_FLEET_METERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// The server with its JPY port open to relays on loopback.
fn server(meters: usize) -> support::Running {
    support::Running::start_with(
        meters,
        &[
            ("relay", "jpy_listen", "\"127.0.0.1:0\""),
            ("relay", "allowed_proxies", "[\"127.0.0.1\"]"),
            // Loopback: the server's flights can be resent sooner than on a mesh.
            ("dtls", "flight_interval_ms", "300"),
        ],
    )
}

async fn run(srv: &support::Running, meters: usize, mode: DcuMode) -> FleetResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(meters)).unwrap();
    assert_eq!(fleet.devices.len(), meters);
    let plan = FleetPlan {
        arrival: Arrival::Ramp {
            over: Duration::from_secs(4),
        },
        // The mesh side: 20% loss each way.
        link: "loss=0.2,latency=5ms,jitter=2ms".parse().unwrap(),
        max_hops: 1,
        meters_per_dcu: Some(meters.div_ceil(DCUS) as u64),
    };
    let serials: Vec<String> = fleet.devices.iter().map(|d| d.serial.clone()).collect();
    let plans = build_schedule(&plan, &serials, 12);
    let cfg = FleetConfig {
        concurrency: 300,
        driver: DriverConfig {
            server: srv.listen,
            failover: Vec::new(),
            ack_timeout_auto: false,
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls: DtlsClientConfig {
                trust_anchors_der: fleet.implicit_ta_der.clone(),
                flight_interval: Duration::from_millis(250),
                handshake_timeout: Duration::from_secs(15),
                backend: DtlsBackend::Native,
                ..DtlsClientConfig::default()
            },
            // The round trips are milliseconds here: timers of a few hundred ms (rather than the
            // RFC's 2 s) keep a 20%-loss run short.
            coap: ClientConfig {
                coap: CoapConfig {
                    ack_timeout: Duration::from_millis(300),
                    max_retransmit: 4,
                    ..CoapConfig::default()
                },
                ..ClientConfig::default()
            },
            nat_rebind: false,
        },
        meter: MeterConfig {
            max_attempts: 8,
            retry_backoff: Duration::from_millis(300),
            ..MeterConfig::default()
        },
        dcu_link: "latency=2ms".parse().unwrap(),
        dcu_mode: mode,
        jpy_server: srv.jpy,
        progress: false,
    };
    tokio::time::timeout(
        Duration::from_secs(600),
        run_fleet(plans, fleet.devices.clone(), cfg, 12),
    )
    .await
    .expect("fleet run finished")
}

/// Every meter's certificate is in the store exactly once, and nothing else is.
fn each_certificate_stored_once(srv: &mut support::Running, r: &FleetResult, meters: usize) {
    let stored: Vec<String> = srv
        .stop_and_read_store()
        .iter()
        .map(|d| support::sha256_hex(d))
        .collect();
    for o in &r.outcomes {
        let h = o.ldevid_sha256.as_ref().expect("an LDevID");
        assert_eq!(stored.iter().filter(|s| *s == h).count(), 1, "{}", o.serial);
    }
    assert_eq!(stored.len(), meters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_behind_four_stateless_relays_enroll_at_20_percent_loss() {
    let n = meters();
    let mut srv = server(n);
    assert!(srv.jpy.is_some(), "the server announces its JPY port");
    let r = run(&srv, n, DcuMode::RelayStateless).await;
    let s = &r.summary;
    println!("{}", render_summary(s));
    assert_eq!(s.enrolled, n as u64, "{}", render_summary(s));
    assert!(s.up.lost > 0 && s.down.lost > 0, "the mesh lost datagrams");
    assert_eq!(s.dcus, DCUS as u64);
    // Every datagram crossed a relay, wrapped: 24..38 bytes each (the meters' link-local
    // addresses: 32-byte headers, 37..38 bytes of JPY).
    let relay = &s.relay;
    assert!(relay.forwarded_up > 0 && relay.forwarded_down > 0);
    let per = relay.overhead_per_datagram();
    assert!((37.0..=38.0).contains(&per), "{per}");
    assert_eq!(relay.failovers, 0);
    // The stateless relays hold nothing per meter: their state is the fixed rate-limit
    // table, the same as a relay that served none.
    let empty = est_relay::Relay::new(
        est_relay::RelayConfig {
            registrars: vec![srv.jpy.unwrap()],
            ..est_relay::RelayConfig::default()
        },
        std::time::Instant::now(),
    )
    .unwrap()
    .state_bytes() as u64;
    assert_eq!(relay.state_bytes, empty * DCUS as u64);
    each_certificate_stored_once(&mut srv, &r, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_behind_four_stateful_relays_enroll_at_20_percent_loss() {
    let n = 200;
    let mut srv = server(n);
    let r = run(&srv, n, DcuMode::RelayStateful).await;
    let s = &r.summary;
    println!("{}", render_summary(s));
    assert_eq!(s.enrolled, n as u64, "{}", render_summary(s));
    // A circuit per meter (a meter keeps its mesh address, and so its circuit, across
    // sessions, unless the circuit expired in between).
    assert!(s.relay.circuits_opened >= n as u64, "{:?}", s.relay);
    assert_eq!(
        s.relay.overhead_per_datagram(),
        0.0,
        "stateful adds no bytes"
    );
    each_certificate_stored_once(&mut srv, &r, n);
}
