//! `tank-loader audit cross-check`: holds a fleet's kernel logs and proxy logs against each other.
//!
//! Each log alone proves only that it was not edited. Together they prove more: every
//! connection a proxy served must appear in the kernel log of the agent host it came from, as
//! an established connection of the agent's cgroup with the same 4-tuple, and every such kernel
//! connection must appear in a proxy log. A connection missing on one side is traffic that did
//! not come from an agent, or a record that was lost or removed with its chain rebuilt. The
//! logs come from hosts that do not trust each other, so none is taken as the truth; the report
//! lists, per host, what each side lacks, and the proxy records no host accounts for.
//!
//! The logs arrive as [`Source`]s (one per kernel or proxy log, from files or a log store) and
//! are read once, merged by time ([`stream`]): each chain is verified as its lines go by and
//! only the records still inside the matching window are held, so memory is bounded by the
//! window, never by the logs' size. [`check`] gives a [`Fleet`], [`render`] the human report;
//! reading inputs and exit codes stay in the binary. docs/audit-format.md ("Cross-check")
//! documents the matching rules and every field of the report.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use tank_ebpf_common::chain::{self, Problem, Report};
use tank_ebpf_common::ocsf::Action;

use crate::activity::Activity;

mod record;
mod source;
mod stream;
#[cfg(test)]
mod tests;

pub use source::Source;
pub use stream::check;

/// Default greatest distance in time between a kernel record and its proxy record, ms.
pub const DEFAULT_WINDOW_MS: u64 = 5000;
/// Default greatest lateness of a record in its own log, ms (see [`Options::late_ms`]).
pub const DEFAULT_LATE_MS: u64 = 60_000;
/// Default number of items listed per list of findings (all are counted).
pub const DEFAULT_MAX_LISTED: usize = 100;

/// A static address translation between an agent host and the proxy hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Nat {
    /// The address as the kernel log shows it.
    pub kernel: IpAddr,
    /// The address the proxy saw instead.
    pub proxy: IpAddr,
}

impl std::str::FromStr for Nat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kernel, proxy) = s
            .split_once('=')
            .ok_or("expected KERNEL_ADDR=PROXY_SEEN_ADDR")?;
        let ip = |a: &str| {
            a.trim()
                .parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|e| format!("`{a}`: {e} (an address, no port)"))
        };
        Ok(Self {
            kernel: ip(kernel)?,
            proxy: ip(proxy)?,
        })
    }
}

/// How to match.
#[derive(Clone, Debug)]
pub struct Options {
    /// Greatest |kernel time - proxy start_time| of a match, ms: the delay between the hosts
    /// plus the difference of their clocks.
    pub window_ms: u64,
    /// How far behind the newest record read a record may still appear in its own log, ms:
    /// a proxy writes a refused or failed connection's one record when it ends, stamped with
    /// its accept. A record is let go (and, unmatched, reported) once the merged logs are
    /// `window_ms + late_ms` past it; memory holds that much time of records.
    pub late_ms: u64,
    /// Kernel-side addresses to translate before comparing.
    pub nat: Vec<Nat>,
    /// Only these client addresses (kernel-side or as the proxy saw them); empty: all.
    pub clients: Vec<IpAddr>,
    /// Items listed per list of findings; every item is counted.
    pub max_listed: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            window_ms: DEFAULT_WINDOW_MS,
            late_ms: DEFAULT_LATE_MS,
            nat: Vec::new(),
            clients: Vec::new(),
            max_listed: DEFAULT_MAX_LISTED,
        }
    }
}

/// The outcome, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Fleet {
    /// The conclusion over every host and proxy log reported.
    pub verdict: Verdict,
    /// The window used, ms.
    pub window_ms: u64,
    /// The lateness allowed, ms.
    pub late_ms: u64,
    /// The translations used.
    pub nat: Vec<Nat>,
    /// `--client` addresses (empty: every host).
    pub clients: Vec<IpAddr>,
    /// Totals over the hosts and proxy logs reported.
    pub summary: Summary,
    /// One entry per kernel log (agent host), in the order given.
    pub hosts: Vec<HostCheck>,
    /// One entry per proxy log, in the order given.
    pub proxies: Vec<ProxyCheck>,
    /// Proxy records from a client address no kernel log shows (or several do).
    pub unattributed: Listed<Unattributed>,
    /// Kernel logs left out by `--client` (none of their addresses was asked for).
    pub left_out: Vec<String>,
    /// The most records held in the matching window at once (memory is bounded by it).
    pub peak_window: u64,
    /// Every log over time per host, and proxy records by rule (bounded, for the pictures).
    pub activity: Activity,
}

/// Totals over the fleet.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Agent hosts reported.
    pub hosts: u64,
    /// Of them, with a discrepancy or a broken chain.
    pub hosts_with_findings: u64,
    /// Proxy logs.
    pub proxies: u64,
    /// Logs (kernel and proxy) whose chain failed verification.
    pub tampered_logs: u64,
    /// Proxy records matched to a kernel connection (one to one).
    pub matched: u64,
    /// Network records in the proxy logs (within `--client`).
    pub proxy_records: u64,
    /// Established TCP connections to a proxy in the kernel logs (within `--client`).
    pub kernel_proxy_connections: u64,
    /// Proxy records of a host's address with no kernel connection.
    pub proxy_unmatched: u64,
    /// Kernel connections to a proxy with no proxy record.
    pub kernel_unmatched: u64,
    /// Established records with no connect attempt.
    pub established_without_attempt: u64,
    /// Proxy records no host accounts for.
    pub unattributed: u64,
}

/// A list of findings: all counted, the first `max_listed` kept.
#[derive(Debug, Serialize)]
pub struct Listed<T> {
    /// How many there are.
    pub count: u64,
    /// The first of them, in the order found.
    pub listed: Vec<T>,
}

impl<T> Default for Listed<T> {
    fn default() -> Self {
        Self {
            count: 0,
            listed: Vec::new(),
        }
    }
}

impl<T> Listed<T> {
    /// Counts `item`, keeping it while fewer than `max` are kept.
    pub fn push(&mut self, item: T, max: usize) {
        self.count += 1;
        if self.listed.len() < max {
            self.listed.push(item);
        }
    }

    /// Counts an item without building it, when the list is full.
    fn push_with(&mut self, max: usize, item: impl FnOnce() -> T) {
        self.count += 1;
        if self.listed.len() < max {
            self.listed.push(item());
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many were counted and not listed.
    pub fn unlisted(&self) -> u64 {
        self.count - self.listed.len() as u64
    }
}

/// How a kernel log's host was named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostFrom {
    /// `device.hostname` of the loader's start record (lifecycle, activity 3).
    StartRecord,
    /// No start record in the log (it begins after one, e.g. older segments removed):
    /// `device.hostname` of its first record.
    FirstRecord,
    /// The log holds no record: its label.
    Label,
}

/// One agent host: its kernel log and everything matched against it.
#[derive(Debug, Serialize)]
pub struct HostCheck {
    /// The host, as its kernel log names it (see `host_from`).
    pub host: String,
    /// Where `host` comes from.
    pub host_from: HostFrom,
    /// This host's conclusion.
    pub verdict: Verdict,
    /// Its kernel log's chain.
    pub log: LogCheck,
    /// Client addresses its established connections show (after `--nat`), first seen first.
    pub addresses: Vec<IpAddr>,
    /// Proxy records matched to one of its connections.
    pub matched: u64,
    /// Established TCP connections to a proxy.
    pub kernel_proxy_connections: u64,
    /// Proxy records from its addresses with no kernel connection.
    pub proxy_unmatched: Listed<ProxyConnection>,
    /// Connections to a proxy no proxy record matches.
    pub kernel_unmatched: Listed<KernelConnection>,
    /// Established records with no connect attempt of the same socket cookie.
    pub established_without_attempt: Listed<KernelConnection>,
    /// Sockets allowed to connect to a proxy that never established (informational).
    pub allowed_never_connected: u64,
    /// Established connections to listed endpoints, past the proxy (informational).
    pub direct_listed_connections: u64,
    /// Denied attempts by destination and process, most frequent first.
    pub denied: Vec<DeniedGroup>,
    /// Denied attempts in groups past the most kept ([`stream::MAX_DENIED_GROUPS`]).
    pub denied_ungrouped: u64,
    /// Attempts the kernel judged but could not record (ring buffer full), as the kernel log
    /// accounts for them. Not a discrepancy by itself; unrecorded `established` connections
    /// explain proxy records that match nothing.
    pub unrecorded: Listed<UnrecordedGroup>,
    /// Their sum.
    pub unrecorded_attempts: u64,
}

/// One proxy log and what was matched against it.
#[derive(Debug, Serialize)]
pub struct ProxyCheck {
    /// The proxy host, as its records name it (`device.hostname`; empty if it has none).
    pub host: String,
    /// This log's conclusion.
    pub verdict: Verdict,
    /// Its chain.
    pub log: LogCheck,
    /// Its network records (within `--client`).
    pub proxy_records: u64,
    /// Of them, matched to a kernel connection.
    pub matched: u64,
    /// Of them, from an address no kernel log accounts for.
    pub unattributed: u64,
    /// Requests inside inspected tunnels, counted per tunnel.
    pub inspected: Inspected,
}

/// A proxy record from an address no host's kernel log accounts for.
#[derive(Debug, Serialize)]
pub struct Unattributed {
    /// The record.
    #[serde(flatten)]
    pub record: ProxyConnection,
    /// Hosts whose records show this address, when several do (it cannot be told whose).
    pub claimed_by: Vec<String>,
}

/// One kernel log record of attempts the kernel could not record.
#[derive(Debug, Serialize)]
pub struct UnrecordedGroup {
    /// 1-based line.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// `unrecorded_denied`, `unrecorded_allowed` or `unrecorded_established`.
    pub counter: String,
    /// How many.
    pub count: u64,
    /// The interval, ms (`start_time` absent: since the previous loader's last look).
    pub start_time: Option<i64>,
    /// End of the interval, ms.
    pub end_time: i64,
}

/// The requests of inspected tunnels: each tunnel record says how many it served, and that
/// many request records must name it (`metadata.correlation_uid`).
#[derive(Debug, Default, Serialize)]
pub struct Inspected {
    /// Inspected tunnel records.
    pub tunnels: u64,
    /// Request records.
    pub requests: u64,
    /// Tunnels whose request records do not number what the tunnel record says.
    pub miscounted: Listed<TunnelRequests>,
    /// Request records naming no tunnel record (its records lost, or cut from the log).
    pub orphaned: BTreeMap<String, u64>,
}

/// One inspected tunnel's requests, as listed when they do not add up.
#[derive(Debug, Serialize)]
pub struct TunnelRequests {
    /// The tunnel record's line.
    pub line: usize,
    /// Its `metadata.uid`.
    pub uid: String,
    /// `unmapped.requests` of the tunnel record.
    pub says: u64,
    /// Request records naming it.
    pub found: u64,
}

/// `consistent`, `discrepancies` or `tampered` (which takes precedence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Chains intact and every connection on both sides.
    Consistent,
    /// Chains intact, something unmatched or unreadable.
    Discrepancies,
    /// A chain failed verification.
    Tampered,
}

impl Verdict {
    /// The verdict of a log whose chain is `intact` and has `findings` discrepancies.
    fn of(intact: bool, findings: bool) -> Self {
        match (intact, findings) {
            (false, _) => Verdict::Tampered,
            (true, true) => Verdict::Discrepancies,
            (true, false) => Verdict::Consistent,
        }
    }
}

/// One log's chain and what in it could not be interpreted.
#[derive(Debug, Serialize)]
pub struct LogCheck {
    /// Where it was read from (the source's label: its files, or the store query).
    pub file: String,
    /// No chain problem.
    pub intact: bool,
    /// Complete records read.
    pub records: u64,
    /// The last complete record: the chain's head.
    pub head: chain::Head,
    /// The anchor found beside the log, if any.
    pub anchor: Option<chain::Head>,
    /// Chain problems, each in words (naming the file and its line).
    pub problems: Vec<Problem>,
    /// The same problems in words, naming the file and its own line.
    #[serde(skip)]
    pub described: Vec<String>,
    /// Files read (segments and the active file; 0 from a store).
    pub segments: usize,
    /// Spans opened and never closed (proxy tunnels: the proxy died, or they were still open).
    pub unclosed: u64,
    /// Records that are not one of this log's kinds, lack a field the check needs, or belong
    /// to the other log.
    pub unreadable: Listed<Unreadable>,
}

impl LogCheck {
    fn new(file: String, report: Report, unreadable: Listed<Unreadable>) -> Self {
        Self {
            file,
            intact: report.is_intact(),
            records: report.records,
            described: report.problems.iter().map(|p| report.describe(p)).collect(),
            problems: report.problems,
            head: report.head,
            anchor: report.anchor,
            segments: report.segments.len(),
            unclosed: report.unclosed.len() as u64,
            unreadable,
        }
    }
}

/// A network record the check could not use.
#[derive(Debug, Serialize)]
pub struct Unreadable {
    /// 1-based line.
    pub line: usize,
    /// Its `seq` (0 when it has none).
    pub seq: u64,
    /// What is wrong.
    pub why: String,
}

/// A proxy record, as listed when unmatched.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyConnection {
    /// The proxy log it is in (its label).
    pub log: String,
    /// 1-based line.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// When the proxy accepted the connection, ms.
    pub start_time: i64,
    /// The client as the proxy saw it.
    pub client: SocketAddr,
    /// `hostname:port` requested, `-` when no request was parsed.
    pub destination: String,
    /// `Allowed` or `Denied`.
    pub action: Action,
    /// The rule that decided.
    pub rule: String,
}

/// A kernel record of a connection, as listed when unmatched.
#[derive(Debug, Clone, Serialize)]
pub struct KernelConnection {
    /// 1-based line.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// ms since the epoch.
    pub time: i64,
    /// Socket cookie.
    pub cookie: u64,
    /// Local address and port (absent if the record has none).
    pub src: Option<SocketAddr>,
    /// Destination.
    pub dst: SocketAddr,
    /// Process id (0 when the loader never saw the attempt).
    pub pid: u32,
    /// Process name.
    pub process: String,
}

/// Denied attempts with the same destination, protocol, process and reason.
#[derive(Debug, Serialize)]
pub struct DeniedGroup {
    /// `null` for socket creation, which has no destination.
    pub destination: Option<SocketAddr>,
    /// `tcp`, `udp` or the number.
    pub protocol: String,
    /// Process name.
    pub process: String,
    /// The kernel's reason.
    pub reason: String,
    /// Attempts.
    pub count: u64,
    /// First attempt, ms.
    pub first_time: i64,
    /// Last attempt, ms.
    pub last_time: i64,
}

impl DeniedGroup {
    /// Its columns as the reports show them: count, destination, protocol, process, reason,
    /// first, last.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.count.to_string(),
            self.destination.map_or("-".to_owned(), |d| d.to_string()),
            self.protocol.clone(),
            self.process.clone(),
            self.reason.clone(),
            when(self.first_time),
            when(self.last_time),
        ]
    }
}

/// ms since the epoch as RFC 3339 in UTC with milliseconds, a fixed width for the columns.
pub(crate) fn when(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// "N, the first M listed (--max-listed)" when a list was cut.
fn counted<T>(list: &Listed<T>) -> String {
    match list.unlisted() {
        0 => list.count.to_string(),
        _ => format!(
            "{}, the first {} listed (--max-listed for more)",
            list.count,
            list.listed.len()
        ),
    }
}

fn percent(part: u64, whole: u64) -> String {
    match whole {
        0 => "-".to_owned(),
        n => format!("{:.1}%", part as f64 * 100.0 / n as f64),
    }
}

/// The human report: the fleet, each proxy log, the unattributed records, then each host
/// (one line for a host with no finding, its findings listed otherwise), then the verdict.
pub fn render(c: &Fleet) -> String {
    let nat: Vec<_> = c
        .nat
        .iter()
        .map(|n| format!("NAT {}={}", n.kernel, n.proxy))
        .collect();
    let nat = if nat.is_empty() {
        "no NAT".to_owned()
    } else {
        nat.join(", ")
    };
    let mut out = match (c.hosts.as_slice(), c.proxies.as_slice()) {
        ([h], [p]) => format!(
            "cross-check of kernel log {} against proxy log {} (window {} ms, {nat})\n",
            h.log.file, p.log.file, c.window_ms
        ),
        (hosts, proxies) => format!(
            "cross-check of {} kernel logs against {} proxy logs (window {} ms, {nat})\n",
            hosts.len() + c.left_out.len(),
            proxies.len(),
            c.window_ms
        ),
    };
    if !c.clients.is_empty() {
        let clients: Vec<_> = c.clients.iter().map(IpAddr::to_string).collect();
        out += &format!(
            "only clients {}: {} kernel logs left out\n",
            clients.join(", "),
            c.left_out.len()
        );
    }
    let s = &c.summary;
    out += &format!(
        "matched: {} of {} proxy records ({}), {} of {} kernel connections to the proxy\n",
        s.matched,
        s.proxy_records,
        percent(s.matched, s.proxy_records),
        s.matched,
        s.kernel_proxy_connections
    );
    if c.hosts.len() + c.proxies.len() > 2 {
        out += &format!(
            "fleet: {} hosts ({} with findings), {} proxy logs, {} logs not intact\n",
            s.hosts, s.hosts_with_findings, s.proxies, s.tampered_logs
        );
    }
    for p in &c.proxies {
        let name = if c.proxies.len() == 1 {
            "proxy log".to_owned()
        } else {
            format!("proxy log {}", p.log.file)
        };
        out += &log_lines(&name, &p.log);
        if c.proxies.len() > 1 {
            out += &format!(
                "{name}: {} records, {} matched, {} unattributed\n",
                p.proxy_records, p.matched, p.unattributed
            );
        }
        let i = &p.inspected;
        if i.tunnels > 0 || i.requests > 0 {
            out += &format!(
                "inspected: {} requests in {} tunnels ({} miscounted, {} requests naming no tunnel)\n",
                i.requests,
                i.tunnels,
                i.miscounted.count,
                i.orphaned.values().sum::<u64>()
            );
            for t in &i.miscounted.listed {
                out += &format!(
                    "  line {}: tunnel {} says {} requests, {} request records name it\n",
                    t.line, t.uid, t.says, t.found
                );
            }
            for (uid, n) in &i.orphaned {
                out += &format!("  {n} request records name tunnel {uid}, which has no record\n");
            }
        }
    }
    out += &format!(
        "proxy records from an address no kernel log accounts for (unattributed): {}\n",
        counted(&c.unattributed)
    );
    for u in &c.unattributed.listed {
        out += &proxy_line(&u.record, c.proxies.len() > 1);
        if !u.claimed_by.is_empty() {
            out += &format!("    address shown by hosts {}\n", u.claimed_by.join(", "));
        }
    }
    for h in &c.hosts {
        out += &host_lines(h, c);
    }
    out += "verdict: ";
    out += &format!("{:?}\n", c.verdict).to_uppercase();
    out
}

/// A log's chain in words.
fn log_lines(name: &str, log: &LogCheck) -> String {
    let mut out = match log.problems.len() {
        0 => format!("{name}: intact, {} records\n", log.records),
        n => format!("{name}: {n} problem(s) in {} records\n", log.records),
    };
    for p in &log.described {
        out += &format!("  {p}\n");
    }
    if log.segments > 1 {
        out += &format!("{name}: read from {} segments\n", log.segments);
    }
    if log.unclosed > 0 {
        out += &format!(
            "{name}: {} opened and never closed (the writer died, or they were open when the log was copied); matched on their opening records\n",
            log.unclosed
        );
    }
    if !log.unreadable.is_empty() {
        out += &format!("{name}: {} unreadable records\n", counted(&log.unreadable));
    }
    for u in &log.unreadable.listed {
        out += &format!("  line {} seq {}: {}\n", u.line, u.seq, u.why);
    }
    out
}

fn proxy_line(p: &ProxyConnection, name_log: bool) -> String {
    let log = if name_log {
        format!("{}  ", p.log)
    } else {
        String::new()
    };
    let (at, line) = (when(p.start_time), format!("line {} seq {}", p.line, p.seq));
    let what = format!(
        "{} -> {}  {}  {}",
        p.client,
        p.destination,
        p.action.as_str(),
        p.rule
    );
    format!("  {log}{line}  {at}  {what}\n")
}

fn host_lines(h: &HostCheck, c: &Fleet) -> String {
    let fleet = c.hosts.len() + c.proxies.len() > 2;
    let from = match h.host_from {
        HostFrom::StartRecord => "named by its start record",
        HostFrom::FirstRecord => "no start record: named by its first record",
        HostFrom::Label => "no records",
    };
    let addresses: Vec<_> = h.addresses.iter().map(IpAddr::to_string).collect();
    let mut out = String::new();
    if fleet {
        out += &format!(
            "host {} ({from}; kernel log {}; addresses {}): {}, matched {} of {} connections to a proxy\n",
            h.host,
            h.log.file,
            if addresses.is_empty() { "-".to_owned() } else { addresses.join(", ") },
            format!("{:?}", h.verdict).to_lowercase(),
            h.matched,
            h.kernel_proxy_connections
        );
        if h.verdict == Verdict::Consistent {
            return out;
        }
    }
    out += &log_lines("kernel log", &h.log);
    out += &format!(
        "proxy records with no kernel record (not from the agent's cgroup, or lost): {}\n",
        counted(&h.proxy_unmatched)
    );
    for p in &h.proxy_unmatched.listed {
        out += &proxy_line(p, c.proxies.len() > 1);
    }
    for (title, list) in [
        (
            "kernel connections to the proxy with no proxy record (proxy log lost or cut)",
            &h.kernel_unmatched,
        ),
        (
            "established connections with no connect attempt (kernel record lost)",
            &h.established_without_attempt,
        ),
    ] {
        out += &format!("{title}: {}\n", counted(list));
        for k in &list.listed {
            let (at, line) = (when(k.time), format!("line {} seq {}", k.line, k.seq));
            let src = k.src.map_or("-".to_owned(), |a| a.to_string());
            let what = format!("{src} -> {}  pid {} {}", k.dst, k.pid, k.process);
            out += &format!("  {line}  {at}  cookie {}  {what}\n", k.cookie);
        }
    }
    out += &format!(
        "allowed connects to the proxy never established (informational, e.g. proxy down): {}\n",
        h.allowed_never_connected
    );
    out += &format!(
        "direct connections to listed endpoints (informational): {}\n",
        h.direct_listed_connections
    );
    out += &format!(
        "attempts the kernel could not record (ring buffer full), as logged: {}\n",
        h.unrecorded_attempts
    );
    for u in &h.unrecorded.listed {
        let since = u.start_time.map_or("-".to_owned(), when);
        out += &format!(
            "  line {} seq {}  {} .. {}  {} {}\n",
            u.line,
            u.seq,
            since,
            when(u.end_time),
            u.count,
            u.counter
        );
    }
    out += &format!("denied attempts: {} groups\n", h.denied.len());
    if h.denied_ungrouped > 0 {
        out += &format!(
            "  and {} denied attempts in groups past the first {}\n",
            h.denied_ungrouped,
            stream::MAX_DENIED_GROUPS
        );
    }
    if !h.denied.is_empty() {
        let header = "COUNT DESTINATION PROTO PROCESS REASON FIRST LAST";
        let mut rows = vec![header.split(' ').map(str::to_owned).collect::<Vec<_>>()];
        rows.extend(h.denied.iter().map(DeniedGroup::cells));
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..rows[0].len()).map(width).collect();
        for row in &rows {
            // Counts right-aligned, text left-aligned; no trailing spaces.
            let mut line = format!("  {:>w$}", row[0], w = widths[0]);
            for (cell, w) in row.iter().zip(&widths).skip(1) {
                line += &format!("  {cell:<w$}");
            }
            out += line.trim_end();
            out += "\n";
        }
    }
    out
}
