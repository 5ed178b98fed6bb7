//! The `egress-proxy` command line. See `egress-proxy --help` and docs/proxy.md.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use egress_proxy::config::{self, ConfigError};
use tank_ebpf_common::chain;

/// tank's egress proxy: the audited trust boundary for autonomous coding agents.
///
/// The agent host's kernel lets the agent connect only to this proxy. It serves HTTP/1.1
/// CONNECT tunnels and plain http:// requests, allows only what the policy file names,
/// refuses private and cloud-metadata addresses after resolving names itself, and writes
/// one tamper-evident audit record per connection.
///
/// Exit codes: 0 success; 1 `check` found problems, `audit verify` found tampering, or
/// `run` failed while running; 2 usage error, unreadable file, or `run` could not start.
#[derive(Parser)]
#[command(name = "egress-proxy", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM or SIGINT (SIGHUP reloads the policy).
    ///
    /// On SIGHUP the config file is read again; a file that does not validate is rejected
    /// with a log line and the running policy stays. On SIGTERM the listeners close, open
    /// tunnels get `shutdown_grace_secs` to finish, the rest are cut, and the audit log is
    /// synced before exit. Logs go to stderr (RUST_LOG sets the level, default info).
    Run {
        /// The policy file (TOML; see docs/proxy.md for every key).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Once listening, write the bound addresses as JSON to FILE
        /// (`{"listen": [...], "admin": ..., "pid": N}`), for supervisors and tests.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a policy file without running: every problem as FILE:LINE:COL: message.
    ///
    /// Exit 0 when valid, 1 when it has problems, 2 when it cannot be read.
    Check {
        /// The policy file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Work with the chained audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit log's hash chain and anchor.
    ///
    /// Detects edited, deleted, inserted, reordered and cut-off records and a partial last
    /// line (a crash mid-write, reported and never accepted). Exit 0 intact, 1 problems
    /// found, 2 usage or I/O error. Works on the kernel audit log of tank-loader too.
    Verify {
        /// The log (its anchor `FILE.head` is read if present).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print the report as JSON (records, head, anchor, problems) on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn fail(err: &anyhow::Error) {
    let _ = writeln!(std::io::stderr(), "egress-proxy: {err:#}");
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config: path,
            ready_file,
            log_format,
        } => {
            init_logging(log_format);
            let config = match config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    fail(&e.into());
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    fail(&anyhow::Error::from(e).context("cannot start the runtime"));
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(egress_proxy::server::run(path, config, ready_file)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    fail(&e);
                    ExitCode::from(2)
                }
            }
        }
        Command::Check { file } => match config::load(&file) {
            Ok(c) => {
                out(&format!(
                    "{}: ok ({} allowed, {} denied rules, {} hosts entries, {} listeners)\n",
                    file.display(),
                    c.policy.allowed.len(),
                    c.policy.denied.len(),
                    c.policy.hosts.len(),
                    c.listen.len()
                ));
                ExitCode::SUCCESS
            }
            Err(e @ ConfigError::Invalid { .. }) => {
                let _ = writeln!(std::io::stderr(), "{e}");
                ExitCode::from(1)
            }
            Err(e) => {
                fail(&e.into());
                ExitCode::from(2)
            }
        },
        Command::Audit {
            command: AuditCommand::Verify { file, json },
        } => {
            let report = match chain::verify(&file) {
                Ok(r) => r,
                Err(e) => {
                    fail(
                        &anyhow::Error::from(e)
                            .context(format!("cannot read audit log `{}`", file.display())),
                    );
                    return ExitCode::from(2);
                }
            };
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                ));
            } else if report.is_intact() {
                let anchor = match &report.anchor {
                    Some(a) => format!("anchored at seq {}", a.seq),
                    None => "no anchor file".to_owned(),
                };
                out(&format!(
                    "{}: intact: {} records, last seq {} ({anchor})\n",
                    file.display(),
                    report.records,
                    report.head.seq
                ));
            } else {
                let mut text = String::new();
                for p in &report.problems {
                    text.push_str(&format!("{}: {p}\n", file.display()));
                }
                text.push_str(&format!(
                    "{}: NOT intact: {} problem(s) in {} records\n",
                    file.display(),
                    report.problems.len(),
                    report.records
                ));
                out(&text);
            }
            if report.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
