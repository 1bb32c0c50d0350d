//! Integration: meters using the OpenSSL DTLS client backend (`--dtls-backend openssl`) against a
//! real `est-server` on loopback: they enroll and their LDevIDs are in the store and verify
//! against the server's issuing CA; a lossy emulated link still completes; a wrong trust anchor
//! fails the handshake with a clear reason; the command line selects the backend.
//!
//! Run: `cargo test -p client-sim --test openssl_backend -- --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use client_sim::driver::DriverConfig;
use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use client_sim::fleet::{render_summary, run_fleet, FleetConfig, FleetResult};
use client_sim::meter::{FailureReason, MeterConfig};
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};
use openssl::x509::X509;

fn fleet_config(
    srv: &support::Running,
    trust_anchors_der: Vec<Vec<u8>>,
    meters: usize,
    max_attempts: u32,
) -> FleetConfig {
    FleetConfig {
        concurrency: meters,
        driver: DriverConfig {
            server: srv.listen,
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls: DtlsClientConfig {
                trust_anchors_der,
                handshake_timeout: Duration::from_secs(15),
                backend: DtlsBackend::Openssl,
                ..DtlsClientConfig::default()
            },
            // ACK_TIMEOUT 1 s instead of 2 s keeps the lossy test short.
            coap: ClientConfig {
                coap: CoapConfig {
                    ack_timeout: Duration::from_secs(1),
                    ..CoapConfig::default()
                },
                ..ClientConfig::default()
            },
        },
        meter: MeterConfig {
            max_attempts,
            retry_backoff: Duration::from_millis(200),
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        progress: false,
    }
}

async fn run(
    srv: &support::Running,
    link: &str,
    meters: usize,
    trust_anchors_der: Option<Vec<Vec<u8>>>,
    max_attempts: u32,
) -> FleetResult {
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(meters)).unwrap();
    assert_eq!(fleet.devices.len(), meters);
    let plan = FleetPlan {
        arrival: Arrival::Burst,
        link: link.parse().unwrap(),
        max_hops: 1,
        meters_per_dcu: None,
    };
    let serials: Vec<String> = fleet.devices.iter().map(|d| d.serial.clone()).collect();
    let plans = build_schedule(&plan, &serials, 11);
    let tas = trust_anchors_der.unwrap_or_else(|| fleet.implicit_ta_der.clone());
    let cfg = fleet_config(srv, tas, meters, max_attempts);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        run_fleet(plans, fleet.devices.clone(), cfg, 11),
    )
    .await
    .expect("fleet run finished");
    println!("{}", render_summary(&result.summary));
    result
}

/// Every LDevID a meter holds is in the store exactly once and is signed by the server's
/// issuing CA.
fn check_store(srv: &mut support::Running, result: &FleetResult, meters: usize) {
    let ders = srv.stop_and_read_store();
    assert_eq!(ders.len(), meters, "one certificate per meter");
    let ca = X509::from_pem(&std::fs::read(srv.data.join("ca/issuing-ca.pem")).unwrap()).unwrap();
    let ca_key = ca.public_key().unwrap();
    for d in &ders {
        let c = X509::from_der(d).unwrap();
        assert!(
            c.verify(&ca_key).unwrap(),
            "LDevID signed by the issuing CA"
        );
        assert_eq!(
            c.issuer_name().to_der().unwrap(),
            ca.subject_name().to_der().unwrap()
        );
    }
    let stored: Vec<String> = ders.iter().map(|d| support::sha256_hex(d)).collect();
    for o in &result.outcomes {
        let h = o
            .ldevid_sha256
            .as_ref()
            .expect("enrolled meter has an LDevID");
        assert_eq!(stored.iter().filter(|s| *s == h).count(), 1, "{}", o.serial);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meters_enroll_against_est_server_and_ldevids_verify() {
    const METERS: usize = 16;
    let mut srv = support::Running::start(METERS);
    let result = run(&srv, "lan", METERS, None, 3).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(s));
    assert_eq!(s.handshakes_failed, 0);
    for o in &result.outcomes {
        assert!(o.enrolled && o.failure.is_none(), "{o:?}");
        assert_eq!(o.stats.handshakes, 1);
        // The DTLS handshake and the CoAP exchanges went over the emulated link.
        assert!(o.link_up.datagrams >= 6 && o.coap.requests >= 2, "{o:?}");
    }
    check_store(&mut srv, &result, METERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meters_enroll_over_a_15_percent_lossy_link() {
    const METERS: usize = 6;
    let mut srv = support::Running::start(METERS);
    let result = run(&srv, "loss=0.15,latency=5ms,jitter=2ms", METERS, None, 8).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(s));
    assert!(s.up.lost + s.down.lost > 0, "the links did lose datagrams");
    println!(
        "lossy: {} handshakes ({} failed) for {METERS} meters, {} up / {} down datagrams lost",
        s.handshakes, s.handshakes_failed, s.up.lost, s.down.lost
    );
    check_store(&mut srv, &result, METERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meter_with_a_wrong_trust_anchor_fails_the_handshake() {
    let mut srv = support::Running::start(1);
    // The manufacturer CA is a real CA, but not the one that issued the server's certificate.
    let wrong_root =
        X509::from_pem(&std::fs::read(srv.fleet_dir.join("manufacturer-ca.pem")).unwrap())
            .unwrap()
            .to_der()
            .unwrap();
    let t = std::time::Instant::now();
    let result = run(&srv, "lan", 1, Some(vec![wrong_root]), 2).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "fails fast, no timeouts"
    );
    let o = result.outcomes.first().unwrap();
    assert!(!o.enrolled);
    match &o.failure {
        Some(FailureReason::HandshakeError(m)) => {
            assert!(m.contains("server certificate verification failed"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.stats.handshakes, 2);
    assert_eq!(o.stats.handshakes_failed, 2);
    assert_eq!(o.coap.requests, 0, "no CoAP before a verified handshake");
    assert!(srv.stop_and_read_store().is_empty());
}

#[test]
fn command_line_selects_the_openssl_backend() {
    const METERS: usize = 3;
    let mut srv = support::Running::start(METERS);
    let json = srv.tmp.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args([
            "--dtls-backend",
            "openssl",
            "--no-progress",
            "--link",
            "lan",
        ])
        .arg("--server")
        .arg(srv.listen.to_string())
        .arg("--fleet")
        .arg(&srv.fleet_dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["summary"]["enrolled"], METERS as u64);
    assert_eq!(srv.stop_and_read_store().len(), METERS);
    let bad = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args(["--dtls-backend", "gnutls", "--fleet", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
