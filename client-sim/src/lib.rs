//! # client-sim: a fleet of virtual smart meters enrolling over EST-coaps
//!
//! ```text
//!   fleet runner (arrival schedule, concurrency, DCUs, metrics, record/replay)
//!        |  one task per meter
//!   driver (tokio): DTLS client (webrtc-dtls, OpenSSL or dimpl) + est_proto::coap::Client  <- sans-IO meter state machine
//!        |  datagrams
//!   link emulator (latency, jitter, loss, rate, 802.15.4 frames) -> DCU shared uplink -> UDP socket
//! ```
#![forbid(unsafe_code)]

pub mod cli;
pub mod driver;
pub mod dtls;
pub mod dtls_dimpl;
pub mod dtls_openssl;
pub mod fleet;
pub mod link;
pub mod meter;
pub mod net;
pub mod pki;
pub mod recording;
pub mod schedule;

#[cfg(test)]
pub(crate) mod testutil;
