//! The aggregate memory bound of docs/limits.md, held on a real server: `est-server run` with
//! its limits scaled down is driven to them over UDP + DTLS (established sessions that send and
//! never read, each with a Block1 upload left one block short of `coap.max_request_body_bytes`,
//! its duplicate-detection cache full of answers and `coap.max_pending_requests` enrollments
//! pending, their commits held up by a write lock the test takes on the store's database; half-open handshakes up to
//! `dtls.max_half_open_handshakes`, each reassembling as many handshake messages of the largest
//! size as the engine buffers, one byte short of complete, and holding as many early records of
//! the next epoch, of the largest size, as the engine keeps). Its resident memory (/proc/PID/status VmRSS) must then stay
//! under the base it measured before the load plus [`est_server::limits::memory_bound`] of its
//! configuration, and a fresh meter must still be served.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use client_sim::dtls::{self, DtlsClientConfig};
use client_sim::meter::Credential;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use est_dtls::wire;
use est_server::config::Config;
use est_server::datadir;
use tokio::net::UdpSocket;
use webrtc_dtls::conn::DTLSConn;

/// Established sessions held (one session slot is left for the fresh meter).
const ESTABLISHED: usize = 40;
/// Enrollments each session keeps pending: `coap.max_pending_requests` (the default).
const PENDING: usize = 4;
/// Half-open handshakes held: `dtls.max_half_open_handshakes`.
const HALF_OPEN: usize = 16;
const MAX_SESSIONS: usize = ESTABLISHED + HALF_OPEN + 1;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn est_server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_est-server"))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A value of the server's Prometheus text at `addr` (`name value` line).
fn scrape(addr: SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics: {text}"))
}

/// VmRSS of `pid`, bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

struct Meter {
    cred: Credential,
    dtls: DtlsClientConfig,
}

fn meter(fleet: &Path, serial_dir: &Path) -> Meter {
    Meter {
        cred: Credential {
            chain_der: datadir::read_certs(&serial_dir.join("idevid-chain.pem")).unwrap(),
            key_pkcs8_der: datadir::read_key(&serial_dir.join("idevid.key")).unwrap(),
        },
        dtls: DtlsClientConfig {
            trust_anchors_der: datadir::read_certs(&fleet.join("implicit-ta.pem")).unwrap(),
            server_name: "localhost".into(),
            flight_interval: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(10),
            ..DtlsClientConfig::default()
        },
    }
}

async fn connect(m: &Meter, server: SocketAddr) -> Arc<DTLSConn> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    dtls::connect_retrying(Arc::new(sock), &m.dtls, &m.cred, Duration::from_secs(40))
        .await
        .unwrap()
        .conn
}

fn request(method: RequestType, op: &str, mid: u16, token: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    for seg in [".well-known", "est", op] {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p
}

/// A Block1 option value (RFC 7959 §2.2), minimal length.
fn block_value(num: u32, more: bool, szx: u8) -> Vec<u8> {
    let v = (num << 4) | (u32::from(more) << 3) | u32::from(szx);
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(3);
    bytes[skip..].to_vec()
}

/// Fills one established session: a /sen body one block short of the limit, then
/// `dedup_entries` GET /crts, each a new message the server answers and remembers. Never reads.
async fn fill_session(conn: Arc<DTLSConn>, index: usize, cfg: &Config) {
    let block = 1usize << (cfg.coap.max_block1_szx + 4);
    let blocks = cfg.coap.max_request_body_bytes / block - 1;
    let mut mid = u16::try_from(index).unwrap() * 1000;
    let token = [0xB1, u8::try_from(index).unwrap()];
    for num in 0..blocks {
        let mut p = request(RequestType::Post, "sen", mid, &token);
        p.add_option(CoapOption::ContentFormat, vec![0x01, 0x1E]); // 286, application/pkcs10
        p.add_option(
            CoapOption::Block1,
            block_value(u32::try_from(num).unwrap(), true, cfg.coap.max_block1_szx),
        );
        p.payload = vec![0x30; block];
        conn.write(&p.to_bytes().unwrap(), None).await.unwrap();
        mid += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..cfg.coap.max_dedup_entries {
        let token = [
            0xC0,
            u8::try_from(index).unwrap(),
            u8::try_from(i % 256).unwrap(),
        ];
        let p = request(RequestType::Get, "crts", mid, &token);
        conn.write(&p.to_bytes().unwrap(), None).await.unwrap();
        mid += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Enrollments pending on one established session: `PENDING` /sen requests with a valid CSR,
/// each a new message, whose commits wait for the store (the test holds its write lock).
async fn hold_pending(conn: &DTLSConn, index: usize, csr: &[u8]) {
    for i in 0..PENDING {
        let mid = 50_000 + u16::try_from(index * PENDING + i).unwrap();
        let token = [0xE0, u8::try_from(index).unwrap(), u8::try_from(i).unwrap()];
        let mut p = request(RequestType::Post, "sen", mid, &token);
        p.add_option(CoapOption::ContentFormat, vec![0x01, 0x1E]); // 286, application/pkcs10
        p.payload = csr.to_vec();
        conn.write(&p.to_bytes().unwrap(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A ClientHello offering CCM_8 with extended_master_secret and ecdsa_secp256r1_sha256.
fn client_hello_body(random: [u8; 32], cookie: &[u8]) -> Vec<u8> {
    let mut body = vec![0xFE, 0xFD];
    body.extend_from_slice(&random);
    body.push(0); // session id
    body.push(u8::try_from(cookie.len()).unwrap());
    body.extend_from_slice(cookie);
    body.extend_from_slice(&[0, 2, 0xC0, 0xAE]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression methods
                                     // extensions: extended_master_secret, signature_algorithms [ecdsa_secp256r1_sha256],
                                     // supported_groups [secp256r1], ec_point_formats [uncompressed]
    body.extend_from_slice(&[
        0, 26, 0x00, 0x17, 0, 0, 0x00, 0x0D, 0, 4, 0, 2, 4, 3, 0x00, 0x0A, 0, 4, 0, 2, 0, 23, 0x00,
        0x0B, 0, 2, 1, 0,
    ]);
    body
}

/// One handshake fragment: the message of `msg_type` numbered `seq`, `total` bytes long, bytes
/// `offset..offset + data.len()` of it.
fn fragment(msg_type: u8, seq: u16, total: u32, offset: u32, data: &[u8]) -> Vec<u8> {
    let t = total.to_be_bytes();
    let o = offset.to_be_bytes();
    let l = u32::try_from(data.len()).unwrap().to_be_bytes();
    let s = seq.to_be_bytes();
    let mut out = vec![
        msg_type, t[1], t[2], t[3], s[0], s[1], o[1], o[2], o[3], l[1], l[2], l[3],
    ];
    out.extend_from_slice(data);
    out
}

/// A handshake past the cookie exchange from `socket`, then the handshake messages of the
/// largest size the engine reassembles at once (the next one and the seven after it), each one
/// byte short, and as many records of the next epoch, of the largest size, as the engine keeps
/// before the ChangeCipherSpec (it needs no keys to be made to keep them).
async fn hold_half_open(socket: &UdpSocket, server: SocketAddr, n: u8, max_message: u32) {
    let mut record_seq = 0u64;
    let mut send = |payload: Vec<u8>| {
        let mut out = Vec::new();
        wire::push_record(&mut out, 22, wire::DTLS_1_2, 0, record_seq, &[], &payload);
        record_seq += 1;
        out
    };
    let random = [n; 32];
    let ch0 = wire::handshake_message(1, 0, &client_hello_body(random, &[]));
    socket.send_to(&send(ch0), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (rec, _) = wire::parse_record(&buf[..len], 0).unwrap();
    let frags = wire::parse_handshake_fragments(rec.fragment).unwrap();
    let hvr = wire::HelloVerifyRequest::parse(frags[0].body).unwrap();
    let ch1 = wire::handshake_message(1, 1, &client_hello_body(random, &hvr.cookie));
    socket.send_to(&send(ch1), server).await.unwrap();
    // Messages 2..=9: Certificate, then what follows it, each missing its last byte, sent in
    // 4 KiB fragments (one record each).
    let chunk = 4096u32;
    let buffered = u16::try_from(est_server::limits::HANDSHAKE_MESSAGES_BUFFERED).unwrap();
    for seq in 2u16..2 + buffered {
        let msg_type = if seq == 2 { 11 } else { 16 };
        let mut offset = 0u32;
        while offset < max_message - 1 {
            let len = chunk.min(max_message - 1 - offset);
            let data = vec![0xAB; usize::try_from(len).unwrap()];
            let f = fragment(msg_type, seq, max_message, offset, &data);
            socket.send_to(&send(f), server).await.unwrap();
            offset += len;
        }
    }
    for k in 0..est_server::limits::FUTURE_RECORDS {
        let mut rec = Vec::new();
        let body = vec![0xCD; wire::MAX_CIPHERTEXT_LEN];
        wire::push_record(&mut rec, 23, wire::DTLS_1_2, 1, k, &[], &body);
        socket.send_to(&rec, server).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_all_its_limits_stays_within_the_documented_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("est-data");
    let fleet = dir.path().join("fleet");
    run_ok(est_server().arg("init").arg("--data-dir").arg(&data));
    // The Prometheus endpoint on a port of the kernel's choosing, released just before the
    // server binds it.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics_listen = format!("\"{metrics_addr}\"");
    let max_sessions = MAX_SESSIONS.to_string();
    let half_open = HALF_OPEN.to_string();
    let enrollments = (ESTABLISHED * PENDING).to_string();
    est_test_tools::set_config(
        &data,
        &[
            ("dtls", "max_sessions", max_sessions.as_str()),
            ("dtls", "max_sessions_per_ip", max_sessions.as_str()),
            ("dtls", "max_sessions_per_identity", max_sessions.as_str()),
            ("dtls", "max_half_open_handshakes", half_open.as_str()),
            ("dtls", "max_half_open_per_ip", half_open.as_str()),
            ("dtls", "accept_queue_sessions", "8"),
            ("dtls", "session_queue_datagrams", "8"),
            ("dtls", "session_queue_bytes", "8192"),
            ("dtls", "command_queue_len", "256"),
            // The half-open handshakes must outlast the measurement.
            ("dtls", "handshake_stall_timeout_secs", "60"),
            ("dtls", "handshake_timeout_secs", "120"),
            // Every session's pending enrollments are admitted at once.
            ("est", "max_concurrent_enrollments", enrollments.as_str()),
            ("metrics", "listen", metrics_listen.as_str()),
        ],
    )
    .unwrap();
    let cfg = datadir::load_config(&data, None).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.coap.max_pending_requests, PENDING);
    let bound = est_server::limits::memory_bound(&cfg);
    run_ok(
        est_server()
            .args(["factory", "mint", "--count", "2", "--data-dir"])
            .arg(&data)
            .arg("--out")
            .arg(&fleet),
    );
    let mut devices: Vec<PathBuf> = std::fs::read_dir(&fleet)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("idevid.key").exists())
        .collect();
    devices.sort();
    assert_eq!(devices.len(), 2);
    let holder = meter(&fleet, &devices[0]);
    let fresh = meter(&fleet, &devices[1]);
    // The CSR the holder's pending enrollments carry (a real one: only a request that passes
    // the checks reaches the store).
    let csr = {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let key = client_sim::pki::EnrollmentKey::generate(&mut rng);
        client_sim::pki::build_csr(&key, "meter", Some(&holder.cred.chain_der[0])).unwrap()
    };

    let mut child =
        est_test_tools::est_server_run(Path::new(env!("CARGO_BIN_EXE_est-server")), &data)
            .spawn()
            .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let pid = server.0.id();
    let addr = est_test_tools::announced_address(stdout, Duration::from_secs(60)).unwrap();

    // The base: the server after start and one session that came and went.
    {
        let conn = connect(&holder, addr).await;
        fill_session(Arc::clone(&conn), 0, &cfg).await;
        let _ = conn.close().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_bytes(pid);

    // Established sessions at their limits, never read.
    let mut sessions = Vec::new();
    for _ in 0..ESTABLISHED {
        sessions.push(connect(&holder, addr).await);
    }
    let fills: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c = Arc::clone(c);
            let cfg = cfg.clone();
            tokio::spawn(async move { fill_session(c, i + 1, &cfg).await })
        })
        .collect();
    for f in fills {
        f.await.unwrap();
    }
    // Half-open handshakes up to the cap, from another loopback address (the fresh meter's own
    // address then has no half-open handshake to be refused under the per-IP cap).
    let max_message = est_dtls::Limits::default().max_handshake_message_bytes;
    let mut half_open_sockets = Vec::new();
    for n in 0..HALF_OPEN {
        let s = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        hold_half_open(&s, addr, u8::try_from(n + 1).unwrap(), max_message).await;
        half_open_sockets.push(s);
    }
    // Last, so that the measurement falls inside the store writer's busy timeout (10 s, after
    // which the first waiting commit fails and its enrollment is answered 5.03): enrollments
    // pending on every session, their commits waiting for the write lock the test holds.
    let db = rusqlite::Connection::open(data.join(&cfg.storage.database)).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    for (i, c) in sessions.iter().enumerate() {
        hold_pending(c, i + 1, &csr).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_bytes(pid);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the measurement must fall inside the writer's 10 s busy timeout: {:?}",
        started.elapsed()
    );
    // The server holds what the test drove it to.
    assert_eq!(
        scrape(metrics_addr, "est_dtls_sessions"),
        ESTABLISHED as f64
    );
    assert_eq!(scrape(metrics_addr, "est_dtls_half_open"), HALF_OPEN as f64);
    assert_eq!(
        scrape(metrics_addr, "est_coap_pending_requests"),
        (ESTABLISHED * PENDING) as f64
    );
    assert_eq!(
        scrape(metrics_addr, "est_enrollments_in_flight"),
        (ESTABLISHED * PENDING) as f64
    );
    let block = 1usize << (cfg.coap.max_block1_szx + 4);
    assert_eq!(
        scrape(metrics_addr, "est_coap_reassembly_bytes"),
        (ESTABLISHED * (cfg.coap.max_request_body_bytes - block)) as f64
    );
    let grown = loaded.saturating_sub(base);
    eprintln!(
        "memory bound: base RSS {} KiB, loaded {} KiB (+{} KiB); bound for this configuration \
         {} KiB ({} sessions x {} KiB + {} half-open x {} KiB + {} KiB)",
        base / 1024,
        loaded / 1024,
        grown / 1024,
        bound.total() / 1024,
        bound.sessions,
        bound.per_session / 1024,
        bound.half_open,
        bound.per_half_open / 1024,
        bound.server_wide / 1024
    );
    assert!(
        loaded <= base + bound.total(),
        "RSS {loaded} exceeds base {base} + bound {}",
        bound.total()
    );
    // The store's writer may go on.
    db.execute_batch("COMMIT").unwrap();
    drop(db);

    // A fresh meter is still served: /crts answered over its own session.
    let conn = connect(&fresh, addr).await;
    let mut buf = vec![0u8; 4096];
    let mut answered = None;
    for attempt in 0..5u16 {
        let p = request(RequestType::Get, "crts", 60_000 + attempt, &[0xF1]);
        conn.write(&p.to_bytes().unwrap(), None).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf, None)).await
        {
            answered = Some(Packet::from_bytes(&buf[..n]).unwrap());
            break;
        }
    }
    let answer = answered.expect("the fresh meter got an answer to GET /crts");
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Content)
    );
    assert!(!answer.payload.is_empty());
    drop(sessions);
    drop(half_open_sockets);
}
