//! CBOR schemas and codecs of the EST-coaps service: C509 certificates and
//! certification requests, certificate chains in COSE headers and
//! `application/multipart-core`.
//!
//! ```text
//!   server/proto (EST resources, CA)   client-sim
//!            \                          /
//!             cbor-schemas  (this crate: pure data, no I/O)
//!              |- c509       draft-ietf-cose-cbor-encoded-cert-20
//!              |- cose       c5c (25) / x5chain (33) via coset
//!              `- multipart  RFC 8710 (Content-Format 62)
//! ```
//!
//! # Draft version followed
//!
//! The C509 code follows **draft-ietf-cose-cbor-encoded-cert-20** (June 2026):
//! certificates travel as the CBOR array `C509Certificate`, `C509CertData` wraps
//! that array, the media types end in `+cbor` and registry values lie in
//! -32768..=32767 (see [`c509`] and docs/design.md "C509 draft -20" for what was
//! read where). Its CDDL is in `cddl/c509.cddl` (plus `oid` from RFC 9090); the
//! tests validate every item this crate emits against it with the `cddl` crate.
//! The certification request vector comes from
//! draft-ietf-cose-c509-test-vectors-03, which targets draft -20; see
//! `testdata/README.md`.
//!
//! # Content-Formats
//!
//! Draft -20 assigns no CoAP Content-Format numbers yet; this crate uses
//! experimental-range numbers, see [`c509`]
//! ([`c509::CONTENT_FORMAT_C509_CERT_DEFAULT`] = 65003 for one C509Certificate,
//! [`c509::CONTENT_FORMAT_COSE_C509_DEFAULT`] = 65015 for COSE_C509,
//! [`c509::CONTENT_FORMAT_C509_PKCS10_DEFAULT`] = 65004 for
//! C509CertificationRequest).
//!
//! # Strictness
//!
//! Every decoder rejects trailing bytes, indefinite lengths, non-deterministic
//! encodings and values outside the registries implemented, with a typed
//! [`DecodeError`]; conversions fail with [`ConvertError`]. No decoder panics
//! (fuzzed by `tests/fuzz`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod c509;
mod cbor;
pub mod cose;
mod error;
pub mod multipart;
#[cfg(feature = "cddl-check")]
pub mod schema;

pub use cbor::MAX_INPUT_BYTES;
pub use error::{ConvertError, DecodeError};
