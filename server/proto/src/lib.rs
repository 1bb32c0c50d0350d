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
