//! The tokio driver over real UDP sockets on loopback, with a registrar that echoes: both
//! modes, discovery, and a circuit's own port per meter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is the test failing"
)]

use std::net::SocketAddr;
use std::time::Duration;

use est_relay::config::FileConfig;
use est_relay::{jpy, Mode};
use tokio::net::UdpSocket;

fn client_hello() -> Vec<u8> {
    let mut r = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 13];
    r.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 7]);
    r
}

async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("a datagram within 5 s")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

fn config(mode: Mode, registrar: SocketAddr) -> FileConfig {
    FileConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        registrars: vec![registrar],
        mode,
        max_circuits_per_interface: 100,
        metrics_log_interval_secs: 0,
        ..FileConfig::default()
    }
}

#[tokio::test]
async fn stateless_relays_both_ways_over_udp() {
    let registrar = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay = est_relay::driver::start(&config(Mode::Stateless, registrar.local_addr().unwrap()))
        .await
        .unwrap();
    let join = relay.join_addrs[0];
    let meters = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    let mut headers = Vec::new();
    for m in &meters {
        m.send_to(&client_hello(), join).await.unwrap();
        let (msg, from) = recv(&registrar).await;
        // All JPY messages come from the relay's one JPY port.
        assert_eq!(
            Some(from),
            relay
                .jpy_addr
                .map(|a| SocketAddr::new("127.0.0.1".parse().unwrap(), a.port()))
        );
        let j = jpy::decode(&msg, 64).unwrap();
        assert_eq!(&*j.content, &client_hello()[..]);
        headers.push(j.header.to_vec());
        // The registrar answers with the header echoed.
        registrar
            .send_to(&jpy::encode(&j.header, b"\x16\xfe\xffanswer"), from)
            .await
            .unwrap();
        let (back, from) = recv(m).await;
        assert_eq!(back, b"\x16\xfe\xffanswer");
        assert_eq!(from, join);
    }
    assert_ne!(headers[0], headers[1]);
    // Discovery of the join port, in clear CoAP on the join port.
    let d = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut req = vec![0x41, 0x01, 0x00, 0x07, 0x99, 0xbb];
    req.extend_from_slice(b".well-known");
    req.push(0x04);
    req.extend_from_slice(b"core");
    req.push(0x4a);
    req.extend_from_slice(b"brski-jp=*");
    d.send_to(&req, join).await.unwrap();
    let (ans, _) = recv(&d).await;
    assert!(ans.ends_with(format!("<>;brski-jp={}", join.port()).as_bytes()));
    // Junk is not relayed.
    meters[0].send_to(b"hello?", join).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = relay.snapshot();
    assert_eq!(s.metrics.forwarded_to_registrar, 2);
    assert_eq!(s.metrics.forwarded_to_meters, 2);
    assert_eq!(s.metrics.discovery_answered, 1);
    assert_eq!(s.metrics.dropped_total(), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn stateful_gives_each_meter_its_own_port() {
    let registrar = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Every meter here is 127.0.0.1: more than the draft's 2 circuits per address.
    let relay = est_relay::driver::start(&FileConfig {
        max_circuits_per_meter: 10,
        ..config(Mode::Stateful, registrar.local_addr().unwrap())
    })
    .await
    .unwrap();
    assert!(relay.jpy_addr.is_none());
    let join = relay.join_addrs[0];
    let mut ports = Vec::new();
    for _ in 0..3 {
        let m = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        m.send_to(&client_hello(), join).await.unwrap();
        let (d, from) = recv(&registrar).await;
        assert_eq!(d, client_hello(), "payload unchanged");
        m.send_to(b"\x17\xfe\xfd\0\x01\0\0\0\0\0\x01\0\x01x", join)
            .await
            .unwrap();
        let (_, from2) = recv(&registrar).await;
        assert_eq!(from, from2, "one port per meter");
        registrar.send_to(b"reply", from).await.unwrap();
        assert_eq!(recv(&m).await.0, b"reply");
        ports.push(from.port());
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = relay.snapshot();
    assert_eq!(s.circuits_now, 3);
    assert_eq!(s.metrics.circuits_opened, 3);
    relay.shutdown().await;
}

#[tokio::test]
async fn tampered_and_stale_headers_are_dropped_over_udp() {
    let registrar = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay = est_relay::driver::start(&FileConfig {
        key_rotation_secs: 1,
        ..config(Mode::Stateless, registrar.local_addr().unwrap())
    })
    .await
    .unwrap();
    let join = relay.join_addrs[0];
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    meter.send_to(&client_hello(), join).await.unwrap();
    let (msg, jpy_from) = recv(&registrar).await;
    let header = jpy::decode(&msg, 64).unwrap().header.to_vec();
    // Tampered: one bit of the sealed part.
    let mut bad = header.clone();
    bad[5] ^= 1;
    registrar
        .send_to(&jpy::encode(&bad, b"\x16\xfe\xfdtampered"), jpy_from)
        .await
        .unwrap();
    // Two rotations later the header is stale: a replay of something old.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    registrar
        .send_to(&jpy::encode(&header, b"\x16\xfe\xfdreplayed"), jpy_from)
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let got = tokio::time::timeout(Duration::from_millis(500), meter.recv_from(&mut buf)).await;
    assert!(got.is_err(), "nothing reaches the meter");
    // The meter's next datagram carries a header of the current key, which opens.
    meter.send_to(&client_hello(), join).await.unwrap();
    let (msg, _) = recv(&registrar).await;
    let fresh = jpy::decode(&msg, 64).unwrap().header.to_vec();
    assert_ne!(fresh, header);
    registrar
        .send_to(&jpy::encode(&fresh, b"\x16\xfe\xfdok"), jpy_from)
        .await
        .unwrap();
    assert_eq!(recv(&meter).await.0, b"\x16\xfe\xfdok");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = relay.snapshot().metrics;
    assert_eq!(m.dropped(est_relay::DropReason::HeaderAuth), 1);
    assert_eq!(m.dropped(est_relay::DropReason::HeaderStale), 1);
    assert!(m.key_rotations >= 2);
    relay.shutdown().await;
}
