//! Building third-party test peers at test time from the C source that a registry crate
//! vendors (Mbed TLS's `ssl_client2`, wolfSSL), cached under the target directory.
//!
//! The peers are never linked into anything of ours: a test builds them into
//! [`peers_dir`] once and runs them as separate processes. [`crate_source`] fetches a crate
//! with cargo (into cargo's own registry cache) and returns the directory of its unpacked
//! source; [`run_logged`] runs one build step, keeping its output in a log file and returning
//! its tail on failure.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target directory of the running test binary (`<target>/<profile>/deps/<test>`), or
/// the current directory if the executable's path is shorter than that.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `<target>/interop-peers`: where built peers are cached between test runs.
pub fn peers_dir() -> PathBuf {
    target_dir().join("interop-peers")
}

/// Runs `cmd`, writing its command line and output to `log`. On failure the error names
/// `what`, the exit status and the last 30 lines of output.
pub fn run_logged(cmd: &mut Command, what: &str, log: &Path) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    let text = format!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(log, &text);
    if out.status.success() {
        Ok(())
    } else {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        Err(format!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

/// The crate a peer's source comes from.
#[derive(Clone, Copy, Debug)]
pub struct VendoredCrate<'a> {
    pub name: &'a str,
    /// The version requirement written into the throwaway manifest.
    pub requirement: &'a str,
    /// The exact version wanted (`cargo update --precise`, which also selects a yanked one).
    pub version: &'a str,
}

/// Fetches `krate` through a throwaway cargo project in `work/fetch` (its own `[workspace]`,
/// since `work` may lie inside ours) and returns the directory of its unpacked source in
/// cargo's registry cache. Needs crates.io or a cargo cache that has the crate.
pub fn crate_source(work: &Path, krate: VendoredCrate<'_>) -> Result<PathBuf, String> {
    let fetch = work.join("fetch");
    std::fs::create_dir_all(fetch.join("src")).map_err(|e| e.to_string())?;
    std::fs::write(fetch.join("src/main.rs"), "fn main() {}\n").map_err(|e| e.to_string())?;
    let VendoredCrate {
        name,
        requirement,
        version,
    } = krate;
    std::fs::write(
        fetch.join("Cargo.toml"),
        format!(
            "[package]\nname = \"peer-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\n\
             {name} = {{ version = \"{requirement}\", default-features = false }}\n\n\
             [workspace]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = fetch.join("Cargo.toml");
    let cargo_cmd = |args: &[&str]| {
        let mut c = Command::new(&cargo);
        c.args(args)
            .arg("--manifest-path")
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", work.join("fetch-target"));
        c
    };
    run_logged(
        &mut cargo_cmd(&["update", "-p", name, "--precise", version]),
        "cargo update --precise",
        &work.join("update.log"),
    )?;
    run_logged(
        &mut cargo_cmd(&["fetch"]),
        "cargo fetch",
        &work.join("fetch.log"),
    )?;
    let meta = cargo_cmd(&["metadata", "--format-version", "1"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    let meta = String::from_utf8_lossy(&meta.stdout);
    manifest_dir(&meta, name, version)
}

/// The directory of `name-version/Cargo.toml` among the `manifest_path`s of `cargo metadata`'s
/// JSON output.
fn manifest_dir(meta: &str, name: &str, version: &str) -> Result<PathBuf, String> {
    let needle = format!("{name}-{version}/Cargo.toml\"");
    let end = meta
        .find(&needle)
        .ok_or_else(|| format!("{name} {version} not in cargo metadata"))?;
    let key = "\"manifest_path\":\"";
    let start = meta
        .get(..end)
        .and_then(|m| m.rfind(key))
        .ok_or("no manifest_path")?
        + key.len();
    let path = meta
        .get(start..end + needle.len() - 1)
        .ok_or("bad manifest_path")?;
    Path::new(path)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("no directory in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crate_directory_is_found_in_cargo_metadata() {
        let meta = r#"{"packages":[{"name":"a","manifest_path":"/r/a-1.0.0/Cargo.toml"},{"name":"wolfssl-sys","manifest_path":"/r/src/wolfssl-sys-5.3.0/Cargo.toml"}]}"#;
        assert_eq!(
            manifest_dir(meta, "wolfssl-sys", "5.3.0"),
            Ok(PathBuf::from("/r/src/wolfssl-sys-5.3.0"))
        );
        assert_eq!(
            manifest_dir(meta, "a", "1.0.0"),
            Ok(PathBuf::from("/r/a-1.0.0"))
        );
        assert!(manifest_dir(meta, "wolfssl-sys", "5.2.0").is_err());
        assert!(manifest_dir("{}", "a", "1.0.0").is_err());
    }

    #[test]
    fn a_failing_step_reports_its_output_tail_and_a_passing_one_logs() {
        let dir = std::env::temp_dir().join(format!("est-test-tools-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("ok.log");
        assert_eq!(
            run_logged(
                Command::new("sh").args(["-c", "echo built"]),
                "ok step",
                &log
            ),
            Ok(())
        );
        assert!(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("built"));
        let err = run_logged(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            "bad step",
            &dir.join("bad.log"),
        )
        .unwrap_err();
        assert!(err.starts_with("bad step failed"), "{err}");
        assert!(err.contains("broken"), "{err}");
        assert!(run_logged(&mut Command::new("/nonexistent/x"), "missing", &log).is_err());
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    }
}
