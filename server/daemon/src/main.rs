//! `est-server`: EST-coaps (RFC 9148) enrollment server for field devices.
//!
//! [`cli`] holds the command line, [`run`] the server run, [`commands`] every other
//! subcommand with its rendering.

mod cli;
mod commands;
mod run;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command, RunArgs};

/// mimalloc instead of glibc malloc: the DTLS path allocates, copies and frees many small
/// buffers across threads, and mimalloc measured less server CPU per enrollment on top of LTO
/// (docs/benchmarks.md, "What changed on 2026-11-25"). `no_thp`: no huge-page advice, so the
/// resident set stays small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let data_dir = cli.common.data_dir;
    match cli.command {
        None => run::run(&data_dir, RunArgs::default()),
        Some(Command::Run(args)) => run::run(&data_dir, args),
        Some(Command::Init {
            server_names,
            hsm,
            storage,
        }) => commands::init::run(&data_dir, &server_names, hsm, storage),
        Some(Command::Factory(cmd)) => commands::factory::run(&data_dir, cmd),
        Some(Command::Certs(cmd)) => commands::certs::run(&data_dir, cmd),
        Some(Command::Devices(cmd)) => commands::devices::run(&data_dir, cmd),
        Some(Command::Crl(cmd)) => commands::crl::run(&data_dir, cmd),
        Some(Command::Dtls(cmd)) => commands::dtls::run(&data_dir, cmd),
        Some(Command::C509(cmd)) => commands::c509::run(cmd),
        Some(Command::Ca(cmd)) => commands::ca::run(&data_dir, cmd),
        Some(Command::Audit { limit }) => commands::audit::run(&data_dir, limit),
    }
}
