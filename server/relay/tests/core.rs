//! The relay core on virtual time: both modes, header crypto and key rotation, tampered and
//! replayed headers, the DTLS filter, discovery, rate limits, registrar failover, circuits
//! (expiry and caps), and every JPY message checked against the draft's CDDL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is the test failing"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use est_relay::{
    jpy, CircuitId, Destination, DropReason, Event, MeterAddr, Mode, Rate, Relay, RelayConfig,
    Transmit,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const R1: &str = "192.0.2.1:7634";
const R2: &str = "192.0.2.2:7634";

fn meter(i: u16) -> MeterAddr {
    MeterAddr::new(
        addr(&format!("10.0.{}.{}:{}", i / 250, i % 250 + 1, 40_000 + i)),
        0,
    )
}

fn record(ct: u8, epoch: u16, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![ct, 0xfe, 0xfd];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
    r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

fn client_hello(tag: u8) -> Vec<u8> {
    let mut body = vec![1, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 40];
    body.extend_from_slice(&[tag; 40]);
    record(22, 0, &body)
}

fn app_data(tag: u8) -> Vec<u8> {
    record(23, 1, &[tag; 48])
}

struct Net {
    relay: Relay,
    now: Instant,
}

impl Net {
    fn new(cfg: RelayConfig) -> Net {
        let now = Instant::now();
        Net {
            relay: Relay::new(cfg, now).unwrap(),
            now,
        }
    }

    fn stateless() -> Net {
        Net::new(RelayConfig {
            registrars: vec![addr(R1)],
            join_port: 5684,
            ..RelayConfig::default()
        })
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.relay.poll_timeout() {
            if t > end {
                break;
            }
            self.now = t.max(self.now);
            self.relay.handle_timeout(self.now);
        }
        self.now = end;
        self.relay.handle_timeout(self.now);
    }

    fn transmits(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.relay.poll_transmit()).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.relay.poll_event()).collect()
    }

    fn meter_sends(&mut self, m: MeterAddr, d: &[u8]) -> Vec<Transmit> {
        self.relay.handle_meter(self.now, m, d);
        self.transmits()
    }

    /// Sends `d` from `m` and returns the JPY message the registrar got (checked against the CDDL).
    fn wrap(&mut self, m: MeterAddr, d: &[u8]) -> (SocketAddr, Vec<u8>, Vec<u8>) {
        let t = self.meter_sends(m, d);
        assert_eq!(t.len(), 1, "{t:?}");
        let Destination::Jpy(to) = t[0].destination else {
            panic!("{t:?}")
        };
        cbor_schemas::schema::check_jpy(&t[0].payload).unwrap();
        let j = jpy::decode(&t[0].payload, 64).unwrap();
        assert_eq!(&*j.content, d);
        (to, j.header.to_vec(), t[0].payload.clone())
    }

    fn reply(&mut self, from: &str, header: &[u8], content: &[u8]) -> Vec<Transmit> {
        let m = jpy::encode(header, content);
        cbor_schemas::schema::check_jpy(&m).unwrap();
        self.relay.handle_jpy(self.now, addr(from), &m);
        self.transmits()
    }
}

#[test]
fn stateless_round_trip_with_the_header_echoed() {
    let mut net = Net::stateless();
    let m = meter(1);
    let (to, h, msg) = net.wrap(m, &client_hello(1));
    assert_eq!(to, addr(R1));
    assert_eq!(h.len(), 24, "IPv4 meter");
    assert!(msg.len() - client_hello(1).len() <= 38);
    // The registrar echoes the header: the content goes to the meter, unchanged.
    let back = net.reply(R1, &h, &[0x16, 0xfe, 0xff, 1, 2, 3]);
    assert_eq!(
        back,
        vec![Transmit {
            destination: Destination::Meter(m),
            payload: vec![0x16, 0xfe, 0xff, 1, 2, 3]
        }]
    );
    // The same header for every datagram of the meter (the registrar's connection key)...
    let (_, h2, _) = net.wrap(m, &app_data(2));
    assert_eq!(h, h2);
    // ... and another for another meter, or another port of the same address.
    let (_, h3, _) = net.wrap(meter(2), &client_hello(3));
    assert_ne!(h, h3);
    let same_ip_other_port = MeterAddr::new(addr("10.0.0.2:1"), 0);
    let (_, h4, _) = net.wrap(same_ip_other_port, &client_hello(3));
    assert_ne!(h, h4);
    // A registrar that adds elements to the array: accepted (the first two are used).
    let mut longer = vec![0x83];
    longer.extend_from_slice(&jpy::encode(&h, &[7; 5])[1..]);
    longer.push(0xf6);
    net.relay.handle_jpy(net.now, addr(R1), &longer);
    assert_eq!(net.transmits().len(), 1);
    let m = net.relay.metrics();
    assert_eq!(m.forwarded_to_registrar, 4);
    assert_eq!(m.forwarded_to_meters, 2);
    assert_eq!(m.dropped_total(), 0);
}

#[test]
fn link_local_ipv6_meters_get_32_byte_headers() {
    let mut net = Net::stateless();
    let m = MeterAddr::new(addr("[fe80::1234:5678]:45965"), 2);
    let (_, h, msg) = net.wrap(m, &client_hello(1));
    assert_eq!(h.len(), 32);
    assert_eq!(
        msg.len() - client_hello(1).len(),
        jpy::overhead(32, client_hello(1).len())
    );
    assert!(jpy::max_overhead(h.len()) <= 38);
    assert_eq!(
        net.reply(R1, &h, &[1])[0].destination,
        Destination::Meter(m)
    );
}

#[test]
fn tampered_headers_are_dropped_silently() {
    let mut net = Net::stateless();
    let (_, h, _) = net.wrap(meter(1), &client_hello(1));
    for i in 0..h.len() {
        let mut t = h.clone();
        t[i] ^= 0x40;
        assert!(net.reply(R1, &t, &[1, 2, 3]).is_empty(), "byte {i}");
    }
    // Truncated, extended, empty.
    assert!(net.reply(R1, &h[..h.len() - 1], &[1]).is_empty());
    let mut longer = h.clone();
    longer.push(0);
    assert!(net.reply(R1, &longer, &[1]).is_empty());
    assert!(net.reply(R1, &[], &[1]).is_empty());
    let m = net.relay.metrics();
    assert_eq!(m.dropped(DropReason::HeaderStale), 1, "the generation byte");
    assert_eq!(m.dropped(DropReason::HeaderAuth) as usize, h.len() - 1);
    assert_eq!(m.dropped(DropReason::HeaderMalformed), 3);
    assert_eq!(m.forwarded_to_meters, 0);
}

#[test]
fn replies_from_elsewhere_or_not_jpy_are_dropped() {
    let mut net = Net::new(RelayConfig {
        registrars: vec![addr(R1), addr(R2)],
        ..RelayConfig::default()
    });
    let (_, h, _) = net.wrap(meter(1), &client_hello(1));
    // A valid header from a source that is no registrar.
    assert!(net.reply("198.51.100.9:7634", &h, &[1]).is_empty());
    assert!(net.reply("192.0.2.1:7635", &h, &[1]).is_empty());
    // Replayed from the other registrar's address: bound to the one it was sent to.
    assert!(net.reply(R2, &h, &[1]).is_empty());
    // Not JPY.
    net.relay.handle_jpy(net.now, addr(R1), &client_hello(1));
    net.relay.handle_jpy(net.now, addr(R1), &[0x82, 0x41]);
    assert!(net.transmits().is_empty());
    let m = net.relay.metrics();
    assert_eq!(m.dropped(DropReason::UnknownSource), 2);
    assert_eq!(m.dropped(DropReason::HeaderAuth), 1);
    assert_eq!(m.dropped(DropReason::NotJpy), 2);
}

#[test]
fn key_rotation_on_virtual_time_keeps_the_previous_key() {
    let day = Duration::from_secs(86_400);
    let mut net = Net::new(RelayConfig {
        registrars: vec![addr(R1)],
        key_rotation: day,
        ..RelayConfig::default()
    });
    let m = meter(1);
    let (_, h0, _) = net.wrap(m, &client_hello(1));
    net.advance(day - Duration::from_secs(1));
    assert_eq!(net.relay.metrics().key_rotations, 0);
    assert_eq!(net.wrap(m, &app_data(1)).1, h0);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.relay.metrics().key_rotations, 1, "rotated by the timer");
    let (_, h1, _) = net.wrap(m, &app_data(2));
    assert_ne!(h0, h1, "a new key, a new header");
    // Replies in flight under the previous key still reach the meter.
    assert_eq!(net.reply(R1, &h0, &[1]).len(), 1);
    assert_eq!(net.reply(R1, &h1, &[2]).len(), 1);
    net.advance(day);
    assert_eq!(net.relay.metrics().key_rotations, 2);
    // Two rotations later the first header is a replay of something old.
    assert!(net.reply(R1, &h0, &[3]).is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::HeaderStale), 1);
    assert_eq!(net.reply(R1, &h1, &[4]).len(), 1);
    // A replay of a whole captured reply under a current key is forwarded: the meter's DTLS
    // record layer drops replayed records (the draft leaves replay protection to DTLS).
    let (_, h2, _) = net.wrap(m, &app_data(3));
    let captured = jpy::encode(&h2, &app_data(9));
    for _ in 0..2 {
        net.relay.handle_jpy(net.now, addr(R1), &captured);
    }
    assert_eq!(net.transmits().len(), 2);
}

#[test]
fn only_dtls_records_are_forwarded() {
    let mut net = Net::stateless();
    let m = meter(1);
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![],
        vec![0x16, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
        {
            let mut r = client_hello(1);
            r.push(0);
            r
        },
        vec![0x82, 0x41, 0x01, 0x41, 0x02],
    ] {
        assert!(net.meter_sends(m, &junk).is_empty(), "{junk:?}");
    }
    assert_eq!(net.relay.metrics().dropped(DropReason::NotDtls), 5);
    assert_eq!(net.relay.metrics().forwarded_to_registrar, 0);
    // Too large.
    let big = record(23, 1, &vec![0; 1300]);
    assert!(net.meter_sends(m, &big).is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::TooLarge), 1);
}

#[test]
fn meters_discover_the_join_port() {
    let mut net = Net::stateless();
    // CON GET /.well-known/core?brski-jp=*, message ID 0x0102, token 0xab.
    let mut req = vec![0x41, 0x01, 0x01, 0x02, 0xab];
    req.extend_from_slice(&[0xbb]);
    req.extend_from_slice(b".well-known");
    req.push(0x04);
    req.extend_from_slice(b"core");
    req.push(0x4a);
    req.extend_from_slice(b"brski-jp=*");
    let t = net.meter_sends(meter(3), &req);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].destination, Destination::Meter(meter(3)));
    let p = &t[0].payload;
    assert_eq!(
        &p[..5],
        &[0x61, 0x45, 0x01, 0x02, 0xab],
        "ACK 2.05, same MID and token"
    );
    assert!(p.ends_with(b"\xff<>;brski-jp=5684"), "{p:?}");
    assert_eq!(net.relay.metrics().discovery_answered, 1);
    assert_eq!(net.relay.metrics().forwarded_to_registrar, 0);
}

#[test]
fn a_flooding_meter_is_limited_and_the_others_are_served() {
    let mut net = Net::new(RelayConfig {
        registrars: vec![addr(R1)],
        per_meter_rate: Rate {
            per_sec: 10.0,
            burst: 20.0,
        },
        global_rate: Rate {
            per_sec: 1000.0,
            burst: 400.0,
        },
        ..RelayConfig::default()
    });
    let flooder = MeterAddr::new(addr("10.9.9.9:5000"), 0);
    let mut forwarded = 0;
    for i in 0..10_000u32 {
        // 10,000 datagrams in one virtual second.
        if i % 100 == 0 {
            net.advance(Duration::from_millis(10));
        }
        forwarded += net.meter_sends(flooder, &app_data(i as u8)).len();
    }
    assert!((20..=31).contains(&forwarded), "{forwarded}");
    // Every other meter gets everything through meanwhile.
    for i in 0..100 {
        for _ in 0..3 {
            assert_eq!(
                net.meter_sends(meter(i), &app_data(1)).len(),
                1,
                "meter {i}"
            );
            let _ = net.meter_sends(flooder, &app_data(0));
        }
    }
    let m = net.relay.metrics();
    assert!(m.dropped(DropReason::RateMeter) > 9_000);
    assert_eq!(m.dropped(DropReason::RateGlobal), 0);
}

#[test]
fn the_global_limit_caps_the_mesh() {
    let mut net = Net::new(RelayConfig {
        registrars: vec![addr(R1)],
        global_rate: Rate {
            per_sec: 100.0,
            burst: 50.0,
        },
        ..RelayConfig::default()
    });
    let mut ok = 0;
    for i in 0..500 {
        ok += net.meter_sends(meter(i), &app_data(1)).len();
    }
    assert_eq!(ok, 50);
    assert_eq!(net.relay.metrics().dropped(DropReason::RateGlobal), 450);
    net.advance(Duration::from_millis(100));
    assert_eq!(net.meter_sends(meter(1), &app_data(1)).len(), 1);
}

#[test]
fn failover_to_the_next_registrar_when_a_client_hello_goes_unanswered() {
    let mut net = Net::new(RelayConfig {
        registrars: vec![addr(R1), addr(R2)],
        failover_after: Duration::from_secs(5),
        ..RelayConfig::default()
    });
    // R1 answers: no failover however long it takes between hellos.
    let (to, h, _) = net.wrap(meter(1), &client_hello(1));
    assert_eq!(to, addr(R1));
    net.advance(Duration::from_secs(4));
    assert_eq!(net.reply(R1, &h, &[1]).len(), 1);
    net.advance(Duration::from_secs(10));
    assert!(net.events().is_empty());
    // Application data unanswered is not a reason (a registrar may stay silent to junk).
    net.wrap(meter(1), &app_data(1));
    net.advance(Duration::from_secs(10));
    assert!(net.events().is_empty());
    // A ClientHello unanswered for 5 s: R2 from then on.
    net.wrap(meter(2), &client_hello(2));
    net.advance(Duration::from_millis(4_999));
    assert_eq!(net.relay.active_registrar(), addr(R1));
    net.advance(Duration::from_millis(1));
    assert_eq!(
        net.events(),
        vec![Event::FailedOver {
            from: addr(R1),
            to: addr(R2)
        }]
    );
    assert_eq!(net.relay.active_registrar(), addr(R2));
    let (to, h2, _) = net.wrap(meter(2), &client_hello(2));
    assert_eq!(to, addr(R2));
    assert_ne!(h2, h, "another meter");
    // R2's replies open (headers bound to R2), and a late reply of R1 still reaches its meter.
    assert_eq!(net.reply(R2, &h2, &[1]).len(), 1);
    assert_eq!(net.reply(R1, &h, &[1]).len(), 1);
    assert_eq!(net.relay.metrics().failovers, 1);
    // R2 dies too: back to R1.
    net.wrap(meter(3), &client_hello(3));
    net.advance(Duration::from_secs(5));
    assert_eq!(net.relay.active_registrar(), addr(R1));
    assert_eq!(net.relay.metrics().failovers, 2);
}

#[test]
fn a_single_registrar_is_kept() {
    let mut net = Net::stateless();
    net.wrap(meter(1), &client_hello(1));
    net.advance(Duration::from_secs(60));
    assert_eq!(net.relay.metrics().failovers, 0);
    assert!(net.events().is_empty());
    assert_eq!(net.wrap(meter(1), &client_hello(1)).0, addr(R1));
}

#[test]
fn stateless_memory_does_not_grow_with_meters() {
    let mut net = Net::stateless();
    let before = net.relay.state_bytes();
    for i in 0..10_000u16 {
        let m = MeterAddr::new(addr(&format!("[fe80::{i:x}]:{}", 1000 + i)), 0);
        let _ = net.meter_sends(m, &client_hello(1));
    }
    assert_eq!(net.relay.state_bytes(), before);
    // All forwarded up to the global burst (4,000), in one instant.
    assert_eq!(net.relay.metrics().forwarded_to_registrar, 4000);
}

// --- stateful ---

fn stateful(cfg: impl FnOnce(&mut RelayConfig)) -> Net {
    let mut c = RelayConfig {
        mode: Mode::Stateful,
        registrars: vec![addr("192.0.2.1:5684"), addr("192.0.2.2:5684")],
        max_circuits_per_interface: 100,
        ..RelayConfig::default()
    };
    cfg(&mut c);
    Net::new(c)
}

fn circuit_of(t: &[Transmit]) -> (CircuitId, SocketAddr) {
    assert_eq!(t.len(), 1, "{t:?}");
    match t[0].destination {
        Destination::Circuit { circuit, registrar } => (circuit, registrar),
        d => panic!("{d:?}"),
    }
}

#[test]
fn stateful_one_circuit_per_meter_payload_unchanged() {
    let mut net = stateful(|_| {});
    let (a, b) = (meter(1), meter(2));
    let t = net.meter_sends(a, &client_hello(1));
    assert_eq!(
        t[0].payload,
        client_hello(1),
        "only the IP/UDP headers change"
    );
    let (ca, reg) = circuit_of(&t);
    assert_eq!(reg, addr("192.0.2.1:5684"));
    assert_eq!(
        net.events(),
        vec![Event::CircuitOpened {
            circuit: ca,
            meter: a
        }]
    );
    let (ca2, _) = circuit_of(&net.meter_sends(a, &app_data(1)));
    assert_eq!(ca, ca2);
    let (cb, _) = circuit_of(&net.meter_sends(b, &client_hello(2)));
    assert_ne!(ca, cb);
    assert_eq!(net.relay.circuits(), 2);
    // Replies on the circuit go to its meter; from another source they are dropped.
    net.relay
        .handle_circuit(net.now, cb, addr("192.0.2.1:5684"), &[9]);
    assert_eq!(net.transmits()[0].destination, Destination::Meter(b));
    net.relay
        .handle_circuit(net.now, cb, addr("192.0.2.9:5684"), &[9]);
    assert!(net.transmits().is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::UnknownSource), 1);
}

#[test]
fn circuits_expire_30_s_after_their_last_datagram_either_way() {
    let mut net = stateful(|c| c.registrars.truncate(1));
    let m = meter(1);
    let (c, reg) = circuit_of(&net.meter_sends(m, &client_hello(1)));
    net.events();
    net.advance(Duration::from_secs(20));
    // A reply refreshes the circuit.
    net.relay.handle_circuit(net.now, c, reg, &[1]);
    net.transmits();
    net.advance(Duration::from_secs(29));
    assert_eq!(net.relay.circuits(), 1);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.relay.circuits(), 0);
    assert_eq!(net.events(), vec![Event::CircuitClosed(c)]);
    assert_eq!(net.relay.metrics().circuits_expired, 1);
    // A late reply on it is dropped; the meter's next datagram opens a new circuit.
    net.relay.handle_circuit(net.now, c, reg, &[1]);
    assert!(net.transmits().is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::UnknownCircuit), 1);
    let (c2, _) = circuit_of(&net.meter_sends(m, &client_hello(1)));
    assert_ne!(c, c2);
}

#[test]
fn circuit_caps_per_meter_address_per_interface_and_in_total() {
    let mut net = stateful(|c| {
        c.max_circuits_per_interface = 5;
        c.max_circuits = 8;
    });
    let ip_ports = |p: u16| MeterAddr::new(addr(&format!("10.1.1.1:{p}")), 0);
    assert_eq!(net.meter_sends(ip_ports(1), &client_hello(1)).len(), 1);
    assert_eq!(net.meter_sends(ip_ports(2), &client_hello(1)).len(), 1);
    // A third port of the same address: the draft's cap of 2.
    assert!(net.meter_sends(ip_ports(3), &client_hello(1)).is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::CircuitCapMeter), 1);
    // Interface 0 holds 5.
    for i in 10..13 {
        assert_eq!(net.meter_sends(meter(i), &client_hello(1)).len(), 1);
    }
    assert!(net.meter_sends(meter(20), &client_hello(1)).is_empty());
    assert_eq!(
        net.relay.metrics().dropped(DropReason::CircuitCapInterface),
        1
    );
    // Interface 1 has its own 5, but the proxy holds 8 in all.
    for i in 30..33 {
        let m = MeterAddr::new(meter(i).addr, 1);
        assert_eq!(net.meter_sends(m, &client_hello(1)).len(), 1);
    }
    assert!(net
        .meter_sends(MeterAddr::new(meter(40).addr, 1), &client_hello(1))
        .is_empty());
    assert_eq!(net.relay.metrics().dropped(DropReason::CircuitCapTotal), 1);
    assert_eq!(net.relay.circuits(), 8);
    // Memory is bounded by the caps: it does not grow past them.
    let full = net.relay.state_bytes();
    for i in 100..1000 {
        let _ = net.meter_sends(meter(i), &client_hello(1));
    }
    assert_eq!(net.relay.state_bytes(), full);
    // All expire; then there is room again.
    net.advance(Duration::from_secs(30));
    assert_eq!(net.relay.circuits(), 0);
    assert_eq!(net.meter_sends(ip_ports(3), &client_hello(1)).len(), 1);
}

#[test]
fn stateful_failover_moves_new_handshakes() {
    let mut net = stateful(|c| c.failover_after = Duration::from_secs(3));
    let m = meter(1);
    let (c, reg) = circuit_of(&net.meter_sends(m, &client_hello(1)));
    assert_eq!(reg, addr("192.0.2.1:5684"));
    net.advance(Duration::from_secs(3));
    assert_eq!(net.relay.metrics().failovers, 1);
    // The meter's retransmitted ClientHello: same circuit (same port), the other registrar.
    let (c2, reg2) = circuit_of(&net.meter_sends(m, &client_hello(1)));
    assert_eq!(c, c2);
    assert_eq!(reg2, addr("192.0.2.2:5684"));
    net.relay.handle_circuit(net.now, c, reg2, &[1]);
    assert_eq!(net.transmits().len(), 1);
    // The old registrar's late replies are no longer this circuit's.
    net.relay.handle_circuit(net.now, c, reg, &[1]);
    assert!(net.transmits().is_empty());
}
