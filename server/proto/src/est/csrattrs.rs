//! `GET /.well-known/est/att`: CSR attributes (RFC 7030 §4.5.2, CF 285).
//!
//! ```text
//! CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
//! AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }
//! ```
//! We ask for what our policy needs: an ecdsa-with-SHA256 signature and an
//! id-ecPublicKey on secp256r1.

use const_oid::ObjectIdentifier;
use der::asn1::SetOfVec;
use der::{Any, Encode};
use x509_cert::attr::Attribute;

const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

#[derive(Clone, Debug, Eq, PartialEq, der::Choice)]
enum AttrOrOid {
    Oid(ObjectIdentifier),
    Attribute(Attribute),
}

pub(crate) fn encode() -> der::Result<Vec<u8>> {
    let mut values = SetOfVec::new();
    values.insert(Any::from(&SECP256R1))?;
    let attrs: Vec<AttrOrOid> = vec![
        AttrOrOid::Oid(ECDSA_WITH_SHA256),
        AttrOrOid::Attribute(Attribute {
            oid: ID_EC_PUBLIC_KEY,
            values,
        }),
    ];
    attrs.to_der()
}
