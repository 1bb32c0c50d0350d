//! A throwaway PostgreSQL cluster for tests and the load-test harness.
//!
//! [`TestPostgres::start`] runs `initdb` in a fresh temporary directory and starts `postgres`
//! on it, listening only on a unix socket in that directory (no TCP unless asked), with
//! `trust` authentication for the superuser `est` (and, with [`PgOptions::tls`], TLS offered
//! on TCP with a certificate the caller made). Dropping it stops the server (immediate
//! shutdown) and removes the directory. The binaries are Debian's (`postgresql` package,
//! `/usr/lib/postgresql/<major>/bin`), `$EST_PG_BINDIR`, or `initdb` on `PATH`.
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root: then both run as
//! `nobody` (via util-linux's `setpriv`) in a directory that user owns. The server also gets
//! `--pdeathsig KILL`, so a test process that dies without dropping the guard does not leave a
//! server behind (it is spawned from a thread the guard owns: the signal follows the thread
//! that forked); directories such processes left are swept at the next start.
//!
//! [`TestPostgres::start_or_skip`] is the guard tests use: under CI (see [`crate::in_ci`]) a
//! cluster that cannot start fails the test loudly; elsewhere the test is skipped with a
//! message.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How to start the cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `fsync` (off by default: tests do not survive power loss; kill -9 of the server is
    /// still safe, the OS keeps what was written). The load-test figures turn it on.
    pub fsync: bool,
    /// Also listen on TCP `127.0.0.1` on a free port ([`TestPostgres::tcp_url`]).
    pub tcp: bool,
    /// `max_connections` (every est-server node opens `[storage] pool_size` of them).
    pub max_connections: u32,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// `ssl = on` with this server certificate chain and private key (PEM), written into
    /// the data directory (the key 0600, owned by the server's user, as PostgreSQL demands).
    /// TLS is offered on TCP only (PostgreSQL has none on unix sockets): set `tcp` too.
    pub tls: Option<PgTls>,
}

/// The server certificate and key of [`PgOptions::tls`].
#[derive(Clone, Debug)]
pub struct PgTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            fsync: false,
            tcp: false,
            max_connections: 200,
            settings: Vec::new(),
            tls: None,
        }
    }
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct TestPostgres {
    root: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    port: u16,
    tcp_port: Option<u16>,
    run_as: Option<(u32, u32)>,
    options: PgOptions,
    child: Option<Child>,
    keeper: Keeper,
}

/// The thread that spawns `postgres`. `--pdeathsig` fires when the *thread* that forked the
/// child ends, not the process: the server is spawned from this thread, which lives as long
/// as the guard, so a restart from a short-lived thread does not kill it.
struct Keeper {
    jobs: Option<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let thread = std::thread::Builder::new()
            .name("test-postgres".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .ok();
        Self {
            jobs: Some(tx),
            thread,
        }
    }

    fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(cmd.spawn());
        });
        match &self.jobs {
            Some(jobs) if jobs.send(job).is_ok() => rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread is gone"))),
            _ => Err(std::io::Error::other("the spawning thread is gone")),
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The superuser the cluster is created with (trust authentication).
pub const USER: &str = "est";

/// Where the PostgreSQL binaries are, if anywhere.
pub fn find_bindir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EST_PG_BINDIR") {
        let d = PathBuf::from(d);
        return d.join("initdb").is_file().then_some(d);
    }
    let mut majors: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    if let Some((_, bin)) = majors.pop() {
        return Some(bin);
    }
    crate::find("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// uid and gid of `nobody` from /etc/passwd.
fn nobody() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"nobody"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Removes directories of clusters whose test process is gone (it was killed before it could
/// drop its guard; its server got SIGKILL from --pdeathsig).
fn sweep_stale(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("est-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl TestPostgres {
    /// A cluster with default options, or `None` after printing why the calling test is
    /// skipped. Under CI a cluster that cannot start panics instead.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        Self::start_with_or_skip(test, PgOptions::default())
    }

    /// [`Self::start_or_skip`] with options.
    pub fn start_with_or_skip(test: &str, options: PgOptions) -> Option<Self> {
        match Self::start(options) {
            Ok(pg) => Some(pg),
            Err(e) if crate::in_ci() => {
                panic!("{test}: PostgreSQL cannot start, and CI must be able to (.ci/run installs the postgresql package): {e}")
            }
            Err(e) => {
                eprintln!("skipping {test}: no throwaway PostgreSQL ({e}); install Debian's postgresql package");
                None
            }
        }
    }

    /// initdb + postgres in a new temporary directory.
    pub fn start(options: PgOptions) -> Result<Self, String> {
        let bindir = find_bindir().ok_or("PostgreSQL binaries not found (initdb)")?;
        let tmp = std::env::temp_dir();
        sweep_stale(&tmp);
        let root = tmp.join(format!(
            "est-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        let run_as = if effective_uid() == Some(0) {
            let ids = nobody()
                .ok_or("running as root, and there is no user nobody to run PostgreSQL as")?;
            if crate::find("setpriv").is_none() {
                return Err(
                    "running as root needs setpriv (util-linux) to run PostgreSQL as nobody".into(),
                );
            }
            std::os::unix::fs::chown(&root, Some(ids.0), Some(ids.1))
                .map_err(|e| format!("chown {}: {e}", root.display()))?;
            Some(ids)
        } else {
            None
        };
        let mut pg = Self {
            data: root.join("data"),
            root,
            bindir,
            port: 5432,
            tcp_port: None,
            run_as,
            options,
            child: None,
            keeper: Keeper::new(),
        };
        if pg.options.tcp {
            pg.tcp_port = Some(free_tcp_port().map_err(|e| format!("no free TCP port: {e}"))?);
            pg.port = pg.tcp_port.unwrap_or(5432);
        }
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args([
                "-U",
                USER,
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if let Some(tls) = pg.options.tls.clone() {
            pg.install_tls(&tls)?;
        }
        pg.launch()?;
        Ok(pg)
    }

    /// Writes the server's certificate and key into the data directory and turns `ssl` on.
    fn install_tls(&mut self, tls: &PgTls) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for (name, pem, mode) in [
            ("server.crt", &tls.cert_pem, 0o644),
            ("server.key", &tls.key_pem, 0o600),
        ] {
            let path = self.data.join(name);
            fs::write(&path, pem).map_err(|e| format!("writing {}: {e}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
        }
        for (k, v) in [
            ("ssl", "on"),
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
        ] {
            self.options.settings.push((k.into(), v.into()));
        }
        Ok(())
    }

    /// `program` from the PostgreSQL bindir, as the unprivileged user when we are root,
    /// with the cluster directory as its working directory.
    fn command(&self, program: &str) -> Command {
        let bin = self.bindir.join(program);
        let mut c = match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--pdeathsig=KILL")
                    .arg("--")
                    .arg(bin);
                c
            }
            None => {
                if crate::find("setpriv").is_some() {
                    let mut c = Command::new("setpriv");
                    c.arg("--pdeathsig=KILL").arg("--").arg(bin);
                    c
                } else {
                    Command::new(bin)
                }
            }
        };
        c.current_dir(&self.root).stdin(Stdio::null());
        c
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Starts `postgres` on the existing data directory and waits until it accepts
    /// connections.
    fn launch(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening the server log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let listen = if self.tcp_port.is_some() {
            "127.0.0.1"
        } else {
            ""
        };
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("listen_addresses={listen}"))
            .arg("-c")
            .arg(format!(
                "fsync={}",
                if self.options.fsync { "on" } else { "off" }
            ))
            .arg("-c")
            .arg(format!("max_connections={}", self.options.max_connections))
            .args(["-c", "shared_buffers=128MB"]);
        for (k, v) in &self.options.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        let child = self
            .keeper
            .spawn(cmd)
            .map_err(|e| format!("starting postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("postgres exited ({status}): {}", self.log_tail()));
                }
            }
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not accept connections within 60 s: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        let first = lines.len().saturating_sub(15);
        lines.get(first..).unwrap_or_default().join("\n")
    }

    /// The unix-socket directory the server listens in.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq key=value connection string for `dbname` over the unix socket (what
    /// `[storage] url` takes).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={dbname}",
            self.root.display(),
            self.port
        )
    }

    /// `postgres://est@127.0.0.1:PORT/dbname` when started with [`PgOptions::tcp`].
    pub fn tcp_url(&self, dbname: &str) -> Option<String> {
        self.tcp_port
            .map(|p| format!("postgres://{USER}@127.0.0.1:{p}/{dbname}"))
    }

    /// Runs `sql` with psql (unaligned, tuples only) in `dbname`; returns its output.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bindir.join("psql"))
            .arg("-X")
            .arg("-qAt")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", dbname, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned())
        }
    }

    /// Creates database `name`; returns its [`Self::url`].
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// The postmaster's process id while it runs (its backends are its children).
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `SHOW server_version`.
    pub fn version(&self) -> Result<String, String> {
        self.psql("postgres", "SHOW server_version")
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Stops the server: fast shutdown (SIGINT: sessions cut, a clean checkpoint), or
    /// `immediate` (SIGQUIT: as after a crash; recovery replays the WAL at the next start).
    pub fn stop(&mut self, immediate: bool) {
        if self.child.is_none() {
            return;
        }
        self.signal(if immediate { "QUIT" } else { "INT" });
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    self.child = None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts the stopped server again on the same directory, socket and port.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop(false);
        self.launch()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop(true);
        let _ = fs::remove_dir_all(&self.root);
    }
}
