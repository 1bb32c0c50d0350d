//! One EST-coaps session: the per-peer protocol object a driver feeds and polls.
//!
//! ```text
//!   driver (est-server's session task, loadtest's core bench, the fuzz target, the system test)
//!      |  handle_datagram(now, wall_clock, bytes)     ^ poll_transmit() -> bytes
//!      |  handle_timeout(now)                         | poll_timeout() -> Instant
//!      |  complete_commit(now, id, result)            | poll_event() -> Event::Commit
//!   EstSession  (this module: one per DTLS session)
//!      |  coap::ServerSession: dedup, block-wise, piggybacked / separate responses
//!      |  est::EstService (shared): admission gate, policy, CA, reads from the Store
//! ```
//!
//! The shape is quinn-proto's `Connection`: the object never does I/O and never reads a
//! clock. Datagrams, the monotonic `now` (CoAP timers) and the wall clock (certificate
//! validity, audit times) are inputs; datagrams to send, the next deadline and requests
//! for durable writes are outputs, each through one `poll_*` method.
//!
//! An enrollment is admitted through the service's [`EnrollmentGate`] inside
//! [`EstSession::handle_datagram`], before any hand-off; then its certificate is issued and
//! [`EstSession::poll_event`] yields [`Event::Commit`]. The driver makes the write durable
//! (the daemon on its SQLite writer thread, a test in memory) and calls
//! [`EstSession::complete_commit`] with the result. Only then is the answer queued for
//! [`EstSession::poll_transmit`]: a meter never holds a certificate the store could lose,
//! and a retried request finds the certificate committed for it (the same answer). A store
//! that fails answers 5.03 + Max-Age. If a commit takes longer than half an ACK_TIMEOUT the
//! session acknowledges the request with an empty ACK (RFC 7252 §5.2.2) so that the meter
//! stops retransmitting, and the answer follows as a separate CON, retransmitted until the
//! meter acknowledges it.
//!
//! [`EnrollmentGate`]: crate::est::EnrollmentGate

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{CryptoRng, RngCore, SeedableRng};

use crate::coap::{CoapConfig, RequestId, ServerSession, SessionStats};
pub use crate::est::CommitTicket;
use crate::est::{AwaitingCommit, EstService, RequestContext, Step};
use crate::policy::VerifiedChain;
use crate::store::{Commit, CommitResult};

/// The authenticated peer of a session, as the DTLS handshake established it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Transport address for the logs and the audit trail, e.g. `192.0.2.7:40001`.
    pub address: String,
    /// The join proxy (DCU relay) the peer's datagrams come through, its address; `None`:
    /// direct. Recorded in the audit trail.
    pub relay: Option<String>,
    /// The client certificate chain (DER, leaf first) the handshake verified, shared with the
    /// transport (an established session holds one copy).
    pub chain: Arc<Vec<Vec<u8>>>,
    /// What [`crate::policy::Policy::verify_peer_chain`] established for `chain` at the
    /// handshake; `None` makes the policy verify the chain in full for each enrollment.
    pub verified: Option<Arc<VerifiedChain>>,
}

/// Names one commit a session asked for, for [`EstSession::complete_commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(u64);

impl CommitId {
    /// The session-local sequence number (for logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What a session asks its driver to do besides sending datagrams.
#[derive(Debug)]
pub enum Event {
    /// Make `commit` durable (an issuance with its audit row, or an audit row alone), then
    /// call [`EstSession::complete_commit`] with `id` and the result. The answer to the
    /// meter waits for it. Keep `ticket` until the store has reported the result (even if
    /// the session is gone by then), then drop it: it holds the enrollment's admission.
    Commit {
        id: CommitId,
        commit: Commit,
        ticket: CommitTicket,
    },
}

/// Counters of one session's EST layer (the CoAP layer's are in [`EstSession::coap_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstSessionStats {
    /// Complete requests served (each reassembled request the CoAP layer delivered).
    pub requests: u64,
    /// Commits asked for with [`Event::Commit`].
    pub commits_requested: u64,
    /// Commits completed by the driver.
    pub commits_completed: u64,
    /// Requests acknowledged with an empty ACK because their commit was slow.
    pub slow_commit_acks: u64,
    /// Gauge: commits asked for and not yet completed.
    pub commits_waiting: usize,
}

/// A request whose answer waits for a commit.
struct Waiting {
    request: RequestId,
    then: Box<AwaitingCommit>,
    /// When to acknowledge the request with an empty ACK if the commit is still running.
    empty_ack_at: Option<Instant>,
}

/// One EST-coaps session over one authenticated peer (one DTLS session).
pub struct EstSession {
    coap: ServerSession,
    service: Arc<EstService>,
    peer: Peer,
    /// Certificate serial numbers and server-generated keys come from here.
    rng: StdRng,
    waiting: BTreeMap<CommitId, Waiting>,
    next_commit: u64,
    events: VecDeque<Event>,
    stats: EstSessionStats,
}

impl std::fmt::Debug for EstSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EstSession")
            .field("peer", &self.peer.address)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl EstSession {
    /// A session for `peer`. `rng` seeds the session's CSPRNG (certificate serials,
    /// server-generated keys) and its CoAP layer (initial Message ID, retransmission
    /// jitter): the OS-seeded thread RNG in production, a seeded one in tests.
    pub fn new<R: RngCore + CryptoRng + ?Sized>(
        service: Arc<EstService>,
        coap: Arc<CoapConfig>,
        peer: Peer,
        rng: &mut R,
    ) -> Self {
        let coap = ServerSession::with_rng(coap, rng);
        let mut seed = <StdRng as SeedableRng>::Seed::default();
        rng.fill_bytes(&mut seed);
        Self {
            coap,
            service,
            peer,
            rng: StdRng::from_seed(seed),
            waiting: BTreeMap::new(),
            next_commit: 0,
            events: VecDeque::new(),
            stats: EstSessionStats::default(),
        }
    }

    /// The peer this session serves.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Processes one plaintext CoAP datagram from the peer. `now` drives the CoAP timers;
    /// `wall_clock` is the time certificates are issued at.
    pub fn handle_datagram(&mut self, now: Instant, wall_clock: SystemTime, datagram: &[u8]) {
        // What the CoAP layer answers itself waits in its transmit queue.
        if let Some((id, request)) = self.coap.handle_datagram(now, datagram) {
            self.stats.requests += 1;
            let ctx = RequestContext {
                peer: &self.peer.address,
                relay: self.peer.relay.as_deref(),
                client_chain: &self.peer.chain,
                verified: self.peer.verified.as_deref(),
                now: wall_clock,
            };
            let step = self.service.begin(&ctx, &request, &mut self.rng);
            let empty_ack_at = now.checked_add(self.slow_commit_after());
            self.advance(now, id, step, empty_ack_at);
        }
    }

    /// Resumes the request that asked for commit `id` with the commit's result, and queues
    /// its answer (or asks for the next commit). An unknown `id` is ignored.
    pub fn complete_commit(&mut self, now: Instant, id: CommitId, result: CommitResult) {
        let Some(w) = self.waiting.remove(&id) else {
            tracing::debug!(commit = id.get(), "completion of an unknown commit ignored");
            return;
        };
        self.stats.commits_completed += 1;
        let step = self.service.resume(*w.then, result);
        self.advance(now, w.request, step, w.empty_ack_at);
    }

    /// The next datagram to send to the peer: answers, empty ACKs, retransmissions of
    /// separate responses. Call until `None` after every input.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.coap.poll_transmit()
    }

    /// The next request for the driver ([`Event::Commit`]). Call until `None` after every
    /// input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let acks = self.waiting.values().filter_map(|w| w.empty_ack_at);
        self.coap.poll_timeout().into_iter().chain(acks).min()
    }

    /// Runs the timers due at `now`: CoAP expiry and retransmission of separate responses,
    /// and the empty ACK of a request whose commit is slow.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.coap.handle_timeout(now);
        for w in self.waiting.values_mut() {
            if w.empty_ack_at.is_some_and(|t| t <= now) {
                w.empty_ack_at = None;
                // RFC 7252 §5.2.2: stop the peer's retransmissions; the answer follows as a
                // separate CON. None for a NON request or one no longer pending.
                if self.coap.acknowledge(now, w.request) {
                    self.stats.slow_commit_acks += 1;
                }
            }
        }
    }

    /// Counters of the EST layer of this session.
    pub fn stats(&self) -> EstSessionStats {
        EstSessionStats {
            commits_waiting: self.waiting.len(),
            ..self.stats
        }
    }

    /// Counters and gauges of the CoAP layer of this session.
    pub fn coap_stats(&self) -> SessionStats {
        self.coap.stats()
    }

    /// How long a commit may take before the request is acknowledged with an empty ACK:
    /// half of ACK_TIMEOUT, so that the common case (a commit of a few milliseconds) keeps
    /// the piggybacked answer and a slow one stops the peer before it retransmits.
    fn slow_commit_after(&self) -> Duration {
        self.coap.config().ack_timeout / 2
    }

    fn advance(
        &mut self,
        now: Instant,
        request: RequestId,
        step: Step,
        empty_ack_at: Option<Instant>,
    ) {
        match step {
            Step::Respond(response) => {
                self.coap.respond(now, request, response);
            }
            Step::Commit(commit, then) => {
                let id = CommitId(self.next_commit);
                self.next_commit = self.next_commit.wrapping_add(1);
                self.stats.commits_requested += 1;
                let ticket = then.ticket();
                self.waiting.insert(
                    id,
                    Waiting {
                        request,
                        then,
                        empty_ack_at,
                    },
                );
                self.events.push_back(Event::Commit { id, commit, ticket });
            }
        }
    }
}

#[cfg(test)]
mod tests;
