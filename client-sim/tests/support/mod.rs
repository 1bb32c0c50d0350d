//! Shared by the integration tests that run a real `est-server` on loopback.
//!
//! The `est-server` binary is located next to the test binary (same target directory and
//! profile) after `cargo build -p est-server --bin est-server`, which is run here (a no-op when up
//! to date). Set `EST_SERVER_BIN=/path/to/est-server` to use another build.
#![allow(dead_code, clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

pub(crate) mod backend;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// target/<profile>/ of this test binary (target/<profile>/deps/<test>).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The est-server binary, built once per test process (the tests of one binary run in parallel
/// and each starts servers; one `cargo build` is enough).
pub(crate) fn est_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_est_server).clone()
}

fn build_est_server() -> PathBuf {
    if let Ok(p) = std::env::var("EST_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "est-server", "--bin", "est-server"])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("running cargo build -p est-server");
    assert!(status.success(), "cargo build -p est-server failed");
    profile_dir.join("est-server")
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning est-server");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `est-server run`, killed on drop.
pub(crate) struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `est-server run`'s stdout up to its "listening on coaps://ADDR" line (printed once the
/// socket is bound) and returns ADDR, and the JPY port it announces after it (`jpy://ADDR`,
/// with `[relay] jpy_listen`); the rest of its output is drained by a thread.
fn announced_addresses(child: &mut Child) -> (SocketAddr, Option<SocketAddr>) {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("est-server stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut coaps = None;
    let mut jpy = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if let Some(r) = est_test_tools::parse_announcement(&line) {
            coaps = Some(r.unwrap_or_else(|e| panic!("{e}")));
        } else if let Some(rest) = line.split("jpy://").nth(1) {
            jpy = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        } else if coaps.is_some() && line.starts_with("enroll a demo meter") {
            break;
        }
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (coaps.expect("est-server announced its address"), jpy)
}

/// A fresh data directory with `meters` minted IDevIDs, and the server running on loopback.
pub(crate) struct Running {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) data: PathBuf,
    pub(crate) fleet_dir: PathBuf,
    pub(crate) listen: SocketAddr,
    /// The JPY port for DCU relays (`[relay] jpy_listen`).
    pub(crate) jpy: Option<SocketAddr>,
    pub(crate) server: Option<Server>,
}

/// A server setting: (section, key, TOML value).
pub(crate) type Setting = (&'static str, &'static str, &'static str);

/// dimpl is a DTLS stack written for WebRTC: it offers use_srtp (RFC 5764) and gives up unless
/// the server answers it, which est-server does only with `dtls.answer_use_srtp = true`.
pub(crate) const DIMPL_SERVER_SETTINGS: &[Setting] = &[("dtls", "answer_use_srtp", "true")];

/// What a server for meters of `backend` needs beyond the defaults.
pub(crate) fn server_settings_for(backend: client_sim::dtls::DtlsBackend) -> &'static [Setting] {
    match backend {
        client_sim::dtls::DtlsBackend::Dimpl => DIMPL_SERVER_SETTINGS,
        _ => &[],
    }
}

/// The settings in the data directory's est-server.toml ([`est_test_tools::set_config`]).
fn apply_settings(data: &Path, settings: &[(&str, &str, &str)]) {
    est_test_tools::set_config(data, settings).unwrap();
}

impl Running {
    pub(crate) fn start(meters: usize) -> Running {
        Self::start_with(meters, &[])
    }

    /// As [`Running::start`], with `settings` changed in the server's configuration.
    pub(crate) fn start_with(meters: usize, settings: &[Setting]) -> Running {
        let bin = est_server_bin();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("est-data");
        let fleet_dir = tmp.path().join("fleet");
        run_ok(Command::new(&bin).arg("init").arg("--data-dir").arg(&data));
        apply_settings(&data, settings);
        run_ok(
            Command::new(&bin)
                .args(["factory", "mint", "--count", &meters.to_string()])
                .arg("--data-dir")
                .arg(&data)
                .arg("--out")
                .arg(&fleet_dir),
        );
        // The server binds a port of the kernel's choosing and announces it: no port picked here
        // and released (another test's socket could take it before the server binds it), and no
        // probe that binds the server's port itself.
        let mut server = Server(
            est_test_tools::est_server_run(&bin, &data)
                .spawn()
                .expect("starting est-server run"),
        );
        let (listen, jpy) = announced_addresses(&mut server.0);
        Running {
            tmp,
            data,
            fleet_dir,
            listen,
            jpy,
            server: Some(server),
        }
    }

    /// Stops the server and returns the DER of every certificate in its store.
    pub(crate) fn stop_and_read_store(&mut self) -> Vec<Vec<u8>> {
        drop(self.server.take());
        let db = rusqlite::Connection::open_with_flags(
            self.data.join("est.sqlite3"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = db.prepare("SELECT der FROM certificates").unwrap();
        let ders: Vec<Vec<u8>> = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        ders
    }
}

/// N `est-server run` processes on one data directory (the same issuing CA and DTLS
/// credentials) and one PostgreSQL database: the nodes of one service.
pub(crate) struct Cluster {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) data: PathBuf,
    pub(crate) fleet_dir: PathBuf,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) nodes: Vec<Option<Server>>,
}

impl Cluster {
    /// `meters` minted IDevIDs and `nodes` servers on the PostgreSQL database at `url`, with
    /// `settings` changed besides `[storage]`.
    pub(crate) fn start(
        meters: usize,
        nodes: usize,
        url: &str,
        settings: &[(&str, &str, &str)],
    ) -> Cluster {
        let bin = est_server_bin();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("est-data");
        let fleet_dir = tmp.path().join("fleet");
        run_ok(Command::new(&bin).arg("init").arg("--data-dir").arg(&data));
        let url_value = format!("\"{url}\"");
        let mut all: Vec<(&str, &str, &str)> = vec![
            ("storage", "backend", "\"postgres\""),
            ("storage", "url", &url_value),
            ("storage", "pool_size", "8"),
        ];
        all.extend_from_slice(settings);
        apply_settings(&data, &all);
        run_ok(
            Command::new(&bin)
                .args(["factory", "mint", "--count", &meters.to_string()])
                .arg("--data-dir")
                .arg(&data)
                .arg("--out")
                .arg(&fleet_dir),
        );
        let mut c = Cluster {
            tmp,
            data,
            fleet_dir,
            addrs: Vec::new(),
            nodes: Vec::new(),
        };
        for _ in 0..nodes {
            let (server, addr) = c.start_node();
            c.nodes.push(Some(server));
            c.addrs.push(addr);
        }
        c
    }

    /// One more `est-server run` on the cluster's data directory.
    pub(crate) fn start_node(&self) -> (Server, SocketAddr) {
        let mut server = Server(
            est_test_tools::est_server_run(&est_server_bin(), &self.data)
                .spawn()
                .expect("starting est-server run"),
        );
        let addr = announced_addresses(&mut server.0).0;
        (server, addr)
    }
}

pub(crate) fn sha256_hex(d: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(d))
}
