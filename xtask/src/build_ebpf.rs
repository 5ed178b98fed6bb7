//! `cargo xtask build-ebpf`: build the kernel object.
//!
//! tank-loader's build script is the one place that knows how to build `tank-ebpf` (so a plain
//! `cargo build` works too); this command runs it and says where the object landed.

use anyhow::{bail, Context};

use crate::cmd;

/// Options of `cargo xtask build-ebpf`.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile of the host side.
    #[arg(long)]
    release: bool,
}

/// Builds the object and prints its path and size.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let profile = if opts.release { "release" } else { "debug" };
    let mut args = vec!["build", "-p", "tank-loader"];
    if opts.release {
        args.push("--release");
    }
    cmd::run(&mut cmd::cargo(&args))?;
    let build_dir = cmd::root().join("target").join(profile).join("build");
    let newest = std::fs::read_dir(&build_dir)
        .with_context(|| format!("cannot read {}", build_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("out/tank-ebpf.o"))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    let Some(object) = newest else {
        bail!("no tank-ebpf.o under {}", build_dir.display())
    };
    println!("{} ({} bytes)", object.display(), object.metadata()?.len());
    Ok(())
}
