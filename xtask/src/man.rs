//! `cargo xtask man OUT_DIR`: man pages and shell completions, written by each shipped binary
//! from its own clap definition (its hidden `generate-manual` subcommand). xtask cannot link
//! the binaries' crates itself: it must build before the eBPF toolchain exists.

use crate::cmd;

/// The binaries that ship, each writing its own pages.
const BINARIES: [&str; 2] = ["tank-loader", "egress-proxy"];

/// `cargo xtask man OUT_DIR`: man pages and completions from the clap definitions.
pub fn man(out_dir: &std::path::Path) -> anyhow::Result<()> {
    for bin in BINARIES {
        // Release, as the image builds them: the pages come from the binaries that ship.
        cmd::run(
            cmd::cargo(&[
                "run",
                "--quiet",
                "--release",
                "-p",
                bin,
                "--",
                "generate-manual",
            ])
            .arg(out_dir),
        )?;
        println!(
            "man pages and completions for {bin} in {}",
            out_dir.display()
        );
    }
    Ok(())
}
