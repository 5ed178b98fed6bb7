//! `cargo xtask demo`: the README's main job on a built-in default (root).
//!
//! Builds everything and runs `tank-demo` (in the tests crate, which shares the fixtures that
//! create and remove cgroups, loaders and pins).

use crate::{cmd, setup};

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    setup::prepare(
        "the demo loads eBPF programs and creates a cgroup",
        &["--quiet", "--workspace", "--bins"],
    )?;
    cmd::run(&mut std::process::Command::new(
        cmd::root().join("target/debug/tank-demo"),
    ))
}
