//! est-relay: a DCU's join proxy for meters that have not enrolled yet
//! (draft-ietf-anima-constrained-join-proxy-21), with est-server as its registrar.
//!
//! ```text
//!   meters (mesh, link-local)            DCU: est-relay                    head end: est-server
//!   DTLS ClientHello ... ──UDP──► join port ─► Relay (sans-IO core) ─► JPY [header, DTLS] ──► jpy_listen
//!                                                                    or a UDP circuit per meter ──► coaps port
//! ```
//!
//! The core ([`Relay`]) takes datagrams and `now` and returns datagrams, events and its next
//! timer; [`driver`] runs it on tokio sockets, and `est-relay` (src/main.rs) is the binary.
//! client-sim runs the same core in process.
//!
//! * [`jpy`]: the JPY message codec, `[jpy_header: bstr, jpy_content: bstr]`.
//! * [`header`]: the header, the meter's address sealed with AES-128-GCM-SIV under a rotating
//!   proxy-local key.
//! * [`filter`]: what looks like a DTLS record.
//! * [`ratelimit`]: per-address and global token buckets in fixed memory.
//! * [`discovery`]: `GET /.well-known/core?brski-jp=*`.
//! * [`relay`]: modes, registrar failover, stateful circuits, metrics.
#![forbid(unsafe_code)]

pub mod config;
pub mod discovery;
pub mod driver;
pub mod filter;
pub mod header;
pub mod jpy;
pub mod ratelimit;
pub mod relay;
pub mod tokio_clock;

pub use header::{HeaderKeys, MeterAddr, OpenError, SealedHeader};
pub use ratelimit::Rate;
pub use relay::{
    CircuitId, Destination, DropReason, Event, Metrics, Mode, Relay, RelayConfig, Transmit,
};
