//! RFC 9146 Connection ID against wolfSSL 5.9.4, a second independent DTLS 1.2 stack besides
//! Mbed TLS (`interop_dtls.rs`), talking to our real server (in process, [`TestServer`]).
//!
//! Our own small C client (`tests/peers/wolfssl_cid_client.c`) completes a handshake with a
//! minted IDevID, DTLS 1.2, one suite and a Connection ID; sends a CoAP CON GET
//! /.well-known/est/crts; then opens a new UDP socket (a new source port), moves the session to
//! it with `wolfSSL_set_dtls_fd_connected`, closes the old socket and asks again. With CCM_8
//! and with AES-128-GCM the second answer arrives on the new port, the server counts one
//! handshake and one peer address change, and the CID the client sends is one our server
//! issued (its configured prefix). The controls: the same move with no Connection ID (the
//! client offers none, or the server has `cid_length = 0`) loses the session.
//!
//! wolfSSL is GPL-2.0-or-later: it is built at test time, only under
//! `<target>/interop-peers/`, from the C source that the registry crate `wolfssl-sys =5.3.0`
//! vendors (`shared/docs/cid-peers.md`, Recipe A: `autoreconf`, `configure --enable-dtls
//! --enable-dtlscid --enable-aesccm`, the static library only), and the client linked with it
//! runs only as a separate process. Nothing of wolfSSL is in this repository or in anything
//! we ship. The build runs once and is cached (the client is recompiled when its source
//! changes): about 25 s on a quiet 2-core machine, 84-98 s measured with the cores shared
//! (load average 7); a cached run of the four tests takes about 6 s. Needs `autoreconf`, `automake`, `libtoolize`, `make`, `gcc`, `openssl` and
//! crates.io (or a cargo cache holding the crate): a missing tool skips here and fails under
//! CI ([`est_test_tools::require_tools`]).
//!
//! Run: `cargo test -p est-tests --test interop_wolfssl -- --nocapture`
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use est_proto::ca;
use est_test_tools::peers::{crate_source, peers_dir, run_logged, VendoredCrate};
use est_tests::TestServer;

const WOLFSSL_CRATE: VendoredCrate<'static> = VendoredCrate {
    name: "wolfssl-sys",
    requirement: "=5.3.0",
    version: "5.3.0",
};
/// The wolfSSL release `wolfssl-sys 5.3.0` vendors.
const WOLFSSL_VERSION: &str = "5.9.4";
const CONFIGURE: &[&str] = &[
    "--enable-dtls",
    "--enable-dtlscid",
    "--enable-aesccm",
    "--disable-shared",
    "--enable-static",
    "--disable-crypttests",
    "--disable-benchmark",
    "--disable-examples",
];
const CLIENT_C: &str = include_str!("../peers/wolfssl_cid_client.c");
/// The CID the client asks our server to put in its records ("wolfcli").
const CLIENT_CID: &str = "wolfcli";
/// The prefix of every CID our server issues in these tests (`dtls.cid_prefix_hex`).
const SERVER_CID_PREFIX_HEX: &str = "ce";

fn required_tools() -> bool {
    est_test_tools::require_tools(&[
        "autoreconf",
        "automake",
        "libtoolize",
        "make",
        "gcc",
        "cp",
        "openssl",
    ])
}

/// The wolfSSL build: `include/` (the `wolfssl/` headers with the generated `options.h`) and
/// `lib/libwolfssl.a`, built once into `<target>/interop-peers/`.
fn build_wolfssl() -> Result<PathBuf, String> {
    let peers = peers_dir();
    let dir = peers.join(format!("wolfssl-{WOLFSSL_VERSION}-dtlscid"));
    let built = |d: &Path| {
        d.join("lib/libwolfssl.a").is_file() && d.join("include/wolfssl/options.h").is_file()
    };
    if built(&dir) {
        return Ok(dir);
    }
    let t = Instant::now();
    let work = peers.join(format!("build-wolfssl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let crate_dir = crate_source(&work, WOLFSSL_CRATE)?;
    let src = work.join("wolfssl");
    run_logged(
        Command::new("cp")
            .arg("-r")
            .arg(crate_dir.join("wolfssl-src"))
            .arg(&src),
        "copying wolfssl-src/",
        &work.join("cp.log"),
    )?;
    run_logged(
        Command::new("autoreconf").arg("-if").current_dir(&src),
        "autoreconf",
        &work.join("autoreconf.log"),
    )?;
    run_logged(
        Command::new("./configure")
            .args(CONFIGURE)
            .env("CC", "gcc")
            .current_dir(&src),
        "configure",
        &work.join("configure.log"),
    )?;
    // Only the library: a plain `make` fails, the crate leaves out tests/unit.c.
    run_logged(
        Command::new("make")
            .args(["-j2", "src/libwolfssl.la"])
            .current_dir(&src),
        "make src/libwolfssl.la",
        &work.join("make.log"),
    )?;
    let staged = work.join("out");
    std::fs::create_dir_all(staged.join("include")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(staged.join("lib")).map_err(|e| e.to_string())?;
    run_logged(
        Command::new("cp")
            .arg("-r")
            .arg(src.join("wolfssl"))
            .arg(staged.join("include")),
        "copying the headers",
        &work.join("cp-headers.log"),
    )?;
    std::fs::copy(
        src.join("src/.libs/libwolfssl.a"),
        staged.join("lib/libwolfssl.a"),
    )
    .map_err(|e| e.to_string())?;
    // Into place atomically; another test process may have got there first.
    if std::fs::rename(&staged, &dir).is_err() && !built(&dir) {
        return Err(format!("cannot move the build to {}", dir.display()));
    }
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "built wolfSSL {WOLFSSL_VERSION} with DTLS Connection ID in {:?}: {}",
        t.elapsed(),
        dir.display()
    );
    Ok(dir)
}

/// The client, compiled against the wolfSSL build into `<target>/interop-peers/` (again when
/// its source changes).
fn build_client() -> Result<PathBuf, String> {
    let wolfssl = build_wolfssl()?;
    let peers = peers_dir();
    let bin = peers.join(format!("wolfssl-{WOLFSSL_VERSION}-cid-client"));
    let cached_src = peers.join(format!("wolfssl-{WOLFSSL_VERSION}-cid-client.c"));
    if bin.is_file() && std::fs::read_to_string(&cached_src).ok().as_deref() == Some(CLIENT_C) {
        return Ok(bin);
    }
    let work = peers.join(format!("build-wolfssl-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let source = work.join("wolfssl_cid_client.c");
    std::fs::write(&source, CLIENT_C).map_err(|e| e.to_string())?;
    let staged = work.join("client");
    run_logged(
        Command::new("gcc")
            .args(["-O1", "-Wall", "-Wextra", "-I"])
            .arg(wolfssl.join("include"))
            .arg("-o")
            .arg(&staged)
            .arg(&source)
            .arg(wolfssl.join("lib/libwolfssl.a"))
            .args(["-lm", "-lpthread"]),
        "gcc wolfssl_cid_client.c",
        &work.join("gcc.log"),
    )?;
    std::fs::rename(&staged, &bin).map_err(|e| e.to_string())?;
    std::fs::write(&cached_src, CLIENT_C).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(bin)
}

fn wolfssl_client() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_client)
        .clone()
        .unwrap_or_else(|e| panic!("building wolfSSL and the client: {e}"))
}

/// What the client printed and how it ended.
#[derive(Debug)]
struct Run {
    status: Option<i32>,
    output: String,
    /// Where it wrote the payloads of its two responses.
    payloads: [PathBuf; 2],
}

impl Run {
    /// `key=value` of the first line starting with `tag ` (and containing `with`).
    fn field(&self, tag: &str, with: &str, key: &str) -> Option<&str> {
        let line = self
            .output
            .lines()
            .find(|l| l.starts_with(&format!("{tag} ")) && l.contains(with))?;
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
    }

    fn port(&self, n: u8) -> u16 {
        self.field("LOCAL", &format!("n={n} "), "port")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no LOCAL n={n}: {}", self.output))
    }

    /// Code and payload length of response `n`, if it arrived.
    fn response(&self, n: u8) -> Option<(String, usize)> {
        let with = format!("n={n} ");
        let code = self.field("RESPONSE", &with, "code")?.to_string();
        let len = self.field("RESPONSE", &with, "payload")?.parse().ok()?;
        Some((code, len))
    }

    /// The certificates in the certs-only PKCS#7 of response `n`.
    fn certificates(&self, n: u8) -> Vec<Vec<u8>> {
        let p7 = std::fs::read(&self.payloads[usize::from(n - 1)]).unwrap();
        ca::certs_from_certs_only(&p7)
            .unwrap_or_else(|e| panic!("response {n} is not a certs-only PKCS#7: {e}"))
    }
}

/// A server whose CIDs are `cid_length` bytes (0: Connection ID off), an IDevID for `serial`,
/// and the client run once against it with `suite` and `client_cid` ("off": none).
async fn port_move(
    serial: &str,
    suite: &str,
    client_cid: &str,
    cid_length: usize,
) -> (Run, TestServer) {
    let srv = TestServer::start(|c| {
        c.dtls.cid_length = cid_length;
        if cid_length > 0 {
            c.dtls.cid_prefix_hex = SERVER_CID_PREFIX_HEX.into();
        }
    })
    .await
    .expect("server");
    let fleet = srv.mint(&[serial]).expect("mint");
    let dev = fleet.join(serial);
    let bin = tokio::task::spawn_blocking(wolfssl_client).await.unwrap();
    let payloads = [1, 2].map(|n| srv.dir.path().join(format!("crts-{n}.p7")));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .arg(srv.addr.ip().to_string())
            .arg(srv.addr.port().to_string())
            .arg(dev.join("idevid-chain.pem"))
            .arg(dev.join("idevid.key"))
            .arg(fleet.join("implicit-ta.pem"))
            .args([suite, client_cid])
            .args(&payloads)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the wolfSSL client finished within 60 s")
    .expect("the wolfSSL client ran");
    let run = Run {
        status: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        payloads,
    };
    (run, srv)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn session_survives_a_port_change_by_its_cid(serial: &str, suite: &str) {
    if !required_tools() {
        return;
    }
    let t = Instant::now();
    let (run, srv) = port_move(serial, suite, CLIENT_CID, 4).await;
    let out = &run.output;
    assert_eq!(run.status, Some(0), "{out}");
    assert_eq!(run.field("HANDSHAKE", "", "suite"), Some(suite), "{out}");
    assert_eq!(
        run.field("HANDSHAKE", "", "version"),
        Some("DTLSv1.2"),
        "{out}"
    );
    // CID negotiated both ways: the client puts ours (4 bytes, our configured prefix) in its
    // records and we put its own in ours.
    assert_eq!(run.field("CID", "", "enabled"), Some("1"), "{out}");
    let tx = run.field("CID", "", "tx").unwrap();
    assert_eq!(tx.len(), 8, "a 4-byte CID: {out}");
    assert!(tx.starts_with(SERVER_CID_PREFIX_HEX), "{out}");
    assert_eq!(
        run.field("CID", "", "rx"),
        Some(hex(CLIENT_CID.as_bytes()).as_str()),
        "{out}"
    );
    // Both answers are 2.05 Content carrying our issuing CA, the second on a new port.
    let (p1, p2) = (run.port(1), run.port(2));
    assert_ne!(p1, p2, "{out}");
    for n in [1, 2] {
        let (code, len) = run
            .response(n)
            .unwrap_or_else(|| panic!("no response {n}: {out}"));
        assert_eq!(code, "2.05", "{out}");
        assert!(len > 0, "{out}");
        assert_eq!(
            std::fs::metadata(&run.payloads[usize::from(n - 1)])
                .unwrap()
                .len(),
            len as u64
        );
    }
    let issuing_ca = est_test_tools::openssl::pem_to_der(&srv.ca_pem()).unwrap();
    assert_eq!(run.certificates(1), std::slice::from_ref(&issuing_ca));
    assert_eq!(run.certificates(2), [issuing_ca]);
    // The server's side: one handshake, one session, and it followed the session to the new
    // port (only a CID lets it tell that the records from there are this session's).
    let m = srv.transport();
    assert_eq!(m.handshakes_completed, 1, "{m:?}");
    assert_eq!(m.peer_address_changes, 1, "{m:?}");
    assert_eq!(m.sessions_now, 1, "{m:?}");
    println!(
        "wolfSSL {WOLFSSL_VERSION} {suite} with CID {tx}: ports {p1} -> {p2}, both answered; {:?} (build included when not cached)",
        t.elapsed()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wolfssl_ccm8_session_survives_a_port_change_by_its_connection_id() {
    session_survives_a_port_change_by_its_cid("SNWOLFCCM8", "ECDHE-ECDSA-AES128-CCM-8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wolfssl_gcm_session_survives_a_port_change_by_its_connection_id() {
    session_survives_a_port_change_by_its_cid("SNWOLFGCM", "ECDHE-ECDSA-AES128-GCM-SHA256").await;
}

/// The controls: without a Connection ID the first request is answered, the one from the new
/// port is not (the server cannot tell whose records they are), and the server counts no
/// address change but a datagram from an unknown peer. So the CID is what carried the session
/// above.
async fn without_a_cid_the_port_change_loses_the_session(
    serial: &str,
    client_cid: &str,
    cid_length: usize,
) {
    if !required_tools() {
        return;
    }
    let (run, srv) = port_move(serial, "ECDHE-ECDSA-AES128-CCM-8", client_cid, cid_length).await;
    let out = &run.output;
    assert_eq!(
        run.status,
        Some(3),
        "the second request went unanswered: {out}"
    );
    assert_eq!(run.field("CID", "", "enabled"), Some("0"), "{out}");
    assert_eq!(run.response(1).map(|r| r.0), Some("2.05".into()), "{out}");
    assert!(run.response(2).is_none(), "{out}");
    assert!(run.field("NORESPONSE", "n=2 ", "error").is_some(), "{out}");
    assert_ne!(run.port(1), run.port(2), "{out}");
    let m = srv.transport();
    assert_eq!(m.handshakes_completed, 1, "{m:?}");
    assert_eq!(m.peer_address_changes, 0, "{m:?}");
    assert!(m.dropped_unknown_peer >= 1, "{m:?}");
    println!(
        "wolfSSL {WOLFSSL_VERSION} control (client CID {client_cid}, server cid_length \
         {cid_length}): the request from the new port went unanswered, {} unknown-peer drops",
        m.dropped_unknown_peer
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wolfssl_without_a_connection_id_loses_the_session_on_a_port_change() {
    without_a_cid_the_port_change_loses_the_session("SNWOLFNOCID", "off", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wolfssl_asking_a_server_with_cid_off_loses_the_session_on_a_port_change() {
    without_a_cid_the_port_change_loses_the_session("SNWOLFSRVOFF", CLIENT_CID, 0).await;
}
