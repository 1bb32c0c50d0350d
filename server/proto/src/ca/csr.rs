//! PKCS#10 certification requests (RFC 2986): parse once, check the profile, verify proof of possession.

use der::asn1::{AnyRef, BitString};
use der::{Decode, Reader, SliceReader, Tag, Tagged};
use ring::signature::{
    UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA256_ASN1,
    ECDSA_P384_SHA384_ASN1,
};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::request::CertReq;

use super::error::CsrError;
use super::names::{hardware_module_in_san, HardwareModuleName};
use super::oid;
use super::signer::Curve;

/// A PKCS#10 request that passed [`parse_and_verify_csr`]: DER, size-limited, P-256 or P-384 key, self-signature
/// verified. Fields are extracted once here so that later layers never re-parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCsr {
    /// The request as received.
    pub der: Vec<u8>,
    /// SHA-256 of `der` ([`csr_digest`]), to recognise a retried identical request.
    pub digest: [u8; 32],
    /// Requested subject (may be empty when the identity is in subjectAltName).
    pub subject: Name,
    /// The subject public key: id-ecPublicKey on secp256r1 or secp384r1, uncompressed point.
    pub public_key: SubjectPublicKeyInfoOwned,
    /// hardwareModuleName (RFC 4108) found in the requested subjectAltName, if any.
    pub hardware_module: Option<HardwareModuleName>,
    /// Content octets of the challengePassword attribute (RFC 2985 §5.4.1), whatever its string type.
    /// EST puts the base64 tls-unique value here for channel binding (RFC 7030 §3.5, RFC 9148 §3).
    pub challenge_password: Option<Vec<u8>>,
    /// Whether the extensionRequest asked for a subjectAltName.
    pub requested_san_present: bool,
    /// The requested subjectAltName, decoded (RFC 7030 §4.2.2 compares it on re-enrollment).
    pub requested_san: Option<SubjectAltName>,
    /// All extensions of the extensionRequest attribute (RFC 2985 §5.4.2), in request order.
    pub requested_extensions: Vec<Extension>,
}

impl ParsedCsr {
    /// The curve of the subject public key (checked by [`parse_and_verify_csr`]).
    pub fn curve(&self) -> Option<Curve> {
        Curve::of_spki(&self.public_key)
    }

    /// The uncompressed SEC1 public point (65 bytes for P-256, 97 for P-384).
    pub fn public_key_sec1(&self) -> &[u8] {
        self.public_key.subject_public_key.raw_bytes()
    }
}

/// SHA-256 of a CSR's DER, used to detect a retried identical request.
pub fn csr_digest(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parse a DER PKCS#10 request and verify its self-signature.
///
/// * more than `max_len` bytes: [`CsrError::TooLarge`], before any parsing;
/// * not DER, trailing bytes, duplicated attributes or extensions, a challengePassword or
///   extensionRequest that is not single-valued, an undecodable subjectAltName or
///   hardwareModuleName: [`CsrError::Malformed`];
/// * key not id-ecPublicKey on secp256r1 or secp384r1 with an uncompressed point (RFC 7925
///   §4.4.2 profile; P-384 for DLMS/COSEM suite 2): [`CsrError::UnsupportedKey`];
/// * signature algorithm not ecdsa-with-SHA256 (P-256 key) or ecdsa-with-SHA384/SHA256 (P-384
///   key), parameters absent (RFC 5758 §3.2): [`CsrError::UnsupportedSignatureAlgorithm`];
/// * signature (or public point) invalid: [`CsrError::BadSignature`].
///
/// The signature is checked over the certificationRequestInfo bytes exactly as received (RFC 2986
/// §4.2), not over a re-encoding, so a decoder that normalises (e.g. sorts SET OF) cannot change
/// what is verified.
pub fn parse_and_verify_csr(der: &[u8], max_len: usize) -> Result<ParsedCsr, CsrError> {
    if der.len() > max_len {
        return Err(CsrError::TooLarge {
            len: der.len(),
            max: max_len,
        });
    }
    // der 0.7 sorts every SET OF it decodes with an insertion sort, quadratic on unsorted input
    // (a few-KB CSR with one large unsorted RDN costs milliseconds instead of microseconds;
    // docs/benchmarks.md, "Figures behind code comments"): refuse large unsorted sets and deep
    // nesting before decoding.
    check_set_sizes(der, MAX_DEPTH)?;
    // Full typed parse; from_der rejects trailing bytes.
    let req = CertReq::from_der(der)?;

    // Key profile first: an RSA or P-521 request is "unsupported key" whatever it is signed with.
    let spki = &req.info.public_key;
    if spki.algorithm.oid != oid::ID_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey("not an id-ecPublicKey key"));
    }
    let named = spki
        .algorithm
        .parameters
        .as_ref()
        .ok_or(CsrError::UnsupportedKey(
            "EC key without namedCurve parameters",
        ))?
        .decode_as::<const_oid::ObjectIdentifier>()
        .map_err(|_| CsrError::UnsupportedKey("EC parameters are not a namedCurve"))?;
    let curve = Curve::from_oid(&named).ok_or(CsrError::UnsupportedKey(
        "curve is neither secp256r1 (P-256) nor secp384r1 (P-384)",
    ))?;
    let point = uncompressed_point(&spki.subject_public_key, curve)?;

    // P-256 keys sign ecdsa-with-SHA256 (RFC 7925); P-384 keys ecdsa-with-SHA384 (DLMS suite 2)
    // or ecdsa-with-SHA256. Parameters absent (RFC 5758 §3.2).
    if req.algorithm.parameters.is_some() {
        return Err(CsrError::UnsupportedSignatureAlgorithm(req.algorithm.oid));
    }
    let verifier: &dyn VerificationAlgorithm = match (curve, req.algorithm.oid) {
        (Curve::P256, oid::ECDSA_WITH_SHA256) => &ECDSA_P256_SHA256_ASN1,
        (Curve::P384, oid::ECDSA_WITH_SHA384) => &ECDSA_P384_SHA384_ASN1,
        (Curve::P384, oid::ECDSA_WITH_SHA256) => &ECDSA_P384_SHA256_ASN1,
        (_, other) => return Err(CsrError::UnsupportedSignatureAlgorithm(other)),
    };
    let signature = req
        .signature
        .as_bytes()
        .ok_or(CsrError::Malformed(Tag::BitString.value_error()))?;

    let info_bytes = raw_info(der)?;
    UnparsedPublicKey::new(verifier, point)
        .verify(info_bytes, signature)
        .map_err(|_| CsrError::BadSignature)?;

    // Attributes (RFC 2986 §4.1, RFC 2985 §5.4).
    let mut challenge_password = None;
    let mut requested_extensions: Option<Vec<Extension>> = None;
    let mut seen = Vec::with_capacity(req.info.attributes.len());
    for attr in req.info.attributes.iter() {
        if seen.contains(&attr.oid) {
            return Err(CsrError::Malformed(Tag::Set.value_error()));
        }
        seen.push(attr.oid);
        if attr.oid == oid::CHALLENGE_PASSWORD {
            let value = single_value(attr)?;
            challenge_password = Some(value.value().to_vec());
        } else if attr.oid == oid::EXTENSION_REQUEST {
            let value = single_value(attr)?;
            requested_extensions = Some(value.decode_as::<Vec<Extension>>()?);
        }
    }
    let requested_extensions = requested_extensions.unwrap_or_default();

    let mut requested_san = None;
    for (i, ext) in requested_extensions.iter().enumerate() {
        // RFC 5280 §4.2: at most one instance of a given extension.
        if requested_extensions
            .iter()
            .skip(i.saturating_add(1))
            .any(|other| other.extn_id == ext.extn_id)
        {
            return Err(CsrError::Malformed(Tag::Sequence.value_error()));
        }
        if ext.extn_id == oid::CE_SUBJECT_ALT_NAME {
            // The SAN is inside an OCTET STRING, so the walk above did not see its contents
            // (a directoryName holds SETs).
            check_set_sizes(ext.extn_value.as_bytes(), MAX_DEPTH)?;
            requested_san = Some(SubjectAltName::from_der(ext.extn_value.as_bytes())?);
        }
    }
    let hardware_module = match &requested_san {
        Some(san) => hardware_module_in_san(san)?,
        None => None,
    };

    Ok(ParsedCsr {
        der: der.to_vec(),
        digest: csr_digest(der),
        subject: req.info.subject,
        public_key: req.info.public_key,
        hardware_module,
        challenge_password,
        requested_san_present: requested_san.is_some(),
        requested_san,
        requested_extensions,
    })
}

/// Deepest TLV nesting accepted in a CSR (a PKCS#10 request with a directoryName SAN is about 8 deep).
const MAX_DEPTH: u8 = 24;
/// Largest SET (or `[0]` SET OF) whose elements may arrive out of DER order; beyond this a SET must
/// already be sorted (X.690 §11.6), which keeps the decoder's insertion sort linear.
const MAX_UNSORTED_SET_ELEMENTS: usize = 16;

/// Walk the DER TLV tree of `der` (one TLV): refuse nesting deeper than `depth` and any SET
/// (universal 17, or context-specific constructed `[0]`, the IMPLICIT tag of CSR attributes) with
/// more than [`MAX_UNSORTED_SET_ELEMENTS`] elements that are not in ascending order of their
/// encodings. Linear in the input size.
fn check_set_sizes(der: &[u8], depth: u8) -> Result<(), der::Error> {
    let tlv = AnyRef::from_der(der)?;
    if !tlv.tag().is_constructed() {
        return Ok(());
    }
    let depth = depth
        .checked_sub(1)
        .ok_or_else(|| tlv.tag().value_error())?;
    let is_set = matches!(
        tlv.tag(),
        Tag::Set
            | Tag::ContextSpecific {
                constructed: true,
                number: der::TagNumber::N0
            }
    );
    let mut reader = SliceReader::new(tlv.value())?;
    let mut count: usize = 0;
    let mut prev: Option<&[u8]> = None;
    let mut sorted = true;
    while !reader.is_finished() {
        let child = reader.tlv_bytes()?;
        count = count.saturating_add(1);
        if let Some(p) = prev {
            sorted &= p <= child;
        }
        if is_set && !sorted && count > MAX_UNSORTED_SET_ELEMENTS {
            return Err(Tag::Set.value_error());
        }
        check_set_sizes(child, depth)?;
        prev = Some(child);
    }
    Ok(())
}

/// The uncompressed point of a key on `curve` (65 bytes for P-256, 97 for P-384; RFC 5480 §2.2;
/// RFC 7925 requires uncompressed).
fn uncompressed_point(bits: &BitString, curve: Curve) -> Result<&[u8], CsrError> {
    let point = bits.as_bytes().ok_or(CsrError::UnsupportedKey(
        "public key bit string has unused bits",
    ))?;
    match point.first() {
        Some(0x04) if point.len() == curve.uncompressed_point_len() => Ok(point),
        Some(0x02 | 0x03) => Err(CsrError::UnsupportedKey("compressed EC point")),
        _ => Err(CsrError::UnsupportedKey(
            "not an uncompressed EC point of the named curve",
        )),
    }
}

/// The certificationRequestInfo TLV exactly as it appears in `der`.
fn raw_info(der: &[u8]) -> Result<&[u8], der::Error> {
    let outer = AnyRef::from_der(der)?;
    let mut reader = SliceReader::new(outer.value())?;
    reader.tlv_bytes()
}

/// The only value of a SINGLE VALUE attribute.
fn single_value(attr: &x509_cert::attr::Attribute) -> Result<&der::Any, CsrError> {
    match attr.values.as_slice() {
        [one] => Ok(one),
        _ => Err(CsrError::Malformed(Tag::Set.value_error())),
    }
}

/// Build and sign a PKCS#10 request (what a meter does before /sen or /sren; the simulator and tests
/// use it). `hardware_module` becomes a subjectAltName otherName in an extensionRequest attribute;
/// `challenge_password` (e.g. base64 tls-unique, RFC 7030 §3.5) is a PrintableString when its
/// characters allow, else a UTF8String.
pub fn build_csr(
    signer: &dyn super::Signer,
    subject: &Name,
    hardware_module: Option<&HardwareModuleName>,
    challenge_password: Option<&str>,
) -> Result<Vec<u8>, super::CaError> {
    use der::asn1::{PrintableStringRef, SetOfVec, Utf8StringRef};
    use der::{Any, Encode};
    use x509_cert::attr::Attribute;
    use x509_cert::request::{CertReqInfo, Version};

    let public_key = SubjectPublicKeyInfoOwned::from_der(signer.public_key_spki_der())?;
    let mut attributes = SetOfVec::new();
    if let Some(pw) = challenge_password {
        let value = match PrintableStringRef::new(pw) {
            Ok(p) => Any::encode_from(&p)?,
            Err(_) => Any::encode_from(&Utf8StringRef::new(pw)?)?,
        };
        attributes.insert(Attribute {
            oid: oid::CHALLENGE_PASSWORD,
            values: SetOfVec::try_from(vec![value])?,
        })?;
    }
    if let Some(hmn) = hardware_module {
        let san = super::issue::subject_alt_name(subject, vec![hmn.to_general_name()?])?;
        attributes.insert(Attribute {
            oid: oid::EXTENSION_REQUEST,
            values: SetOfVec::try_from(vec![Any::encode_from(&vec![san])?])?,
        })?;
    }
    let info = CertReqInfo {
        version: Version::V1,
        subject: subject.clone(),
        public_key,
        attributes,
    };
    let info_der = info.to_der()?;
    let signature = signer.sign(&info_der)?;
    let req = CertReq {
        info,
        algorithm: super::signer::ecdsa_with(signer.signature_algorithm()),
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(req.to_der()?)
}
