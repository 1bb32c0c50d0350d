//! The whole system on virtual time, in one thread: 1,000 meters (client-sim's meter state
//! machine with est-proto's CoAP client), each behind its own lossy link (client-sim's link
//! emulator, 20% loss each way), the server core (one `est_proto::session::EstSession` per
//! session, sharing one `EstService` and its enrollment gate) and an in-memory store whose
//! commits take time, are sometimes slow (the empty ACK, then a separate response) and fail
//! during an outage (5.03 + Max-Age). DTLS is not in the loop: a session "connects" after a
//! seeded handshake delay and carries plaintext CoAP datagrams. Everything is seeded
//! (`EST_SIM_SEED` picks another run) and runs on virtual time; the wall time is seconds.
//!
//! What must hold: every meter enrolls, and the store holds exactly one certificate per
//! meter, the one the meter received, committed once; every admission permit comes back.
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client_sim::link::{LinkDirection, LinkParams, Verdict};
use client_sim::meter::{Action, Meter, MeterConfig, MeterState};
use client_sim::pki::DeviceIdentity;
use est_proto::ca::{self, IssuingCa, ObjectIdentifier, RingP256Signer};
use est_proto::coap::{Client, ClientConfig, ClientEvent, CoapConfig};
use est_proto::est::{EstConfig, EstService};
use est_proto::policy::{Policy, PolicyConfig};
use est_proto::session::{CommitId, CommitTicket, EstSession, Event, Peer};
use est_proto::store::{CertStatus, Commit, MemoryStore, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const METERS: usize = 1000;
const LINK: &str = "loss=0.2,latency=150ms,jitter=100ms";
/// Meters start uniformly over this span.
const START_SPREAD: Duration = Duration::from_secs(30);
/// Commits that complete in this window fail (the store is unreachable).
const OUTAGE: (Duration, Duration) = (Duration::from_secs(12), Duration::from_secs(17));
/// Small, so that bursts of enrollments meet the gate (5.03 + Max-Age).
const MAX_CONCURRENT_ENROLLMENTS: usize = 8;

fn wall_at_start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Something that happens to one meter's world at a virtual instant.
enum What {
    Start,
    /// The DTLS handshake of session `generation` finished, with this client chain.
    Connected {
        generation: u64,
        chain: Vec<Vec<u8>>,
    },
    ToServer {
        generation: u64,
        data: Vec<u8>,
    },
    ToMeter {
        generation: u64,
        data: Vec<u8>,
    },
    /// The store finishes the commit session `generation` asked for (and drops its ticket).
    CommitDone {
        generation: u64,
        id: CommitId,
        commit: Commit,
        ticket: CommitTicket,
    },
    /// A timer of the meter, its CoAP client or its server session may be due.
    Wake,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    meter: usize,
    what: What,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// One meter and everything on its path to the server core.
struct Slot {
    meter: Meter,
    up: LinkDirection,
    down: LinkDirection,
    /// Incremented by every Connect: datagrams and completions of older sessions are dropped.
    generation: u64,
    client: Option<Client>,
    server: Option<EstSession>,
    wake_at: Option<Instant>,
}

struct World {
    t0: Instant,
    seed: u64,
    service: Arc<EstService>,
    store: Arc<MemoryStore>,
    coap: Arc<CoapConfig>,
    slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    /// Handshake delays, commit latencies and the sessions' seeds.
    rng: StdRng,
    commits_failed: u64,
    /// Requests the server sessions acknowledged with an empty ACK (slow commits).
    slow_commit_acks: u64,
    steps: u64,
}

impl World {
    fn schedule(&mut self, at: Instant, meter: usize, what: What) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            meter,
            what,
        }));
    }

    fn wall(&self, now: Instant) -> SystemTime {
        wall_at_start() + now.saturating_duration_since(self.t0)
    }

    /// A store's commit latency: a few milliseconds, now and then seconds (a slow disk).
    fn commit_latency(&mut self) -> Duration {
        if self.rng.gen_bool(0.05) {
            Duration::from_millis(self.rng.gen_range(1500..3000))
        } else {
            Duration::from_millis(self.rng.gen_range(2..30))
        }
    }

    fn run(&mut self) {
        while let Some(Reverse(ev)) = self.queue.pop() {
            self.steps += 1;
            assert!(
                self.steps < 20_000_000,
                "seed {}: the simulation does not settle",
                self.seed
            );
            let (now, i) = (ev.at, ev.meter);
            match ev.what {
                What::Start => self.slots[i].meter.start(now),
                What::Connected { generation, chain } => self.connected(now, i, generation, chain),
                What::ToServer { generation, data } => {
                    let wall = self.wall(now);
                    let slot = &mut self.slots[i];
                    if slot.generation == generation {
                        if let Some(s) = slot.server.as_mut() {
                            s.handle_datagram(now, wall, &data);
                        }
                    }
                }
                What::ToMeter { generation, data } => {
                    let slot = &mut self.slots[i];
                    if slot.generation == generation {
                        if let Some(c) = slot.client.as_mut() {
                            c.handle_datagram(now, &data);
                        }
                    }
                }
                What::CommitDone {
                    generation,
                    id,
                    commit,
                    ticket,
                } => {
                    // The store finishes whether or not the session still exists (the
                    // meter may have given up on it): a durable certificate the meter
                    // never received, which its retry must get back, not a second one.
                    let since_start = now.saturating_duration_since(self.t0);
                    let result = if (OUTAGE.0..OUTAGE.1).contains(&since_start) {
                        self.commits_failed += 1;
                        Err(StoreError::Backend("simulated outage".into()))
                    } else {
                        self.store.commit(&commit)
                    };
                    drop(ticket);
                    let slot = &mut self.slots[i];
                    if slot.generation == generation {
                        if let Some(s) = slot.server.as_mut() {
                            s.complete_commit(now, id, result);
                        }
                    }
                }
                What::Wake => {
                    let slot = &mut self.slots[i];
                    slot.wake_at = None;
                    slot.meter.handle_timeout(now);
                    if let Some(c) = slot.client.as_mut() {
                        c.handle_timeout(now);
                    }
                    if let Some(s) = slot.server.as_mut() {
                        if s.poll_timeout().is_some_and(|t| t <= now) {
                            s.handle_timeout(now);
                        }
                    }
                }
            }
            self.pump(now, i);
        }
    }

    fn connected(&mut self, now: Instant, i: usize, generation: u64, chain: Vec<Vec<u8>>) {
        if self.slots[i].generation != generation {
            return;
        }
        // As the daemon's handshake verifier does: the chain is validated once, here.
        let verified = self
            .service
            .policy()
            .verify_peer_chain(&chain, self.wall(now))
            .ok()
            .map(Arc::new);
        let peer = Peer {
            address: format!("10.{}.{}.1:5684", i / 256, i % 256),
            relay: None,
            chain: Arc::new(chain),
            verified,
        };
        let server = EstSession::new(self.service.clone(), self.coap.clone(), peer, &mut self.rng);
        let client_seed = self.rng.gen();
        let slot = &mut self.slots[i];
        slot.server = Some(server);
        slot.client = Some(Client::new(ClientConfig::default(), client_seed));
        slot.meter.handle_connected(now);
    }

    /// Carries out whatever meter `i`'s world asks for at `now`, until nothing moves.
    fn pump(&mut self, now: Instant, i: usize) {
        loop {
            let mut moved = false;
            let mut out: Vec<(Instant, What)> = Vec::new();
            let mut commits: Vec<(CommitId, Commit, CommitTicket)> = Vec::new();
            let mut retired = 0;
            let slot = &mut self.slots[i];
            while let Some(action) = slot.meter.poll_action() {
                moved = true;
                match action {
                    Action::Connect { credential, .. } => {
                        slot.generation += 1;
                        slot.client = None;
                        retired += slot.server.take().map_or(0, |s| s.stats().slow_commit_acks);
                        out.push((
                            now,
                            What::Connected {
                                generation: slot.generation,
                                chain: credential.chain_der,
                            },
                        ));
                    }
                    Action::Send(request) => {
                        if let Some(c) = slot.client.as_mut() {
                            c.start(now, request).expect("one request at a time");
                        }
                    }
                    Action::Disconnect => {
                        // Dropping the server session drops what it waits for (and returns
                        // its admission permits); its commits still complete in the store.
                        slot.client = None;
                        retired += slot.server.take().map_or(0, |s| s.stats().slow_commit_acks);
                    }
                }
            }
            let generation = slot.generation;
            if let Some(c) = slot.client.as_mut() {
                while let Some(data) = c.poll_transmit() {
                    if let Verdict::Deliver { at } = slot.up.submit(now, data.len()) {
                        out.push((at, What::ToServer { generation, data }));
                    }
                }
                while let Some(ev) = c.poll_event() {
                    moved = true;
                    match ev {
                        ClientEvent::Response(r) => slot.meter.handle_response(now, r),
                        ClientEvent::Failed(e) => slot.meter.handle_request_failed(now, e),
                    }
                }
            }
            if let Some(s) = slot.server.as_mut() {
                while let Some(data) = s.poll_transmit() {
                    if let Verdict::Deliver { at } = slot.down.submit(now, data.len()) {
                        out.push((at, What::ToMeter { generation, data }));
                    }
                }
                while let Some(Event::Commit { id, commit, ticket }) = s.poll_event() {
                    commits.push((id, commit, ticket));
                }
            }
            self.slow_commit_acks += retired;
            for (at, what) in out {
                // A Connected event is scheduled after the handshake's delay.
                let at = match what {
                    What::Connected { .. } => {
                        at + Duration::from_millis(self.rng.gen_range(1500..5000))
                    }
                    _ => at,
                };
                self.schedule(at, i, what);
            }
            for (id, commit, ticket) in commits {
                let at = now + self.commit_latency();
                self.schedule(
                    at,
                    i,
                    What::CommitDone {
                        generation,
                        id,
                        commit,
                        ticket,
                    },
                );
            }
            if !moved {
                break;
            }
        }
        let slot = &mut self.slots[i];
        let next = [
            slot.meter.poll_timeout(),
            slot.client.as_ref().and_then(Client::poll_timeout),
            slot.server.as_ref().and_then(EstSession::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(at) = next {
            if slot.wake_at.is_none_or(|w| at < w) {
                slot.wake_at = Some(at);
                self.schedule(at.max(now), i, What::Wake);
            }
        }
    }
}

#[test]
fn a_thousand_meters_enroll_over_20_percent_loss_each_certificate_committed_once() {
    let seed = std::env::var("EST_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_u64);
    let began = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let year = Duration::from_secs(365 * 86_400);
    let nb = wall_at_start() - year;
    let root = |name: &str, rng: &mut StdRng| {
        let (cert, key) = ca::generate_root_ca(name, "sim", nb, 10 * year, rng).expect("CA");
        IssuingCa::new(
            cert,
            Box::new(RingP256Signer::from_pkcs8_der(&key).expect("key")),
        )
        .expect("CA")
    };
    let maker = root("Sim Maker CA", &mut rng);
    let issuing = root("Sim Issuing CA", &mut rng);
    let policy = Policy::new(
        PolicyConfig::default(),
        &[maker.certificate_der().to_vec()],
        issuing.certificate_der(),
    )
    .expect("policy");
    let store = Arc::new(MemoryStore::new());
    let est = EstConfig {
        max_concurrent_enrollments: MAX_CONCURRENT_ENROLLMENTS,
        ..EstConfig::default()
    };
    let service = Arc::new(EstService::new(est, issuing, policy, store.clone()).expect("service"));
    let link: LinkParams = LINK.parse().expect("link");
    let meter_config = MeterConfig {
        max_attempts: 8,
        retry_backoff: Duration::from_secs(5),
        ..MeterConfig::default()
    };
    let hw = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");
    let mut slots = Vec::with_capacity(METERS);
    for i in 0..METERS {
        let serial = format!("SIM{i:05}");
        let (cert, key) =
            ca::mint_idevid(&maker, &serial, hw, nb, nb + 10 * year, &mut rng).expect("IDevID");
        let identity = DeviceIdentity {
            serial,
            cert_chain_der: vec![cert],
            key_pkcs8_der: key,
        };
        let meter_seed = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        slots.push(Slot {
            meter: Meter::new(meter_config.clone(), &identity, meter_seed).expect("meter"),
            up: LinkDirection::new(link.clone(), meter_seed ^ 1),
            down: LinkDirection::new(link.clone(), meter_seed ^ 2),
            generation: 0,
            client: None,
            server: None,
            wake_at: None,
        });
    }
    let t0 = Instant::now();
    let mut world = World {
        t0,
        seed,
        service: service.clone(),
        store: store.clone(),
        coap: Arc::new(CoapConfig::default()),
        slots,
        queue: BinaryHeap::new(),
        seq: 0,
        rng: StdRng::seed_from_u64(seed ^ 0xabcd),
        commits_failed: 0,
        slow_commit_acks: 0,
        steps: 0,
    };
    for i in 0..METERS {
        let at = t0 + START_SPREAD.mul_f64(world.rng.gen_range(0.0..1.0));
        world.schedule(at, i, What::Start);
    }
    world.run();

    // Every meter enrolled, with the certificate the store holds for it, committed once.
    let certs = store.certificates();
    let mut lost = 0;
    let mut frames = 0;
    let mut retries = 0;
    for (i, slot) in world.slots.iter().enumerate() {
        let serial = slot.meter.serial();
        assert_eq!(
            slot.meter.state(),
            &MeterState::Enrolled,
            "seed {seed}: meter {i} ({serial}) did not enroll"
        );
        let mine: Vec<_> = certs.iter().filter(|c| c.device_id == serial).collect();
        assert_eq!(
            mine.len(),
            1,
            "seed {seed}: {serial} has {} certificates",
            mine.len()
        );
        assert_eq!(mine[0].status, CertStatus::Active);
        assert_eq!(
            Some(mine[0].der.as_slice()),
            slot.meter.ldevid(),
            "seed {seed}: {serial} holds another certificate than the store's"
        );
        lost += slot.up.counters().lost + slot.down.counters().lost;
        frames += slot.up.counters().datagrams + slot.down.counters().datagrams;
        retries += u64::from(slot.meter.stats().session_retries);
    }
    assert_eq!(certs.len(), METERS, "seed {seed}");
    let issued_rows = store
        .audit_events()
        .iter()
        .filter(|a| a.outcome == "issued")
        .count();
    assert_eq!(
        issued_rows, METERS,
        "seed {seed}: one `issued` audit row each"
    );
    assert_eq!(
        service.in_flight(),
        0,
        "seed {seed}: a permit was not returned"
    );
    let slow_commit_acks = world.slow_commit_acks
        + world
            .slots
            .iter()
            .filter_map(|s| s.server.as_ref())
            .map(|s| s.stats().slow_commit_acks)
            .sum::<u64>();
    let c = service.counters();
    let slowest = world
        .slots
        .iter()
        .filter_map(|s| s.meter.stats().enroll_us)
        .max()
        .map(Duration::from_micros);
    let busy: u64 = world
        .slots
        .iter()
        .map(|s| u64::from(s.meter.stats().busy_retries))
        .sum();
    println!(
        "seed {seed}: {METERS} meters enrolled in {:.1} s of wall time; {} events, {frames} \
         datagrams, {lost} lost, {retries} session retries; issued {}, replayed {}, 5.03 \
         overloaded {}, 5.03 store {} ({} commits failed), {busy} 5.03 waits honoured, {slow_commit_acks} slow commits acknowledged \
         empty, refused {}; \
         slowest enrollment {:?} of virtual time",
        began.elapsed().as_secs_f64(),
        world.steps,
        c.issued,
        c.replayed,
        c.overloaded,
        c.store_unavailable,
        world.commits_failed,
        c.refused,
        slowest,
    );
    // The paths this test is for were taken (the counts depend on the seed, not whether).
    assert_eq!(c.issued, METERS as u64, "seed {seed}");
    assert!(lost > frames / 10, "seed {seed}: the link must lose ~20%");
    assert!(c.replayed > 0, "seed {seed}: no lost answer was replayed");
    assert!(c.overloaded > 0, "seed {seed}: the gate never refused");
    assert!(
        c.store_unavailable > 0,
        "seed {seed}: the outage was not seen"
    );
    assert!(
        slow_commit_acks > 0,
        "seed {seed}: no slow commit was answered separately"
    );
    assert_eq!(c.refused, 0, "seed {seed}");
}
