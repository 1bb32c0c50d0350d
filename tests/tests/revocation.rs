//! Issue 13, over the real path (UDP + DTLS + CoAP + EST + SQLite, libcoap's coap-client as
//! the meter, openssl as the judge): revocation and the CRL, blocked devices, manufacturer
//! CRLs, the issuing CA expiring while the server runs, the per-device enrollment rate limit,
//! and a renewed DTLS certificate picked up without a restart.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use est_proto::store::{RevocationReason, RevokeOutcome};
use est_tests::*;

/// A meter that enrolled: its IDevID credentials and its LDevID (PEM) with key.
struct Meter {
    idevid: PathBuf,
    idevid_key: PathBuf,
    trust: PathBuf,
    ldevid_pem: PathBuf,
    ldevid_key: PathBuf,
    work: PathBuf,
}

impl Meter {
    fn idevid_creds(&self) -> Creds<'_> {
        Creds {
            cert: &self.idevid,
            key: &self.idevid_key,
            trust: &self.trust,
        }
    }

    fn ldevid_creds(&self) -> Creds<'_> {
        Creds {
            cert: &self.ldevid_pem,
            key: &self.ldevid_key,
            trust: &self.trust,
        }
    }

    /// The LDevID's serial as the store keeps it (lower-case hex).
    fn ldevid_serial(&self) -> String {
        let out = openssl(&[
            "x509",
            "-in",
            path_str(&self.ldevid_pem).unwrap(),
            "-noout",
            "-serial",
        ])
        .unwrap();
        out.trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase()
    }
}

/// Mint `serial`'s IDevID and enroll it with `which` (/sen, answer 287).
async fn enroll(srv: &TestServer, which: Libcoap, serial: &str) -> Meter {
    let fleet = srv.mint(&[serial]).unwrap();
    let dev = fleet.join(serial);
    let work = srv.dir.path().join(format!("work-{serial}"));
    std::fs::create_dir_all(&work).unwrap();
    let m = Meter {
        // coap-client-openssl sends only its leaf; coap-client-gnutls the chain.
        idevid: match which {
            Libcoap::Gnutls => dev.join("idevid-chain.pem"),
            Libcoap::Openssl => dev.join("idevid.pem"),
        },
        idevid_key: dev.join("idevid.key"),
        trust: fleet.join("implicit-ta.pem"),
        ldevid_pem: work.join("ldevid.pem"),
        ldevid_key: work.join("ldevid.key"),
        work: work.clone(),
    };
    let (key, csr) = openssl_csr(&work, "ldevid", &format!("/serialNumber={serial}")).unwrap();
    assert_eq!(key, m.ldevid_key);
    let der = work.join("ldevid.der");
    let run = sen(srv, which, &m.idevid_creds(), &csr, Some(&der)).await;
    assert!(run.payload.is_some(), "/sen of {serial}: {run:?}");
    assert_eq!(der_to_pem(&der).unwrap(), m.ldevid_pem);
    m
}

async fn sen(
    srv: &TestServer,
    which: Libcoap,
    creds: &Creds<'_>,
    csr: &Path,
    out: Option<&Path>,
) -> CoapRun {
    post_csr_with(which, creds, &srv.url("sen"), csr, out, None)
        .await
        .unwrap()
}

/// /sren with the meter's LDevID and a CSR for its subject.
async fn sren(srv: &TestServer, which: Libcoap, m: &Meter, name: &str) -> CoapRun {
    let subject = cert_subject(&m.ldevid_pem).unwrap();
    let (_, csr) = openssl_csr(&m.work, name, &subject).unwrap();
    post_csr_with(
        which,
        &m.ldevid_creds(),
        &srv.url("sren"),
        &csr,
        Some(&m.work.join(format!("{name}.der"))),
        None,
    )
    .await
    .unwrap()
}

/// The handshake did not complete: no CoAP answer at all, and the server's count of
/// completed handshakes did not move.
fn assert_handshake_refused(run: &CoapRun, before: u64, srv: &TestServer) {
    assert!(run.payload.is_none(), "{run:?}");
    assert!(
        run.error_code().is_none(),
        "no CoAP answer expected: {run:?}"
    );
    assert_eq!(
        srv.transport().handshakes_completed,
        before,
        "the handshake must not complete: {run:?}"
    );
}

/// Wait until the server's handshake checks reflect every revocation in the store (the
/// revocation poll, [revocation] poll_interval_secs).
async fn wait_for_revocation_poll(srv: &TestServer) {
    let want = srv.store().revocation_generation().unwrap();
    for _ in 0..100 {
        if srv.running().revocation.generation() >= want {
            // One more tick so that the CRL of that generation is the one served.
            srv.running().poll_revocations().await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the revocation poll did not reach generation {want}");
}

/// The latest audit rows once one matches `pred`: a handshake refusal's row is written
/// behind the refusal (submitted to the store's writer), so it may land a moment later.
async fn audit_with(
    srv: &TestServer,
    pred: impl Fn(&est_proto::store::AuditEvent) -> bool,
) -> Vec<est_proto::store::AuditEvent> {
    for _ in 0..100 {
        let audit = srv.store().recent_audit(50).unwrap();
        if audit.iter().any(&pred) {
            return audit;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no such audit row: {:?}",
        srv.store().recent_audit(50).unwrap()
    );
}

/// `openssl <args>`: (success, stdout + stderr).
fn openssl_status(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn config(srv: &TestServer) -> est_server::config::Config {
    est_server::datadir::load_config(&srv.data_dir, None).unwrap()
}

/// The CLI's `certs revoke` (through the library function it is a thin shell around).
fn revoke(srv: &TestServer, serial: &str, reason: RevocationReason) -> RevokeOutcome {
    est_server::revocation::revoke_certificate(
        &srv.data_dir,
        &config(srv),
        serial,
        reason,
        SystemTime::now(),
    )
    .unwrap()
    .outcome
}

/// Revoke one of two enrolled LDevIDs (keyCompromise): libcoap's /sren with it is refused
/// (at the EST layer until the poll, then at the handshake, audited); the CRL written to the
/// data directory and served over CoAP verifies with openssl, lists it with its reason, and
/// `openssl verify -crl_check` rejects the revoked certificate and accepts the live one. The
/// issued certificates carry the configured CRL Distribution Point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_ldevid_cannot_reenroll_and_the_crl_lists_it() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|c| {
        c.revocation.poll_interval_secs = 1;
        c.revocation.distribution_points = vec!["coaps://est.example.net/crl".into()];
    })
    .await
    .unwrap();
    let gone = enroll(&srv, Libcoap::Gnutls, "SNREVOKED1").await;
    let live = enroll(&srv, Libcoap::Openssl, "SNLIVE1").await;
    let text = openssl(&[
        "x509",
        "-in",
        path_str(&gone.ldevid_pem).unwrap(),
        "-noout",
        "-text",
    ])
    .unwrap();
    assert!(
        text.contains("CRL Distribution Points") && text.contains("coaps://est.example.net/crl"),
        "{text}"
    );

    let serial = gone.ldevid_serial();
    match revoke(&srv, &serial, RevocationReason::KeyCompromise) {
        RevokeOutcome::Revoked(c) => assert_eq!(c.device_id, "SNREVOKED1"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        revoke(&srv, &serial, RevocationReason::KeyCompromise),
        RevokeOutcome::AlreadyRevoked(_)
    ));
    // Right away (before the server's poll), /sren is refused by the EST layer, which reads
    // the store on every enrollment; or already at the handshake if the poll came first.
    let before = srv.transport().handshakes_completed;
    let run = sren(&srv, Libcoap::Gnutls, &gone, "renew1").await;
    assert!(run.payload.is_none(), "{run:?}");
    if run.error_code().is_some() {
        assert_eq!(run.error_code(), Some("4.03"), "{run:?}");
        assert!(run.stderr.contains("revoked"), "diagnostic: {run:?}");
    } else {
        assert_handshake_refused(&run, before, &srv);
    }
    // Once the poll has seen it, the handshake itself is refused (certificate_revoked),
    // with an audit row.
    wait_for_revocation_poll(&srv).await;
    let before = srv.transport().handshakes_completed;
    let run = sren(&srv, Libcoap::Gnutls, &gone, "renew2").await;
    assert_handshake_refused(&run, before, &srv);
    assert!(
        srv.running()
            .revocation
            .refused_revoked
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let audit = audit_with(&srv, |a| {
        a.operation == "handshake"
            && a.outcome == "refused"
            && a.device_id == "SNREVOKED1"
            && a.code == "alert 44"
            && a.detail.contains(&serial)
    })
    .await;
    assert!(
        audit.iter().any(|a| a.operation == "revoke"
            && a.device_id == "SNREVOKED1"
            && a.detail.contains("keyCompromise")),
        "{audit:?}"
    );
    assert_eq!(
        srv.store().list_certificates(10).unwrap().len(),
        2,
        "nothing issued"
    );

    // The CRL in the data directory: signed by the issuing CA, lists the certificate with
    // its reason, has a number, thisUpdate and nextUpdate.
    let crl_pem = srv.data_dir.join("crl/issuing-ca.crl.pem");
    let ca = srv.ca_pem();
    let (ok, out) = openssl_status(&[
        "crl",
        "-in",
        path_str(&crl_pem).unwrap(),
        "-CAfile",
        path_str(&ca).unwrap(),
        "-verify",
        "-noout",
        "-text",
    ]);
    assert!(ok && out.contains("verify OK"), "{out}");
    assert!(out.contains("Version 2"), "{out}");
    assert!(out.contains(&serial.to_ascii_uppercase()), "{out}");
    assert!(out.contains("Key Compromise"), "{out}");
    assert!(out.contains("X509v3 CRL Number"), "{out}");
    assert!(
        out.contains("Last Update") && out.contains("Next Update"),
        "{out}"
    );
    // The DER file is the same CRL.
    let (ok, out) = openssl_status(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        path_str(&srv.data_dir.join("crl/issuing-ca.crl")).unwrap(),
        "-CAfile",
        path_str(&ca).unwrap(),
        "-verify",
        "-noout",
    ]);
    assert!(ok && out.contains("verify OK"), "{out}");

    // openssl verify -crl_check: the revoked one is rejected, the live one accepted.
    let (ok, out) = openssl_status(&[
        "verify",
        "-crl_check",
        "-CAfile",
        path_str(&ca).unwrap(),
        "-CRLfile",
        path_str(&crl_pem).unwrap(),
        path_str(&gone.ldevid_pem).unwrap(),
    ]);
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let (ok, out) = openssl_status(&[
        "verify",
        "-crl_check",
        "-CAfile",
        path_str(&ca).unwrap(),
        "-CRLfile",
        path_str(&crl_pem).unwrap(),
        path_str(&live.ldevid_pem).unwrap(),
    ]);
    assert!(ok && out.contains(": OK"), "{out}");

    // Over CoAP: the live meter fetches the same CRL (Content-Format 65005).
    let fetched = live.work.join("fetched.crl");
    let run = coap_client(
        Libcoap::Openssl,
        Some(&live.ldevid_creds()),
        &["-m", "get", "-A", "65005"],
        &srv.url_at("/crl"),
        Some(&fetched),
    )
    .await
    .unwrap();
    let body = run
        .payload
        .clone()
        .unwrap_or_else(|| panic!("no CRL: {run:?}"));
    assert_eq!(
        body,
        std::fs::read(srv.data_dir.join("crl/issuing-ca.crl")).unwrap(),
        "the CRL served is the one written"
    );
    let (ok, out) = openssl_status(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        path_str(&fetched).unwrap(),
        "-CAfile",
        path_str(&ca).unwrap(),
        "-verify",
        "-noout",
    ]);
    assert!(ok && out.contains("verify OK"), "{out}");

    // The live meter still re-enrolls.
    let run = sren(&srv, Libcoap::Openssl, &live, "renew-live").await;
    assert!(run.payload.is_some(), "{run:?}");
    srv.stop().await;
}

/// `devices block`: the device's active certificate is revoked (cessationOfOperation), its
/// IDevID and LDevID handshakes are refused (access_denied, audited), nothing more is issued;
/// with --keep-certs its certificate stays active but its enrollments are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_device_is_refused_and_its_certificate_revoked() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|c| c.revocation.poll_interval_secs = 1)
        .await
        .unwrap();
    let m = enroll(&srv, Libcoap::Openssl, "SNSTOLEN1").await;
    let kept = enroll(&srv, Libcoap::Gnutls, "SNKEEP1").await;
    let cfg = config(&srv);
    let r = est_server::revocation::block_device(
        &srv.data_dir,
        &cfg,
        "SNSTOLEN1",
        false,
        RevocationReason::CessationOfOperation,
        SystemTime::now(),
    )
    .unwrap();
    assert!(r.outcome.newly_blocked);
    assert_eq!(r.outcome.revoked_serials, [m.ldevid_serial()]);
    assert!(r.crl.is_some());
    let r = est_server::revocation::block_device(
        &srv.data_dir,
        &cfg,
        "SNKEEP1",
        true,
        RevocationReason::CessationOfOperation,
        SystemTime::now(),
    )
    .unwrap();
    assert!(r.outcome.revoked_serials.is_empty());
    assert!(srv.store().device_blocked("SNSTOLEN1").unwrap());
    wait_for_revocation_poll(&srv).await;

    // /sen with the IDevID and /sren with the LDevID: refused at the handshake.
    let (_, csr) = openssl_csr(&m.work, "again", "/serialNumber=SNSTOLEN1").unwrap();
    let before = srv.transport().handshakes_completed;
    let run = sen(&srv, Libcoap::Openssl, &m.idevid_creds(), &csr, None).await;
    assert_handshake_refused(&run, before, &srv);
    let run = sren(&srv, Libcoap::Openssl, &m, "renew").await;
    assert_handshake_refused(&run, before, &srv);
    let (_, csr) = openssl_csr(&kept.work, "again", "/serialNumber=SNKEEP1").unwrap();
    let run = sen(&srv, Libcoap::Gnutls, &kept.idevid_creds(), &csr, None).await;
    assert_handshake_refused(&run, before, &srv);

    let certs = srv.store().list_certificates(10).unwrap();
    let status = |dev: &str| {
        certs
            .iter()
            .find(|c| c.device_id == dev)
            .map(|c| c.status.as_str())
    };
    assert_eq!(certs.len(), 2);
    assert_eq!(status("SNSTOLEN1"), Some("revoked"));
    assert_eq!(status("SNKEEP1"), Some("active"));
    let audit = audit_with(&srv, |a| {
        a.operation == "handshake" && a.device_id == "SNSTOLEN1" && a.code == "alert 49"
    })
    .await;
    assert!(
        audit
            .iter()
            .any(|a| a.operation == "block" && a.device_id == "SNSTOLEN1"),
        "{audit:?}"
    );
    // The CRL lists the blocked device's certificate as cessationOfOperation.
    let (ok, out) = openssl_status(&[
        "crl",
        "-in",
        path_str(&srv.data_dir.join("crl/issuing-ca.crl.pem")).unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(ok && out.contains("Cessation Of Operation"), "{out}");
    assert!(
        out.contains(&m.ldevid_serial().to_ascii_uppercase()),
        "{out}"
    );
    srv.stop().await;
}

/// A manufacturer's CRL made by `openssl ca -gencrl` (the demo manufacturer CA revokes one
/// IDevID): configured in `[pki] manufacturer_crls`, that IDevID is refused at the handshake
/// and another of the same maker still enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idevid_on_its_manufacturers_crl_is_refused() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNMFRBAD", "SNMFROK"]).unwrap();
    let mca = srv.dir.path().join("maker-ca");
    std::fs::create_dir_all(&mca).unwrap();
    std::fs::write(mca.join("index.txt"), "").unwrap();
    std::fs::write(mca.join("crlnumber"), "01\n").unwrap();
    let cnf = mca.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = maker\n[maker]\ndatabase = {}\ncrlnumber = {}\ndefault_md = sha256\ndefault_crl_days = 30\n",
            mca.join("index.txt").display(),
            mca.join("crlnumber").display()
        ),
    )
    .unwrap();
    let maker_cert = srv.data_dir.join("manufacturers/demo-manufacturer-ca.pem");
    let maker_key = srv.data_dir.join("manufacturers/demo-manufacturer-ca.key");
    let ca_args = |extra: &[&str]| {
        let mut a = vec![
            "ca",
            "-config",
            path_str(&cnf).unwrap(),
            "-keyfile",
            path_str(&maker_key).unwrap(),
            "-cert",
            path_str(&maker_cert).unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let bad_idevid = fleet.join("SNMFRBAD/idevid.pem");
    let args = ca_args(&[
        "-revoke",
        path_str(&bad_idevid).unwrap(),
        "-crl_reason",
        "keyCompromise",
    ]);
    let (ok, out) = openssl_status(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    let crl = srv.data_dir.join("manufacturers/demo-manufacturer.crl");
    let args = ca_args(&["-gencrl", "-out", path_str(&crl).unwrap()]);
    let (ok, out) = openssl_status(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");

    let srv = srv
        .restart(|c| c.pki.manufacturer_crls = vec!["manufacturers/demo-manufacturer.crl".into()])
        .await
        .unwrap();
    let trust = fleet.join("implicit-ta.pem");
    let work = srv.dir.path().join("mfr-work");
    std::fs::create_dir_all(&work).unwrap();
    let (_, csr) = openssl_csr(&work, "bad", "/serialNumber=SNMFRBAD").unwrap();
    let before = srv.transport().handshakes_completed;
    let run = sen(
        &srv,
        Libcoap::Gnutls,
        &Creds {
            cert: &fleet.join("SNMFRBAD/idevid-chain.pem"),
            key: &fleet.join("SNMFRBAD/idevid.key"),
            trust: &trust,
        },
        &csr,
        None,
    )
    .await;
    assert_handshake_refused(&run, before, &srv);
    assert_eq!(
        srv.running()
            .revocation
            .refused_manufacturer_revoked
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let (_, csr) = openssl_csr(&work, "ok", "/serialNumber=SNMFROK").unwrap();
    let run = sen(
        &srv,
        Libcoap::Gnutls,
        &Creds {
            cert: &fleet.join("SNMFROK/idevid-chain.pem"),
            key: &fleet.join("SNMFROK/idevid.key"),
            trust: &trust,
        },
        &csr,
        Some(&work.join("ok.der")),
    )
    .await;
    assert!(run.payload.is_some(), "{run:?}");
    audit_with(&srv, |a| {
        a.operation == "handshake" && a.device_id == "SNMFRBAD" && a.detail.contains("manufacturer")
    })
    .await;

    // A CRL that is not the manufacturer's (our own CA's) is refused at start, naming it.
    let srv = srv
        .restart(|c| c.pki.manufacturer_crls = vec!["crl/issuing-ca.crl".into()])
        .await;
    let err = match srv {
        Ok(_) => panic!("a CRL of another CA must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("issuing-ca.crl") && err.contains("manufacturer"),
        "{err}"
    );
}

/// The issuing CA expires while the server runs (the server's wall clock moved 21 years on,
/// past the CA's 20): /sen gets 5.03 with a diagnostic naming the expiry, audited, never
/// 5.00. Back to the present, the same meter enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ca_answers_503_with_a_diagnostic() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNCLOCK"]).unwrap();
    let dev = fleet.join("SNCLOCK");
    let trust = fleet.join("implicit-ta.pem");
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &trust,
    };
    let (_, csr) = openssl_csr(srv.dir.path(), "clock", "/serialNumber=SNCLOCK").unwrap();
    srv.running().clock.set_offset_secs(21 * 365 * 86_400);
    let run = sen(&srv, Libcoap::Gnutls, &creds, &csr, None).await;
    assert_eq!(run.error_code(), Some("5.03"), "{run:?}");
    assert!(
        run.stderr.contains("issuing CA certificate expired"),
        "diagnostic: {run:?}"
    );
    assert_eq!(srv.running().est.counters().ca_unavailable, 1);
    let audit = srv.store().recent_audit(5).unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.code == "5.03" && a.detail.contains("expired")),
        "{audit:?}"
    );
    srv.running().clock.set_offset_secs(0);
    let out = srv.dir.path().join("clock.der");
    let run = sen(&srv, Libcoap::Gnutls, &creds, &csr, Some(&out)).await;
    assert!(run.payload.is_some(), "{run:?}");
    srv.stop().await;
}

/// `[enrollment] max_per_device_per_period = 1`: a second certificate for the same device
/// within the period gets 5.03 (audited); a retried request for the first one still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_device_enrollment_rate_limit_answers_503() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|c| {
        c.enrollment.max_per_device_per_period = 1;
        c.enrollment.period_secs = 3600;
    })
    .await
    .unwrap();
    let m = enroll(&srv, Libcoap::Gnutls, "SNRATE1").await;
    // The same CSR again: the certificate already issued (a retry, not a new enrollment).
    let run = sen(
        &srv,
        Libcoap::Gnutls,
        &m.idevid_creds(),
        &m.work.join("ldevid.csr.der"),
        Some(&m.work.join("again.der")),
    )
    .await;
    assert!(run.payload.is_some(), "{run:?}");
    let (_, csr) = openssl_csr(&m.work, "second", "/serialNumber=SNRATE1").unwrap();
    let run = sen(&srv, Libcoap::Gnutls, &m.idevid_creds(), &csr, None).await;
    assert_eq!(run.error_code(), Some("5.03"), "{run:?}");
    assert!(run.stderr.contains("rate limit"), "diagnostic: {run:?}");
    assert_eq!(srv.store().count_certificates().unwrap(), 1);
    assert_eq!(srv.running().est.counters().rate_limited, 1);
    let audit = srv.store().recent_audit(5).unwrap();
    assert!(
        audit.iter().any(|a| a.device_id == "SNRATE1"
            && a.outcome == "refused"
            && a.code == "5.03"
            && a.detail.contains("rate limit")),
        "{audit:?}"
    );
    srv.stop().await;
}

/// `est-server dtls renew` (the library function behind it) then a reload (what SIGHUP
/// does): new handshakes get the new certificate, and a meter enrolls over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_dtls_certificate_is_used_after_reload() {
    if !require_tools() {
        return;
    }
    let srv = TestServer::start(|_| {}).await.unwrap();
    let cert_path = srv.data_dir.join("dtls/server.pem");
    let old = std::fs::read(&cert_path).unwrap();
    let renewed = est_server::lifetime::renew_dtls_certificate(
        &srv.data_dir,
        &config(&srv),
        &["est.example.net".into()],
        90,
        SystemTime::now(),
    )
    .unwrap();
    assert!(renewed.dns_names.contains(&"localhost".to_string()));
    assert!(renewed.dns_names.contains(&"est.example.net".to_string()));
    assert_ne!(std::fs::read(&cert_path).unwrap(), old);
    srv.running().reload().await.unwrap();
    let (_, dtls_days) = srv.running().lifetimes.days_left(SystemTime::now());
    assert!((88..=90).contains(&dtls_days), "{dtls_days}");
    // The server now presents the new certificate: openssl s_client shows its SAN.
    let fleet = srv.mint(&["SNRENEW"]).unwrap();
    let dev = fleet.join("SNRENEW");
    let out = Command::new("timeout")
        .args(["20", "openssl", "s_client", "-dtls1_2", "-connect"])
        .arg(srv.addr.to_string())
        .arg("-cert")
        .arg(dev.join("idevid.pem"))
        .arg("-key")
        .arg(dev.join("idevid.key"))
        .arg("-CAfile")
        .arg(srv.ca_pem())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    let pem_start = shown
        .find("-----BEGIN CERTIFICATE-----")
        .expect("server certificate");
    let pem_end = shown.find("-----END CERTIFICATE-----").unwrap() + 25;
    let presented = srv.dir.path().join("presented.pem");
    std::fs::write(&presented, &shown[pem_start..pem_end]).unwrap();
    let text = openssl(&[
        "x509",
        "-in",
        path_str(&presented).unwrap(),
        "-noout",
        "-text",
    ])
    .unwrap();
    assert!(text.contains("est.example.net"), "{text}");
    openssl_verify(&srv.ca_pem(), &presented).unwrap();
    srv.stop().await;
}
