//! # est-proto: the sans-IO core of the EST-coaps server
//!
//! ```text
//!   server/daemon (tokio: UDP, DTLS, timers, storage, config, CLI)
//!          |  plaintext CoAP datagrams + authenticated peer identity + now
//!   est-proto  <- this crate: CoAP messaging (dedup, block-wise), EST resources
//!          |     (RFC 9148), enrollment policy, issuance through a Signer trait
//!   cbor-schemas (C509, COSE, multipart-core codecs)
//! ```
//!
//! Nothing here opens a socket, reads a clock or spawns a thread: time (`Instant` for
//! protocol timers, `SystemTime` for certificate validity) and randomness are inputs,
//! so every behaviour is testable deterministically in memory.
pub mod ca;
pub mod coap;
pub mod est;
pub mod policy;
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
