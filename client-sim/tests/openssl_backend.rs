//! Integration: meters using the OpenSSL DTLS client backend (`--dtls-backend openssl`) against a
//! real `est-server` on loopback: they enroll and their LDevIDs are in the store and verify
//! against the server's issuing CA; a lossy emulated link still completes; a wrong trust anchor
//! fails the handshake with a clear reason; the command line selects the backend.
//!
//! Run: `cargo test -p client-sim --test openssl_backend -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::process::Command;
use std::time::Duration;

use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use support::backend;

fn openssl_dtls() -> DtlsClientConfig {
    DtlsClientConfig {
        handshake_timeout: Duration::from_secs(15),
        backend: DtlsBackend::Openssl,
        ..DtlsClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meters_enroll_against_est_server_and_ldevids_verify() {
    backend::meters_enroll_and_ldevids_verify(openssl_dtls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meters_enroll_over_a_15_percent_lossy_link() {
    backend::meters_enroll_over_a_15_percent_lossy_link(openssl_dtls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_meter_with_a_wrong_trust_anchor_fails_the_handshake() {
    backend::wrong_trust_anchor_fails_the_handshake(
        openssl_dtls(),
        &["server certificate verification failed"],
    )
    .await;
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
