//! The crypto ceiling: what the elliptic-curve operations of one enrollment cost on this machine,
//! measured with the exact backends the server uses, and the enrollments/s that bounds.
//!
//! Backends (why these: docs/design.md §3):
//! * ECDSA P-256 sign and verify: `ring` 0.17. Our CA signs with `RingP256Signer`, CSR and chain
//!   checks verify with `ring::signature`, and the DTLS engine (est-dtls) signs the
//!   ServerKeyExchange and verifies the client's chain and CertificateVerify with ring.
//! * ECDHE P-256: the DTLS engine's own `est_dtls::crypto::EphemeralKey` (ring's `agreement`):
//!   ephemeral key generation, public key encoding, shared secret.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::{Deserialize, Serialize};

/// Server-side operations per full enrollment, by the model of the issue: handshake
/// (ServerKeyExchange sign, client certificate verify, CertificateVerify verify, ECDHE) and EST
/// (CSR verify, certificate sign).
pub(crate) const MODEL_SIGNS: u32 = 2;
pub(crate) const MODEL_VERIFIES: u32 = 3;
pub(crate) const MODEL_ECDH: u32 = 1;
/// As implemented: CertificateVerify (est-dtls), the client chain (once, by our handshake
/// verifier; the EST policy reuses the result) and the CSR's proof of possession.
pub(crate) const IMPLEMENTED_VERIFIES: u32 = 3;

/// One measured operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct OpCost {
    pub name: String,
    pub backend: String,
    pub iterations: u64,
    pub us_per_op: f64,
    pub ops_per_s: f64,
}

/// The crypto ceiling of one full enrollment on this machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Ceiling {
    pub sign: OpCost,
    pub verify: OpCost,
    pub ecdh: OpCost,
    /// 2 sign + 3 verify + 1 ECDH, microseconds.
    pub model_us_per_enrollment: f64,
    /// What est-server does, microseconds: since the client chain is verified once at the
    /// handshake (CertificateVerify, chain, CSR: 3 verifies) this equals the model.
    pub implemented_us_per_enrollment: f64,
    /// 1e6 / model cost: enrollments/s one core could do if crypto were all it did.
    pub ceiling_per_core: f64,
    /// Cores the server can use (available parallelism, or the pinned CPU count).
    pub server_cores: f64,
    /// ceiling_per_core * server_cores.
    pub ceiling: f64,
}

fn time_op(name: &str, backend: &str, budget: Duration, mut op: impl FnMut()) -> OpCost {
    // Warm up (page in code, fill caches), then run batches until the budget is spent.
    for _ in 0..20 {
        op();
    }
    // At least one batch, so a zero budget still yields a finite figure.
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        for _ in 0..32 {
            op();
        }
        n += 32;
        if start.elapsed() >= budget {
            break;
        }
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    OpCost {
        name: name.into(),
        backend: backend.into(),
        iterations: n,
        us_per_op: us,
        ops_per_s: 1e6 / us,
    }
}

/// Measures sign, verify and ECDH for `budget` each (single thread) and derives the ceiling.
pub(crate) fn measure(budget: Duration, server_cores: f64) -> Result<Ceiling> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("ring: key generation failed"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("ring: {e}"))?;
    // About the size of an LDevID's TBSCertificate.
    let msg = [0x5au8; 320];
    let sig = key
        .sign(&rng, &msg)
        .map_err(|_| anyhow::anyhow!("ring: sign failed"))?;
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    public
        .verify(&msg, sig.as_ref())
        .map_err(|_| anyhow::anyhow!("ring: verify of our own signature failed"))?;

    let sign = time_op("ECDSA P-256 sign", "ring 0.17", budget, || {
        let s = key.sign(&rng, black_box(&msg));
        black_box(s.is_ok());
    });
    let verify = time_op("ECDSA P-256 verify", "ring 0.17", budget, || {
        black_box(public.verify(black_box(&msg), sig.as_ref()).is_ok());
    });

    // ECDHE as the server's DTLS engine does it: fresh ephemeral key, encoded public key,
    // agreement with the peer's point.
    use est_dtls::crypto::{EphemeralKey, NamedGroup};
    let peer = EphemeralKey::generate(NamedGroup::Secp256r1, &rng)
        .map_err(|e| anyhow::anyhow!("ECDH: {e}"))?;
    let peer_pub = peer.public_key().to_vec();
    EphemeralKey::generate(NamedGroup::Secp256r1, &rng)
        .and_then(|k| k.agree(&peer_pub))
        .map_err(|e| anyhow::anyhow!("ECDH: {e}"))
        .context("est-dtls ECDH self-test")?;
    let ecdh = time_op(
        "ECDH P-256 (ephemeral keygen + agree)",
        "est-dtls (ring 0.17)",
        budget,
        || {
            if let Ok(secret) = EphemeralKey::generate(NamedGroup::Secp256r1, &rng) {
                let ours = secret.public_key().len();
                let shared = secret.agree(black_box(&peer_pub));
                black_box((ours, shared.map(|s| s.len()).ok()));
            }
        },
    );

    let model = f64::from(MODEL_SIGNS) * sign.us_per_op
        + f64::from(MODEL_VERIFIES) * verify.us_per_op
        + f64::from(MODEL_ECDH) * ecdh.us_per_op;
    let implemented = model + f64::from(IMPLEMENTED_VERIFIES - MODEL_VERIFIES) * verify.us_per_op;
    let per_core = 1e6 / model;
    Ok(Ceiling {
        sign,
        verify,
        ecdh,
        model_us_per_enrollment: model,
        implemented_us_per_enrollment: implemented,
        ceiling_per_core: per_core,
        server_cores,
        ceiling: per_core * server_cores,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ceiling_adds_up_from_the_measured_operations() {
        let c = measure(Duration::from_millis(20), 2.0).unwrap();
        for op in [&c.sign, &c.verify, &c.ecdh] {
            assert!(op.iterations >= 32 && op.us_per_op > 0.0, "{op:?}");
            assert!((op.ops_per_s * op.us_per_op - 1e6).abs() < 1.0);
        }
        let model = 2.0 * c.sign.us_per_op + 3.0 * c.verify.us_per_op + c.ecdh.us_per_op;
        assert!((c.model_us_per_enrollment - model).abs() < 1e-6);
        assert!((c.implemented_us_per_enrollment - c.model_us_per_enrollment).abs() < 1e-6);
        assert!((c.ceiling - 2.0 * 1e6 / model).abs() < 1e-6);
    }
}
