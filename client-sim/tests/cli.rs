//! The client-sim command line: help text and error exits (no server needed).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_client-sim"))
}

#[test]
fn help_explains_every_option() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for opt in [
        "--server",
        "--fleet",
        "--meters",
        "--concurrency",
        "--arrival",
        "--link",
        "--seed",
        "--json",
        "--record",
        "--replay",
        "--meters-per-dcu",
        "--dcu-link",
        "--dcu-mode",
        "--jpy-server",
        "--format",
        "--ack-timeout",
        "--ack-random-factor",
        "--max-retransmit",
        "--block-size",
        "--attempts",
        "--renew",
        "--discovery",
        "--max-hops",
        "--dtls-backend",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
    // The stated framing assumptions and the profiles are in the help.
    assert!(text.contains("92 B of UDP payload"));
    assert!(text.contains("wisun") && text.contains("plc") && text.contains("cellular"));
    assert!(text.contains("relay-stateless") && text.contains("relay-stateful"));
}

#[test]
fn bad_inputs_exit_with_status_2() {
    let out = bin()
        .args(["--fleet", "/nonexistent/fleet", "--no-progress"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/fleet"));
    // Invalid link specification is rejected by the parser.
    let out = bin()
        .args(["--fleet", "x", "--link", "loss=7"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("probability"));
    let out = bin()
        .args(["--fleet", "x", "--block-size", "100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
