//! # client-sim: a fleet of virtual smart meters enrolling over EST-coaps
//!
//! ```text
//!   fleet runner (arrival schedule, concurrency, DCUs, metrics, record/replay)
//!        |  one task per meter
//!   driver (tokio): DTLS client (webrtc-dtls, OpenSSL or dimpl) + est_proto::coap::Client  <- sans-IO meter state machine
//!        |  datagrams
//!   link emulator (latency, jitter, loss, rate, 802.15.4 frames) -> DCU shared uplink -> UDP socket
//! ```
//!
//! webrtc-dtls is the meter's DTLS client in every build. The OpenSSL and dimpl clients are
//! cargo features (`openssl-backend`, which needs the system's OpenSSL 3 to build, and
//! `dimpl-backend`); [`dtls::DtlsBackend::ensure_compiled_in`] says which feature a backend
//! missing from the build needs.
#![forbid(unsafe_code)]

pub mod cli;
pub mod driver;
pub mod dtls;
#[cfg(feature = "dimpl-backend")]
pub mod dtls_dimpl;
pub mod dtls_native;
#[cfg(feature = "openssl-backend")]
pub mod dtls_openssl;
pub mod fleet;
pub mod link;
pub mod meter;
pub mod net;
pub mod phases;
pub mod pki;
pub mod recording;
pub mod schedule;

#[cfg(test)]
pub(crate) mod testutil;
