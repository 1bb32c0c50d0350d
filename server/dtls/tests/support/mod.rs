//! Test PKI and an in-memory network on virtual time for the engine's tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test support shared by several test binaries (not each uses every helper); a panic is the test failing"
)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use est_dtls::{
    CertError, ChainVerifier, Client, ClientConfig, ConnEvent, Endpoint, Event, PeerAddr,
    ServerConfig, SigningKey, Verified,
};

pub(crate) struct Cred {
    pub chain: Vec<Vec<u8>>,
    pub key_der: Vec<u8>,
}

pub(crate) struct Pki {
    pub ca_der: Vec<u8>,
    pub server: Cred,
    pub clients: Vec<Cred>,
    ca_key: rcgen::KeyPair,
    ca_cert: rcgen::Certificate,
}

fn leaf(
    name: &str,
    alg: &'static rcgen::SignatureAlgorithm,
    ca_cert: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> Cred {
    leaf_with_key_usages(name, alg, ca_cert, ca_key, Vec::new())
}

fn leaf_with_key_usages(
    name: &str,
    alg: &'static rcgen::SignatureAlgorithm,
    ca_cert: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    key_usages: Vec<rcgen::KeyUsagePurpose>,
) -> Cred {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = key_usages;
    let cert = params.signed_by(&key, ca_cert, ca_key).unwrap();
    Cred {
        chain: vec![cert.der().to_vec(), ca_cert.der().to_vec()],
        key_der: key.serialize_der(),
    }
}

impl Pki {
    pub(crate) fn new(clients: usize) -> Pki {
        Self::with_server_alg(clients, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    pub(crate) fn with_server_alg(clients: usize, alg: &'static rcgen::SignatureAlgorithm) -> Pki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let server = leaf("server.test", alg, &ca_cert, &ca_key);
        let clients = (0..clients)
            .map(|i| {
                leaf(
                    &format!("meter-{i}"),
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                    &ca_cert,
                    &ca_key,
                )
            })
            .collect();
        Pki {
            ca_der: ca_cert.der().to_vec(),
            server,
            clients,
            ca_key,
            ca_cert,
        }
    }

    pub(crate) fn extra_client(&self, name: &str) -> Cred {
        leaf(
            name,
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &self.ca_cert,
            &self.ca_key,
        )
    }

    /// Another client certificate of our CA, with this keyUsage (none when empty).
    pub(crate) fn client_with_key_usages(
        &self,
        name: &str,
        key_usages: Vec<rcgen::KeyUsagePurpose>,
    ) -> Cred {
        leaf_with_key_usages(
            name,
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &self.ca_cert,
            &self.ca_key,
            key_usages,
        )
    }

    /// A client configuration with credentials `c`.
    pub(crate) fn config_for(&self, c: &Cred) -> ClientConfig {
        let key = Arc::new(SigningKey::from_pkcs8(&c.key_der).unwrap());
        ClientConfig::new(c.chain.clone(), key, self.verifier())
    }

    /// Accepts chains whose second element is our CA (the test verifier: the engine's job is
    /// to call it and act on its answer; real path validation is the policy's, tested there).
    pub(crate) fn verifier(&self) -> ChainVerifier {
        let ca = self.ca_der.clone();
        Arc::new(move |chain: &[Vec<u8>]| {
            if chain.get(1) == Some(&ca) {
                Ok(Verified {
                    identity: chain[0].clone(),
                    context: None,
                    leaf: None,
                })
            } else {
                Err(CertError::UnknownCa("not our CA".into()))
            }
        })
    }

    pub(crate) fn server_config(&self) -> ServerConfig {
        let key = Arc::new(SigningKey::from_pkcs8(&self.server.key_der).unwrap());
        ServerConfig::new(self.server.chain.clone(), key, self.verifier())
    }

    pub(crate) fn client_config(&self, i: usize) -> ClientConfig {
        let c = &self.clients[i];
        let key = Arc::new(SigningKey::from_pkcs8(&c.key_der).unwrap());
        ClientConfig::new(c.chain.clone(), key, self.verifier())
    }
}

/// A tiny deterministic PRNG for loss decisions.
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub(crate) const SERVER: &str = "10.0.0.1:5684";

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(crate) fn client_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 40000))
}

/// Rewrites a datagram in flight: (to the server?, client index, datagram) → the datagrams
/// delivered instead (none: dropped).
pub(crate) type Filter = Box<dyn FnMut(bool, usize, Vec<u8>) -> Vec<Vec<u8>>>;

/// One endpoint and many clients joined by a lossy in-memory network on virtual time.
pub(crate) struct Net {
    pub now: Instant,
    pub server: Endpoint,
    pub clients: Vec<Client>,
    /// Address each client currently sends from.
    pub client_addrs: Vec<SocketAddr>,
    /// For a client behind a stateless join proxy: the JPY header the proxy gives it (its
    /// datagrams then reach the server from `client_addrs[i]`, the proxy, with that header).
    pub client_relay: Vec<Option<Vec<u8>>>,
    pub loss: f64,
    pub rng: Lcg,
    pub server_events: Vec<Event>,
    pub client_events: Vec<Vec<ConnEvent>>,
    pub delivered: usize,
    pub dropped: usize,
    /// Datagrams in flight: (deliver at, to server?, client index, from, bytes).
    queue: VecDeque<(Instant, bool, usize, PeerAddr, Vec<u8>)>,
    pub latency: Duration,
    /// Every datagram sent over the network, as sent (before loss and `filter`): (to the
    /// server?, client index, bytes).
    pub log: Vec<(bool, usize, Vec<u8>)>,
    /// An on-path attacker or a broken middlebox.
    pub filter: Option<Filter>,
    /// Every datagram the server sent to a client, with its destination.
    pub server_log: Vec<est_dtls::Transmit>,
}

impl Net {
    pub(crate) fn new(server: ServerConfig, seed: u64, loss: f64) -> Net {
        let now = Instant::now();
        Net {
            now,
            server: Endpoint::new(Arc::new(server), now).unwrap(),
            clients: Vec::new(),
            client_addrs: Vec::new(),
            client_relay: Vec::new(),
            loss,
            rng: Lcg(seed),
            server_events: Vec::new(),
            client_events: Vec::new(),
            delivered: 0,
            dropped: 0,
            queue: VecDeque::new(),
            latency: Duration::from_millis(5),
            log: Vec::new(),
            filter: None,
            server_log: Vec::new(),
        }
    }

    pub(crate) fn add_client(&mut self, config: ClientConfig) -> usize {
        let i = self.clients.len();
        let c = Client::connect(self.now, addr(SERVER), Arc::new(config)).unwrap();
        self.clients.push(c);
        self.client_addrs.push(client_addr(i));
        self.client_relay.push(None);
        self.client_events.push(Vec::new());
        i
    }

    /// A client behind a join proxy at `proxy` that gives it `header`.
    pub(crate) fn add_relayed_client(
        &mut self,
        config: ClientConfig,
        proxy: SocketAddr,
        header: Vec<u8>,
    ) -> usize {
        let i = self.add_client(config);
        self.client_addrs[i] = proxy;
        self.client_relay[i] = Some(header);
        i
    }

    /// Who the server sees client `i` as.
    pub(crate) fn peer_of(&self, i: usize) -> PeerAddr {
        match &self.client_relay[i] {
            Some(h) => PeerAddr::relayed(self.client_addrs[i], h),
            None => PeerAddr::Direct(self.client_addrs[i]),
        }
    }

    fn lose(&mut self) -> bool {
        self.loss > 0.0 && self.rng.next_f64() < self.loss
    }

    /// Logs a datagram, then passes it through the filter.
    fn pass(&mut self, to_server: bool, i: usize, d: Vec<u8>) -> Vec<Vec<u8>> {
        self.log.push((to_server, i, d.clone()));
        match &mut self.filter {
            Some(f) => f(to_server, i, d),
            None => vec![d],
        }
    }

    /// Moves every pending datagram into the queue.
    fn collect(&mut self) {
        for i in 0..self.clients.len() {
            while let Some(d) = self.clients[i].poll_transmit() {
                if self.lose() {
                    self.dropped += 1;
                    continue;
                }
                let from = self.peer_of(i);
                for d in self.pass(true, i, d) {
                    self.queue
                        .push_back((self.now + self.latency, true, i, from.clone(), d));
                }
            }
        }
        while let Some(t) = self.server.poll_transmit() {
            if self.lose() {
                self.dropped += 1;
                continue;
            }
            if let Some(i) = (0..self.clients.len()).find(|&i| self.peer_of(i) == t.destination) {
                self.server_log.push(t.clone());
                for d in self.pass(false, i, t.payload) {
                    self.queue.push_back((
                        self.now + self.latency,
                        false,
                        i,
                        PeerAddr::Direct(addr(SERVER)),
                        d,
                    ));
                }
            } else {
                self.dropped += 1;
            }
        }
        while let Some(e) = self.server.poll_event() {
            self.server_events.push(e);
        }
        for i in 0..self.clients.len() {
            while let Some(e) = self.clients[i].poll_event() {
                self.client_events[i].push(e);
            }
        }
    }

    /// Injects a datagram to the server from any address.
    pub(crate) fn inject(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.server.handle(self.now, from, bytes);
        self.collect_server_only();
    }

    /// Takes what the server wants to send without delivering it anywhere.
    pub(crate) fn take_server_transmits(&mut self) -> Vec<est_dtls::Transmit> {
        let mut v = Vec::new();
        while let Some(t) = self.server.poll_transmit() {
            v.push(t);
        }
        v
    }

    fn collect_server_only(&mut self) {
        while let Some(e) = self.server.poll_event() {
            self.server_events.push(e);
        }
    }

    /// Runs until `until` of virtual time has passed or nothing is left to do.
    pub(crate) fn run_for(&mut self, span: Duration) {
        let end = self.now + span;
        loop {
            self.collect();
            let next_msg = self.queue.iter().map(|q| q.0).min();
            let mut next = next_msg;
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    next = Some(next.map_or(t, |n: Instant| n.min(t)));
                }
            };
            consider(self.server.poll_timeout());
            for c in &self.clients {
                consider(c.poll_timeout());
            }
            let Some(t) = next else { break };
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            // deliver due datagrams
            let mut due = Vec::new();
            let mut rest = VecDeque::new();
            for q in self.queue.drain(..) {
                if q.0 <= self.now {
                    due.push(q);
                } else {
                    rest.push_back(q);
                }
            }
            self.queue = rest;
            for (_, to_server, i, from, bytes) in due {
                self.delivered += 1;
                if to_server {
                    self.server.handle(self.now, from, &bytes);
                } else {
                    self.clients[i].handle_datagram(self.now, from.socket_addr(), &bytes);
                }
            }
            self.server.handle_timeout(self.now);
            for c in &mut self.clients {
                c.handle_timeout(self.now);
            }
        }
        self.now = self.now.max(end);
    }

    pub(crate) fn client_connected(&self, i: usize) -> bool {
        self.clients[i].is_established()
    }

    pub(crate) fn server_connected_count(&self) -> usize {
        self.server_events
            .iter()
            .filter(|e| matches!(e, Event::Connected(_)))
            .count()
    }

    pub(crate) fn server_data(&self) -> Vec<Vec<u8>> {
        self.server_events
            .iter()
            .filter_map(|e| match e {
                Event::Data(_, d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn handle_of_client(&self, i: usize) -> Option<est_dtls::ConnectionHandle> {
        let a = self.peer_of(i);
        self.server_events.iter().rev().find_map(|e| match e {
            Event::Connected(h) if self.server.connection(*h).is_some_and(|c| c.peer() == a) => {
                Some(*h)
            }
            _ => None,
        })
    }

    pub(crate) fn counts(&self) -> HashMap<&'static str, u64> {
        let m = self.server.metrics();
        HashMap::from([
            ("hvr", m.hello_verify_sent),
            ("completed", m.handshakes_completed),
            ("refused", m.refused_total()),
        ])
    }
}
