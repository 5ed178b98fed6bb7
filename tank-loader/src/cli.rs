//! The command line of `tank-loader`, in the library so that `cargo xtask man` can render man
//! pages and shell completions from the same definitions as `--help` (the binary only parses).

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tank_ebpf_common::chain;
use tank_ebpf_common::ocsf::LogName;

use crate::{clickhouse, config, crosscheck};

/// The clap definition of the whole `tank-loader` command line, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses the command line (exits on a usage error, as clap does). `audit cross-check` gets
/// its logs grouped by occurrence: `--kernel A B --kernel C` is two logs, A+B and C.
pub fn parse() -> Cli {
    let matches = command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Audit {
        command:
            AuditCommand::CrossCheck {
                kernel_logs,
                proxy_logs,
                ..
            },
    } = &mut cli.command
    {
        let sub = matches
            .subcommand_matches("audit")
            .and_then(|m| m.subcommand_matches("cross-check"))
            .expect("the cross-check's matches");
        let groups = |id: &str| -> Vec<Vec<PathBuf>> {
            sub.get_occurrences::<PathBuf>(id)
                .map(|o| o.map(|g| g.cloned().collect()).collect())
                .unwrap_or_default()
        };
        (*kernel_logs, *proxy_logs) = (groups("kernel"), groups("proxy"));
    }
    cli
}

/// Kernel-enforced egress containment for an AI agent's cgroup.
///
/// tank-loader attaches eBPF programs to the agent's cgroup so that its processes can connect
/// only to the egress proxy and to endpoints you list; everything else fails with EPERM. Every
/// attempt, allowed or denied, is written to a hash-chained audit log. Enforcement is pinned in
/// bpffs: it stays in force when the loader exits or crashes, until `tank-loader detach`.
///
/// Exit codes: 0 success; 1 failure, an invalid config, (audit verify) a log that does not
/// verify, (status) enforcement not fully in place, (trace --no-follow) unreadable records,
/// (audit cross-check) discrepancies between the logs, or (audit backfill) records in the store
/// that differ from the files; 2 usage error or (audit verify, audit cross-check, audit
/// backfill) an input that cannot be read, or (audit backfill) a log that does not verify; 3
/// (audit cross-check) a log that does not verify.
#[derive(Parser)]
#[command(name = "tank-loader", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// shows exactly what was recorded: every attempt, established connection and lifecycle
    /// record. A line that is not a record of the kernel log is reported on stderr, never
    /// skipped. Ctrl-C stops it.
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
        /// Exit at the end of the log instead of waiting for new records; exit 1 if a line
        /// could not be read.
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
    /// Internal: the layer helper `run` starts when metrics are on (keeps only CAP_NET_ADMIN,
    /// writes one JSON reading of the layers per line until its stdout closes).
    #[command(hide = true)]
    WatchLayers {
        /// Configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Audit-log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Learn the loader's policy from what the kernel logs show.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Internal: writes man pages and shell completions under OUT_DIR (`cargo xtask man`).
    #[command(hide = true)]
    GenerateManual {
        /// Output directory (`man/`, `completions/` below it).
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Print a config whose `[[allow]]` entries are the endpoints the agent reached directly
    /// in audit mode (resolvers, internal services), with counts, for review.
    ///
    /// From kernel logs written in audit mode: every connect or send that reached an endpoint
    /// nothing listed (`audit_not_listed`) or a listed one, by destination and protocol, with
    /// the processes, counts and first/last seen in its `comment`; the proxies are the
    /// destinations judged `proxy`. Refused attempts, raw and ping sockets are never
    /// suggested (they are listed as comments). Logs that do not verify are refused. The
    /// output (mode `enforce`) passes `tank-loader check`. Exit 0 printed, 2 a log cannot be
    /// read or does not verify (as `egress-proxy policy suggest`).
    Suggest {
        /// Kernel audit logs.
        #[arg(value_name = "KERNEL_LOG", required = true)]
        logs: Vec<PathBuf>,
        /// Only records from this time on (2026-12-01T10:00:00Z, or ms since the epoch).
        #[arg(long, value_name = "TIME", value_parser = tank_ebpf_common::ocsf::parse_time)]
        since: Option<i64>,
        /// Only records up to this time.
        #[arg(long, value_name = "TIME", value_parser = tank_ebpf_common::ocsf::parse_time)]
        until: Option<i64>,
        /// The agent cgroup to write in the suggestion.
        #[arg(long, value_name = "PATH", default_value = "/tank/agent")]
        cgroup: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify a hash-chained audit log (the kernel log or egress-proxy's), across all its
    /// segments.
    ///
    /// Detects edited, deleted, inserted, reordered and cut-off records, a partial last line
    /// (a crash mid-write, reported and never accepted), and a missing, reordered, truncated
    /// or replaced segment; lists spans opened and never closed (proxy tunnels whose proxy
    /// died). Prints the same report as `egress-proxy audit verify`.
    ///
    /// With --clickhouse, verifies every chain in the log store instead (one per host and
    /// log, read back in chain order), with the same report per chain: a record deleted,
    /// edited or missing in the store is found, for the host it belongs to.
    #[command(after_help = chain::VERIFY_EXIT_CODES)]
    Verify {
        /// The log file (its rotated segments beside it are read too), a directory holding one
        /// log's segments, or several segment files.
        #[arg(required_unless_present = "clickhouse", conflicts_with = "clickhouse")]
        files: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Read the records from a log store.
        #[command(flatten)]
        store: Box<StoreArgs>,
    },
    /// Match a fleet's proxy logs against its kernel logs: every proxied connection must be in
    /// both, in the kernel log of the host it came from.
    ///
    /// Verifies every chain, then pairs each proxy record with the kernel's `established`
    /// record of the same TCP connection: the kernel's local address and port must be the
    /// client the proxy saw, the kernel's destination the proxy address the client reached, and
    /// the kernel's time within --window-ms of the proxy's start_time. Each host is named by
    /// its kernel log's start record, and owns the client addresses its own established
    /// connections show. Per host: proxy records from its addresses with no kernel record
    /// (traffic that did not come from the agent's cgroup, or a lost kernel record), kernel
    /// connections with no proxy record (the proxy log lost or dropped it), established records
    /// whose connect attempt is missing, and denied attempts by destination and process. A
    /// proxy record from an address no kernel log shows is unattributed, a finding of its own.
    /// The logs are read once, merged by time, holding only the window in memory. Copy every
    /// log with its `.head` anchor.
    ///
    /// Exit codes: 0 consistent (every chain intact, everything matched); 1 discrepancies
    /// (chains intact, something unmatched, unattributed or unreadable); 3 tampered (a chain
    /// failed verification; matching still runs on what the damaged log holds); 2 usage error
    /// or an input that cannot be read.
    CrossCheck {
        /// One agent host's kernel audit log (tank-loader's): the log file (its rotated
        /// segments beside it are read too), a directory of its segments, or several segments
        /// of it. Repeat --kernel for each host.
        #[arg(long, value_name = "FILE", num_args = 1.., required_unless_present = "clickhouse")]
        kernel: Vec<PathBuf>,
        /// The --kernel logs, one per occurrence (filled by [`parse`]).
        #[arg(skip)]
        kernel_logs: Vec<Vec<PathBuf>>,
        /// One proxy host's audit log (egress-proxy's), as for --kernel. Repeat for each proxy.
        #[arg(long, value_name = "FILE", num_args = 1.., required_unless_present = "clickhouse")]
        proxy: Vec<PathBuf>,
        /// The --proxy logs, one per occurrence (filled by [`parse`]).
        #[arg(skip)]
        proxy_logs: Vec<Vec<PathBuf>>,
        /// Only the hosts with this client address (as their kernel log or the proxy shows
        /// it), and only the connections from it. Repeat for several.
        #[arg(long, value_name = "ADDR")]
        client: Vec<std::net::IpAddr>,
        /// Greatest time between a kernel connection and its proxy record, in milliseconds.
        ///
        /// The kernel stamps the end of the handshake on the agent host, the proxy its accept
        /// on the proxy host; the window absorbs the clock difference between the two hosts and
        /// the delay in between. Keep the hosts' clocks synchronised (NTP) and the window small:
        /// a wide one lets a reused client port match the wrong connection.
        #[arg(long, value_name = "MS", default_value_t = crosscheck::DEFAULT_WINDOW_MS)]
        window_ms: u64,
        /// An address the proxy sees instead of one in the kernel log: KERNEL_ADDR=PROXY_SEEN_ADDR.
        ///
        /// Only when address translation sits between the hosts (for example the agent host's
        /// private address leaves through a NAT gateway as a public one). Applies to kernel-side
        /// source and destination addresses before comparing. Repeat for several addresses.
        /// Ports are always compared exactly: NAT that rewrites ports is not supported.
        #[arg(long, value_name = "KERNEL_ADDR=PROXY_SEEN_ADDR")]
        nat: Vec<crosscheck::Nat>,
        /// How far behind the newest record read a record may still appear in its own log, ms.
        ///
        /// A proxy writes a refused or failed connection's one record when it ends, stamped
        /// with its accept; the loader drains the kernel's records a little after they happen.
        /// A connection is held this long past the window before it is reported unmatched, and
        /// memory holds that much time of the fleet's connections.
        #[arg(long, value_name = "MS", default_value_t = crosscheck::DEFAULT_LATE_MS)]
        late_ms: u64,
        /// Items listed per list of findings (every item is counted).
        #[arg(long, value_name = "N", default_value_t = crosscheck::DEFAULT_MAX_LISTED)]
        max_listed: usize,
        /// Machine-readable output: the whole report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also write the report as one self-contained HTML page to FILE, for an auditor.
        ///
        /// Verdict first, then the findings, then pictures: attempts and connections over time
        /// per host, refusals by process and destination, proxy records by rule, and each log's
        /// chain with its head. No script and nothing fetched from the network; lists are cut
        /// at 100 rows and a fleet's hosts drawn in full at 12 (those with findings first), so
        /// a week of a fleet's records opens quickly.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Read every chain in a log store too (each host's kernel and proxy logs, as shipped);
        /// with --kernel/--proxy, files and store are checked together.
        #[command(flatten)]
        store: Box<StoreArgs>,
    },
    /// Put into the log store every record of this host's log that the store lacks (a segment
    /// its shipper missed), from the host's files.
    ///
    /// Reads the log as `audit verify` does (its rotated segments, compressed or not, then the
    /// active file) and verifies it whole against its anchor: a log that does not verify is
    /// refused and nothing is inserted (run `audit verify` on it). Then asks the store which
    /// records of the chain --host/--log/--name it holds in the log's range, and inserts
    /// exactly the missing lines, unchanged, in chain order, as the rows the shipper sends
    /// (host, log, name, line). Idempotent: a second run inserts nothing. A record the store
    /// holds with a different line is left as it is and reported (exit 1): that is for the
    /// auditor. Run it on the host (or on a copy of its log with the `.head` anchor), when
    /// `audit verify --clickhouse` reports records missing (`seq_gap`) for that host.
    ///
    /// Exit codes: 0 the store holds every record of the files (inserted or already there); 1
    /// it also holds records that differ from the files (listed, left alone); 2 a usage error,
    /// a log that cannot be read or does not verify, or a store that cannot be read or refused
    /// an insert (what was inserted before is a verified part; run it again).
    Backfill {
        /// The host's log file (its rotated segments beside it are read too), a directory
        /// holding one log's segments, or several segment files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The store's HTTP interface: http://[USER[:PASSWORD]@]HOST:PORT (a user that may
        /// SELECT and INSERT the table).
        #[arg(long, value_name = "URL")]
        clickhouse: clickhouse::Url,
        /// The table holding the records (DATABASE.TABLE).
        #[arg(long, value_name = "TABLE", default_value = clickhouse::DEFAULT_TABLE)]
        table: String,
        /// The host's name in the store: the shipper's host("...") for this log.
        #[arg(long, value_name = "HOST")]
        host: String,
        /// Which log this is, `kernel` or `proxy`: the shipper's log("..."); every record must
        /// say so.
        #[arg(long, value_name = "LOG", value_parser = parse_log_name)]
        log: LogName,
        /// The shipper's name("...") of the log, if it sets one.
        #[arg(long, value_name = "NAME", default_value = "")]
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `kernel` or `proxy`, as the shipper's `log` column and records' `metadata.log_name` say.
fn parse_log_name(s: &str) -> Result<LogName, String> {
    match s {
        "kernel" => Ok(LogName::Kernel),
        "proxy" => Ok(LogName::Proxy),
        _ => Err("expected `kernel` (tank-loader's log) or `proxy` (egress-proxy's)".to_owned()),
    }
}

/// Where `audit verify` and `audit cross-check` read a fleet's records from a ClickHouse log
/// store (image/fleet/clickhouse.sql), and which of them.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// Read the records from ClickHouse's HTTP interface: http://[USER[:PASSWORD]@]HOST:PORT.
    ///
    /// Every chain (one host's kernel or proxy log, as its shipper labelled it) is read back in
    /// chain order and checked exactly as its files would be. Plain HTTP: reach a remote store
    /// through a tunnel. A password in the URL is visible to other users in the process list;
    /// prefer a read-only user with no password on a loopback tunnel.
    #[arg(long, value_name = "URL")]
    pub clickhouse: Option<clickhouse::Url>,
    /// The table holding the records (DATABASE.TABLE).
    #[arg(long, value_name = "TABLE", default_value = clickhouse::DEFAULT_TABLE, requires = "clickhouse")]
    pub table: String,
    /// Only the chains this host shipped (the shipper's host name); repeat for several. A host
    /// named here with no records in the store is a finding.
    #[arg(long = "host", value_name = "HOST", requires = "clickhouse")]
    pub hosts: Vec<String>,
    /// Only records from this time on (2026-12-01T10:00:00Z, or ms since the epoch).
    ///
    /// Each chain is read from its first record in the range to its last: every record in
    /// between is checked, what comes before is not (the report names the seq range).
    #[arg(long, value_name = "TIME", value_parser = tank_ebpf_common::ocsf::parse_time, requires = "clickhouse")]
    pub since: Option<i64>,
    /// Only records up to this time.
    #[arg(long, value_name = "TIME", value_parser = tank_ebpf_common::ocsf::parse_time, requires = "clickhouse")]
    pub until: Option<i64>,
}

impl StoreArgs {
    /// The store and the filter, when --clickhouse is given.
    pub fn store(&self) -> Option<Result<(clickhouse::Store, clickhouse::Filter), String>> {
        let url = self.clickhouse.clone()?;
        Some(clickhouse::Store::new(url, &self.table).map(|store| {
            let filter = clickhouse::Filter {
                hosts: self.hosts.clone(),
                since: self.since,
                until: self.until,
            };
            (store, filter)
        }))
    }
}
