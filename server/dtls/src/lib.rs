//! est-dtls: the EST server's front door, a sans-IO DTLS 1.2 engine.
//!
//! ```text
//!   driver (tokio socket + clock)  ── (now, from, datagram) ──►  Endpoint
//!                                  ◄── Transmit / Event / next timeout ──
//! ```
//!
//! No networking, no clock, no threads: the driver passes `now` and datagrams in and takes
//! datagrams, events and the next timer out, in the shape of quinn-proto.
#![forbid(unsafe_code)]

pub mod cookie;
pub mod crypto;
pub mod replay;
pub mod wire;

mod client;
mod config;
mod conn;
mod endpoint;
mod error;
mod faults;
mod metrics;
mod peer;
mod reassembly;

pub use client::Client;
pub use config::{
    C509Codec, CertConverter, ChainVerifier, ClientConfig, Limits, RetransmitConfig, ServerConfig,
    Verified,
};
pub use conn::{CloseReason, ConnEvent, Connection, Role, MAX_FUTURE_RECORDS};
pub use crypto::{CipherSuite, NamedGroup, SignatureScheme, SigningKey};
pub use endpoint::{ConnectionHandle, Endpoint, Event, Gauges, Transmit};
pub use error::{CertError, Error, RefusalReason};
#[cfg(feature = "danger-test-faults")]
pub use faults::TestFaults;
pub use metrics::Metrics;
pub use peer::{IpPrefix, PeerAddr};
