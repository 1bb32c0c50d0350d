//! # est-server: the tokio driver of the EST-coaps enrollment service
//!
//! Owns the UDP socket, DTLS (our engine `est-dtls` behind the transport layer), timers,
//! the durable store, configuration and the command line. The protocol logic lives in
//! the sans-IO crate `est-proto`; this crate only moves datagrams and bytes.
pub mod config;
pub mod datadir;
pub mod dlms_config;
pub mod factory;
pub mod hsm;
pub mod lifetime;
pub mod limits;
pub mod metrics;
pub mod p384;
pub mod profiles_config;
pub mod revocation;
pub mod safefs;
pub mod service;
pub mod store;
pub mod transport;
