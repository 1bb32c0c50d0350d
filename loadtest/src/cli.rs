//! The command line: options of a run and the `core-bench` subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use client_sim::dtls::DtlsBackend;

use crate::steps::Transport;

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    client_sim::cli::parse_duration(s, Duration::from_secs(3600))
}

pub(crate) fn parse_step(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(c) if (1..=100_000).contains(&c) => Ok(c),
        _ => Err(format!("`{s}`: a step is 1..=100000 meters")),
    }
}

/// Enrollments per second of est-server at stepped concurrency, against the crypto ceiling and
/// libcoap's coap-server-openssl, with a JSON and HTML report.
///
/// Without --server it starts a fresh est-server (release build; found beside this executable or
/// built with cargo), with a new data directory and a minted fleet, on 127.0.0.1.
///
/// Exit status: 0 when every enrollment step enrolled meters with under 5% errors and the server
/// stayed up; 1 otherwise; 2 on bad arguments.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// Concurrent meters per step (closed loop).
    #[arg(long, value_delimiter = ',', value_parser = parse_step, default_value = "1,8,64,256")]
    pub steps: Vec<usize>,
    /// Duration of each step.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub step_duration: Duration,
    /// Output directory (default target/loadtest/<run>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A tiny, fast run (seconds): steps 1,4 for 3 s, 16 devices, short peer and memory checks.
    #[arg(long)]
    pub smoke: bool,
    /// Drive an already running server at this address (no child process, no server CPU/RSS);
    /// needs --fleet.
    #[arg(long, requires = "fleet")]
    pub server: Option<std::net::SocketAddr>,
    /// Fleet directory (`est-server factory mint` output with implicit-ta.pem) for --server.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// The est-server binary (default: beside this executable, else built with cargo).
    #[arg(long)]
    pub est_server: Option<PathBuf>,
    /// Pin the server (and the libcoap peer) to these CPUs (taskset -c LIST).
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Pin the load generator to these CPUs (re-executes itself under taskset -c LIST).
    #[arg(long)]
    pub client_cpus: Option<String>,
    /// Devices minted for the fleet (meters reuse them round-robin; every enrollment has its own key and CSR); at least --hold-sessions, so that each held session is its own device.
    #[arg(long, default_value_t = 2048)]
    pub devices: usize,
    /// Extra server configuration, SECTION.KEY=VALUE (TOML value), repeatable.
    #[arg(long = "server-config")]
    pub server_config: Vec<String>,
    /// Meters of the side-by-side peer comparison (0 = skip it).
    #[arg(long, default_value_t = 64)]
    pub peer_concurrency: usize,
    /// Duration of each side of the peer comparison (default: --step-duration).
    #[arg(long, value_parser = parse_duration)]
    pub peer_duration: Option<Duration>,
    /// Sessions to open and hold at once for the server memory figure (0 = skip).
    #[arg(long, default_value_t = 10_000)]
    pub hold_sessions: usize,
    /// Skip the open-loop step at half the peak rate.
    #[arg(long)]
    pub no_half_rate: bool,
    /// Time per crypto operation for the ceiling.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub crypto_duration: Duration,
    /// Run the core path under valgrind callgrind (default: when valgrind is installed and not --smoke).
    #[arg(long)]
    pub callgrind: Option<bool>,
    /// Iterations of the core path under callgrind.
    #[arg(long, default_value_t = 20)]
    pub callgrind_iterations: u64,
    /// Seed of the meters' keys and CoAP message IDs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Profile the server with `perf record -g` during the closed-loop step with this many
    /// meters (OUT/perf.data, flat profile in OUT/perf-report.txt, grouped in the report notes).
    /// When N is also the peer comparison's --peer-concurrency (64 by default), our
    /// handshake+GET step is profiled too (OUT/perf-handshake-report.txt) and a note splits the
    /// enrollment's extra server CPU by component.
    #[arg(long)]
    pub perf_step: Option<usize>,
    /// Drive the meters over plain connected UDP sockets instead of client-sim's (zero-delay)
    /// link emulator. A cross-check of the harness.
    #[arg(long)]
    pub direct_udp: bool,
    /// The load generator's DTLS client (client-sim's meter backend), used for every step, both
    /// sides of the libcoap comparison and the held sessions: native (our own engine's client
    /// mode, est-dtls; the default: it speaks RFC 9148's TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 and
    /// runs its crypto on ring), dimpl (dimpl 0.9 with ring crypto; it has no CCM_8 and
    /// negotiates TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256), webrtc (webrtc-dtls 0.12, CCM_8) or
    /// openssl (the system's OpenSSL 3, CCM_8); figures in docs/benchmarks.md, "The load
    /// generator". The handshake (P-256 ECDHE, ECDSA mutual authentication, extended master
    /// secret) is the same. openssl is in the build only with the cargo feature openssl-backend
    /// (dimpl-backend is a default feature).
    #[arg(long, value_enum, default_value_t = DtlsBackend::Native)]
    pub client_dtls: DtlsBackend,
    /// Where the started server's issuing CA key lives: a PKCS#8 file signed with ring (file), or
    /// a SoftHSM2 token made for the run (softhsm: `est-server init --hsm-*`, every certificate
    /// signed over PKCS#11; needs the Debian package softhsm2). Not with --server.
    #[arg(long, value_enum, default_value_t = CaKey::File, conflicts_with = "server")]
    pub ca_key: CaKey,
    #[arg(long)]
    pub no_progress: bool,
    /// The store to compare with SQLite: `postgres` adds a storage comparison at the end of the
    /// run: the closed-loop enrollment step at --store-concurrency on the SQLite server, then on
    /// a throwaway PostgreSQL (est-test-tools: initdb in a temporary directory, fsync on, unix
    /// socket) with group commit ([storage] max_batch default) and without (max_batch = 1), and
    /// on --nodes est-server nodes sharing it. Server CPU per enrollment counts every node and
    /// every PostgreSQL process. Needs Debian's postgresql package (its binaries only).
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    /// est-server nodes on the PostgreSQL database in the storage comparison (--store postgres);
    /// the meters are spread over them (client-sim's --server A,B).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: u16,
    /// Meters of the storage comparison's steps.
    #[arg(long, default_value_t = 64, value_parser = parse_step)]
    pub store_concurrency: usize,
}

/// `--store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    Sqlite,
    Postgres,
}

impl Cli {
    pub(crate) fn transport(&self) -> Transport {
        if self.direct_udp {
            Transport::Direct
        } else {
            Transport::Emulated
        }
    }
}

/// `--ca-key`: where the issuing CA's private key is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CaKey {
    /// A key file, signatures by ring.
    #[default]
    File,
    /// A SoftHSM2 token, signatures over PKCS#11.
    Softhsm,
}

impl CaKey {
    /// How reports name it.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            CaKey::File => "file (ring)",
            CaKey::Softhsm => "SoftHSM2 token (PKCS#11)",
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Run the in-memory core path of N enrollments (what callgrind counts) and print its time.
    CoreBench {
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// Run N DTLS sessions in memory between est-dtls's client mode and its endpoint: a full
    /// handshake with client authentication (the policy's path validation), one datagram each
    /// way and close_notify. With --callgrind, count the instructions of each side per session
    /// under valgrind (deterministic: for comparing engine changes on a noisy machine).
    DtlsBench {
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Count instructions per session under valgrind callgrind, server side and meter side.
        #[arg(long)]
        callgrind: bool,
        /// Where callgrind's output files go.
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
    },
    /// Measure the server CPU a full enrollment cannot do without on this machine: its curve
    /// operations, its datagrams on loopback and a durable commit, to set beside the
    /// measured server CPU per enrollment (the rest is parsing, CoAP, the store's code,
    /// allocation and scheduling).
    Floor {
        /// Datagrams echoed to measure a loopback receive + send.
        #[arg(long, default_value_t = 200_000)]
        datagrams: u64,
        /// Bytes per echoed datagram (an enrollment's average is ~380).
        #[arg(long, default_value_t = 400)]
        payload: usize,
        /// Datagrams kept outstanding during the echo (many meters at once).
        #[arg(long, default_value_t = 16)]
        in_flight: usize,
        /// Datagrams the server receives per enrollment (ClientHello twice, the client's
        /// flight, GET /crts, POST /sen, close_notify: loadtest's meters send 6).
        #[arg(long, default_value_t = 6.0)]
        datagrams_in: f64,
        /// Datagrams the server sends per enrollment (HelloVerifyRequest, its two flights,
        /// the two responses: 5).
        #[arg(long, default_value_t = 5.0)]
        datagrams_out: f64,
        /// Durable appends (write + fdatasync) to measure.
        #[arg(long, default_value_t = 2_000)]
        commits: u64,
        /// Enrollments per fsync at the load of interest (est_store_operations /
        /// est_store_transactions; 3.7 counted with perf stat at 64 meters on a 2-core box).
        #[arg(long, default_value_t = 4.0)]
        group: f64,
        /// Directory for the commit file: the server's data directory's filesystem.
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Time per crypto operation.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        crypto_duration: Duration,
    },
    /// Measure the CPU est-server's SQLite store spends per issuance (its writer thread and
    /// the threads that submit), in-process: the server's schema, statements, group commit
    /// and synchronous=FULL, with `--meters` issuances in flight as at that many meters.
    Store {
        /// Issuances measured.
        #[arg(long, default_value_t = 20_000)]
        issuances: u64,
        /// Issuances committed first, untimed, so that the indexes have some depth.
        #[arg(long, default_value_t = 8_192)]
        history: u64,
        /// Issuances in flight at once (threads that each commit and wait).
        #[arg(long, default_value_t = 4)]
        meters: usize,
        /// Devices the issuances are spread over (each supersedes its device's last).
        #[arg(long, default_value_t = 2_048)]
        devices: usize,
        /// The writer's largest transaction (`[storage] max_batch`).
        #[arg(long, default_value_t = 256)]
        max_batch: usize,
        /// Directory for the store: the server's data directory's filesystem.
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn arguments_parse() {
        assert_eq!(parse_step(" 8").unwrap(), 8);
        assert!(parse_step("0").is_err() && parse_step("x").is_err());
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").is_err());
        let cli = Cli::try_parse_from([
            "loadtest",
            "--steps",
            "1,8,64,256",
            "--step-duration",
            "10s",
            "--out",
            "x",
        ])
        .unwrap();
        assert_eq!(cli.steps, vec![1, 8, 64, 256]);
        assert_eq!(cli.client_dtls, DtlsBackend::Native);
        let cli = Cli::try_parse_from(["loadtest", "--client-dtls", "webrtc"]).unwrap();
        assert_eq!(cli.client_dtls, DtlsBackend::Webrtc);
        let cli = Cli::try_parse_from(["loadtest", "--client-dtls", "openssl"]).unwrap();
        assert_eq!(cli.client_dtls, DtlsBackend::Openssl);
        let cli = Cli::try_parse_from(["loadtest", "--client-dtls", "dimpl"]).unwrap();
        assert_eq!(cli.client_dtls, DtlsBackend::Dimpl);
        assert!(Cli::try_parse_from(["loadtest", "--client-dtls", "rustls"]).is_err());
        assert!(Cli::try_parse_from(["loadtest", "--server", "127.0.0.1:5684"]).is_err());
    }
}
