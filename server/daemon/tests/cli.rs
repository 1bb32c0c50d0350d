//! The `est-server` binary as an operator uses it: init, key file modes, factory mint,
//! run (prints where it listens), certs list, help texts, and the operator commands on PostgreSQL.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_est-server"))
}

fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "est-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn help_explains_every_subcommand() {
    let top = run_ok(&["--help"]);
    for sub in [
        "init", "run", "factory", "certs", "devices", "c509", "audit",
    ] {
        assert!(top.contains(sub), "--help lacks {sub}: {top}");
    }
    assert!(run_ok(&["factory", "mint", "--help"]).contains("--count"));
    assert!(run_ok(&["run", "--help"]).contains("--listen"));
    assert!(run_ok(&["c509", "encode", "--help"]).contains("--info"));
}

#[cfg(unix)]
#[test]
fn init_writes_private_keys_0600_and_a_documented_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    assert!(run_ok(&["init", "--data-dir", ds]).contains("created"));
    for key in [
        "ca/issuing-ca.key",
        "dtls/server.key",
        "manufacturers/demo-manufacturer-ca.key",
    ] {
        assert_eq!(mode(&d.join(key)), 0o600, "{key}");
    }
    let toml = std::fs::read_to_string(d.join("est-server.toml")).unwrap();
    assert!(toml.contains("max_half_open_handshakes"));
    // A second init leaves everything alone.
    let before = std::fs::read(d.join("ca/issuing-ca.key")).unwrap();
    assert!(run_ok(&["init", "--data-dir", ds]).contains("untouched"));
    assert_eq!(std::fs::read(d.join("ca/issuing-ca.key")).unwrap(), before);

    // A fleet: keys 0600, fleet.json lists the devices.
    let out = dir.path().join("fleet");
    run_ok(&[
        "factory",
        "mint",
        "--data-dir",
        ds,
        "--count",
        "3",
        "--prefix",
        "MTR",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(mode(&out.join("MTR000002/idevid.key")), 0o600);
    let fleet: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("fleet.json")).unwrap()).unwrap();
    assert_eq!(fleet["devices"].as_array().unwrap().len(), 3);
    // The IDevID carries the serial (checked by openssl; under CI it must be installed).
    if est_test_tools::require_tools(&["openssl"]) {
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(out.join("MTR000001/idevid.pem"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&text.stdout).contains("MTR000001"));
    }
    assert!(run_ok(&["certs", "list", "--data-dir", ds]).starts_with("serial"));
}

#[test]
fn run_starts_listening_and_stops_on_sigterm_and_sigint() {
    // Each signal is sent the moment the first line is read: the handlers must already be in.
    for signal in ["-TERM", "-INT"] {
        run_until_signal(signal);
    }
}

fn run_until_signal(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let mut child = bin()
        .args([
            "run",
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = est_test_tools::announced_address(stdout, Duration::from_secs(30)).unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_ne!(addr.port(), 0, "the real port is printed");
    // First start created the data directory on its own.
    assert!(d.join("est-server.toml").exists());
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status();
    }
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status} after kill {signal}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "did not stop on kill {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replace the data directory's issuing CA with one valid from `not_before` for `validity`.
fn install_issuing_ca(d: &Path, not_before: std::time::SystemTime, validity: Duration) {
    let (cert, key) = est_proto::ca::generate_root_ca(
        "EST Issuing CA",
        "est-server",
        not_before,
        validity,
        &mut rand::rngs::OsRng,
    )
    .unwrap();
    std::fs::write(
        d.join("ca/issuing-ca.pem"),
        est_server::datadir::cert_pem(&cert).unwrap(),
    )
    .unwrap();
    est_server::datadir::write_private(
        &d.join("ca/issuing-ca.key"),
        est_server::datadir::key_pem(&key).unwrap().as_bytes(),
    )
    .unwrap();
}

/// Issue 13: an issuing CA outside its validity refuses to start, saying so.
#[test]
fn an_expired_or_not_yet_valid_ca_refuses_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    run_ok(&["init", "--data-dir", ds]);
    let year = Duration::from_secs(365 * 86_400);
    let now = std::time::SystemTime::now();
    for (not_before, want) in [
        (now - 3 * year, "issuing CA certificate expired at"),
        (now + year, "issuing CA certificate is not valid before"),
    ] {
        install_issuing_ca(&d, not_before, year);
        let out = bin()
            .args(["run", "--data-dir", ds, "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refusing to start") && err.contains(want) && err.contains("renewed"),
            "{err}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
}

/// An LDevID issued by the data directory's CA, put in its store as the server would.
fn issue_into_store(d: &Path, device: &str) -> String {
    use est_proto::ca;
    use est_proto::store::{
        commit_and_wait, AuditEvent, CertStatus, Commit, IssuanceKind, IssuedCert,
    };
    let cfg = est_server::datadir::load_config(d, None).unwrap();
    let issuing = est_server::revocation::load_issuing_ca(d, &cfg).unwrap();
    let mut rng = rand::rngs::OsRng;
    let key = ca::generate_p256_pkcs8(&mut rng).unwrap();
    let spki = ca::p256_spki_from_pkcs8(&key).unwrap();
    let now = std::time::SystemTime::now();
    let subject = ca::name_from_attrs(&[(ca::oid::AT_SERIAL_NUMBER, device)]).unwrap();
    let serial = ca::random_serial(&mut rng);
    let params = ca::IssueParams::new(
        subject,
        spki,
        serial.clone(),
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
    );
    let der = issuing.issue(&params).unwrap();
    let serial_hex = hex::encode(serial.as_bytes());
    let store = est_server::store::SqliteStore::open(&d.join("est.sqlite3"), 1).unwrap();
    let at = est_proto::store::unix_seconds(now);
    commit_and_wait(
        &store,
        Commit::Issuance {
            cert: Box::new(IssuedCert {
                serial_hex: serial_hex.clone(),
                device_id: device.into(),
                subject: format!("serialNumber={device}"),
                der: der.clone(),
                request_digest: ca::csr_digest(&der),
                not_before_unix: at - 60,
                not_after_unix: at + 86_400,
                issued_at_unix: at,
                status: CertStatus::Active,
                kind: IssuanceKind::Enroll,
                replaces_serial_hex: None,
                slot: String::new(),
                profile: String::new(),
            }),
            audit: AuditEvent {
                at_unix: at,
                peer: "test".into(),
                relay: None,
                device_id: device.into(),
                operation: "sen".into(),
                outcome: "issued".into(),
                code: "2.04".into(),
                detail: String::new(),
            },
        },
    )
    .unwrap();
    store.close();
    std::fs::write(
        d.join(format!("{device}.pem")),
        est_server::datadir::cert_pem(&der).unwrap(),
    )
    .unwrap();
    serial_hex
}

/// `certs revoke`, `devices block`, `crl publish|show` as an operator types them; the CRL
/// they write verifies with openssl and lists what they revoked with its reason.
#[test]
fn revoke_block_and_crl_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    run_ok(&["init", "--data-dir", ds]);
    let s1 = issue_into_store(&d, "SNCLI1");
    let s2 = issue_into_store(&d, "SNCLI2");
    let s3 = issue_into_store(&d, "SNCLI3");

    let out = run_ok(&[
        "certs",
        "revoke",
        "--data-dir",
        ds,
        &s1[..12],
        "--reason",
        "keyCompromise",
    ]);
    assert!(
        out.contains(&format!("revoked {s1}")) && out.contains("keyCompromise (1)"),
        "{out}"
    );
    assert!(out.contains("CRL number 1 published"), "{out}");
    let out = run_ok(&["certs", "revoke", "--data-dir", ds, &s1]);
    assert!(out.contains("already revoked"), "{out}");
    let bad = bin()
        .args([
            "certs",
            "revoke",
            "--data-dir",
            ds,
            &s2,
            "--reason",
            "stolen",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("keyCompromise"));
    let missing = bin()
        .args(["certs", "revoke", "--data-dir", ds, "ffff"])
        .output()
        .unwrap();
    assert!(!missing.status.success());

    let out = run_ok(&["devices", "block", "--data-dir", ds, "SNCLI2"]);
    assert!(
        out.contains("device SNCLI2 blocked") && out.contains(&format!("revoked {s2}")),
        "{out}"
    );
    let out = run_ok(&[
        "devices",
        "block",
        "--data-dir",
        ds,
        "SNCLI3",
        "--keep-certs",
    ]);
    assert!(out.contains("kept"), "{out}");
    let list = run_ok(&["certs", "list", "--data-dir", ds]);
    let line = |s: &str| list.lines().find(|l| l.starts_with(s)).unwrap().to_string();
    assert!(line(&s1).contains("revoked"), "{list}");
    assert!(line(&s2).contains("revoked"), "{list}");
    assert!(line(&s3).contains("active"), "{list}");
    let show = run_ok(&["crl", "show", "--data-dir", ds]);
    assert!(
        show.contains("CRL number:  2")
            && show.contains("keyCompromise")
            && show.contains("cessationOfOperation")
            && show.contains("SNCLI3"),
        "{show}"
    );
    let audit = run_ok(&["audit", "--data-dir", ds]);
    assert!(
        audit.contains("revoke") && audit.contains("block"),
        "{audit}"
    );
    let out = run_ok(&["crl", "publish", "--data-dir", ds]);
    assert!(out.contains("CRL number 3"), "{out}");

    if est_test_tools::require_tools(&["openssl"]) {
        let crl = d.join("crl/issuing-ca.crl.pem");
        let ca = d.join("ca/issuing-ca.pem");
        let out = Command::new("openssl")
            .args(["crl", "-verify", "-noout", "-text", "-in"])
            .arg(&crl)
            .arg("-CAfile")
            .arg(&ca)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("verify OK"), "{text}");
        assert!(text.contains(&s1.to_ascii_uppercase()) && text.contains("Key Compromise"));
        assert!(text.contains(&s2.to_ascii_uppercase()) && text.contains("Cessation Of Operation"));
        assert!(!text.contains(&s3.to_ascii_uppercase()));
        for (serial, device, revoked) in [(&s1, "SNCLI1", true), (&s3, "SNCLI3", false)] {
            let out = Command::new("openssl")
                .args(["verify", "-crl_check", "-CAfile"])
                .arg(&ca)
                .arg("-CRLfile")
                .arg(&crl)
                .arg(d.join(format!("{device}.pem")))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.success(), !revoked, "{serial}: {text}");
            if revoked {
                assert!(text.contains("certificate revoked"), "{text}");
            }
        }
    }
}

/// `dtls renew` writes a new certificate and key (key 0600); SIGHUP makes the running server
/// reload it without stopping; SIGTERM still stops it cleanly.
#[cfg(unix)]
#[test]
fn dtls_renew_then_sighup_reloads_without_a_restart() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    run_ok(&["init", "--data-dir", ds]);
    let mut child = bin()
        .args(["run", "--data-dir", ds, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    est_test_tools::announced_address(stdout, Duration::from_secs(30)).unwrap();
    let before = std::fs::read(d.join("dtls/server.pem")).unwrap();
    let out = run_ok(&[
        "dtls",
        "renew",
        "--data-dir",
        ds,
        "--server-name",
        "meters.example.net",
        "--validity-days",
        "20",
    ]);
    assert!(
        out.contains("meters.example.net") && out.contains("kill -HUP"),
        "{out}"
    );
    assert_ne!(std::fs::read(d.join("dtls/server.pem")).unwrap(), before);
    assert_eq!(mode(&d.join("dtls/server.key")), 0o600);
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("no reload logged: {seen:#?}");
        };
        if line.contains("reloaded") {
            break;
        }
        seen.push(line);
    }
    // 20 days is inside the 30-day warning window: the reload says so.
    assert!(
        seen.iter()
            .any(|l| l.contains("DTLS server certificate expires soon")),
        "{seen:#?}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running after SIGHUP"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `certs list`, `certs show`, `audit` and `devices import` on a data directory whose
/// `[storage]` names PostgreSQL: the operator commands read the database the nodes share.
#[test]
fn operator_commands_work_on_postgres() {
    use est_proto::store::{
        commit_and_wait, AuditEvent, CertStatus, Commit, IssuanceKind, IssuedCert,
    };
    use est_server::store::ServerStore;
    let Some(pg) =
        est_test_tools::pg::TestPostgres::start_or_skip("operator commands on PostgreSQL")
    else {
        return;
    };
    let url = pg.create_database("ops").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    run_ok(&["init", "--data-dir", ds]);
    let cfg_path = d.join("est-server.toml");
    let toml = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("backend = \"sqlite\"", "backend = \"postgres\"")
        .replace("url = \"\"", &format!("url = \"{url}\""));
    std::fs::write(&cfg_path, toml).unwrap();
    // What a node committed.
    let store = est_server::store::postgres::PgStore::open(
        &est_server::store::postgres::PgSettings::new(&url),
    )
    .unwrap();
    let cert = IssuedCert {
        serial_hex: "7fa1c0de".into(),
        device_id: "SNPG1".into(),
        subject: "CN=SNPG1,serialNumber=SNPG1".into(),
        der: b"not really DER".to_vec(),
        request_digest: [3; 32],
        not_before_unix: 1_700_000_000,
        not_after_unix: 1_800_000_000,
        issued_at_unix: 1_750_000_000,
        status: CertStatus::Active,
        kind: IssuanceKind::Enroll,
        replaces_serial_hex: None,
        slot: String::new(),
        profile: String::new(),
    };
    let audit = AuditEvent {
        at_unix: 1_750_000_000,
        peer: "192.0.2.7:40001".into(),
        relay: None,
        device_id: "SNPG1".into(),
        operation: "sen".into(),
        outcome: "issued".into(),
        code: "2.04".into(),
        detail: "serial 7fa1c0de".into(),
    };
    commit_and_wait(
        &store,
        Commit::Issuance {
            cert: Box::new(cert),
            audit,
        },
    )
    .unwrap();
    let list = run_ok(&["certs", "list", "--json", "--data-dir", ds]);
    assert!(
        list.contains("\"serial\":\"7fa1c0de\"") && list.contains("SNPG1"),
        "{list}"
    );
    let audit = run_ok(&["audit", "--data-dir", ds]);
    assert!(
        audit.contains("SNPG1") && audit.contains("serial 7fa1c0de"),
        "{audit}"
    );
    // `certs show` prints the record, then fails on the made-up DER's PEM only after it.
    let show = bin()
        .args(["certs", "show", "7FA1", "--data-dir", ds])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("device:     SNPG1"), "{shown}");
    let list_file = dir.path().join("devices.txt");
    std::fs::write(&list_file, "SNPG1\nSNPG2\n# comment\n").unwrap();
    let imported = run_ok(&[
        "devices",
        "import",
        list_file.to_str().unwrap(),
        "--data-dir",
        ds,
    ]);
    assert!(imported.contains("2 new"), "{imported}");
    use est_proto::store::Store;
    assert!(store.device_allowed("SNPG2").unwrap());
    store.close();
}

/// `init --storage-url`: a data directory whose store is PostgreSQL. The schema is migrated
/// by init, no SQLite file is created, the configuration (holding the connection string) is
/// 0600 and names the database, and the operator commands use it. An unreachable database
/// or a verify mode without a CA file stops init before it writes anything.
#[cfg(unix)]
#[test]
fn init_with_postgres_creates_no_sqlite_file() {
    let Some(pg) = est_test_tools::pg::TestPostgres::start_or_skip("init with postgres") else {
        return;
    };
    let url = pg.create_database("initpg").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    let out = run_ok(&["init", "--data-dir", ds, "--storage-url", &url]);
    assert!(out.contains("created"), "{out}");
    assert!(!d.join("est.sqlite3").exists(), "an unused SQLite file");
    let names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("sqlite")), "{names:?}");
    let cfg_path = d.join("est-server.toml");
    assert_eq!(mode(&cfg_path), 0o600);
    let cfg = est_server::config::Config::load(&cfg_path).unwrap();
    assert!(cfg.storage.is_postgres());
    assert_eq!(cfg.storage.url, url);
    // The rest of the file is the documented default.
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("max_half_open_handshakes") && text.contains("# TLS to PostgreSQL"));
    // init migrated the schema.
    let last = est_server::store::postgres::MIGRATIONS
        .last()
        .unwrap()
        .version;
    assert_eq!(
        pg.psql("initpg", "SELECT max(version) FROM schema_migrations")
            .unwrap(),
        last.to_string()
    );
    assert!(run_ok(&["certs", "list", "--data-dir", ds]).starts_with("serial"));
    assert!(run_ok(&["init", "--data-dir", ds, "--storage-url", &url]).contains("untouched"));
    assert!(!d.join("est.sqlite3").exists());

    // An unreachable database: init fails, naming it, and leaves no data directory.
    let gone = dir.path().join("gone");
    let bad = bin()
        .args([
            "init",
            "--data-dir",
            gone.to_str().unwrap(),
            "--storage-url",
        ])
        .arg(format!(
            "host={} port=1 user=est dbname=est connect_timeout=2",
            dir.path().display()
        ))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(
        !gone.exists(),
        "init wrote a data directory for a database it cannot reach"
    );

    // verify-full needs the CA file; and the CA file flag needs a URL.
    let bad = bin()
        .args([
            "init",
            "--data-dir",
            gone.to_str().unwrap(),
            "--storage-url",
        ])
        .arg("postgres://est@db.example/est?sslmode=verify-full")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("storage.ca_file"), "{err}");
    assert!(!gone.exists());
    let bad = bin()
        .args([
            "init",
            "--data-dir",
            gone.to_str().unwrap(),
            "--storage-ca-file",
            "ca.pem",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--storage-url"));
    // Without the flags: SQLite, as before.
    let lite = dir.path().join("lite");
    run_ok(&["init", "--data-dir", lite.to_str().unwrap()]);
    assert!(lite.join("est.sqlite3").exists());
    assert_eq!(mode(&lite.join("est-server.toml")), 0o644);
}
