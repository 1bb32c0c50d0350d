//! The front door's bars (issue #10, "Admission control ... Bar"), against the real
//! `est-server` binary over real UDP on loopback:
//!
//! 1. spoofed ClientHellos (no cookie) from thousands of 127.1.x.y sources, as fast as one
//!    thread sends them: a legitimate meter enrolls, every time, all through the flood;
//! 2. more cookie-echoing silent peers than the half-open cap, held and churned: a meter still
//!    enrolls (the oldest half-open handshake gives way);
//! 3. one device identity opening many sessions (2,000 by default) and keeping them open: another
//!    meter enrolls meanwhile, the per-identity limit closes the older sessions (close_notify
//!    counted), the server's session count and RSS stay flat;
//!
//! and that the server's timers (retransmission, stall and idle timeouts) keep running while a
//! flood saturates its socket (they did not before 2fb3d6b).
//!
//! CI runs them short. For measurement, run the `soak_` variants (ignored) on a release build,
//! and override any knob with its environment variable:
//!
//! ```sh
//! cargo test --release -p est-tests --test front_door -- --ignored --nocapture --test-threads 1
//! FRONT_DOOR_FLOOD_SECS=60 FRONT_DOOR_FLOOD_RATE=20000 cargo test --release -p est-tests \
//!     --test front_door spoofed -- --nocapture
//! ```
//!
//! | variable | CI | soak | what |
//! |---|---|---|---|
//! | FRONT_DOOR_FLOOD_SECS | 3 | 30 | flood duration |
//! | FRONT_DOOR_FLOOD_RATE | 0 | 0 | ClientHellos/s, 0 = as fast as one thread can |
//! | FRONT_DOOR_FLOOD_SOURCES | 4096 | 16384 | distinct source addresses |
//! | FRONT_DOOR_HALF_OPEN_CAP | 64 | 1024 | `[dtls] max_half_open_handshakes` |
//! | FRONT_DOOR_SILENT_PEERS | 4 x cap | 4 x cap | cookie-echoing silent peers |
//! | FRONT_DOOR_SILENT_SECS | 3 | 30 | churn duration |
//! | FRONT_DOOR_SILENT_RATE | 500 | 0 | cookie exchanges/s while churning, 0 = flat out |
//! | FRONT_DOOR_IDENTITY_SESSIONS | 2000 | 20000 | sessions opened by one identity |
//! | FRONT_DOOR_IDENTITY_CONCURRENCY | 8 | 32 | handshakes in flight |
//!
//! The tests of this file run one at a time (each starts its own server and loads the box).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use est_tests::front_door::*;
use est_tests::{coap_client, openssl_csr, path_str, Creds, Libcoap};

/// One test at a time: each floods or loads the same two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// 1. Spoofed ClientHello flood
// ---------------------------------------------------------------------------------------------

struct FloodKnobs {
    secs: u64,
    rate: u64,
    sources: u64,
}

/// One coap-client-openssl (libcoap, OpenSSL's DTLS) enrollment: /sen with an openssl CSR.
async fn libcoap_enroll(srv: &ServerProcess, serial: &str, work: &std::path::Path) -> bool {
    let dev = srv.fleet_dir.join(serial);
    std::fs::create_dir_all(work).unwrap();
    let (_key, csr) = openssl_csr(work, "ldevid", &format!("/serialNumber={serial}")).unwrap();
    let out = work.join("ldevid.der");
    let trust = srv.fleet_dir.join("implicit-ta.pem");
    let creds = Creds {
        cert: &dev.join("idevid.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let url = format!("coaps://{}/.well-known/est/sen", srv.addr);
    let run = coap_client(
        Libcoap::Openssl,
        Some(&creds),
        &[
            "-m",
            "post",
            "-t",
            "286",
            "-A",
            "287",
            "-f",
            path_str(&csr).unwrap(),
        ],
        &url,
        Some(&out),
    )
    .await
    .unwrap();
    let ok = run.status.success() && run.payload.as_ref().is_some_and(|p| p.len() > 100);
    if !ok {
        println!("libcoap enrollment failed: {run:?}");
    }
    ok
}

async fn spoofed_flood(k: FloodKnobs) {
    let _one = ONE_AT_A_TIME.lock().await;
    let libcoap = est_test_tools::require_tools(&["coap-client-openssl", "openssl"]);
    let srv = ServerProcess::start(8, &[]).unwrap();
    let fleet = srv.fleet(None).unwrap();
    let ta = fleet.implicit_ta_der.clone();

    // Before the flood: the baseline.
    let mut quiet = Enrollments::default();
    for i in 0..2 {
        let (o, took) = enroll(srv.addr, &fleet.devices[i], &ta, 1000 + i as u64).await;
        quiet.add(&o, took);
    }
    assert!(
        quiet.failed.is_empty(),
        "before the flood: {:?}",
        quiet.failed
    );

    let cfg = FloodConfig {
        server: srv.addr,
        duration: Duration::from_secs(k.secs),
        rate_per_sec: k.rate,
        sources: usize::try_from(k.sources).unwrap(),
        rebind_per_pass: 64,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let drops_before = srv.socket_drops().unwrap_or(0);
    let log_lines_before = srv.log_lines_with("");
    let generator = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(&cfg, &stop))
    };
    // A libcoap meter (OpenSSL's DTLS, 1 s initial retransmission) enrolls once mid-flood,
    // beside client-sim's meters enrolling one after another.
    let libcoap_result = async {
        if !libcoap {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let work = srv.data_dir.with_file_name("libcoap");
        Some(libcoap_enroll(&srv, &fleet.devices[7].serial, &work).await)
    };
    let meters = async {
        let mut e = Enrollments::default();
        let mut i = 0u64;
        let started = Instant::now();
        while !generator.is_finished() && started.elapsed() < Duration::from_secs(k.secs + 60) {
            let dev = &fleet.devices[(i % 6) as usize];
            let (o, took) = enroll(srv.addr, dev, &ta, 2000 + i).await;
            e.add(&o, took);
            i += 1;
        }
        e
    };
    let (during, libcoap_ok) = tokio::join!(meters, libcoap_result);
    let report = generator.join().unwrap().unwrap();
    let drops = srv.socket_drops().unwrap_or(0).saturating_sub(drops_before);
    let log_lines = srv.log_lines_with("").saturating_sub(log_lines_before);
    let answered = report.sent.saturating_sub(drops);
    println!(
        "flood: {} ClientHellos ({} B) in {:.2} s = {:.0}/s from {} addresses ({} address:port pairs); \
         {} send errors; kernel drops at the server socket {drops}; server took ~{:.0}/s; \
         {}20,000/s",
        report.sent,
        report.datagram_bytes,
        report.elapsed.as_secs_f64(),
        report.rate(),
        report.sources,
        report.source_ports,
        report.send_errors,
        answered as f64 / report.elapsed.as_secs_f64(),
        if report.rate() >= 20_000.0 { "reached " } else { "did NOT reach " },
    );
    println!("meter before the flood: {}", quiet.summary());
    println!("meter during the flood: {}", during.summary());
    println!("libcoap coap-client-openssl during the flood: {libcoap_ok:?}");
    println!(
        "server log lines during the flood: {log_lines} (metrics lines included); RSS {:.1} MB, peak {:.1} MB",
        mb(srv.status_kb("VmRSS").unwrap_or(0)),
        mb(srv.status_kb("VmHWM").unwrap_or(0))
    );
    assert!(report.sent > 0);
    assert!(
        during.failed.is_empty(),
        "enrollments failed during the flood: {:?}",
        during.failed
    );
    assert!(during.ok >= 1, "no enrollment ran during the flood");
    if let Some(ok) = libcoap_ok {
        assert!(ok, "libcoap's enrollment failed during the flood");
    }
    // Nothing a remote peer sends yields more than a bounded number of log lines: at most 20/s
    // of refusals, one metrics line a second, and the server's own line or two per enrollment.
    let enrollments = during.total() as u64 + 1;
    let bound = 25 * (report.elapsed.as_secs() + 2) + 2 * enrollments + 50;
    assert!(log_lines as u64 <= bound, "{log_lines} log lines > {bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_client_hello_flood_does_not_keep_a_meter_out() {
    spoofed_flood(FloodKnobs {
        secs: env_u64("FRONT_DOOR_FLOOD_SECS", 3),
        rate: env_u64("FRONT_DOOR_FLOOD_RATE", 0),
        sources: env_u64("FRONT_DOOR_FLOOD_SOURCES", 4096),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 30 s of flood; run on a release build for measurement"]
async fn soak_spoofed_client_hello_flood() {
    spoofed_flood(FloodKnobs {
        secs: env_u64("FRONT_DOOR_FLOOD_SECS", 30),
        rate: env_u64("FRONT_DOOR_FLOOD_RATE", 0),
        sources: env_u64("FRONT_DOOR_FLOOD_SOURCES", 16_384),
    })
    .await;
}

/// The driver's timers (handshake retransmission, stall and idle timeouts) keep running while
/// the socket never runs dry: a handshake admitted in the middle of a flood that saturates the
/// server still gets its flight 4 retransmitted (after the initial 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_while_a_flood_saturates_the_socket() {
    let _one = ONE_AT_A_TIME.lock().await;
    let srv = ServerProcess::start(1, &[]).unwrap();
    let server = srv.addr;
    let cfg = FloodConfig {
        server,
        duration: Duration::from_secs(env_u64("FRONT_DOOR_FLOOD_SECS", 3) + 5),
        rate_per_sec: env_u64("FRONT_DOOR_FLOOD_RATE", 0),
        sources: 4096,
        rebind_per_pass: 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let drops_before = srv.socket_drops().unwrap_or(0);
    let generator = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(&cfg, &stop))
    };
    let (admitted, retransmitted) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        let mut peer = SilentPeer::new(60_000, server).unwrap();
        // The flood may crowd our datagrams out of the server's socket buffer: try again.
        let admitted = (0..40).any(|_| {
            matches!(
                peer.echo_cookie(Duration::from_millis(250)),
                Ok(Echo::Admitted)
            )
        });
        let at = Instant::now();
        let again = admitted
            && peer
                .wait_for(
                    est_dtls::wire::handshake_type::SERVER_HELLO,
                    Duration::from_secs(4),
                )
                .unwrap()
                .is_some();
        (admitted, again.then(|| at.elapsed()))
    })
    .await
    .unwrap();
    let drops = srv.socket_drops().unwrap_or(0).saturating_sub(drops_before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = generator.join().unwrap().unwrap();
    println!(
        "flood {:.0}/s, {drops} dropped at the server socket (saturated: {}); handshake admitted: \
         {admitted}; flight 4 retransmitted after {retransmitted:?}",
        report.rate(),
        drops > 0
    );
    assert!(admitted, "no cookie exchange got through the flood");
    assert!(
        retransmitted.is_some(),
        "the server did not retransmit flight 4 while the flood kept its socket busy"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Cookie-echoing silent peers beyond the half-open cap
// ---------------------------------------------------------------------------------------------

struct SilentKnobs {
    cap: u64,
    peers: u64,
    secs: u64,
    rate: u64,
}

async fn silent_peers(k: SilentKnobs) {
    let _one = ONE_AT_A_TIME.lock().await;
    assert!(k.peers > k.cap, "more silent peers than the cap");
    // The per-IP half-open cap may not exceed the global one (config validation).
    let srv = ServerProcess::start(
        8,
        &[
            ("max_half_open_handshakes", k.cap.to_string()),
            ("max_half_open_per_ip", k.cap.to_string()),
        ],
    )
    .unwrap();
    let fleet = srv.fleet(None).unwrap();
    let ta = fleet.implicit_ta_der.clone();
    let server = srv.addr;

    // Every peer echoes its cookie once and goes silent: far more than the cap.
    let n = usize::try_from(k.peers).unwrap();
    let (mut peers, held, took) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut peers: Vec<SilentPeer> = (0..n)
            .map(|i| SilentPeer::new(i, server).unwrap())
            .collect();
        let mut counts = EchoCounts::default();
        for p in &mut peers {
            counts.add(p.echo_cookie(Duration::from_secs(2)));
        }
        (peers, counts, start.elapsed())
    })
    .await
    .unwrap();
    let half_open = srv.fresh_metric("half_open_now");
    println!(
        "{} silent peers echoed their cookie in {:.2} s: {held:?}; server half_open_now = {half_open:?} (cap {})",
        k.peers,
        took.as_secs_f64(),
        k.cap
    );
    assert_eq!(
        held.admitted, k.peers,
        "every silent peer got past its cookie"
    );
    assert_eq!(half_open, Some(k.cap), "the half-open table is full");

    // With every slot held by a silent peer: a meter enrolls.
    let mut e = Enrollments::default();
    let (o, t) = enroll(server, &fleet.devices[0], &ta, 3000).await;
    e.add(&o, t);
    assert!(
        e.failed.is_empty(),
        "with the half-open table full: {:?}",
        e.failed
    );

    // The silent peers churn (each echoes a fresh cookie again, round-robin) while meters enroll.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let churner = {
        let stop = stop.clone();
        let (rate, secs) = (k.rate, k.secs);
        std::thread::spawn(move || churn(&mut peers, rate, Duration::from_secs(secs), &stop))
    };
    let mut i = 1u64;
    let started = Instant::now();
    while !churner.is_finished() && started.elapsed() < Duration::from_secs(k.secs + 60) {
        let (o, t) = enroll(server, &fleet.devices[(i % 8) as usize], &ta, 3000 + i).await;
        e.add(&o, t);
        i += 1;
    }
    let (churned, elapsed) = churner.join().unwrap();
    let half_open_series = srv.metric_series("half_open_now");
    println!(
        "churn: {} cookie exchanges in {:.2} s = {:.0}/s: {churned:?}; half_open_now per second {:?}",
        churned.total(),
        elapsed.as_secs_f64(),
        churned.total() as f64 / elapsed.as_secs_f64().max(1e-9),
        half_open_series
    );
    println!(
        "meter with the half-open table full and churning: {}",
        e.summary()
    );
    // A meter's handshake that gave way at the cap is logged as refused (rate-limited, 20/s).
    let meter_evictions = std::fs::read_to_string(&srv.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("DTLS handshake refused") && l.contains("\"127.0.0.1:"))
        .count();
    println!("meter handshakes logged as refused (evicted at the cap): {meter_evictions}");
    assert!(half_open_series.iter().all(|h| *h <= k.cap), "the cap held");
    assert!(
        e.failed.is_empty(),
        "enrollments failed beside silent peers: {:?}",
        e.failed
    );
    assert!(e.ok >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_silent_cookie_echoing_peers_than_the_half_open_cap_do_not_keep_a_meter_out() {
    let cap = env_u64("FRONT_DOOR_HALF_OPEN_CAP", 64);
    silent_peers(SilentKnobs {
        cap,
        peers: env_u64("FRONT_DOOR_SILENT_PEERS", 4 * cap),
        secs: env_u64("FRONT_DOOR_SILENT_SECS", 3),
        rate: env_u64("FRONT_DOOR_SILENT_RATE", 500),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: the default cap of 1024, 4096 silent peers churning flat out for 30 s"]
async fn soak_silent_cookie_echoing_peers() {
    let cap = env_u64("FRONT_DOOR_HALF_OPEN_CAP", 1024);
    silent_peers(SilentKnobs {
        cap,
        peers: env_u64("FRONT_DOOR_SILENT_PEERS", 4 * cap),
        secs: env_u64("FRONT_DOOR_SILENT_SECS", 30),
        rate: env_u64("FRONT_DOOR_SILENT_RATE", 0),
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. One identity holding many sessions
// ---------------------------------------------------------------------------------------------

struct IdentityKnobs {
    sessions: u64,
    concurrency: u64,
}

async fn one_identity(k: IdentityKnobs) {
    let _one = ONE_AT_A_TIME.lock().await;
    let srv = ServerProcess::start(8, &[]).unwrap();
    let fleet = srv.fleet(None).unwrap();
    let ta = fleet.implicit_ta_der.clone();
    let server = srv.addr;
    // Warm: one enrollment, then the baseline RSS.
    let mut e = Enrollments::default();
    let (o, t) = enroll(server, &fleet.devices[1], &ta, 4000).await;
    e.add(&o, t);
    let rss_before = srv.status_kb("VmRSS").unwrap_or(0);

    let attacker = fleet.devices[0].clone();
    let n = usize::try_from(k.sessions).unwrap();
    let conc = usize::try_from(k.concurrency).unwrap();
    let start = Instant::now();
    let opener = tokio::spawn(async move { open_sessions(server, &attacker, n, conc, 250).await });
    // Another meter enrolls again and again while the sessions open.
    let mut i = 1u64;
    while !opener.is_finished() && start.elapsed() < Duration::from_secs(600) {
        let (o, t) = enroll(server, &fleet.devices[1 + (i % 7) as usize], &ta, 4000 + i).await;
        e.add(&o, t);
        i += 1;
    }
    let mut sessions = opener.await.unwrap().unwrap();
    let opened_in = start.elapsed();
    // And once more with every session held.
    let (o, t) = enroll(server, &fleet.devices[1], &ta, 5000).await;
    e.add(&o, t);
    tokio::time::sleep(Duration::from_millis(500)).await;
    sessions.sweep();
    let closed = sessions.closed_by_server;
    let sessions_now = srv.fresh_metric("sessions_now");
    let sessions_max = srv.metric_series("sessions_now").into_iter().max();
    let rss_after = srv.status_kb("VmRSS").unwrap_or(0);
    let peak = srv.status_kb("VmHWM").unwrap_or(0);
    println!(
        "one identity: {} sessions opened in {:.2} s ({:.0}/s), {closed} closed by the server \
         with close_notify, {} still open; server sessions_now {sessions_now:?} \
         (max {sessions_max:?}); RSS {:.1} MB before, {:.1} MB after, peak {:.1} MB",
        sessions.opened,
        opened_in.as_secs_f64(),
        sessions.opened as f64 / opened_in.as_secs_f64(),
        sessions.open.len(),
        mb(rss_before),
        mb(rss_after),
        mb(peak)
    );
    println!("other meters meanwhile: {}", e.summary());
    assert_eq!(sessions.opened, n);
    assert!(
        e.failed.is_empty(),
        "another meter was kept out: {:?}",
        e.failed
    );
    // The per-identity limit (4) closed all but the newest few.
    assert!(
        closed + 4 >= n,
        "only {closed} of {n} sessions were closed by the per-identity limit"
    );
    assert!(
        sessions_max.is_some_and(|m| m <= 8),
        "the server held {sessions_max:?} sessions"
    );
    // Bounded: before the engine, 19,992 sessions of one IDevID took RSS from 9.7 to 899 MB
    // (about 45 kB a session, so 2,000 would be some 90 MB); with the per-identity limit the
    // peak must not grow with the number of sessions opened.
    let growth_kb = peak.saturating_sub(rss_before);
    assert!(
        growth_kb < 64 * 1024,
        "RSS grew {:.1} MB for {n} sessions of one identity",
        mb(growth_kb)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_holding_2000_sessions_does_not_keep_another_meter_out() {
    one_identity(IdentityKnobs {
        sessions: env_u64("FRONT_DOOR_IDENTITY_SESSIONS", 2000),
        concurrency: env_u64("FRONT_DOOR_IDENTITY_CONCURRENCY", 8),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 20,000 sessions of one identity (the issue's 19,992)"]
async fn soak_one_identity_holding_20000_sessions() {
    one_identity(IdentityKnobs {
        sessions: env_u64("FRONT_DOOR_IDENTITY_SESSIONS", 20_000),
        concurrency: env_u64("FRONT_DOOR_IDENTITY_CONCURRENCY", 32),
    })
    .await;
}
