//! Fuzz target: the DTLS server `Endpoint` driven by a script of datagrams on virtual time.
//!
//! Genuine clients (`est_dtls::Client`, one per source address) take part, so the fuzzer gets
//! past the stateless cookie into every handshake state, and it can mutate any datagram on
//! the way in either direction (the ClientHello with its cookie included: edits outside the
//! cookie-bound fields reach `Connection::accept`).
//!
//! Input: a sequence of operations, first byte the opcode:
//! * 0: advance virtual time (by 40 ms to 10 min, from the opcode's high part and the next
//!   byte), fire timers of the endpoint and the clients;
//! * 1 `a k (pos_hi pos_lo xor)*k`: deliver the oldest datagram client `a` sent to the
//!   endpoint, from the client's current address, with `k % 4` byte edits;
//! * 2 `a k (edits)`: deliver the oldest datagram the endpoint sent to address `a` to the
//!   client now at that address, with edits;
//! * 3 `a n bytes[n]`: an arbitrary datagram from address `a`;
//! * 4 `a`: client `a` (re)starts a handshake (a rebooted meter); clients at odd addresses
//!   hold the server's certificate and offer it with RFC 7924 cached_info, and offer C509
//!   certificates (RFC 7250; a stand-in codec: a marker byte before the DER);
//! * 5 `a`: application data both ways on `a`'s session, if any;
//! * 6 `a`: client `a` closes (close_notify);
//! * 7 `a b`: client `a`'s NAT binding moves to address `b` (with a Connection ID the session
//!   follows it, RFC 9146 §6).
//!
//! Invariants: no panic; the gauges stay within the configured limits after every step
//! (half-open ≤ max_half_open, half-open + established ≤ max_sessions, one timer at most per
//! connection); every event names a connection the endpoint knew.
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use est_dtls::{
    CertError, ChainVerifier, Client, ClientConfig, ConnectionHandle, Endpoint, Event,
    ServerConfig, SigningKey, Verified,
};
use libfuzzer_sys::fuzz_target;

const ADDRS: usize = 4;
/// Datagrams kept per direction and address (older ones are lost).
const QUEUE_CAP: usize = 32;
const MAX_OPS: usize = 96;

struct Fixture {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// A client that holds the server's chain (RFC 7924 cached_info).
    client_cached: Arc<ClientConfig>,
    addrs: [SocketAddr; ADDRS],
    server_addr: SocketAddr,
}

fn verifier() -> ChainVerifier {
    Arc::new(|chain: &[Vec<u8>]| match chain.first() {
        Some(leaf) if leaf.len() > 100 => Ok(Verified {
            identity: leaf.clone(),
            context: None,
            leaf: None,
        }),
        _ => Err(CertError::BadCertificate("short".into())),
    })
}

/// A stand-in C509 codec: a marker byte in front of the DER.
fn toy_c509() -> est_dtls::C509Codec {
    est_dtls::C509Codec {
        type_code: 224,
        to_der: Arc::new(|c: &[u8]| match c.split_first() {
            Some((0xC5, der)) => Ok(der.to_vec()),
            _ => Err("not C509".into()),
        }),
        from_der: Arc::new(|d: &[u8]| Ok([&[0xC5][..], d].concat())),
    }
}

fn cred(name: &str) -> (Vec<Vec<u8>>, Arc<SigningKey>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let signing = SigningKey::from_pkcs8(&key.serialize_der()).expect("pkcs8");
    (vec![cert.der().to_vec()], Arc::new(signing))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (chain, key) = cred("server.fuzz");
        let server_chain = chain.clone();
        let mut sc = ServerConfig::new(chain, key, verifier());
        // Small limits, so that the fuzzer can reach them.
        sc.limits.max_half_open = 2;
        sc.limits.max_half_open_per_ip = 2;
        sc.limits.max_sessions = 3;
        sc.limits.max_sessions_per_ip = 2;
        sc.limits.max_sessions_per_identity = 2;
        sc.limits.max_handshake_message_bytes = 4096;
        sc.cid_length = 4;
        sc.c509 = Some(toy_c509());
        sc.validate().expect("server config");
        let (chain, key) = cred("meter.fuzz");
        let mut cc = ClientConfig::new(chain, key, verifier());
        cc.connection_id = Some(Vec::new());
        let mut cached = cc.clone();
        cached.cached_server_chains = vec![server_chain];
        cached.c509 = Some(toy_c509());
        cached.lean_hello = true;
        Fixture {
            server: Arc::new(sc),
            client: Arc::new(cc),
            client_cached: Arc::new(cached),
            addrs: [
                "10.0.0.1:1000".parse().expect("addr"),
                "10.0.0.1:2000".parse().expect("addr"),
                "10.0.0.2:1000".parse().expect("addr"),
                "[2001:db8::1]:1000".parse().expect("addr"),
            ],
            server_addr: "10.9.9.9:5684".parse().expect("addr"),
        }
    })
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// Up to three (position, xor) edits applied to `d`.
    fn mutate(&mut self, d: &mut [u8]) {
        let k = self.byte().unwrap_or(0) % 4;
        for _ in 0..k {
            let e = self.bytes(3);
            if let ([hi, lo, x], false) = (e, d.is_empty()) {
                let pos = usize::from(u16::from_be_bytes([*hi, *lo])) % d.len();
                d[pos] ^= *x;
            }
        }
    }
}

struct World {
    now: Instant,
    ep: Endpoint,
    clients: Vec<Option<Client>>,
    /// The address each client sends from.
    addr_of: [usize; ADDRS],
    to_server: Vec<VecDeque<Vec<u8>>>,
    to_client: Vec<VecDeque<Vec<u8>>>,
    /// Handles the endpoint has announced and not closed.
    live: HashSet<ConnectionHandle>,
    /// Every handle the endpoint has ever mentioned.
    seen: HashSet<ConnectionHandle>,
}

impl World {
    fn pump(&mut self) {
        let f = fixture();
        while let Some(t) = self.ep.poll_transmit() {
            if let Some(i) = f.addrs.iter().position(|a| *a == t.destination) {
                push(&mut self.to_client[i], t.payload);
            }
        }
        for (i, c) in self.clients.iter_mut().enumerate() {
            if let Some(c) = c {
                while let Some(d) = c.poll_transmit() {
                    push(&mut self.to_server[i], d);
                }
                while c.poll_event().is_some() {}
            }
        }
        while let Some(e) = self.ep.poll_event() {
            match e {
                Event::Connected(h) => {
                    assert!(self.live.insert(h), "connected twice");
                    self.seen.insert(h);
                }
                Event::Data(h, _) | Event::AddressChanged { conn: h, .. } => {
                    assert!(self.live.contains(&h), "event for an unknown connection");
                }
                Event::Closed(h, _) => {
                    self.live.remove(&h);
                    self.seen.insert(h);
                }
            }
        }
        let g = self.ep.gauges();
        let l = &fixture().server.limits;
        assert!(g.half_open <= l.max_half_open, "{g:?}");
        assert!(g.half_open + g.established <= l.max_sessions, "{g:?}");
        assert!(g.timers <= g.half_open + g.established, "{g:?}");
        assert_eq!(g.established, self.live.len(), "{g:?}");
        for h in &self.live {
            assert!(self.ep.connection(*h).is_some());
        }
    }
}

fn push(q: &mut VecDeque<Vec<u8>>, d: Vec<u8>) {
    if q.len() >= QUEUE_CAP {
        q.pop_front();
    }
    q.push_back(d);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let start = Instant::now();
    let mut w = World {
        now: start,
        ep: Endpoint::new(f.server.clone(), start).expect("endpoint"),
        clients: (0..ADDRS).map(|_| None).collect(),
        addr_of: [0, 1, 2, 3],
        to_server: vec![VecDeque::new(); ADDRS],
        to_client: vec![VecDeque::new(); ADDRS],
        live: HashSet::new(),
        seen: HashSet::new(),
    };
    w.clients[0] = Client::connect(start, f.server_addr, f.client.clone()).ok();
    w.pump();
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = input.byte() else { break };
        let a = usize::from(input.byte().unwrap_or(0)) % ADDRS;
        match op % 8 {
            0 => {
                // 40 ms steps up to ~5 s; the top opcodes jump 30 s to 10 min (idle and
                // handshake timeouts, final-flight retention, cookie rotation).
                let x = a as u64 + 4 * u64::from(op / 8);
                w.now += if x >= 128 {
                    Duration::from_secs(30 * (x - 127))
                } else {
                    Duration::from_millis(40 * x)
                };
                w.ep.handle_timeout(w.now);
                for c in w.clients.iter_mut().flatten() {
                    c.handle_timeout(w.now);
                }
            }
            1 => {
                if let Some(mut d) = w.to_server[a].pop_front() {
                    input.mutate(&mut d);
                    w.ep.handle(w.now, f.addrs[w.addr_of[a]], &d);
                }
            }
            2 => {
                if let Some(mut d) = w.to_client[a].pop_front() {
                    input.mutate(&mut d);
                    let at = w.addr_of.iter().position(|x| *x == a);
                    if let Some(c) = at.and_then(|i| w.clients[i].as_mut()) {
                        c.handle_datagram(w.now, f.server_addr, &d);
                    }
                }
            }
            3 => {
                let n = usize::from(input.byte().unwrap_or(0));
                let d = input.bytes(n).to_vec();
                w.ep.handle(w.now, f.addrs[a], &d);
            }
            4 => {
                let config = if a % 2 == 1 {
                    &f.client_cached
                } else {
                    &f.client
                };
                w.clients[a] = Client::connect(w.now, f.server_addr, config.clone()).ok();
                w.to_client[w.addr_of[a]].clear();
            }
            5 => {
                if let Some(c) = &mut w.clients[a] {
                    if c.is_established() {
                        let _ = c.send(w.now, b"GET /crts");
                    }
                }
                let live: Vec<_> = w.live.iter().copied().collect();
                for h in live {
                    let to_a =
                        w.ep.connection(h)
                            .is_some_and(|c| c.peer() == f.addrs[w.addr_of[a]]);
                    if to_a {
                        let _ = w.ep.send(w.now, h, b"2.05");
                    }
                }
            }
            6 => {
                if let Some(c) = &mut w.clients[a] {
                    c.close();
                }
            }
            _ => {
                w.addr_of[a] = usize::from(input.byte().unwrap_or(0)) % ADDRS;
            }
        }
        w.pump();
    }
    // Everything ends: shut down, nothing left.
    w.ep.shutdown(w.now);
    w.pump();
    let g = w.ep.gauges();
    assert_eq!((g.half_open, g.established, g.timers), (0, 0, 0), "{g:?}");
});
