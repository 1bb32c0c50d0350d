//! `loadtest`: enrollments per second of est-server against the crypto ceiling, side by side with
//! libcoap, with a JSON + HTML report.
//!
//! ```text
//!   loadtest ──starts──> est-server (child, fresh data dir, release build)   [or --server ADDR]
//!      │  crypto ceiling (ring sign/verify, the engine's ring ECDH); `loadtest floor`: the floor
//!      │  stepped closed-loop fleets (client-sim meters): 1, 8, 64, 256 ... meters
//!      │  open-loop step at half the peak rate (p99 target)
//!      │  peer: handshake + GET /.well-known/core vs libcoap coap-server-openssl
//!      │  held sessions (server RSS), core path under callgrind
//!      └─> OUT/report.json, OUT/report.html, table on stdout
//! ```
//!
//! `loadtest --smoke --out DIR` does all of it in seconds with a tiny fleet (CI).
#![forbid(unsafe_code)]

mod cli;
mod core_bench;
mod crypto;
mod direct;
mod dtls_bench;
mod floor;
mod peer;
mod perf;
mod report;
mod run;
mod server;
mod steps;
mod store_bench;
mod targets;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Cmd};

/// mimalloc instead of glibc malloc, as est-server: the meters' DTLS and CoAP path allocates and
/// frees many small buffers across the runtime's threads, and glibc's allocator was ~7.6% of the
/// generator's CPU in an enrollment step (perf, docs/benchmarks.md "The load generator's CPU per
/// enrollment"). It also makes the in-process core path (`core-bench`, callgrind) allocate as
/// the server does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A subcommand's report on stdout, or its error on stderr and a failing exit status.
fn print_report(what: &str, report: anyhow::Result<String>) -> ExitCode {
    match report {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CoreBench { iterations }) = cli.cmd {
        return match core_bench::run_native(iterations) {
            Ok(us) => {
                println!("core path: {iterations} enrollments, {us:.1} us each");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("core-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Cmd::DtlsBench {
        iterations,
        callgrind,
        ref out,
    }) = cli.cmd
    {
        let r = if callgrind {
            std::env::current_exe()
                .map_err(anyhow::Error::from)
                .and_then(|exe| dtls_bench::run_callgrind(&exe, iterations as u64, out))
                .map(|c| {
                    println!(
                        "dtls sessions: {iterations}; instructions per session: server {}, meter {}",
                        c.server, c.client
                    );
                })
        } else {
            dtls_bench::run_native(iterations).map(|us| {
                println!("dtls sessions: {iterations}, {us:.1} us each (both sides)");
            })
        };
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dtls-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Cmd::Floor {
        datagrams,
        payload,
        in_flight,
        datagrams_in,
        datagrams_out,
        commits,
        group,
        dir,
        crypto_duration,
    }) = &cli.cmd
    {
        let args = floor::FloorArgs {
            datagrams: *datagrams,
            payload: *payload,
            in_flight: *in_flight,
            datagrams_in: *datagrams_in,
            datagrams_out: *datagrams_out,
            commits: *commits,
            group: *group,
            crypto_budget: *crypto_duration,
        };
        return print_report(
            "loadtest floor",
            floor::measure(&args, dir).map(|f| floor::render(&args, &f)),
        );
    }
    if let Some(Cmd::Store {
        issuances,
        history,
        meters,
        devices,
        max_batch,
        dir,
    }) = &cli.cmd
    {
        let args = store_bench::StoreArgs {
            issuances: *issuances,
            history: *history,
            meters: *meters,
            devices: *devices,
            max_batch: *max_batch,
        };
        return print_report(
            "loadtest store",
            store_bench::measure(&args, dir).map(|f| store_bench::render(&args, &f)),
        );
    }
    if let Err(e) = cli.client_dtls.ensure_compiled_in() {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    if let Some(cpus) = &cli.client_cpus {
        if std::env::var_os("LOADTEST_PINNED").is_none() {
            return match run::reexec_pinned(cpus) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("loadtest: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run::run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadtest: FAILED (see above and the report)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
