//! Integration: meters using the dimpl DTLS client backend (`--dtls-backend dimpl`) against a
//! real `est-server` on loopback: they enroll and their LDevIDs are in the store and verify
//! against the server's issuing CA; the wire shows the backend's profile (AES-128-GCM offered
//! and chosen, P-256, extended master secret, the leaf certificate only); lost flights are
//! resent on dimpl's timer; a lossy emulated link still completes; a wrong trust anchor or
//! server name is refused before the client's second flight; the command line selects it.
//!
//! Run: `cargo test -p client-sim --test dimpl_backend -- --nocapture`
//!
//! dimpl always offers use_srtp (RFC 5764) in its ClientHello and gives up when the server does
//! not answer it; est-server answers it only with `dtls.answer_use_srtp = true` (default off),
//! which every server here is started with ([`support::DIMPL_SERVER_SETTINGS`]).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sim::dtls::{connect_session, DtlsBackend, DtlsClientConfig};
use client_sim::meter::{Credential, FailureReason};
use client_sim::net::{logged_udp, plaintext_handshake_type, LoggedUdp};
use client_sim::pki;
use support::backend;

fn dimpl_dtls(trust_anchors_der: Vec<Vec<u8>>) -> DtlsClientConfig {
    DtlsClientConfig {
        trust_anchors_der,
        handshake_timeout: Duration::from_secs(15),
        // dimpl's initial retransmission timer (doubled on each expiry).
        flight_interval: Duration::from_millis(500),
        backend: DtlsBackend::Dimpl,
        ..DtlsClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_meters_enroll_against_est_server_and_ldevids_verify() {
    backend::meters_enroll_and_ldevids_verify(dimpl_dtls(Vec::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_meters_enroll_over_a_15_percent_lossy_link() {
    backend::meters_enroll_over_a_15_percent_lossy_link(dimpl_dtls(Vec::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_meter_with_a_wrong_trust_anchor_fails_the_handshake() {
    backend::wrong_trust_anchor_fails_the_handshake(
        dimpl_dtls(Vec::new()),
        &["server certificate verification failed", "UnknownIssuer"],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Wire-level checks over a plain UDP socket that records (and can drop) datagrams.

async fn wire(server: SocketAddr, drop_types: Vec<u8>) -> Arc<LoggedUdp> {
    logged_udp(server, drop_types).await.unwrap()
}

/// The body of the first plaintext handshake message of `types` found in `datagrams` (first
/// record of a datagram, unfragmented: fragment offset 0, fragment length = length).
fn handshake_body(datagrams: &[Vec<u8>], msg_type: u8) -> Option<Vec<u8>> {
    datagrams.iter().find_map(|d| {
        if plaintext_handshake_type(d) != Some(msg_type) {
            return None;
        }
        let len = u32::from_be_bytes([0, d[14], d[15], d[16]]) as usize;
        let frag_off = u32::from_be_bytes([0, d[19], d[20], d[21]]) as usize;
        let frag_len = u32::from_be_bytes([0, d[22], d[23], d[24]]) as usize;
        assert_eq!((frag_off, frag_len), (0, len), "unfragmented message");
        Some(d[25..25 + len].to_vec())
    })
}

fn credential(d: &pki::DeviceIdentity) -> Credential {
    Credential {
        chain_der: d.cert_chain_der.clone(),
        key_pkcs8_der: d.key_pkcs8_der.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_wire_profile_and_lost_flights_resent_on_dimpl_timer() {
    let srv = support::Running::start_with(1, support::DIMPL_SERVER_SETTINGS);
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(1)).unwrap();
    let dev = &fleet.devices[0];
    // A two-certificate chain (IDevID + manufacturer CA): only the leaf goes on the wire.
    let mut cred = credential(dev);
    let maker = pki::load_cert_chain(&srv.fleet_dir.join("manufacturer-ca.pem")).unwrap();
    cred.chain_der.truncate(1);
    cred.chain_der.extend(maker);
    assert_eq!(cred.chain_der.len(), 2);
    // The first ClientHello and the first datagram of the client's Certificate flight are lost.
    let conn = wire(srv.listen, vec![1, 11]).await;
    let cfg = dimpl_dtls(fleet.implicit_ta_der.clone());
    let t = Instant::now();
    let s = connect_session(conn.clone(), &cfg, &cred).await.unwrap();
    let took = t.elapsed();
    assert_eq!(conn.tap().dropped(), 2);
    let sent = conn.tap().sent();
    let received = conn.tap().received();
    let types: Vec<Option<u8>> = sent.iter().map(|d| plaintext_handshake_type(d)).collect();
    // ClientHello (lost), again on the timer, with the cookie; Certificate twice. At least: the
    // timer's first expiry can come at 375 ms, and a server slowed by a loaded box may answer a
    // resent flight after that, so one more resend is correct behaviour, not a failure.
    let count = |ty: u8| types.iter().filter(|t| **t == Some(ty)).count();
    assert!((3..=4).contains(&count(1)), "{types:?}");
    assert!((2..=3).contains(&count(11)), "{types:?}");
    // Two expiries of the 500 ms initial timer (±25 % jitter; the second may be doubled).
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(8),
        "{took:?}"
    );

    // ClientHello (RFC 6347 §4.2.1): suites, then extensions.
    let ch = handshake_body(&sent, 1).unwrap();
    let mut off = 2 + 32;
    off += 1 + usize::from(ch[off]); // session_id
    off += 1 + usize::from(ch[off]); // cookie
    let n = usize::from(u16::from_be_bytes([ch[off], ch[off + 1]]));
    let suites: Vec<u16> = ch[off + 2..off + 2 + n]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|s| *s != 0x00ff) // TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746)
        .collect();
    assert_eq!(
        suites,
        vec![0xc02b],
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 only"
    );
    let has = |needle: &[u8]| ch.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17]),
        "secp256r1 only"
    );
    assert!(has(&[0x00, 0x17, 0x00, 0x00]), "extended_master_secret");
    // ServerHello: the server chose the GCM suite and the extended master secret.
    let sh = handshake_body(&received, 2).unwrap();
    let off = 2 + 32;
    let off = off + 1 + usize::from(sh[off]);
    assert_eq!(u16::from_be_bytes([sh[off], sh[off + 1]]), 0xc02b);
    assert!(sh.windows(4).any(|w| w == [0x00, 0x17, 0x00, 0x00]));
    // dimpl offers use_srtp (extension 14) unasked; est-server echoes it (one profile, no MKI)
    // rather than refusing the handshake.
    let srtp = |m: &[u8]| m.windows(2).any(|w| w == [0x00, 0x0e]);
    assert!(srtp(&ch), "ClientHello offers use_srtp");
    assert!(srtp(&sh), "ServerHello answers use_srtp");
    // The client's Certificate carries the leaf alone (RFC 5246 §7.4.2 list of 3-byte lengths).
    let cert = handshake_body(&sent, 11).unwrap();
    let list = u32::from_be_bytes([0, cert[0], cert[1], cert[2]]) as usize;
    let first = u32::from_be_bytes([0, cert[3], cert[4], cert[5]]) as usize;
    assert_eq!(list, 3 + first, "one certificate");
    assert_eq!(&cert[6..6 + first], dev.cert_chain_der[0].as_slice());
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_refuses_a_wrong_server_name_before_its_second_flight() {
    let srv = support::Running::start_with(1, support::DIMPL_SERVER_SETTINGS);
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(1)).unwrap();
    let conn = wire(srv.listen, Vec::new()).await;
    let mut cfg = dimpl_dtls(fleet.implicit_ta_der.clone());
    cfg.server_name = "other.example".into();
    let e = connect_session(conn.clone(), &cfg, &credential(&fleet.devices[0]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, FailureReason::HandshakeError(m)
            if m.contains("server certificate verification failed") && m.contains("not valid for name")),
        "{e:?}"
    );
    // Nothing but ClientHellos left the client: no Certificate, no key exchange.
    let sent = conn.tap().sent();
    assert!(
        sent.iter().all(|d| plaintext_handshake_type(d) == Some(1)),
        "{:?}",
        sent.iter()
            .map(|d| plaintext_handshake_type(d))
            .collect::<Vec<_>>()
    );
    // The same server, the right name: the handshake completes.
    let conn = wire(srv.listen, Vec::new()).await;
    cfg.server_name = "localhost".into();
    let s = connect_session(conn, &cfg, &credential(&fleet.devices[0]))
        .await
        .unwrap();
    s.close().await;
}

#[test]
fn command_line_selects_the_dimpl_backend() {
    const METERS: usize = 3;
    let mut srv = support::Running::start_with(METERS, support::DIMPL_SERVER_SETTINGS);
    let json = srv.tmp.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args(["--dtls-backend", "dimpl", "--no-progress", "--link", "lan"])
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimpl_handshake_datagrams_fit_the_mtu() {
    let srv = support::Running::start_with(1, support::DIMPL_SERVER_SETTINGS);
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(1)).unwrap();
    let conn = wire(srv.listen, Vec::new()).await;
    let mut cfg = dimpl_dtls(fleet.implicit_ta_der.clone());
    cfg.mtu = 300;
    let s = connect_session(conn.clone(), &cfg, &credential(&fleet.devices[0]))
        .await
        .unwrap();
    let sent = conn.tap().sent();
    let largest = sent.iter().map(Vec::len).max().unwrap();
    assert!(largest <= 300, "{largest}");
    // The client's Certificate message (the IDevID) needed several fragments.
    assert!(
        sent.iter()
            .filter(|d| plaintext_handshake_type(d) == Some(11))
            .count()
            >= 2,
        "{:?}",
        sent.iter()
            .map(|d| (plaintext_handshake_type(d), d.len()))
            .collect::<Vec<_>>()
    );
    s.close().await;
}

#[test]
fn the_dimpl_backend_is_named_on_the_command_line() {
    assert_eq!("dimpl".parse::<DtlsBackend>().unwrap(), DtlsBackend::Dimpl);
    assert_eq!(DtlsBackend::Dimpl.name(), "dimpl");
    assert!("gnutls"
        .parse::<DtlsBackend>()
        .unwrap_err()
        .contains("dimpl"));
    // clap accepts the value: the run gets as far as the (missing) fleet.
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args([
            "--dtls-backend",
            "dimpl",
            "--fleet",
            "/nonexistent/fleet",
            "--no-progress",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/fleet") && !err.contains("invalid value"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args(["--dtls-backend", "gnutls", "--fleet", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dimpl"));
}
