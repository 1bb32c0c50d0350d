//! Unit tests of the meter state machine against a fake EST server, one exchange at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::testutil::FakeEst;

fn t0() -> Instant {
    Instant::now()
}

fn expect_connect(m: &mut Meter) -> (Purpose, Credential) {
    match m.poll_action() {
        Some(Action::Connect {
            purpose,
            credential,
        }) => (purpose, credential),
        other => panic!("expected Connect, got {other:?}"),
    }
}

fn expect_send(m: &mut Meter) -> Request {
    match m.poll_action() {
        Some(Action::Send(r)) => r,
        other => panic!("expected Send, got {other:?}"),
    }
}

fn expect_disconnect(m: &mut Meter) {
    assert!(matches!(m.poll_action(), Some(Action::Disconnect)));
}

/// Answers every Send with the fake server until the meter stops sending.
fn serve(m: &mut Meter, est: &mut FakeEst, now: Instant) {
    while let Some(a) = m.poll_action() {
        if let Action::Send(r) = a {
            let resp = est.handle(&r);
            m.handle_response(now, resp);
        }
    }
}

#[test]
fn enrolls_with_crts_then_sen_and_verifies() {
    let mut est = FakeEst::new(1);
    let dev = est.device("SN000001");
    let mut m = Meter::new(MeterConfig::default(), &dev, 42).unwrap();
    assert_eq!(m.state(), &MeterState::Unprovisioned);
    let now = t0();
    m.start(now);
    let (purpose, cred) = expect_connect(&mut m);
    assert_eq!(purpose, Purpose::Enroll);
    assert_eq!(cred.chain_der, dev.cert_chain_der);
    assert_eq!(
        m.state(),
        &MeterState::Handshaking {
            purpose: Purpose::Enroll
        }
    );
    m.handle_connected(now + Duration::from_millis(800));
    assert_eq!(m.stats().handshake_us, Some(800_000));
    let crts = expect_send(&mut m);
    assert_eq!(crts.method, Method::Get);
    assert_eq!(crts.path, vec![".well-known", "est", "crts"]);
    assert_eq!(crts.accept, Some(281));
    assert_eq!(m.state(), &MeterState::FetchingCaCerts);
    m.handle_response(now, est.handle(&crts));
    let sen = expect_send(&mut m);
    assert_eq!(m.state(), &MeterState::Enrolling);
    assert_eq!(sen.method, Method::Post);
    assert_eq!(sen.path, vec![".well-known", "est", "sen"]);
    assert_eq!(sen.content_format, Some(286));
    assert_eq!(sen.payload, m.csr_der());
    m.handle_response(now + Duration::from_secs(2), est.handle(&sen));
    expect_disconnect(&mut m);
    assert_eq!(m.state(), &MeterState::Enrolled);
    assert_eq!(m.ldevid(), Some(est.issued[0].as_slice()));
    let issued = <x509_cert::Certificate as der::Decode>::from_der(&est.issued[0]).unwrap();
    assert_eq!(
        m.ldevid_serial(),
        Some(hex::encode(issued.tbs_certificate.serial_number.as_bytes()).as_str())
    );
    assert_eq!(m.stats().enroll_us, Some(2_000_000));
    assert_eq!(m.ca_certs_der(), &[est.ca_der.clone()]);
    // The CSR carried the IDevID's serialNumber and hardwareModuleName.
    let csr = est_proto::ca::parse_and_verify_csr(m.csr_der(), 4096).unwrap();
    assert_eq!(
        est_proto::ca::serial_number_attr(&csr.subject).as_deref(),
        Some("SN000001")
    );
    assert!(csr.hardware_module.is_some());
    assert!(m.poll_action().is_none());
}

/// The path of each request a meter sends over its lifetime (enrollment and renewal), the
/// fake server answering every one.
fn lifetime_paths(cfg: MeterConfig, est: &mut FakeEst, dev: &DeviceIdentity) -> Vec<String> {
    let mut m = Meter::new(cfg, dev, 7).unwrap();
    let now = t0();
    m.start(now);
    let mut paths = Vec::new();
    while !m.is_done() {
        match m.poll_action() {
            Some(Action::Connect { .. }) => m.handle_connected(now),
            Some(Action::Send(r)) => {
                paths.push(r.path.join("/"));
                let resp = est.handle(&r);
                m.handle_response(now, resp);
            }
            Some(Action::Disconnect) => {}
            None => panic!("stuck in {:?}", m.state()),
        }
    }
    assert!(m.renewed(), "{:?}", m.state());
    paths
}

#[test]
fn crts_is_asked_always_once_or_never() {
    let mut est = FakeEst::new(9);
    let dev = est.device("SN000009");
    let cfg = |crts, explicit_ta_der| MeterConfig {
        renew: true,
        crts,
        explicit_ta_der,
        ..MeterConfig::default()
    };
    let (crts, sen, sren) = (
        ".well-known/est/crts",
        ".well-known/est/sen",
        ".well-known/est/sren",
    );
    assert_eq!(
        lifetime_paths(cfg(CrtsMode::Always, vec![]), &mut est, &dev),
        [crts, sen, crts, sren]
    );
    assert_eq!(
        lifetime_paths(cfg(CrtsMode::Once, vec![]), &mut est, &dev),
        [crts, sen, sren]
    );
    // Never: the Explicit TA database is held, and verifies what the meter is issued.
    let ta = vec![est.ca_der.clone()];
    assert_eq!(
        lifetime_paths(cfg(CrtsMode::Never, ta), &mut est, &dev),
        [sen, sren]
    );
    // Without one, a meter that never asks cannot be built.
    assert!(matches!(
        Meter::new(cfg(CrtsMode::Never, vec![]), &dev, 1),
        Err(PkiError::TrustAnchors(_))
    ));
    // With the wrong one, it refuses what it is issued.
    let mut m = Meter::new(cfg(CrtsMode::Never, vec![FakeEst::new(10).ca_der]), &dev, 1).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    let sen_req = expect_send(&mut m);
    m.handle_response(now, est.handle(&sen_req));
    assert!(matches!(
        m.state(),
        MeterState::Failed(FailureReason::Verification(_))
    ));
}

#[test]
fn discovery_paths_are_used() {
    let mut est = FakeEst::new(2);
    let dev = est.device("SN000002");
    let cfg = MeterConfig {
        discovery: true,
        accept: CertFormat::PkixCert,
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, 1).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    let disc = expect_send(&mut m);
    assert_eq!(disc.path, vec![".well-known", "core"]);
    assert_eq!(disc.query, vec!["rt=ace.est*"]);
    assert_eq!(m.state(), &MeterState::Discovering);
    m.handle_response(now, est.handle(&disc));
    let crts = expect_send(&mut m);
    assert_eq!(crts.path, vec!["est", "crts"]);
    assert_eq!(crts.accept, Some(287));
    m.handle_response(now, est.handle(&crts));
    let sen = expect_send(&mut m);
    assert_eq!(sen.path, vec!["est", "sen"]);
    m.handle_response(now, est.handle(&sen));
    assert_eq!(m.state(), &MeterState::Enrolled);
}

#[test]
fn service_unavailable_waits_max_age_and_resends_identical_csr() {
    let mut est = FakeEst::new(3);
    est.busy_first = 2;
    est.busy_max_age = 7;
    let dev = est.device("SN000003");
    let mut m = Meter::new(MeterConfig::default(), &dev, 3).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    let crts = expect_send(&mut m);
    m.handle_response(now, est.handle(&crts));
    let sen = expect_send(&mut m);
    m.handle_response(now, est.handle(&sen));
    // RFC 9148 §4.7: wait Max-Age, on the same session.
    assert_eq!(
        m.state(),
        &MeterState::Waiting {
            until: now + Duration::from_secs(7),
            then: Resume::Resend(EstExchange::Enroll)
        }
    );
    assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(7)));
    assert!(m.poll_action().is_none());
    m.handle_timeout(now + Duration::from_secs(6));
    assert!(m.poll_action().is_none(), "too early");
    let t1 = now + Duration::from_secs(7);
    m.handle_timeout(t1);
    let again = expect_send(&mut m);
    assert_eq!(again.payload, sen.payload, "identical CSR");
    m.handle_response(t1, est.handle(&again));
    let t2 = t1 + Duration::from_secs(7);
    m.handle_timeout(t2);
    let third = expect_send(&mut m);
    m.handle_response(t2, est.handle(&third));
    expect_disconnect(&mut m);
    assert_eq!(m.state(), &MeterState::Enrolled);
    assert_eq!(m.stats().busy_retries, 2);
    assert_eq!(est.csrs.len(), 3);
    assert!(est.csrs.iter().all(|c| c == &est.csrs[0]));
}

#[test]
fn busy_retries_are_bounded() {
    let mut est = FakeEst::new(4);
    est.busy_first = 100;
    let dev = est.device("SN000004");
    let cfg = MeterConfig {
        max_busy_retries: 2,
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, 4).unwrap();
    let mut now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    for _ in 0..10 {
        serve(&mut m, &mut est, now);
        if let Some(t) = m.poll_timeout() {
            now = t;
            m.handle_timeout(now);
        }
    }
    assert_eq!(
        m.state(),
        &MeterState::Failed(FailureReason::Busy("/sen".into()))
    );
    assert_eq!(est.csrs.len(), 3);
}

#[test]
fn coap_timeout_reconnects_after_backoff_and_skips_crts() {
    let mut est = FakeEst::new(5);
    let dev = est.device("SN000005");
    let cfg = MeterConfig {
        retry_backoff: Duration::from_secs(2),
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, 5).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    let crts = expect_send(&mut m);
    m.handle_response(now, est.handle(&crts));
    let _sen = expect_send(&mut m);
    m.handle_request_failed(now, ClientError::Timeout);
    expect_disconnect(&mut m);
    let MeterState::Waiting { until, then } = m.state().clone() else {
        panic!("expected Waiting, got {:?}", m.state())
    };
    assert_eq!(then, Resume::Reconnect(Purpose::Enroll));
    // 2 s * 2^0 plus up to 50% jitter.
    let wait = until - now;
    assert!(
        wait >= Duration::from_secs(2) && wait < Duration::from_secs(3),
        "{wait:?}"
    );
    m.handle_timeout(until);
    expect_connect(&mut m);
    m.handle_connected(until);
    let sen = expect_send(&mut m);
    assert_eq!(
        sen.path.last().map(String::as_str),
        Some("sen"),
        "CA certs kept"
    );
    m.handle_response(until, est.handle(&sen));
    assert_eq!(m.state(), &MeterState::Enrolled);
    assert_eq!(m.stats().session_retries, 1);
    assert_eq!(m.stats().handshakes, 2);
}

#[test]
fn handshake_failures_exhaust_attempts() {
    let mut est = FakeEst::new(6);
    let dev = est.device("SN000006");
    let cfg = MeterConfig {
        max_attempts: 3,
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, 6).unwrap();
    let mut now = t0();
    m.start(now);
    let mut connects = 0;
    loop {
        while let Some(a) = m.poll_action() {
            if matches!(a, Action::Connect { .. }) {
                connects += 1;
                m.handle_connect_failed(now, FailureReason::HandshakeTimeout);
            }
        }
        match m.poll_timeout() {
            Some(t) => {
                now = t;
                m.handle_timeout(now);
            }
            None => break,
        }
    }
    assert_eq!(connects, 3);
    assert_eq!(
        m.state(),
        &MeterState::Failed(FailureReason::HandshakeTimeout)
    );
    assert_eq!(m.stats().handshakes_failed, 3);
}

#[test]
fn client_error_codes_are_final() {
    let mut est = FakeEst::new(7);
    est.reject_sen = Some(ResponseType::Forbidden);
    let dev = est.device("SN000007");
    let mut m = Meter::new(MeterConfig::default(), &dev, 7).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    serve(&mut m, &mut est, now);
    assert_eq!(
        m.state(),
        &MeterState::Failed(FailureReason::Rejected {
            resource: "/sen".into(),
            code: "4.03".into()
        })
    );
    assert!(m.poll_timeout().is_none());
    if let MeterState::Failed(r) = m.state() {
        assert_eq!(r.label(), "4.03 /sen");
    }
}

#[test]
fn certificate_for_another_key_fails_verification() {
    let mut est = FakeEst::new(8);
    est.wrong_key = true;
    let dev = est.device("SN000008");
    let mut m = Meter::new(MeterConfig::default(), &dev, 8).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    serve(&mut m, &mut est, now);
    assert!(matches!(
        m.state(),
        MeterState::Failed(FailureReason::Verification(_))
    ));
    assert!(m.ldevid().is_none());
}

#[test]
fn renews_with_the_ldevid() {
    let mut est = FakeEst::new(9);
    let dev = est.device("SN000009");
    let cfg = MeterConfig {
        renew: true,
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, 9).unwrap();
    let now = t0();
    m.start(now);
    expect_connect(&mut m);
    m.handle_connected(now);
    let crts = expect_send(&mut m);
    m.handle_response(now, est.handle(&crts));
    let sen = expect_send(&mut m);
    m.handle_response(now, est.handle(&sen));
    expect_disconnect(&mut m);
    let (purpose, cred) = expect_connect(&mut m);
    assert_eq!(purpose, Purpose::Renew);
    assert_eq!(cred.chain_der, vec![est.issued[0].clone()]);
    let t1 = now + Duration::from_secs(1);
    m.handle_connected(t1);
    let sren = expect_send(&mut m);
    assert_eq!(sren.path, vec![".well-known", "est", "sren"]);
    // RFC 7030 §4.2.2: subject and SAN identical to the certificate being renewed.
    let csr = est_proto::ca::parse_and_verify_csr(&sren.payload, 4096).unwrap();
    let current = {
        use der::Decode;
        x509_cert::Certificate::from_der(&est.issued[0]).unwrap()
    };
    assert_eq!(csr.subject, current.tbs_certificate.subject);
    assert_eq!(
        csr.hardware_module,
        est_proto::ca::hardware_module_from_cert(&current)
    );
    m.handle_response(t1 + Duration::from_secs(1), est.handle(&sren));
    expect_disconnect(&mut m);
    assert_eq!(m.state(), &MeterState::Enrolled);
    assert!(m.renewed());
    assert_eq!(m.ldevid(), Some(est.issued[1].as_slice()));
    assert_eq!(
        m.stats().renew_us,
        Some(2_000_000),
        "from the end of /sen to the renewed LDevID"
    );
}

#[test]
fn discovery_parser() {
    let fb = EstPaths::under("/.well-known/est");
    let p = parse_discovery(
        b"<coaps://[2001:db8::1]:61617/est/crts>;rt=\"ace.est.crts\";ct=\"281 287\",<coaps://[2001:db8::1]:61617/est/sen>;rt=\"ace.est.sen\"",
        &fb,
    )
    .unwrap();
    assert_eq!(p.crts, vec!["est", "crts"]);
    assert_eq!(p.sen, vec!["est", "sen"]);
    assert_eq!(p.sren, fb.sren);
    assert!(parse_discovery(b"</x>;rt=\"other\"", &fb).is_err());
    assert!(parse_discovery(&[0xff, 0xfe], &fb).is_err());
}

#[test]
fn system_keys_enroll_and_renew_with_a_fresh_key_per_meter() {
    let mut est = FakeEst::new(31);
    let dev = est.device("SN000031");
    let cfg = MeterConfig {
        renew: true,
        key_source: KeySource::System,
        ..MeterConfig::default()
    };
    // Same device, same seed: the seeded source would repeat the CSR; the system one may not.
    let mut m = Meter::new(cfg.clone(), &dev, 7).unwrap();
    let other = Meter::new(cfg, &dev, 7).unwrap();
    assert_ne!(m.public_key_spki(), other.public_key_spki());
    assert_ne!(m.csr_der(), other.csr_der());
    let seeded = |seed| Meter::new(MeterConfig::default(), &dev, seed).unwrap();
    assert_eq!(seeded(7).csr_der(), seeded(7).csr_der());
    // The server reads the request: the IDevID's serialNumber and hardwareModuleName.
    let csr = est_proto::ca::parse_and_verify_csr(m.csr_der(), 4096).unwrap();
    assert_eq!(
        est_proto::ca::serial_number_attr(&csr.subject).as_deref(),
        Some("SN000031")
    );
    assert!(csr.hardware_module.is_some());
    // A whole enrollment and renewal with it, the LDevID checked against our key each time.
    let now = t0();
    m.start(now);
    let _ = expect_connect(&mut m);
    m.handle_connected(now);
    let crts = expect_send(&mut m);
    m.handle_response(now, est.handle(&crts));
    let sen = expect_send(&mut m);
    m.handle_response(now, est.handle(&sen));
    expect_disconnect(&mut m);
    assert_eq!(m.ldevid(), Some(est.issued[0].as_slice()));
    let (purpose, cred) = expect_connect(&mut m);
    assert_eq!(purpose, Purpose::Renew);
    // The renewal session authenticates with the new key (ring's PKCS#8).
    assert_eq!(cred.chain_der, vec![est.issued[0].clone()]);
    assert!(ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &cred.key_pkcs8_der,
        &ring::rand::SystemRandom::new()
    )
    .is_ok());
    m.handle_connected(now);
    let sren = expect_send(&mut m);
    // The renewal request is signed with the same ring key and names the same key.
    let csr = est_proto::ca::parse_and_verify_csr(&sren.payload, 4096).unwrap();
    assert_eq!(
        der::Encode::to_der(&csr.public_key).unwrap(),
        m.public_key_spki()
    );
    m.handle_response(now, est.handle(&sren));
    expect_disconnect(&mut m);
    assert_eq!(m.state(), &MeterState::Enrolled);
    assert!(m.renewed());
    assert_eq!(m.ldevid(), Some(est.issued[1].as_slice()));
}
