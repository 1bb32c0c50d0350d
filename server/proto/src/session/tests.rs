//! The session object on virtual time, driven by est-proto's own CoAP client: the answer
//! waits for the commit, admission before any hand-off, both clocks injected.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coap_lite::{MessageType, Packet};
use der::Decode;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use x509_cert::Certificate;

use super::*;
use crate::ca::{self, IssuingCa, ObjectIdentifier, RingP256Signer};
use crate::coap::{
    Client, ClientConfig, ClientEvent, CoapConfig, Method, Request, Response, ResponseType,
};
use crate::est::{EstConfig, EstService, CF_PKCS10, CF_PKCS7_CERTS_ONLY};
use crate::policy::{Policy, PolicyConfig};
use crate::store::{Commit, CommitOutcome, MemoryStore, StoreError};

const DAY: Duration = Duration::from_secs(86_400);
const HW_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");

fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

struct Fixture {
    service: Arc<EstService>,
    store: Arc<MemoryStore>,
    maker: IssuingCa,
    rng: ChaCha20Rng,
}

fn fixture(est: EstConfig) -> Fixture {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let ca = |name: &str, rng: &mut ChaCha20Rng| {
        let (cert, key) = ca::generate_root_ca(name, "t", wall() - DAY, 3650 * DAY, rng).unwrap();
        IssuingCa::new(
            cert,
            Box::new(RingP256Signer::from_pkcs8_der(&key).unwrap()),
        )
        .unwrap()
    };
    let maker = ca("Maker CA", &mut rng);
    let issuing = ca("Issuing CA", &mut rng);
    let policy = Policy::new(
        PolicyConfig::default(),
        &[maker.certificate_der().to_vec()],
        issuing.certificate_der(),
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let dyn_store: Arc<dyn crate::store::Store> = store.clone();
    let service = Arc::new(EstService::new(est, issuing, policy, dyn_store).unwrap());
    Fixture {
        service,
        store,
        maker,
        rng,
    }
}

/// A meter: its session on the server side, the CoAP client on its side, and its CSR.
struct Meter {
    session: EstSession,
    client: Client,
    csr: Vec<u8>,
}

impl Fixture {
    fn meter(&mut self, serial: &str) -> Meter {
        let (idevid, _) = ca::mint_idevid(
            &self.maker,
            serial,
            HW_TYPE,
            wall() - DAY,
            wall() + 365 * DAY,
            &mut self.rng,
        )
        .unwrap();
        let key = ca::generate_p256_pkcs8(&mut self.rng).unwrap();
        let signer = RingP256Signer::from_pkcs8_der(&key).unwrap();
        let subject = ca::name_from_attrs(&[]).unwrap();
        let csr = ca::build_csr(&signer, &subject, None, None).unwrap();
        let chain = vec![idevid];
        let verified = self
            .service
            .policy()
            .verify_peer_chain(&chain, wall())
            .ok()
            .map(Arc::new);
        let peer = Peer {
            address: format!("192.0.2.1:{}", 40000 + self.store.certificates().len()),
            relay: None,
            chain: Arc::new(chain),
            verified,
        };
        let session = EstSession::new(
            self.service.clone(),
            Arc::new(CoapConfig::default()),
            peer,
            &mut self.rng,
        );
        Meter {
            session,
            client: Client::new(ClientConfig::default(), 5),
            csr,
        }
    }
}

fn sen(csr: &[u8]) -> Request {
    Request::new(Method::Post, "/.well-known/est/sen")
        .with_payload(CF_PKCS10, csr.to_vec())
        .with_accept(CF_PKCS7_CERTS_ONLY)
}

impl Meter {
    /// Starts `req` and hands every client datagram to the session; returns what the
    /// session sent back (not yet given to the client).
    fn send(&mut self, now: Instant, req: Request) -> Vec<Vec<u8>> {
        self.client.start(now, req).unwrap();
        self.pump_up(now)
    }

    fn pump_up(&mut self, now: Instant) -> Vec<Vec<u8>> {
        while let Some(d) = self.client.poll_transmit() {
            self.session.handle_datagram(now, wall(), &d);
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.session.poll_transmit()).collect()
    }

    fn commit(&mut self) -> (CommitId, Commit) {
        match self.session.poll_event() {
            Some(Event::Commit { id, commit, .. }) => (id, commit),
            None => panic!("no commit asked for"),
        }
    }

    /// Hands `datagrams` to the client; returns its final response, if any.
    fn deliver(&mut self, now: Instant, datagrams: &[Vec<u8>]) -> Option<Response> {
        for d in datagrams {
            self.client.handle_datagram(now, d);
        }
        match self.client.poll_event() {
            Some(ClientEvent::Response(r)) => Some(r),
            Some(ClientEvent::Failed(e)) => panic!("client failed: {e}"),
            None => None,
        }
    }
}

fn certificate(r: &Response) -> Certificate {
    assert_eq!(r.code, ResponseType::Changed, "{r:?}");
    let certs = ca::certs_from_certs_only(&r.payload).unwrap();
    Certificate::from_der(&certs[0]).unwrap()
}

#[test]
fn the_answer_waits_for_the_commit_and_a_retransmission_gets_the_same_bytes() {
    let mut f = fixture(EstConfig::default());
    let mut m = f.meter("SN1");
    let t0 = Instant::now();
    let csr = m.csr.clone();
    // The request is served up to the commit: nothing is sent, one write is asked for.
    assert!(m.send(t0, sen(&csr)).is_empty());
    let request_bytes = {
        // What the client sent (its retransmission is the same datagram).
        let mut c = Client::new(ClientConfig::default(), 5);
        c.start(t0, sen(&csr)).unwrap();
        c.poll_transmit().unwrap()
    };
    let (id, commit) = m.commit();
    let Commit::Issuance { cert, audit } = &commit else {
        panic!("{commit:?}")
    };
    assert_eq!(
        (cert.device_id.as_str(), audit.outcome.as_str()),
        ("SN1", "issued")
    );
    assert!(m.session.poll_event().is_none());
    assert_eq!(m.session.stats().commits_waiting, 1);
    assert_eq!(f.service.in_flight(), 1);
    // A retransmission while the commit runs is not served twice.
    m.session.handle_datagram(t0, wall(), &request_bytes);
    assert!(m.drain().is_empty() && m.session.poll_event().is_none());
    assert!(f.store.certificates().is_empty(), "nothing is durable yet");

    let t1 = t0 + Duration::from_millis(5);
    let result = f.store.commit(&commit);
    m.session.complete_commit(t1, id, result);
    let out = m.drain();
    assert_eq!(out.len(), 1);
    let answer = out[0].clone();
    let issued = certificate(&m.deliver(t1, &out).unwrap());
    assert_eq!(f.store.certificates().len(), 1);
    assert_eq!(
        f.store.certificates()[0].der,
        der::Encode::to_der(&issued).unwrap()
    );
    assert_eq!(f.service.in_flight(), 0);
    // The wall clock given with the datagram is the issuance time (minus the backdate).
    let nb = issued.tbs_certificate.validity.not_before.to_system_time();
    assert_eq!(nb, wall() - PolicyConfig::default().not_before_backdate);
    // A later duplicate of the request gets the identical answer, without a second commit.
    m.session.handle_datagram(t1, wall(), &request_bytes);
    assert_eq!(m.drain(), vec![answer]);
    assert!(m.session.poll_event().is_none());
    assert_eq!(f.service.counters().issued, 1);
}

#[test]
fn a_slow_commit_is_acknowledged_empty_and_answered_by_a_separate_con() {
    let mut f = fixture(EstConfig::default());
    let mut m = f.meter("SN1");
    let t0 = Instant::now();
    let csr = m.csr.clone();
    assert!(m.send(t0, sen(&csr)).is_empty());
    let (id, commit) = m.commit();
    // Half an ACK_TIMEOUT later the session acknowledges the request with an empty ACK.
    let ack_at = m.session.poll_timeout().unwrap();
    assert_eq!(ack_at, t0 + CoapConfig::default().ack_timeout / 2);
    m.session.handle_timeout(ack_at);
    let ack = m.drain();
    assert_eq!(ack.len(), 1);
    let p = Packet::from_bytes(&ack[0]).unwrap();
    assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
    assert!(p.payload.is_empty());
    assert!(m.deliver(ack_at, &ack).is_none());
    assert_eq!(m.session.stats().slow_commit_acks, 1);

    // The commit completes later: the answer is a CON, resent until the client ACKs it.
    let t1 = t0 + Duration::from_secs(4);
    m.session.complete_commit(t1, id, f.store.commit(&commit));
    let con = m.drain();
    assert_eq!(con.len(), 1);
    assert_eq!(
        Packet::from_bytes(&con[0]).unwrap().header.get_type(),
        MessageType::Confirmable
    );
    let retransmit_at = m.session.poll_timeout().unwrap();
    m.session.handle_timeout(retransmit_at);
    assert_eq!(m.drain(), con, "retransmitted until acknowledged");
    let cert = certificate(&m.deliver(retransmit_at, &con).unwrap());
    // The client's ACK of the separate response ends the retransmissions.
    let acks = m.pump_up(retransmit_at);
    assert!(acks.is_empty());
    assert_eq!(m.session.coap_stats().separate_acked, 1);
    assert_eq!(
        f.store.certificates()[0].der,
        der::Encode::to_der(&cert).unwrap()
    );
}

#[test]
fn an_unavailable_store_answers_503_with_max_age_and_a_retry_enrolls() {
    let mut f = fixture(EstConfig {
        overload_retry_after_seconds: 9,
        ..EstConfig::default()
    });
    let mut m = f.meter("SN1");
    let t0 = Instant::now();
    let csr = m.csr.clone();
    m.send(t0, sen(&csr));
    let (id, _) = m.commit();
    m.session.complete_commit(
        t0,
        id,
        Err(StoreError::Backend("database unreachable".into())),
    );
    let out = m.drain();
    let r = m.deliver(t0, &out).unwrap();
    assert_eq!(
        (r.code, r.max_age),
        (ResponseType::ServiceUnavailable, Some(9))
    );
    assert!(
        !String::from_utf8_lossy(&r.payload).contains("unreachable"),
        "the store's detail stays in the log"
    );
    assert!(f.store.certificates().is_empty());
    assert_eq!(f.service.in_flight(), 0);
    assert_eq!(f.service.counters().store_unavailable, 1);

    // The retry (a new exchange, same CSR) is issued once the store is back.
    let t1 = t0 + Duration::from_secs(9);
    m.send(t1, sen(&csr));
    let (id, commit) = m.commit();
    m.session.complete_commit(t1, id, f.store.commit(&commit));
    let out = m.drain();
    certificate(&m.deliver(t1, &out).unwrap());
    assert_eq!(f.store.certificates().len(), 1);
}

#[test]
fn a_raced_retry_is_answered_with_the_first_certificate_after_its_audit_row() {
    let mut f = fixture(EstConfig::default());
    let mut a = f.meter("SN1");
    let t0 = Instant::now();
    let csr = a.csr.clone();
    a.send(t0, sen(&csr));
    let (first_id, first) = a.commit();
    // The same device on a second session (it reconnected) sends the same CSR before the
    // first commit has completed: both were issued, both ask for a commit.
    let mut b = EstSession::new(
        f.service.clone(),
        Arc::new(CoapConfig::default()),
        a.session.peer().clone(),
        &mut f.rng,
    );
    let mut client = Client::new(ClientConfig::default(), 6);
    client.start(t0, sen(&csr)).unwrap();
    b.handle_datagram(t0, wall(), &client.poll_transmit().unwrap());
    let Some(Event::Commit {
        id: second_id,
        commit: second,
        ..
    }) = b.poll_event()
    else {
        panic!("second commit")
    };
    assert_eq!(f.service.in_flight(), 2);
    a.session
        .complete_commit(t0, first_id, f.store.commit(&first));
    let out = a.drain();
    let first_cert = certificate(&a.deliver(t0, &out).unwrap());
    // The store answers the second: already issued. The session audits the replay first.
    let outcome = f.store.commit(&second).unwrap();
    assert!(matches!(outcome, CommitOutcome::AlreadyIssued(_)));
    b.complete_commit(t0, second_id, Ok(outcome));
    assert!(
        b.poll_transmit().is_none(),
        "the replay waits for its audit row"
    );
    let Some(Event::Commit { id, commit, .. }) = b.poll_event() else {
        panic!("audit commit")
    };
    let Commit::Audit(audit) = &commit else {
        panic!("{commit:?}")
    };
    assert_eq!(audit.outcome, "replayed");
    b.complete_commit(t0, id, f.store.commit(&commit));
    let answer = b.poll_transmit().unwrap();
    client.handle_datagram(t0, &answer);
    let Some(ClientEvent::Response(r)) = client.poll_event() else {
        panic!("response")
    };
    assert_eq!(certificate(&r), first_cert);
    assert_eq!(f.store.certificates().len(), 1, "one certificate committed");
    assert_eq!(f.service.in_flight(), 0);
    let c = f.service.counters();
    assert_eq!((c.issued, c.replayed), (1, 1));
}

#[test]
fn an_issuance_that_lost_a_reenrollment_race_is_refused_after_its_audit_row() {
    let mut f = fixture(EstConfig::default());
    let mut m = f.meter("SN1");
    let t0 = Instant::now();
    let csr = m.csr.clone();
    m.send(t0, sen(&csr));
    let (id, _commit) = m.commit();
    // The store found the certificate being replaced already superseded (another node
    // re-enrolled the device first): nothing was written.
    m.session.complete_commit(
        t0,
        id,
        Ok(CommitOutcome::ReplacedNotActive(
            crate::store::CertStatus::Superseded,
        )),
    );
    assert!(
        m.session.poll_transmit().is_none(),
        "the refusal waits for its audit row"
    );
    let (id, commit) = m.commit();
    let Commit::Audit(audit) = &commit else {
        panic!("{commit:?}")
    };
    assert_eq!(
        (audit.outcome.as_str(), audit.code.as_str()),
        ("refused", "4.03")
    );
    assert!(audit.detail.contains("superseded"), "{}", audit.detail);
    m.session.complete_commit(t0, id, f.store.commit(&commit));
    let out = m.drain();
    let r = m.deliver(t0, &out).unwrap();
    assert_eq!(r.code, ResponseType::Forbidden);
    assert!(f.store.certificates().is_empty());
    assert_eq!(f.service.in_flight(), 0);
    let c = f.service.counters();
    assert_eq!((c.issued, c.refused), (0, 1));
}

#[test]
fn admission_happens_in_the_session_before_any_hand_off() {
    let mut f = fixture(EstConfig {
        max_concurrent_enrollments: 1,
        overload_retry_after_seconds: 3,
        ..EstConfig::default()
    });
    let mut a = f.meter("SN1");
    let mut b = f.meter("SN2");
    let t0 = Instant::now();
    let (csr_a, csr_b) = (a.csr.clone(), b.csr.clone());
    a.send(t0, sen(&csr_a));
    let (id, commit) = a.commit();
    // The gate is full while the first commit runs: the second is refused at once.
    let out = b.send(t0, sen(&csr_b));
    assert!(b.session.poll_event().is_none(), "no work, no commit");
    let r = b.deliver(t0, &out).unwrap();
    assert_eq!(
        (r.code, r.max_age),
        (ResponseType::ServiceUnavailable, Some(3))
    );
    assert_eq!(f.service.counters().overloaded, 1);
    a.session.complete_commit(t0, id, f.store.commit(&commit));
    assert_eq!(f.service.in_flight(), 0);
    b.send(t0, sen(&csr_b));
    let Some(Event::Commit { ticket, .. }) = b.session.poll_event() else {
        panic!("commit")
    };
    assert_eq!(f.service.in_flight(), 1);
    // A session that ends with a commit outstanding keeps its admission until the store has
    // reported (the driver drops the ticket then): the gate bounds the store's queue too.
    drop(b);
    assert_eq!(f.service.in_flight(), 1);
    drop(ticket);
    assert_eq!(f.service.in_flight(), 0);
}

#[test]
fn a_refusal_is_audited_before_it_is_answered() {
    let mut f = fixture(EstConfig::default());
    let mut m = f.meter("SN1");
    let t0 = Instant::now();
    m.send(t0, sen(b"not a CSR"));
    let (id, commit) = m.commit();
    let Commit::Audit(audit) = &commit else {
        panic!("{commit:?}")
    };
    assert_eq!(
        (audit.outcome.as_str(), audit.code.as_str()),
        ("refused", "4.00")
    );
    assert!(m.drain().is_empty());
    // A failing audit trail does not hold the refusal back.
    m.session
        .complete_commit(t0, id, Err(StoreError::Backend("disk full".into())));
    let out = m.drain();
    assert_eq!(m.deliver(t0, &out).unwrap().code, ResponseType::BadRequest);
    // GET /crts never touches the store.
    let out = m.send(t0, Request::new(Method::Get, "/.well-known/est/crts"));
    assert!(m.session.poll_event().is_none());
    assert_eq!(m.deliver(t0, &out).unwrap().code, ResponseType::Content);
    assert_eq!(f.service.counters().refused, 1);
}

#[test]
fn completing_an_unknown_commit_changes_nothing() {
    let mut f = fixture(EstConfig::default());
    let mut m = f.meter("SN1");
    m.session
        .complete_commit(Instant::now(), CommitId(7), Ok(CommitOutcome::Committed));
    assert!(m.session.poll_transmit().is_none() && m.session.poll_event().is_none());
    assert_eq!(m.session.stats(), EstSessionStats::default());
    assert_eq!(m.session.poll_timeout(), None);
}
