//! The `est-server` binary as an operator uses it: init, key file modes, factory mint,
//! run (prints where it listens), certs list, help texts, and the operator commands on PostgreSQL.
#![allow(clippy::unwrap_used)]

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
    };
    let audit = AuditEvent {
        at_unix: 1_750_000_000,
        peer: "192.0.2.7:40001".into(),
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
