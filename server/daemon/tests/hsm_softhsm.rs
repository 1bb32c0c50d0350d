//! The issuing CA's key on a PKCS#11 token (SoftHSM2, Debian `softhsm2`), end to end with the
//! `est-server` binary: `init --hsm-*` generates the key on the token and writes no key file;
//! `run` signs with it; libcoap's `coap-client-gnutls` enrolls over DTLS; `openssl verify`
//! accepts the LDevID; after a restart the same token key still signs; a wrong PIN and a
//! missing key are refused at start with a clear message.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOOLS: [&str; 3] = ["softhsm2-util", "coap-client-gnutls", "openssl"];

/// A private SoftHSM2 token directory and configuration; every command gets `SOFTHSM2_CONF`.
struct Token {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Token {
    fn new(label: &str, pin: &str) -> Token {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let t = Token { dir, conf };
        let out = t
            .cmd("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", pin])
            .args(["--so-pin", "87654321"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        t
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.conf).env_remove("EST_HSM_PIN");
        c
    }

    fn est_server(&self) -> Command {
        self.cmd(env!("CARGO_BIN_EXE_est-server"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_pin(&self, name: &str, pin: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(name);
        std::fs::write(&p, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// `est-server run`, returning the child and the address it announced.
    fn run(&self, data: &Path) -> (Child, std::net::SocketAddr) {
        let mut child = self
            .est_server()
            .args(["run", "--data-dir"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = est_test_tools::announced_address(
            child.stdout.take().unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        (child, addr)
    }
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl(args: &[&str]) -> String {
    est_test_tools::openssl::run(args).unwrap()
}

/// Enroll `serial` over DTLS with libcoap (GnuTLS), and check the LDevID with openssl.
fn enroll_and_verify(t: &Token, addr: std::net::SocketAddr, fleet: &Path, serial: &str, ca: &Path) {
    let dev = fleet.join(serial);
    let work = t.path(&format!("work-{serial}"));
    std::fs::create_dir_all(&work).unwrap();
    let (_, csr) =
        est_test_tools::openssl::csr(&work, "ldevid", &format!("/serialNumber={serial}")).unwrap();
    let der = work.join("ldevid.der");
    let mut c = Command::new("timeout");
    c.args([
        "60",
        "coap-client-gnutls",
        "-B",
        "30",
        "-m",
        "post",
        "-b",
        "64",
    ])
    .args(["-t", "286", "-A", "287", "-f"])
    .arg(&csr)
    .arg("-c")
    .arg(dev.join("idevid-chain.pem"))
    .arg("-j")
    .arg(dev.join("idevid.key"))
    .arg("-C")
    .arg(fleet.join("implicit-ta.pem"))
    .arg("-o")
    .arg(&der)
    .arg(format!("coaps://{addr}/.well-known/est/sen"));
    ok(c);
    let pem = est_test_tools::openssl::der_to_pem(&der).unwrap();
    est_test_tools::openssl::verify(ca, &pem).unwrap();
    let text = openssl(&["x509", "-in", pem.to_str().unwrap(), "-noout", "-subject"]);
    assert!(text.contains(serial), "{text}");
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A fresh token "est-ca" (PIN 123456, also in the file `pin`) and `est-server init` of the
/// data directory `data` with the CA key "utility-ca-2026" on it. Returns (token, PIN file, data
/// directory, what init printed), or None when the tools are missing off CI.
fn initialised_on_token() -> Option<(Token, PathBuf, PathBuf, String)> {
    if !est_test_tools::require_tools(&TOOLS) {
        return None;
    }
    assert!(
        Path::new(SOFTHSM_MODULE).exists(),
        "{SOFTHSM_MODULE} missing: apt-get install softhsm2"
    );
    let t = Token::new("est-ca", "123456");
    let pin = t.write_pin("pin", "123456");
    let data = t.path("data");
    let mut init = t.est_server();
    init.args(["init", "--data-dir"])
        .arg(&data)
        .args(["--hsm-module", SOFTHSM_MODULE, "--hsm-token", "est-ca"])
        .args(["--hsm-key-label", "utility-ca-2026", "--hsm-pin-file"])
        .arg(&pin);
    let said = ok(init);
    Some((t, pin, data, said))
}

#[test]
fn softhsm_ca_key_init_enroll_verify_restart() {
    let Some((t, pin, data, said)) = initialised_on_token() else {
        return;
    };
    assert!(said.contains("on token \"est-ca\""), "{said}");
    // The key is on the token, not on disk; the configuration names it, not the PIN.
    assert!(!data.join("ca/issuing-ca.key").exists());
    let toml = std::fs::read_to_string(data.join("est-server.toml")).unwrap();
    assert!(toml.contains("enabled = true") && toml.contains("utility-ca-2026"));
    assert!(
        !toml.contains("123456"),
        "the PIN leaked into the configuration"
    );
    // The self-signed CA and the DTLS certificate were both signed on the token.
    let ca = data.join("ca/issuing-ca.pem");
    let ca_s = ca.to_str().unwrap();
    assert!(openssl(&["verify", "-CAfile", ca_s, ca_s]).contains("OK"));
    let srv = data.join("dtls/server.pem");
    assert!(openssl(&["verify", "-CAfile", ca_s, srv.to_str().unwrap()]).contains("OK"));

    let fleet = t.path("fleet");
    let mut mint = t.est_server();
    mint.args(["factory", "mint", "--data-dir"])
        .arg(&data)
        .args(["--count", "2", "--prefix", "HSM", "--out"])
        .arg(&fleet);
    ok(mint);

    let (child, addr) = t.run(&data);
    enroll_and_verify(&t, addr, &fleet, "HSM000001", &ca);
    stop(child);

    // After a restart the key is found again by its label.
    let (child, addr) = t.run(&data);
    enroll_and_verify(&t, addr, &fleet, "HSM000002", &ca);
    stop(child);

    // The PIN may come from the environment instead.
    let cfg = toml.replace(
        &format!("pin_file = {:?}", pin.to_str().unwrap()),
        "pin_file = \"\"",
    );
    assert_ne!(cfg, toml);
    let cfg_path = t.path("env-pin.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mut child = t
        .est_server()
        .env("EST_HSM_PIN", "123456")
        .args(["run", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&cfg_path)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr =
        est_test_tools::announced_address(child.stdout.take().unwrap(), Duration::from_secs(60));
    stop(child);
    assert!(addr.is_ok(), "{addr:?}");

    // Refusals at start, each with a message that says what is wrong.
    let refused = |config_text: &str, env_pin: Option<&str>, expect: &str| {
        let p = t.path("refused.toml");
        std::fs::write(&p, config_text).unwrap();
        let mut c = t.est_server();
        c.args(["run", "--data-dir"])
            .arg(&data)
            .arg("--config")
            .arg(&p)
            .args(["--listen", "127.0.0.1:0"]);
        if let Some(v) = env_pin {
            c.env("EST_HSM_PIN", v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started: {expect}");
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert!(!err.contains("123456"), "PIN in an error message");
    };
    refused(&cfg, Some("000000"), "logging in to token");
    refused(&cfg, None, "EST_HSM_PIN");
    refused(
        &cfg.replace("utility-ca-2026", "no-such-key"),
        Some("123456"),
        "no EC private key labelled \"no-such-key\"",
    );
    refused(
        &cfg.replace("token_label = \"est-ca\"", "token_label = \"other\""),
        Some("123456"),
        "no token labelled \"other\"",
    );
    // A PIN file others can read is refused like a key file.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    refused(&toml, None, "chmod 600");
}

/// `openssl x509 -text` of a PEM certificate.
fn text_of(pem: &Path) -> String {
    openssl(&["x509", "-in", pem.to_str().unwrap(), "-noout", "-text"])
}

/// A P-384 IDevID for `serial` signed by the data directory's demo manufacturer CA (openssl);
/// returns (key, chain PEM = IDevID + CA).
fn p384_idevid(data: &Path, work: &Path, serial: &str) -> (PathBuf, PathBuf) {
    let ca = data.join("manufacturers/demo-manufacturer-ca.pem");
    let ca_key = data.join("manufacturers/demo-manufacturer-ca.key");
    est_test_tools::openssl::idevid((&ca, &ca_key), work, serial, "P-384", "").unwrap()
}

/// A P-384 meter enrolls at /sen over DTLS (libcoap, GnuTLS) with a P-384 CSR; returns the
/// LDevID (PEM).
fn enroll_p384(t: &Token, addr: std::net::SocketAddr, data: &Path, serial: &str) -> PathBuf {
    let work = t.path(&format!("work-{serial}"));
    std::fs::create_dir_all(&work).unwrap();
    let (idevid_key, chain) = p384_idevid(data, &work, serial);
    let (_, csr) = est_test_tools::openssl::csr_on(
        &work,
        "ldevid",
        "P-384",
        &format!("/serialNumber={serial}"),
        "-sha384",
    )
    .unwrap();
    let der = work.join("ldevid.der");
    let mut c = Command::new("timeout");
    c.args([
        "60",
        "coap-client-gnutls",
        "-B",
        "30",
        "-m",
        "post",
        "-b",
        "64",
    ])
    .args(["-t", "286", "-A", "287", "-f"])
    .arg(&csr)
    .arg("-c")
    .arg(&chain)
    .arg("-j")
    .arg(&idevid_key)
    .arg("-C")
    .arg(data.join("ca/issuing-ca.pem"))
    .arg("-o")
    .arg(&der)
    .arg(format!("coaps://{addr}/.well-known/est/sen"));
    ok(c);
    est_test_tools::openssl::der_to_pem(&der).unwrap()
}

/// The P-384 issuing CA's key on the token too: `ca create-p384 --hsm-key-label` generates it
/// there and writes no key file (nor the PIN); a P-384 meter enrolls through libcoap under a
/// P-384 profile and `openssl verify` accepts its LDevID against the P-384 CA; the P-384 CRL,
/// signed on the token by the server and again by the CLI after a revocation, passes
/// `openssl crl -verify`; after a restart the token key still signs; a missing P-384 key is
/// refused at start.
#[test]
fn softhsm_p384_ca_key_enroll_verify_crl_restart() {
    let Some((t, _, data, _)) = initialised_on_token() else {
        return;
    };
    let mut create = t.est_server();
    create
        .args(["ca", "create-p384", "--data-dir"])
        .arg(&data)
        .args(["--hsm-key-label", "utility-ca-p384"]);
    let said = ok(create);
    assert!(
        said.contains("\"utility-ca-p384\" on the [hsm] token"),
        "{said}"
    );
    assert!(!data.join("ca/issuing-ca-p384.key").exists());
    let toml = std::fs::read_to_string(data.join("est-server.toml")).unwrap();
    assert!(
        toml.contains("hsm_key_label = \"utility-ca-p384\""),
        "{toml}"
    );
    assert!(
        !toml.contains("123456"),
        "the PIN leaked into the configuration"
    );
    // The P-384 CA certificate was self-signed on the token, ecdsa-with-SHA384.
    let p384_ca = data.join("ca/issuing-ca-p384.pem");
    let p384_s = p384_ca.to_str().unwrap();
    assert!(openssl(&["verify", "-CAfile", p384_s, p384_s]).contains("OK"));
    let text = text_of(&p384_ca);
    assert!(
        text.contains("ecdsa-with-SHA384") && text.contains("P-384"),
        "{text}"
    );
    // Not twice.
    let mut again = t.est_server();
    again
        .args(["ca", "create-p384", "--data-dir"])
        .arg(&data)
        .args(["--hsm-key-label", "utility-ca-p384"]);
    assert!(!again.output().unwrap().status.success());

    // A profile for P-384 meters (device class HSMP), signed by the P-384 CA.
    let profile = "\n[[profiles]]\nname = \"p384-meters\"\ncurves = [\"P-384\"]\n\
                   signature_hash = \"SHA-384\"\n[[profiles.select]]\nserial_prefix = \"HSMP\"\n";
    let toml = toml + profile;
    std::fs::write(data.join("est-server.toml"), &toml).unwrap();

    let (child, addr) = t.run(&data);
    let ldevid = enroll_p384(&t, addr, &data, "HSMP0001");
    est_test_tools::openssl::verify(&p384_ca, &ldevid).unwrap();
    let text = text_of(&ldevid);
    assert!(
        text.contains("Signature Algorithm: ecdsa-with-SHA384"),
        "{text}"
    );
    assert!(text.contains("CN = EST Issuing CA P-384"), "{text}");
    // The P-384 CRL the server signed (on the token) at start.
    let crl = data.join("crl/issuing-ca-p384.crl.pem");
    let crl_verify = || {
        openssl(&[
            "crl",
            "-in",
            crl.to_str().unwrap(),
            "-CAfile",
            p384_s,
            "-verify",
            "-noout",
            "-text",
        ])
    };
    let text = crl_verify();
    assert!(text.contains("ecdsa-with-SHA384"), "{text}");
    stop(child);

    // Revoked by the CLI, which signs both CRLs on the token.
    let serial = openssl(&["x509", "-in", ldevid.to_str().unwrap(), "-noout", "-serial"]);
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    let mut revoke = t.est_server();
    revoke
        .args([
            "certs",
            "revoke",
            &serial,
            "--reason",
            "keyCompromise",
            "--data-dir",
        ])
        .arg(&data);
    ok(revoke);
    let text = crl_verify();
    assert!(
        text.to_ascii_lowercase().contains(&serial) && text.contains("Key Compromise"),
        "{text}"
    );

    // After a restart the token's P-384 key still signs.
    let (child, addr) = t.run(&data);
    let second = enroll_p384(&t, addr, &data, "HSMP0002");
    est_test_tools::openssl::verify(&p384_ca, &second).unwrap();
    stop(child);

    // A P-384 key that is not on the token stops the start, naming it.
    let cfg_path = t.path("missing-p384.toml");
    std::fs::write(
        &cfg_path,
        toml.replace("\"utility-ca-p384\"", "\"no-such-p384\""),
    )
    .unwrap();
    let mut c = t.est_server();
    c.args(["run", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&cfg_path)
        .args(["--listen", "127.0.0.1:0"]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no EC private key labelled \"no-such-p384\""),
        "{err}"
    );
}
