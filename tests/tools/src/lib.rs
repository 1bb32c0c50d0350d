//! Shared by the workspace's tests and test harnesses (loadtest), with no dependencies.
//!
//! The one guard for tests that need a third-party program (libcoap's `coap-client-*` and
//! `coap-server-*`, the `openssl` command): every crate's tests call [`require_tools`] before
//! using one; [`find`] locates a program.
//!
//! On a developer's machine a missing program skips the test with a message on stderr. Under
//! CI (`CI` set to anything but empty, `0` or `false`, as `.ci/run` does) it fails the test
//! instead: CI installs the programs, so a missing one is a broken CI image, not a reason to
//! pass silently.
//!
//! [`pg::TestPostgres`] is a throwaway PostgreSQL cluster (initdb in a temporary directory, a
//! private unix socket, stopped and removed on drop) for the tests of the PostgreSQL store.
//!
//! [`peers`] builds third-party test peers (Mbed TLS, wolfSSL) from the C source a registry
//! crate vendors, cached under the target directory, for tests that run them as processes.
//!
//! Whatever starts `est-server run` as a child (client-sim's tests, est-server's CLI test,
//! loadtest) learns where it listens with [`announced_address`].
#![forbid(unsafe_code)]

pub mod peers;
pub mod pg;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
        panic!("{what} not installed; CI must have it (.ci/run installs the test peers and build tools)");
    }
    eprintln!("skipping: {what} not installed (the packages are in .ci/run's apt-get line)");
    false
}

/// What `est-server run` prints, once its socket is bound, before the address it listens on:
/// `est-server listening on coaps://127.0.0.1:40123 (UDP, DTLS 1.2), data in ...`.
pub const LISTENING: &str = "listening on coaps://";

/// The address in `line` if it is est-server's announcement ([`LISTENING`]); `Err` when it is
/// one but the address does not parse.
pub fn parse_announcement(line: &str) -> Option<Result<SocketAddr, String>> {
    let rest = line.split(LISTENING).nth(1)?;
    let addr = rest.split_whitespace().next().unwrap_or_default();
    Some(
        addr.parse()
            .map_err(|e| format!("unparsable address in {line:?}: {e}")),
    )
}

/// Reads a child `est-server run`'s stdout until its announcement and returns the address, or
/// an error after `within`. A thread keeps draining the rest of the output, so the child never
/// blocks on a full pipe.
pub fn announced_address(
    stdout: impl Read + Send + 'static,
    within: Duration,
) -> Result<SocketAddr, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| format!("est-server did not announce its address within {within:?}"))?;
        if let Some(addr) = parse_announcement(&line) {
            return addr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_edits_replace_keys_in_their_section_and_uncomment_optional_ones() {
        let dir = std::env::temp_dir().join(format!("est-test-tools-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("est-server.toml");
        std::fs::write(
            &file,
            "[dtls]\n# max_sessions = 1\nmax_sessions = 20000\n[est]\nmax_sessions = 7\n\
             [storage]\n# url = \"\"\n",
        )
        .unwrap();
        set_config(
            &dir,
            &[
                ("dtls", "max_sessions", "30000"),
                ("storage", "url", "\"postgres://x\""),
            ],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "[dtls]\n# max_sessions = 1\nmax_sessions = 30000\n[est]\nmax_sessions = 7\n\
             [storage]\nurl = \"postgres://x\"\n"
        );
        let err = set_config(&dir, &[("dtls", "nope", "1")]).unwrap_err();
        assert!(err.contains("no nope in [dtls]"), "{err}");
        // A key of another section is not taken.
        assert!(set_config(&dir, &[("storage", "max_sessions", "1")]).is_err());
        assert!(set_config(&dir.join("missing"), &[("dtls", "max_sessions", "1")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_a_program_on_path_and_not_a_made_up_one() {
        assert!(find("sh").is_some());
        assert!(find("/bin/sh").is_some() || find("/usr/bin/sh").is_some());
        assert!(find("no-such-program-est-coaps").is_none());
        assert!(find("/nonexistent/dir/sh").is_none());
    }

    #[test]
    fn the_announced_address_is_read_from_the_output() {
        let out = "est-server: first start\nest-server listening on coaps://127.0.0.1:40123 (UDP, DTLS 1.2), data in d\nmore\n";
        assert_eq!(
            announced_address(std::io::Cursor::new(out), Duration::from_secs(5)),
            Ok("127.0.0.1:40123".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert!(
            announced_address(std::io::Cursor::new("nothing\n"), Duration::from_millis(50))
                .is_err()
        );
        assert!(parse_announcement("listening on coaps://x:1").is_some_and(|r| r.is_err()));
        assert!(parse_announcement("EST resources: coaps://x").is_none());
    }

    #[test]
    fn a_throwaway_postgres_starts_restarts_and_is_removed_on_drop() {
        let Some(mut pg) = pg::TestPostgres::start_or_skip("throwaway postgres") else {
            return;
        };
        let url = pg.create_database("t1").unwrap_or_else(|e| panic!("{e}"));
        assert!(url.contains("dbname=t1"), "{url}");
        pg.psql("t1", "CREATE TABLE x (v int); INSERT INTO x VALUES (7)")
            .unwrap_or_else(|e| panic!("{e}"));
        pg.stop(false);
        assert!(!pg.is_running());
        assert!(pg.psql("t1", "SELECT 1").is_err());
        // Restarted from a thread that ends at once: the server outlives it (--pdeathsig is
        // per thread; the guard's own thread spawns the server).
        std::thread::scope(|s| {
            s.spawn(|| pg.restart().unwrap_or_else(|e| panic!("{e}")));
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(pg.is_running());
        assert_eq!(pg.psql("t1", "SELECT v FROM x").as_deref(), Ok("7"));
        let dir = pg.socket_dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
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

/// `BIN run --data-dir DATA_DIR --listen 127.0.0.1:0`, its stdout piped (read the address it
/// binds and announces with [`announced_address`]: no port is picked and released here) and
/// its stderr discarded. The caller adds what it needs and spawns it.
pub fn est_server_run(bin: &std::path::Path, data_dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    cmd
}

/// Sets `key = value` in `[section]` of `data_dir/est-server.toml`, for each `(section, key,
/// value)` of `edits` (the value as TOML: strings quoted). `est-server init` writes every setting
/// of the documented file, the optional ones commented out as `# key = ...`: a live line of the
/// key in its section is replaced; where the section has none, its commented-out line is
/// uncommented with the value. A key in neither form is an error (the format changed).
pub fn set_config(data_dir: &std::path::Path, edits: &[(&str, &str, &str)]) -> Result<(), String> {
    let path = data_dir.join("est-server.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (section, key, value) in edits {
        let mut current = String::new();
        let mut live = None;
        let mut commented = None;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            if t.starts_with('[') {
                current = t.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            if current != *section || !t.contains('=') {
                continue;
            }
            let is_comment = t.starts_with('#');
            if t.trim_start_matches('#').split('=').next().map(str::trim) == Some(*key) {
                if is_comment {
                    commented.get_or_insert(i);
                } else {
                    live.get_or_insert(i);
                }
            }
        }
        let i = live
            .or(commented)
            .ok_or_else(|| format!("{}: no {key} in [{section}]", path.display()))?;
        if let Some(l) = lines.get_mut(i) {
            *l = format!("{key} = {value}");
        }
    }
    std::fs::write(&path, lines.join("\n") + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// The `openssl` command line, as the tests drive it to make keys and CSRs and to check what
/// the server issued. Errors carry openssl's stderr.
pub mod openssl {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Run `openssl` with arguments; its stdout, or its stderr as the error.
    pub fn run(args: &[&str]) -> Result<String, String> {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .map_err(|e| format!("running openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn s(p: &Path) -> Result<&str, String> {
        p.to_str()
            .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
    }

    /// A fresh P-256 key and a DER CSR for `subject` (e.g. "/serialNumber=SN1"), made by
    /// `openssl req`, as `dir/<name>.key` and `dir/<name>.csr.der`.
    pub fn csr(dir: &Path, name: &str, subject: &str) -> Result<(PathBuf, PathBuf), String> {
        csr_on(dir, name, "P-256", subject, "-sha256")
    }

    /// A fresh key on `curve` ("P-256", "P-384") and its DER CSR for `subject`, signed with
    /// `digest` ("-sha256", "-sha384"), as `dir/<name>.key` and `dir/<name>.csr.der`.
    pub fn csr_on(
        dir: &Path,
        name: &str,
        curve: &str,
        subject: &str,
        digest: &str,
    ) -> Result<(PathBuf, PathBuf), String> {
        let key = dir.join(format!("{name}.key"));
        let csr = dir.join(format!("{name}.csr.der"));
        run(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-nodes",
            digest,
            "-keyout",
            s(&key)?,
            "-subj",
            subject,
            "-outform",
            "DER",
            "-out",
            s(&csr)?,
        ])?;
        Ok((key, csr))
    }

    /// An IDevID for `serial` on `curve` ("P-256", "P-384"), signed (SHA-384) by the CA `ca` /
    /// `ca_key` (PEM files); `extra_ext` adds extension lines (openssl x509v3 config syntax,
    /// e.g. a subjectAltName with its sections). Written under `work`; returns (key, chain PEM
    /// = IDevID + CA).
    pub fn idevid(
        (ca, ca_key): (&Path, &Path),
        work: &Path,
        serial: &str,
        curve: &str,
        extra_ext: &str,
    ) -> Result<(PathBuf, PathBuf), String> {
        let (key, csr) = csr_on(
            work,
            "idevid",
            curve,
            &format!("/CN={serial}/serialNumber={serial}"),
            "-sha256",
        )?;
        let cert = sign_der_csr(
            work,
            "idevid",
            &csr,
            (ca_key, ca),
            &format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{extra_ext}"
            ),
            &["-set_serial", "0x1384", "-days", "3650", "-sha384"],
        )?;
        let chain = work.join("idevid-chain.pem");
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
        let mut pem = read(&cert)?;
        pem.extend(read(ca)?);
        std::fs::write(&chain, pem).map_err(|e| format!("writing {}: {e}", chain.display()))?;
        Ok((key, chain))
    }

    /// A fresh key on `curve` ("P-256", "P-384") and a self-signed certificate for `subject`,
    /// signed with the curve's hash (SHA-256, SHA-384), valid 10 years, with the `-addext`
    /// extensions given (e.g. "basicConstraints=critical,CA:TRUE"), as `dir/<name>.key` and
    /// `dir/<name>.pem`.
    pub fn self_signed(
        dir: &Path,
        name: &str,
        curve: &str,
        subject: &str,
        extensions: &[&str],
    ) -> Result<(PathBuf, PathBuf), String> {
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.pem"));
        let param = format!("ec_paramgen_curve:{curve}");
        let digest = if curve == "P-384" {
            "-sha384"
        } else {
            "-sha256"
        };
        let mut args = vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            &param,
            "-nodes",
            digest,
            "-days",
            "3650",
            "-subj",
            subject,
            "-keyout",
            s(&key)?,
            "-out",
            s(&cert)?,
        ];
        for e in extensions {
            args.extend(["-addext", e]);
        }
        run(&args)?;
        Ok((key, cert))
    }

    /// Signs the DER CSR `csr` with `ca_key`/`ca_cert` (PEM) for 30 days, with the extension
    /// lines given (openssl `-extfile` syntax, e.g. "extendedKeyUsage=clientAuth"), as
    /// `dir/<name>.pem`.
    pub fn sign(
        dir: &Path,
        name: &str,
        csr: &Path,
        (ca_key, ca_cert): (&Path, &Path),
        extension_lines: &[&str],
    ) -> Result<PathBuf, String> {
        sign_der_csr(
            dir,
            name,
            csr,
            (ca_key, ca_cert),
            &(extension_lines.join("\n") + "\n"),
            &["-CAcreateserial", "-days", "30"],
        )
    }

    /// `openssl x509 -req` of the DER CSR `csr` by `ca_key`/`ca_cert`, with `extensions`
    /// (`-extfile` text, written to `dir/<name>.ext.cnf`) and the serial/validity/digest
    /// options in `options`, as `dir/<name>.pem`.
    fn sign_der_csr(
        dir: &Path,
        name: &str,
        csr: &Path,
        (ca_key, ca_cert): (&Path, &Path),
        extensions: &str,
        options: &[&str],
    ) -> Result<PathBuf, String> {
        let ext = dir.join(format!("{name}.ext.cnf"));
        std::fs::write(&ext, extensions).map_err(|e| format!("writing {}: {e}", ext.display()))?;
        let cert = dir.join(format!("{name}.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-inform",
            "DER",
            "-in",
            s(csr)?,
            "-CA",
            s(ca_cert)?,
            "-CAkey",
            s(ca_key)?,
        ];
        args.extend_from_slice(options);
        args.extend(["-extfile", s(&ext)?, "-out", s(&cert)?]);
        run(&args)?;
        Ok(cert)
    }

    /// The DER bytes of a PEM certificate file.
    pub fn pem_to_der(pem_path: &Path) -> Result<Vec<u8>, String> {
        let der = pem_path.with_extension("der");
        run(&[
            "x509",
            "-in",
            s(pem_path)?,
            "-outform",
            "DER",
            "-out",
            s(&der)?,
        ])?;
        std::fs::read(&der).map_err(|e| format!("reading {}: {e}", der.display()))
    }

    /// DER certificate -> PEM file next to it; returns the PEM path.
    pub fn der_to_pem(der_path: &Path) -> Result<PathBuf, String> {
        let pem = der_path.with_extension("pem");
        run(&[
            "x509",
            "-inform",
            "DER",
            "-in",
            s(der_path)?,
            "-out",
            s(&pem)?,
        ])?;
        Ok(pem)
    }

    /// `openssl verify -CAfile ca cert` succeeded (prints "<file>: OK").
    pub fn verify(ca: &Path, cert_pem: &Path) -> Result<(), String> {
        let out = run(&["verify", "-CAfile", s(ca)?, s(cert_pem)?])?;
        if !out.trim_end().ends_with(": OK") {
            return Err(format!("openssl verify: {out}"));
        }
        Ok(())
    }
}
