//! `tank-loader`: puts tank's kernel egress gate on an agent's cgroup and keeps its audit log.
//!
//! The binary is thin: each subcommand lives in its own module of the library. Errors reach the
//! user as one line, `tank-loader: <what failed>: <why>`, and exit codes are documented in `--help`.


use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tank_ebpf_common::chain;

use tank_loader::config::{self, Config};
use tank_loader::{gate, record, run, status, trace};

/// Kernel-enforced egress containment for an AI agent's cgroup.
///
/// tank-loader attaches eBPF programs to the agent's cgroup so that its processes can connect
/// only to the egress proxy and to endpoints you list; everything else fails with EPERM. Every
/// attempt, allowed or denied, is written to a hash-chained audit log. Enforcement is pinned in
/// bpffs: it stays in force when the loader exits or crashes, until `tank-loader detach`.
///
/// Exit codes: 0 success; 1 failure, an invalid config, a log that does not verify, or (status)
/// enforcement not fully in place; 2 usage error.
#[derive(Parser)]
#[command(name = "tank-loader", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put enforcement in place and drain events into the audit log (the systemd service).
    ///
    /// Creates the agent cgroup if needed, loads and attaches the gate (or re-adopts what a
    /// previous run pinned, without a moment unguarded), tells systemd it is ready, drops all
    /// capabilities and writes every attempt to the audit log until SIGTERM.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file; errors name FILE:LINE:COL.
    Check {
        /// Configuration file to validate.
        file: PathBuf,
    },
    /// Show what the kernel enforces now: hooks, cgroup, mode, counters, pins.
    Status {
        /// Configuration file (for the cgroup, pin directory and log).
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Live view of connection attempts, as they reach the audit log.
    ///
    /// Follows the audit log (never the ring buffer, which has one reader: the loader), so it
    /// shows exactly what was recorded. Ctrl-C stops it.
    Trace {
        /// Configuration file (for the audit log path).
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// One JSON record per line, as in the log.
        #[arg(long)]
        json: bool,
        /// Only denied attempts.
        #[arg(long)]
        denied: bool,
        /// Only attempts by this process id.
        #[arg(long)]
        pid: Option<u32>,
        /// Only attempts by processes with this name (comm, up to 15 characters).
        #[arg(long)]
        comm: Option<String>,
        /// Start from the beginning of the log instead of its end.
        #[arg(long)]
        history: bool,
        /// Exit at the end of the log instead of waiting for new records.
        #[arg(long)]
        no_follow: bool,
    },
    /// Remove enforcement: unpin the gate's links and maps. The one way to end it.
    ///
    /// Refuses while the loader runs (stop the service first). Appends a record of the removal
    /// to the audit log and logs it.
    Detach {
        /// Configuration file (for the pin directory and log).
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Audit-log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify a hash-chained audit log (kernel or proxy): edits, deletions, reordering,
    /// truncation and partial records are reported; exit 1 if any is found.
    Verify {
        /// The log file.
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TANK_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tank-loader: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Run { config } => run::run(&config).map(|()| ExitCode::SUCCESS),
        Command::Check { file } => {
            let cfg = Config::load(&file)?;
            let proxies = cfg.endpoints.iter().filter(|e| e.is_proxy).count();
            writeln!(
                out,
                "{}: ok (mode {:?}, cgroup {}, {proxies} proxies, {} other endpoints{})",
                file.display(),
                cfg.mode,
                cfg.cgroup.display(),
                cfg.endpoints.len() - proxies,
                if cfg.endpoints.is_empty() { "; no endpoint: the agent is denied everything" } else { "" }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, json } => {
            let status = status::collect(&Config::load(&config)?);
            if json {
                serde_json::to_writer_pretty(&mut out, &status)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", status::render(&status))?;
            }
            Ok(if status.enforcing { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Trace { config, json, denied, pid, comm, history, no_follow } => {
            let cfg = Config::load(&config)?;
            let filter = trace::Filter { denied, pid, comm };
            trace::follow(&cfg.audit_log, &filter, trace::Options { json, history, no_follow }, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { config } => detach(&config, &mut out),
        Command::Audit { command: AuditCommand::Verify { file, json } } => verify(&file, json, &mut out),
    }
}

fn detach(config: &Path, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    // The running loader holds the log; detaching under it would leave it draining a gate that
    // is gone, and two writers would fork the chain.
    let (mut log, _) = chain::ChainWriter::open(&cfg.audit_log)
        .context("stop tank-loader first (systemctl stop tank-loader), then detach")?;
    let removed = gate::detach(&cfg.pin_dir)?;
    let origin = record::Origin { hostname: nix::unistd::gethostname()?.to_string_lossy().into_owned() };
    log.append(&origin.lifecycle_record(
        record::ACTIVITY_REMOVE,
        format!("enforcement removed from cgroup {}", cfg.cgroup.display()),
        serde_json::json!({ "cgroup": cfg.cgroup, "pins_removed": removed, "by_uid": nix::unistd::getuid().as_raw() }),
    ))?;
    log.sync()?;
    tracing::warn!(cgroup = %cfg.cgroup.display(), pins = removed.len(), "enforcement removed: the agent cgroup is no longer guarded by tank");
    writeln!(out, "detached: removed {} pins under {}", removed.len(), cfg.pin_dir.display())?;
    Ok(ExitCode::SUCCESS)
}

fn verify(file: &Path, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let report = chain::verify(file).with_context(|| format!("cannot read {}", file.display()))?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else if report.is_intact() {
        writeln!(out, "{}: intact, {} records, last seq {}{}", file.display(), report.records, report.head.seq,
            if report.anchor.is_some() { ", matches its anchor" } else { " (no anchor file)" })?;
    } else {
        writeln!(out, "{}: {} problem(s) in {} records", file.display(), report.problems.len(), report.records)?;
        for p in &report.problems {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(if report.is_intact() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}
