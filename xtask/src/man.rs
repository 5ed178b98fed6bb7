//! `cargo xtask man OUT_DIR`: runs `tank-man` (tests crate, which may depend on tank-loader;
//! xtask may not, since it must build before the eBPF toolchain exists).

use crate::cmd;

/// `cargo xtask man OUT_DIR`: man pages and completions from the clap definitions.
pub fn man(out_dir: &std::path::Path) -> anyhow::Result<()> {
    cmd::run(
        cmd::cargo(&[
            "run",
            "--quiet",
            "-p",
            "tank-integration-tests",
            "--bin",
            "tank-man",
            "--",
        ])
        .arg(out_dir),
    )
}
