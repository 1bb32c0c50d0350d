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
