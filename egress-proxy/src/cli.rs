//! The command line of `egress-proxy`, in the library so that `cargo xtask man` renders man
//! pages and shell completions from the same definitions as `--help` (the binary only parses).

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tank_ebpf_common::chain;

/// The clap definition of the whole `egress-proxy` command line, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

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
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
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
    /// Make and manage the CA of inspected tunnels (`inspect = true` rules).
    Ca {
        /// The CA subcommand.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Work with the chained audit log.
    Audit {
        /// The audit subcommand.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Internal: writes man pages and shell completions under OUT_DIR (`cargo xtask man`).
    #[command(hide = true)]
    GenerateManual {
        /// Output directory (`man/`, `completions/` below it).
        out_dir: PathBuf,
    },
}

/// The `audit` subcommands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify a hash-chained audit log (the proxy's or tank-loader's kernel log), across all
    /// its segments.
    ///
    /// Detects edited, deleted, inserted, reordered and cut-off records, a partial last line
    /// (a crash mid-write, reported and never accepted), and a missing, reordered, truncated
    /// or replaced segment. Lists tunnels opened and never closed (the proxy died while they
    /// were open). Prints the same report as `tank-loader audit verify`.
    #[command(after_help = chain::VERIFY_EXIT_CODES)]
    Verify {
        /// The log (its rotated segments beside it and its anchor `FILE.head` are read too), a
        /// directory holding one log's segments, or several segment files.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Print the report as JSON (records, head, anchor, problems) on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// The `ca` subcommands.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Make a new inspection CA in DIR: `ca.pem` (give it to agent hosts) and `ca.key`
    /// (mode 0600, for the user running this: run it as the proxy's user).
    ///
    /// The CA is name-constrained to the domains given (each with its subdomains) and can
    /// never vouch for an IP address: clients that honour name constraints (rustls, OpenSSL,
    /// Go, GnuTLS, NSS) reject anything else it signs, so a stolen key cannot impersonate
    /// other hosts. `check` reports an `inspect` rule the CA does not cover. Existing files
    /// are never overwritten. Exit 0 made, 2 error.
    Init {
        /// The directory to create the CA in.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// A domain the CA may mint certificates for (with its subdomains); repeatable.
        /// List the domains of your `inspect = true` rules.
        #[arg(long = "domain", value_name = "NAME", required = true)]
        domains: Vec<String>,
    },
}

/// How `run` writes its log lines.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}
