//! The fleet tests every meter DTLS backend must pass against a real `est-server`: meters enroll
//! and their LDevIDs are in the store once and verify; a lossy link still completes; a wrong
//! trust anchor fails the handshake fast with nothing stored. Each backend's test file calls
//! these with its own [`DtlsClientConfig`].
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::time::{Duration, Instant};

use client_sim::driver::DriverConfig;
use client_sim::dtls::DtlsClientConfig;
use client_sim::fleet::{render_summary, run_fleet, FleetConfig, FleetResult};
use client_sim::meter::{FailureReason, MeterConfig};
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};
use openssl::x509::X509;

use super::{server_settings_for, sha256_hex, Running};

fn fleet_config(
    srv: &Running,
    dtls: DtlsClientConfig,
    meters: usize,
    max_attempts: u32,
) -> FleetConfig {
    FleetConfig {
        concurrency: meters,
        driver: DriverConfig {
            server: srv.listen,
            failover: Vec::new(),
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls,
            // ACK_TIMEOUT 1 s instead of 2 s keeps the lossy test short.
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
            max_attempts,
            retry_backoff: Duration::from_millis(200),
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        dcu_mode: client_sim::net::DcuMode::Router,
        jpy_server: None,
        progress: false,
    }
}

/// Runs `meters` meters of the fleet over `link`; `dtls.trust_anchors_der` empty = the fleet's
/// Implicit TA.
pub(crate) async fn run(
    srv: &Running,
    dtls: DtlsClientConfig,
    link: &str,
    meters: usize,
    max_attempts: u32,
) -> FleetResult {
    run_with(srv, dtls, |_| {}, link, meters, max_attempts).await
}

/// As [`run`], with the meters' configuration changed by `tweak`.
pub(crate) async fn run_with(
    srv: &Running,
    mut dtls: DtlsClientConfig,
    tweak: impl FnOnce(&mut MeterConfig),
    link: &str,
    meters: usize,
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
    if dtls.trust_anchors_der.is_empty() {
        dtls.trust_anchors_der = fleet.implicit_ta_der.clone();
    }
    let mut cfg = fleet_config(srv, dtls, meters, max_attempts);
    tweak(&mut cfg.meter);
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
/// issuing CA (checked with OpenSSL).
pub(crate) fn check_store(srv: &mut Running, result: &FleetResult, meters: usize) {
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
    let stored: Vec<String> = ders.iter().map(|d| sha256_hex(d)).collect();
    for o in &result.outcomes {
        let h = o
            .ldevid_sha256
            .as_ref()
            .expect("enrolled meter has an LDevID");
        assert_eq!(stored.iter().filter(|s| *s == h).count(), 1, "{}", o.serial);
    }
}

/// Each meter's bytes, datagrams and frames by phase add up exactly to its link's counters,
/// and every row's byte split (payload + CoAP overhead + DTLS overhead) to its bytes.
pub(crate) fn assert_phases_add_up(result: &FleetResult) {
    use client_sim::phases::Dir;
    for o in &result.outcomes {
        let t = &o.phases;
        for (dir, link) in [(Dir::Up, o.link_up), (Dir::Down, o.link_down)] {
            let sum = t.total(|_, _, d| d == dir);
            assert_eq!(
                (sum.datagrams, sum.bytes, sum.frames, sum.lost),
                (
                    link.datagrams,
                    link.bytes,
                    link.frames,
                    link.lost + link.queue_drops
                ),
                "{} {dir:?}: {:#?}",
                o.serial,
                t.rows()
            );
        }
        for r in t.rows() {
            let c = r.counters;
            assert_eq!(
                c.payload + c.coap_overhead + c.dtls_overhead,
                c.bytes,
                "{r:?}"
            );
            assert!(c.retransmitted_bytes <= c.bytes, "{r:?}");
        }
    }
    let s = &result.summary;
    let all = s.phases.total(|_, _, _| true);
    assert_eq!(all.bytes, s.up.bytes + s.down.bytes);
    assert_eq!(all.frames, s.up.frames + s.down.frames);
}

/// 16 meters enroll, one handshake each, and their LDevIDs are stored once and verify.
pub(crate) async fn meters_enroll_and_ldevids_verify(dtls: DtlsClientConfig) {
    const METERS: usize = 16;
    let mut srv = Running::start_with(METERS, server_settings_for(dtls.backend));
    let result = run(&srv, dtls, "lan", METERS, 3).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(s));
    assert_eq!(s.handshakes_failed, 0);
    for o in &result.outcomes {
        assert!(o.enrolled && o.failure.is_none(), "{o:?}");
        assert_eq!(o.stats.handshakes, 1);
        // The DTLS handshake and the CoAP exchanges went over the emulated link.
        assert!(o.link_up.datagrams >= 6 && o.coap.requests >= 2, "{o:?}");
    }
    assert_phases_add_up(&result);
    check_store(&mut srv, &result, METERS);
}

/// 6 meters enroll over a link that loses 15% of datagrams.
pub(crate) async fn meters_enroll_over_a_15_percent_lossy_link(dtls: DtlsClientConfig) {
    const METERS: usize = 6;
    let mut srv = Running::start_with(METERS, server_settings_for(dtls.backend));
    let result = run(&srv, dtls, "loss=0.15,latency=5ms,jitter=2ms", METERS, 8).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(s));
    assert!(s.up.lost + s.down.lost > 0, "the links did lose datagrams");
    println!(
        "lossy: {} handshakes ({} failed) for {METERS} meters, {} up / {} down datagrams lost",
        s.handshakes, s.handshakes_failed, s.up.lost, s.down.lost
    );
    assert_phases_add_up(&result);
    check_store(&mut srv, &result, METERS);
}

/// A meter whose Implicit TA is a real CA, but not the server certificate's issuer, fails both
/// handshake attempts fast, sends no CoAP, and nothing is stored. The failure message contains
/// every string of `expect_in_message`.
pub(crate) async fn wrong_trust_anchor_fails_the_handshake(
    mut dtls: DtlsClientConfig,
    expect_in_message: &[&str],
) {
    let mut srv = Running::start_with(1, server_settings_for(dtls.backend));
    let wrong_root =
        X509::from_pem(&std::fs::read(srv.fleet_dir.join("manufacturer-ca.pem")).unwrap())
            .unwrap()
            .to_der()
            .unwrap();
    dtls.trust_anchors_der = vec![wrong_root];
    let t = Instant::now();
    let result = run(&srv, dtls, "lan", 1, 2).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "fails fast, no timeouts"
    );
    let o = result.outcomes.first().unwrap();
    assert!(!o.enrolled);
    match &o.failure {
        Some(FailureReason::HandshakeError(m)) => {
            for e in expect_in_message {
                assert!(m.contains(e), "{m}");
            }
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.stats.handshakes, 2);
    assert_eq!(o.stats.handshakes_failed, 2);
    assert_eq!(o.coap.requests, 0, "no CoAP before a verified handshake");
    assert!(srv.stop_and_read_store().is_empty());
}
