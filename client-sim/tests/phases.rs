//! Integration: the split of an enrollment's bytes and frames by phase (`client_sim::phases`),
//! against a real `est-server`: on a lossless link every flight and exchange is where it should
//! be, nothing is a retransmission, and the rows add up to the link's counters; on a link that
//! loses 20% of the datagrams the rows still add up, and the retransmissions show.
//!
//! Run: `cargo test -p client-sim --test phases -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::time::Duration;

use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use client_sim::meter::EstExchange;
use client_sim::phases::{Dir, Phase, Stage};
use support::backend;

fn native() -> DtlsClientConfig {
    DtlsClientConfig {
        handshake_timeout: Duration::from_secs(20),
        flight_interval: Duration::from_millis(400),
        backend: DtlsBackend::Native,
        ..DtlsClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossless_enrollment_splits_into_its_flights_and_exchanges() {
    const METERS: usize = 4;
    let srv = support::Running::start(METERS);
    let result = backend::run(&srv, native(), "latency=10ms,jitter=0ms", METERS, 1).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64);
    backend::assert_phases_add_up(&result);
    let n = METERS as u64;
    let t = &s.phases;
    let get = |p, d| t.get(Stage::Enroll, p, d);
    // Flights 1-3: ClientHello twice (without, then with the cookie), one HelloVerifyRequest.
    assert_eq!(get(Phase::Hello, Dir::Up).datagrams, 2 * n);
    assert_eq!(get(Phase::Hello, Dir::Down).datagrams, n);
    assert!(get(Phase::ServerFlight, Dir::Down).datagrams >= n);
    assert!(get(Phase::ClientFlight, Dir::Up).datagrams >= n);
    assert_eq!(get(Phase::FinalFlight, Dir::Down).datagrams, n);
    // The close_notify at the end.
    assert_eq!(get(Phase::Alert, Dir::Up).datagrams, n);
    for ex in [EstExchange::CaCerts, EstExchange::Enroll] {
        // 1024-byte blocks: one request and one response each.
        let up = get(Phase::Est(ex), Dir::Up);
        let down = get(Phase::Est(ex), Dir::Down);
        assert_eq!((up.datagrams, down.datagrams), (n, n), "{ex:?}");
        // CCM_8 without a CID towards the meter: 13 B header + 8 B nonce + 8 B tag.
        assert_eq!(down.dtls_overhead, 29 * n, "{ex:?}");
        assert!(up.coap_overhead > 0 && down.coap_overhead > 0);
    }
    // The CSR and the certificates are the payload.
    assert!(get(Phase::Est(EstExchange::Enroll), Dir::Up).payload > 150 * n);
    assert!(get(Phase::Est(EstExchange::CaCerts), Dir::Down).payload > 300 * n);
    assert_eq!(get(Phase::Other, Dir::Up).datagrams, 0);
    assert_eq!(get(Phase::Other, Dir::Down).datagrams, 0);
    let all = t.total(|_, _, _| true);
    assert_eq!(all.retransmitted_datagrams, 0);
    assert_eq!(all.lost, 0);
    let text = client_sim::fleet::render_summary(s);
    assert!(text.contains("by phase, per enrollment") && text.contains("EST /sen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_20_percent_loss_the_rows_still_add_up_and_retransmissions_show() {
    const METERS: usize = 6;
    let srv = support::Running::start(METERS);
    let result = backend::run(&srv, native(), "loss=0.2,latency=5ms,jitter=2ms", METERS, 8).await;
    let s = &result.summary;
    assert_eq!(s.enrolled, METERS as u64);
    backend::assert_phases_add_up(&result);
    let all = s.phases.total(|_, _, _| true);
    assert!(all.lost > 0);
    assert_eq!(
        all.lost,
        s.up.lost + s.down.lost + s.up.queue_drops + s.down.queue_drops
    );
    assert!(all.retransmitted_datagrams > 0, "{:#?}", s.phases.rows());
    let hs = s.phases.total(|_, p, _| p.is_handshake());
    assert!(hs.retransmitted_datagrams > 0, "{:#?}", s.phases.rows());
}

/// Bytes per meter of `phase` in `stage`, both directions.
fn bytes_of(r: &client_sim::fleet::FleetResult, stage: Stage, phase: Phase) -> u64 {
    let t = &r.summary.phases;
    (t.get(stage, phase, Dir::Up).bytes + t.get(stage, phase, Dir::Down).bytes)
        / r.summary.meters.max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_info_and_a_held_explicit_ta_leave_out_the_certificates_the_meter_has() {
    use client_sim::meter::CrtsMode;
    const METERS: usize = 3;
    let mut srv = support::Running::start(METERS);
    let base = backend::run(&srv, native(), "lan", METERS, 1).await;
    assert_eq!(base.summary.enrolled, METERS as u64);
    // Meters provisioned with the server's certificate and their Explicit TA.
    let server_cert = client_sim::pki::load_cert_chain(&srv.data.join("dtls/server.pem")).unwrap();
    let ta = client_sim::pki::load_cert_chain(&srv.fleet_dir.join("implicit-ta.pem")).unwrap();
    let mut dtls = native();
    dtls.cached_info = true;
    dtls.server_chain_der = server_cert.clone();
    let lean = backend::run_with(
        &srv,
        dtls,
        |m| {
            m.crts = CrtsMode::Never;
            m.explicit_ta_der = ta;
        },
        "lan",
        METERS,
        1,
    )
    .await;
    assert_eq!(lean.summary.enrolled, METERS as u64);
    backend::assert_phases_add_up(&lean);
    let s = Stage::Enroll;
    assert_eq!(bytes_of(&lean, s, Phase::Est(EstExchange::CaCerts)), 0);
    assert!(bytes_of(&base, s, Phase::Est(EstExchange::CaCerts)) > 400);
    // The server flight lost the certificate, less the 33-byte fingerprint and the extension.
    let saved = bytes_of(&base, s, Phase::ServerFlight) - bytes_of(&lean, s, Phase::ServerFlight);
    assert!(
        saved.abs_diff(server_cert[0].len() as u64 + 6 - 33 - 7) <= 2,
        "{saved}"
    );
    backend::check_store(&mut srv, &lean, METERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_learns_the_server_certificate_and_renews_with_its_fingerprint() {
    use client_sim::meter::CrtsMode;
    const METERS: usize = 2;
    let srv = support::Running::start(METERS);
    for (crts, crts_at_renewal) in [(CrtsMode::Once, false), (CrtsMode::Always, true)] {
        let mut dtls = native();
        dtls.cached_info = true;
        let r = backend::run_with(
            &srv,
            dtls,
            |m| {
                m.renew = true;
                m.crts = crts;
            },
            "lan",
            METERS,
            1,
        )
        .await;
        assert_eq!(r.summary.renewed, METERS as u64, "{crts:?}");
        backend::assert_phases_add_up(&r);
        // The renewal's server flight carries the fingerprint of what the first one carried.
        let first = bytes_of(&r, Stage::Enroll, Phase::ServerFlight);
        let renewal = bytes_of(&r, Stage::Renew, Phase::ServerFlight);
        assert!(first > renewal + 300, "{first} vs {renewal}");
        let crts = bytes_of(&r, Stage::Renew, Phase::Est(EstExchange::CaCerts));
        assert_eq!(crts > 0, crts_at_renewal, "{crts}");
        assert!(bytes_of(&r, Stage::Enroll, Phase::Est(EstExchange::CaCerts)) > 0);
        assert!(bytes_of(&r, Stage::Renew, Phase::Est(EstExchange::ReEnroll)) > 0);
    }
}
