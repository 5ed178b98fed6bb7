//! `cargo xtask demo`: the README's main job on a built-in default (root).
//!
//! Builds everything and runs `tank-demo` (in the tests crate, which shares the fixtures that
//! create and remove cgroups, loaders and pins).

use anyhow::bail;

use crate::{cmd, setup};

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the demo loads eBPF programs and creates a cgroup: run it as root");
    }
    setup::run(&setup::Options::default())?;
    cmd::run(&mut cmd::cargo(&[
        "build",
        "--quiet",
        "--workspace",
        "--bins",
    ]))?;
    cmd::run(&mut std::process::Command::new(
        cmd::root().join("target/debug/tank-demo"),
    ))
}
