//! `cargo xtask setup`: install what a fresh machine of the project's kind lacks.
//!
//! The project's machines are Debian 12 as root. The eBPF side needs `-Z build-std=core`, so
//! it needs the standard library's source; rustup's `rust-src` cannot be had here, so the
//! documented route is Debian's matched compiler + source pair (`rustc-web`, `rust-web-src`)
//! and bpf-linker built against Debian's LLVM 22 (see docs/development.md). Idempotent: it
//! checks first and prints nothing when everything is there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::cmd;

/// Debian packages and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "matched compiler for the eBPF target"),
    ("cargo-web", "its cargo"),
    ("rust-web-src", "library source for -Z build-std=core"),
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    ("libpolly-22-dev", "needed to link LLVM 22"),
    ("libzstd-dev", "needed to link LLVM 22"),
    ("zlib1g-dev", "needed to link LLVM 22"),
    ("nftables", "the nft baseline and its tests"),
    ("iproute2", "network namespaces in tests and the demo"),
    ("curl", "real client in tests and the demo"),
    (
        "python3",
        "second real client in tests; the demo's HTTPS origin",
    ),
    (
        "git",
        "HTTPS client through the proxy in the two-host tests and the demo",
    ),
    ("systemd", "systemd-analyze verify of the image's units"),
    ("util-linux", "mountpoint, used by the image checks"),
    (
        "procps",
        "kill and sysctl, used by the image checks and the test namespaces",
    ),
    ("bpftool", "inspecting programs in the bypass tests"),
    (
        "prometheus",
        "a real Prometheus server scrapes the loader's metrics in the metrics test",
    ),
    (
        "chromium",
        "headless browser that renders the cross-check's HTML report in its test",
    ),
    (
        "poppler-utils",
        "pdftotext reads back the text Chromium rendered of the HTML report",
    ),
    (
        "mmdebstrap",
        "the Debian root the boot test boots (tests/tests/boot.rs)",
    ),
    (
        "systemd-container",
        "systemd-nspawn, which boots that root under a real systemd",
    ),
    (
        "python3-requests",
        "requests, a real client of the inspection tests",
    ),
    (
        "nodejs",
        "Node's TLS client, a real client of the inspection tests",
    ),
    ("python3-pip", "installs the OCSF validator's PyPI packages"),
    (
        "clickhouse-server",
        "the fleet's log store in the store tests (Debian's 18.16: no newer server build is in the registries)",
    ),
    (
        "syslog-ng-core",
        "the shipper of the store tests, run from image/fleet/syslog-ng-tank.conf",
    ),
    ("syslog-ng-mod-http", "syslog-ng's HTTP destination into ClickHouse"),
];

/// Commands and the Debian package that brings each when it is not on PATH: npm comes with
/// some builds of `nodejs` (NodeSource's, which conflicts with Debian's `npm`), so the
/// command, not the package, is checked.
const COMMANDS: &[(&str, &str, &str)] =
    &[("npm", "npm", "npm, a real client of the inspection tests")];

/// PyPI packages at exact versions, installed with `pip install --target` into
/// `target/ocsf-python` (where `tank_ebpf_common::ocsf::validate` looks): the OCSF validation
/// tests check every record kind against the official OCSF schema with them, and the
/// inspection tests use `websockets` as a real WebSocket client (it takes `https_proxy`).
const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "ocsf-json-schema",
        "1.2.0",
        "JSON Schema of each OCSF class, generated from OCSF's own schema",
    ),
    ("jsonschema", "4.26.0", "the JSON Schema validator"),
    (
        "websockets",
        "17.4",
        "WebSocket client and origin of the inspection tests",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Options of `cargo xtask setup`.
#[derive(clap::Args, Default)]
pub struct Options {
    /// Say what is checked even when nothing is missing.
    #[arg(long, short)]
    verbose: bool,
}

/// Installs what is missing.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !std::path::Path::new("/etc/debian_version").exists() {
        let missing: Vec<_> = PACKAGES.iter().map(|(p, _)| *p).collect();
        bail!("not a Debian system: install the equivalents of {} and bpf-linker {BPF_LINKER_VERSION} yourself (docs/development.md)", missing.join(", "));
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .chain(
            COMMANDS
                .iter()
                .filter(|(command, _, _)| !on_path(command))
                .map(|(_, p, _)| *p),
        )
        .collect();
    if !missing.is_empty() {
        if !cmd::is_root() {
            bail!(
                "missing Debian packages {}; run `cargo xtask setup` as root to install them",
                missing.join(" ")
            );
        }
        eprintln!("setup: installing {}", missing.join(" "));
        apt_install(&missing)?;
    } else if opts.verbose {
        eprintln!("setup: all {} Debian packages present", PACKAGES.len());
    }

    python_packages(opts)?;

    let linker = cargo_home().join("bin/bpf-linker");
    let version = Command::new(&linker)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        if opts.verbose {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        }
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let llvm = "/usr/lib/llvm-22";
    let path = format!("{llvm}/bin:{}", std::env::var("PATH").unwrap_or_default());
    cmd::run(
        cmd::cargo(&[
            "install",
            "--quiet",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", llvm)
        .env("RUSTFLAGS", format!("-L {llvm}/lib")),
    )
    .context("cannot build bpf-linker (needs crates.io and llvm-22-dev)")
}

/// Installs [`PYTHON_PACKAGES`] unless every one is there at its version.
fn python_packages(opts: &Options) -> anyhow::Result<()> {
    let pins: Vec<(&str, &str)> = PYTHON_PACKAGES.iter().map(|(n, v, _)| (*n, *v)).collect();
    pip_packages(&cmd::root().join("target/ocsf-python"), &pins, opts.verbose)
}

/// Installs PyPI `packages` (name, exact version) with `pip install --target dir`, unless
/// every one is there at its version.
pub fn pip_packages(dir: &Path, packages: &[(&str, &str)], verbose: bool) -> anyhow::Result<()> {
    let check = packages
        .iter()
        .map(|(name, version)| format!("m.version({name:?}) == {version:?}"))
        .collect::<Vec<_>>()
        .join(" and ");
    let present = Command::new("python3")
        .args([
            "-c",
            &format!("import importlib.metadata as m, sys; sys.exit(0 if {check} else 1)"),
        ])
        .env("PYTHONPATH", dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        if verbose {
            eprintln!("setup: Python packages present in {}", dir.display());
        }
        return Ok(());
    }
    let pins: Vec<String> = packages
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    eprintln!(
        "setup: installing {} into {}",
        pins.join(" "),
        dir.display()
    );
    cmd::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--root-user-action=ignore")
            .args(["--upgrade", "--target"])
            .arg(dir)
            .args(&pins),
    )
    .with_context(|| format!("cannot install {} (needs PyPI)", pins.join(" ")))
}

/// The preamble of every root task (demo, test, the kernel bench): the root check saying why
/// root is needed, set-up (a fresh machine has no eBPF toolchain), then `cargo build BUILD`.
pub fn prepare(needs_root_for: &str, build: &[&str]) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("{needs_root_for}: run it as root");
    }
    run(&Options::default())?;
    cmd::run(&mut cmd::cargo(&[&["build"], build].concat()))
}

/// Installs Debian packages (`apt-get update`, then `install --no-install-recommends`): the one
/// way xtask installs from Debian, for setup and for the benchmarks' peers.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: no route to Debian's mirrors?")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("cannot install {}", packages.join(" ")))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(command).is_file()))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}
