//! PKI and certificate issuance core (sans-IO).
//!
//! This module is the part of the EST-coaps server that touches keys and certificates:
//!
//! ```text
//!   est/ (resources /sen /sren /crts /skg)     tests/pki tool, `est-server init`, factory mint
//!              |                                         |
//!              v                                         v
//!   ca::parse_and_verify_csr  ca::IssuingCa::issue  ca::generate_root_ca / mint_idevid
//!   ca::certs_only            ca::Signer (ring today, PKCS#11/HSM tomorrow)
//! ```
//!
//! * [`parse_and_verify_csr`] parses a PKCS#10 request (RFC 2986) once, at the edge, with a size limit,
//!   insists on the RFC 7925 profile (id-ecPublicKey on secp256r1, ecdsa-with-SHA256) and checks the
//!   self-signature (proof of possession) with ring over the *received* bytes of
//!   `certificationRequestInfo`. It extracts what enrollment policy needs: subject, public key, the
//!   RFC 4108 `hardwareModuleName` SAN, the `challengePassword` (RFC 9148 §3 / RFC 7030 §3.5 tls-unique).
//!   Its cost is bounded: the `der` crate sorts every SET OF it decodes with an insertion sort, so
//!   large out-of-order SETs and deep nesting are refused by a linear pre-scan before decoding.
//! * [`IssuingCa`] keeps the CA certificate parsed and its key loaded, and issues LDevID end-entity
//!   certificates following the RFC 7925 §4.4.2 / RFC 5280 profile (see [`IssuingCa::issue`]).
//!   The TBSCertificate is built directly with `x509-cert` types and its DER is signed by a
//!   [`Signer`], so an HSM signer plugs in without an adapter for x509-cert's builder traits.
//! * [`certs_only`] / [`certs_from_certs_only`] produce and read the degenerate CMS SignedData of
//!   `application/pkcs7-mime; smime-type=certs-only` (RFC 9148 §4.1 Content-Format 281, RFC 5652 §5);
//!   certificates are carried byte for byte (the schema is the `cms` crate's, checked by a test).
//! * [`generate_root_ca`], [`generate_sub_ca`], [`generate_server_cert`] and [`mint_idevid`] make test and
//!   bootstrap PKIs (an IEEE 802.1AR-style IDevID as a meter factory would).
//!
//! Nothing here reads files, clocks or sockets: wall-clock times are [`std::time::SystemTime`] arguments and
//! randomness for keys and serial numbers comes from a caller-supplied `rand::RngCore + CryptoRng`.
//! The one exception is the ECDSA signing nonce: ring's `SecureRandom` trait is sealed, so
//! [`RingP256Signer`] uses ring's `SystemRandom` (the OS generator) for it.
//!
//! All ECDSA signing and verification goes through ring, several times faster than the pure-Rust
//! p256 crate (docs/benchmarks.md, "Figures behind code comments"); p256 is used only to write
//! PKCS#8 for newly generated keys.

mod crl;
mod csr;
mod error;
mod issue;
mod names;
pub mod oid;
mod pkcs7;
mod pki;
mod signer;

pub use crl::{verify_crl, CrlEntry, CrlParams, VerifiedCrl};
pub use csr::{build_csr, csr_digest, parse_and_verify_csr, ParsedCsr};
pub use error::{CaError, CsrError};
pub use issue::{random_serial, IssueParams, IssuingCa};
pub use names::{
    attribute_text, common_name, hardware_module_from_cert, name_from_attrs, name_string,
    organization, serial_number_attr, subject_alt_name_from_cert, HardwareModuleName,
};
pub use pkcs7::{certs_from_certs_only, certs_only};
pub use pki::{
    generate_root_ca, generate_server_cert, generate_sub_ca, idevid_no_expiry, mint_idevid,
    self_signed_ca, IDEVID_NO_EXPIRY_UNIX_SECS,
};
pub use signer::{
    generate_p256_pkcs8, generate_p384_pkcs8, p256_spki_from_pkcs8, signer_from_pkcs8_der,
    spki_from_pkcs8, Curve, RingP256Signer, RingP384Signer, Signer,
};

// Re-exported so that callers can name the types of this API without adding the crates themselves.
pub use const_oid::ObjectIdentifier;
pub use der::asn1::OctetString;
pub use spki::SubjectPublicKeyInfoOwned;
pub use x509_cert::name::Name;
pub use x509_cert::serial_number::SerialNumber;
pub use x509_cert::Certificate;

#[cfg(test)]
mod tests;
