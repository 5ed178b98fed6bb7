//! `tank-loader audit cross-check`: holds the kernel log and the proxy log against each other.
//!
//! Each log alone proves only that it was not edited. Together they prove more: every
//! connection the proxy served must appear in the kernel log as an established connection of the
//! agent's cgroup with the same 4-tuple, and every such kernel connection must appear in the
//! proxy log. A connection missing on one side is traffic that did not come from the agent, or a
//! record that was lost or removed with its chain rebuilt. The logs come from two hosts that do
//! not trust each other, so neither is taken as the truth; the report lists what each side lacks.
//!
//! [`check`] is pure (two read logs in, a [`CrossCheck`] out) and [`render`] makes the human
//! report; reading files and exit codes stay in the binary. docs/audit-format.md ("Cross-check")
//! documents the matching rules and every field of the report.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tank_ebpf_common::chain::{self, Line, Problem, Record, Report};
use tank_ebpf_common::event::{hook, reason};
use tank_ebpf_common::ocsf::kernel::{NetworkRecord, UnrecordedRecord};
use tank_ebpf_common::ocsf::proxy::{ConnectionRecord, TunnelKind};
use tank_ebpf_common::ocsf::{self, protocol, Action, Kind, LogName};

use crate::activity::{self, Activity};

mod source;
pub use source::Source;

/// Default greatest distance in time between a kernel record and its proxy record, ms.
pub const DEFAULT_WINDOW_MS: u64 = 5000;

/// One log as read: its chain report and every record it holds, damaged or not.
#[derive(Debug)]
pub struct Log {
    /// Where it was read from (for the report).
    pub path: PathBuf,
    /// What verifying the chain found.
    pub report: Report,
    /// Every complete record, also those after a problem.
    pub records: Vec<Record>,
}

impl Log {
    /// Reads and verifies the chained log at `path` (with its rotated segments beside it, or
    /// the one log in a directory).
    pub fn read(path: &Path) -> io::Result<Self> {
        Self::read_series(&[path.to_owned()])
    }

    /// Reads and verifies a series of segments as one log (see `chain::series`).
    pub fn read_series(paths: &[PathBuf]) -> io::Result<Self> {
        Self::from_source(Source::files(LogName::Kernel, paths)?)
    }

    /// Reads and verifies every line of `source`.
    pub fn from_source(source: Source) -> io::Result<Self> {
        let mut v = chain::StreamVerifier::new(source.anchor);
        let mut records = Vec::new();
        for line in source.lines {
            match line? {
                Line::File(path) => v.file(&path),
                Line::Complete(bytes) => records.extend(v.line(&bytes)),
                Line::Partial => v.partial(),
            }
        }
        Ok(Self {
            path: source.label.into(),
            report: v.finish(),
            records,
        })
    }
}

/// A static address translation between the agent host and the proxy host.
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
    /// Greatest |kernel time - proxy start_time| of a match, ms.
    pub window_ms: u64,
    /// Kernel-side addresses to translate before comparing.
    pub nat: Vec<Nat>,
}

/// The outcome, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct CrossCheck {
    /// The conclusion.
    pub verdict: Verdict,
    /// The kernel log's chain.
    pub kernel_log: LogCheck,
    /// The proxy log's chain.
    pub proxy_log: LogCheck,
    /// The window used, ms.
    pub window_ms: u64,
    /// The translations used.
    pub nat: Vec<Nat>,
    /// Proxy records matched to a kernel connection (one to one).
    pub matched: u64,
    /// Network records in the proxy log.
    pub proxy_records: u64,
    /// Established TCP connections to a proxy in the kernel log.
    pub kernel_proxy_connections: u64,
    /// Proxy records no kernel connection matches.
    pub proxy_unmatched: Vec<ProxyConnection>,
    /// Kernel connections to a proxy no proxy record matches.
    pub kernel_unmatched: Vec<KernelConnection>,
    /// Established records with no connect attempt of the same socket cookie.
    pub established_without_attempt: Vec<KernelConnection>,
    /// Sockets allowed to connect to a proxy that never established (informational).
    pub allowed_never_connected: u64,
    /// Established connections to listed endpoints, past the proxy (informational).
    pub direct_listed_connections: u64,
    /// Denied attempts by destination and process, most frequent first.
    pub denied: Vec<DeniedGroup>,
    /// Attempts the kernel judged but could not record (ring buffer full), as the kernel log
    /// accounts for them. Not a discrepancy by itself; unrecorded `established` connections
    /// explain proxy records that match nothing.
    pub unrecorded: Vec<UnrecordedGroup>,
    /// Both logs over time per host, and proxy records by rule (bounded, for the pictures).
    pub activity: Activity,
    /// Requests inside inspected tunnels, counted per tunnel.
    pub inspected: Inspected,
}

/// One kernel log record of attempts the kernel could not record.
#[derive(Debug, Serialize)]
pub struct UnrecordedGroup {
    /// 1-based line.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// `unrecorded_denied`, `unrecorded_allowed` or `unrecorded_established`.
    pub counter: &'static str,
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
    pub miscounted: Vec<TunnelRequests>,
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

/// Counts the request records of each inspected tunnel in the proxy log. The count a tunnel
/// served is in its closing record; a tunnel opened and never closed (the proxy died) has
/// none, so its requests are neither miscounted nor orphaned.
fn inspected(proxy: &Log) -> Inspected {
    let mut per_tunnel: BTreeMap<String, u64> = BTreeMap::new();
    let mut closed = Vec::new();
    let mut open = BTreeSet::new();
    let mut out = Inspected::default();
    for r in &proxy.records {
        match ocsf::parse(&r.value) {
            Ok(Kind::Request(q)) => {
                out.requests += 1;
                let uid = q.metadata.correlation_uid.clone().unwrap_or_default();
                *per_tunnel.entry(uid).or_default() += 1;
            }
            Ok(Kind::Proxy(p)) => {
                let p = *p;
                let (Some(uid), Some(TunnelKind::Inspected)) = (p.metadata.uid, p.unmapped.tunnel)
                else {
                    continue;
                };
                if r.value.pointer("/unmapped/opens").is_some() {
                    open.insert(uid);
                } else {
                    open.remove(&uid);
                    closed.push((r.line, uid, p.unmapped.requests.unwrap_or(0)));
                }
            }
            _ => {}
        }
    }
    out.tunnels = (closed.len() + open.len()) as u64;
    for uid in open {
        per_tunnel.remove(&uid);
    }
    for (line, uid, says) in closed {
        let found = per_tunnel.remove(&uid).unwrap_or(0);
        if found != says {
            out.miscounted.push(TunnelRequests {
                line,
                uid,
                says,
                found,
            });
        }
    }
    out.orphaned = per_tunnel;
    out
}

/// `consistent`, `discrepancies` or `tampered` (which takes precedence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both chains intact and every connection on both sides.
    Consistent,
    /// Both chains intact, something unmatched or unreadable.
    Discrepancies,
    /// A chain failed verification.
    Tampered,
}

/// One log's chain and what in it could not be interpreted.
#[derive(Debug, Serialize)]
pub struct LogCheck {
    /// The file.
    pub file: PathBuf,
    /// No chain problem.
    pub intact: bool,
    /// Complete records read.
    pub records: u64,
    /// The last complete record: the chain's head.
    pub head: chain::Head,
    /// The anchor found beside the log, if any.
    pub anchor: Option<chain::Head>,
    /// Chain problems.
    pub problems: Vec<Problem>,
    /// Files read (segments and the active file).
    pub segments: usize,
    /// Spans opened and never closed (proxy tunnels: the proxy died, or they were still open).
    pub unclosed: u64,
    /// Records that are not one of this log's kinds, lack a field the check needs, or belong
    /// to the other log.
    pub unreadable: Vec<Unreadable>,
}

/// A network record the check could not use.
#[derive(Debug, Serialize)]
pub struct Unreadable {
    /// 1-based line.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// What is wrong.
    pub why: String,
}

/// A proxy record, as listed when unmatched.
#[derive(Debug, Serialize)]
pub struct ProxyConnection {
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
#[derive(Debug, Serialize)]
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

/// The chain check of `log` and the records `pick` takes from it. A record `pick` refuses (or
/// that is no record tank writes) is listed as unreadable, not skipped: a check that skipped
/// what it cannot read would pass a log it does not understand.
fn read<T>(
    log: &Log,
    pick: impl Fn(Kind) -> Result<Option<T>, String>,
) -> (LogCheck, Vec<(&Record, T)>) {
    let mut unreadable = Vec::new();
    let mut parsed = Vec::new();
    for r in &log.records {
        // A tunnel is matched on its opening record; its closing record repeats the 4-tuple.
        if r.value.pointer("/unmapped/closes").is_some() {
            continue;
        }
        match ocsf::parse(&r.value)
            .map_err(|e| e.to_string())
            .and_then(&pick)
        {
            Ok(Some(t)) => parsed.push((r, t)),
            Ok(None) => {}
            Err(why) => unreadable.push(Unreadable {
                line: r.line,
                seq: r.seq,
                why,
            }),
        }
    }
    let check = LogCheck {
        file: log.path.clone(),
        intact: log.report.is_intact(),
        records: log.report.records,
        head: log.report.head.clone(),
        anchor: log.report.anchor.clone(),
        problems: log.report.problems.clone(),
        segments: log.report.segments.len(),
        unclosed: log.report.unclosed.len() as u64,
        unreadable,
    };
    (check, parsed)
}

/// What the check takes from the kernel log.
enum KernelItem {
    Network(NetworkRecord),
    Unrecorded(UnrecordedRecord),
}

/// The kernel log's network and unrecorded records; lifecycle records take no part.
fn kernel_record(kind: Kind) -> Result<Option<KernelItem>, String> {
    match kind {
        Kind::Kernel(k) if k.dst_endpoint.addr().is_some() => Ok(Some(KernelItem::Network(k))),
        Kind::Unrecorded(u) => Ok(Some(KernelItem::Unrecorded(u))),
        Kind::Kernel(_) => Err("dst_endpoint has no ip and port".to_owned()),
        Kind::Lifecycle(l) if l.metadata.log_name == LogName::Kernel => Ok(None),
        Kind::Lifecycle(_) | Kind::Proxy(_) | Kind::Request(_) => {
            Err("a proxy record in the kernel log".to_owned())
        }
    }
}

/// The proxy log's connection records.
fn proxy_record(kind: Kind) -> Result<Option<ConnectionRecord>, String> {
    match kind {
        Kind::Proxy(p) if p.src_endpoint.addr().is_some() && p.proxy.addr().is_some() => {
            Ok(Some(*p))
        }
        Kind::Proxy(_) => Err("src_endpoint or proxy has no ip and port".to_owned()),
        // The proxy's own records about its log (an outage, a new segment).
        Kind::Lifecycle(l) if l.metadata.log_name == LogName::Proxy => Ok(None),
        // Requests inside inspected tunnels are counted per tunnel (see `requests`), not paired.
        Kind::Request(_) => Ok(None),
        Kind::Kernel(_) | Kind::Lifecycle(_) | Kind::Unrecorded(_) => {
            Err("a kernel record in the proxy log".to_owned())
        }
    }
}

fn kernel_connection(r: &Record, k: &NetworkRecord) -> KernelConnection {
    KernelConnection {
        line: r.line,
        seq: r.seq,
        time: k.time,
        cookie: k.unmapped.cookie,
        src: k.src_endpoint.addr(),
        dst: k.dst_endpoint.addr().expect("checked by kernel_record"),
        pid: k.actor.process.pid,
        process: k.actor.process.name.clone(),
    }
}

/// Matches the proxy log against the kernel log.
pub fn check(kernel: &Log, proxy: &Log, opts: &Options) -> CrossCheck {
    let (kernel_log, kitems) = read(kernel, kernel_record);
    let mut unrecorded = Vec::new();
    let mut krecs = Vec::with_capacity(kitems.len());
    for (r, item) in kitems {
        match item {
            KernelItem::Network(k) => krecs.push((r, k)),
            KernelItem::Unrecorded(u) => unrecorded.push(UnrecordedGroup {
                line: r.line,
                seq: r.seq,
                counter: u.unmapped.unrecorded.as_str(),
                count: u.count,
                start_time: u.start_time,
                end_time: u.end_time,
            }),
        }
    }
    let (proxy_log, precs) = read(proxy, proxy_record);

    let (mut attempted, mut to_proxy, mut connected) =
        (HashSet::new(), HashSet::new(), HashSet::new());
    let (mut established, mut conns, mut direct_listed_connections) = (vec![], vec![], 0);
    let mut denied = BTreeMap::new();
    let mut activity = activity::Builder::default();
    for (r, k) in &krecs {
        let (cookie, why) = (k.unmapped.cookie, k.unmapped.reason.0);
        let tcp = k.connection_info.protocol_num == protocol::TCP;
        let counted = match (k.unmapped.hook.0, k.action) {
            (hook::ESTABLISHED, _) => activity::Kind::Connection,
            (_, Action::Allowed) => activity::Kind::AttemptAllowed,
            (_, Action::Denied) => activity::Kind::AttemptDenied,
        };
        activity.add("kernel", &k.device.hostname, counted, k.time);
        match (k.unmapped.hook.0, k.action) {
            (hook::ESTABLISHED, _) => {
                connected.insert(cookie);
                established.push(kernel_connection(r, k));
                direct_listed_connections += u64::from(why == reason::LISTED_ENDPOINT);
                if why == reason::PROXY && tcp {
                    conns.push(kernel_connection(r, k));
                }
            }
            (hook::CONNECT4 | hook::CONNECT6, Action::Allowed) if tcp => {
                attempted.insert(cookie);
                if why == reason::PROXY {
                    to_proxy.insert(cookie);
                }
            }
            (_, Action::Denied) => count_denied(&mut denied, k),
            _ => {}
        }
    }
    let established_without_attempt: Vec<KernelConnection> = established
        .into_iter()
        .filter(|c| !attempted.contains(&c.cookie))
        .collect();
    let mut denied: Vec<DeniedGroup> = denied.into_values().collect();
    // Stable: equal counts keep the key order of the map.
    denied.sort_by_key(|g| std::cmp::Reverse(g.count));

    for (_, p) in &precs {
        let allowed = p.action == Action::Allowed;
        let counted = if allowed {
            activity::Kind::ProxyAllowed
        } else {
            activity::Kind::ProxyDenied
        };
        activity.add("proxy", &p.device.hostname, counted, p.start_time);
        activity.rule(&p.unmapped.rule, allowed);
    }
    let (p_used, k_used) = pair(&conns, &precs, opts);
    let proxy_unmatched: Vec<ProxyConnection> = precs
        .iter()
        .zip(&p_used)
        .filter(|(_, used)| !**used)
        .map(|((r, p), _)| ProxyConnection {
            line: r.line,
            seq: r.seq,
            start_time: p.start_time,
            client: p.src_endpoint.addr().expect("checked by proxy_record"),
            destination: match (&p.dst_endpoint.hostname, p.dst_endpoint.port) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.clone(),
                _ => "-".to_owned(),
            },
            action: p.action,
            rule: p.unmapped.rule.clone(),
        })
        .collect();
    let kernel_proxy_connections = conns.len() as u64;
    let kernel_unmatched: Vec<KernelConnection> = conns
        .into_iter()
        .zip(&k_used)
        .filter_map(|(c, used)| (!used).then_some(c))
        .collect();

    let inspected = inspected(proxy);
    let discrepancy = !(proxy_unmatched.is_empty()
        && inspected.miscounted.is_empty()
        && inspected.orphaned.is_empty()
        && kernel_unmatched.is_empty()
        && established_without_attempt.is_empty()
        && kernel_log.unreadable.is_empty()
        && proxy_log.unreadable.is_empty());
    let verdict = match (kernel_log.intact && proxy_log.intact, discrepancy) {
        (false, _) => Verdict::Tampered,
        (true, true) => Verdict::Discrepancies,
        (true, false) => Verdict::Consistent,
    };
    CrossCheck {
        verdict,
        kernel_log,
        proxy_log,
        window_ms: opts.window_ms,
        nat: opts.nat.clone(),
        matched: p_used.iter().filter(|u| **u).count() as u64,
        proxy_records: precs.len() as u64,
        kernel_proxy_connections,
        proxy_unmatched,
        kernel_unmatched,
        established_without_attempt,
        // A non-blocking connect may call connect() again on one socket: these are sockets.
        allowed_never_connected: to_proxy.difference(&connected).count() as u64,
        direct_listed_connections,
        denied,
        unrecorded,
        activity: activity.finish(),
        inspected,
    }
}

/// Pairs proxy records with kernel connections one to one; returns which of each were used.
fn pair(
    conns: &[KernelConnection],
    precs: &[(&Record, ConnectionRecord)],
    opts: &Options,
) -> (Vec<bool>, Vec<bool>) {
    // The kernel side translated into what the proxy saw.
    let seen = |a: SocketAddr| {
        let ip = a.ip().to_canonical();
        let nat = opts.nat.iter().find(|n| n.kernel == ip);
        SocketAddr::new(nat.map_or(ip, |n| n.proxy), a.port())
    };
    let mut by_tuple: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, c) in conns.iter().enumerate() {
        if let Some(src) = c.src {
            by_tuple
                .entry((seen(src), seen(c.dst)))
                .or_default()
                .push(i);
        }
    }
    let mut pairs = Vec::new();
    for (p, (_, rec)) in precs.iter().enumerate() {
        let checked = "checked by proxy_record";
        let tuple = (
            rec.src_endpoint.addr().expect(checked),
            rec.proxy.addr().expect(checked),
        );
        for &k in by_tuple.get(&tuple).into_iter().flatten() {
            let dt = conns[k].time.abs_diff(rec.start_time);
            if dt <= opts.window_ms {
                pairs.push((dt, p, k));
            }
        }
    }
    // Nearest pairs first: when a client port is reused within the window, each proxy record
    // takes the kernel connection closest to it in time, whatever order the logs list them in.
    pairs.sort_unstable();
    let (mut p_used, mut k_used) = (vec![false; precs.len()], vec![false; conns.len()]);
    for (_, p, k) in pairs {
        if !p_used[p] && !k_used[k] {
            (p_used[p], k_used[k]) = (true, true);
        }
    }
    (p_used, k_used)
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

type DeniedKey = (Option<SocketAddr>, String, String, String);

fn count_denied(groups: &mut BTreeMap<DeniedKey, DeniedGroup>, k: &NetworkRecord) {
    let dst = k.dst_endpoint.addr().expect("checked by kernel_record");
    // Socket creation has no destination: the kernel records 0.0.0.0 or :: port 0.
    let destination = (!(dst.ip().is_unspecified() && dst.port() == 0)).then_some(dst);
    let (protocol, process) = (&k.connection_info.protocol_name, &k.actor.process.name);
    let why = k.unmapped.reason.as_str();
    let key = (
        destination,
        protocol.clone(),
        process.clone(),
        why.to_owned(),
    );
    let g = groups.entry(key).or_insert_with(|| DeniedGroup {
        destination,
        protocol: protocol.clone(),
        process: process.clone(),
        reason: why.to_owned(),
        count: 0,
        first_time: k.time,
        last_time: k.time,
    });
    g.count += 1;
    g.first_time = g.first_time.min(k.time);
    g.last_time = g.last_time.max(k.time);
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

/// The human report.
pub fn render(c: &CrossCheck) -> String {
    let nat: Vec<_> = c
        .nat
        .iter()
        .map(|n| format!("NAT {}={}", n.kernel, n.proxy))
        .collect();
    let mut out = format!(
        "cross-check of kernel log {} against proxy log {} (window {} ms, {})\n",
        c.kernel_log.file.display(),
        c.proxy_log.file.display(),
        c.window_ms,
        if nat.is_empty() {
            "no NAT".to_owned()
        } else {
            nat.join(", ")
        }
    );
    for (name, log) in [("kernel", &c.kernel_log), ("proxy", &c.proxy_log)] {
        out += &match log.problems.len() {
            0 => format!("{name} log: intact, {} records\n", log.records),
            n => format!("{name} log: {n} problem(s) in {} records\n", log.records),
        };
        for p in &log.problems {
            out += &format!("  {p}\n");
        }
        if log.segments > 1 {
            out += &format!("{name} log: read from {} segments\n", log.segments);
        }
        if log.unclosed > 0 {
            out += &format!(
                "{name} log: {} opened and never closed (the writer died, or they were open when the log was copied); matched on their opening records\n",
                log.unclosed
            );
        }
        if !log.unreadable.is_empty() {
            out += &format!("{name} log: {} unreadable records\n", log.unreadable.len());
        }
        for u in &log.unreadable {
            out += &format!("  line {} seq {}: {}\n", u.line, u.seq, u.why);
        }
    }
    let pct = match c.proxy_records {
        0 => "-".to_owned(),
        n => format!("{:.1}%", c.matched as f64 * 100.0 / n as f64),
    };
    out += &format!(
        "matched: {} of {} proxy records ({pct}), {} of {} kernel connections to the proxy\n",
        c.matched, c.proxy_records, c.matched, c.kernel_proxy_connections
    );
    let i = &c.inspected;
    if i.tunnels > 0 || i.requests > 0 {
        out += &format!(
            "inspected: {} requests in {} tunnels ({} miscounted, {} requests naming no tunnel)\n",
            i.requests,
            i.tunnels,
            i.miscounted.len(),
            i.orphaned.values().sum::<u64>()
        );
        for t in &i.miscounted {
            out += &format!(
                "  line {}: tunnel {} says {} requests, {} request records name it\n",
                t.line, t.uid, t.says, t.found
            );
        }
        for (uid, n) in &i.orphaned {
            out += &format!("  {n} request records name tunnel {uid}, which has no record\n");
        }
    }
    out += &format!(
        "proxy records with no kernel record (not from the agent's cgroup, or lost): {}\n",
        c.proxy_unmatched.len()
    );
    for p in &c.proxy_unmatched {
        let (at, line) = (when(p.start_time), format!("line {} seq {}", p.line, p.seq));
        let what = format!(
            "{} -> {}  {}  {}",
            p.client,
            p.destination,
            p.action.as_str(),
            p.rule
        );
        out += &format!("  {line}  {at}  {what}\n");
    }
    for (title, list) in [
        (
            "kernel connections to the proxy with no proxy record (proxy log lost or cut)",
            &c.kernel_unmatched,
        ),
        (
            "established connections with no connect attempt (kernel record lost)",
            &c.established_without_attempt,
        ),
    ] {
        out += &format!("{title}: {}\n", list.len());
        for k in list {
            let (at, line) = (when(k.time), format!("line {} seq {}", k.line, k.seq));
            let src = k.src.map_or("-".to_owned(), |a| a.to_string());
            let what = format!("{src} -> {}  pid {} {}", k.dst, k.pid, k.process);
            out += &format!("  {line}  {at}  cookie {}  {what}\n", k.cookie);
        }
    }
    out += &format!(
        "allowed connects to the proxy never established (informational, e.g. proxy down): {}\n",
        c.allowed_never_connected
    );
    out += &format!(
        "direct connections to listed endpoints (informational): {}\n",
        c.direct_listed_connections
    );
    let unrecorded: u64 = c.unrecorded.iter().map(|u| u.count).sum();
    out += &format!(
        "attempts the kernel could not record (ring buffer full), as logged: {unrecorded}\n"
    );
    for u in &c.unrecorded {
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
    out += &format!("denied attempts: {} groups\n", c.denied.len());
    if !c.denied.is_empty() {
        let header = "COUNT DESTINATION PROTO PROCESS REASON FIRST LAST";
        let mut rows = vec![header.split(' ').map(str::to_owned).collect::<Vec<_>>()];
        rows.extend(c.denied.iter().map(DeniedGroup::cells));
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
    out += "verdict: ";
    out += &format!("{:?}\n", c.verdict).to_uppercase();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use tank_ebpf_common::allow::ipv4_mapped;
    use tank_ebpf_common::chain::{ChainWriter, Hash, Head, Link};
    use tank_ebpf_common::event::{verdict, Event};
    use tank_ebpf_common::ocsf::kernel::{Formatter, LifecycleRecord};
    use tank_ebpf_common::ocsf::proxy::{
        Connection, HttpRequest, Phase, ProxyDetails, Request, RequestDetails, RequestKind,
        RequestRecord, Traffic, Url,
    };
    use tank_ebpf_common::ocsf::{lifecycle, Endpoint};

    const AGENT: [u8; 4] = [10, 0, 0, 5];
    const T0: i64 = 1_800_000_000_000;

    /// A read log of `values` with an intact chain.
    fn log(values: Vec<Value>) -> Log {
        let records: Vec<Record> = (1..)
            .zip(values)
            .map(|(seq, value)| Record {
                line: seq as usize,
                seq,
                value,
            })
            .collect();
        let seq = records.len() as u64;
        let head = Head {
            seq,
            hash: Hash::GENESIS,
        };
        let report = Report {
            records: seq,
            head,
            anchor: None,
            problems: vec![],
            segments: vec![],
            unclosed: vec![],
        };
        Log {
            path: "test.jsonl".into(),
            report,
            records,
        }
    }

    /// `v` with the fields of `patch` replaced, recursively.
    fn with(mut v: Value, patch: Value) -> Value {
        match (&mut v, patch) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, p) in b {
                    let old = a.remove(&k).unwrap_or(Value::Null);
                    a.insert(k, with(old, p));
                }
            }
            (a, b) => *a = b,
        }
        v
    }

    /// The kernel log's record of `e` at `dt` ms after T0, as the drain writes it (without the
    /// chain's fields, which a test log adds).
    fn kernel(e: &Event, dt: i64) -> Value {
        let mut line = Vec::new();
        let link = Link {
            seq: 1,
            prev: &Hash::GENESIS,
        };
        Formatter::new("agent", "0").write(&mut line, link, e, (T0 + dt) * 1_000_000, 0);
        let mut v: Value = serde_json::from_slice(&line).unwrap();
        v["metadata"].as_object_mut().unwrap().remove("sequence");
        v["unmapped"].as_object_mut().unwrap().remove("prev");
        v
    }

    /// `curl`'s allowed TCP connect (at `hook`) to the proxy.
    fn event(hook: u8, cookie: u64) -> Event {
        Event {
            ktime_ns: 1,
            cookie,
            pid: 42,
            tgid: 42,
            dst_addr: ipv4_mapped([10, 0, 0, 1]),
            dst_port: 3128,
            family: 2,
            hook,
            verdict: verdict::ALLOW,
            reason: reason::PROXY,
            ..Event::EXAMPLE
        }
    }

    /// `curl`'s allowed TCP connect to the proxy, `dt` ms after T0.
    fn attempt(cookie: u64, dt: i64) -> Value {
        kernel(&event(hook::CONNECT4, cookie), dt)
    }

    /// Its `established` record, from AGENT:`port`.
    fn established(cookie: u64, dt: i64, port: u16) -> Value {
        let mut e = event(hook::ESTABLISHED, cookie);
        (e.src_addr, e.src_port) = (ipv4_mapped(AGENT), port);
        kernel(&e, dt)
    }

    /// Both kernel records of one connection to the proxy from AGENT:`port`.
    fn connection(cookie: u64, dt: i64, port: u16) -> Vec<Value> {
        vec![attempt(cookie, dt), established(cookie, dt + 1, port)]
    }

    fn denied(dt: i64, comm: &str, hook: u8, dst: (&str, u16), proto: u16) -> Value {
        let mut e = event(hook, 0);
        e.comm = [0; 16];
        e.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        e.dst_addr = match dst.0.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        (e.dst_port, e.protocol, e.verdict) = (dst.1, proto, verdict::DENY);
        e.reason = if dst.1 == 0 {
            reason::RAW_SOCKET
        } else {
            reason::NOT_LISTED
        };
        kernel(&e, dt)
    }

    /// The proxy's record of a connection from AGENT:`port` accepted `dt` ms after T0.
    fn proxied(dt: i64, port: u16) -> Value {
        proxied_as(dt, port, Phase::Whole)
    }

    fn proxied_as(dt: i64, port: u16, phase: Phase) -> Value {
        let c = Connection {
            allowed: true,
            start_ms: T0 + dt,
            duration_ms: 50,
            phase,
            client: SocketAddr::from((AGENT, port)),
            local: "10.0.0.1:3128".parse().unwrap(),
            target: Endpoint {
                hostname: Some("example.com".into()),
                port: Some(443),
                ..Endpoint::default()
            },
            traffic: Traffic::default(),
            url: None,
            uid: None,
            details: ProxyDetails {
                kind: RequestKind::Connect,
                rule: "allowed_domains:web".into(),
                http_method: None,
                error: None,
                url_bytes: None,
                tunnel: None,
                sni: None,
                alpn: Vec::new(),
                requests: None,
                budget: None,
            },
        };
        serde_json::to_value(ConnectionRecord::new(c, "proxy", "0")).unwrap()
    }

    /// An inspected tunnel's records as the proxy writes them: its opening record, request
    /// records for `recorded` of its requests, and its closing record saying it served
    /// `requests`.
    fn inspected_tunnel(dt: i64, port: u16, uid: &str, requests: u64, recorded: u64) -> Vec<Value> {
        let tunnel = |phase, unmapped| {
            let mut t = with(proxied_as(dt, port, phase), json!({ "unmapped": unmapped }));
            t["metadata"]["uid"] = json!(uid);
            t["unmapped"]["tunnel"] = json!("inspected");
            t
        };
        let opening = tunnel(Phase::Opening, json!({"opens": true}));
        let closing = tunnel(Phase::Closing, json!({"closes": 1, "requests": requests}));
        let request = |n: u64| {
            let r = Request {
                allowed: true,
                start_ms: T0 + dt + n as i64,
                duration_ms: 1,
                client: SocketAddr::from((AGENT, port)),
                target: Endpoint::default(),
                http: HttpRequest {
                    http_method: "GET".into(),
                    url: Url {
                        url_string: format!("https://example.com/{n}"),
                    },
                    version: "HTTP/2".into(),
                },
                status: Some(200),
                traffic: Traffic::default(),
                tunnel_uid: uid.into(),
                details: RequestDetails {
                    rule: "allowed_domains:web".into(),
                    credential: None,
                    error: None,
                    budget: None,
                    url_bytes: None,
                },
            };
            serde_json::to_value(RequestRecord::new(r, "proxy", "0")).unwrap()
        };
        let mut out = vec![opening];
        out.extend((0..recorded).map(request));
        out.push(closing);
        out
    }

    #[test]
    fn requests_of_inspected_tunnels_are_counted_per_tunnel() {
        let kernel = [connection(1, 0, 40001), connection(2, 9, 40002)].concat();
        let proxy = [
            inspected_tunnel(20, 40001, "t1", 3, 3),
            inspected_tunnel(20, 40002, "t2", 2, 2),
        ]
        .concat();
        let c = check_logs(kernel.clone(), proxy);
        assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
        assert_eq!(
            [c.inspected.tunnels, c.inspected.requests, c.matched],
            [2, 5, 2]
        );
        assert!(render(&c).contains(
            "\ninspected: 5 requests in 2 tunnels (0 miscounted, 0 requests naming no tunnel)\n"
        ));
        // A request record lost, and requests naming a tunnel with no record.
        let mut proxy = [
            inspected_tunnel(20, 40001, "t1", 3, 2),
            inspected_tunnel(20, 40002, "t2", 2, 2),
        ]
        .concat();
        proxy.extend(
            inspected_tunnel(30, 40003, "gone", 1, 1)
                .into_iter()
                .skip(1)
                .take(1),
        );
        let c = check_logs(kernel, proxy);
        assert_eq!(c.verdict, Verdict::Discrepancies);
        assert_eq!(c.inspected.miscounted.len(), 1);
        assert_eq!(
            (
                c.inspected.miscounted[0].says,
                c.inspected.miscounted[0].found
            ),
            (3, 2)
        );
        assert_eq!(c.inspected.orphaned.get("gone"), Some(&1));
        let text = render(&c);
        assert!(
            text.contains("tunnel t1 says 3 requests, 2 request records name it"),
            "{text}"
        );
        // A tunnel still open when the proxy died: it never wrote its count, and its request
        // records are its own, not orphans.
        let mut proxy = inspected_tunnel(20, 40001, "t1", 3, 2);
        proxy.pop();
        let c = check_logs(connection(1, 0, 40001), proxy);
        assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
        assert_eq!([c.inspected.tunnels, c.inspected.requests], [1, 2]);
        assert!(c.inspected.orphaned.is_empty() && c.inspected.miscounted.is_empty());
    }

    fn opts() -> Options {
        Options {
            window_ms: DEFAULT_WINDOW_MS,
            nat: vec![],
        }
    }

    fn check_logs(kernel: Vec<Value>, proxy: Vec<Value>) -> CrossCheck {
        check(&log(kernel), &log(proxy), &opts())
    }

    #[test]
    fn every_connection_in_both_logs_is_consistent() {
        let start = LifecycleRecord::new("agent", "0", lifecycle::START, "up".into(), json!({}));
        let lifecycle = serde_json::to_value(start).unwrap();
        let kernel = [
            vec![lifecycle],
            connection(1, 0, 40001),
            connection(2, 9, 40002),
        ]
        .concat();
        let c = check_logs(kernel, vec![proxied(20, 40001), proxied(20, 40002)]);
        assert_eq!(c.verdict, Verdict::Consistent);
        assert_eq!(
            [c.matched, c.proxy_records, c.kernel_proxy_connections],
            [2; 3]
        );
        let text = render(&c);
        let summary = "\nmatched: 2 of 2 proxy records (100.0%), 2 of 2 kernel connections to";
        assert!(text.contains(summary), "{text}");
        assert!(text.ends_with("\nverdict: CONSISTENT\n"), "{text}");
    }

    #[test]
    fn a_tunnel_is_matched_on_its_opening_record_not_twice() {
        let opening = proxied_as(0, 40001, Phase::Opening);
        let opening = with(opening, json!({"unmapped": {"opens": true}}));
        let closing = proxied_as(0, 40001, Phase::Closing);
        let closing = with(closing, json!({"unmapped": {"closes": 1}}));
        let c = check_logs(connection(1, 0, 40001), vec![opening.clone(), closing]);
        assert_eq!((c.matched, c.proxy_records), (1, 1));
        assert_eq!(c.verdict, Verdict::Consistent);
        // Opened and never closed (the proxy died mid-tunnel): matched all the same.
        let c = check_logs(connection(1, 0, 40001), vec![opening]);
        assert_eq!((c.matched, c.verdict), (1, Verdict::Consistent));
    }

    #[test]
    fn a_proxy_record_with_no_kernel_record_is_a_discrepancy() {
        let stranger = json!({"src_endpoint": {"ip": "10.0.0.9"}});
        let stranger = with(proxied(0, 50000), stranger);
        let c = check_logs(connection(1, 0, 40001), vec![proxied(0, 40001), stranger]);
        assert_eq!(c.verdict, Verdict::Discrepancies);
        assert!(c.kernel_unmatched.is_empty());
        assert_eq!(c.proxy_unmatched.len(), 1);
        let u = &c.proxy_unmatched[0];
        assert_eq!((u.line, u.client.to_string()), (2, "10.0.0.9:50000".into()));
        assert_eq!(u.destination, "example.com:443");
        assert_eq!(u.rule, "allowed_domains:web");
    }

    #[test]
    fn a_kernel_connection_with_no_proxy_record_is_a_discrepancy() {
        let kernel = [connection(1, 0, 40001), connection(2, 10, 40002)].concat();
        let c = check_logs(kernel, vec![proxied(0, 40001)]);
        assert_eq!(c.verdict, Verdict::Discrepancies);
        assert_eq!(c.kernel_unmatched.len(), 1);
        let u = &c.kernel_unmatched[0];
        assert_eq!((u.line, u.cookie, u.pid), (4, 2, 42));
        assert_eq!(u.process, "curl");
        let item = "cookie 2  10.0.0.5:40002 -> 10.0.0.1:3128  pid 42 curl\n";
        assert!(render(&c).contains(item), "{}", render(&c));
    }

    #[test]
    fn an_established_record_without_its_attempt_is_a_discrepancy() {
        let listed = json!({"unmapped": {"reason": "listed_endpoint"}});
        let kernel = vec![
            established(1, 0, 40001),
            // Informational only: a connect that never completed, and a direct connection.
            with(attempt(2, 0), json!({"unmapped": {"hook": "connect6"}})),
            with(attempt(3, 0), listed.clone()),
            with(established(3, 0, 40100), listed),
        ];
        let c = check_logs(kernel, vec![proxied(0, 40001)]);
        assert_eq!((c.matched, c.verdict), (1, Verdict::Discrepancies));
        assert_eq!(c.established_without_attempt.len(), 1);
        assert_eq!(c.established_without_attempt[0].cookie, 1);
        assert_eq!(c.allowed_never_connected, 1);
        assert_eq!(c.direct_listed_connections, 1);
    }

    #[test]
    fn a_kernel_record_outside_the_window_does_not_match() {
        // The established record is at 1 ms.
        let kernel = log(connection(1, 0, 40001));
        let proxy = log(vec![proxied(5002, 40001)]);
        let c = check(&kernel, &proxy, &opts());
        assert_eq!(c.matched, 0);
        assert_eq!((c.proxy_unmatched.len(), c.kernel_unmatched.len()), (1, 1));
        let wider = Options {
            window_ms: 5001,
            ..opts()
        };
        assert_eq!(check(&kernel, &proxy, &wider).matched, 1);
    }

    #[test]
    fn nat_maps_kernel_addresses_to_what_the_proxy_saw() {
        let patch = json!({"src_endpoint": {"ip": "203.0.113.5"}, "proxy": {"ip": "198.51.100.1"}});
        let kernel = log(connection(1, 0, 40001));
        let proxy = log(vec![with(proxied(0, 40001), patch)]);
        assert_eq!(check(&kernel, &proxy, &opts()).matched, 0);
        let nat = ["10.0.0.5=203.0.113.5", "10.0.0.1 = 198.51.100.1"];
        let nat = nat.iter().map(|n| n.parse().unwrap()).collect();
        let c = check(&kernel, &proxy, &Options { nat, ..opts() });
        assert_eq!((c.matched, c.verdict), (1, Verdict::Consistent));
        let with_port = "10.0.0.5:1=203.0.113.5".parse::<Nat>();
        assert!(with_port.is_err(), "ports are never translated");
    }

    #[test]
    fn ipv4_mapped_addresses_compare_as_ipv4() {
        let dst = json!({"ip": "::ffff:10.0.0.1", "port": 3128});
        let v6 = json!({"unmapped": {"hook": "connect6"}, "dst_endpoint": dst});
        let src = json!({"src_endpoint": {"ip": "::ffff:10.0.0.5"}, "dst_endpoint": dst});
        let kernel = vec![with(attempt(1, 0), v6), with(established(1, 0, 40001), src)];
        let c = check_logs(kernel, vec![proxied(0, 40001)]);
        assert_eq!((c.matched, c.verdict), (1, Verdict::Consistent));
    }

    #[test]
    fn the_nearest_in_time_wins_when_a_client_port_is_reused() {
        let kernel = [connection(1, 0, 40001), connection(2, 3000, 40001)].concat();
        // The later proxy record comes first; each still gets the connection nearest to it.
        let proxy = vec![proxied(3010, 40001), proxied(2000, 40001)];
        let c = check_logs(kernel.clone(), proxy);
        assert_eq!((c.matched, c.verdict), (2, Verdict::Consistent));
        let c = check_logs(kernel, vec![proxied(2000, 40001)]);
        assert_eq!(c.kernel_unmatched.len(), 1);
        assert_eq!(c.kernel_unmatched[0].cookie, 1);
    }

    #[test]
    fn denied_attempts_group_by_destination_and_process() {
        let dns = ("8.8.8.8", 53);
        let kernel = vec![
            denied(5, "node", hook::SENDMSG4, dns, protocol::UDP),
            denied(0, "ping", hook::SOCK_CREATE, ("0.0.0.0", 0), 255),
            denied(0, "node", hook::SENDMSG4, dns, protocol::UDP),
            denied(1, "curl", hook::CONNECT4, ("1.1.1.1", 443), protocol::TCP),
            denied(9, "python3", hook::SENDMSG4, dns, protocol::UDP),
            denied(3, "ping", hook::LSM_SOCKET_CREATE, ("::", 0), 255),
        ];
        let c = check_logs(kernel, vec![]);
        assert_eq!(c.verdict, Verdict::Consistent, "denials are no discrepancy");
        let got: Vec<_> = c
            .denied
            .iter()
            .map(|g| {
                let dst = g.destination.map_or("-".to_owned(), |d| d.to_string());
                let times = (g.first_time - T0, g.last_time - T0);
                (dst, g.process.as_str(), g.count, times)
            })
            .collect();
        let want = [
            ("-".to_owned(), "ping", 2, (0, 3)),
            ("8.8.8.8:53".to_owned(), "node", 2, (0, 5)),
            ("1.1.1.1:443".to_owned(), "curl", 1, (1, 1)),
            ("8.8.8.8:53".to_owned(), "python3", 1, (9, 9)),
        ];
        assert_eq!(got, want);
        let text = render(&c);
        for row in [
            "\n  COUNT  DESTINATION  PROTO  PROCESS  REASON      FIRST  ",
            "\n      2  -            255    ping     raw_socket  2027-01-15T08:00:00.000Z  ",
            "\n      2  8.8.8.8:53   udp    node     not_listed  2027-01-15T08:00:00.000Z  ",
        ] {
            assert!(text.contains(row), "{row:?} in {text}");
        }
    }

    #[test]
    fn a_broken_chain_is_tampered_even_with_discrepancies() {
        let mut kernel = log(connection(1, 0, 40001));
        let problem = Problem::HashMismatch { line: 2 };
        kernel.report.problems.push(problem);
        let c = check(&kernel, &log(vec![]), &opts());
        assert_eq!(c.verdict, Verdict::Tampered);
        assert_eq!(
            c.kernel_unmatched.len(),
            1,
            "matching runs on a damaged log"
        );
        // A proxy record in the kernel log is reported, not ignored.
        let c = check_logs(vec![proxied(0, 1)], vec![]);
        assert_eq!(c.verdict, Verdict::Discrepancies);
        assert_eq!(c.kernel_log.unreadable.len(), 1);
    }

    #[test]
    fn logs_read_from_files_and_a_deleted_line_is_tampered() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, values: Vec<Value>| {
            let path = dir.path().join(name);
            let (mut w, _) = ChainWriter::open(&path).unwrap();
            for v in values {
                w.append(&v).unwrap();
            }
            w.sync().unwrap();
            path
        };
        let kernel = [connection(1, 0, 40001), connection(2, 10, 40002)].concat();
        let kernel = write("k.jsonl", kernel);
        let proxy = write("p.jsonl", vec![proxied(0, 40001), proxied(10, 40002)]);
        let read = |path| Log::read(path).unwrap();
        let c = check(&read(&kernel), &read(&proxy), &opts());
        assert_eq!((c.matched, c.verdict), (2, Verdict::Consistent));
        let text = render(&c);
        let (k, p) = (kernel.display(), proxy.display());
        let header = format!(
            "cross-check of kernel log {k} against proxy log {p} (window 5000 ms, no NAT)\n"
        );
        assert!(text.starts_with(&header), "{text}");
        assert!(text.contains("\nkernel log: intact, 4 records\nproxy log: intact, 2 records\n"));

        // Someone deletes the proxy record of the second connection.
        let text = std::fs::read_to_string(&proxy).unwrap();
        std::fs::write(&proxy, text.split_inclusive('\n').next().unwrap()).unwrap();
        let c = check(&read(&kernel), &read(&proxy), &opts());
        assert_eq!(c.verdict, Verdict::Tampered);
        assert_eq!(c.kernel_unmatched.len(), 1);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["verdict"], "tampered");
        assert_eq!(json["proxy_log"]["problems"][0]["problem"], "truncated");
        assert!(render(&c).ends_with("\nverdict: TAMPERED\n"));
        assert!(Log::read(&dir.path().join("absent.jsonl")).is_err());
    }
}
