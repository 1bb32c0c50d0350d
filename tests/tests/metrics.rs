//! Issue 13: the Prometheus endpoint. A meter enrolls through libcoap and a blocked one is
//! refused at the handshake; then `/metrics` is scraped over HTTP and its OpenMetrics text is
//! parsed line by line (every sample belongs to a family with HELP and TYPE, values are
//! numbers, the exposition ends with `# EOF`), and the values are what happened.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;

use est_tests::*;

/// `GET path` over HTTP/1.1: (status line, headers, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// A strict reader of the OpenMetrics text format: `series name{labels}` -> value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "must end with # EOF");
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            assert!(
                ["counter", "gauge", "info", "histogram", "unknown"].contains(&ty),
                "{line}"
            );
            assert!(
                typed.insert(name.to_string(), ty.to_string()).is_none(),
                "TYPE given twice: {line}"
            );
        } else if line.starts_with('#') {
            panic!("unexpected comment: {line}");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(name_ok(name), "{line}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                    let inner = inner.unwrap_or_else(|| panic!("labels: {line}"));
                    for kv in inner.split(',') {
                        let (k, v) = kv.split_once('=').unwrap();
                        assert!(
                            name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
            // A counter's samples are <family>_total (OpenMetrics).
            let family = typed
                .keys()
                .filter(|f| name == f.as_str() || name.strip_prefix(f.as_str()) == Some("_total"))
                .max_by_key(|f| f.len())
                .unwrap_or_else(|| panic!("sample of no declared family: {line}"))
                .clone();
            assert!(helped.contains(&family), "no HELP for {family}");
            if typed[&family] == "counter" {
                assert!(name.ends_with("_total") && value >= 0.0, "{line}");
            }
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "duplicate: {line}"
            );
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_is_scraped_and_parsed() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.revocation.poll_interval_secs = 1;
    })
    .await
    .unwrap();
    let addr = srv.running().metrics_addr.expect("metrics on");
    let fleet = srv.mint(&["SNMETRIC", "SNBLOCKED"]).unwrap();
    let trust = fleet.join("implicit-ta.pem");
    let work = srv.dir.path().join("metrics-work");
    std::fs::create_dir_all(&work).unwrap();
    let (_, csr) = openssl_csr(&work, "m", "/serialNumber=SNMETRIC").unwrap();
    let run = post_csr(
        Libcoap::Gnutls,
        &Creds {
            cert: &fleet.join("SNMETRIC/idevid-chain.pem"),
            key: &fleet.join("SNMETRIC/idevid.key"),
            trust: &trust,
        },
        &srv.url("sen"),
        &csr,
        &work.join("m.der"),
    )
    .await
    .unwrap();
    assert!(run.payload.is_some(), "{run:?}");
    let cfg = est_server::datadir::load_config(&srv.data_dir, None).unwrap();
    est_server::revocation::block_device(
        &srv.data_dir,
        &cfg,
        "SNBLOCKED",
        false,
        est_proto::store::RevocationReason::CessationOfOperation,
        std::time::SystemTime::now(),
    )
    .unwrap();
    srv.running().poll_revocations().await.unwrap();
    let (_, csr) = openssl_csr(&work, "b", "/serialNumber=SNBLOCKED").unwrap();
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&Creds {
            cert: &fleet.join("SNBLOCKED/idevid-chain.pem"),
            key: &fleet.join("SNBLOCKED/idevid.key"),
            trust: &trust,
        }),
        &["-m", "post", "-t", "286", "-f", path_str(&csr).unwrap()],
        &srv.url("sen"),
        None,
    )
    .await
    .unwrap();
    assert!(
        run.payload.is_none() && run.error_code().is_none(),
        "{run:?}"
    );

    let (status, headers, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    let m = parse_exposition(&body);
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing:\n{body}"));
    assert_eq!(v("est_enrollments_total{outcome=\"issued\"}"), 1.0);
    assert_eq!(v("est_enrollments_total{outcome=\"rate_limited\"}"), 0.0);
    assert_eq!(v("est_handshake_refusals_total{reason=\"blocked\"}"), 1.0);
    assert!(v("est_handshake_refusals_total{reason=\"bad_certificate\"}") >= 1.0);
    assert!(v("est_dtls_handshakes_completed_total") >= 1.0);
    assert!(v("est_dtls_hello_verify_sent_total") >= 2.0);
    // The admission counters of the driver's queues are exported, and nothing here filled one.
    for queue_counter in [
        "est_dtls_supersedes_deferred_total",
        "est_dtls_close_commands_dropped_total",
        "est_dtls_sessions_dropped_accept_queue_full_total",
        "est_dtls_dropped_queue_full_total",
    ] {
        assert_eq!(v(queue_counter), 0.0, "{queue_counter}");
    }
    assert!(
        v("est_coap_block1_received_total") >= 2.0,
        "Block1 of 64 bytes"
    );
    assert!(v("est_coap_requests_delivered_total") >= 1.0);
    assert!(v("est_coap_datagrams_received_total") >= v("est_coap_requests_delivered_total"));
    assert!(v("est_store_transactions_total") >= 1.0);
    assert!(v("est_store_operations_total") >= v("est_store_transactions_total"));
    assert_eq!(v("est_enrollments_in_flight"), 0.0);
    assert!(v("est_ca_certificate_days_left") > 7000.0);
    assert!(v("est_dtls_certificate_days_left") > 700.0);
    assert!(v("est_revocation_generation") >= 1.0);
    // No [ca_p384]: no gauge for it.
    assert!(
        !m.contains_key("est_ca_p384_certificate_days_left"),
        "{body}"
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("est_enrollment_refusals_total{code=")));
    // Only /metrics.
    let (status, _, _) = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .unwrap();
    assert!(status.contains("404"), "{status}");
    srv.stop().await;
}

/// With `[ca_p384]`, the P-384 issuing CA's days left are exported beside the P-256 one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_p384_ca_lifetime_is_exported() {
    let srv = TestServer::start_p384(|c| {
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await
    .unwrap();
    let addr = srv.running().metrics_addr.expect("metrics on");
    let (status, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    let m = parse_exposition(&body);
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing:\n{body}"));
    // `ca create-p384` makes a 20-year CA.
    let p384 = v("est_ca_p384_certificate_days_left");
    assert!((7000.0..=7305.0).contains(&p384), "{p384}");
    assert!(v("est_ca_certificate_days_left") > 7000.0);
    srv.stop().await;
}
