//! Counters of the engine. Plain integers: the endpoint is driven by one task; the driver
//! copies a snapshot out ([`crate::Endpoint::metrics`]).

use crate::error::RefusalReason;

/// Every counter the engine keeps. Gauges (sessions, half-open) are computed by the endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub datagrams_received: u64,
    /// Of them, relayed by a stateless join proxy (JPY).
    pub datagrams_relayed: u64,
    /// HelloVerifyRequests sent (stateless: one per ClientHello without a valid cookie).
    pub hello_verify_sent: u64,
    /// ClientHellos whose cookie verified.
    pub cookies_verified: u64,
    /// ClientHellos that did not parse or came fragmented to the stateless path.
    pub client_hello_malformed: u64,
    /// Datagrams from addresses with no session that were not a ClientHello.
    pub dropped_unknown_peer: u64,
    pub handshakes_completed: u64,
    /// Refused or failed handshakes, by [`RefusalReason`] (index with `RefusalReason::index`).
    pub refused: [u64; RefusalReason::ALL.len()],
    pub records_malformed: u64,
    pub records_dropped: u64,
    pub records_replayed: u64,
    pub records_bad_mac: u64,
    pub flights_retransmitted: u64,
    pub flights_resent_on_repeat: u64,
    pub datagrams_sent_handshake: u64,
    pub ecdsa_signs: u64,
    pub ecdsa_verifies: u64,
    pub chain_verifications: u64,
    /// Certificates in the peer chains received (a client sending its issuer too counts 2).
    pub peer_certificates_received: u64,
    /// Server flights that named our Certificate message by its RFC 7924 fingerprint instead
    /// of carrying it.
    pub cached_info_hits: u64,
    /// Handshakes whose client certificate came as C509 (RFC 7250 negotiation).
    pub c509_client_certificates: u64,
    pub peer_address_changes: u64,
    pub renegotiations_refused: u64,
    /// Sessions closed because a new handshake from the same address proved reachability.
    pub sessions_replaced: u64,
    /// Sessions closed by the per-identity limit.
    pub sessions_superseded: u64,
    pub sessions_closed_idle: u64,
    /// Half-open handshakes that gave way to newer ones at the half-open cap.
    pub half_open_evicted: u64,
    /// Log lines about peers that the rate limit suppressed.
    pub log_lines_suppressed: u64,
}

impl Metrics {
    /// The refusal counter for `reason`.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused.get(reason.index()).copied().unwrap_or(0)
    }

    pub(crate) fn refuse(&mut self, reason: RefusalReason) {
        if let Some(c) = self.refused.get_mut(reason.index()) {
            *c += 1;
        }
    }

    /// All refusals.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }
}
