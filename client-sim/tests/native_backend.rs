//! Integration: meters using our own engine's client mode (`--dtls-backend native`) against a
//! real `est-server` on loopback: they enroll and their LDevIDs verify; a lossy link still
//! completes; a wrong trust anchor fails the handshake; the wire shows CCM_8 (the RFC 9148
//! suite); and with a Connection ID a session survives a NAT rebinding (a new source port)
//! without a new handshake, while without one the server no longer knows the meter.
//!
//! Run: `cargo test -p client-sim --test native_backend -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use client_sim::dtls::{connect_session, DtlsBackend, DtlsClientConfig, DtlsSession};
use client_sim::meter::Credential;
use client_sim::pki;
use support::backend;
use tokio::net::UdpSocket;
use webrtc_util::conn::Conn;

fn native_dtls(trust_anchors_der: Vec<Vec<u8>>) -> DtlsClientConfig {
    DtlsClientConfig {
        trust_anchors_der,
        handshake_timeout: Duration::from_secs(15),
        // Initial retransmission timer, doubled on each expiry.
        flight_interval: Duration::from_millis(500),
        backend: DtlsBackend::Native,
        ..DtlsClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_meters_enroll_against_est_server_and_ldevids_verify() {
    backend::meters_enroll_and_ldevids_verify(native_dtls(Vec::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_meters_enroll_over_a_15_percent_lossy_link() {
    backend::meters_enroll_over_a_15_percent_lossy_link(native_dtls(Vec::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_meter_with_a_wrong_trust_anchor_fails_the_handshake() {
    backend::wrong_trust_anchor_fails_the_handshake(
        native_dtls(Vec::new()),
        &["UnknownIssuer", "not issued by a trusted CA"],
    )
    .await;
}

/// A UDP "connection" to the server whose socket can be swapped (a NAT rebinding), recording
/// what was sent.
struct RebindableUdp {
    socket: Mutex<Arc<UdpSocket>>,
    server: SocketAddr,
    sent: Mutex<Vec<Vec<u8>>>,
}

impl RebindableUdp {
    fn socket(&self) -> Arc<UdpSocket> {
        self.socket.lock().unwrap().clone()
    }
}

#[async_trait]
impl Conn for RebindableUdp {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket().recv(buf).await?)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, self.server))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.sent.lock().unwrap().push(buf.to_vec());
        Ok(self.socket().send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], _t: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket().local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

async fn udp_to(server: SocketAddr) -> Arc<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(server).await.unwrap();
    Arc::new(s)
}

/// A CoAP CON GET of /.well-known/core with message ID `mid`.
fn coap_get_core(mid: u16) -> Vec<u8> {
    let mut p = coap_lite::Packet::new();
    p.header.set_type(coap_lite::MessageType::Confirmable);
    p.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    p.add_option(coap_lite::CoapOption::UriPath, b".well-known".to_vec());
    p.add_option(coap_lite::CoapOption::UriPath, b"core".to_vec());
    p.to_bytes().unwrap()
}

/// Sends a GET and waits for its answer (resending as CoAP would); true if it came.
async fn get_core(session: &mut DtlsSession, mid: u16) -> bool {
    let mut buf = vec![0u8; 2048];
    for _ in 0..3 {
        session.send(&coap_get_core(mid)).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(700), session.recv(&mut buf)).await
        {
            let p = coap_lite::Packet::from_bytes(&buf[..n]).unwrap();
            if p.header.message_id == mid {
                return p.header.code
                    == coap_lite::MessageClass::Response(coap_lite::ResponseType::Content);
            }
        }
    }
    false
}

/// Handshakes the first fleet meter over a rebindable socket; returns the session and the conn.
async fn session_with(
    srv: &support::Running,
    connection_id: bool,
) -> (DtlsSession, Arc<RebindableUdp>) {
    let fleet = pki::load_fleet(&srv.fleet_dir, Some(1)).unwrap();
    let d = &fleet.devices[0];
    let cred = Credential {
        chain_der: d.cert_chain_der.clone(),
        key_pkcs8_der: d.key_pkcs8_der.clone(),
    };
    let conn = Arc::new(RebindableUdp {
        socket: Mutex::new(udp_to(srv.listen).await),
        server: srv.listen,
        sent: Mutex::new(Vec::new()),
    });
    let mut cfg = native_dtls(fleet.implicit_ta_der.clone());
    cfg.connection_id = connection_id;
    let session = connect_session(conn.clone(), &cfg, &cred).await.unwrap();
    (session, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_connection_id_a_session_survives_a_nat_rebinding() {
    let srv = support::Running::start(1);
    let (mut session, conn) = session_with(&srv, true).await;
    let DtlsSession::Native(native) = &session else {
        panic!("not the native backend")
    };
    assert_eq!(
        native.server_cid().len(),
        4,
        "est-server issues 4-byte CIDs"
    );
    assert_eq!(
        native.cipher_suite(),
        Some(est_dtls::CipherSuite::Aes128Ccm8),
        "the RFC 9148 suite"
    );
    assert!(get_core(&mut session, 1).await, "GET before the rebinding");
    let handshake_datagrams = conn.sent.lock().unwrap().len();
    // The NAT gives the meter a new source port.
    let old_port = conn.socket().local_addr().unwrap().port();
    *conn.socket.lock().unwrap() = udp_to(srv.listen).await;
    assert_ne!(conn.socket().local_addr().unwrap().port(), old_port);
    assert!(
        get_core(&mut session, 2).await,
        "GET after the rebinding, same session"
    );
    // No new handshake: every record after the first GET is application data (type 25).
    let sent = conn.sent.lock().unwrap();
    assert!(
        sent[handshake_datagrams..].iter().all(|d| d[0] == 25),
        "only tls12_cid records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_connection_id_a_rebound_meter_is_unknown_to_the_server() {
    let srv = support::Running::start(1);
    let (mut session, conn) = session_with(&srv, false).await;
    assert!(get_core(&mut session, 1).await);
    *conn.socket.lock().unwrap() = udp_to(srv.listen).await;
    assert!(
        !get_core(&mut session, 2).await,
        "without CID the server cannot know the new address is this session"
    );
}

#[test]
fn command_line_selects_the_native_backend() {
    const METERS: usize = 3;
    let mut srv = support::Running::start(METERS);
    let json = srv.tmp.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args([
            "--dtls-backend",
            "native",
            "--dtls-connection-id",
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
}

/// `client-sim --nat-rebind`: each meter's source port changes right after its first EST
/// request. Returns the summary of the JSON report.
fn fleet_with_nat_rebind(connection_id: bool) -> serde_json::Value {
    const METERS: usize = 4;
    let srv = support::Running::start(METERS);
    let json = srv.tmp.path().join("out.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_client-sim"));
    cmd.args([
        "--dtls-backend",
        "native",
        "--nat-rebind",
        "--no-progress",
        "--link",
        "lan",
    ])
    // Short CoAP timers: a meter whose server lost it notices within seconds.
    .args([
        "--ack-timeout",
        "500ms",
        "--max-retransmit",
        "2",
        "--attempts",
        "3",
    ])
    .args(["--retry-backoff", "100ms"])
    .arg("--server")
    .arg(srv.listen.to_string())
    .arg("--fleet")
    .arg(&srv.fleet_dir)
    .arg("--json")
    .arg(&json);
    if connection_id {
        cmd.arg("--dtls-connection-id");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        doc["summary"]["enrolled"], METERS as u64,
        "{}",
        doc["summary"]
    );
    assert_eq!(
        doc["summary"]["nat_rebinds"], METERS as u64,
        "{}",
        doc["summary"]
    );
    doc["summary"].clone()
}

#[test]
fn nat_rebinding_mid_enrollment_costs_no_handshake_with_a_connection_id() {
    let s = fleet_with_nat_rebind(true);
    assert_eq!(s["handshakes"], 4, "one handshake per meter: {s}");
    assert_eq!(s["session_retries"], 0, "{s}");
}

#[test]
fn nat_rebinding_mid_enrollment_needs_a_new_handshake_without_one() {
    let s = fleet_with_nat_rebind(false);
    assert!(
        s["handshakes"].as_u64().unwrap() >= 8,
        "every meter needed a second handshake: {s}"
    );
}
