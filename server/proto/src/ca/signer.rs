//! The [`Signer`] abstraction and its ring implementation.

use const_oid::ObjectIdentifier;
use der::asn1::BitString;
use der::{Any, Encode};
use p256::pkcs8::EncodePrivateKey;
use rand::{CryptoRng, RngCore};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
};
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
    /// The signature algorithm of what [`Signer::sign`] returns: ecdsa-with-SHA256 unless the
    /// signer says otherwise ([`RingP384Signer`] signs ecdsa-with-SHA384).
    fn signature_algorithm(&self) -> ObjectIdentifier {
        oid::ECDSA_WITH_SHA256
    }
}

/// The elliptic curves the CA issues on and accepts in requests: P-256 (RFC 7925; DLMS/COSEM
/// security suite 1) and P-384 (DLMS/COSEM security suite 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Curve {
    /// secp256r1.
    P256,
    /// secp384r1.
    P384,
}

impl Curve {
    /// The namedCurve OID (RFC 5480 §2.1.1.1).
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            Curve::P256 => oid::SECP256R1,
            Curve::P384 => oid::SECP384R1,
        }
    }

    /// The curve of a namedCurve OID, if supported.
    pub fn from_oid(o: &ObjectIdentifier) -> Option<Self> {
        [Curve::P256, Curve::P384]
            .into_iter()
            .find(|c| c.oid() == *o)
    }

    /// The curve of an id-ecPublicKey SubjectPublicKeyInfo, if supported.
    pub fn of_spki(spki: &SubjectPublicKeyInfoOwned) -> Option<Self> {
        if spki.algorithm.oid != oid::ID_EC_PUBLIC_KEY {
            return None;
        }
        let named = spki
            .algorithm
            .parameters
            .as_ref()?
            .decode_as::<ObjectIdentifier>()
            .ok()?;
        Self::from_oid(&named)
    }

    /// Length of an uncompressed SEC1 point (`04 || X || Y`).
    pub fn uncompressed_point_len(self) -> usize {
        match self {
            Curve::P256 => 65,
            Curve::P384 => 97,
        }
    }

    /// The ECDSA signature algorithm a CA key on this curve signs with (the hash matched to
    /// the curve's strength, RFC 5480 §4 / Suite B): ecdsa-with-SHA256 or ecdsa-with-SHA384.
    pub fn signature_algorithm(self) -> ObjectIdentifier {
        match self {
            Curve::P256 => oid::ECDSA_WITH_SHA256,
            Curve::P384 => oid::ECDSA_WITH_SHA384,
        }
    }

    /// "P-256" or "P-384".
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

impl std::fmt::Display for Curve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Curve {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "P-256" | "p256" | "secp256r1" => Ok(Curve::P256),
            "P-384" | "p384" | "secp384r1" => Ok(Curve::P384),
            other => Err(format!("unknown curve {other:?} (P-256 or P-384)")),
        }
    }
}

/// ECDSA P-256 signer on ring, holding the parsed key pair (parsed once, not per signature).
///
/// ring draws the ECDSA nonce from a `SecureRandom`; that trait is sealed in ring 0.17, so the OS
/// generator (`SystemRandom`) is the only choice. It is the single source of randomness in the
/// `ca` module that the caller does not supply.
pub struct RingP256Signer(RingKey);

/// A ring ECDSA key pair with its SubjectPublicKeyInfo, shared by the P-256 and P-384 signers.
struct RingKey {
    key_pair: EcdsaKeyPair,
    rng: SystemRandom,
    spki_der: Vec<u8>,
}

impl RingKey {
    fn from_pkcs8_der(curve: Curve, der: &[u8]) -> Result<Self, CaError> {
        let alg = match curve {
            Curve::P256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            Curve::P384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
        };
        let rng = SystemRandom::new();
        let key_pair = EcdsaKeyPair::from_pkcs8(alg, der, &rng)
            .map_err(|e| CaError::KeyRejected(e.to_string()))?;
        let spki_der = ec_spki(curve, key_pair.public_key().as_ref())?.to_der()?;
        Ok(Self {
            key_pair,
            rng,
            spki_der,
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        let sig = self
            .key_pair
            .sign(&self.rng, message)
            .map_err(|_| CaError::SigningFailed)?;
        Ok(sig.as_ref().to_vec())
    }
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
        RingKey::from_pkcs8_der(Curve::P256, der).map(Self)
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
        self.0.key_pair.public_key().as_ref()
    }
}

impl Signer for RingP256Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        self.0.sign(message)
    }

    fn public_key_spki_der(&self) -> &[u8] {
        &self.0.spki_der
    }
}

/// ECDSA P-384 signer on ring (ecdsa-with-SHA384): the key of a P-384 issuing CA (DLMS/COSEM
/// security suite 2).
pub struct RingP384Signer(RingKey);

impl std::fmt::Debug for RingP384Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RingP384Signer").finish_non_exhaustive()
    }
}

impl RingP384Signer {
    /// Load a PKCS#8 DER P-384 private key (as written by [`generate_p384_pkcs8`] or
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384`).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CaError> {
        RingKey::from_pkcs8_der(Curve::P384, der).map(Self)
    }
}

impl Signer for RingP384Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        self.0.sign(message)
    }

    fn public_key_spki_der(&self) -> &[u8] {
        &self.0.spki_der
    }

    fn signature_algorithm(&self) -> ObjectIdentifier {
        oid::ECDSA_WITH_SHA384
    }
}

/// A software signer for a PKCS#8 DER EC private key on either supported curve: P-256
/// ([`RingP256Signer`]) or P-384 ([`RingP384Signer`]).
pub fn signer_from_pkcs8_der(der: &[u8]) -> Result<(Curve, Box<dyn Signer>), CaError> {
    match RingP256Signer::from_pkcs8_der(der) {
        Ok(s) => Ok((Curve::P256, Box::new(s))),
        Err(p256_err) => match RingP384Signer::from_pkcs8_der(der) {
            Ok(s) => Ok((Curve::P384, Box::new(s))),
            Err(_) => Err(CaError::KeyRejected(format!(
                "neither a P-256 nor a P-384 PKCS#8 EC key ({p256_err})"
            ))),
        },
    }
}

/// A fresh P-384 private key as PKCS#8 v1 DER, from ring (its generator is the OS's:
/// ring's `SecureRandom` is sealed).
pub fn generate_p384_pkcs8() -> Result<Vec<u8>, CaError> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &SystemRandom::new())
        .map_err(|_| CaError::KeyRejected("P-384 key generation failed".into()))?;
    Ok(doc.as_ref().to_vec())
}

/// The SubjectPublicKeyInfo of a PKCS#8 P-256 private key (e.g. one made by [`generate_p256_pkcs8`]
/// for server-side key generation, RFC 9148 §4.8 /skg).
pub fn p256_spki_from_pkcs8(pkcs8: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    let signer = RingP256Signer::from_pkcs8_der(pkcs8)?;
    p256_spki(signer.public_key_sec1())
}

/// The SubjectPublicKeyInfo of a PKCS#8 private key on P-256 or P-384 (server-side key
/// generation under a P-384 certificate profile).
pub fn spki_from_pkcs8(pkcs8: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    use der::Decode;
    let (_, signer) = signer_from_pkcs8_der(pkcs8)?;
    Ok(SubjectPublicKeyInfoOwned::from_der(
        signer.public_key_spki_der(),
    )?)
}

/// SubjectPublicKeyInfo of an uncompressed P-256 point (RFC 5480 §2: id-ecPublicKey, namedCurve secp256r1).
pub(crate) fn p256_spki(sec1_uncompressed: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    ec_spki(Curve::P256, sec1_uncompressed)
}

/// SubjectPublicKeyInfo of an uncompressed point on `curve` (RFC 5480 §2).
pub(crate) fn ec_spki(
    curve: Curve,
    sec1_uncompressed: &[u8],
) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: oid::ID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&curve.oid())?),
        },
        subject_public_key: BitString::from_bytes(sec1_uncompressed)?,
    })
}

/// An ECDSA AlgorithmIdentifier (ecdsa-with-SHA256/384); parameters absent (RFC 5758 §3.2).
pub(crate) fn ecdsa_with(alg: ObjectIdentifier) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: alg,
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
