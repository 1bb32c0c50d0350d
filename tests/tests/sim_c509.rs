//! The simulator enrolls a fleet with C509 requests and C509 answers against the real
//! server, and the same fleet with DER, side by side: C509 must cost fewer bytes and
//! 802.15.4 frames per enrollment, and the store must hold one DER certificate per meter.
//! The C509 meters use both draft -20 media types: /crts as application/cose-c509+cbor
//! (COSE_C509, Accept 65015) on their first enrollment, /sen answered as
//! application/cose-c509-cert+cbor (one C509Certificate, Accept 65003).
//! With our engine's client (the `native` backend) C509 also covers the handshake's
//! certificates (RFC 7250), and issue #15's targets hold; against a server with C509 off the
//! same meters fall back to X.509.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::time::Duration;

use client_sim::driver::DriverConfig;
use client_sim::dtls::DtlsClientConfig;
use client_sim::fleet::{render_summary, run_fleet, FleetConfig, Summary};
use client_sim::meter::{CertFormat, MeterConfig};
use client_sim::pki;
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::ClientConfig;
use est_tests::TestServer;

const METERS: usize = 12;

async fn run(srv: &TestServer, prefix: &str, c509: bool) -> Summary {
    run_with(srv, prefix, c509, |_, _| {}).await
}

/// As [`run`], with the driver's and the meters' settings changed by `tweak`.
async fn run_with(
    srv: &TestServer,
    prefix: &str,
    c509: bool,
    tweak: impl FnOnce(&mut DriverConfig, &mut MeterConfig),
) -> Summary {
    let serials: Vec<String> = (1..=METERS).map(|i| format!("{prefix}{i:04}")).collect();
    let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
    let fleet_dir = srv.mint(&refs).unwrap();
    let fleet = pki::load_fleet(&fleet_dir, Some(METERS)).unwrap();
    let plan = FleetPlan {
        arrival: Arrival::Burst,
        // Wi-SUN's latency, rate and 802.15.4 framing, without its loss and jitter: the
        // comparison is of what each encoding puts on the air. With loss, one extra DTLS
        // flight resent in one of the two runs (~1.3 kB over 12 meters, ~110 B per enrollment)
        // outweighs C509's saving on the request (~60 B) and could flip the result.
        link: "profile=wisun,loss=0,jitter=0ms".parse().unwrap(),
        max_hops: 1,
        meters_per_dcu: None,
    };
    let plans = build_schedule(&plan, &serials, 3);
    let mut cfg = FleetConfig {
        concurrency: METERS,
        driver: DriverConfig {
            server: srv.addr,
            failover: Vec::new(),
            bind: "127.0.0.1:0".parse().unwrap(),
            dtls: DtlsClientConfig {
                trust_anchors_der: fleet.implicit_ta_der.clone(),
                ..DtlsClientConfig::default()
            },
            coap: ClientConfig::default(),
            ack_timeout_auto: false,
            nat_rebind: false,
        },
        meter: MeterConfig {
            accept: if c509 {
                CertFormat::C509
            } else {
                CertFormat::Pkcs7
            },
            c509_requests: c509,
            ..MeterConfig::default()
        },
        dcu_link: "lan".parse().unwrap(),
        dcu_mode: client_sim::net::DcuMode::Router,
        jpy_server: None,
        progress: false,
    };
    tweak(&mut cfg.driver, &mut cfg.meter);
    let result = tokio::time::timeout(
        Duration::from_secs(300),
        run_fleet(plans, fleet.devices.clone(), cfg, 3),
    )
    .await
    .unwrap();
    let s = result.summary;
    assert_eq!(s.enrolled, METERS as u64, "{}", render_summary(&s));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c509_fleet_uses_fewer_bytes_than_der() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let der = run(&srv, "SNDER", false).await;
    let c509 = run(&srv, "SNCBOR", true).await;
    println!(
        "bytes per enrollment (up/down/frames): DER {:.0}/{:.0}/{:.1}  C509 {:.0}/{:.0}/{:.1}",
        der.bytes_up_per_enrollment,
        der.bytes_down_per_enrollment,
        der.frames_per_enrollment,
        c509.bytes_up_per_enrollment,
        c509.bytes_down_per_enrollment,
        c509.frames_per_enrollment
    );
    assert!(c509.bytes_up_per_enrollment < der.bytes_up_per_enrollment);
    assert!(c509.bytes_down_per_enrollment < der.bytes_down_per_enrollment);
    assert!(c509.frames_per_enrollment < der.frames_per_enrollment);
    // Every meter's certificate is in the store once, as DER.
    let certs = srv.store().list_certificates(1000).unwrap();
    assert_eq!(certs.len(), 2 * METERS);
    assert!(certs.iter().all(|c| c.der.first() == Some(&0x30)));
    srv.stop().await;
}

/// The narrowband profile of issue #15 for our engine's client: certificates named by
/// fingerprint (RFC 7924, the server certificate provisioned), the Explicit TA held (no /crts),
/// 1-byte tokens, no close_notify, and C509 inside the handshake when `c509`.
fn narrowband(srv: &TestServer, c509: bool) -> impl FnOnce(&mut DriverConfig, &mut MeterConfig) {
    let server_chain = pki::load_cert_chain(&srv.data_dir.join("dtls/server.pem")).unwrap();
    let ta = pki::load_cert_chain(&srv.data_dir.join("ca/issuing-ca.pem")).unwrap();
    move |d, m| {
        d.dtls.backend = client_sim::dtls::DtlsBackend::Native;
        d.dtls.cached_info = true;
        d.dtls.server_chain_der = server_chain;
        d.dtls.close_notify = false;
        d.dtls.c509_certificate_type = c509.then_some(224);
        d.coap.token_len = 1;
        d.coap.block1_szx = 6;
        d.coap.block2_szx = Some(6);
        m.crts = client_sim::meter::CrtsMode::Never;
        m.explicit_ta_der = ta;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c509_in_the_handshake_meets_the_issue_15_targets_and_falls_back_to_x509() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let c509 = run_with(&srv, "SNNB", true, narrowband(&srv, true)).await;
    let der = run_with(&srv, "SNNBDER", false, narrowband(&srv, false)).await;
    let t = srv.transport();
    let per = |s: &Summary| {
        (
            s.bytes_up_per_enrollment + s.bytes_down_per_enrollment,
            s.frames_per_enrollment,
        )
    };
    println!("C509 {:?}, DER {:?}, {t:?}", per(&c509), per(&der));
    // Every C509 meter sent its IDevID as C509; every meter got our certificate's fingerprint.
    assert_eq!(t.c509_client_certificates, METERS as u64);
    assert_eq!(t.cached_info_hits, 2 * METERS as u64);
    // Issue #15's targets (wisun, no loss, per enrollment, handshake included).
    assert!(
        per(&c509).0 <= 1800.0 && per(&c509).1 <= 24.0,
        "C509 {:?}",
        per(&c509)
    );
    assert!(per(&der).0 <= 2600.0, "DER {:?}", per(&der));
    srv.stop().await;

    // A server with C509 off: the same meters fall back to X.509 and still enroll.
    let srv = TestServer::start(|c| c.dtls.c509_certificate_type = 0)
        .await
        .unwrap();
    let fallback = run_with(&srv, "SNNBX", true, narrowband(&srv, true)).await;
    let t = srv.transport();
    assert_eq!(t.c509_client_certificates, 0);
    assert_eq!(t.handshakes_completed, METERS as u64);
    assert!(
        per(&fallback).0 > per(&c509).0 + 200.0,
        "{:?}",
        per(&fallback)
    );
    let certs = srv.store().list_certificates(1000).unwrap();
    assert_eq!(certs.len(), METERS);
    srv.stop().await;
}
