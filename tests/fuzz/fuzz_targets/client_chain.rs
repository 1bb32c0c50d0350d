//! Fuzz target: the client certificate chain a meter presents in the DTLS handshake, as the server
//! validates it (`Policy::verify_peer_chain`, run by the handshake verifier) and as the EST policy
//! authenticates it (`Policy::authenticate`, with and without the handshake's `VerifiedChain`).
//!
//! Input, first byte = mode:
//! * even: up to 5 certificates, each a 2-byte big-endian length then its bytes (arbitrary DER);
//! * odd: a genuine IDevID chain (minted at start-up from the trusted manufacturer CA) with the
//!   rest of the input applied as (position, xor) byte edits, so the fuzzer works on nearly valid
//!   certificates without seed files.
//!
//! Invariants: no panic; a chain accepted at the handshake is accepted by the policy for exactly
//! its anchor class and refused for the other; the policy's own verification (no
//! `VerifiedChain`) agrees with the handshake's; a `VerifiedChain` never vouches for another
//! chain (authenticating chain B with A's verification equals authenticating B alone). For
//! every certificate that parses, `ca::name_string` of its subject and issuer (the store's
//! subject column) equals x509-cert's `Display` of them.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use est_proto::ca::{self, IssuingCa, ObjectIdentifier, RingP256Signer};
use est_proto::policy::{AnchorClass, Policy, PolicyConfig};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

struct Fixture {
    policy: Policy,
    genuine: Vec<Vec<u8>>,
    now: SystemTime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let day = Duration::from_secs(86_400);
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ca = |name: &str, rng: &mut rand_chacha::ChaCha20Rng| {
            let (cert, key) =
                ca::generate_root_ca(name, "Fuzz", now - day, 3650 * day, rng).expect("CA");
            let signer = RingP256Signer::from_pkcs8_der(&key).expect("key");
            IssuingCa::new(cert, Box::new(signer)).expect("CA")
        };
        let maker = ca("Maker CA", &mut rng);
        let ours = ca("EST CA", &mut rng);
        let hw = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");
        let (idevid, _) =
            ca::mint_idevid(&maker, "SN1", hw, now - day, now + day, &mut rng).expect("IDevID");
        let policy = Policy::new(
            PolicyConfig::default(),
            &[maker.certificate_der().to_vec()],
            ours.certificate_der(),
        )
        .expect("policy");
        Fixture {
            policy,
            genuine: vec![idevid],
            now,
        }
    })
}

fn chain_from(data: &[u8]) -> Vec<Vec<u8>> {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 1 {
        let mut chain = f.genuine.clone();
        for edit in rest.chunks_exact(3) {
            if let Some(cert) = chain.first_mut() {
                let pos = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % cert.len().max(1);
                if let Some(b) = cert.get_mut(pos) {
                    *b ^= edit[2];
                }
            }
        }
        return chain;
    }
    let mut chain = Vec::new();
    let mut rest = rest;
    while chain.len() < 5 && rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        chain.push(body[..take].to_vec());
        rest = &body[take..];
    }
    chain
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let chain = chain_from(data);
    for der in &chain {
        if let Ok(cert) = <ca::Certificate as der::Decode>::from_der(der) {
            let tbs = &cert.tbs_certificate;
            assert_eq!(ca::name_string(&tbs.subject), tbs.subject.to_string());
            assert_eq!(ca::name_string(&tbs.issuer), tbs.issuer.to_string());
        }
    }
    let at_handshake = f.policy.verify_peer_chain(&chain, f.now);
    for class in [AnchorClass::Manufacturer, AnchorClass::Operational] {
        let alone = f.policy.authenticate(class, &chain, None, f.now);
        match &at_handshake {
            Ok(v) => {
                let with = f.policy.authenticate(class, &chain, Some(v), f.now);
                assert_eq!(with.is_ok(), v.class() == class);
                assert_eq!(alone.is_ok(), with.is_ok());
            }
            Err(_) => assert!(alone.is_err()),
        }
        // The genuine chain's verification does not vouch for the fuzzed chain.
        let genuine = f
            .policy
            .verify_peer_chain(&f.genuine, f.now)
            .expect("genuine chain");
        let borrowed = f.policy.authenticate(class, &chain, Some(&genuine), f.now);
        assert_eq!(borrowed.is_ok(), alone.is_ok());
    }
});
