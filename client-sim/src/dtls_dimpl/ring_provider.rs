//! A dimpl [`CryptoProvider`] on ring 0.17: thin adapters from dimpl's public provider traits
//! to ring's primitives, no cryptography of our own.
//!
//! | dimpl component          | ring                                                        |
//! |--------------------------|-------------------------------------------------------------|
//! | kx group secp256r1       | `agreement::ECDH_P256` ephemeral keys (RFC 8422 §5.10)     |
//! | key provider / signing   | `signature::EcdsaKeyPair` (P-256, SHA-256, ASN.1 DER sigs)  |
//! | signature verification   | rustls-webpki's ring ECDSA algorithms over the cert's SPKI  |
//! | hash                     | `digest::Context` (SHA-256, SHA-384, SHA-512)              |
//! | HMAC (drives the PRF)    | `hmac::sign`                                                |
//! | secure random            | `rand::SystemRandom`                                        |
//! | DTLS 1.2 suite           | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: `aead::AES_128_GCM` |
//! | DTLS 1.3 suite           | TLS_CHACHA20_POLY1305_SHA256: `aead::CHACHA20_POLY1305` and `aead::quic::CHACHA20` for the record-number mask |
//!
//! Only what the meter profile needs is offered: one DTLS 1.2 suite, one group (RFC 7925 §4.4:
//! secp256r1), ECDSA P-256 client keys. dimpl's `Config::build` refuses a provider without a
//! DTLS 1.3 suite and checks every component against known-answer vectors (hash, PRF,
//! signature verification, AEAD, record-number mask, a key-exchange round trip), so the
//! ChaCha20-Poly1305 DTLS 1.3 suite is there to satisfy that check (the meter speaks DTLS 1.2
//! only: `Dtls::new_12`). It is ChaCha rather than AES because ring exposes no raw AES block
//! function for the 16-byte AES record-number mask dimpl's check asks for; the QUIC ChaCha20
//! header-protection mask (RFC 9001 §5.4.4) is exactly DTLS 1.3's (RFC 9147 §4.2.3), of which
//! dimpl uses the first bytes only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use dimpl::crypto::{
    Aad, ActiveKeyExchange, Buf, Cipher, CryptoProvider, Dtls12CipherSuite, Dtls13CipherSuite,
    HashAlgorithm, HashContext, HashProvider, HmacProvider, KeyProvider, NamedGroup, Nonce,
    SecureRandom, SignatureAlgorithm, SignatureVerifier, SigningKey, SupportedDtls12CipherSuite,
    SupportedDtls13CipherSuite, SupportedKxGroup, TmpBuf,
};
use dimpl::{CryptoError, CryptoOperation};
use ring::aead::{self, LessSafeKey, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::SystemRandom;
use ring::signature::EcdsaKeyPair;

/// Parsed signing keys kept (a load generator reuses a few thousand device identities; dimpl
/// loads the private key again for every connection).
const MAX_KEYS: usize = 4096;
/// AEAD tag length of both suites (GCM and Poly1305).
const TAG_LEN: usize = 16;

/// The provider: all components are statics (dimpl holds `&'static dyn` references).
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        kx_groups: KX_GROUPS,
        signature_verification: &VERIFIER,
        key_provider: &KEYS,
        secure_random: &RANDOM,
        hash_provider: &HASHES,
        hmac_provider: &HMAC,
        cipher_suites: DTLS12_SUITES,
        dtls13_cipher_suites: DTLS13_SUITES,
    }
}

static KX_GROUPS: &[&dyn SupportedKxGroup] = &[&P256_KX];
static DTLS12_SUITES: &[&dyn SupportedDtls12CipherSuite] = &[&AES128_GCM_SHA256];
static DTLS13_SUITES: &[&dyn SupportedDtls13CipherSuite] = &[&TLS13_CHACHA20_POLY1305_SHA256];

fn failed(op: CryptoOperation) -> CryptoError {
    CryptoError::OperationFailed(op)
}

// ---------------------------------------------------------------------------------------------
// Key exchange: ECDHE on secp256r1 (RFC 8422 §5.10; uncompressed points, RFC 8422 §5.4.1).

#[derive(Debug)]
struct P256Kx;
static P256_KX: P256Kx = P256Kx;

impl SupportedKxGroup for P256Kx {
    fn name(&self) -> NamedGroup {
        NamedGroup::Secp256r1
    }

    fn start_exchange(&self, mut buf: Buf) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        let private = EphemeralPrivateKey::generate(&agreement::ECDH_P256, &SystemRandom::new())
            .map_err(|_| failed(CryptoOperation::GenerateEphemeralKey))?;
        let public = private
            .compute_public_key()
            .map_err(|_| failed(CryptoOperation::ComputePublicKey))?;
        buf.clear();
        buf.extend_from_slice(public.as_ref());
        Ok(Box::new(P256Exchange {
            private,
            public: buf,
        }))
    }
}

#[derive(Debug)]
struct P256Exchange {
    private: EphemeralPrivateKey,
    public: Buf,
}

impl ActiveKeyExchange for P256Exchange {
    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn complete(self: Box<Self>, peer_pub: &[u8], out: &mut Buf) -> Result<(), CryptoError> {
        // ring checks that the peer's point is on the curve (RFC 8422 §5.11).
        let peer = UnparsedPublicKey::new(&agreement::ECDH_P256, peer_pub);
        agreement::agree_ephemeral(self.private, &peer, |secret| {
            out.clear();
            out.extend_from_slice(secret);
        })
        .map_err(|_| CryptoError::InvalidPublicKey(NamedGroup::Secp256r1))
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::Secp256r1
    }
}

// ---------------------------------------------------------------------------------------------
// Signing: the meter's ECDSA P-256 key (IDevID / LDevID) from PKCS#8.

#[derive(Debug)]
struct RingSigningKey(Arc<EcdsaKeyPair>);

impl SigningKey for RingSigningKey {
    fn sign(&mut self, data: &[u8], hash: HashAlgorithm, out: &mut Buf) -> Result<(), CryptoError> {
        // The key is bound to ecdsa_secp256r1_sha256 (RFC 7925 §4.4.2), the one scheme offered.
        if hash != HashAlgorithm::SHA256 {
            return Err(CryptoError::SigningKeyUnsupportedHash {
                group: NamedGroup::Secp256r1,
                hash,
            });
        }
        let sig = self
            .0
            .sign(&SystemRandom::new(), data)
            .map_err(|_| failed(CryptoOperation::Sign))?;
        out.clear();
        out.extend_from_slice(sig.as_ref());
        Ok(())
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        HashAlgorithm::SHA256
    }

    fn supported_hash_algorithms(&self) -> &[HashAlgorithm] {
        &[HashAlgorithm::SHA256]
    }
}

/// PKCS#8 DER -> parsed key, with insertion order for eviction.
#[derive(Default)]
struct KeyCache {
    map: HashMap<Vec<u8>, Arc<EcdsaKeyPair>>,
    order: VecDeque<Vec<u8>>,
}

#[derive(Debug)]
struct RingKeys;
static KEYS: RingKeys = RingKeys;
static KEY_CACHE: Mutex<Option<KeyCache>> = Mutex::new(None);

/// Parses a P-256 PKCS#8 key, once per distinct key: ring's parse checks the key pair (a scalar
/// multiplication), and dimpl loads the key again for every connection.
pub(crate) fn load_p256_key(pkcs8: &[u8]) -> Result<Arc<EcdsaKeyPair>, CryptoError> {
    {
        let cache = KEY_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.as_ref().and_then(|c| c.map.get(pkcs8)) {
            return Ok(k.clone());
        }
    }
    let key = EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8,
        &SystemRandom::new(),
    )
    .map_err(|_| CryptoError::InvalidPrivateKey)?;
    let key = Arc::new(key);
    let mut guard = KEY_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(KeyCache::default);
    if !cache.map.contains_key(pkcs8) {
        while cache.order.len() >= MAX_KEYS {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        cache.order.push_back(pkcs8.to_vec());
        cache.map.insert(pkcs8.to_vec(), key.clone());
    }
    Ok(key)
}

impl KeyProvider for RingKeys {
    fn load_private_key(&self, key_der: &[u8]) -> Result<Box<dyn SigningKey>, CryptoError> {
        Ok(Box::new(RingSigningKey(load_p256_key(key_der)?)))
    }
}

/// The SubjectPublicKeyInfo-free public key of a parsed key (uncompressed point), for tests.
#[cfg(test)]
pub(crate) fn public_key(k: &EcdsaKeyPair) -> Vec<u8> {
    ring::signature::KeyPair::public_key(k).as_ref().to_vec()
}

// ---------------------------------------------------------------------------------------------
// Signature verification against the peer's leaf certificate (the ServerKeyExchange signature,
// RFC 8422 §5.4).

#[derive(Debug)]
struct Verifier;
static VERIFIER: Verifier = Verifier;

impl SignatureVerifier for Verifier {
    fn verify_signature(
        &self,
        cert_der: &[u8],
        data: &[u8],
        signature: &[u8],
        hash: HashAlgorithm,
        sig_alg: SignatureAlgorithm,
    ) -> Result<(), CryptoError> {
        use webpki::ring as alg;
        if sig_alg != SignatureAlgorithm::ECDSA {
            return Err(CryptoError::UnsupportedSignatureAlgorithm(sig_alg));
        }
        let der = rustls_pki_types::CertificateDer::from(cert_der);
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|_| CryptoError::CertificateParseFailed)?;
        // The certificate's curve picks the algorithm: webpki refuses one whose public-key
        // algorithm (curve) differs from the SPKI's before doing any arithmetic.
        let candidates: [(
            &dyn rustls_pki_types::SignatureVerificationAlgorithm,
            NamedGroup,
        ); 2] = match hash {
            HashAlgorithm::SHA256 => [
                (alg::ECDSA_P256_SHA256, NamedGroup::Secp256r1),
                (alg::ECDSA_P384_SHA256, NamedGroup::Secp384r1),
            ],
            HashAlgorithm::SHA384 => [
                (alg::ECDSA_P256_SHA384, NamedGroup::Secp256r1),
                (alg::ECDSA_P384_SHA384, NamedGroup::Secp384r1),
            ],
            _ => {
                return Err(CryptoError::UnsupportedSignatureVerification {
                    signature: sig_alg,
                    hash,
                    group: NamedGroup::Secp256r1,
                })
            }
        };
        for (a, group) in candidates {
            match cert.verify_signature(a, data, signature) {
                Ok(()) => return Ok(()),
                Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => continue,
                Err(_) => {
                    return Err(CryptoError::SignatureVerificationFailed {
                        signature: sig_alg,
                        hash,
                        group,
                    })
                }
            }
        }
        Err(CryptoError::UnsupportedPublicKeyAlgorithm)
    }
}

// ---------------------------------------------------------------------------------------------
// Hash, HMAC, random.

/// A running digest; `None` for an algorithm outside the profile: `create_hash` cannot fail, so
/// that digest is empty and matches nothing (dimpl only asks for its suites' hashes, SHA-256
/// here).
#[derive(Clone)]
struct RingHash(Option<ring::digest::Context>);

impl std::fmt::Debug for RingHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(c) => write!(f, "RingHash({:?})", c.algorithm()),
            None => f.write_str("RingHash(unsupported)"),
        }
    }
}

impl HashContext for RingHash {
    fn update(&mut self, data: &[u8]) {
        if let Some(c) = &mut self.0 {
            c.update(data);
        }
    }

    fn clone_and_finalize(&self, out: &mut Buf) {
        out.clear();
        if let Some(c) = &self.0 {
            out.extend_from_slice(c.clone().finish().as_ref());
        }
    }
}

fn digest_algorithm(h: HashAlgorithm) -> Option<&'static ring::digest::Algorithm> {
    match h {
        HashAlgorithm::SHA256 => Some(&ring::digest::SHA256),
        HashAlgorithm::SHA384 => Some(&ring::digest::SHA384),
        HashAlgorithm::SHA512 => Some(&ring::digest::SHA512),
        _ => None,
    }
}

#[derive(Debug)]
struct Hashes;
static HASHES: Hashes = Hashes;

impl HashProvider for Hashes {
    fn create_hash(&self, algorithm: HashAlgorithm) -> Box<dyn HashContext> {
        Box::new(RingHash(
            digest_algorithm(algorithm).map(ring::digest::Context::new),
        ))
    }
}

#[derive(Debug)]
struct Hmac;
static HMAC: Hmac = Hmac;

impl HmacProvider for Hmac {
    fn hmac(
        &self,
        hash: HashAlgorithm,
        key: &[u8],
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let alg = match hash {
            HashAlgorithm::SHA256 => ring::hmac::HMAC_SHA256,
            HashAlgorithm::SHA384 => ring::hmac::HMAC_SHA384,
            HashAlgorithm::SHA512 => ring::hmac::HMAC_SHA512,
            _ => return Err(CryptoError::UnsupportedHmacHash(hash)),
        };
        let tag = ring::hmac::sign(&ring::hmac::Key::new(alg, key), data);
        let tag = tag.as_ref();
        let dst = out
            .get_mut(..tag.len())
            .ok_or(failed(CryptoOperation::ComputeHmac))?;
        dst.copy_from_slice(tag);
        Ok(tag.len())
    }
}

#[derive(Debug)]
struct Random;
static RANDOM: Random = Random;

impl SecureRandom for Random {
    fn fill(&self, buf: &mut [u8]) -> Result<(), CryptoError> {
        ring::rand::SecureRandom::fill(&SystemRandom::new(), buf)
            .map_err(|_| failed(CryptoOperation::FillRandom))
    }
}

// ---------------------------------------------------------------------------------------------
// AEAD ciphers. dimpl builds the 12-byte nonce (RFC 5288 §3 for DTLS 1.2 GCM: 4-byte implicit
// salt + 8-byte explicit part; RFC 9147 §4 for DTLS 1.3) and the AAD; the cipher appends or
// checks and strips the 16-byte tag.

struct RingAead(LessSafeKey);

impl std::fmt::Debug for RingAead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingAead({:?})", self.0.algorithm())
    }
}

impl RingAead {
    fn new(alg: &'static aead::Algorithm, key: &[u8]) -> Result<Self, CryptoError> {
        let key = UnboundKey::new(alg, key).map_err(|_| failed(CryptoOperation::CreateCipher))?;
        Ok(RingAead(LessSafeKey::new(key)))
    }
}

impl Cipher for RingAead {
    fn encrypt(&mut self, plaintext: &mut Buf, aad: Aad, nonce: Nonce) -> Result<(), CryptoError> {
        self.0
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce.0),
                aead::Aad::from(&aad[..]),
                plaintext,
            )
            .map_err(|_| failed(CryptoOperation::Encrypt))
    }

    fn decrypt(
        &mut self,
        ciphertext: &mut TmpBuf,
        aad: Aad,
        nonce: Nonce,
    ) -> Result<(), CryptoError> {
        if ciphertext.len() < TAG_LEN {
            return Err(CryptoError::CiphertextTooShort {
                minimum: TAG_LEN as u8,
                actual: u8::try_from(ciphertext.len()).unwrap_or(u8::MAX),
            });
        }
        let n = self
            .0
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce.0),
                aead::Aad::from(&aad[..]),
                ciphertext.as_mut(),
            )
            .map_err(|_| failed(CryptoOperation::Decrypt))?
            .len();
        ciphertext.truncate(n);
        Ok(())
    }
}

/// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (RFC 5289 §3; DTLS use RFC 6347 §4.1.2.3).
#[derive(Debug)]
struct Aes128GcmSha256;
static AES128_GCM_SHA256: Aes128GcmSha256 = Aes128GcmSha256;

impl SupportedDtls12CipherSuite for Aes128GcmSha256 {
    fn suite(&self) -> Dtls12CipherSuite {
        Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        HashAlgorithm::SHA256
    }

    fn key_lengths(&self) -> (usize, usize, usize) {
        // (mac key, encryption key, implicit nonce salt): RFC 5288 §3.
        (0, 16, 4)
    }

    fn explicit_nonce_len(&self) -> usize {
        8
    }

    fn tag_len(&self) -> usize {
        TAG_LEN
    }

    fn create_cipher(&self, key: &[u8]) -> Result<Box<dyn Cipher>, CryptoError> {
        Ok(Box::new(RingAead::new(&aead::AES_128_GCM, key)?))
    }
}

/// TLS_CHACHA20_POLY1305_SHA256 for DTLS 1.3 (RFC 8446 §B.4), present for dimpl's provider check.
#[derive(Debug)]
struct Tls13ChaCha20Poly1305Sha256;
static TLS13_CHACHA20_POLY1305_SHA256: Tls13ChaCha20Poly1305Sha256 = Tls13ChaCha20Poly1305Sha256;

impl SupportedDtls13CipherSuite for Tls13ChaCha20Poly1305Sha256 {
    fn suite(&self) -> Dtls13CipherSuite {
        Dtls13CipherSuite::CHACHA20_POLY1305_SHA256
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        HashAlgorithm::SHA256
    }

    fn key_len(&self) -> usize {
        32
    }

    fn iv_len(&self) -> usize {
        12
    }

    fn tag_len(&self) -> usize {
        TAG_LEN
    }

    fn create_cipher(&self, key: &[u8]) -> Result<Box<dyn Cipher>, CryptoError> {
        Ok(Box::new(RingAead::new(&aead::CHACHA20_POLY1305, key)?))
    }

    /// RFC 9147 §4.2.3 with RFC 9001 §5.4.4's ChaCha20 mask (the first 5 bytes; the rest zero,
    /// as in dimpl's aws-lc-rs provider). A bad key length yields an all-zero mask, which makes
    /// the record number undecodable rather than panicking (the trait cannot fail).
    fn encrypt_sn(&self, sn_key: &[u8], sample: &[u8; 16]) -> [u8; 16] {
        let mut mask = [0u8; 16];
        let five = aead::quic::HeaderProtectionKey::new(&aead::quic::CHACHA20, sn_key)
            .and_then(|k| k.new_mask(sample));
        if let (Ok(five), Some(dst)) = (five, mask.get_mut(..5)) {
            dst.copy_from_slice(&five);
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dimpl_accepts_the_provider_and_its_known_answer_checks_pass() {
        // Config::build runs dimpl's provider validation (hash, PRF, signature verification,
        // DTLS 1.3 AEAD and record-number mask vectors, a P-256 key-exchange round trip).
        let cfg = dimpl::Config::builder()
            .with_crypto_provider(provider())
            .build()
            .unwrap();
        let suites: Vec<_> = cfg.dtls12_cipher_suites().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            vec![Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256]
        );
        let groups: Vec<_> = cfg.kx_groups().map(|g| g.name()).collect();
        assert_eq!(groups, vec![NamedGroup::Secp256r1]);
    }

    #[test]
    fn ecdhe_agrees_and_rejects_a_point_off_the_curve() {
        let a = P256_KX.start_exchange(Buf::new()).unwrap();
        let b = P256_KX.start_exchange(Buf::new()).unwrap();
        assert_eq!(a.pub_key().len(), 65);
        assert_eq!(a.pub_key()[0], 4, "uncompressed point");
        let (pa, pb) = (a.pub_key().to_vec(), b.pub_key().to_vec());
        let (mut sa, mut sb) = (Buf::new(), Buf::new());
        a.complete(&pb, &mut sa).unwrap();
        b.complete(&pa, &mut sb).unwrap();
        assert_eq!(sa.len(), 32);
        assert_eq!(&sa[..], &sb[..]);
        let c = P256_KX.start_exchange(Buf::new()).unwrap();
        let mut bad = pa.clone();
        bad[64] ^= 1;
        assert!(c.complete(&bad, &mut Buf::new()).is_err());
    }

    #[test]
    fn signatures_verify_against_the_certificate_and_tampering_fails() {
        let mut est = crate::testutil::FakeEst::new(51);
        let dev = est.device("SN510001");
        let mut key = KEYS.load_private_key(&dev.key_pkcs8_der).unwrap();
        let mut sig = Buf::new();
        key.sign(
            b"server key exchange params",
            HashAlgorithm::SHA256,
            &mut sig,
        )
        .unwrap();
        let cert = &dev.cert_chain_der[0];
        VERIFIER
            .verify_signature(
                cert,
                b"server key exchange params",
                &sig,
                HashAlgorithm::SHA256,
                SignatureAlgorithm::ECDSA,
            )
            .unwrap();
        assert!(VERIFIER
            .verify_signature(
                cert,
                b"server key exchange paramz",
                &sig,
                HashAlgorithm::SHA256,
                SignatureAlgorithm::ECDSA,
            )
            .is_err());
        assert!(key
            .sign(b"x", HashAlgorithm::SHA384, &mut Buf::new())
            .is_err());
        // Parsed once: the same key object comes back.
        let a = load_p256_key(&dev.key_pkcs8_der).unwrap();
        let b = load_p256_key(&dev.key_pkcs8_der).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(public_key(&a).len(), 65);
        assert!(KEYS.load_private_key(b"junk").is_err());
    }

    #[test]
    fn aes_gcm_round_trips_and_rejects_a_flipped_bit() {
        let mut c = AES128_GCM_SHA256.create_cipher(&[7u8; 16]).unwrap();
        let nonce = Nonce([1u8; 12]);
        let aad = || {
            let mut a = arrayvec_aad();
            a.0.try_extend_from_slice(&[9u8; 13]).unwrap();
            a
        };
        let mut b = Buf::new();
        b.extend_from_slice(b"coap payload");
        c.encrypt(&mut b, aad(), nonce).unwrap();
        assert_eq!(b.len(), 12 + 16);
        let mut ct = b.to_vec();
        let mut t = TmpBuf::new(&mut ct);
        c.decrypt(&mut t, aad(), nonce).unwrap();
        assert_eq!(t.as_ref(), b"coap payload");
        let mut ct = b.to_vec();
        ct[0] ^= 1;
        let mut t = TmpBuf::new(&mut ct);
        assert!(c.decrypt(&mut t, aad(), nonce).is_err());
        assert!(AES128_GCM_SHA256.create_cipher(&[0u8; 15]).is_err());
    }

    fn arrayvec_aad() -> Aad {
        // Aad's field (an ArrayVec) is public; start empty.
        Aad(Default::default())
    }
}
