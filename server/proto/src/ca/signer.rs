//! The [`Signer`] abstraction and its ring implementation.

use der::asn1::BitString;
use der::{Any, Encode};
use p256::pkcs8::EncodePrivateKey;
use rand::{CryptoRng, RngCore};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use super::error::CaError;
use super::oid;

/// Something that signs with ECDSA P-256 / SHA-256 (ecdsa-with-SHA256, RFC 5758 §3.2), returning a DER
/// `ECDSA-Sig-Value` (RFC 3279 §2.2.3).
///
/// [`RingP256Signer`] implements it in software; a PKCS#11/HSM signer implements the same trait.
pub trait Signer: Send + Sync {
    /// Hash `message` with SHA-256 and sign it; the result is a DER `ECDSA-Sig-Value`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError>;
    /// The DER SubjectPublicKeyInfo of the signing key.
    fn public_key_spki_der(&self) -> &[u8];
}

/// ECDSA P-256 signer on ring, holding the parsed key pair (parsed once, not per signature).
///
/// ring draws the ECDSA nonce from a `SecureRandom`; that trait is sealed in ring 0.17, so the OS
/// generator (`SystemRandom`) is the only choice. It is the single source of randomness in the
/// `ca` module that the caller does not supply.
pub struct RingP256Signer {
    key_pair: EcdsaKeyPair,
    rng: SystemRandom,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for RingP256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RingP256Signer").finish_non_exhaustive()
    }
}

impl RingP256Signer {
    /// Load a PKCS#8 (v1 or v2) DER P-256 private key, as written by [`generate_p256_pkcs8`],
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` or ring itself.
    /// ring requires the ECPrivateKey to contain its public key (OpenSSL and p256 both write it).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map_err(|e| CaError::KeyRejected(e.to_string()))?;
        let spki_der = p256_spki(key_pair.public_key().as_ref())?.to_der()?;
        Ok(Self {
            key_pair,
            rng,
            spki_der,
        })
    }

    /// Load a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) P-256 private key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, CaError> {
        let (label, der) = der::pem::decode_vec(pem.as_bytes())
            .map_err(|e| CaError::KeyRejected(format!("PEM: {e}")))?;
        if label != "PRIVATE KEY" {
            return Err(CaError::KeyRejected(format!(
                "PEM label {label:?}, expected \"PRIVATE KEY\" (PKCS#8)"
            )));
        }
        Self::from_pkcs8_der(&der)
    }

    /// Load a SEC1 `ECPrivateKey` DER P-256 key (RFC 5915; what `openssl pkey -outform DER` and
    /// `openssl ecparam -genkey` write), by converting it to PKCS#8 with p256.
    pub fn from_sec1_der(der: &[u8]) -> Result<Self, CaError> {
        let secret =
            p256::SecretKey::from_sec1_der(der).map_err(|e| CaError::KeyRejected(e.to_string()))?;
        let pkcs8 = secret
            .to_pkcs8_der()
            .map_err(|e| CaError::KeyRejected(e.to_string()))?;
        Self::from_pkcs8_der(pkcs8.as_bytes())
    }

    /// Load a PEM P-256 key, either PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        let (label, der) = der::pem::decode_vec(pem.as_bytes())
            .map_err(|e| CaError::KeyRejected(format!("PEM: {e}")))?;
        match label {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "EC PRIVATE KEY" => Self::from_sec1_der(&der),
            other => Err(CaError::KeyRejected(format!(
                "PEM label {other:?}, expected \"PRIVATE KEY\" or \"EC PRIVATE KEY\""
            ))),
        }
    }

    /// The uncompressed SEC1 public point (65 bytes, `04 || X || Y`).
    pub fn public_key_sec1(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }
}

impl Signer for RingP256Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        let sig = self
            .key_pair
            .sign(&self.rng, message)
            .map_err(|_| CaError::SigningFailed)?;
        Ok(sig.as_ref().to_vec())
    }

    fn public_key_spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// The SubjectPublicKeyInfo of a PKCS#8 P-256 private key (e.g. one made by [`generate_p256_pkcs8`]
/// for server-side key generation, RFC 9148 §4.8 /skg).
pub fn p256_spki_from_pkcs8(pkcs8: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    let signer = RingP256Signer::from_pkcs8_der(pkcs8)?;
    p256_spki(signer.public_key_sec1())
}

/// SubjectPublicKeyInfo of an uncompressed P-256 point (RFC 5480 §2: id-ecPublicKey, namedCurve secp256r1).
pub(crate) fn p256_spki(sec1_uncompressed: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: oid::ID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&oid::SECP256R1)?),
        },
        subject_public_key: BitString::from_bytes(sec1_uncompressed)?,
    })
}

/// The ecdsa-with-SHA256 AlgorithmIdentifier; parameters MUST be absent (RFC 5758 §3.2).
pub(crate) fn ecdsa_with_sha256() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: oid::ECDSA_WITH_SHA256,
        parameters: None,
    }
}

/// Generate a P-256 private key from `rng` and return it as PKCS#8 v1 DER (RFC 5208, ECPrivateKey of
/// RFC 5915 including the public key), which both ring and p256 accept.
pub fn generate_p256_pkcs8<R: RngCore + CryptoRng + ?Sized>(
    rng: &mut R,
) -> Result<Vec<u8>, CaError> {
    // Rejection sampling: a uniformly random 256-bit string is a valid scalar (0 < k < n) with
    // probability about 1 - 2^-32, so more than a couple of rounds means a broken generator.
    for _ in 0..8 {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let candidate = p256::SecretKey::from_slice(&bytes);
        bytes.fill(0);
        if let Ok(secret) = candidate {
            let doc = secret
                .to_pkcs8_der()
                .map_err(|e| CaError::KeyRejected(e.to_string()))?;
            return Ok(doc.as_bytes().to_vec());
        }
    }
    Err(CaError::KeyRejected(
        "random generator produced no valid P-256 scalar in 8 attempts".into(),
    ))
}
