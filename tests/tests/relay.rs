//! DCU relays (issue #12) against the real binaries: libcoap's `coap-client-gnutls` enrolls
//! through a running `est-relay` (stateless, then stateful) against a running `est-server`, and
//! `openssl verify` checks the certificate; the refusals (JPY from a source not on the
//! allowlist, a datagram that is not DTLS, a flooding meter address); two registrars, one
//! killed mid-run.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use est_tests::front_door::{client_hello, client_hello_datagram, StopOnDrop};
use est_tests::relay::{Pki, Registrar, RelayProcess};
use est_tests::*;

const RELAY_SECTION: &str = "jpy_listen = \"127.0.0.1:0\"\nallowed_proxies = [\"127.0.0.1\"]";

/// `coap-client-gnutls` enrolls `serial` at `sen_url` (64-byte blocks, a CSR made by openssl);
/// the certificate, as PEM, passes `openssl verify` against `ca`.
async fn enroll(pki: &Pki, serial: &str, sen_url: &str, ca: &Path) -> Result<PathBuf> {
    let dev = pki.fleet_dir.join(serial);
    let work = pki.tmp.path().join(format!("work-{serial}"));
    std::fs::create_dir_all(&work)?;
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &pki.fleet_dir.join("implicit-ta.pem"),
    };
    let (_, csr) = openssl_csr(&work, "ldevid", &format!("/serialNumber={serial}"))?;
    let der = work.join("ldevid.der");
    let pem = enroll_csr(Libcoap::Gnutls, &creds, sen_url, &csr, &der)
        .await
        .with_context(|| format!("enrolling {serial}"))?;
    openssl_verify(ca, &pem)?;
    Ok(pem)
}

/// [`enroll`], retried as a meter would (a fresh handshake each time), at most `attempts` times.
async fn enroll_retrying(
    pki: &Pki,
    serial: &str,
    sen_url: &str,
    ca: &Path,
    attempts: usize,
) -> Result<PathBuf> {
    let mut last = None;
    for _ in 0..attempts {
        match enroll(pki, serial, sen_url, ca).await {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

/// A GET through `url` with `serial`'s credentials, the payload as text.
async fn get_text(pki: &Pki, serial: &str, url: &str) -> Result<String> {
    let dev = pki.fleet_dir.join(serial);
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &pki.fleet_dir.join("implicit-ta.pem"),
    };
    let out = pki.tmp.path().join(format!("get-{serial}.txt"));
    let run = coap_client(
        Libcoap::Gnutls,
        Some(&creds),
        &["-m", "get"],
        url,
        Some(&out),
    )
    .await?;
    Ok(String::from_utf8_lossy(&run.payload.unwrap_or_default()).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_enrolls_through_a_stateless_then_a_stateful_relay() {
    if !require_tools() {
        return;
    }
    let pki = Pki::new(2).unwrap();
    let serials = pki.serials().unwrap();
    let reg = Registrar::start(&pki, RELAY_SECTION, "").unwrap();
    let jpy = reg.jpy.expect("a JPY port");

    // Stateless: the registrar's JPY port.
    let relay = RelayProcess::start("stateless", &[jpy], "").unwrap();
    // The meter discovers the join port, in clear CoAP at the relay.
    let out = pki.tmp.path().join("jp.txt");
    let run = coap_client(
        Libcoap::Gnutls,
        None,
        &["-m", "get"],
        &format!("coap://{}/.well-known/core?brski-jp=*", relay.join),
        Some(&out),
    )
    .await
    .unwrap();
    assert_eq!(
        run.payload.as_deref(),
        Some(format!("<>;brski-jp={}", relay.join.port()).as_bytes()),
        "{run:?}"
    );
    // Through the relay, the registrar announces its JPY port (what a stateless proxy
    // discovers).
    let links = get_text(
        &pki,
        &serials[0],
        &format!("coaps://{}/.well-known/core?rt=brski.rjp", relay.join),
    )
    .await
    .unwrap();
    assert_eq!(links, format!("<jpy://{jpy}>;rt=brski.rjp"));
    let pem = enroll(&pki, &serials[0], &relay.url("sen"), &pki.ca_pem())
        .await
        .expect("enrolls through the stateless relay");
    let text = openssl(&["x509", "-in", path_str(&pem).unwrap(), "-noout", "-subject"]).unwrap();
    assert!(text.contains(&serials[0]), "{text}");
    // The audit says it came through the relay, and which.
    let audit = reg.audit().unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains(&serials[0]) && l.contains("issued"))
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(line.contains("via relay 127.0.0.1:"), "{line}");
    assert!(line.contains("/jpy:"), "{line}");
    assert!(relay.metric("forwarded_to_registrar").unwrap() > 10);
    assert!(relay.metric("overhead_bytes_up").unwrap() > 0);
    assert!(reg.metric("relayed_datagrams").unwrap() > 10);
    assert_eq!(reg.metric("jpy_dropped_not_allowed"), Some(0));
    drop(relay);

    // Stateful: the registrar's coaps port; every coap-client here is 127.0.0.1, so more than
    // the draft's 2 circuits per meter address are allowed.
    let relay =
        RelayProcess::start("stateful", &[reg.coaps], "max_circuits_per_meter = 16").unwrap();
    enroll(&pki, &serials[1], &relay.url("sen"), &pki.ca_pem())
        .await
        .expect("enrolls through the stateful relay");
    assert!(relay.metric("circuits_opened").unwrap() >= 1);
    let audit = reg.audit().unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains(&serials[1]) && l.contains("issued"))
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(line.contains("via relay 127.0.0.1 (stateful)"), "{line}");
    // Each certificate is stored once.
    let certs = reg.certs().unwrap();
    for s in &serials {
        assert_eq!(
            certs.lines().filter(|l| l.contains(s.as_str())).count(),
            1,
            "{certs}"
        );
    }
}

/// A ClientHello without a cookie, as a meter sends it first.
fn hello() -> Vec<u8> {
    let ch = client_hello([7; 32], &[]);
    client_hello_datagram(&ch, 0, 0)
}

fn recv_within(s: &UdpSocket, d: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(d)).unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_allowlist_non_dtls_and_a_flooding_meter() {
    if !require_tools() {
        return;
    }
    let pki = Pki::new(1).unwrap();
    let serial = pki.serials().unwrap().remove(0);
    let reg = Registrar::start(&pki, RELAY_SECTION, "").unwrap();
    let jpy = reg.jpy.unwrap();

    // 1. JPY from a source not on the allowlist (127.0.0.2) is dropped and counted; the same
    //    message from an allowed one (127.0.0.1) is answered, the header echoed unchanged.
    let header = [0x5a; 24];
    let msg = est_relay::jpy::encode(&header, &hello());
    let outsider = UdpSocket::bind("127.0.0.2:0").unwrap();
    outsider.send_to(&msg, jpy).unwrap();
    assert_eq!(recv_within(&outsider, Duration::from_millis(1500)), None);
    assert_eq!(reg.metric("jpy_dropped_not_allowed"), Some(1));
    let proxy = UdpSocket::bind("127.0.0.1:0").unwrap();
    proxy.send_to(&msg, jpy).unwrap();
    let back = recv_within(&proxy, Duration::from_secs(5)).expect("an answer");
    cbor_schemas::schema::check_jpy(&back).unwrap();
    let j = est_relay::jpy::decode(&back, 64).unwrap();
    assert_eq!(&*j.header, &header[..], "header echoed");
    assert_eq!(j.content[13], 3, "a HelloVerifyRequest");

    // 2. A meter's datagram that is not DTLS is not forwarded.
    let relay = RelayProcess::start("stateless", &[jpy], "").unwrap();
    let before = reg.metric("jpy_received").unwrap();
    let meter = UdpSocket::bind("127.0.0.1:0").unwrap();
    meter.send_to(b"not a DTLS record", relay.join).unwrap();
    // A TLS (not DTLS) record header.
    meter
        .send_to(&[0x16, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00], relay.join)
        .unwrap();
    assert_eq!(relay.metric("dropped_not_dtls"), Some(2));
    assert_eq!(relay.metric("forwarded_to_registrar"), Some(0));
    assert_eq!(reg.metric("jpy_received"), Some(before));

    // 3. One meter address (127.0.0.3) floods the relay; a meter elsewhere still enrolls.
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop.clone());
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, sent, to) = (stop.clone(), sent.clone(), relay.join);
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.3:0").unwrap();
            let mut record = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 64];
            record.extend_from_slice(&[0xee; 64]);
            let end = std::time::Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                for _ in 0..100 {
                    let _ = s.send_to(&record, to);
                }
                sent.fetch_add(100, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    enroll(&pki, &serial, &relay.url("sen"), &pki.ca_pem())
        .await
        .expect("a meter enrolls while another address floods the relay");
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let flood = sent.load(Ordering::Relaxed);
    let limited = relay.metric("dropped_rate_meter").unwrap();
    assert!(flood > 5_000, "{flood}");
    assert!(
        limited > flood / 2,
        "{limited} of {flood} dropped by the per-address limit"
    );
    assert_eq!(relay.metric("dropped_rate_global"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrars_one_killed_mid_run_every_meter_enrolls_through_the_other() {
    if !require_tools() {
        return;
    }
    for mode in ["stateless", "stateful"] {
        let pki = Pki::new(5).unwrap();
        let serials = pki.serials().unwrap();
        let mut a = Registrar::start(&pki, RELAY_SECTION, "").unwrap();
        let b = Registrar::start(&pki, RELAY_SECTION, "").unwrap();
        let targets: Vec<SocketAddr> = match mode {
            "stateless" => vec![a.jpy.unwrap(), b.jpy.unwrap()],
            _ => vec![a.coaps, b.coaps],
        };
        let relay = RelayProcess::start(
            mode,
            &targets,
            "failover_after_ms = 1500\nmax_circuits_per_meter = 16",
        )
        .unwrap();
        // The first meter enrolls through A.
        enroll(&pki, &serials[0], &relay.url("sen"), &pki.ca_pem())
            .await
            .unwrap();
        assert!(a.certs().unwrap().contains(&serials[0]));
        let started = a.metric("handshakes_started").unwrap();
        // Three more start, and A is killed once one of them has begun at A.
        let url = relay.url("sen");
        let ca = pki.ca_pem();
        let pki = Arc::new(pki);
        let mut tasks = Vec::new();
        for s in serials[1..4].iter().cloned() {
            let (pki, url, ca) = (pki.clone(), url.clone(), ca.clone());
            tasks.push(tokio::spawn(async move {
                enroll_retrying(&pki, &s, &url, &ca, 3).await.map(|_| s)
            }));
        }
        for _ in 0..20 {
            if a.metric("handshakes_started").unwrap_or(0) > started {
                break;
            }
        }
        a.kill();
        for t in tasks {
            let s = t.await.unwrap().unwrap_or_else(|e| panic!("{mode}: {e:#}"));
            // Enrolled at B, or at A before it was killed (its store survives it).
            assert!(
                b.certs().unwrap().contains(&s) || a.certs().unwrap().contains(&s),
                "{mode}: {s} nowhere"
            );
        }
        // One more after the kill: through B.
        enroll_retrying(&pki, &serials[4], &url, &ca, 2)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        assert!(b.certs().unwrap().contains(&serials[4]), "{mode}");
        assert!(relay.metric("failovers").unwrap() >= 1, "{mode}");
    }
}
