//! Safe files, tried as a careless operator would: a umask of 000, serials that name paths
//! outside `--out`, a CA key others can read. Every file keeps its documented mode
//! (server/daemon/src/safefs.rs), nothing is written outside `--out`, and `run` refuses the
//! readable key unless told otherwise.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// est-server under `umask 000`: the worst case for files created without an explicit mode.
fn est_server_umask0(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_est-server"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> Output {
    let out = est_server_umask0(args);
    assert!(
        out.status.success(),
        "est-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Each `(path relative to root, mode)`; "" is `root` itself.
fn assert_modes(root: &Path, expected: &[(&str, u32)]) {
    for &(rel, want) in expected {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        assert_eq!(mode(&p), want, "{rel:?} has mode {:o}", mode(&p));
    }
}

/// Every path under `root`, sorted.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        all.push(p);
    }
    all.sort();
    all
}

#[test]
fn under_umask_000_every_file_has_its_documented_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    let ds = d.to_str().unwrap();
    ok(&["init", "--data-dir", ds]);
    assert_modes(
        &d,
        &[
            ("", 0o700),
            ("ca", 0o700),
            ("dtls", 0o700),
            ("manufacturers", 0o700),
            ("ca/issuing-ca.key", 0o600),
            ("dtls/server.key", 0o600),
            ("manufacturers/demo-manufacturer-ca.key", 0o600),
            ("est.sqlite3", 0o600),
            ("ca/issuing-ca.pem", 0o644),
            ("dtls/server.pem", 0o644),
            ("manufacturers/demo-manufacturer-ca.pem", 0o644),
            ("est-server.toml", 0o644),
        ],
    );
    // Nothing in the data directory is writable by group or others.
    for p in tree(&d) {
        assert_eq!(mode(&p) & 0o022, 0, "{} is {:o}", p.display(), mode(&p));
    }

    let out = tmp.path().join("fleet/nested");
    ok(&[
        "factory",
        "mint",
        "--data-dir",
        ds,
        "--count",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_modes(
        &out,
        &[
            ("", 0o755),
            ("SN000001", 0o700),
            ("SN000001/idevid.key", 0o600),
            ("SN000001/idevid.pem", 0o644),
            ("SN000001/idevid-chain.pem", 0o644),
            ("manufacturer-ca.pem", 0o644),
            ("implicit-ta.pem", 0o644),
            ("fleet.json", 0o644),
        ],
    );
    // The parent `fleet/` was created too, with an explicit mode.
    assert_eq!(mode(&tmp.path().join("fleet")), 0o755);
}

#[test]
fn serials_that_name_paths_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    let ds = d.to_str().unwrap();
    ok(&["init", "--data-dir", ds]);
    // `out` sits two levels down, so `../../x` would land in the temp dir itself.
    let out = tmp.path().join("a/b/out");
    let outs = out.to_str().unwrap();
    std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
    std::fs::set_permissions(tmp.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let abs = tmp.path().join("abs-target");
    let before = tree(tmp.path());
    for serial in [
        "../../x",
        "..",
        ".",
        abs.to_str().unwrap(),
        "a/b",
        "x\\y",
        "with space",
        "",
        &"7".repeat(65),
    ] {
        let r = est_server_umask0(&[
            "factory",
            "mint",
            "--data-dir",
            ds,
            "--serial",
            serial,
            "--out",
            outs,
        ]);
        assert!(!r.status.success(), "serial {serial:?} accepted");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("serial"), "{serial:?}: unclear error {err}");
    }
    // A fleet whose prefix is a path: refused before the first device is written.
    let r = est_server_umask0(&[
        "factory",
        "mint",
        "--data-dir",
        ds,
        "--count",
        "3",
        "--prefix",
        "../",
        "--out",
        outs,
    ]);
    assert!(!r.status.success());
    assert_eq!(tree(tmp.path()), before, "something was written");
    // `..` did not chmod the parent.
    assert_eq!(mode(&tmp.path().join("a")), 0o755);

    // The same command with a plain serial works.
    ok(&[
        "factory",
        "mint",
        "--data-dir",
        ds,
        "--serial",
        "SN-OK.1",
        "--out",
        outs,
    ]);
    assert!(out.join("SN-OK.1/idevid.key").is_file());
}

#[test]
fn run_refuses_a_ca_key_others_can_read_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    let ds = d.to_str().unwrap();
    ok(&["init", "--data-dir", ds]);
    let key = d.join("ca/issuing-ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let r = est_server_umask0(&["run", "--data-dir", ds, "--listen", "127.0.0.1:0"]);
    assert!(!r.status.success(), "started with a world-readable CA key");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("issuing-ca.key") && err.contains("chmod 600"),
        "{err}"
    );

    // With the flag it starts, and says why it is unhappy.
    let mut child = Command::new(env!("CARGO_BIN_EXE_est-server"))
        .args([
            "run",
            "--data-dir",
            ds,
            "--listen",
            "127.0.0.1:0",
            "--allow-insecure-key-permissions",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = est_test_tools::announced_address(stdout, Duration::from_secs(30));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(addr.is_ok(), "did not start: {addr:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("allow-insecure-key-permissions"), "{log}");

    // The DTLS key is checked the same way.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(
        d.join("dtls/server.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let r = est_server_umask0(&["run", "--data-dir", ds, "--listen", "127.0.0.1:0"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("server.key"));
}
