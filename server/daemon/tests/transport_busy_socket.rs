//! The driver's timers run while its socket never runs dry (a flood that saturates the server):
//! a socket that always has a datagram ready (the real peer's when one waits, else a byte of
//! garbage) must not starve the endpoint's timer. Before the timer went ahead of the socket in
//! the driver's select, an admitted handshake got no retransmission (and no stall, handshake or
//! idle timeout) for as long as a flood lasted. Real UDP on 127.0.0.1 only.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

mod transport_support;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use est_dtls::wire::{self, content_type as ct, extension_type as ext, handshake_type as hs};
use est_server::transport::{DatagramSocket, DtlsListener};
use tokio::net::UdpSocket;
use transport_support::TestPki;

/// A UDP socket that is never empty: a waiting datagram comes first, otherwise one garbage byte
/// "from" 127.9.9.9:9. It uses tokio's co-operative budget as a real socket does.
struct NeverEmpty {
    inner: UdpSocket,
    garbage: Arc<AtomicU64>,
}

#[async_trait]
impl DatagramSocket for NeverEmpty {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::task::consume_budget().await;
        match self.inner.try_recv_from(buf) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.garbage.fetch_add(1, Ordering::Relaxed);
                buf[0] = 0xFF;
                Ok((1, SocketAddr::from(([127, 9, 9, 9], 9))))
            }
        }
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        if target.port() == 9 {
            return Ok(buf.len());
        }
        self.inner.send_to(buf, target).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A ClientHello the server admits: DTLS 1.2, CCM_8, secp256r1, ECDSA P-256/SHA-256, EMS.
fn client_hello(cookie: &[u8], message_seq: u16) -> Vec<u8> {
    let ch = wire::ClientHello {
        client_version: wire::DTLS_1_2,
        random: [0x42; 32],
        session_id: Vec::new(),
        cookie: cookie.to_vec(),
        cipher_suites: vec![0xC0AE],
        compression_methods: vec![0],
        extensions: vec![
            wire::Extension {
                typ: ext::SUPPORTED_GROUPS,
                data: wire::supported_groups_body(&[23]),
            },
            wire::Extension {
                typ: ext::SIGNATURE_ALGORITHMS,
                data: wire::signature_algorithms_body(&[0x0403]),
            },
            wire::Extension {
                typ: ext::EXTENDED_MASTER_SECRET,
                data: Vec::new(),
            },
        ],
    };
    let msg = wire::handshake_message(hs::CLIENT_HELLO, message_seq, &ch.encode());
    let mut out = Vec::new();
    wire::push_record(
        &mut out,
        ct::HANDSHAKE,
        wire::DTLS_1_0,
        0,
        u64::from(message_seq),
        &[],
        &msg,
    );
    out
}

/// The first handshake fragment of an epoch-0 handshake datagram: (type, body).
fn first_message(d: &[u8]) -> Option<(u8, Vec<u8>)> {
    let (rec, _) = wire::parse_record(d, 0).ok()?;
    if rec.content_type != ct::HANDSHAKE || rec.epoch != 0 {
        return None;
    }
    let f = wire::parse_handshake_fragments(rec.fragment)
        .ok()?
        .into_iter()
        .next()?;
    Some((f.msg_type, f.body.to_vec()))
}

/// Waits up to `within` for a datagram starting with handshake message `msg_type`.
async fn wait_for(sock: &UdpSocket, msg_type: u8, within: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, _) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if let Some((t, body)) = first_message(&buf[..n]) {
            if t == msg_type {
                return Some(body);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_runs_dry_does_not_starve_the_retransmission_timer() {
    let pki = TestPki::generate();
    let mut config = pki.server_config();
    config.flight_interval = Duration::from_millis(200);
    let garbage = Arc::new(AtomicU64::new(0));
    let socket = NeverEmpty {
        inner: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        garbage: garbage.clone(),
    };
    let listener = DtlsListener::bind(socket, config).await.unwrap();
    let server = listener.local_addr().unwrap();

    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    peer.send_to(&client_hello(&[], 0), server).await.unwrap();
    let hvr = wait_for(&peer, hs::HELLO_VERIFY_REQUEST, Duration::from_secs(5))
        .await
        .expect("a HelloVerifyRequest");
    let cookie = wire::HelloVerifyRequest::parse(&hvr).unwrap().cookie;
    peer.send_to(&client_hello(&cookie, 1), server)
        .await
        .unwrap();
    wait_for(&peer, hs::SERVER_HELLO, Duration::from_secs(5))
        .await
        .expect("flight 4: the handshake was admitted");
    let admitted = Instant::now();
    // Silence from the peer: the server's timer must resend flight 4 (initial 200 ms, then
    // 400 ms ...), although its socket always has a datagram waiting.
    let again = wait_for(&peer, hs::SERVER_HELLO, Duration::from_secs(3)).await;
    let garbage = garbage.load(Ordering::Relaxed);
    assert!(
        garbage > 1000,
        "the socket was kept busy ({garbage} datagrams)"
    );
    assert!(
        again.is_some(),
        "no retransmission of flight 4 within 3 s while the socket was busy ({garbage} garbage datagrams)"
    );
    println!(
        "flight 4 resent {:?} after it was first sent, with {garbage} garbage datagrams read meanwhile",
        admitted.elapsed()
    );
    listener.shutdown().await;
}
