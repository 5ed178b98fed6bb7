//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Set-up first (a fresh machine has no eBPF toolchain), then every binary, then the unit and
//! crate tests, then the root integration tests (real kernel, cgroups, nft, namespaces).

use crate::{cmd, setup};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Only run integration tests whose name contains this.
    filter: Option<String>,
}

/// Runs everything; fails on the first failing stage.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::prepare(
        "the suite loads eBPF programs and creates cgroups, nft tables and network namespaces",
        &["--workspace", "--bins", "--tests"],
    )?;
    if opts.filter.is_none() {
        cmd::run(&mut cmd::cargo(&[
            "test",
            "--workspace",
            "--exclude",
            "tank-integration-tests",
        ]))?;
    }
    let mut integration = cmd::cargo(&["test", "-p", "tank-integration-tests"]);
    if let Some(filter) = &opts.filter {
        integration.args(["--", filter]);
    }
    cmd::run(&mut integration)
}
