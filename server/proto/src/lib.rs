//! # est-proto: the sans-IO core of the EST-coaps server
//!
//! ```text
//!   server/daemon (tokio: UDP, DTLS, timers, storage, config, CLI)
//!          |  plaintext CoAP datagrams + authenticated peer identity + now + wall clock
//!          |  ^ datagrams to send, next timer, "commit this" (completed by the driver)
//!   est-proto  <- this crate: one session object (session::EstSession) over CoAP
//!          |     messaging (dedup, block-wise), EST resources (RFC 9148), enrollment
//!          |     admission and policy, issuance through a Signer trait
//!   cbor-schemas (C509, COSE, multipart-core codecs)
//! ```
//!
//! Nothing here opens a socket, reads a clock, spawns a thread or waits for storage: time
//! (`Instant` for protocol timers, `SystemTime` for certificate validity) and randomness are
//! inputs, and a durable write is an event the driver completes, so every behaviour is
//! testable deterministically in memory. A driver feeds [`session::EstSession`]
//! (`handle_datagram`, `handle_timeout`, `complete_commit`) and polls it (`poll_transmit`,
//! `poll_timeout`, `poll_event`).

pub mod ca;
pub mod coap;
pub mod dlms;
pub mod est;
pub mod policy;
pub mod profile;
pub mod session;
pub mod store;

/// Shared by the crate's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// A fixed proptest seed, `default` unless PROPTEST_RNG_SEED gives another: the same cases
    /// on every run, and a way to explore more.
    pub(crate) fn proptest_seed(default: u64) -> proptest::test_runner::RngSeed {
        let seed = std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        proptest::test_runner::RngSeed::Fixed(seed)
    }
}
