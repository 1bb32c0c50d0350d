//! Meters behind a stateless join proxy (draft-ietf-anima-constrained-join-proxy): full peers
//! of the endpoint keyed by (proxy address, JPY header), on virtual time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is the test failing"
)]

mod support;

use std::time::Duration;

use est_dtls::{ConnEvent, Event, PeerAddr, RefusalReason};
use support::*;

const PROXY: &str = "10.7.0.1:7000";

fn header(i: usize) -> Vec<u8> {
    // What est-relay makes for a link-local meter: 32 opaque bytes.
    let mut h = vec![0xa5; 32];
    h[..8].copy_from_slice(&(i as u64).to_be_bytes());
    h
}

#[test]
fn many_meters_behind_one_proxy_are_separate_sessions() {
    let pki = Pki::new(5);
    let mut net = Net::new(pki.server_config(), 11, 0.0);
    for i in 0..5 {
        net.add_relayed_client(pki.client_config(i), addr(PROXY), header(i));
    }
    net.run_for(Duration::from_secs(10));
    for i in 0..5 {
        assert!(net.client_connected(i), "meter {i}");
        let h = net.handle_of_client(i).unwrap();
        let peer = net.server.connection(h).unwrap().peer();
        assert_eq!(peer, PeerAddr::relayed(addr(PROXY), &header(i)));
        assert!(peer.is_relayed());
        assert_eq!(peer.socket_addr(), addr(PROXY));
    }
    assert_eq!(net.server.gauges().established, 5);
    // Every datagram went back to the proxy with its meter's header.
    assert!(net
        .server_log
        .iter()
        .all(|t| t.destination.proxy() == Some(addr(PROXY))));
    // Application data both ways, each to its own meter.
    let now = net.now;
    for i in 0..5 {
        net.clients[i]
            .send(now, format!("req {i}").as_bytes())
            .unwrap();
    }
    net.run_for(Duration::from_millis(50));
    for i in 0..5 {
        let h = net.handle_of_client(i).unwrap();
        assert!(net
            .server_events
            .contains(&Event::Data(h, format!("req {i}").into_bytes())));
        net.server
            .send(now, h, format!("resp {i}").as_bytes())
            .unwrap();
    }
    net.run_for(Duration::from_millis(50));
    for i in 0..5 {
        assert!(net.client_events[i].contains(&ConnEvent::Data(format!("resp {i}").into_bytes())));
    }
    assert!(net.server.metrics().datagrams_relayed > 0);
}

#[test]
fn relayed_handshakes_complete_at_20_percent_loss() {
    let pki = Pki::new(6);
    let mut net = Net::new(pki.server_config(), 12, 0.2);
    for i in 0..6 {
        net.add_relayed_client(pki.client_config(i), addr(PROXY), header(i));
    }
    net.run_for(Duration::from_secs(120));
    for i in 0..6 {
        assert!(net.client_connected(i), "meter {i}");
    }
}

#[test]
fn datagrams_to_relayed_meters_leave_room_for_the_jpy_overhead() {
    let pki = Pki::new(2);
    let mut sc = pki.server_config();
    sc.mtu_bytes = 400;
    let mut net = Net::new(sc, 13, 0.0);
    let mut cc = pki.client_config(0);
    cc.mtu_bytes = 400;
    net.add_relayed_client(cc, addr(PROXY), header(0));
    let mut cc = pki.client_config(1);
    cc.mtu_bytes = 400;
    net.add_client(cc);
    net.run_for(Duration::from_secs(10));
    assert!(net.client_connected(0) && net.client_connected(1));
    let relayed: Vec<usize> = net
        .server_log
        .iter()
        .filter(|t| t.destination.is_relayed())
        .map(|t| t.payload.len())
        .collect();
    let direct: Vec<usize> = net
        .server_log
        .iter()
        .filter(|t| !t.destination.is_relayed())
        .map(|t| t.payload.len())
        .collect();
    // 32-byte header: 38 bytes of JPY; the flight is fragmented to 362-byte datagrams.
    assert_eq!(relayed.iter().max(), Some(&362), "{relayed:?}");
    assert!(direct.iter().max().unwrap() > &362, "{direct:?}");
    assert!(direct.iter().all(|n| *n <= 400));
    // The application datagram limit shrinks by the same 38 bytes.
    let hr = net.handle_of_client(0).unwrap();
    let hd = net.handle_of_client(1).unwrap();
    let (mr, md) = (
        net.server.connection(hr).unwrap().max_datagram(),
        net.server.connection(hd).unwrap().max_datagram(),
    );
    assert_eq!(md - mr, 38);
}

#[test]
fn a_cookie_is_bound_to_the_meters_header() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 14, 0.0);
    net.add_relayed_client(pki.client_config(0), addr(PROXY), header(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    // The meter's second ClientHello, the one with the cookie...
    let with_cookie = net
        .log
        .iter()
        .filter(|(to_server, _, _)| *to_server)
        .nth(1)
        .map(|(_, _, d)| d.clone())
        .unwrap();
    // ... replayed by the proxy under another meter's header: the cookie does not verify,
    // the answer is a new HelloVerifyRequest, and nothing is kept.
    let bad_before = net.server.metrics().refused(RefusalReason::BadCookie);
    let other = PeerAddr::relayed(addr(PROXY), &header(1));
    net.server.handle(net.now, other.clone(), &with_cookie);
    let out = net.take_server_transmits();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].destination, other);
    assert_eq!(out[0].payload[13], 3, "HelloVerifyRequest");
    assert_eq!(
        net.server.metrics().refused(RefusalReason::BadCookie),
        bad_before + 1
    );
    // And from the proxy's own address, as a direct peer: the same.
    net.server.handle(net.now, addr(PROXY), &with_cookie);
    assert_eq!(net.take_server_transmits()[0].payload[13], 3);
    assert_eq!(net.server.gauges().half_open, 0);
}

#[test]
fn a_proxy_counts_as_many_meters_under_its_own_caps() {
    let pki = Pki::new(6);
    let mut sc = pki.server_config();
    // One session per source IP, but up to four meters behind a proxy.
    sc.limits.max_sessions_per_ip = 1;
    sc.limits.max_half_open_per_ip = 1;
    sc.limits.max_sessions_per_relay = 4;
    let mut net = Net::new(sc, 15, 0.0);
    for i in 0..5 {
        net.add_relayed_client(pki.client_config(i), addr(PROXY), header(i));
        net.run_for(Duration::from_secs(3));
    }
    let connected = (0..5).filter(|&i| net.client_connected(i)).count();
    assert_eq!(
        connected, 4,
        "the fifth meter is over max_sessions_per_relay"
    );
    assert!(net.server.metrics().refused(RefusalReason::Limit) >= 1);
    // The proxy's own address, speaking directly, is counted apart (per-IP cap of 1).
    let i = net.add_client(pki.client_config(5));
    net.client_addrs[i] = "10.7.0.1:5555".parse().unwrap();
    net.run_for(Duration::from_secs(3));
    assert!(net.client_connected(i));
}

#[test]
fn a_relayed_session_survives_a_new_header_with_a_connection_id() {
    // The proxy's key rotated: the meter's header changed. With a CID the session follows.
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 16, 0.0);
    let mut cc = pki.client_config(0);
    cc.connection_id = Some(Vec::new());
    net.add_relayed_client(cc, addr(PROXY), header(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    net.client_relay[0] = Some(header(9));
    let now = net.now;
    net.clients[0].send(now, b"after rotation").unwrap();
    net.run_for(Duration::from_millis(50));
    let h = net.handle_of_client(0).unwrap();
    assert!(net
        .server_events
        .contains(&Event::Data(h, b"after rotation".to_vec())));
    assert_eq!(
        net.server.connection(h).unwrap().peer(),
        PeerAddr::relayed(addr(PROXY), &header(9))
    );
    net.server.send(now, h, b"answer").unwrap();
    net.run_for(Duration::from_millis(50));
    assert!(net.client_events[0].contains(&ConnEvent::Data(b"answer".to_vec())));
}

#[test]
fn a_stateful_proxys_circuits_count_under_the_relay_caps() {
    // A stateful join proxy gives each meter its own port of its own address: direct peers,
    // but from a configured relay prefix, so counted as a relay's meters.
    let pki = Pki::new(6);
    let mut sc = pki.server_config();
    sc.limits.max_sessions_per_ip = 1;
    sc.limits.max_sessions_per_relay = 3;
    sc.limits.relay_prefixes = vec!["10.7.0.0/16".parse().unwrap()];
    let mut net = Net::new(sc, 17, 0.0);
    for i in 0..4 {
        let c = net.add_client(pki.client_config(i));
        net.client_addrs[c] = format!("10.7.0.1:{}", 41000 + i).parse().unwrap();
        net.run_for(Duration::from_secs(3));
    }
    assert_eq!((0..4).filter(|&i| net.client_connected(i)).count(), 3);
    // Elsewhere, the per-IP cap of 1.
    for i in 4..6 {
        let c = net.add_client(pki.client_config(i));
        net.client_addrs[c] = format!("10.8.0.1:{}", 41000 + i).parse().unwrap();
        net.run_for(Duration::from_secs(3));
    }
    assert_eq!((4..6).filter(|&i| net.client_connected(i)).count(), 1);
}
