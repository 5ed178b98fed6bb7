//! Builds the kernel programs (`tank-ebpf`) and hands the object to the loader, which embeds it.
//!
//! The eBPF target needs `-Z build-std=core` and therefore the standard library's source. These
//! machines have no rustup `rust-src`; Debian's matched compiler + source pair (`rustc-web`,
//! `rust-web-src`) is the documented route, installed by `cargo xtask setup`. So this script runs
//! Debian's cargo and rustc, not rustup's proxies, in a target directory of its own.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const RUSTC: &str = "/usr/bin/rustc";
const CARGO: &str = "/usr/bin/cargo";
const LIBRARY_SOURCE: &str = "/usr/lib/rustlib/src/rust/library/core";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../tank-ebpf");
    for watched in [
        "../tank-ebpf/src",
        "../tank-ebpf/Cargo.toml",
        "../tank-ebpf/Cargo.lock",
        "../tank-ebpf-common/src",
    ] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));

    let linker_path = linker_search_path();
    if let Err(missing) = check_toolchain(&linker_path) {
        panic!(
            "\n\ntank-ebpf cannot be built: {missing}.\nRun `cargo xtask setup` (as root) to install the \
             matched Debian compiler, its library source and bpf-linker, then build again.\n\n"
        );
    }

    let target_dir = out_dir.join("ebpf-target");
    let status = Command::new(CARGO)
        .current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PATH", &linker_path)
        // Nothing of the outer (host, rustup) build may leak into the eBPF build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {CARGO}: {e}; run `cargo xtask setup`"));
    if !status.success() {
        panic!("building tank-ebpf failed ({status}); see the errors above, or run `cargo xtask build-ebpf`");
    }
    let object = target_dir.join("bpfel-unknown-none/release/tank-ebpf");
    std::fs::copy(&object, out_dir.join("tank-ebpf.o"))
        .unwrap_or_else(|e| panic!("eBPF object {} missing after build: {e}", object.display()));
}

/// PATH for the inner build: `$CARGO_HOME/bin` (where setup installs bpf-linker) first.
fn linker_search_path() -> std::ffi::OsString {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let mut dirs = vec![cargo_home.join("bin")];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).expect("PATH entries are valid")
}

fn check_toolchain(path: &std::ffi::OsStr) -> Result<(), String> {
    for (file, what) in [
        (RUSTC, "Debian's rustc (package rustc-web)"),
        (CARGO, "Debian's cargo (package cargo-web)"),
    ] {
        if !Path::new(file).exists() {
            return Err(format!("{what} is missing at {file}"));
        }
    }
    if !Path::new(LIBRARY_SOURCE).exists() {
        return Err(format!(
            "the standard library source (package rust-web-src) is missing at {LIBRARY_SOURCE}"
        ));
    }
    if !env::split_paths(path).any(|dir| dir.join("bpf-linker").is_file()) {
        return Err("bpf-linker is not installed (cargo install bpf-linker)".to_owned());
    }
    Ok(())
}
