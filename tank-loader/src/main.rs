//! `tank-loader`: puts tank's kernel egress gate on an agent's cgroup and keeps its audit log.
//!
//! The binary is thin: each subcommand lives in its own module of the library. Errors reach the
//! user as one line, `tank-loader: <what failed>: <why>`, and exit codes are documented in `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tank_ebpf_common::chain;

use tank_ebpf_common::ocsf::kernel::LifecycleRecord;
use tank_ebpf_common::ocsf::{lifecycle, LogName};
use tank_loader::cli::{AuditCommand, Command, PolicyCommand};
use tank_loader::config::Config;
use tank_loader::{crosscheck, gate, metrics, nft, report, run, status, trace};

fn main() -> ExitCode {
    let cli = tank_loader::cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: under systemd stderr is the journal, where escape codes
        // would garble every line (`journalctl -o cat` shows them raw).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
                if cfg.endpoints.is_empty() {
                    "; no endpoint: the agent is denied everything"
                } else {
                    ""
                }
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
            Ok(if status.enforcing {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Trace {
            config,
            json,
            denied,
            pid,
            comm,
            history,
            no_follow,
        } => {
            let cfg = Config::load(&config)?;
            let filter = trace::Filter { denied, pid, comm };
            let summary = trace::follow(
                &cfg.audit_log,
                &filter,
                trace::Options {
                    json,
                    history,
                    no_follow,
                },
                &mut out,
                &mut std::io::stderr(),
            )?;
            Ok(if summary.unreadable == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Detach { config } => detach(&config, &mut out),
        Command::WatchLayers { config } => {
            metrics::watch_layers(&Config::load(&config)?, metrics::LAYER_CHECK_INTERVAL)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { files, json, store },
        } => match store.store() {
            Some(Ok((store, filter))) => {
                Ok(ExitCode::from(tank_loader::clickhouse::verify_command(
                    &store,
                    &filter,
                    json,
                    &mut out,
                    &mut std::io::stderr(),
                )?))
            }
            Some(Err(e)) => {
                eprintln!("tank-loader: --table: {e}");
                Ok(ExitCode::from(2))
            }
            None => verify(&files, json, &mut out),
        },
        Command::Audit {
            command:
                AuditCommand::CrossCheck {
                    kernel_logs,
                    proxy_logs,
                    client,
                    window_ms,
                    nat,
                    late_ms,
                    max_listed,
                    json,
                    html,
                    store,
                    ..
                },
        } => cross_check(
            &kernel_logs,
            &proxy_logs,
            &store,
            &crosscheck::Options {
                window_ms,
                late_ms,
                nat,
                clients: client,
                max_listed,
            },
            json,
            html.as_deref(),
            &mut out,
        ),
        Command::Audit {
            command:
                AuditCommand::Backfill {
                    files,
                    clickhouse,
                    table,
                    host,
                    log,
                    name,
                    json,
                },
        } => {
            let store = match tank_loader::clickhouse::Store::new(clickhouse, &table) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tank-loader: --table: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let target = tank_loader::backfill::Target { host, log, name };
            let code = tank_loader::backfill::command(
                &store,
                &target,
                &files,
                json,
                &mut out,
                &mut std::io::stderr(),
            )?;
            Ok(ExitCode::from(code))
        }
        Command::Policy {
            command:
                PolicyCommand::Suggest {
                    logs,
                    since,
                    until,
                    cgroup,
                },
        } => {
            let opts = tank_loader::suggest::Options {
                logs,
                since,
                until,
                cgroup,
            };
            // As `egress-proxy policy suggest`, and as `audit verify` for a log it cannot
            // read: 2.
            match tank_loader::suggest::suggest(&opts) {
                Ok(text) => {
                    write!(out, "{text}")?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("tank-loader: {e:#}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::GenerateManual { out_dir } => {
            tank_ebpf_common::manual::generate(tank_loader::cli::command(), &out_dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn detach(config: &Path, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    // The running loader holds the log; detaching under it would leave it draining a gate that
    // is gone, and two writers would fork the chain.
    let (mut log, _) = chain::ChainWriter::open_with(&cfg.audit_log, cfg.audit.clone())
        .context("stop tank-loader first (systemctl stop tank-loader), then detach")?;
    let removed = gate::detach(&cfg.pin_dir)?;
    let nft_removed = nft::remove(&cfg.nft.table)?;
    let hostname = nix::unistd::gethostname()?;
    log.append(&LifecycleRecord::new(
        &hostname.to_string_lossy(),
        env!("CARGO_PKG_VERSION"),
        lifecycle::REMOVE,
        format!("enforcement removed from cgroup {}", cfg.cgroup.display()),
        serde_json::json!({ "cgroup": cfg.cgroup, "pins_removed": removed, "nft_table_removed": nft_removed.then_some(&cfg.nft.table), "by_uid": nix::unistd::getuid().as_raw() }),
    ))?;
    log.sync()?;
    tracing::warn!(cgroup = %cfg.cgroup.display(), pins = removed.len(), "enforcement removed: the agent cgroup is no longer guarded by tank");
    writeln!(
        out,
        "detached: removed {} pins under {}",
        removed.len(),
        cfg.pin_dir.display()
    )?;
    if nft_removed {
        writeln!(
            out,
            "detached: removed nftables table inet {}",
            cfg.nft.table
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(files: &[PathBuf], json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let code = chain::verify_command("tank-loader", files, json, out, &mut std::io::stderr())?;
    Ok(ExitCode::from(code))
}

fn cross_check(
    kernel: &[Vec<PathBuf>],
    proxy: &[Vec<PathBuf>],
    store: &tank_loader::cli::StoreArgs,
    opts: &crosscheck::Options,
    json: bool,
    html: Option<&Path>,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    // An input that cannot be read is a usage problem (exit 2), not a finding about the logs.
    let cannot_read = |what: &str, e: std::io::Error| {
        eprintln!("tank-loader: cannot read {what}: {e}");
        Ok(ExitCode::from(2))
    };
    let mut sources = Vec::new();
    for (kind, logs) in [(LogName::Kernel, kernel), (LogName::Proxy, proxy)] {
        for paths in logs {
            match crosscheck::Source::files(kind, paths) {
                Ok(s) => sources.push(s),
                Err(e) => return cannot_read(&paths[0].display().to_string(), e),
            }
        }
    }
    match store.store() {
        Some(Ok((store, filter))) => match store.sources(&filter) {
            Ok(s) => sources.extend(s),
            Err(e) => {
                eprintln!("tank-loader: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        Some(Err(e)) => {
            eprintln!("tank-loader: --table: {e}");
            return Ok(ExitCode::from(2));
        }
        None => {}
    }
    let report = match crosscheck::check(sources, opts) {
        Ok(r) => r,
        Err(e) => return cannot_read("an audit log", e),
    };
    if let Some(file) = html {
        std::fs::write(file, report::html(&report))
            .with_context(|| format!("cannot write the HTML report to {}", file.display()))?;
    }
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", crosscheck::render(&report))?;
    }
    Ok(ExitCode::from(match report.verdict {
        crosscheck::Verdict::Consistent => 0,
        crosscheck::Verdict::Discrepancies => 1,
        crosscheck::Verdict::Tampered => 3,
    }))
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
