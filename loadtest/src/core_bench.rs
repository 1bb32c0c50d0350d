//! Deterministic regression benchmark of the server core: one full enrollment's CPU path in
//! memory, counted in instructions under valgrind callgrind so that a change shows up
//! independent of machine noise.
//!
//! What one iteration runs (`enroll_once`, the only function callgrind collects):
//! * the EST-coaps exchanges of a full enrollment through the sans-IO core, driven as the daemon
//!   drives it: a fresh `EstSession` (one per DTLS session), `GET /crts`, then `POST /sen` with
//!   a PKCS#10 request — CoAP decode, dedup and encode, admission, policy (anchor class of the
//!   chain verified at the handshake), CSR parse + verify, certificate build + ring signature,
//!   PKCS#7 certs-only, the `Event::Commit` completed at once from an in-memory `MemoryStore`
//!   (the daemon's SQLite writer thread is not in this path);
//! * the handshake's public-key operations on the server side, with the server's backends:
//!   ServerKeyExchange sign (ring), CertificateVerify verify (ring), the client chain's
//!   validation by the policy's handshake verifier (rustls-webpki + ring, once), ECDHE (ring:
//!   ephemeral key + agreement, as est-dtls). The DTLS engine's own record and handshake code is
//!   not in this path; `loadtest dtls-bench` counts est-dtls's sessions (both sides) the same
//!   way, and the stepped load test measures everything for real.
//!
//! Everything else (CA generation, minting, CSR building on the "meter" side, client CoAP) runs
//! outside `enroll_once` and is not counted.

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use est_proto::ca::{self, IssuingCa, ObjectIdentifier, RingP256Signer};
use est_proto::coap::{
    Client, ClientConfig, ClientEvent, CoapConfig, Method, Request, ResponseType,
};
use est_proto::est::{EstConfig, EstService, CF_PKCS10, CF_PKCS7_CERTS_ONLY};
use est_proto::policy::{Policy, PolicyConfig};
use est_proto::session::{EstSession, Event, Peer};
use est_proto::store::MemoryStore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ring::agreement;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::{Deserialize, Serialize};

/// One prepared meter: IDevID chain and its CSR (built outside the measured path).
struct Prepared {
    chain: Vec<Vec<u8>>,
    csr: Vec<u8>,
}

/// Handshake crypto material of the "server".
struct HandshakeKeys {
    server_key: EcdsaKeyPair,
    client_sig: Vec<u8>,
    client_pub: Vec<u8>,
    /// The meter's ECDHE public key (uncompressed P-256 point).
    peer_point: Vec<u8>,
    rng: ring::rand::SystemRandom,
}

/// The hardware type (hardwareModuleName) of the benches' IDevIDs.
pub(crate) const BENCH_HW: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");

/// The benches' PKI: an issuing CA and a manufacturer CA (P-256, ring), valid from an hour ago
/// for ten years.
pub(crate) struct BenchCas {
    pub ca_cert: Vec<u8>,
    pub issuing: IssuingCa,
    pub mfr_cert: Vec<u8>,
    pub maker: IssuingCa,
    not_before: SystemTime,
    validity: Duration,
}

impl BenchCas {
    pub(crate) fn new(rng: &mut ChaCha8Rng) -> Result<Self> {
        let now = SystemTime::now();
        let nb = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
        let validity = Duration::from_secs(10 * 365 * 86_400);
        let (ca_cert, ca_key) =
            ca::generate_root_ca("Bench Issuing CA", "loadtest", nb, validity, rng)?;
        let (mfr_cert, mfr_key) =
            ca::generate_root_ca("Bench Manufacturer CA", "Bench Meters", nb, validity, rng)?;
        let maker = IssuingCa::new(
            mfr_cert.clone(),
            Box::new(RingP256Signer::from_pkcs8_der(&mfr_key)?),
        )?;
        let issuing = IssuingCa::new(
            ca_cert.clone(),
            Box::new(RingP256Signer::from_pkcs8_der(&ca_key)?),
        )?;
        Ok(Self {
            ca_cert,
            issuing,
            mfr_cert,
            maker,
            not_before: nb,
            validity,
        })
    }

    /// An IDevID-shaped certificate for `serial` signed by `issuer` (one of ours), valid as
    /// the CAs are: (certificate DER, PKCS#8 key DER).
    pub(crate) fn mint(
        &self,
        issuer: &IssuingCa,
        serial: &str,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let nb = self.not_before;
        Ok(ca::mint_idevid(
            issuer,
            serial,
            BENCH_HW,
            nb,
            nb + self.validity,
            rng,
        )?)
    }
}

/// The server core, set up once.
pub(crate) struct CoreBench {
    est: Arc<EstService>,
    store: Arc<MemoryStore>,
    coap: Arc<CoapConfig>,
    meters: Vec<Prepared>,
    hs: HandshakeKeys,
    rng: ChaCha8Rng,
}

impl CoreBench {
    /// Builds an issuing CA, a manufacturer CA and `n` meters with their CSRs, seeded.
    pub(crate) fn new(n: usize, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cas = BenchCas::new(&mut rng)?;
        let mut meters = Vec::with_capacity(n);
        for i in 0..n {
            let serial = format!("BENCH{i:06}");
            let (cert, _key) = cas.mint(&cas.maker, &serial, &mut rng)?;
            let key = client_sim::pki::EnrollmentKey::generate(&mut rng);
            let csr = client_sim::pki::build_csr(&key, &serial, Some(&cert))?;
            meters.push(Prepared {
                chain: vec![cert],
                csr,
            });
        }
        let BenchCas {
            ca_cert,
            issuing,
            mfr_cert,
            ..
        } = cas;
        let policy = Policy::new(PolicyConfig::default(), &[mfr_cert], &ca_cert)?;
        let store = Arc::new(MemoryStore::new());
        let est = Arc::new(EstService::new(
            EstConfig::default(),
            issuing,
            policy,
            store.clone(),
        )?);

        let sys = ring::rand::SystemRandom::new();
        let gen = |sys: &ring::rand::SystemRandom| -> Result<EcdsaKeyPair> {
            let p = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, sys)
                .map_err(|_| anyhow::anyhow!("ring keygen"))?;
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, p.as_ref(), sys)
                .map_err(|e| anyhow::anyhow!("ring: {e}"))
        };
        let server_key = gen(&sys)?;
        let client_key = gen(&sys)?;
        let client_sig = client_key
            .sign(&sys, &[7u8; 200])
            .map_err(|_| anyhow::anyhow!("ring sign"))?
            .as_ref()
            .to_vec();
        let peer = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &sys)
            .and_then(|k| k.compute_public_key())
            .map_err(|_| anyhow::anyhow!("ring ECDHE keygen"))?;
        let hs = HandshakeKeys {
            server_key,
            client_sig,
            client_pub: client_key.public_key().as_ref().to_vec(),
            peer_point: peer.as_ref().to_vec(),
            rng: sys,
        };
        Ok(Self {
            est,
            store,
            coap: Arc::new(CoapConfig::default()),
            meters,
            hs,
            rng,
        })
    }

    /// Runs every prepared enrollment; fails if any is not answered 2.05 / 2.01.
    pub(crate) fn run_all(&mut self) -> Result<()> {
        for i in 0..self.meters.len() {
            enroll_once(self, i)?;
        }
        Ok(())
    }
}

/// One exchange: client datagram(s) -> EstSession -> (commit, completed at once in memory) ->
/// response datagram(s) -> client.
fn exchange(
    store: &MemoryStore,
    session: &mut EstSession,
    client: &mut Client,
    req: Request,
) -> Result<ResponseType> {
    let now = Instant::now();
    client
        .start(now, req)
        .map_err(|e| anyhow::anyhow!("client: {e}"))?;
    // Bounded: a CSR or certificate of a few hundred bytes needs a handful of blocks at most.
    for _ in 0..64 {
        while let Some(d) = client.poll_transmit() {
            session.handle_datagram(now, SystemTime::now(), &d);
        }
        while let Some(Event::Commit { id, commit, .. }) = session.poll_event() {
            session.complete_commit(now, id, store.commit(&commit));
        }
        while let Some(out) = session.poll_transmit() {
            client.handle_datagram(now, &out);
        }
        if let Some(ev) = client.poll_event() {
            return match ev {
                ClientEvent::Response(r) => Ok(r.code),
                ClientEvent::Failed(e) => bail!("exchange failed: {e}"),
            };
        }
    }
    bail!("exchange did not finish")
}

/// One full enrollment's server-side CPU path (see the module docs). Not inlined, so that
/// callgrind's `--toggle-collect=*enroll_once*` counts exactly this.
#[inline(never)]
pub(crate) fn enroll_once(bench: &mut CoreBench, i: usize) -> Result<()> {
    // Handshake public-key operations (server side).
    let hs = &bench.hs;
    let ske = hs.server_key.sign(&hs.rng, black_box(&[1u8; 150]));
    black_box(ske.is_ok());
    // CertificateVerify (est-dtls, ring).
    let vk = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &hs.client_pub);
    black_box(vk.verify(&[7u8; 200], &hs.client_sig).is_ok());
    // ECDHE (est-dtls: ring).
    let eph = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &hs.rng)
        .map_err(|_| anyhow::anyhow!("ring ECDHE keygen"))?;
    black_box(eph.compute_public_key().map(|p| p.as_ref().len()).ok());
    let peer_key = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &hs.peer_point);
    black_box(agreement::agree_ephemeral(eph, &peer_key, |k| k.len()).ok());
    let (chain, csr) = match bench.meters.get(i) {
        Some(m) => (m.chain.clone(), m.csr.clone()),
        None => bail!("no prepared meter {i}"),
    };
    // The client chain, validated once by the policy as the daemon's handshake verifier does.
    let verified = bench
        .est
        .policy()
        .verify_peer_chain(&chain, SystemTime::now())
        .map_err(|e| anyhow::anyhow!("client chain: {e}"))?;

    // EST over CoAP through the sans-IO core.
    let peer = Peer {
        address: "127.0.0.1:40000".into(),
        relay: None,
        chain: Arc::new(chain),
        verified: Some(Arc::new(verified)),
    };
    let mut session = EstSession::new(bench.est.clone(), bench.coap.clone(), peer, &mut bench.rng);
    let mut client = Client::new(ClientConfig::default(), i as u64);
    let crts = Request::new(Method::Get, "/.well-known/est/crts").with_accept(CF_PKCS7_CERTS_ONLY);
    let code = exchange(&bench.store, &mut session, &mut client, crts)?;
    if code != ResponseType::Content {
        bail!("/crts answered {code:?}");
    }
    let sen = Request::new(Method::Post, "/.well-known/est/sen")
        .with_payload(CF_PKCS10, csr)
        .with_accept(CF_PKCS7_CERTS_ONLY);
    let code = exchange(&bench.store, &mut session, &mut client, sen)?;
    if code != ResponseType::Changed
        && code != ResponseType::Created
        && code != ResponseType::Content
    {
        bail!("/sen answered {code:?}");
    }
    Ok(())
}

/// Runs the core path of `iterations` enrollments natively; microseconds per enrollment.
pub(crate) fn run_native(iterations: usize) -> Result<f64> {
    let mut b = CoreBench::new(iterations, 0xbe9c)?;
    let t = Instant::now();
    b.run_all()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iterations.max(1) as f64)
}

/// Instruction counts of the core path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct CallgrindResult {
    pub iterations: u64,
    /// Instructions executed inside `enroll_once`, summed.
    pub instructions: u64,
    pub instructions_per_enrollment: u64,
    pub command: String,
    /// The callgrind output file (open with callgrind_annotate).
    pub out_file: String,
}

/// Parses the `summary:` (or `totals:`) line of a callgrind output file.
pub(crate) fn parse_callgrind_total(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs `exe core-bench --iterations N` under valgrind callgrind, collecting only `enroll_once`.
pub(crate) fn run_callgrind(
    exe: &Path,
    iterations: u64,
    out_dir: &Path,
) -> Result<CallgrindResult> {
    let out_file = out_dir.join("callgrind.core.out");
    let args = vec![
        "--tool=callgrind".to_string(),
        "--toggle-collect=*enroll_once*".to_string(),
        format!("--callgrind-out-file={}", out_file.display()),
        exe.display().to_string(),
        "core-bench".to_string(),
        "--iterations".to_string(),
        iterations.to_string(),
    ];
    let command = format!("valgrind {}", args.join(" "));
    let out = Command::new("valgrind")
        .args(&args)
        .output()
        .context("running valgrind (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "{command} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&out_file)
        .with_context(|| format!("reading {}", out_file.display()))?;
    let instructions =
        parse_callgrind_total(&text).context("no summary line in callgrind output")?;
    if instructions == 0 {
        bail!("callgrind counted no instructions in enroll_once (symbol not found?)");
    }
    Ok(CallgrindResult {
        iterations,
        instructions,
        instructions_per_enrollment: instructions / iterations.max(1),
        command,
        out_file: out_file.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn core_path_enrolls_distinct_meters_and_refuses_nothing() {
        let mut b = CoreBench::new(3, 11).unwrap();
        assert_eq!(b.meters.len(), 3);
        b.run_all().unwrap();
        // A fourth call with an unknown index is an error, not a panic.
        assert!(enroll_once(&mut b, 3).is_err());
    }

    #[test]
    fn callgrind_summary_is_parsed() {
        let text = "events: Ir\nfn=foo\n1 2\nsummary: 123456\ntotals: 123456\n";
        assert_eq!(parse_callgrind_total(text), Some(123456));
        assert_eq!(parse_callgrind_total("events: Ir\n"), None);
    }
}
