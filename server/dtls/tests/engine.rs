//! The engine end to end in memory, on virtual time: our client against our endpoint.
//! (Independent peers — OpenSSL, GnuTLS via libcoap, webrtc-dtls, Mbed TLS — are in the daemon's
//! and the workspace's interop tests.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is the test failing"
)]

mod support;

use std::time::Duration;

use est_dtls::wire::{self, content_type as ct, handshake_type as hs};
use est_dtls::{CipherSuite, ConnEvent, Event, NamedGroup, RefusalReason};
use support::*;

fn handshake_with(suite: CipherSuite, group: NamedGroup) {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 1, 0.0);
    let mut cc = pki.client_config(0);
    cc.cipher_suites = vec![suite];
    cc.groups = vec![group];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(
        net.client_connected(0),
        "client not connected ({suite:?}, {group:?})"
    );
    assert_eq!(net.server_connected_count(), 1);
    let h = net.handle_of_client(0).unwrap();
    let conn = net.server.connection(h).unwrap();
    assert_eq!(conn.cipher_suite(), Some(suite));
    assert_eq!(conn.peer_certificates(), pki.clients[0].chain.as_slice());
    // application data both ways
    let now = net.now;
    net.clients[0]
        .send(now, b"GET /.well-known/est/crts")
        .unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(
        net.server_data(),
        vec![b"GET /.well-known/est/crts".to_vec()]
    );
    net.server.send(now, h, b"2.05 Content").unwrap();
    net.run_for(Duration::from_millis(50));
    assert!(net.client_events[0].contains(&ConnEvent::Data(b"2.05 Content".to_vec())));
    assert_eq!(net.server.gauges().established, 1);
    assert_eq!(net.server.gauges().half_open, 0);
}

#[test]
fn handshake_ccm8_p256() {
    handshake_with(CipherSuite::Aes128Ccm8, NamedGroup::Secp256r1);
}

#[test]
fn handshake_gcm128_x25519() {
    handshake_with(CipherSuite::Aes128Gcm, NamedGroup::X25519);
}

#[test]
fn handshake_gcm256_p384() {
    handshake_with(CipherSuite::Aes256Gcm, NamedGroup::Secp384r1);
}

#[test]
fn server_with_a_p384_key() {
    let pki = Pki::with_server_alg(1, &rcgen::PKCS_ECDSA_P384_SHA384);
    let mut net = Net::new(pki.server_config(), 2, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
}

#[test]
fn server_picks_its_own_preference() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.cipher_suites = vec![CipherSuite::Aes128Gcm, CipherSuite::Aes128Ccm8];
    let mut net = Net::new(sc, 3, 0.0);
    let mut cc = pki.client_config(0);
    cc.cipher_suites = vec![CipherSuite::Aes128Ccm8, CipherSuite::Aes128Gcm];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert_eq!(
        net.clients[0].connection().cipher_suite(),
        Some(CipherSuite::Aes128Gcm)
    );
}

#[test]
fn the_first_client_hello_costs_no_state_and_one_small_reply() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 4, 0.0);
    net.add_client(pki.client_config(0));
    let ch = net.clients[0].poll_transmit().unwrap();
    let from = client_addr(0);
    net.inject(from, &ch);
    let out = net.take_server_transmits();
    assert_eq!(out.len(), 1);
    assert!(
        out[0].payload.len() <= ch.len(),
        "HelloVerifyRequest larger than the ClientHello"
    );
    assert_eq!(out[0].payload[0], ct::HANDSHAKE);
    assert_eq!(out[0].payload[13], hs::HELLO_VERIFY_REQUEST);
    // RFC 6347 §4.2.1: same record sequence number as the ClientHello
    assert_eq!(out[0].payload[5..11], ch[5..11]);
    assert_eq!(net.server.gauges().half_open, 0);
    assert_eq!(net.server.metrics().hello_verify_sent, 1);
    // a thousand more from distinct addresses: still nothing held
    for i in 0..1000u32 {
        let a = std::net::SocketAddr::from(([192, 0, (i >> 8) as u8, i as u8], 1234));
        net.inject(a, &ch);
    }
    assert_eq!(net.take_server_transmits().len(), 1000);
    assert_eq!(net.server.gauges().half_open, 0);
    assert_eq!(net.server.gauges().timers, 0);
}

#[test]
fn a_cookie_from_another_address_is_refused() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 5, 0.0);
    net.add_client(pki.client_config(0));
    let ch1 = net.clients[0].poll_transmit().unwrap();
    net.inject(client_addr(0), &ch1);
    let hvr = net.take_server_transmits().remove(0);
    let now = net.now;
    net.clients[0].handle_datagram(now, addr(SERVER), &hvr.payload);
    let ch2 = net.clients[0].poll_transmit().unwrap();
    // The same ClientHello with the cookie, from an attacker's address
    let other = addr("10.9.9.9:4000");
    net.inject(other, &ch2);
    let out = net.take_server_transmits();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].payload[13],
        hs::HELLO_VERIFY_REQUEST,
        "answered with a new cookie"
    );
    assert_eq!(net.server.metrics().refused(RefusalReason::BadCookie), 1);
    assert_eq!(net.server.gauges().half_open, 0);
    // From the right address it is admitted.
    net.inject(client_addr(0), &ch2);
    assert_eq!(net.server.gauges().half_open, 1);
}

#[test]
fn two_hundred_handshakes_at_20_percent_loss_all_complete() {
    let pki = Pki::new(200);
    let mut sc = pki.server_config();
    sc.handshake_timeout = Duration::from_secs(120);
    sc.handshake_stall_timeout = Duration::from_secs(70);
    let mut net = Net::new(sc, 0x5eed, 0.2);
    for i in 0..200 {
        let mut cc = pki.client_config(i);
        cc.handshake_timeout = Duration::from_secs(120);
        net.add_client(cc);
    }
    net.run_for(Duration::from_secs(120));
    let done = (0..200).filter(|i| net.client_connected(*i)).count();
    assert_eq!(done, 200, "seed 0x5eed: {done}/200 completed");
    assert_eq!(net.server.metrics().handshakes_completed, 200);
    assert!(net.server.metrics().flights_retransmitted > 0);
}

#[test]
fn connection_id_keeps_a_session_across_a_nat_rebinding() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 6, 0.0);
    let mut cc = pki.client_config(0);
    cc.connection_id = Some(Vec::new());
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let cid = net.clients[0].connection().peer_cid().to_vec();
    assert_eq!(cid.len(), 4, "the server issued a 4-byte CID");
    let h = net.handle_of_client(0).unwrap();
    // The meter's NAT picks a new port.
    net.client_addrs[0] = addr("10.1.0.1:50000");
    let now = net.now;
    net.clients[0].send(now, b"after rebinding").unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server_data(), vec![b"after rebinding".to_vec()]);
    assert!(net.server_events.iter().any(|e| matches!(e,
        Event::AddressChanged { to, .. } if *to == addr("10.1.0.1:50000"))));
    assert_eq!(
        net.server.connection(h).unwrap().peer(),
        addr("10.1.0.1:50000")
    );
    // and the answer reaches the new port
    net.server.send(now, h, b"reply").unwrap();
    net.run_for(Duration::from_millis(50));
    assert!(net.client_events[0].contains(&ConnEvent::Data(b"reply".to_vec())));
    assert_eq!(net.server.metrics().handshakes_completed, 1);
}

#[test]
fn a_replayed_record_is_dropped() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 7, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    let now = net.now;
    net.clients[0].send(now, b"once").unwrap();
    let rec = net.clients[0].poll_transmit().unwrap();
    net.inject(client_addr(0), &rec);
    net.inject(client_addr(0), &rec);
    assert_eq!(net.server_data(), vec![b"once".to_vec()]);
    assert_eq!(net.server.metrics().records_replayed, 1);
    // a tampered record is dropped silently and the session lives on
    let mut bad = rec.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    bad[10] ^= 0x40; // new sequence number so the window lets it through to the AEAD
    net.inject(client_addr(0), &bad);
    assert_eq!(net.server.metrics().records_bad_mac, 1);
    assert_eq!(net.server.gauges().established, 1);
}

#[test]
fn an_unknown_ca_is_refused_with_an_alert_and_counted() {
    let pki = Pki::new(1);
    let other = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 8, 0.0);
    let mut cc = other.client_config(0);
    cc.server_verifier = pki.verifier();
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    assert_eq!(net.server.metrics().refused(RefusalReason::UnknownCa), 1);
    assert!(net.clients[0].is_closed(), "client saw the fatal alert");
    assert_eq!(net.server.gauges().half_open, 0);
}

#[test]
fn one_identity_keeps_at_most_its_limit_of_sessions() {
    let pki = Pki::new(2);
    let mut sc = pki.server_config();
    sc.limits.max_sessions_per_identity = 2;
    let mut net = Net::new(sc, 9, 0.0);
    for _ in 0..5 {
        let i = net.add_client(pki.client_config(0));
        net.client_addrs[i] = std::net::SocketAddr::from(([10, 2, 0, i as u8 + 1], 1000));
    }
    net.add_client(pki.client_config(1));
    net.client_addrs[5] = addr("10.3.0.1:1000");
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.server.metrics().handshakes_completed, 6);
    assert_eq!(net.server.metrics().sessions_superseded, 3);
    assert_eq!(net.server.gauges().established, 3);
    assert!(net.client_connected(5), "the other identity is unaffected");
}

#[test]
fn supersede_closes_an_established_session_once_and_counts_it() {
    // What a driver with several endpoints does when a newer session of the same identity was
    // established on another one: the endpoint reports each session's identity and closes the
    // one it is told to, counted like its own replacement.
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 11, 0.0);
    net.add_client(pki.client_config(0));
    net.add_client(pki.client_config(1));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0) && net.client_connected(1));
    let h0 = net.handle_of_client(0).unwrap();
    let h1 = net.handle_of_client(1).unwrap();
    let id0 = net.server.identity(h0).unwrap().to_vec();
    let id1 = net.server.identity(h1).unwrap().to_vec();
    assert!(!id0.is_empty());
    assert_ne!(id0, id1, "two devices, two identities");
    let now = net.now;
    assert!(net.server.supersede(now, h0));
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server.metrics().sessions_superseded, 1);
    assert_eq!(net.server.gauges().established, 1);
    assert!(net.clients[0].is_closed(), "client 0 got close_notify");
    assert!(net.client_connected(1), "client 1 is untouched");
    // A handle that is no longer an established session: nothing closed, nothing counted.
    assert!(net.server.identity(h0).is_none());
    let now = net.now;
    assert!(!net.server.supersede(now, h0));
    assert!(!net
        .server
        .supersede(now, est_dtls::ConnectionHandle(u64::MAX)));
    assert_eq!(net.server.metrics().sessions_superseded, 1);
    assert_eq!(net.server.gauges().established, 1);
}

#[test]
fn silent_cookie_echoers_cannot_keep_a_meter_out() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.limits.max_half_open = 8;
    sc.limits.max_half_open_per_ip = 8;
    let mut net = Net::new(sc, 10, 0.0);
    // 20 silent peers (each on its own address) complete the cookie exchange and stop.
    for k in 0..20u8 {
        let from = std::net::SocketAddr::from(([10, 7, 0, k + 1], 999));
        silent_half_open(&mut net, &pki, &format!("silent-{k}"), from);
        net.take_server_transmits();
    }
    assert_eq!(net.server.gauges().half_open, 8);
    assert!(net.server.metrics().half_open_evicted >= 12);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(
        net.client_connected(0),
        "the meter enrolled past the silent peers"
    );
}

/// A silent peer from `from` that completes the cookie exchange and stops: one half-open slot.
/// The server's answers to its second ClientHello stay queued in the endpoint.
fn silent_half_open(net: &mut Net, pki: &Pki, name: &str, from: std::net::SocketAddr) {
    let extra = pki.extra_client(name);
    let key = std::sync::Arc::new(est_dtls::SigningKey::from_pkcs8(&extra.key_der).unwrap());
    let cfg = std::sync::Arc::new(est_dtls::ClientConfig::new(
        extra.chain,
        key,
        pki.verifier(),
    ));
    let mut c = est_dtls::Client::connect(net.now, addr(SERVER), cfg).unwrap();
    let ch1 = c.poll_transmit().unwrap();
    net.inject(from, &ch1);
    let hvr = net
        .take_server_transmits()
        .into_iter()
        .find(|t| t.destination == from)
        .expect("HelloVerifyRequest");
    c.handle_datagram(net.now, addr(SERVER), &hvr.payload);
    let ch2 = c.poll_transmit().unwrap();
    net.inject(from, &ch2);
}

/// A meter on a slow mesh (2 s each way) is half-open for seconds. One host then floods with
/// cookie-echoing silent peers from many ports: at the cap its own handshakes give way, not
/// the meter's, and the evicted peers are told with a fatal alert.
#[test]
fn one_host_with_many_ports_cannot_evict_a_slow_meter() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.limits.max_half_open = 8;
    sc.limits.max_half_open_per_ip = 8;
    let mut net = Net::new(sc, 12, 0.0);
    net.latency = Duration::from_secs(2);
    net.add_client(pki.client_config(0));
    // CH1, HVR, CH2: past the cookie after 6 s; the server's flight is on its way.
    net.run_for(Duration::from_millis(6500));
    assert_eq!(net.server.gauges().half_open, 1, "the meter is half-open");
    let mut alerts = 0;
    for k in 0..30u16 {
        let from = std::net::SocketAddr::from(([10, 7, 0, 1], 2000 + k));
        silent_half_open(&mut net, &pki, &format!("flood-{k}"), from);
        for t in net.take_server_transmits() {
            // An alert record (content type 21) to an evicted attacker.
            if t.payload.first() == Some(&21) && t.destination.ip() == from.ip() {
                alerts += 1;
            }
            assert_ne!(
                t.destination, net.client_addrs[0],
                "nothing sent to the meter"
            );
        }
    }
    assert_eq!(net.server.gauges().half_open, 8);
    assert_eq!(net.server.metrics().half_open_evicted, 23);
    assert_eq!(alerts, 23, "each evicted peer hears a fatal alert");
    net.run_for(Duration::from_secs(20));
    assert!(
        net.client_connected(0),
        "the slow meter kept its slot and finished its handshake"
    );
}

/// The same from one IPv6 /64 with a new address per peer: the /64 is one source.
#[test]
fn one_ipv6_prefix_with_many_addresses_cannot_evict_a_slow_meter() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.limits.max_half_open = 8;
    sc.limits.max_half_open_per_ip = 8;
    let mut net = Net::new(sc, 13, 0.0);
    net.latency = Duration::from_secs(2);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_millis(6500));
    for k in 0..30u16 {
        let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, k + 1);
        silent_half_open(&mut net, &pki, &format!("v6-{k}"), (ip, 4000).into());
        net.take_server_transmits();
    }
    assert_eq!(net.server.metrics().half_open_evicted, 23);
    net.run_for(Duration::from_secs(20));
    assert!(net.client_connected(0));
}

/// With every source holding one slot, eviction stays oldest-first: eight distinct silent
/// sources admitted after the slow meter push it out, and it hears so at once (a fatal alert)
/// rather than retransmitting until its own timeout.
#[test]
fn with_one_slot_per_source_the_oldest_goes_and_is_told() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.limits.max_half_open = 8;
    let mut net = Net::new(sc, 14, 0.0);
    net.latency = Duration::from_secs(2);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_millis(6500));
    for k in 0..8u8 {
        silent_half_open(
            &mut net,
            &pki,
            &format!("d-{k}"),
            ([10, 8, 0, k + 1], 999).into(),
        );
    }
    assert_eq!(net.server.metrics().half_open_evicted, 1);
    let to_meter: Vec<_> = net
        .take_server_transmits()
        .into_iter()
        .filter(|t| t.destination == net.client_addrs[0])
        .collect();
    assert!(
        to_meter.iter().any(|t| t.payload.first() == Some(&21)),
        "the evicted meter is sent an alert"
    );
}

#[test]
fn the_session_cap_refuses_cleanly() {
    let pki = Pki::new(3);
    let mut sc = pki.server_config();
    sc.limits.max_sessions = 2;
    sc.limits.max_half_open = 2;
    let mut net = Net::new(sc, 11, 0.0);
    for i in 0..3 {
        net.add_client(pki.client_config(i));
        net.run_for(Duration::from_secs(2));
    }
    assert!(net.client_connected(0) && net.client_connected(1));
    assert!(!net.client_connected(2));
    assert!(
        net.clients[2].is_closed(),
        "refused with an alert, not silence"
    );
    assert_eq!(net.server.metrics().refused(RefusalReason::Limit), 1);
}

#[test]
fn a_restarted_meter_replaces_its_session_only_after_the_cookie() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 12, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    let first = net.handle_of_client(0).unwrap();
    // The meter reboots and starts over from the same address and port.
    let now = net.now;
    net.clients[0] =
        est_dtls::Client::connect(now, addr(SERVER), std::sync::Arc::new(pki.client_config(0)))
            .unwrap();
    let ch1 = net.clients[0].poll_transmit().unwrap();
    net.inject(client_addr(0), &ch1);
    assert!(
        net.server.connection(first).is_some(),
        "not replaced by an unverified ClientHello"
    );
    let hvr = net.take_server_transmits().remove(0);
    net.clients[0].handle_datagram(now, addr(SERVER), &hvr.payload);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert!(net.server.connection(first).is_none());
    assert_eq!(net.server.metrics().sessions_replaced, 1);
    assert_eq!(net.server.gauges().established, 1);
}

#[test]
fn idle_sessions_close_and_stalled_handshakes_are_dropped() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.idle_timeout = Duration::from_secs(30);
    let mut net = Net::new(sc, 13, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.server.gauges().established, 1);
    net.run_for(Duration::from_secs(40));
    assert_eq!(net.server.gauges().established, 0);
    assert_eq!(net.server.metrics().sessions_closed_idle, 1);
    assert_eq!(net.server.gauges().timers, 0);
}

#[test]
fn retransmission_backs_off_exponentially() {
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    sc.handshake_stall_timeout = Duration::from_secs(60);
    sc.handshake_timeout = Duration::from_secs(60);
    let mut net = Net::new(sc, 14, 0.0);
    net.add_client(pki.client_config(0));
    // Deliver CH1 and CH2, then make the client vanish: the server resends flight 4 at
    // 1, 2, 4, 8, 16, 32 s.
    let ch1 = net.clients[0].poll_transmit().unwrap();
    net.inject(client_addr(0), &ch1);
    let hvr = net.take_server_transmits().remove(0);
    let now = net.now;
    net.clients[0].handle_datagram(now, addr(SERVER), &hvr.payload);
    let ch2 = net.clients[0].poll_transmit().unwrap();
    net.inject(client_addr(0), &ch2);
    net.take_server_transmits();
    let start = net.now;
    let mut resends = Vec::new();
    let mut t = start;
    while t < start + Duration::from_secs(59) {
        t += Duration::from_millis(100);
        net.server.handle_timeout(t);
        if !net.take_server_transmits().is_empty() {
            resends.push((t - start).as_secs());
        }
    }
    assert_eq!(resends, vec![1, 3, 7, 15, 31], "back-off 1, 2, 4, 8, 16 s");
    net.server.handle_timeout(start + Duration::from_secs(61));
    assert_eq!(net.server.gauges().half_open, 0);
    assert_eq!(net.server.metrics().refused(RefusalReason::Timeout), 1);
}

#[test]
fn garbage_never_panics_and_is_counted() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 15, 0.0);
    let mut rng = Lcg(99);
    for n in 0..2000usize {
        let len = n % 300;
        let mut d: Vec<u8> = (0..len).map(|_| (rng.next_f64() * 256.0) as u8).collect();
        if n % 3 == 0 && len > 13 {
            d[0] = ct::HANDSHAKE;
            d[1] = 0xFE;
            d[2] = 0xFD;
            d[3] = 0;
            d[4] = 0;
        }
        net.inject(client_addr(n % 7), &d);
    }
    assert_eq!(net.server.gauges().half_open, 0);
    let _ = wire::DTLS_1_2;
}

/// The records of a datagram: (content type, epoch, number of handshake fragments inside).
fn records_of(d: &[u8]) -> Vec<(u8, u16, usize)> {
    wire::Records::new(d, 0)
        .map(|r| {
            let r = r.unwrap();
            let n = if r.content_type == ct::HANDSHAKE && r.epoch == 0 {
                wire::parse_handshake_fragments(r.fragment).unwrap().len()
            } else {
                0
            };
            (r.content_type, r.epoch, n)
        })
        .collect()
}

#[test]
fn a_flight_shares_one_record_per_datagram_and_still_fragments_to_the_mtu() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 60, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let to_client: Vec<&Vec<u8>> = net.log.iter().filter(|l| !l.0).map(|l| &l.2).collect();
    let to_server: Vec<&Vec<u8>> = net.log.iter().filter(|l| l.0).map(|l| &l.2).collect();
    // Flight 4: ServerHello .. ServerHelloDone, five messages in one record.
    assert_eq!(records_of(to_client[1]), [(ct::HANDSHAKE, 0, 5)]);
    // Flight 5: Certificate, ClientKeyExchange, CertificateVerify in one record, then the
    // ChangeCipherSpec and the encrypted Finished.
    assert_eq!(
        records_of(to_server[2]),
        [
            (ct::HANDSHAKE, 0, 3),
            (ct::CHANGE_CIPHER_SPEC, 0, 0),
            (ct::HANDSHAKE, 1, 0)
        ]
    );
    // A 300-byte MTU: every datagram fits, messages are fragmented, the handshake completes.
    let mut sc = pki.server_config();
    sc.mtu_bytes = 300;
    let mut net = Net::new(sc, 61, 0.0);
    let mut cc = pki.client_config(1);
    cc.mtu_bytes = 300;
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert!(net.log.iter().all(|(_, _, d)| d.len() <= 300));
    let fragmented = net
        .log
        .iter()
        .flat_map(|(_, _, d)| wire::Records::new(d, 0).filter_map(Result::ok))
        .filter(|r| r.content_type == ct::HANDSHAKE && r.epoch == 0)
        .flat_map(|r| wire::parse_handshake_fragments(r.fragment).unwrap())
        .any(|f| !f.is_complete());
    assert!(fragmented, "the certificates needed fragments at 300 bytes");
}

#[test]
fn a_lean_client_hello_fits_a_frame_and_names_cached_certificates_after_the_cookie() {
    use est_dtls::wire::extension_type as ext;
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 62, 0.0);
    let mut cc = pki.client_config(0);
    // The RFC 9148 meter profile: one suite, one group, one signature scheme.
    cc.cipher_suites = vec![CipherSuite::Aes128Ccm8];
    cc.lean_hello = true;
    cc.signature_schemes = vec![est_dtls::SignatureScheme::EcdsaSecp256r1Sha256];
    cc.cached_server_chains = vec![pki.server.chain.clone()];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().cached_info_hits, 1);
    let hellos: Vec<(usize, wire::ClientHello)> = net
        .log
        .iter()
        .filter(|l| l.0 && l.2[13] == hs::CLIENT_HELLO)
        .map(|l| {
            let f = wire::parse_handshake_fragments(&l.2[13..]).unwrap();
            (l.2.len(), wire::ClientHello::parse(f[0].body).unwrap())
        })
        .collect();
    assert_eq!(hellos.len(), 2);
    let (len1, ch1) = &hellos[0];
    let (_, ch2) = &hellos[1];
    // 92 bytes of UDP payload fit one 802.15.4 frame (client-sim's link model).
    assert!(*len1 <= 92, "first ClientHello {len1} bytes");
    for e in [
        ext::EC_POINT_FORMATS,
        ext::RENEGOTIATION_INFO,
        ext::CACHED_INFO,
    ] {
        assert_eq!(
            ch1.extension(e),
            None,
            "extension {e} in the first ClientHello"
        );
    }
    assert!(ch1
        .cipher_suites
        .contains(&wire::EMPTY_RENEGOTIATION_INFO_SCSV));
    assert!(ch2.extension(ext::CACHED_INFO).is_some());
    assert!(!ch2.cookie.is_empty());
    assert_eq!(ch1.cipher_suites, ch2.cipher_suites);
    assert_eq!(ch1.random, ch2.random);
}

#[test]
fn the_servers_first_timer_is_three_cookie_round_trips_and_at_least_the_configured_one() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 63, 0.0);
    for (i, round_trip, expect) in [
        (0, Duration::from_millis(800), Duration::from_millis(2400)),
        (1, Duration::from_millis(20), Duration::from_secs(1)),
    ] {
        net.add_client(pki.client_config(i));
        let from = client_addr(i);
        let ch1 = net.clients[i].poll_transmit().unwrap();
        net.inject(from, &ch1);
        let hvr = net.take_server_transmits().remove(0);
        net.now += round_trip;
        let now = net.now;
        net.clients[i].handle_datagram(now, addr(SERVER), &hvr.payload);
        let ch2 = net.clients[i].poll_transmit().unwrap();
        net.inject(from, &ch2);
        assert!(!net.take_server_transmits().is_empty(), "flight 4");
        // RFC 6298 §2.2's first RTO, 3 x R (the configured 1 s is the floor).
        assert_eq!(
            net.server.poll_timeout(),
            Some(now + expect),
            "{round_trip:?}"
        );
        net.server
            .handle_timeout(now + expect - Duration::from_millis(1));
        assert!(net.take_server_transmits().is_empty());
        net.server.handle_timeout(now + expect);
        assert!(!net.take_server_transmits().is_empty(), "flight 4 resent");
    }
}

#[test]
fn a_client_answers_a_repeating_server_at_most_once_per_its_own_timer() {
    use est_dtls::RetransmitConfig;
    let pki = Pki::new(1);
    let mut sc = pki.server_config();
    // A server whose timer is far below the path's round trip.
    sc.retransmit = RetransmitConfig {
        initial: Duration::from_millis(200),
        max: Duration::from_millis(200),
    };
    let mut net = Net::new(sc, 64, 0.0);
    let mut cc = pki.client_config(0);
    cc.retransmit = RetransmitConfig {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(60),
    };
    net.add_client(cc);
    // Flight 5 never arrives: the server repeats flight 4 every 200 ms.
    net.filter = Some(Box::new(|to_server, _, d| {
        let flight5 = to_server && d[0] == ct::HANDSHAKE && d[13] == hs::CERTIFICATE;
        if flight5 {
            Vec::new()
        } else {
            vec![d]
        }
    }));
    net.run_for(Duration::from_millis(4500));
    let flight5_sent = net
        .log
        .iter()
        .filter(|(to_server, _, d)| *to_server && d[13] == hs::CERTIFICATE)
        .count();
    let flight4_sent = net
        .log
        .iter()
        .filter(|(to_server, _, d)| !to_server && d[13] == hs::SERVER_HELLO)
        .count();
    assert!(
        flight4_sent >= 15,
        "the server repeated flight 4 ({flight4_sent})"
    );
    // The first flight 5, one answer to the first repeat, none to the next ones within the
    // client's 5 s timer.
    assert_eq!(flight5_sent, 2, "flight 5 sent {flight5_sent} times");
}
