//! Interop of our DTLS 1.2 engine (`est-dtls`) with DTLS stacks nobody here wrote, over real UDP
//! on 127.0.0.1.
//!
//! The server is an echo server built directly on [`est_dtls::Endpoint`] and a tokio
//! `UdpSocket`: every application datagram comes back unchanged, so what the peer prints as
//! received proves both directions (its record protection and ours agree). The client chain is
//! checked with rustls-webpki against a P-256 test CA made with rcgen in a temp dir.
//!
//! - (a) `openssl s_client -dtls1_2` (OpenSSL 3.0, Debian) with a client certificate: CCM_8,
//!   AES-128-GCM and AES-256-GCM; a line on stdin comes back on stdout. A client certificate from
//!   an unknown CA is refused with an unknown_ca alert.
//! - (b) Mbed TLS 3.4.0's reference client `ssl_client2` with `cid=1` (RFC 9146 Connection ID),
//!   CCM_8 and GCM, client certificate: the handshake negotiates a CID both ways and the echo
//!   arrives. Through a UDP relay acting as a NAT that moves to a new source port after the first
//!   exchange, the session survives by its CID (the second echo arrives, the endpoint's
//!   `peer_address_changes` moved); without a CID the same move loses the session.
//! - (c) Go's pion/dtls 2.2.6 (Debian `golang-github-pion-dtls.v2-dev`, built offline in GOPATH
//!   mode with `golang-go`; no Connection ID) with a client certificate: CCM_8, AES-128-GCM and
//!   AES-256-GCM (X25519, pion's first group) echo a message.
//!
//! `ssl_client2` is built at test time from the C source that the (yanked) registry crate
//! `mbedtls-sys-auto 3.5.0-alpha.3+0b3de6f` vendors, as `shared/docs/cid-peers.md` "Recipe B"
//! describes: a throwaway cargo project under the target directory, `cargo update --precise`,
//! `cargo fetch`, a copy of `vendor/`, `config.py set MBEDTLS_SSL_DTLS_CONNECTION_ID`, `make lib`
//! and the program. The binary is cached in `<target>/interop-peers/` (about 40 s the first
//! time); none of its source is in this repository. Needs `openssl`, `python3`, `make`, `gcc`,
//! crates.io, `go` and the pion package: a missing tool skips here and fails under CI
//! ([`est_test_tools::require_tools`]).
//!
//! Run: `cargo test -p est-tests --test interop_dtls -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use est_dtls::{
    CertError, CipherSuite, ConnectionHandle, Endpoint, Event, Metrics, RefusalReason,
    ServerConfig, SigningKey, Verified,
};
use est_test_tools::peers::{peers_dir, run_logged as run, VendoredCrate};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Test PKI (P-256, rcgen), written as PEM files for the external clients.

struct Pki {
    dir: tempfile::TempDir,
    ca_der: Vec<u8>,
    server_chain: Vec<Vec<u8>>,
    server_key_pkcs8: Vec<u8>,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

fn leaf(
    cn: &str,
    sans: Vec<String>,
    eku: rcgen::ExtendedKeyUsagePurpose,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    (params.signed_by(&key, &ca.0, &ca.1).unwrap(), key)
}

impl Pki {
    /// A CA, the server's certificate (localhost, 127.0.0.1), a client certificate from the CA
    /// (`client.pem`, `client.key`) and one from another CA (`rogue.pem`, `rogue.key`); the CA
    /// is `ca.pem`.
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("interop test CA");
        let server = leaf(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        let client = leaf(
            "SN-INTEROP-1",
            Vec::new(),
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        );
        let rogue_ca = new_ca("a CA the server does not trust");
        let rogue = leaf(
            "SN-ROGUE-1",
            Vec::new(),
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_ca,
        );
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.0.pem());
        write("client.pem", client.0.pem());
        write("client.key", client.1.serialize_pem());
        write("rogue.pem", rogue.0.pem());
        write("rogue.key", rogue.1.serialize_pem());
        Pki {
            ca_der: ca.0.der().to_vec(),
            server_chain: vec![server.0.der().to_vec()],
            server_key_pkcs8: server.1.serialize_der(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// rustls-webpki against the test CA, clientAuth usage; an unknown issuer is `UnknownCa`.
fn verifier(ca_der: Vec<u8>) -> est_dtls::ChainVerifier {
    Arc::new(move |chain: &[Vec<u8>]| {
        let ca = rustls_pki_types::CertificateDer::from(ca_der.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&ca)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        est_server::transport::verify_client_chain(
            &[anchor],
            chain,
            rustls_pki_types::UnixTime::now(),
        )?;
        Ok(Verified {
            identity: Vec::new(),
            context: None,
            leaf: None,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The echo server: est_dtls::Endpoint over a tokio UdpSocket.

#[derive(Clone, Debug)]
struct Session {
    handle: ConnectionHandle,
    suite: Option<CipherSuite>,
    /// The CID we issued (what the peer puts in its records) and the peer's.
    own_cid: Vec<u8>,
    peer_cid: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct Seen {
    connected: Vec<Session>,
    /// Application datagrams: session, the source address they came from, bytes.
    data: Vec<(ConnectionHandle, SocketAddr, Vec<u8>)>,
    /// Address changes (Connection ID).
    moves: Vec<(ConnectionHandle, SocketAddr, SocketAddr)>,
    metrics: Metrics,
}

struct EchoServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Application datagrams received so far, counted before their echo is sent.
    data_count: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    async fn start(pki: &Pki, suites: &[CipherSuite]) -> EchoServer {
        let key = SigningKey::from_pkcs8(&pki.server_key_pkcs8).unwrap();
        let mut config = ServerConfig::new(
            pki.server_chain.clone(),
            Arc::new(key),
            verifier(pki.ca_der.clone()),
        );
        config.cipher_suites = suites.to_vec();
        let mut endpoint = Endpoint::new(Arc::new(config), Instant::now()).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let data_count = Arc::new(AtomicUsize::new(0));
        let (seen2, count2) = (Arc::clone(&seen), Arc::clone(&data_count));
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let deadline = endpoint.poll_timeout();
                tokio::select! {
                    r = socket.recv_from(&mut buf) => {
                        if let Ok((n, from)) = r {
                            endpoint.handle(Instant::now(), from, &buf[..n]);
                        }
                    }
                    _ = sleep_until(deadline) => endpoint.handle_timeout(Instant::now()),
                }
                while let Some(ev) = endpoint.poll_event() {
                    let mut seen = seen2.lock().unwrap();
                    match ev {
                        Event::Connected(h) => {
                            let c = endpoint.connection(h).unwrap();
                            seen.connected.push(Session {
                                handle: h,
                                suite: c.cipher_suite(),
                                own_cid: c.own_cid().to_vec(),
                                peer_cid: c.peer_cid().to_vec(),
                            });
                        }
                        Event::Data(h, d) => {
                            let from = endpoint
                                .connection(h)
                                .map(|c| c.peer().socket_addr())
                                .unwrap();
                            count2.fetch_add(1, Ordering::SeqCst);
                            endpoint.send(Instant::now(), h, &d).unwrap();
                            seen.data.push((h, from, d));
                        }
                        Event::AddressChanged { conn, from, to } => {
                            seen.moves
                                .push((conn, from.socket_addr(), to.socket_addr()));
                        }
                        Event::Closed(..) => {}
                    }
                }
                while let Some(t) = endpoint.poll_transmit() {
                    let _ = socket
                        .send_to(&t.payload, t.destination.socket_addr())
                        .await;
                }
                seen2.lock().unwrap().metrics = endpoint.metrics().clone();
            }
        });
        EchoServer {
            addr,
            seen,
            data_count,
            task,
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// A NAT: the client talks to `addr`; the relay forwards to the server from an upstream socket
// and, once the echo server has received its first application datagram, drops that socket
// and forwards the client's next datagrams from a new one (a new source port), as a NAT whose
// mapping expired does. Datagrams the server sends to the old port are lost.

struct Nat {
    addr: SocketAddr,
    /// The upstream (server-facing) addresses used, in order.
    upstream: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Nat {
    async fn start(server: SocketAddr, switch_after_data: Arc<AtomicUsize>) -> Nat {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let used = Arc::clone(&upstream);
        let task = tokio::spawn(async move {
            let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
            let mut switched = false;
            let (mut up, mut reader) = Self::open(&front, &client, &used).await;
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                *client.lock().unwrap() = Some(from);
                if !switched && switch_after_data.load(Ordering::SeqCst) > 0 {
                    switched = true;
                    reader.abort();
                    (up, reader) = Self::open(&front, &client, &used).await;
                }
                let _ = up.send_to(&buf[..n], server).await;
            }
        });
        Nat {
            addr,
            upstream,
            task,
        }
    }

    /// A new upstream socket and the task that relays what arrives on it to the client.
    async fn open(
        front: &Arc<UdpSocket>,
        client: &Arc<Mutex<Option<SocketAddr>>>,
        used: &Arc<Mutex<Vec<SocketAddr>>>,
    ) -> (Arc<UdpSocket>, JoinHandle<()>) {
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        used.lock().unwrap().push(up.local_addr().unwrap());
        let (up2, front2, client2) = (Arc::clone(&up), Arc::clone(front), Arc::clone(client));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                let to = *client2.lock().unwrap();
                if let Some(to) = to {
                    let _ = front2.send_to(&buf[..n], to).await;
                }
            }
        });
        (up, reader)
    }
}

// ---------------------------------------------------------------------------------------------
// (a) openssl s_client

struct SClient {
    /// Whether the line came back before the deadline.
    echoed: bool,
    output: String,
}

/// `openssl s_client -dtls1_2` with `cert`/`key`, offering only `cipher`; writes `line` on its
/// stdin and waits (up to 20 s) for it on stdout, then closes stdin so it ends the session.
async fn s_client(server: SocketAddr, pki: &Pki, cert: &str, cipher: &str, line: &str) -> SClient {
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-dtls1_2", "-connect"])
        .arg(server.to_string())
        .args(["-cert", &pki.arg(&format!("{cert}.pem"))])
        .args(["-key", &pki.arg(&format!("{cert}.key"))])
        .args(["-CAfile", &pki.arg("ca.pem")])
        .args(["-verify_return_error", "-verify_hostname", "localhost"])
        .args(["-cipher", cipher])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    // (A refused client may be gone already; then nothing reads this.)
    let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut output = String::new();
    let echoed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            output.push_str(&l);
            output.push('\n');
            if l == line {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    drop(stdin);
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut more = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            more.push_str(&l);
            more.push('\n');
        }
        more
    })
    .await
    .unwrap_or_default();
    output.push_str(&rest);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    output.push_str(&err);
    SClient { echoed, output }
}

async fn openssl_echo(cipher: &str, openssl_name: &str, expect: CipherSuite) {
    if !est_test_tools::require_tools(&["openssl"]) {
        return;
    }
    let t = Instant::now();
    let pki = Pki::generate();
    let srv = EchoServer::start(
        &pki,
        &[
            CipherSuite::Aes128Ccm8,
            CipherSuite::Aes128Gcm,
            CipherSuite::Aes256Gcm,
        ],
    )
    .await;
    let line = format!("hello over {openssl_name} from openssl s_client");
    let run = s_client(srv.addr, &pki, "client", cipher, &line).await;
    assert!(run.echoed, "no echo: {}", run.output);
    assert!(
        run.output.contains(&format!("Cipher is {openssl_name}")),
        "{}",
        run.output
    );
    let seen = srv.seen();
    assert_eq!(seen.connected.len(), 1, "{seen:?}");
    assert_eq!(seen.connected[0].suite, Some(expect));
    assert_eq!(
        seen.data.first().map(|d| d.2.clone()),
        Some(format!("{line}\n").into_bytes())
    );
    // OpenSSL has no Connection ID: none was negotiated.
    assert!(seen.connected[0].peer_cid.is_empty() && seen.connected[0].own_cid.is_empty());
    println!("openssl s_client {openssl_name}: echo in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_ccm8_with_client_certificate_echoes() {
    openssl_echo(
        "ECDHE-ECDSA-AES128-CCM8:@SECLEVEL=0",
        "ECDHE-ECDSA-AES128-CCM8",
        CipherSuite::Aes128Ccm8,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_gcm_with_client_certificate_echoes() {
    openssl_echo(
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::Aes128Gcm,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_aes256_gcm_sha384_echoes() {
    openssl_echo(
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::Aes256Gcm,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_a_certificate_from_an_unknown_ca_is_refused() {
    if !est_test_tools::require_tools(&["openssl"]) {
        return;
    }
    let pki = Pki::generate();
    let srv = EchoServer::start(&pki, &[CipherSuite::Aes128Ccm8, CipherSuite::Aes128Gcm]).await;
    let run = s_client(
        srv.addr,
        &pki,
        "rogue",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "must not arrive",
    )
    .await;
    assert!(!run.echoed, "{}", run.output);
    assert!(
        run.output.contains("unknown ca") || run.output.contains("alert number 48"),
        "the client was told why: {}",
        run.output
    );
    let seen = srv.seen();
    assert!(
        seen.connected.is_empty() && seen.data.is_empty(),
        "{seen:?}"
    );
    assert_eq!(seen.metrics.refused(RefusalReason::UnknownCa), 1);
}

// ---------------------------------------------------------------------------------------------
// (b) Mbed TLS 3.4.0 ssl_client2, with Connection ID

const MBEDTLS_CRATE: &str = "mbedtls-sys-auto";
const MBEDTLS_CRATE_VERSION: &str = "3.5.0-alpha.3+0b3de6f";
/// What the client asks the server to put in its records: "mbcli".
const CLIENT_CID_HEX: &str = "6d62636c69";

/// `ssl_client2` of Mbed TLS 3.4.0 with MBEDTLS_SSL_DTLS_CONNECTION_ID (RFC 9146), built once
/// into `<target>/interop-peers/` (cid-peers.md, Recipe B).
fn ssl_client2() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_ssl_client2)
        .clone()
        .unwrap_or_else(|e| panic!("building Mbed TLS ssl_client2: {e}"))
}

fn build_ssl_client2() -> Result<PathBuf, String> {
    let peers = peers_dir();
    let bin = peers.join(format!("mbedtls-{MBEDTLS_CRATE_VERSION}-cid-ssl_client2"));
    if bin.is_file() {
        return Ok(bin);
    }
    let t = Instant::now();
    let work = peers.join(format!("build-mbedtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let crate_dir = est_test_tools::peers::crate_source(
        &work,
        VendoredCrate {
            name: MBEDTLS_CRATE,
            requirement: ">=2.28.15, <=3.5.0-alpha.3",
            version: MBEDTLS_CRATE_VERSION,
        },
    )?;
    let src = work.join("mbedtls");
    run(
        Command::new("cp")
            .arg("-r")
            .arg(crate_dir.join("vendor"))
            .arg(&src),
        "copying vendor/",
        &work.join("cp.log"),
    )?;
    run(
        Command::new("python3")
            .args(["scripts/config.py", "set", "MBEDTLS_SSL_DTLS_CONNECTION_ID"])
            .current_dir(&src),
        "config.py set MBEDTLS_SSL_DTLS_CONNECTION_ID",
        &work.join("config.log"),
    )?;
    run(
        Command::new("make")
            .args(["-j2", "lib"])
            .env("CC", "gcc")
            .current_dir(&src),
        "make lib",
        &work.join("make-lib.log"),
    )?;
    run(
        Command::new("make")
            .args(["-j2", "-C", "programs", "ssl/ssl_client2"])
            .env("CC", "gcc")
            .current_dir(&src),
        "make ssl_client2",
        &work.join("make-programs.log"),
    )?;
    // Into place atomically (another test process may be building too), then clean up.
    let staged = work.join("ssl_client2");
    std::fs::copy(src.join("programs/ssl/ssl_client2"), &staged).map_err(|e| e.to_string())?;
    std::fs::rename(&staged, &bin).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "built Mbed TLS ssl_client2 with Connection ID in {:?}: {}",
        t.elapsed(),
        bin.display()
    );
    Ok(bin)
}

struct Mbed {
    ok: bool,
    output: String,
}

impl Mbed {
    /// "Peer CID (length N Bytes): aa bb .." as bytes.
    fn peer_cid(&self) -> Option<Vec<u8>> {
        let line = self.output.lines().find(|l| l.contains("Peer CID"))?;
        let hex = line.split("): ").nth(1)?;
        hex.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).ok())
            .collect()
    }

    /// The echoes the client printed ("< Read from server: N bytes read").
    fn echoes(&self) -> usize {
        self.output.matches("bytes read").count()
    }
}

/// Runs ssl_client2 against `server` with the client certificate, forcing `suite`.
async fn ssl_client2_run(server: SocketAddr, pki: &Pki, suite: &str, extra: &[&str]) -> Mbed {
    let bin = tokio::task::spawn_blocking(ssl_client2).await.unwrap();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "dtls=1",
        "server_addr=127.0.0.1",
        &format!("server_port={}", server.port()),
        "server_name=localhost",
        &format!("ca_file={}", pki.arg("ca.pem")),
        &format!("crt_file={}", pki.arg("client.pem")),
        &format!("key_file={}", pki.arg("client.key")),
        &format!("force_ciphersuite={suite}"),
        "hs_timeout=500-8000",
    ])
    .args(extra)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output())
        .await
        .expect("ssl_client2 finished within 40 s")
        .expect("ssl_client2 ran");
    Mbed {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn require_mbedtls_tools() -> bool {
    est_test_tools::require_tools(&["python3", "make", "gcc", "cp"])
}

async fn mbedtls_cid_echo(suite: &str, expect: CipherSuite) {
    if !require_mbedtls_tools() {
        return;
    }
    let pki = Pki::generate();
    let srv = EchoServer::start(&pki, &[CipherSuite::Aes128Ccm8, CipherSuite::Aes128Gcm]).await;
    let t = Instant::now();
    let run = ssl_client2_run(
        srv.addr,
        &pki,
        suite,
        &[
            "cid=1",
            &format!("cid_val={CLIENT_CID_HEX}"),
            "read_timeout=5000",
        ],
    )
    .await;
    assert!(run.ok, "{}", run.output);
    assert!(
        run.output
            .contains("Use of Connection ID has been negotiated"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains(&format!("Ciphersuite is {suite}")),
        "{}",
        run.output
    );
    let seen = srv.seen();
    assert_eq!(seen.connected.len(), 1, "{seen:?}");
    let s = &seen.connected[0];
    assert_eq!(s.suite, Some(expect));
    assert_eq!(s.own_cid.len(), 4, "we issue 4-byte CIDs by default");
    assert_eq!(
        run.peer_cid().as_deref(),
        Some(s.own_cid.as_slice()),
        "{}",
        run.output
    );
    assert_eq!(s.peer_cid, b"mbcli");
    // The request came in CID records and its echo went back in CID records.
    assert_eq!(run.echoes(), 1, "{}", run.output);
    let request = &seen.data.first().expect("a request").2;
    assert!(request.starts_with(b"GET / HTTP/1.0"), "{request:?}");
    assert!(
        run.output
            .contains(&String::from_utf8_lossy(request).into_owned()),
        "the echo is the request: {}",
        run.output
    );
    println!("Mbed TLS ssl_client2 {suite} with CID: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbedtls_ssl_client2_ccm8_negotiates_a_connection_id_and_echoes() {
    mbedtls_cid_echo(
        "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8",
        CipherSuite::Aes128Ccm8,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbedtls_ssl_client2_gcm_negotiates_a_connection_id_and_echoes() {
    mbedtls_cid_echo(
        "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256",
        CipherSuite::Aes128Gcm,
    )
    .await;
}

/// ssl_client2 through the NAT, two exchanges: the first from one source port, the second from
/// another. Returns the client's run, the echo server and the NAT.
async fn mbedtls_through_a_rebinding_nat(cid: bool) -> (Mbed, EchoServer, Nat) {
    let pki = Pki::generate();
    let srv = EchoServer::start(&pki, &[CipherSuite::Aes128Ccm8, CipherSuite::Aes128Gcm]).await;
    let nat = Nat::start(srv.addr, Arc::clone(&srv.data_count)).await;
    let cid_args = if cid {
        vec!["cid=1".to_string(), format!("cid_val={CLIENT_CID_HEX}")]
    } else {
        vec!["cid=0".to_string()]
    };
    let mut extra: Vec<&str> = cid_args.iter().map(String::as_str).collect();
    // Two requests; a read gives up after 3 s (then one resend of the request).
    extra.extend(["exchanges=2", "read_timeout=3000"]);
    let run = ssl_client2_run(nat.addr, &pki, "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8", &extra).await;
    (run, srv, nat)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbedtls_session_survives_a_nat_port_change_by_its_connection_id() {
    if !require_mbedtls_tools() {
        return;
    }
    let t = Instant::now();
    let (run, srv, nat) = mbedtls_through_a_rebinding_nat(true).await;
    let seen = srv.seen();
    let ports = nat.upstream.lock().unwrap().clone();
    assert!(run.ok, "{}\n{seen:?}", run.output);
    assert_eq!(ports.len(), 2, "the NAT moved to a new source port");
    assert!(run.peer_cid().is_some(), "{}", run.output);
    assert_eq!(run.echoes(), 2, "both echoes arrived: {}", run.output);
    // One session, one handshake: its first request from the first port, the second from the
    // new one, and the endpoint followed it there.
    assert_eq!(seen.connected.len(), 1, "{seen:?}");
    let h = seen.connected[0].handle;
    let from: Vec<SocketAddr> = seen.data.iter().map(|d| d.1).collect();
    assert!(seen.data.iter().all(|d| d.0 == h), "{seen:?}");
    assert_eq!(from, ports, "{seen:?}");
    assert_eq!(seen.moves, [(h, ports[0], ports[1])]);
    assert_eq!(seen.metrics.peer_address_changes, 1);
    assert_eq!(seen.metrics.handshakes_completed, 1);
    println!(
        "Mbed TLS ssl_client2 across a NAT port change with CID: {:?}",
        t.elapsed()
    );
}

/// The control: the same port change without a Connection ID loses the session (the server
/// cannot tell whose records come from the new port), so the CID is what saved it above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_connection_id_the_same_port_change_loses_the_session() {
    if !require_mbedtls_tools() {
        return;
    }
    let (run, srv, nat) = mbedtls_through_a_rebinding_nat(false).await;
    let seen = srv.seen();
    assert_eq!(nat.upstream.lock().unwrap().len(), 2);
    assert!(!run.ok, "{}", run.output);
    assert!(
        !run.output.contains("Connection ID has been negotiated"),
        "{}",
        run.output
    );
    assert_eq!(
        run.echoes(),
        1,
        "only the echo before the move: {}",
        run.output
    );
    assert_eq!(seen.data.len(), 1, "{seen:?}");
    assert_eq!(seen.metrics.peer_address_changes, 0);
    assert!(seen.metrics.dropped_unknown_peer >= 1, "{:?}", seen.metrics);
}

// ---------------------------------------------------------------------------------------------
// (c) Go's pion/dtls v2.2.6 (Debian golang-github-pion-dtls.v2-dev), built offline in GOPATH mode.
// It has no Connection ID.

const PION_PACKAGE: &str = "/usr/share/gocode/src/github.com/pion/dtls/v2/conn.go";

/// A DTLS client on pion/dtls: handshake with a client certificate, offering one suite, then
/// one message and the echo printed.
const PION_CLIENT_GO: &str = r#"package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/pion/dtls/v2"
)

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) != 7 {
		fmt.Fprintln(os.Stderr, "usage: pion-dtls-client HOST:PORT CERT KEY CA ccm8|gcm|gcm256 MESSAGE")
		os.Exit(2)
	}
	addr, err := net.ResolveUDPAddr("udp", os.Args[1])
	check(err)
	cert, err := tls.LoadX509KeyPair(os.Args[2], os.Args[3])
	check(err)
	caPEM, err := os.ReadFile(os.Args[4])
	check(err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		check(fmt.Errorf("no certificate in %s", os.Args[4]))
	}
	suites := map[string]dtls.CipherSuiteID{
		"ccm8":   dtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
		"gcm":    dtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		"gcm256": dtls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	}
	suite, ok := suites[os.Args[5]]
	if !ok {
		check(fmt.Errorf("unknown suite %s", os.Args[5]))
	}
	config := &dtls.Config{
		Certificates:         []tls.Certificate{cert},
		RootCAs:              roots,
		ServerName:           "localhost",
		CipherSuites:         []dtls.CipherSuiteID{suite},
		ExtendedMasterSecret: dtls.RequireExtendedMasterSecret,
		ConnectContextMaker: func() (context.Context, func()) {
			return context.WithTimeout(context.Background(), 15*time.Second)
		},
	}
	conn, err := dtls.Dial("udp", addr, config)
	check(err)
	defer conn.Close()
	fmt.Println("handshake done")
	_, err = conn.Write([]byte(os.Args[6]))
	check(err)
	check(conn.SetReadDeadline(time.Now().Add(10 * time.Second)))
	buf := make([]byte, 2048)
	n, err := conn.Read(buf)
	check(err)
	fmt.Printf("echo: %s\n", buf[:n])
}
"#;

/// The pion client, built once into `<target>/interop-peers/` (rebuilt when its source changes).
fn pion_client() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_pion_client)
        .clone()
        .unwrap_or_else(|e| panic!("building the pion/dtls client: {e}"))
}

fn build_pion_client() -> Result<PathBuf, String> {
    let peers = peers_dir();
    let bin = peers.join("pion-dtls-client");
    let cached_src = peers.join("pion-dtls-client.go");
    if bin.is_file() && std::fs::read_to_string(&cached_src).ok().as_deref() == Some(PION_CLIENT_GO)
    {
        return Ok(bin);
    }
    let t = Instant::now();
    let gopath = peers.join(format!("build-pion-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&gopath);
    let pkg = gopath.join("src/piondtlsclient");
    std::fs::create_dir_all(&pkg).map_err(|e| e.to_string())?;
    std::fs::write(pkg.join("main.go"), PION_CLIENT_GO).map_err(|e| e.to_string())?;
    let staged = gopath.join("pion-dtls-client");
    // Offline, GOPATH mode: the Debian packages under /usr/share/gocode are the only source.
    run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&staged)
            .arg("piondtlsclient")
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .current_dir(&gopath),
        "go build (pion/dtls client)",
        &gopath.join("build.log"),
    )?;
    std::fs::rename(&staged, &bin).map_err(|e| e.to_string())?;
    std::fs::write(&cached_src, PION_CLIENT_GO).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&gopath);
    eprintln!("built the pion/dtls client in {:?}", t.elapsed());
    Ok(bin)
}

async fn pion_echo(suite: &str, expect: CipherSuite) {
    if !est_test_tools::require_tools(&["go", PION_PACKAGE]) {
        return;
    }
    let pki = Pki::generate();
    let srv = EchoServer::start(
        &pki,
        &[
            CipherSuite::Aes128Ccm8,
            CipherSuite::Aes128Gcm,
            CipherSuite::Aes256Gcm,
        ],
    )
    .await;
    let bin = tokio::task::spawn_blocking(pion_client).await.unwrap();
    let t = Instant::now();
    let message = format!("hello over {suite} from pion/dtls");
    let out = tokio::time::timeout(
        Duration::from_secs(40),
        tokio::process::Command::new(bin)
            .arg(srv.addr.to_string())
            .args([
                pki.arg("client.pem"),
                pki.arg("client.key"),
                pki.arg("ca.pem"),
            ])
            .args([suite, &message])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the pion client finished within 40 s")
    .expect("the pion client ran");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{output}");
    assert!(output.contains(&format!("echo: {message}\n")), "{output}");
    let seen = srv.seen();
    assert_eq!(seen.connected.len(), 1, "{seen:?}");
    assert_eq!(seen.connected[0].suite, Some(expect));
    assert_eq!(seen.data.len(), 1, "{seen:?}");
    println!("pion/dtls {suite}: echo in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pion_dtls_ccm8_with_client_certificate_echoes() {
    pion_echo("ccm8", CipherSuite::Aes128Ccm8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pion_dtls_gcm_with_client_certificate_echoes() {
    pion_echo("gcm", CipherSuite::Aes128Gcm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pion_dtls_aes256_gcm_sha384_echoes() {
    pion_echo("gcm256", CipherSuite::Aes256Gcm).await;
}
