//! `cargo xtask`: the project's awkward chores in one place, one module per subcommand.
//!
//! - `setup`: install what a fresh Debian machine lacks (idempotent, quiet when all is there);
//! - `build-ebpf`: build the kernel object (through tank-loader's build script, its one home);
//! - `test`: the whole suite, unit and root integration tests (what `.ci/run` calls);
//! - `demo`: the README's main job on a built-in default;
//! - `bench`: kernel and proxy benchmarks, ratios measured side by side in one run;
//! - `man`: man pages and shell completions from the clap definitions.

mod bench;
mod build_ebpf;
mod cmd;
mod demo;
mod man;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer tasks for tank.
#[derive(Parser)]
#[command(name = "cargo xtask", about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian packages, the matched eBPF compiler, bpf-linker.
    Setup(setup::Options),
    /// Build the eBPF object (tank-ebpf) and print where it is.
    BuildEbpf(build_ebpf::Options),
    /// Run the whole test suite: set-up, build, unit tests, then root integration tests.
    Test(test::Options),
    /// Run the demo: an agent cgroup under tank, a few allowed and denied connects, trace,
    /// status, teardown.
    Demo,
    /// Run benchmarks and print a table (JSON in target/bench/).
    Bench(bench::Options),
    /// The proxy benchmark's bare splice relay (run by `bench proxy`, in its own process).
    #[command(hide = true)]
    SpliceRelay(bench::splice_relay::Options),
    /// Write man pages and shell completions (from the clap definitions) under OUT_DIR.
    Man {
        /// Output directory.
        out_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::BuildEbpf(opts) => build_ebpf::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Demo => demo::run(),
        Command::Bench(opts) => bench::run(&opts),
        Command::SpliceRelay(opts) => bench::splice_relay::run(&opts),
        Command::Man { out_dir } => man::man(&out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
