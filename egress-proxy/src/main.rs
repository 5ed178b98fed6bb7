//! The `egress-proxy` command line. See `egress-proxy --help` and docs/proxy.md.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use egress_proxy::cli::{AuditCommand, CaCommand, Cli, Command, LogFormat};
use egress_proxy::config::{self, ConfigError};
use tank_ebpf_common::chain;

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
                for w in &c.warnings {
                    let _ = writeln!(std::io::stderr(), "{w}");
                }
                out(&format!(
                    "{}: ok ({} allowed, {} denied rules, {} hosts entries, {} listeners, {} warnings)\n",
                    file.display(),
                    c.policy.allowed.len(),
                    c.policy.denied.len(),
                    c.policy.hosts.len(),
                    c.listen.len(),
                    c.warnings.len()
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
        Command::Ca {
            command: CaCommand::Init { dir, domains },
        } => match egress_proxy::ca::init(&dir, &domains) {
            Ok((cert, key)) => {
                out(&format!(
                    "made a CA for {}:\n  certificate (for agent hosts): {}\n  key (stays here, mode 0600): {}\n",
                    domains.join(", "),
                    cert.display(),
                    key.display()
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                fail(&e.into());
                ExitCode::from(2)
            }
        },
        Command::Audit {
            command: AuditCommand::Verify { files, json },
        } => {
            let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
            match chain::verify_command("egress-proxy", &files, json, &mut stdout, &mut stderr) {
                Ok(code) => ExitCode::from(code),
                // stdout closed (`| head`): the status still says what was found.
                Err(_) => ExitCode::from(2),
            }
        }
        Command::GenerateManual { out_dir } => {
            match tank_ebpf_common::manual::generate(egress_proxy::cli::command(), &out_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    fail(&e.into());
                    ExitCode::from(2)
                }
            }
        }
    }
}
