//! In-memory tests of the EST resources and the enrollment policy, on a fixed clock and
//! a seeded RNG: every decision tested both ways (allowed and refused).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ca::Signer;
use coap_lite::ResponseType;
use der::{Decode, Encode};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use x509_cert::Certificate;

use super::*;
use crate::ca::{HardwareModuleName, Name, ObjectIdentifier, RingP256Signer};
use crate::policy::{PolicyConfig, OID_COMMON_NAME, OID_SERIAL_NUMBER};
use crate::store::MemoryStore;

const HW_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");
const DAY: Duration = Duration::from_secs(86_400);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

struct Pki {
    rng: ChaCha20Rng,
    maker: IssuingCa,
    rogue: IssuingCa,
    issuing_der: Vec<u8>,
    issuing_key: Vec<u8>,
}

fn ca(name: &str, org: &str, rng: &mut ChaCha20Rng) -> (Vec<u8>, Vec<u8>, IssuingCa) {
    let (cert, key) =
        ca::generate_root_ca(name, org, now() - 10 * DAY, 3650 * DAY, rng).expect("CA");
    let signer = RingP256Signer::from_pkcs8_der(&key).expect("key");
    let issuing = IssuingCa::new(cert.clone(), Box::new(signer)).expect("CA");
    (cert, key, issuing)
}

impl Pki {
    fn new() -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (_, _, maker) = ca("Maker CA", "Maker", &mut rng);
        let (_, _, rogue) = ca("Rogue CA", "Rogue", &mut rng);
        let (issuing_der, issuing_key, _) = ca("EST Issuing CA", "est", &mut rng);
        Self {
            rng,
            maker,
            rogue,
            issuing_der,
            issuing_key,
        }
    }

    fn issuing(&self) -> IssuingCa {
        IssuingCa::new(
            self.issuing_der.clone(),
            Box::new(RingP256Signer::from_pkcs8_der(&self.issuing_key).expect("key")),
        )
        .expect("CA")
    }

    fn idevid(&mut self, serial: &str, not_after: SystemTime) -> (Vec<u8>, Vec<u8>) {
        ca::mint_idevid(
            &self.maker,
            serial,
            HW_TYPE,
            now() - 5 * DAY,
            not_after,
            &mut self.rng,
        )
        .expect("IDevID")
    }

    fn service(&self, policy: PolicyConfig, est: EstConfig) -> (EstService, Arc<MemoryStore>) {
        let store = Arc::new(MemoryStore::new());
        let policy = Policy::new(
            policy,
            &[self.maker.certificate_der().to_vec()],
            &self.issuing_der,
        )
        .expect("policy");
        let dyn_store: Arc<dyn Store> = store.clone();
        let svc = EstService::new(est, self.issuing(), policy, dyn_store).expect("service");
        (svc, store)
    }

    fn key(&mut self) -> (Vec<u8>, RingP256Signer) {
        let pkcs8 = ca::generate_p256_pkcs8(&mut self.rng).expect("key");
        let signer = RingP256Signer::from_pkcs8_der(&pkcs8).expect("key");
        (pkcs8, signer)
    }
}

fn name(attrs: &[(ObjectIdentifier, &str)]) -> Name {
    ca::name_from_attrs(attrs).expect("name")
}

fn csr(signer: &RingP256Signer, subject: &Name) -> Vec<u8> {
    ca::build_csr(signer, subject, None, None).expect("csr")
}

fn post(op: &str, payload: Vec<u8>) -> Request {
    Request::new(Method::Post, &format!("/.well-known/est/{op}")).with_payload(CF_PKCS10, payload)
}

/// Serves `req` through both phases, committing each write to the service's store at once
/// (the session object's behaviour on the wire is tested in `crate::session`).
fn serve(
    svc: &EstService,
    ctx: &RequestContext<'_>,
    req: &Request,
    rng: &mut ChaCha20Rng,
) -> Response {
    let mut step = svc.begin(ctx, req, rng);
    loop {
        match step {
            Step::Respond(r) => return r,
            Step::Commit(commit, then) => {
                let result = crate::store::commit_and_wait(svc.store().as_ref(), commit);
                step = svc.resume(*then, result);
            }
        }
    }
}

/// As the daemon calls: the chain was validated at the handshake
/// ([`Policy::verify_peer_chain`]). A chain that fails there never reaches EST over DTLS;
/// here it still does, without a `VerifiedChain`, so the policy's own full check answers.
fn call(svc: &EstService, chain: &[Vec<u8>], req: &Request, rng: &mut ChaCha20Rng) -> Response {
    let verified = svc.policy().verify_peer_chain(chain, now()).ok();
    let ctx = RequestContext {
        peer: "192.0.2.1:5684",
        relay: None,
        client_chain: chain,
        verified: verified.as_ref(),
        now: now(),
    };
    serve(svc, &ctx, req, rng)
}

/// Without the handshake's verification: the policy verifies the chain itself.
fn call_unverified(
    svc: &EstService,
    chain: &[Vec<u8>],
    req: &Request,
    rng: &mut ChaCha20Rng,
) -> Response {
    let ctx = RequestContext {
        peer: "192.0.2.1:5684",
        relay: None,
        client_chain: chain,
        verified: None,
        now: now(),
    };
    serve(svc, &ctx, req, rng)
}

#[test]
fn handshake_verification_names_the_anchor_class_and_vouches_for_its_chain_only() {
    use crate::policy::{AnchorClass, PolicyError};
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let policy = svc.policy();
    let dev = device(&mut pki, "SN1");
    let idevid = policy.verify_peer_chain(&dev.chain, now()).expect("IDevID");
    assert_eq!(idevid.class(), AnchorClass::Manufacturer);
    // For the handshake, the same verification with the leaf parsed once.
    let (with_leaf, leaf) = policy
        .verify_peer_chain_with_leaf(&dev.chain, now())
        .expect("IDevID");
    assert_eq!(with_leaf.class(), AnchorClass::Manufacturer);
    assert_eq!(leaf.to_der().expect("der"), dev.chain[0]);

    // Enrolled without the handshake's verification, then with it: same policy outcome.
    let req = post("sen", csr(&dev.signer, &name(&[])));
    let ldevid = only_cert(&call_unverified(&svc, &dev.chain, &req, &mut pki.rng));
    assert_eq!(
        only_cert(&call(&svc, &dev.chain, &req, &mut pki.rng)),
        ldevid,
        "a retried sen is answered from the store"
    );
    let ldevid_chain = vec![ldevid.to_der().expect("der")];
    let operational = policy
        .verify_peer_chain(&ldevid_chain, now())
        .expect("LDevID");
    assert_eq!(operational.class(), AnchorClass::Operational);

    // The class must fit the operation.
    let device = policy
        .authenticate(AnchorClass::Manufacturer, &dev.chain, Some(&idevid), now())
        .expect("IDevID on sen");
    assert_eq!(device.device_id, "SN1");
    assert!(matches!(
        policy.authenticate(AnchorClass::Operational, &dev.chain, Some(&idevid), now()),
        Err(PolicyError::UntrustedIssuer(_))
    ));
    assert!(matches!(
        policy.authenticate(
            AnchorClass::Manufacturer,
            &ldevid_chain,
            Some(&operational),
            now()
        ),
        Err(PolicyError::UntrustedIssuer(_))
    ));

    // A VerifiedChain cannot vouch for another chain: a rogue device presenting the genuine
    // IDevID's verification is verified afresh and refused.
    let (rogue_cert, _) = ca::mint_idevid(
        &pki.rogue,
        "SN1",
        HW_TYPE,
        now() - DAY,
        now() + DAY,
        &mut pki.rng,
    )
    .expect("rogue");
    let rogue_chain = vec![rogue_cert];
    assert!(matches!(
        policy.verify_peer_chain(&rogue_chain, now()),
        Err(PolicyError::UntrustedIssuer(_))
    ));
    assert!(matches!(
        policy.authenticate(
            AnchorClass::Manufacturer,
            &rogue_chain,
            Some(&idevid),
            now()
        ),
        Err(PolicyError::UntrustedIssuer(_))
    ));

    // Validity is checked again at request time.
    assert!(matches!(
        policy.authenticate(
            AnchorClass::Manufacturer,
            &dev.chain,
            Some(&idevid),
            now() + 4000 * DAY
        ),
        Err(PolicyError::Expired)
    ));
    assert!(matches!(
        policy.verify_peer_chain(&[], now()),
        Err(PolicyError::NoClientCertificate)
    ));
    assert!(matches!(
        policy.verify_peer_chain(&[b"not a certificate".to_vec()], now()),
        Err(PolicyError::MalformedCertificate)
    ));
    assert!(matches!(
        policy.verify_peer_chain(&vec![dev.chain[0].clone(); 5], now()),
        Err(PolicyError::ChainTooLong)
    ));
    assert_eq!(store.certificates().len(), 1);
}

fn only_cert(resp: &Response) -> Certificate {
    assert_eq!(
        resp.code,
        ResponseType::Changed,
        "{:?}",
        String::from_utf8_lossy(&resp.payload)
    );
    let der = match resp.content_format {
        Some(CF_PKCS7_CERTS_ONLY) => {
            let certs = ca::certs_from_certs_only(&resp.payload).expect("p7");
            assert_eq!(certs.len(), 1);
            certs.into_iter().next().expect("one")
        }
        Some(CF_PKIX_CERT) => resp.payload.clone(),
        other => panic!("unexpected Content-Format {other:?}"),
    };
    Certificate::from_der(&der).expect("certificate")
}

fn assert_refused(resp: &Response, code: ResponseType, needle: &str) {
    assert_eq!(
        resp.code,
        code,
        "payload: {}",
        String::from_utf8_lossy(&resp.payload)
    );
    let text = String::from_utf8_lossy(&resp.payload);
    assert!(
        text.contains(needle),
        "diagnostic {text:?} lacks {needle:?}"
    );
    assert!(resp.payload.len() < 128, "diagnostic payloads stay short");
}

struct Device {
    chain: Vec<Vec<u8>>,
    signer: RingP256Signer,
}

fn device(pki: &mut Pki, serial: &str) -> Device {
    let (cert, _key) = pki.idevid(serial, now() + 3650 * DAY);
    let (_, signer) = pki.key();
    Device {
        chain: vec![cert],
        signer,
    }
}

#[test]
fn sen_issues_an_ldevid_whose_subject_comes_from_the_idevid() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    // The CSR asks for a different CN: policy decides the subject, not the CSR.
    let req = post(
        "sen",
        csr(
            &dev.signer,
            &name(&[(OID_COMMON_NAME, "please-make-me-admin")]),
        ),
    );
    let resp = call(&svc, &dev.chain, &req, &mut pki.rng);
    let cert = only_cert(&resp);
    let tbs = &cert.tbs_certificate;
    assert_eq!(ca::serial_number_attr(&tbs.subject).as_deref(), Some("SN1"));
    assert_eq!(ca::common_name(&tbs.subject).as_deref(), Some("SN1"));
    assert_eq!(
        tbs.subject_public_key_info.subject_public_key.raw_bytes(),
        dev.signer.public_key_sec1(),
        "the certificate certifies the CSR's key"
    );
    assert_eq!(
        ca::hardware_module_from_cert(&cert),
        Some(HardwareModuleName::new(HW_TYPE, b"SN1").expect("hmn")),
        "hardwareModuleName carried over from the IDevID"
    );
    assert_eq!(
        tbs.issuer.to_der().expect("der"),
        Certificate::from_der(&pki.issuing_der)
            .expect("ca")
            .tbs_certificate
            .subject
            .to_der()
            .expect("der")
    );
    let nb = tbs.validity.not_before.to_system_time();
    let na = tbs.validity.not_after.to_system_time();
    assert_eq!(nb, now() - Duration::from_secs(300));
    assert_eq!(na, now() + 365 * DAY);
    let certs = store.certificates();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].der, cert.to_der().expect("der"));
    assert_eq!(certs[0].status, crate::store::CertStatus::Active);
    let audit = store.audit_events();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].outcome.as_str(), audit[0].device_id.as_str()),
        ("issued", "SN1")
    );
}

/// An enrollment that came through a join proxy records it in every audit row: issued,
/// replayed and refused.
#[test]
fn the_audit_records_the_relay() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let verified = svc.policy().verify_peer_chain(&dev.chain, now()).ok();
    let ctx = RequestContext {
        peer: "198.51.100.4:7634/jpy:0a1b2c3d4e5f",
        relay: Some("198.51.100.4:7634"),
        client_chain: &dev.chain,
        verified: verified.as_ref(),
        now: now(),
    };
    let req = post("sen", csr(&dev.signer, &name(&[])));
    assert_eq!(
        serve(&svc, &ctx, &req, &mut pki.rng).code,
        ResponseType::Changed
    );
    assert_eq!(
        serve(&svc, &ctx, &req, &mut pki.rng).code,
        ResponseType::Changed
    );
    let bad = post("sen", b"not a CSR".to_vec());
    assert!(serve(&svc, &ctx, &bad, &mut pki.rng).code != ResponseType::Changed);
    let audit = store.audit_events();
    let outcomes: Vec<&str> = audit.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["issued", "replayed", "refused"]);
    for a in &audit {
        assert_eq!(a.relay.as_deref(), Some("198.51.100.4:7634"));
        assert_eq!(a.peer, "198.51.100.4:7634/jpy:0a1b2c3d4e5f");
    }
    // A direct enrollment has none.
    let dev2 = device(&mut pki, "SN2");
    call(
        &svc,
        &dev2.chain,
        &post("sen", csr(&dev2.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(store.audit_events().last().unwrap().relay, None);
}

#[test]
fn accept_287_returns_a_bare_certificate_and_9999_is_not_acceptable() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let req = post("sen", csr(&dev.signer, &name(&[]))).with_accept(CF_PKIX_CERT);
    let resp = call(&svc, &dev.chain, &req, &mut pki.rng);
    assert_eq!(resp.content_format, Some(CF_PKIX_CERT));
    only_cert(&resp);
    let req = post("sen", csr(&dev.signer, &name(&[]))).with_accept(9999);
    assert_refused(
        &call(&svc, &dev.chain, &req, &mut pki.rng),
        ResponseType::NotAcceptable,
        "9999",
    );
    assert_eq!(store.certificates().len(), 1);
}

#[test]
fn a_retried_sen_gets_the_same_certificate_not_a_second_one() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let req = post("sen", csr(&dev.signer, &name(&[])));
    let first = call(&svc, &dev.chain, &req, &mut pki.rng);
    let second = call(&svc, &dev.chain, &req, &mut pki.rng);
    assert_eq!(only_cert(&first), only_cert(&second));
    assert_eq!(store.certificates().len(), 1);
    let outcomes: Vec<String> = store
        .audit_events()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, vec!["issued", "replayed"]);
    let c = svc.counters();
    assert_eq!((c.issued, c.replayed, c.refused), (1, 1, 0));
    // A different CSR is a new enrollment and supersedes the first certificate.
    let (_, other_key) = pki.key();
    let third = call(
        &svc,
        &dev.chain,
        &post("sen", csr(&other_key, &name(&[]))),
        &mut pki.rng,
    );
    assert_ne!(only_cert(&third), only_cert(&first));
    let certs = store.certificates();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0].status, crate::store::CertStatus::Superseded);
    assert_eq!(certs[1].status, crate::store::CertStatus::Active);
}

#[test]
fn sren_renews_with_the_same_subject_and_supersedes_the_old_certificate() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let ldevid = only_cert(&call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    ));
    let ldevid_chain = vec![ldevid.to_der().expect("der")];
    let subject = ldevid.tbs_certificate.subject.clone();

    // Refused: the subject differs from the certificate being renewed (RFC 7030 §4.2.2).
    let (_, new_key) = pki.key();
    let wrong = post("sren", csr(&new_key, &name(&[(OID_SERIAL_NUMBER, "SN1")])));
    assert_refused(
        &call(&svc, &ldevid_chain, &wrong, &mut pki.rng),
        ResponseType::Forbidden,
        "subject",
    );
    // Refused: an IDevID cannot re-enroll.
    let good = post("sren", csr(&new_key, &subject));
    assert_refused(
        &call(&svc, &dev.chain, &good, &mut pki.rng),
        ResponseType::Forbidden,
        "issuing CA",
    );
    assert_eq!(store.certificates().len(), 1);

    // Allowed: a current LDevID with the identical subject (rekey).
    let renewed = only_cert(&call(&svc, &ldevid_chain, &good, &mut pki.rng));
    assert_eq!(renewed.tbs_certificate.subject, subject);
    assert_eq!(
        renewed
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
        new_key.public_key_sec1()
    );
    let certs = store.certificates();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0].status, crate::store::CertStatus::Superseded);
    assert_eq!(certs[1].kind, crate::store::IssuanceKind::Reenroll);
    assert_eq!(
        certs[1].replaces_serial_hex.as_deref(),
        Some(certs[0].serial_hex.as_str())
    );
    // The same request again is a retry: same answer, nothing new.
    let again = only_cert(&call(&svc, &ldevid_chain, &good, &mut pki.rng));
    assert_eq!(again, renewed);
    assert_eq!(store.certificates().len(), 2);
    // But the superseded certificate cannot renew again with a new request.
    let (_, third_key) = pki.key();
    let resp = call(
        &svc,
        &ldevid_chain,
        &post("sren", csr(&third_key, &subject)),
        &mut pki.rng,
    );
    assert_refused(&resp, ResponseType::Forbidden, "superseded");
}

#[test]
fn an_ldevid_cannot_use_sen() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let ldevid = only_cert(&call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    ));
    let resp = call(
        &svc,
        &[ldevid.to_der().expect("der")],
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_refused(&resp, ResponseType::Forbidden, "manufacturer");
    assert_eq!(store.certificates().len(), 1);
}

#[test]
fn unknown_manufacturer_and_missing_certificate_are_refused_and_store_nothing() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let (rogue_cert, _) = ca::mint_idevid(
        &pki.rogue,
        "SN9",
        HW_TYPE,
        now() - DAY,
        now() + DAY,
        &mut pki.rng,
    )
    .expect("rogue");
    let (_, key) = pki.key();
    let req = post("sen", csr(&key, &name(&[])));
    assert_refused(
        &call(&svc, &[rogue_cert], &req, &mut pki.rng),
        ResponseType::Forbidden,
        "manufacturer",
    );
    assert_refused(
        &call(&svc, &[], &req, &mut pki.rng),
        ResponseType::Forbidden,
        "no client certificate",
    );
    assert!(store.certificates().is_empty());
    let audit = store.audit_events();
    assert_eq!(audit.len(), 2);
    assert!(audit
        .iter()
        .all(|a| a.outcome == "refused" && a.code == "4.03"));
}

#[test]
fn expired_idevid_is_refused_unless_policy_accepts_it() {
    let mut pki = Pki::new();
    let (cert, _) = pki.idevid("SN1", now() - DAY);
    let (_, key) = pki.key();
    let req = post("sen", csr(&key, &name(&[])));
    let (strict, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    assert_refused(
        &call(&strict, std::slice::from_ref(&cert), &req, &mut pki.rng),
        ResponseType::Forbidden,
        "expired",
    );
    assert!(store.certificates().is_empty());
    let lenient_cfg = PolicyConfig {
        accept_expired_idevid: true,
        ..PolicyConfig::default()
    };
    let (lenient, store) = pki.service(lenient_cfg, EstConfig::default());
    // At the handshake: refused by default, accepted (as a manufacturer chain) when allowed.
    assert!(matches!(
        strict
            .policy()
            .verify_peer_chain(std::slice::from_ref(&cert), now()),
        Err(crate::policy::PolicyError::Expired)
    ));
    assert_eq!(
        lenient
            .policy()
            .verify_peer_chain(std::slice::from_ref(&cert), now())
            .expect("expired IDevID allowed")
            .class(),
        crate::policy::AnchorClass::Manufacturer
    );
    assert_refused(
        &call_unverified(&strict, std::slice::from_ref(&cert), &req, &mut pki.rng),
        ResponseType::Forbidden,
        "expired",
    );
    only_cert(&call_unverified(
        &lenient,
        std::slice::from_ref(&cert),
        &req,
        &mut pki.rng,
    ));
    only_cert(&call(&lenient, &[cert], &req, &mut pki.rng));
    assert_eq!(store.certificates().len(), 1);
}

/// `authenticate` with the handshake's `VerifiedChain` reads the leaf as the verification
/// recorded it (no second parse): its validity is checked at the request's time, and the
/// device's identity, subject, hardwareModuleName and serial are the leaf's.
#[test]
fn authenticate_reads_the_leaf_the_verification_recorded() {
    use crate::policy::{AnchorClass, PolicyError};
    let mut pki = Pki::new();
    let (cert, _) = pki.idevid("SN7", now() + DAY);
    let chain = vec![cert.clone()];
    let (strict, _) = pki.service(PolicyConfig::default(), EstConfig::default());
    let lenient_cfg = PolicyConfig {
        accept_expired_idevid: true,
        ..PolicyConfig::default()
    };
    let (lenient, _) = pki.service(lenient_cfg, EstConfig::default());
    let leaf = Certificate::from_der(&cert).expect("leaf");
    for svc in [&strict, &lenient] {
        let policy = svc.policy();
        let verified = policy.verify_peer_chain(&chain, now()).expect("verified");
        let device = policy
            .authenticate(AnchorClass::Manufacturer, &chain, Some(&verified), now())
            .expect("authenticated");
        assert_eq!(device.device_id, "SN7");
        assert_eq!(device.subject, leaf.tbs_certificate.subject);
        assert_eq!(
            device.certificate_serial_hex,
            hex::encode(leaf.tbs_certificate.serial_number.as_bytes())
        );
        assert_eq!(device.hardware_module, ca::hardware_module_from_cert(&leaf));
        assert!(device.hardware_module.is_some());
        assert_eq!(
            device.manufacturer_anchor,
            verified.manufacturer_anchor().copied()
        );
        // A request time before the leaf's notBefore.
        assert_eq!(
            policy
                .authenticate(
                    AnchorClass::Manufacturer,
                    &chain,
                    Some(&verified),
                    now() - 6 * DAY
                )
                .unwrap_err(),
            PolicyError::NotYetValid
        );
    }
    // The session outlived its IDevID: refused at the request, unless expired IDevIDs are
    // accepted.
    let later = now() + 2 * DAY;
    let verified = strict
        .policy()
        .verify_peer_chain(&chain, now())
        .expect("verified");
    assert_eq!(
        strict
            .policy()
            .authenticate(AnchorClass::Manufacturer, &chain, Some(&verified), later)
            .unwrap_err(),
        PolicyError::Expired
    );
    let verified = lenient
        .policy()
        .verify_peer_chain(&chain, now())
        .expect("verified");
    lenient
        .policy()
        .authenticate(AnchorClass::Manufacturer, &chain, Some(&verified), later)
        .expect("expired IDevID accepted");
}

#[test]
fn allowlist_refuses_unlisted_devices_and_admits_listed_ones() {
    let mut pki = Pki::new();
    let cfg = PolicyConfig {
        require_device_allowlist: true,
        ..PolicyConfig::default()
    };
    let (svc, store) = pki.service(cfg, EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let req = post("sen", csr(&dev.signer, &name(&[])));
    assert_refused(
        &call(&svc, &dev.chain, &req, &mut pki.rng),
        ResponseType::Forbidden,
        "allowlist",
    );
    store.allow_devices(["SN1".to_string()]);
    only_cert(&call(&svc, &dev.chain, &req, &mut pki.rng));
}

#[test]
fn csr_naming_another_device_is_refused() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let req = post(
        "sen",
        csr(&dev.signer, &name(&[(OID_SERIAL_NUMBER, "SN2")])),
    );
    assert_refused(
        &call(&svc, &dev.chain, &req, &mut pki.rng),
        ResponseType::Forbidden,
        "serialNumber",
    );
    let req = post(
        "sen",
        csr(&dev.signer, &name(&[(OID_SERIAL_NUMBER, "SN1")])),
    );
    only_cert(&call(&svc, &dev.chain, &req, &mut pki.rng));
    assert_eq!(store.certificates().len(), 1);
}

#[test]
fn malformed_requests_get_4xx_and_store_nothing() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let good = csr(&dev.signer, &name(&[]));
    // Bad CSR signature: flip a bit in the signature.
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert_refused(
        &call(&svc, &dev.chain, &post("sen", tampered), &mut pki.rng),
        ResponseType::BadRequest,
        "CSR",
    );
    assert_refused(
        &call(
            &svc,
            &dev.chain,
            &post("sen", b"not a csr".to_vec()),
            &mut pki.rng,
        ),
        ResponseType::BadRequest,
        "CSR",
    );
    // Wrong Content-Format.
    let req =
        Request::new(Method::Post, "/.well-known/est/sen").with_payload(CF_PKCS8, good.clone());
    assert_refused(
        &call(&svc, &dev.chain, &req, &mut pki.rng),
        ResponseType::UnsupportedContentFormat,
        "Content-Format",
    );
    // Too large.
    let req = post("sen", vec![0x30; 5000]);
    assert_refused(
        &call(&svc, &dev.chain, &req, &mut pki.rng),
        ResponseType::RequestEntityTooLarge,
        "too large",
    );
    assert!(store.certificates().is_empty());
    assert_eq!(store.audit_events().len(), 4);
}

#[test]
fn methods_and_paths() {
    let mut pki = Pki::new();
    let (svc, _) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let get_sen = Request::new(Method::Get, "/.well-known/est/sen");
    assert_eq!(
        call(&svc, &dev.chain, &get_sen, &mut pki.rng).code,
        ResponseType::MethodNotAllowed
    );
    let nope = Request::new(Method::Get, "/.well-known/est/nope");
    assert_eq!(
        call(&svc, &dev.chain, &nope, &mut pki.rng).code,
        ResponseType::NotFound
    );
    let nope = Request::new(Method::Get, "/other");
    assert_eq!(
        call(&svc, &dev.chain, &nope, &mut pki.rng).code,
        ResponseType::NotFound
    );
    let post_crts = Request::new(Method::Post, "/.well-known/est/crts");
    assert_eq!(
        call(&svc, &dev.chain, &post_crts, &mut pki.rng).code,
        ResponseType::MethodNotAllowed
    );
}

#[test]
fn crts_in_both_formats_and_att() {
    let mut pki = Pki::new();
    let (svc, _) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let crts = Request::new(Method::Get, "/.well-known/est/crts");
    let r = call(&svc, &dev.chain, &crts, &mut pki.rng);
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Content, Some(CF_PKCS7_CERTS_ONLY))
    );
    assert_eq!(
        ca::certs_from_certs_only(&r.payload).expect("p7"),
        vec![pki.issuing_der.clone()]
    );
    let r = call(
        &svc,
        &dev.chain,
        &crts.clone().with_accept(CF_PKIX_CERT),
        &mut pki.rng,
    );
    assert_eq!(
        (r.content_format, r.payload.clone()),
        (Some(CF_PKIX_CERT), pki.issuing_der.clone())
    );
    let r = call(&svc, &dev.chain, &crts.with_accept(9999), &mut pki.rng);
    assert_eq!(r.code, ResponseType::NotAcceptable);
    let att = Request::new(Method::Get, "/.well-known/est/att");
    let r = call(&svc, &dev.chain, &att, &mut pki.rng);
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Content, Some(CF_CSRATTRS))
    );
    // A SEQUENCE naming ecdsa-with-SHA256 (06 08 2A 86 48 CE 3D 04 03 02).
    assert_eq!(r.payload[0], 0x30);
    let oid = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02];
    assert!(r.payload.windows(oid.len()).any(|w| w == oid));
}

#[test]
fn discovery_honours_the_rt_filter() {
    let mut pki = Pki::new();
    let (svc, _) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let get = |q: &[&str], rng: &mut ChaCha20Rng| {
        let mut req = Request::new(Method::Get, "/.well-known/core");
        for a in q {
            req = req.with_query(a);
        }
        let r = call(&svc, &dev.chain, &req, rng);
        assert_eq!(
            (r.code, r.content_format),
            (ResponseType::Content, Some(CF_LINK_FORMAT))
        );
        String::from_utf8(r.payload).expect("utf8")
    };
    let all = get(&[], &mut pki.rng);
    assert_eq!(all.matches('<').count(), 6);
    assert!(all.contains("</.well-known/est/sen>;rt=\"ace.est.sen\";ct=\"281 287 65003 65015\""));
    assert_eq!(get(&["rt=ace.est*"], &mut pki.rng), all);
    assert_eq!(
        get(&["rt=ace.est.sen"], &mut pki.rng),
        "</.well-known/est/sen>;rt=\"ace.est.sen\";ct=\"281 287 65003 65015\""
    );
    assert_eq!(
        get(&["ct=285"], &mut pki.rng),
        "</.well-known/est/att>;rt=\"ace.est.att\";ct=285"
    );
    assert_eq!(get(&["rt=core.rd"], &mut pki.rng), "");
    assert_eq!(
        get(&["rt=brski.rjp"], &mut pki.rng),
        "",
        "not a JPY registrar"
    );
}

/// A registrar of stateless join proxies announces its JPY port (draft-ietf-anima-constrained-
/// join-proxy, "Stateless Case"), exactly as the draft's example writes it.
#[test]
fn discovery_of_the_jpy_endpoint() {
    let mut pki = Pki::new();
    let est = EstConfig {
        jpy_uri: Some("jpy://[2001:db8:0:abcd::52]:7634".into()),
        ..EstConfig::default()
    };
    let (svc, _) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let req = Request::new(Method::Get, "/.well-known/core").with_query("rt=brski.rjp");
    let r = call(&svc, &dev.chain, &req, &mut pki.rng);
    assert_eq!(r.content_format, Some(CF_LINK_FORMAT));
    assert_eq!(
        String::from_utf8(r.payload).unwrap(),
        "<jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp"
    );
    // The EST links are not in that answer, and the JPY link is not in theirs.
    let req = Request::new(Method::Get, "/.well-known/core").with_query("rt=ace.est*");
    let r = call(&svc, &dev.chain, &req, &mut pki.rng);
    assert!(!String::from_utf8(r.payload).unwrap().contains("jpy"));
}

#[test]
fn overload_answers_503_with_max_age() {
    let mut pki = Pki::new();
    let est = EstConfig {
        max_concurrent_enrollments: 0,
        overload_retry_after_seconds: 17,
        ..EstConfig::default()
    };
    let (svc, store) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let r = call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(
        (r.code, r.max_age),
        (ResponseType::ServiceUnavailable, Some(17))
    );
    assert!(store.certificates().is_empty());
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.counters().overloaded, 1);
}

#[test]
fn server_keygen_returns_a_key_that_matches_its_certificate() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    for (op, cert_cf) in [("skg", CF_PKCS7_CERTS_ONLY), ("skc", CF_PKIX_CERT)] {
        let req = post(op, csr(&dev.signer, &name(&[]))).with_accept(CF_MULTIPART_CORE);
        let r = call(&svc, &dev.chain, &req, &mut pki.rng);
        assert_eq!(
            (r.code, r.content_format),
            (ResponseType::Changed, Some(CF_MULTIPART_CORE))
        );
        assert_cddl("multipart-core", &r.payload);
        let parts = cbor_schemas::multipart::decode(&r.payload).expect("multipart");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, CF_PKCS8);
        assert_eq!(parts[1].0, cert_cf);
        let cert_der = if cert_cf == CF_PKCS7_CERTS_ONLY {
            ca::certs_from_certs_only(&parts[1].1)
                .expect("p7")
                .remove(0)
        } else {
            parts[1].1.clone()
        };
        let cert = Certificate::from_der(&cert_der).expect("cert");
        let key = RingP256Signer::from_pkcs8_der(&parts[0].1).expect("returned key");
        assert_eq!(
            cert.tbs_certificate
                .subject_public_key_info
                .subject_public_key
                .raw_bytes(),
            key.public_key_sec1()
        );
        assert_ne!(
            key.public_key_sec1(),
            dev.signer.public_key_sec1(),
            "the CSR's key is ignored"
        );
    }
    assert_eq!(store.certificates().len(), 2);
    let r = call(
        &svc,
        &dev.chain,
        &post("skg", csr(&dev.signer, &name(&[]))).with_accept(CF_PKCS7_CERTS_ONLY),
        &mut pki.rng,
    );
    assert_eq!(r.code, ResponseType::NotAcceptable);
}

/// Every CBOR item the EST layer emits (or a simulated meter sends) must match the
/// project's CDDL (cbor-schemas/cddl).
fn assert_cddl(rule: &str, item: &[u8]) {
    let result = match rule {
        "COSE_C509" => cbor_schemas::schema::check_cose_c509(item),
        _ => cbor_schemas::schema::check(rule, item),
    };
    if let Err(e) = result {
        panic!("{rule}: CDDL validation failed: {e}");
    }
}

/// A C509 request (type 3, re-encoded from a PKCS#10 made by `signer`).
fn c509_csr_type3(signer: &RingP256Signer, subject: &Name) -> Vec<u8> {
    let c = cbor_schemas::c509::csr_der_to_c509(&csr(signer, subject)).expect("C509 CSR");
    assert_cddl("C509CertificationRequest", &c);
    c
}

/// A natively signed (type 2) C509 request with the same content.
fn c509_csr_native(signer: &RingP256Signer, subject: &Name) -> Vec<u8> {
    let t3 = c509_csr_type3(signer, subject);
    let mut tbs = cbor_schemas::c509::C509Csr::decode(&t3)
        .expect("decode")
        .request()
        .tbs
        .clone();
    tbs.request_type = cbor_schemas::c509::TYPE_NATIVE;
    tbs.subject = tbs.subject.into_native();
    let c = cbor_schemas::c509::sign_native_csr(&tbs, |m| signer.sign(m).expect("sign"))
        .expect("native");
    assert_cddl("C509CertificationRequest", &c);
    c
}

fn c509_post(op: &str, payload: Vec<u8>) -> Request {
    Request::new(Method::Post, &format!("/.well-known/est/{op}"))
        .with_payload(EstConfig::default().c509_pkcs10_content_format, payload)
}

#[test]
fn c509_request_gets_a_c509_certificate_whose_der_equivalent_is_stored() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let cf = EstConfig::default().c509_cert_content_format;
    // Type 3 request, no Accept: the answer follows the request's type (re-encoded), as
    // application/cose-c509-cert+cbor, the bare C509Certificate array (draft -20).
    let r = call(
        &svc,
        &dev.chain,
        &c509_post("sen", c509_csr_type3(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Changed, Some(cf)),
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_cddl("C509Certificate", &r.payload);
    let der = cbor_schemas::c509::certificate_c509_to_der(&r.payload).expect("type 3 -> DER");
    let stored = store.certificates();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].der, der,
        "the store keeps the exact DER equivalent"
    );
    assert!(
        r.payload.len() < der.len(),
        "C509 {} < DER {}",
        r.payload.len(),
        der.len()
    );
    let parsed = Certificate::from_der(&der).expect("cert");
    assert_eq!(
        ca::serial_number_attr(&parsed.tbs_certificate.subject).as_deref(),
        Some("SN1")
    );

    // Accept application/cose-c509+cbor: the same certificate as COSE_C509.
    let (_, key3) = pki.key();
    let cose_cf = EstConfig::default().cose_c509_content_format;
    let r = call(
        &svc,
        &dev.chain,
        &c509_post("sen", c509_csr_type3(&key3, &name(&[]))).with_accept(cose_cf),
        &mut pki.rng,
    );
    assert_eq!(r.content_format, Some(cose_cf));
    assert_cddl("COSE_C509", &r.payload);
    let certs = cbor_schemas::cose::decode_cose_c509(&r.payload).expect("COSE_C509");
    assert_eq!(certs.len(), 1);
    assert_eq!(
        cbor_schemas::c509::certificate_c509_to_der(&certs[0]).expect("der"),
        store.certificates()[1].der
    );

    // The same C509 request with Accept 287 gets the DER certificate.
    let (_, key2) = pki.key();
    let r = call(
        &svc,
        &dev.chain,
        &c509_post("sen", c509_csr_type3(&key2, &name(&[]))).with_accept(CF_PKIX_CERT),
        &mut pki.rng,
    );
    only_cert(&r);
}

#[test]
fn natively_signed_c509_request_gets_a_natively_signed_certificate() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let r = call(
        &svc,
        &dev.chain,
        &c509_post("sen", c509_csr_native(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(
        (r.code, r.content_format),
        (
            ResponseType::Changed,
            Some(EstConfig::default().c509_cert_content_format)
        ),
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_cddl("C509Certificate", &r.payload);
    let ca_key = svc.ca.signer().public_key_spki_der().to_vec();
    let ca_spki = spki::SubjectPublicKeyInfoOwned::from_der(&ca_key).expect("spki");
    let c = cbor_schemas::c509::verify_native_certificate(
        &r.payload,
        ca_spki.subject_public_key.raw_bytes(),
    )
    .expect("the CA's native signature verifies");
    assert_eq!(c.tbs.certificate_type, cbor_schemas::c509::TYPE_NATIVE);
    assert_eq!(
        store.certificates().len(),
        1,
        "its X.509 equivalent is stored"
    );
    // A PKCS#10 request asking for COSE_C509 gets type 3 inside it.
    let (_, k2) = pki.key();
    let r = call(
        &svc,
        &dev.chain,
        &post("sen", csr(&k2, &name(&[])))
            .with_accept(EstConfig::default().cose_c509_content_format),
        &mut pki.rng,
    );
    assert_cddl("COSE_C509", &r.payload);
    let certs = cbor_schemas::cose::decode_cose_c509(&r.payload).expect("COSE_C509");
    assert!(cbor_schemas::c509::certificate_c509_to_der(&certs[0]).is_ok());
}

#[test]
fn c509_with_a_bad_proof_of_possession_is_400() {
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let mut bad = c509_csr_native(&dev.signer, &name(&[]));
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    let r = call(&svc, &dev.chain, &c509_post("sen", bad), &mut pki.rng);
    assert_refused(&r, ResponseType::BadRequest, "C509 CSR");
    let r = call(
        &svc,
        &dev.chain,
        &c509_post("sen", vec![0x83, 0x01]),
        &mut pki.rng,
    );
    assert_refused(&r, ResponseType::BadRequest, "C509 CSR");
    assert!(store.certificates().is_empty());
}

#[test]
fn crts_as_c509_certificate_and_as_cose_c509() {
    let mut pki = Pki::new();
    let (svc, _) = pki.service(PolicyConfig::default(), EstConfig::default());
    let dev = device(&mut pki, "SN1");
    let crts = |accept: u16, rng: &mut ChaCha20Rng| {
        call(
            &svc,
            &dev.chain,
            &Request::new(Method::Get, "/.well-known/est/crts").with_accept(accept),
            rng,
        )
    };
    // application/cose-c509-cert+cbor: the CA certificate alone, as C509Certificate.
    let cf = EstConfig::default().c509_cert_content_format;
    let r = crts(cf, &mut pki.rng);
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Content, Some(cf))
    );
    assert_cddl("C509Certificate", &r.payload);
    assert_eq!(
        cbor_schemas::c509::certificate_c509_to_der(&r.payload).expect("der"),
        pki.issuing_der
    );
    // application/cose-c509+cbor: COSE_C509, the same certificate in a byte string.
    let cose_cf = EstConfig::default().cose_c509_content_format;
    let r2 = crts(cose_cf, &mut pki.rng);
    assert_eq!(
        (r2.code, r2.content_format),
        (ResponseType::Content, Some(cose_cf))
    );
    assert_cddl("COSE_C509", &r2.payload);
    let certs = cbor_schemas::cose::decode_cose_c509(&r2.payload).expect("COSE_C509");
    assert_eq!(certs, vec![r.payload.clone()]);
    // Neither body is accepted as the other.
    assert!(cbor_schemas::cose::decode_cose_c509(&r.payload).is_err());
    assert!(cbor_schemas::c509::certificate_c509_to_der(&r2.payload).is_err());
}

#[test]
fn c509_content_formats_follow_the_configuration() {
    let mut pki = Pki::new();
    let est = EstConfig {
        c509_cert_content_format: 65100,
        cose_c509_content_format: 65101,
        c509_pkcs10_content_format: 65102,
        ..EstConfig::default()
    };
    let (svc, store) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let r = call(
        &svc,
        &dev.chain,
        &Request::new(Method::Post, "/.well-known/est/sen")
            .with_payload(65102, c509_csr_type3(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Changed, Some(65100))
    );
    assert_eq!(
        cbor_schemas::c509::certificate_c509_to_der(&r.payload).expect("der"),
        store.certificates()[0].der
    );
    let r = call(
        &svc,
        &dev.chain,
        &Request::new(Method::Get, "/.well-known/est/crts").with_accept(65101),
        &mut pki.rng,
    );
    assert_eq!(r.content_format, Some(65101));
    // The defaults are not served any more.
    for old in [
        EstConfig::default().c509_cert_content_format,
        EstConfig::default().cose_c509_content_format,
    ] {
        let r = call(
            &svc,
            &dev.chain,
            &Request::new(Method::Get, "/.well-known/est/crts").with_accept(old),
            &mut pki.rng,
        );
        assert_eq!(r.code, ResponseType::NotAcceptable);
    }
}

#[test]
fn per_device_rate_limit_answers_503_with_the_wait_as_max_age_and_is_audited() {
    let mut pki = Pki::new();
    let est = EstConfig {
        max_enrollments_per_device: 2,
        enrollment_period: Duration::from_secs(3600),
        ..EstConfig::default()
    };
    let (svc, store) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let first = post("sen", csr(&dev.signer, &name(&[])));
    only_cert(&call(&svc, &dev.chain, &first, &mut pki.rng));
    // A retry of the first is not a new enrollment.
    only_cert(&call(&svc, &dev.chain, &first, &mut pki.rng));
    let (_, k2) = pki.key();
    only_cert(&call(
        &svc,
        &dev.chain,
        &post("sen", csr(&k2, &name(&[]))),
        &mut pki.rng,
    ));
    let (_, k3) = pki.key();
    let r = call(
        &svc,
        &dev.chain,
        &post("sen", csr(&k3, &name(&[]))),
        &mut pki.rng,
    );
    // Both issued at now(): the first leaves the period in a full hour.
    assert_eq!(
        (r.code, r.max_age),
        (ResponseType::ServiceUnavailable, Some(3600))
    );
    assert!(String::from_utf8_lossy(&r.payload).contains("rate limit"));
    assert_eq!(store.certificates().len(), 2);
    assert_eq!(svc.counters().rate_limited, 1);
    let last = store.audit_events().pop().expect("audit");
    assert_eq!(
        (last.outcome.as_str(), last.code.as_str()),
        ("refused", "5.03")
    );
    // Another device is not affected.
    let other = device(&mut pki, "SN2");
    only_cert(&call(
        &svc,
        &other.chain,
        &post("sen", csr(&other.signer, &name(&[]))),
        &mut pki.rng,
    ));
}

#[test]
fn a_ca_outside_its_validity_answers_503_with_a_diagnostic_not_500() {
    let mut pki = Pki::new();
    // An issuing CA of 100 days (from now() - 10 days); the maker's lasts ten years.
    let (cert, key) =
        ca::generate_root_ca("Short CA", "est", now() - 10 * DAY, 100 * DAY, &mut pki.rng)
            .expect("CA");
    let short = IssuingCa::new(
        cert.clone(),
        Box::new(RingP256Signer::from_pkcs8_der(&key).expect("key")),
    )
    .expect("CA");
    let policy = Policy::new(
        PolicyConfig::default(),
        &[pki.maker.certificate_der().to_vec()],
        &cert,
    )
    .expect("policy");
    let store = Arc::new(MemoryStore::new());
    let dyn_store: Arc<dyn Store> = store.clone();
    let svc = EstService::new(EstConfig::default(), short, policy, dyn_store).expect("service");
    let dev = device(&mut pki, "SN1");
    let late = now() + 200 * DAY;
    let ctx = RequestContext {
        peer: "192.0.2.1:5684",
        relay: None,
        client_chain: &dev.chain,
        verified: None,
        now: late,
    };
    let r = serve(
        &svc,
        &ctx,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_eq!(
        (r.code, r.max_age),
        (ResponseType::ServiceUnavailable, Some(3600))
    );
    let text = String::from_utf8_lossy(&r.payload).to_string();
    assert!(text.contains("issuing CA certificate expired at"), "{text}");
    assert!(store.certificates().is_empty());
    assert_eq!(svc.counters().ca_unavailable, 1);
}

#[test]
fn a_blocked_device_and_a_revoked_ldevid_are_refused_and_a_block_wins_at_commit() {
    use crate::store::{DeviceBlock, Revocation, RevocationReason, RevokeOutcome};
    let mut pki = Pki::new();
    let (svc, store) = pki.service(PolicyConfig::default(), EstConfig::default());
    let audit = |d: &str| AuditEvent {
        at_unix: 0,
        peer: "cli".into(),
        relay: None,
        device_id: d.into(),
        operation: "revoke".into(),
        outcome: "revoked".into(),
        code: "-".into(),
        detail: String::new(),
    };
    // SN1 enrolls, its LDevID is revoked: /sren with it is refused.
    let dev = device(&mut pki, "SN1");
    let ldevid = only_cert(&call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    ));
    let serial = hex::encode(ldevid.tbs_certificate.serial_number.as_bytes());
    let r = store
        .revoke(&Revocation {
            serial_hex: serial.clone(),
            reason: RevocationReason::KeyCompromise,
            revoked_at_unix: 1,
            audit: audit("SN1"),
        })
        .expect("revoke");
    assert!(matches!(r, RevokeOutcome::Revoked(_)));
    assert_eq!(store.revocation_generation().expect("gen"), 1);
    let subject = ldevid.tbs_certificate.subject.clone();
    let (_, k2) = pki.key();
    let chain = vec![ldevid.to_der().expect("der")];
    let r = call(
        &svc,
        &chain,
        &post("sren", csr(&k2, &subject)),
        &mut pki.rng,
    );
    assert_refused(&r, ResponseType::Forbidden, "revoked");
    assert_eq!(svc.counters().refused_revoked, 1);

    // SN2 is blocked: /sen refused.
    let dev2 = device(&mut pki, "SN2");
    store
        .block_device(&DeviceBlock {
            device_id: "SN2".into(),
            reason: RevocationReason::CessationOfOperation,
            at_unix: 2,
            keep_certs: false,
            audit: audit("SN2"),
        })
        .expect("block");
    let r = call(
        &svc,
        &dev2.chain,
        &post("sen", csr(&dev2.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_refused(&r, ResponseType::Forbidden, "blocked");

    // SN3 is decided, then blocked before its commit: the commit refuses it.
    let dev3 = device(&mut pki, "SN3");
    let verified = svc.policy().verify_peer_chain(&dev3.chain, now()).ok();
    let ctx = RequestContext {
        peer: "192.0.2.1:5684",
        relay: None,
        client_chain: &dev3.chain,
        verified: verified.as_ref(),
        now: now(),
    };
    let step = svc.begin(
        &ctx,
        &post("sen", csr(&dev3.signer, &name(&[]))),
        &mut pki.rng,
    );
    let Step::Commit(commit, then) = step else {
        panic!("an issuance commit was expected");
    };
    store
        .block_device(&DeviceBlock {
            device_id: "SN3".into(),
            reason: RevocationReason::CessationOfOperation,
            at_unix: 3,
            keep_certs: true,
            audit: audit("SN3"),
        })
        .expect("block");
    let result = crate::store::commit_and_wait(svc.store().as_ref(), commit);
    assert!(
        matches!(result, Ok(CommitOutcome::Refused(_))),
        "{result:?}"
    );
    let r = match svc.resume(*then, result) {
        Step::Commit(audit_row, then) => {
            let r = crate::store::commit_and_wait(svc.store().as_ref(), audit_row);
            match svc.resume(*then, r) {
                Step::Respond(r) => r,
                Step::Commit(..) => panic!("one audit row"),
            }
        }
        Step::Respond(r) => r,
    };
    assert_refused(&r, ResponseType::Forbidden, "blocked");
    assert!(store.certificates().iter().all(|c| c.device_id != "SN3"));
    assert_eq!(
        store.revoked_certificates().expect("entries").len(),
        1,
        "SN2 had no certificate, SN3 kept its (none)"
    );
}

#[test]
fn the_crl_resource_serves_what_the_driver_set() {
    let mut pki = Pki::new();
    let est = EstConfig {
        crl_path: vec!["crl".into()],
        ..EstConfig::default()
    };
    let (svc, _) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let get = |accept: Option<u16>| {
        let mut r = Request::new(Method::Get, "/crl");
        if let Some(a) = accept {
            r = r.with_accept(a);
        }
        r
    };
    // Nothing published yet: come back later.
    let r = call(&svc, &dev.chain, &get(None), &mut pki.rng);
    assert_eq!(r.code, ResponseType::ServiceUnavailable);
    let ca = pki.issuing();
    let crl = ca
        .sign_crl(&ca::CrlParams {
            number: 7,
            this_update: now(),
            next_update: now() + DAY,
            entries: &[ca::CrlEntry {
                serial: vec![0x42, 0x01],
                revoked_at: now(),
                reason_code: Some(1),
            }],
        })
        .expect("crl");
    svc.set_crl(crl.clone());
    let r = call(&svc, &dev.chain, &get(None), &mut pki.rng);
    assert_eq!(
        (r.code, r.content_format),
        (ResponseType::Content, Some(CF_PKIX_CRL_DEFAULT))
    );
    assert_eq!(r.payload, crl);
    let r = call(&svc, &dev.chain, &get(Some(CF_OCTET_STREAM)), &mut pki.rng);
    assert_eq!(r.content_format, Some(CF_OCTET_STREAM));
    let r = call(&svc, &dev.chain, &get(Some(CF_PKIX_CERT)), &mut pki.rng);
    assert_eq!(r.code, ResponseType::NotAcceptable);
    // It verifies against the issuing CA, with its number, entry and reason.
    let v = ca::verify_crl(&crl, &pki.issuing_der).expect("verifies");
    assert_eq!(v.number, Some(vec![7]));
    assert_eq!(v.revoked, vec![(vec![0x42, 0x01], Some(1))]);
    assert_eq!(v.next_update, Some(now() + DAY));
    // Not the maker's CRL, and a flipped bit breaks the signature.
    assert!(ca::verify_crl(&crl, pki.maker.certificate_der()).is_err());
    let mut bad = crl.clone();
    let n = bad.len() - 3;
    bad[n] ^= 1;
    assert!(ca::verify_crl(&bad, &pki.issuing_der).is_err());
}

#[test]
fn the_p384_crl_resource_serves_its_own_crl() {
    let mut pki = Pki::new();
    let est = EstConfig {
        crl_path: vec!["crl".into()],
        crl_p384_path: vec!["crl-p384".into()],
        ..EstConfig::default()
    };
    let (svc, _) = pki.service(PolicyConfig::default(), est);
    let dev = device(&mut pki, "SN1");
    let get = |path: &str| Request::new(Method::Get, path);
    svc.set_crl(vec![0x30, 0x01, 0x01]);
    // Not published yet: 5.03, whatever the other CA's CRL is.
    let r = call(&svc, &dev.chain, &get("/crl-p384"), &mut pki.rng);
    assert_eq!(r.code, ResponseType::ServiceUnavailable);
    svc.set_crl_p384(vec![0x30, 0x01, 0x02]);
    let r = call(&svc, &dev.chain, &get("/crl-p384"), &mut pki.rng);
    assert_eq!(
        (r.code, r.content_format, r.payload),
        (
            ResponseType::Content,
            Some(CF_PKIX_CRL_DEFAULT),
            vec![0x30, 0x01, 0x02]
        )
    );
    let r = call(&svc, &dev.chain, &get("/crl"), &mut pki.rng);
    assert_eq!(r.payload, vec![0x30, 0x01, 0x01]);
    // Without the path configured there is no such resource.
    let (plain, _) = pki.service(
        PolicyConfig::default(),
        EstConfig {
            crl_path: vec!["crl".into()],
            ..EstConfig::default()
        },
    );
    plain.set_crl_p384(vec![0x30, 0x01, 0x02]);
    let r = call(&plain, &dev.chain, &get("/crl-p384"), &mut pki.rng);
    assert_eq!(r.code, ResponseType::NotFound);
}

/// A certificate profile selected by device class, with a P-384 CA beside the P-256 one:
/// server-side key generation makes a P-384 key for a profile that accepts only P-384, the
/// P-384 CA signs (SHA-384), and validity, keyUsage, EKU, subject and SAN are the profile's;
/// a CSR on the other curve is refused with 4.00 and nothing is stored; devices no rule
/// selects get the built-in LDevID.
#[test]
fn a_profile_decides_key_curve_signer_validity_usages_subject_and_san() {
    use crate::profile::{
        CertProfile, KeyUsageBits, Profiles, SanPolicy, Selector, SignatureHash, SubjectTemplate,
    };
    let mut pki = Pki::new();
    let template = SubjectTemplate::parse(&[
        "O=Utility".to_string(),
        "CN=kg-{idevid.serialNumber}".to_string(),
        "serialNumber={idevid.serialNumber}".to_string(),
    ])
    .expect("template");
    let profile = CertProfile {
        name: "kg384".into(),
        curves: vec![ca::Curve::P384],
        signature_hash: SignatureHash::Sha384,
        validity: Some(7 * DAY),
        key_usage: KeyUsageBits {
            digital_signature: true,
            key_agreement: true,
        },
        extended_key_usage: Vec::new(),
        subject: Some(template),
        san: SanPolicy::None,
    };
    let profiles = Profiles::new(
        vec![profile],
        vec![(
            Selector {
                manufacturer_anchors: None,
                serial_prefix: Some("KG".into()),
            },
            0,
        )],
    )
    .expect("profiles");
    let policy = PolicyConfig {
        profiles,
        ..PolicyConfig::default()
    };
    let (mut svc, store) = pki.service(policy, EstConfig::default());
    let p384_key = ca::generate_p384_pkcs8().expect("key");
    let p384_signer = ca::RingP384Signer::from_pkcs8_der(&p384_key).expect("key");
    let p384_cert = ca::self_signed_ca(
        &p384_signer,
        "EST Issuing CA P-384",
        "est",
        now() - DAY,
        3650 * DAY,
        &mut pki.rng,
    )
    .expect("P-384 CA");
    svc.add_issuing_ca(IssuingCa::new(p384_cert, Box::new(p384_signer)).expect("CA"))
        .expect("added");

    let dev = device(&mut pki, "KG1");
    // A P-256 CSR: refused, nothing stored.
    let r = call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    );
    assert_refused(&r, ResponseType::BadRequest, "kg384");
    assert!(store.certificates().is_empty());

    // Server-side key generation: a P-384 key.
    let req = post("skc", csr(&dev.signer, &name(&[]))).with_accept(CF_MULTIPART_CORE);
    let r = call(&svc, &dev.chain, &req, &mut pki.rng);
    assert_eq!(
        r.code,
        ResponseType::Changed,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    let parts = cbor_schemas::multipart::decode(&r.payload).expect("multipart");
    let key = ca::RingP384Signer::from_pkcs8_der(&parts[0].1).expect("a P-384 key");
    let cert = Certificate::from_der(&parts[1].1).expect("cert");
    let tbs = &cert.tbs_certificate;
    assert_eq!(
        tbs.subject_public_key_info.to_der().expect("spki"),
        key.public_key_spki_der()
    );
    assert_eq!(cert.signature_algorithm.oid, ca::oid::ECDSA_WITH_SHA384);
    assert_eq!(tbs.issuer.to_string(), "CN=EST Issuing CA P-384,O=est");
    assert_eq!(
        tbs.subject.to_string(),
        "SERIALNUMBER=KG1,CN=kg-KG1,O=Utility"
    );
    let validity = tbs
        .validity
        .not_after
        .to_system_time()
        .duration_since(tbs.validity.not_before.to_system_time())
        .expect("notAfter after notBefore");
    assert_eq!(
        validity,
        7 * DAY + Duration::from_secs(300),
        "7 days + the backdate"
    );
    let (_, ku) = tbs
        .get::<x509_cert::ext::pkix::KeyUsage>()
        .expect("ext")
        .expect("keyUsage");
    assert!(ku.digital_signature() && ku.key_agreement());
    assert!(tbs
        .get::<x509_cert::ext::pkix::ExtendedKeyUsage>()
        .expect("ext")
        .is_none());
    assert_eq!(ca::hardware_module_from_cert(&cert), None, "san = none");
    let audit = store.audit_events();
    assert!(audit
        .iter()
        .any(|e| e.outcome == "issued" && e.detail.ends_with("profile kg384")));

    // Another device: the built-in LDevID, as without profiles.
    let other = device(&mut pki, "SN9");
    let r = call(
        &svc,
        &other.chain,
        &post("sen", csr(&other.signer, &name(&[]))),
        &mut pki.rng,
    );
    let cert = only_cert(&r);
    assert_eq!(cert.signature_algorithm.oid, ca::oid::ECDSA_WITH_SHA256);
    assert_eq!(
        cert.tbs_certificate.subject.to_string(),
        "SERIALNUMBER=SN9,CN=SN9"
    );
    assert!(cert
        .tbs_certificate
        .get::<x509_cert::ext::pkix::ExtendedKeyUsage>()
        .expect("ext")
        .is_some());
}

/// /sren keeps the profile of the certificate being renewed (recorded with it), also one
/// chosen by manufacturer CA, which the LDevID the meter now presents no longer shows; when
/// that profile is no longer configured the renewal is refused (4.03) and nothing is stored.
#[test]
fn sren_keeps_the_profile_of_the_certificate_it_renews() {
    use crate::profile::{CertProfile, KeyUsageBits, Profiles, SanPolicy, Selector, SignatureHash};
    let mut pki = Pki::new();
    let mut anchor = [0u8; 32];
    anchor.copy_from_slice(
        ring::digest::digest(&ring::digest::SHA256, pki.maker.certificate_der()).as_ref(),
    );
    let profile = CertProfile {
        name: "maker".into(),
        curves: Vec::new(),
        signature_hash: SignatureHash::Auto,
        validity: Some(30 * DAY),
        key_usage: KeyUsageBits {
            digital_signature: true,
            key_agreement: true,
        },
        extended_key_usage: vec![ca::oid::KP_CLIENT_AUTH, ca::oid::KP_SERVER_AUTH],
        subject: None,
        san: SanPolicy::None,
    };
    let profiles = Profiles::new(
        vec![profile],
        vec![(
            Selector {
                manufacturer_anchors: Some(vec![anchor]),
                serial_prefix: None,
            },
            0,
        )],
    )
    .expect("profiles");
    let (svc, store) = pki.service(
        PolicyConfig {
            profiles,
            ..PolicyConfig::default()
        },
        EstConfig::default(),
    );
    let is_makers = |cert: &Certificate| {
        let tbs = &cert.tbs_certificate;
        let validity = tbs
            .validity
            .not_after
            .to_system_time()
            .duration_since(tbs.validity.not_before.to_system_time())
            .expect("notAfter after notBefore");
        let (_, ku) = tbs
            .get::<x509_cert::ext::pkix::KeyUsage>()
            .expect("ext")
            .expect("keyUsage");
        let (_, eku) = tbs
            .get::<x509_cert::ext::pkix::ExtendedKeyUsage>()
            .expect("ext")
            .expect("extKeyUsage");
        validity == 30 * DAY + Duration::from_secs(300)
            && ku.key_agreement()
            && eku.0.contains(&ca::oid::KP_SERVER_AUTH)
            && ca::hardware_module_from_cert(cert).is_none()
    };
    let dev = device(&mut pki, "SN1");
    let first = only_cert(&call(
        &svc,
        &dev.chain,
        &post("sen", csr(&dev.signer, &name(&[]))),
        &mut pki.rng,
    ));
    assert!(is_makers(&first));
    let subject = first.tbs_certificate.subject.clone();
    let (_, k2) = pki.key();
    let renewed = only_cert(&call(
        &svc,
        &[first.to_der().expect("der")],
        &post("sren", csr(&k2, &subject)),
        &mut pki.rng,
    ));
    assert!(is_makers(&renewed), "the renewal kept the profile");
    let certs = store.certificates();
    assert_eq!(certs.len(), 2);
    assert!(certs.iter().all(|c| c.profile == "maker"), "{certs:?}");
    assert!(store
        .audit_events()
        .iter()
        .any(|e| e.operation == "sren" && e.detail.ends_with("profile maker")));

    // The same store under a configuration without the profile: refused, nothing stored.
    let dyn_store: Arc<dyn Store> = store.clone();
    let policy = Policy::new(
        PolicyConfig::default(),
        &[pki.maker.certificate_der().to_vec()],
        &pki.issuing_der,
    )
    .expect("policy");
    let svc2 =
        EstService::new(EstConfig::default(), pki.issuing(), policy, dyn_store).expect("service");
    let renewed_chain = [renewed.to_der().expect("der")];
    let (_, k3) = pki.key();
    let r = call(
        &svc2,
        &renewed_chain,
        &post("sren", csr(&k3, &subject)),
        &mut pki.rng,
    );
    assert_refused(
        &r,
        ResponseType::Forbidden,
        "\"maker\" of the certificate being renewed is no longer configured",
    );
    assert_eq!(store.certificates().len(), 2);
    let last = store.audit_events().last().cloned().expect("audited");
    assert_eq!(
        (
            last.operation.as_str(),
            last.outcome.as_str(),
            last.code.as_str()
        ),
        ("sren", "refused", "4.03")
    );

    // A certificate recorded without a profile (the built-in one) renews under the rules.
    let other = device(&mut pki, "SN2");
    let plain = only_cert(&call(
        &svc2,
        &other.chain,
        &post("sen", csr(&other.signer, &name(&[]))),
        &mut pki.rng,
    ));
    assert!(!is_makers(&plain));
    let (_, k4) = pki.key();
    let again = only_cert(&call(
        &svc2,
        &[plain.to_der().expect("der")],
        &post("sren", csr(&k4, &plain.tbs_certificate.subject)),
        &mut pki.rng,
    ));
    assert!(!is_makers(&again));
    assert_eq!(store.certificates().last().expect("stored").profile, "");
}
