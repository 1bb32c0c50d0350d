//! Fuzz target: an EST-coaps session (`est_proto::session::EstSession`, the object est-server
//! drives per DTLS session) fed arbitrary datagrams, with the commits it asks for completed
//! late, early, successfully or not.
//!
//! Input format: a sequence of `[len: u8][control: u8][datagram: len bytes]` records. Each
//! record advances virtual time by `control²` × 4 ms (0 to ~260 s, so both the slow-commit empty
//! ACK at 1 s and EXCHANGE_LIFETIME at 247 s are reached), then delivers the datagram. Bit 0 of
//! `control` set completes every outstanding commit after the datagram, bit 1 set completes
//! them with a store failure, else as committed (an issuance raced by a retry: bit 2).
//!
//! Invariants: no panic; every datagram the session emits (answers, empty ACKs, separate
//! responses and their retransmissions) is a valid CoAP message; Block1 reassembly, the dedup
//! cache and the pending set stay within their limits; the session never holds more commits
//! than the enrollment gate admits; when it is dropped, the admissions still held are exactly
//! the tickets of commits not yet reported, and none once those are dropped.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use est_proto::ca::{self, IssuingCa, ObjectIdentifier, RingP256Signer};
use est_proto::coap::CoapConfig;
use est_proto::est::{EstConfig, EstService};
use est_proto::policy::{Policy, PolicyConfig};
use est_proto::session::{CommitId, CommitTicket, EstSession, Event, Peer};
use est_proto::store::{Commit, CommitOutcome, MemoryStore, StoreError};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const MAX_BODY: usize = 2048;
const MAX_ENROLLMENTS: usize = 2;

struct World {
    service: Arc<EstService>,
    coap: Arc<CoapConfig>,
    /// An IDevID the policy accepts, so that enrollments reach the CSR checks and commits.
    chain: Vec<Vec<u8>>,
}

fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The service is built once (CA generation is slow); its store is never written (the
/// harness decides the commits' outcomes), so iterations do not accumulate state.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let year = Duration::from_secs(365 * 86_400);
        let start = wall() - year;
        let root = |name: &str, rng: &mut ChaCha20Rng| {
            let (cert, key) =
                ca::generate_root_ca(name, "fuzz", start, 10 * year, rng).expect("CA");
            IssuingCa::new(
                cert,
                Box::new(RingP256Signer::from_pkcs8_der(&key).expect("key")),
            )
            .expect("CA")
        };
        let maker = root("Fuzz Maker CA", &mut rng);
        let issuing = root("Fuzz Issuing CA", &mut rng);
        let hw = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");
        let (idevid, _) =
            ca::mint_idevid(&maker, "SN1", hw, start, start + 5 * year, &mut rng).expect("IDevID");
        let policy = Policy::new(
            PolicyConfig::default(),
            &[maker.certificate_der().to_vec()],
            issuing.certificate_der(),
        )
        .expect("policy");
        let est = EstConfig {
            max_concurrent_enrollments: MAX_ENROLLMENTS,
            ..EstConfig::default()
        };
        let service =
            EstService::new(est, issuing, policy, Arc::new(MemoryStore::new())).expect("service");
        World {
            service: Arc::new(service),
            coap: Arc::new(CoapConfig {
                max_request_body_bytes: MAX_BODY,
                ..CoapConfig::default()
            }),
            chain: vec![idevid],
        }
    })
}

fn check(bytes: &[u8]) {
    assert!(
        coap_lite::Packet::from_bytes(bytes).is_ok(),
        "emitted an invalid datagram"
    );
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let max_dedup = w.coap.max_dedup_entries;
    let max_pending = w.coap.max_pending_requests;
    let peer = Peer {
        address: "192.0.2.1:40000".into(),
        relay: None,
        chain: Arc::new(w.chain.clone()),
        verified: None,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(data.len() as u64);
    let mut session = EstSession::new(w.service.clone(), w.coap.clone(), peer, &mut rng);
    let t0 = Instant::now();
    let mut now = t0;
    let mut outstanding: Vec<(CommitId, Commit, CommitTicket)> = Vec::new();
    let mut rest = data;
    while let [len, control, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        let control = *control;
        now += Duration::from_millis(u64::from(control) * u64::from(control) * 4);
        if session.poll_timeout().is_some_and(|t| t <= now) {
            session.handle_timeout(now);
        }
        session.handle_datagram(now, wall(), datagram);
        while let Some(Event::Commit { id, commit, ticket }) = session.poll_event() {
            outstanding.push((id, commit, ticket));
        }
        assert!(
            outstanding.len() <= MAX_ENROLLMENTS,
            "more commits than admissions"
        );
        if control & 1 == 1 {
            for (id, commit, _ticket) in outstanding.drain(..) {
                let result = if control & 2 == 2 {
                    Err(StoreError::Backend("fuzz: store down".into()))
                } else {
                    match commit {
                        Commit::Issuance { cert, .. } if control & 4 == 4 => {
                            Ok(CommitOutcome::AlreadyIssued(*cert))
                        }
                        _ => Ok(CommitOutcome::Committed),
                    }
                };
                session.complete_commit(now, id, result);
            }
            // A raced issuance asks for its replay's audit row next.
            while let Some(Event::Commit { id, commit, ticket }) = session.poll_event() {
                outstanding.push((id, commit, ticket));
            }
        }
        while let Some(bytes) = session.poll_transmit() {
            check(&bytes);
        }
        let stats = session.coap_stats();
        assert!(stats.reassembly_bytes <= MAX_BODY);
        assert!(stats.dedup_entries <= max_dedup);
        assert!(stats.pending_requests <= max_pending);
        assert_eq!(session.stats().commits_waiting, outstanding.len());
    }
    // Commits the store has not reported yet keep their admissions after the session ends.
    drop(session);
    assert_eq!(w.service.in_flight(), outstanding.len());
    drop(outstanding);
    assert_eq!(
        w.service.in_flight(),
        0,
        "an admission permit outlived its commit"
    );
});
