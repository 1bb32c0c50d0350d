//! `application/pkcs7-mime; smime-type=certs-only` (RFC 9148 §4.1, Content-Format 281): a degenerate
//! CMS SignedData (RFC 5652 §5; RFC 8551 §3.2.2) that carries certificates and no signature.

use cms::cert::CertificateChoices;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, DigestAlgorithmIdentifiers, EncapsulatedContentInfo, SignedData, SignerInfos,
};
use der::asn1::SetOfVec;
use der::{Any, Decode, Encode};
use x509_cert::Certificate;

use super::error::CaError;
use super::oid;

/// Wrap DER certificates in a certs-only CMS message (DER ContentInfo).
///
/// The SignedData has version 1, no digest algorithms, an id-data encapContentInfo without content,
/// and no signerInfos (RFC 5652 §5.1). `certificates` is a SET OF, so DER orders the certificates
/// by their encoding; duplicates are dropped. Each certificate must be canonical DER, so that it is
/// carried byte for byte ([`CaError::NonCanonicalCertificate`] otherwise).
pub fn certs_only(certs: &[&[u8]]) -> Result<Vec<u8>, CaError> {
    let mut choices = Vec::with_capacity(certs.len());
    let mut seen: Vec<&[u8]> = Vec::with_capacity(certs.len());
    for der in certs {
        if seen.contains(der) {
            continue;
        }
        seen.push(der);
        let cert = Certificate::from_der(der)?;
        // The set is re-encoded from parsed certificates; make sure that is lossless.
        if cert.to_der()?.as_slice() != *der {
            return Err(CaError::NonCanonicalCertificate);
        }
        choices.push(CertificateChoices::Certificate(cert));
    }
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: DigestAlgorithmIdentifiers::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: oid::CMS_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(SetOfVec::try_from(choices)?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    let content_info = ContentInfo {
        content_type: oid::CMS_SIGNED_DATA,
        content: Any::encode_from(&signed_data)?,
    };
    Ok(content_info.to_der()?)
}

/// The certificates (DER) of a certs-only CMS message, in the order they appear.
///
/// Requires a ContentInfo of type id-signedData; CMS "other" certificate formats are ignored.
/// Signatures (if any signerInfos exist) are not checked: certs-only carries none.
pub fn certs_from_certs_only(der: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let content_info = ContentInfo::from_der(der)?;
    if content_info.content_type != oid::CMS_SIGNED_DATA {
        return Err(CaError::UnexpectedCms("ContentInfo is not id-signedData"));
    }
    let signed_data = content_info.content.decode_as::<SignedData>()?;
    let Some(set) = signed_data.certificates else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(set.0.len());
    for choice in set.0.iter() {
        if let CertificateChoices::Certificate(cert) = choice {
            out.push(cert.to_der()?);
        }
    }
    Ok(out)
}
