//! The one guard for tests that need a third-party program (libcoap's `coap-client-*` and
//! `coap-server-*`, the `openssl` command): every crate's tests call [`require_tools`] before
//! using one.
//!
//! On a developer's machine a missing program skips the test with a message on stderr. Under
//! CI (`CI` set to anything but empty, `0` or `false`, as `.ci/run` does) it fails the test
//! instead: CI installs the programs, so a missing one is a broken CI image, not a reason to
//! pass silently.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The first `program` on `PATH` (or `program` itself when it is a path to a file).
pub fn find(program: &str) -> Option<PathBuf> {
    let direct = PathBuf::from(program);
    if direct.components().count() > 1 {
        return direct.is_file().then_some(direct);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether this run is CI's: `CI` set and not empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// True when every program in `tools` is found. Otherwise: under CI, panics naming the missing
/// ones; elsewhere prints that the calling test is skipped and why, and returns false.
///
/// ```no_run
/// # fn f() {
/// if !est_test_tools::require_tools(&["coap-client-notls"]) {
///     return;
/// }
/// # }
/// ```
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if in_ci() {
        panic!("{what} not installed; CI must have it (apt-get install libcoap3-bin openssl)");
    }
    eprintln!("skipping: {what} not installed (apt-get install libcoap3-bin openssl)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_program_on_path_and_not_a_made_up_one() {
        assert!(find("sh").is_some());
        assert!(find("/bin/sh").is_some() || find("/usr/bin/sh").is_some());
        assert!(find("no-such-program-est-coaps").is_none());
        assert!(find("/nonexistent/dir/sh").is_none());
    }

    #[test]
    fn present_tools_are_required_without_fuss() {
        assert!(require_tools(&["sh"]));
        assert!(require_tools(&[]));
    }

    #[test]
    fn a_missing_tool_skips_outside_ci_and_fails_under_ci() {
        // The only test here that reads CI, so setting it cannot race another.
        let before = std::env::var_os("CI");
        std::env::set_var("CI", "false");
        assert!(!in_ci());
        assert!(!require_tools(&["sh", "no-such-program-est-coaps"]));
        std::env::set_var("CI", "true");
        assert!(in_ci());
        let failed = std::panic::catch_unwind(|| require_tools(&["no-such-program-est-coaps"]));
        match before {
            Some(v) => std::env::set_var("CI", v),
            None => std::env::remove_var("CI"),
        }
        assert!(
            failed.is_err(),
            "a missing tool must fail the test under CI"
        );
    }
}
