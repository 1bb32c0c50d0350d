//! `application/pkcs7-mime; smime-type=certs-only` (RFC 9148 §4.1, Content-Format 281): a degenerate
//! CMS SignedData (RFC 5652 §5; RFC 8551 §3.2.2) that carries certificates and no signature.

use cms::content_info::CmsVersion;
use cms::signed_data::{DigestAlgorithmIdentifiers, EncapsulatedContentInfo};
use der::asn1::{AnyRef, BitStringRef, SetOfVec};
use der::{Decode, Encode};
use spki::AlgorithmIdentifierRef;

use super::error::CaError;
use super::oid;

/// RFC 5652 §3 ContentInfo holding a SignedData whose certificates are carried as raw DER: the
/// same schema as `cms::content_info::ContentInfo` + `cms::signed_data::SignedData`, but
/// certificates are emitted byte for byte instead of parsed and re-encoded (cheaper, and exact
/// even for a CA certificate that is not in canonical DER).
#[derive(der::Sequence)]
struct CertsOnlyContentInfo<'a> {
    content_type: der::asn1::ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    content: CertsOnlySignedData<'a>,
}

/// RFC 5652 §5.1 SignedData, with `certificates [0] IMPLICIT CertificateSet` as raw TLVs and no
/// `crls`.
#[derive(der::Sequence)]
struct CertsOnlySignedData<'a> {
    version: CmsVersion,
    digest_algorithms: DigestAlgorithmIdentifiers,
    encap_content_info: EncapsulatedContentInfo,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    certificates: Option<SetOfVec<AnyRef<'a>>>,
    signer_infos: SetOfVec<AnyRef<'a>>,
}

/// The outer shape of an X.509 Certificate (RFC 5280 §4.1), checked without decoding the TBS.
#[derive(der::Sequence)]
pub(super) struct CertificateShape<'a> {
    tbs_certificate: AnyRef<'a>,
    signature_algorithm: AlgorithmIdentifierRef<'a>,
    signature: BitStringRef<'a>,
}

/// Wrap DER certificates in a certs-only CMS message (DER ContentInfo).
///
/// The SignedData has version 1, no digest algorithms, an id-data encapContentInfo without content,
/// no crls and no signerInfos (RFC 5652 §5.1). `certificates` is a SET OF, so DER orders the
/// certificates by their encoding; duplicates are dropped. Each input must be one DER TLV with the
/// outer shape of a Certificate (SEQUENCE of TBS, AlgorithmIdentifier, BIT STRING); the TBS is not
/// decoded: the certificates are the CA's own (checked when loaded) or just issued.
pub fn certs_only(certs: &[&[u8]]) -> Result<Vec<u8>, CaError> {
    let mut set = Vec::with_capacity(certs.len());
    let mut seen: Vec<&[u8]> = Vec::with_capacity(certs.len());
    for der in certs {
        if seen.contains(der) {
            continue;
        }
        seen.push(der);
        CertificateShape::from_der(der)?;
        set.push(AnyRef::from_der(der)?);
    }
    let content_info = CertsOnlyContentInfo {
        content_type: oid::CMS_SIGNED_DATA,
        content: CertsOnlySignedData {
            version: CmsVersion::V1,
            digest_algorithms: DigestAlgorithmIdentifiers::new(),
            encap_content_info: EncapsulatedContentInfo {
                econtent_type: oid::CMS_DATA,
                econtent: None,
            },
            certificates: Some(SetOfVec::try_from(set)?),
            signer_infos: SetOfVec::new(),
        },
    };
    Ok(content_info.to_der()?)
}

/// RFC 5652 §3 ContentInfo, its content kept as a TLV (reading).
#[derive(der::Sequence)]
struct ContentInfoRef<'a> {
    content_type: der::asn1::ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    content: AnyRef<'a>,
}

/// RFC 5652 §5.1 SignedData as `cms::signed_data::SignedData` reads it, with the
/// CertificateChoices, RevocationInfoChoices and SignerInfos kept as TLVs (reading).
#[derive(der::Sequence)]
struct SignedDataRef<'a> {
    version: CmsVersion,
    digest_algorithms: DigestAlgorithmIdentifiers,
    encap_content_info: EncapsulatedContentInfo,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    certificates: Option<SetOfVec<AnyRef<'a>>>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    crls: Option<SetOfVec<AnyRef<'a>>>,
    signer_infos: SetOfVec<AnyRef<'a>>,
}

/// The certificates (DER) of a certs-only CMS message, in the order they appear.
///
/// Requires a ContentInfo of type id-signedData; CMS "other" certificate formats (the
/// context-tagged CertificateChoices) are ignored. Signatures (if any signerInfos exist) are
/// not checked: certs-only carries none. Each certificate is returned byte for byte as it
/// was carried, checked for the outer shape of a Certificate (SEQUENCE of TBS,
/// AlgorithmIdentifier, BIT STRING) but not decoded: whoever uses one parses it. Reading
/// them as TLVs instead of decoding and re-encoding each one was most of a meter's cost of
/// a /crts or /sen response (docs/benchmarks.md).
pub fn certs_from_certs_only(der: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let content_info = ContentInfoRef::from_der(der)?;
    if content_info.content_type != oid::CMS_SIGNED_DATA {
        return Err(CaError::UnexpectedCms("ContentInfo is not id-signedData"));
    }
    let signed_data = content_info.content.decode_as::<SignedDataRef<'_>>()?;
    let Some(set) = signed_data.certificates else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(set.len());
    for choice in set.iter() {
        // CertificateChoices: a Certificate is a SEQUENCE; the other choices are [0]..[3].
        if der::Tagged::tag(choice) == der::Tag::Sequence {
            let cert = choice.to_der()?;
            CertificateShape::from_der(&cert)?;
            out.push(cert);
        }
    }
    Ok(out)
}
