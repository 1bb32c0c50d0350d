//! Harness for the cross-crate integration and interop tests.
//!
//! [`TestServer`] starts a real `est-server` (UDP + DTLS + CoAP + EST + SQLite) in
//! process on `127.0.0.1:0`, on a fresh data directory created exactly as
//! `est-server init` does; the test PKI is therefore regenerated for every test, never
//! checked in. [`Tools`] wraps the third-party peers: libcoap's `coap-client-gnutls` and
//! `coap-client-openssl`, and the `openssl` command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use est_server::config::Config;
use est_server::service::RunningServer;
use est_server::{datadir, factory};

pub mod front_door;
pub mod relay;

pub use tempfile::TempDir;

/// A running server on a temporary data directory.
pub struct TestServer {
    pub dir: TempDir,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    pub server: Option<RunningServer>,
    /// The configuration it runs with (the data directory's file, adjusted by `tweak`).
    pub config: Config,
}

impl TestServer {
    /// Start with the default configuration, adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_with(|_| Ok(()), tweak).await
    }

    /// Start with the P-384 issuing CA created (`est-server ca create-p384`) beside the
    /// P-256 one.
    pub async fn start_p384(tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_with(
            |d| est_server::p384::create(d, std::time::SystemTime::now()).map(|_| ()),
            tweak,
        )
        .await
    }

    /// Start after `setup` has run on the freshly initialised data directory.
    pub async fn start_with(
        setup: impl FnOnce(&Path) -> Result<()>,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("est-data");
        datadir::init(&data_dir, &[])?;
        setup(&data_dir)?;
        let mut config = datadir::load_config(&data_dir, None)?;
        config.server.listen = "127.0.0.1:0".parse()?;
        tweak(&mut config);
        config.validate()?;
        let loaded = datadir::load(&data_dir, config.clone())?;
        let server = est_server::service::start(loaded, None).await?;
        Ok(Self {
            addr: server.local_addr,
            dir,
            data_dir,
            server: Some(server),
            config,
        })
    }

    /// Another node of the same service: the same data directory (issuing CA, DTLS
    /// credentials) and configuration (so the same PostgreSQL database, with `[storage]
    /// backend = "postgres"`), on a port of its own. The caller shuts it down.
    pub async fn start_another_node(&self) -> Result<RunningServer> {
        let loaded = datadir::load(&self.data_dir, self.config.clone())?;
        est_server::service::start(loaded, None).await
    }

    /// Stop, then start again on the same data directory (and port 0), with the
    /// configuration adjusted by `tweak` (on top of the data directory's file).
    pub async fn restart(mut self, tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let mut config = datadir::load_config(&self.data_dir, None)?;
        config.server.listen = "127.0.0.1:0".parse()?;
        tweak(&mut config);
        config.validate()?;
        let loaded = datadir::load(&self.data_dir, config.clone())?;
        let server = est_server::service::start(loaded, None).await?;
        self.addr = server.local_addr;
        self.server = Some(server);
        self.config = config;
        Ok(self)
    }

    /// The running server.
    pub fn running(&self) -> &RunningServer {
        match &self.server {
            Some(s) => s,
            None => panic!("server already stopped"),
        }
    }

    /// `coaps://127.0.0.1:PORT/<path>` for a resource outside /.well-known/est.
    pub fn url_at(&self, path: &str) -> String {
        format!("coaps://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// `coaps://127.0.0.1:PORT/.well-known/est/<op>`.
    pub fn url(&self, op: &str) -> String {
        format!("coaps://{}/.well-known/est/{op}", self.addr)
    }

    /// Mint IDevIDs as `est-server factory mint` does; returns the output directory.
    pub fn mint(&self, serials: &[&str]) -> Result<PathBuf> {
        let out = self.dir.path().join(format!("fleet-{}", serials.join("-")));
        let cfg = datadir::load_config(&self.data_dir, None)?;
        let serials: Vec<String> = serials.iter().map(|s| s.to_string()).collect();
        factory::mint(&self.data_dir, &cfg, &serials, &out, None, |_| {})?;
        Ok(out)
    }

    /// The issuing CA certificate file (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir.join("ca/issuing-ca.pem")
    }

    /// The store, for assertions.
    pub fn store(&self) -> &dyn est_server::store::ServerStore {
        match &self.server {
            Some(s) => s.store.as_ref(),
            None => panic!("server already stopped"),
        }
    }

    /// Transport counters.
    pub fn transport(&self) -> est_server::transport::TransportMetrics {
        match &self.server {
            Some(s) => s.listener.metrics(),
            None => panic!("server already stopped"),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// Which libcoap build to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Libcoap {
    /// `coap-client-gnutls`: sends the whole certificate chain.
    Gnutls,
    /// `coap-client-openssl`: sends only its leaf certificate.
    Openssl,
}

impl Libcoap {
    pub fn binary(self) -> &'static str {
        match self {
            Libcoap::Gnutls => "coap-client-gnutls",
            Libcoap::Openssl => "coap-client-openssl",
        }
    }
}

/// What a `coap-client` run printed.
#[derive(Debug)]
pub struct CoapRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The payload written with `-o`, if any.
    pub payload: Option<Vec<u8>>,
}

impl CoapRun {
    /// The response code libcoap prints on stderr for a 4.xx/5.xx answer, e.g. "4.06".
    pub fn error_code(&self) -> Option<&str> {
        self.stderr
            .lines()
            .chain(self.stdout.lines())
            .find_map(|l| {
                let code = l.get(..4)?;
                let &[class, dot, d1, d2] = code.as_bytes() else {
                    return None;
                };
                (class.is_ascii_digit()
                    && dot == b'.'
                    && d1.is_ascii_digit()
                    && d2.is_ascii_digit())
                .then_some(code)
            })
    }
}

/// The external programs the interop tests drive.
pub const INTEROP_TOOLS: [&str; 3] = ["coap-client-gnutls", "coap-client-openssl", "openssl"];

/// True when every external tool the interop tests need is on PATH.
pub fn have_tools() -> bool {
    INTEROP_TOOLS
        .iter()
        .all(|t| est_test_tools::find(t).is_some())
}

/// The interop tests' tools, through the workspace's one CI guard
/// ([`est_test_tools::require_tools`]): fail loudly in CI (where `.ci/run` installs them), skip
/// with a message elsewhere.
pub fn require_tools() -> bool {
    est_test_tools::require_tools(&INTEROP_TOOLS)
}

/// Client credentials for a libcoap run.
pub struct Creds<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub trust: &'a Path,
}

/// Run `coap-client-*` with a wall-clock limit. `args` go before the URL.
pub async fn coap_client(
    which: Libcoap,
    creds: Option<&Creds<'_>>,
    args: &[&str],
    url: &str,
    out: Option<&Path>,
) -> Result<CoapRun> {
    let mut cmd = tokio::process::Command::new("timeout");
    cmd.arg("60").arg(which.binary());
    // -B: give up after this many seconds of waiting for a response.
    cmd.args(["-B", "30"]);
    if let Some(c) = creds {
        cmd.arg("-c")
            .arg(c.cert)
            .arg("-j")
            .arg(c.key)
            .arg("-C")
            .arg(c.trust);
    }
    cmd.args(args);
    if let Some(o) = out {
        let _ = std::fs::remove_file(o);
        cmd.arg("-o").arg(o);
    }
    cmd.arg(url);
    let output = cmd
        .output()
        .await
        .with_context(|| format!("running {}", which.binary()))?;
    Ok(CoapRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        payload: out.and_then(|o| std::fs::read(o).ok()),
    })
}

/// Run `openssl` with arguments; error with its stderr if it fails.
pub fn openssl(args: &[&str]) -> Result<String> {
    est_test_tools::openssl::run(args).map_err(anyhow::Error::msg)
}

/// A fresh P-256 key and a DER CSR for `subject` (e.g. "/serialNumber=SN1"), made by
/// `openssl req`. Returns (key path, CSR path).
pub fn openssl_csr(dir: &Path, name: &str, subject: &str) -> Result<(PathBuf, PathBuf)> {
    est_test_tools::openssl::csr(dir, name, subject).map_err(anyhow::Error::msg)
}

/// A CSR for an existing key.
pub fn openssl_csr_for_key(dir: &Path, name: &str, key: &Path, subject: &str) -> Result<PathBuf> {
    let csr = dir.join(format!("{name}.csr.der"));
    openssl(&[
        "req",
        "-new",
        "-key",
        path_str(key)?,
        "-subj",
        subject,
        "-outform",
        "DER",
        "-out",
        path_str(&csr)?,
    ])?;
    Ok(csr)
}

/// DER certificate -> PEM file next to it; returns the PEM path.
pub fn der_to_pem(der_path: &Path) -> Result<PathBuf> {
    est_test_tools::openssl::der_to_pem(der_path).map_err(anyhow::Error::msg)
}

/// `openssl verify -CAfile ca cert` succeeded (prints "<file>: OK").
pub fn openssl_verify(ca: &Path, cert_pem: &Path) -> Result<()> {
    est_test_tools::openssl::verify(ca, cert_pem).map_err(anyhow::Error::msg)
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// The subject of a PEM certificate in openssl's `compat` form (`/serialNumber=...`), as
/// `openssl req -subj` takes it back.
pub fn cert_subject(pem: &Path) -> Result<String> {
    let out = openssl(&[
        "x509",
        "-in",
        path_str(pem)?,
        "-noout",
        "-subject",
        "-nameopt",
        "compat",
    ])?;
    Ok(out.trim().trim_start_matches("subject=").to_string())
}

/// The public key of the PEM certificate `cert` is the one of the private key file `key`.
pub fn same_public_key(cert: &Path, key: &Path) -> Result<bool> {
    let cert_pub = openssl(&["x509", "-in", path_str(cert)?, "-noout", "-pubkey"])?;
    let key_pub = openssl(&["pkey", "-in", path_str(key)?, "-pubout"])?;
    Ok(cert_pub == key_pub)
}

/// POST a DER PKCS#10 request (286) in 64-byte Block1 blocks, asking for a bare DER
/// certificate (287) written to `out`.
pub async fn post_csr(
    which: Libcoap,
    creds: &Creds<'_>,
    url: &str,
    csr: &Path,
    out: &Path,
) -> Result<CoapRun> {
    post_csr_with(which, creds, url, csr, Some(out), Some(64)).await
}

/// POST a DER PKCS#10 request (286) to /sen, /sren (or another URL) asking for a bare DER
/// certificate (287), in Block1 blocks of `block` bytes (`None`: libcoap's default), the answer
/// written to `out` if given.
pub async fn post_csr_with(
    which: Libcoap,
    creds: &Creds<'_>,
    url: &str,
    csr: &Path,
    out: Option<&Path>,
    block: Option<u16>,
) -> Result<CoapRun> {
    let block = block.map(|b| b.to_string());
    let mut args = vec!["-m", "post"];
    if let Some(b) = &block {
        args.extend(["-b", b.as_str()]);
    }
    args.extend(["-t", "286", "-A", "287", "-f", path_str(csr)?]);
    coap_client(which, Some(creds), &args, url, out).await
}

/// The answer carried a DER certificate (a SEQUENCE).
pub fn is_der_certificate(run: &CoapRun) -> bool {
    run.payload
        .as_ref()
        .is_some_and(|p| p.first() == Some(&0x30))
}

/// The enrollment a libcoap meter does: POST `csr` to `url` (/sen or /sren) in 64-byte blocks,
/// the DER certificate written to `der`; its PEM beside it. An answer that is not a certificate
/// is an error naming the run.
pub async fn enroll_csr(
    which: Libcoap,
    creds: &Creds<'_>,
    url: &str,
    csr: &Path,
    der: &Path,
) -> Result<PathBuf> {
    let run = post_csr(which, creds, url, csr, der).await?;
    if !is_der_certificate(&run) {
        anyhow::bail!("no certificate from {url}: {run:?}");
    }
    der_to_pem(der)
}

/// GET /crts as PKCS#7 (281) into `out`, and the certificates in it as `openssl pkcs7
/// -print_certs -noout` lists them.
pub async fn crts_pkcs7(
    which: Libcoap,
    creds: &Creds<'_>,
    url: &str,
    out: &Path,
) -> Result<(CoapRun, String)> {
    let run = coap_client(
        which,
        Some(creds),
        &["-m", "get", "-A", "281"],
        url,
        Some(out),
    )
    .await?;
    let listed = openssl(&[
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        path_str(out)?,
        "-print_certs",
        "-noout",
    ])?;
    Ok((run, listed))
}

/// [`webrtc_dtls_within`] 10 s per handshake attempt, 30 s in all.
pub async fn webrtc_dtls(
    sock: tokio::net::UdpSocket,
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &[Vec<u8>],
) -> std::result::Result<
    std::sync::Arc<webrtc_dtls::conn::DTLSConn>,
    client_sim::meter::FailureReason,
> {
    let (attempt, overall) = (
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(30),
    );
    webrtc_dtls_within(sock, chain, key, trust, attempt, overall).await
}

/// A meter's DTLS session with client-sim's webrtc-dtls client (CCM_8, extended master secret
/// required) over `sock`, which is connected to the server: handshake attempts of at most
/// `attempt_timeout` each, each from a fresh session, until one completes or `overall_timeout`
/// has passed ([`client_sim::dtls::connect_retrying`]).
pub async fn webrtc_dtls_within(
    sock: tokio::net::UdpSocket,
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &[Vec<u8>],
    attempt_timeout: std::time::Duration,
    overall_timeout: std::time::Duration,
) -> std::result::Result<
    std::sync::Arc<webrtc_dtls::conn::DTLSConn>,
    client_sim::meter::FailureReason,
> {
    let cfg = client_sim::dtls::DtlsClientConfig {
        trust_anchors_der: trust.to_vec(),
        server_name: "localhost".into(),
        flight_interval: std::time::Duration::from_secs(1),
        handshake_timeout: attempt_timeout,
        ..client_sim::dtls::DtlsClientConfig::default()
    };
    let cred = client_sim::meter::Credential {
        chain_der: chain.to_vec(),
        key_pkcs8_der: key.to_vec(),
    };
    client_sim::dtls::connect_retrying(std::sync::Arc::new(sock), &cfg, &cred, overall_timeout)
        .await
        .map(|c| c.conn)
}

/// An IDevID for `serial` on `curve` ("P-256", "P-384"), signed (SHA-384) by the CA `ca` /
/// `ca_key` (PEM files), made with openssl only; `extra_ext` adds extension lines (openssl
/// x509v3 config syntax, e.g. a subjectAltName with its sections). Returns (key, chain PEM =
/// IDevID + CA).
pub fn openssl_idevid(
    ca: &Path,
    ca_key: &Path,
    work: &Path,
    serial: &str,
    curve: &str,
    extra_ext: &str,
) -> Result<(PathBuf, PathBuf)> {
    est_test_tools::openssl::idevid((ca, ca_key), work, serial, curve, extra_ext)
        .map_err(anyhow::Error::msg)
}

/// A fresh key on `curve` ("P-256", "P-384") and its DER CSR for `subject`, signed with
/// `digest` ("-sha256", "-sha384"). Returns (key, CSR).
pub fn openssl_csr_on(
    work: &Path,
    name: &str,
    curve: &str,
    subject: &str,
    digest: &str,
) -> Result<(PathBuf, PathBuf)> {
    est_test_tools::openssl::csr_on(work, name, curve, subject, digest).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::CoapRun;

    fn run(stderr: &str) -> CoapRun {
        CoapRun {
            status: std::process::ExitStatus::from_raw(0),
            stdout: String::new(),
            stderr: stderr.to_owned(),
            payload: None,
        }
    }

    #[test]
    fn the_error_code_is_the_first_line_that_starts_with_one() {
        assert_eq!(run("4.06 Not Acceptable\n").error_code(), Some("4.06"));
        assert_eq!(run("warning: x\n5.03\n4.00\n").error_code(), Some("5.03"));
        for no_code in ["", "4.0", "4.0x", "4-06", "x.06", "é.06 ", "v4.15"] {
            assert_eq!(run(no_code).error_code(), None, "{no_code:?}");
        }
    }
}
