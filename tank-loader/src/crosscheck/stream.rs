//! The cross-check as one pass over every log at once.
//!
//! Each [`Source`] is read a record ahead; the sources are merged by record time (a heap of
//! their next connection record), so the fleet's kernel and proxy logs go by as one stream.
//! Every line feeds its log's chain verifier and its host's (or proxy's) own tallies as it is
//! read; the connections to match wait in a window keyed by 4-tuple. A kernel connection and a
//! proxy record pair when they meet within `window_ms`, nearest in time first. Anything still
//! unpaired once the stream is `window_ms + late_ms` past it leaves the window as a finding,
//! so memory is bounded by that span of time, never by the size of the logs. Findings are all
//! counted and the first `max_listed` of each kind kept.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};

use tank_ebpf_common::chain::{Line, StreamVerifier};
use tank_ebpf_common::event::{hook, reason};
use tank_ebpf_common::ocsf::{protocol, Action, LogName};

use super::record::{Fields, Kind};
use super::{
    DeniedGroup, Fleet, HostCheck, HostFrom, Inspected, KernelConnection, Listed, LogCheck,
    Options, ProxyCheck, ProxyConnection, Source, Summary, TunnelRequests, Unattributed,
    Unreadable, UnrecordedGroup, Verdict,
};
use crate::activity::{self, Activity, Builder};

/// Most denied-attempt groups kept per host; attempts in further groups are counted.
pub const MAX_DENIED_GROUPS: usize = 10_000;

/// How long an allowed connect waits for its `established` record, ms: Linux gives up on a
/// connect after 127 s of SYN retries (`tcp_syn_retries` 6).
const CONNECT_HORIZON_MS: i64 = 130_000;

/// (client as the proxy sees it, the proxy listener it reached).
type Tuple = (SocketAddr, SocketAddr);

/// The hash maps of the hot path (a few lookups per record) hash with foldhash, seeded at
/// random per process: several times cheaper than std's SipHash on these small keys, and a
/// log crafted to collide still cannot know the seed.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Keeps the window's hash map (entries in and out all the time) at most half full, `room`
/// being its capacity when last grown. hashbrown reuses the tombstones of removed entries in
/// place only while at most half full; fuller, once they have used up its free room it
/// doubles, long after the entries stopped growing (the bench's 10M fleet: the map went from
/// 131,072 to 262,144 buckets 613 s of records in, +11 MiB resident and +23 MiB during the
/// copy, which a 1M fleet never reaches). Kept half empty it reaches that size as the window
/// fills, and a steady window never grows it again. (Not for the per-host maps of pending
/// connects: each of a thousand small maps would double again at its own random peak.)
fn half_empty<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, room: &mut usize) {
    if map.len() * 2 >= *room {
        map.reserve((*room).max(4));
        *room = map.capacity();
    }
}

/// Matches the fleet's proxy logs against its kernel logs, reading each source once.
pub fn check(sources: Vec<Source>, opts: &Options) -> io::Result<Fleet> {
    let mut activity = Builder::default();
    let scope = Scope::new(opts);
    let mut cursors: Vec<Cursor> = sources
        .into_iter()
        .enumerate()
        .map(|(i, s)| Cursor::new(s, i as u32, opts.max_listed, &mut activity))
        .collect();
    let mut m = Matcher::new(opts);
    let mut heap = BinaryHeap::new();
    for (i, c) in cursors.iter_mut().enumerate() {
        if let Some(t) = c.advance(&scope, &mut m, &mut activity)? {
            heap.push(Reverse((t, i)));
        }
    }
    let mut now = i64::MIN;
    while let Some(mut top) = heap.peek_mut() {
        let Reverse((t, i)) = *top;
        now = now.max(t);
        m.expire(now, &mut cursors);
        let item = cursors[i]
            .next
            .take()
            .expect("a queued cursor holds its next item");
        m.arrive(i as u32, item);
        // The source's next record takes its place at the top: one sift, not a pop and a push.
        match cursors[i].advance(&scope, &mut m, &mut activity)? {
            Some(t) => *top = Reverse((t, i)),
            None => {
                PeekMut::pop(top);
            }
        }
    }
    m.expire(i64::MAX, &mut cursors);
    for c in &cursors {
        let name = match &c.state {
            State::Host(h) => h.name.as_ref().map(|(n, _)| n.as_str()),
            State::Proxy(p) => p.host.as_deref(),
        };
        if let Some(name) = name {
            activity.rename(c.timeline, name);
        }
    }
    Ok(m.finish(cursors, opts, activity.finish()))
}

/// `--client`: the addresses to keep, in both forms `--nat` relates.
struct Scope {
    nat: Vec<super::Nat>,
    clients: HashSet<IpAddr>,
}

impl Scope {
    fn new(opts: &Options) -> Self {
        let mut clients: HashSet<IpAddr> = opts.clients.iter().map(|c| c.to_canonical()).collect();
        for n in &opts.nat {
            if clients.contains(&n.kernel) || clients.contains(&n.proxy) {
                clients.extend([n.kernel, n.proxy]);
            }
        }
        Self {
            nat: opts.nat.clone(),
            clients,
        }
    }

    /// A kernel-side address as the proxy saw it.
    fn seen(&self, a: SocketAddr) -> SocketAddr {
        let ip = a.ip().to_canonical();
        let nat = self.nat.iter().find(|n| n.kernel == ip);
        SocketAddr::new(nat.map_or(ip, |n| n.proxy), a.port())
    }

    fn keeps(&self, ip: IpAddr) -> bool {
        self.clients.is_empty() || self.clients.contains(&ip)
    }
}

/// A connection waiting in the window for its other half (its tuple is the window's key,
/// not repeated here).
enum Item {
    /// A kernel connection to a proxy (`established`, reason `proxy`, tcp).
    Kernel { conn: KernelConnection },
    /// A proxy record (its opening record for a relayed connection).
    Proxy { conn: PendingProxy },
}

impl Item {
    /// The time it is matched on: the kernel's handshake, the proxy's accept.
    fn time(&self) -> i64 {
        match self {
            Item::Kernel { conn, .. } => conn.time,
            Item::Proxy { conn, .. } => conn.start_time,
        }
    }
}

/// A proxy record held in the window (its log named by index, not by a copy of its label).
struct PendingProxy {
    line: usize,
    seq: u64,
    start_time: i64,
    client: SocketAddr,
    hostname: Option<Box<str>>,
    port: Option<u16>,
    action: Action,
    rule: Box<str>,
}

impl PendingProxy {
    fn listed(&self, log: &str) -> ProxyConnection {
        ProxyConnection {
            log: log.to_owned(),
            line: self.line,
            seq: self.seq,
            start_time: self.start_time,
            client: self.client,
            destination: match (&self.hostname, self.port) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_string(),
                _ => "-".to_owned(),
            },
            action: self.action,
            rule: self.rule.to_string(),
        }
    }
}

/// One source being read: its lines, its chain, its tallies, and its next item to match.
struct Cursor {
    label: String,
    /// Its index among the sources.
    index: u32,
    lines: Box<dyn Iterator<Item = io::Result<Line>> + Send>,
    verifier: StreamVerifier,
    unreadable: Listed<Unreadable>,
    timeline: usize,
    /// The newest record time read from this source.
    clock: i64,
    next: Option<(Tuple, Item)>,
    state: State,
}

enum State {
    Host(Box<Host>),
    Proxy(Box<Proxy>),
}

/// What one kernel log has shown so far.
#[derive(Default)]
struct Host {
    name: Option<(String, HostFrom)>,
    addresses: Vec<IpAddr>,
    in_scope: bool,
    matched: u64,
    kernel_proxy_connections: u64,
    proxy_unmatched: Listed<ProxyConnection>,
    kernel_unmatched: Listed<KernelConnection>,
    established_without_attempt: Listed<KernelConnection>,
    /// Allowed TCP connects waiting for their `established`, by cookie: (time, to a proxy,
    /// established).
    attempts: HashMap<u64, (i64, bool, bool)>,
    attempt_order: VecDeque<(i64, u64)>,
    allowed_never_connected: u64,
    direct_listed_connections: u64,
    denied: HashMap<DeniedKey, DeniedGroup>,
    denied_ungrouped: u64,
    unrecorded: Listed<UnrecordedGroup>,
    unrecorded_attempts: u64,
}

type DeniedKey = (Option<SocketAddr>, u16, String, u8);

/// What one proxy log has shown so far.
#[derive(Default)]
struct Proxy {
    max_listed: usize,
    host: Option<String>,
    proxy_records: u64,
    matched: u64,
    unattributed: u64,
    /// Inspected tunnels open now, and request records per tunnel not yet closed.
    open_tunnels: HashSet<String>,
    requests: HashMap<String, u64>,
    inspected: Inspected,
}

impl Cursor {
    fn new(source: Source, index: u32, max_listed: usize, activity: &mut Builder) -> Self {
        let (log, state) = match source.kind {
            LogName::Kernel => ("kernel", State::Host(Box::default())),
            LogName::Proxy => (
                "proxy",
                State::Proxy(Box::new(Proxy {
                    max_listed,
                    ..Proxy::default()
                })),
            ),
        };
        Self {
            index,
            timeline: activity.timeline(log, &source.label),
            label: source.label,
            lines: source.lines,
            verifier: StreamVerifier::new(source.anchor).starting_at(source.starts_at),
            unreadable: Listed::default(),
            clock: i64::MIN,
            next: None,
            state,
        }
    }

    /// Reads on to the next record to match and holds it in `next`; returns its record time
    /// (the merge's key), or `None` at the end of the log.
    fn advance(
        &mut self,
        scope: &Scope,
        m: &mut Matcher,
        activity: &mut Builder,
    ) -> io::Result<Option<i64>> {
        while let Some(line) = self.lines.next() {
            let bytes =
                match line.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.label)))? {
                    Line::File(path) => {
                        self.verifier.file(&path);
                        continue;
                    }
                    Line::Partial => {
                        self.verifier.partial();
                        continue;
                    }
                    Line::Complete(bytes) => bytes,
                };
            let mut fields = match Fields::parse(&bytes) {
                Ok(f) => f,
                Err(e) => {
                    // Not of the shape the check reads: the chain still judges it, and a
                    // record the check cannot read is listed, never skipped.
                    if let Some(r) = self.verifier.line(&bytes) {
                        self.unreadable(m, r.line, r.seq, e.to_string());
                    }
                    continue;
                }
            };
            let chain = fields.chain();
            let Some((line, seq)) = self.verifier.chained(&bytes, chain) else {
                continue;
            };
            let time = fields.time.unwrap_or(self.clock);
            self.clock = self.clock.max(time);
            let at = At {
                line,
                seq,
                source: self.index,
                timeline: self.timeline,
            };
            let item = match &mut self.state {
                State::Host(h) => {
                    let r = h.record(&fields, at, scope, m, activity);
                    h.expire_attempts(
                        self.clock
                            .saturating_sub(CONNECT_HORIZON_MS)
                            .saturating_sub(m.hold),
                    );
                    r
                }
                State::Proxy(p) => p.record(&fields, at, scope, activity),
            };
            match item {
                Ok(Some(item)) => {
                    self.next = Some(item);
                    return Ok(Some(time));
                }
                Ok(None) => {}
                Err(why) => self.unreadable(m, line, seq, why),
            }
        }
        Ok(None)
    }

    fn unreadable(&mut self, m: &Matcher, line: usize, seq: u64, why: String) {
        self.unreadable
            .push_with(m.max_listed, || Unreadable { line, seq, why });
    }
}

/// Where a record is: its line and `seq`, its source and the source's timeline.
#[derive(Clone, Copy)]
struct At {
    line: usize,
    seq: u64,
    source: u32,
    timeline: usize,
}

impl Host {
    /// Takes in one kernel log record; returns a connection to match, or why the record
    /// cannot be read.
    fn record(
        &mut self,
        f: &Fields,
        at: At,
        scope: &Scope,
        m: &mut Matcher,
        activity: &mut Builder,
    ) -> Result<Option<(Tuple, Item)>, String> {
        let At {
            line,
            seq,
            source,
            timeline,
        } = at;
        let time = f.time.ok_or("no time")?;
        match f.kind() {
            Kind::Kernel => {}
            Kind::Unrecorded => {
                let count = f.count.ok_or("no count")?;
                self.unrecorded_attempts += count;
                self.unrecorded.push_with(m.max_listed, || UnrecordedGroup {
                    line,
                    seq,
                    counter: f
                        .unmapped
                        .unrecorded
                        .as_deref()
                        .unwrap_or_default()
                        .to_owned(),
                    count,
                    start_time: f.start_time,
                    end_time: f.end_time.unwrap_or(time),
                });
                return Ok(None);
            }
            Kind::Lifecycle {
                log: LogName::Kernel,
                start,
            } => {
                let named = matches!(self.name, Some((_, HostFrom::StartRecord)));
                if let (true, false, Some(host)) = (start, named, &f.device.hostname) {
                    self.name = Some((host.to_string(), HostFrom::StartRecord));
                }
                self.name_from_first(f);
                return Ok(None);
            }
            Kind::Lifecycle { .. } | Kind::Proxy | Kind::Request => {
                return Err("a proxy record in the kernel log".to_owned())
            }
            Kind::Unknown => return Err(unknown(f)),
        }
        self.name_from_first(f);
        let dst = f
            .dst_endpoint
            .addr()
            .ok_or("dst_endpoint has no ip and port")?;
        let (Some(hook), Some(action)) = (f.unmapped.hook, f.action) else {
            return Err("no unmapped.hook or action".to_owned());
        };
        let (cookie, why) = (
            f.unmapped.cookie.unwrap_or_default(),
            f.unmapped.reason.map_or(0, |r| r.0),
        );
        let tcp = f.connection_info.protocol_num == Some(protocol::TCP);
        let counted = match (hook.0, action) {
            (hook::ESTABLISHED, _) => activity::Kind::Connection,
            (_, Action::Allowed) => activity::Kind::AttemptAllowed,
            (_, Action::Denied) => activity::Kind::AttemptDenied,
        };
        activity.add(timeline, counted, time);
        match (hook.0, action) {
            (hook::ESTABLISHED, _) => {
                let src = f.src_endpoint.addr();
                let conn = || KernelConnection {
                    line,
                    seq,
                    time,
                    cookie,
                    src,
                    dst,
                    pid: f.actor.process.pid,
                    process: f.actor.process.name.to_string(),
                };
                match self.attempts.get_mut(&cookie) {
                    Some(a) => a.2 = true,
                    None => self
                        .established_without_attempt
                        .push_with(m.max_listed, conn),
                }
                if let Some(src) = src {
                    self.learn(scope.seen(src).ip(), scope, m, source);
                }
                self.direct_listed_connections += u64::from(why == reason::LISTED_ENDPOINT);
                if why != reason::PROXY || !tcp {
                    return Ok(None);
                }
                match src {
                    Some(src) if !scope.keeps(src.ip()) && !scope.keeps(scope.seen(src).ip()) => {
                        Ok(None)
                    }
                    Some(src) => {
                        self.kernel_proxy_connections += 1;
                        Ok(Some((
                            (scope.seen(src), scope.seen(dst)),
                            Item::Kernel { conn: conn() },
                        )))
                    }
                    // Nothing to match it by: it can have no proxy record.
                    None => {
                        self.kernel_proxy_connections += 1;
                        self.kernel_unmatched.push_with(m.max_listed, conn);
                        Ok(None)
                    }
                }
            }
            (hook::CONNECT4 | hook::CONNECT6, Action::Allowed) if tcp => {
                if let std::collections::hash_map::Entry::Vacant(e) = self.attempts.entry(cookie) {
                    e.insert((time, why == reason::PROXY, false));
                    self.attempt_order.push_back((time, cookie));
                }
                Ok(None)
            }
            (_, Action::Denied) => {
                self.count_denied(f, dst, time);
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn name_from_first(&mut self, f: &Fields) {
        if let (None, Some(host)) = (&self.name, &f.device.hostname) {
            self.name = Some((host.to_string(), HostFrom::FirstRecord));
        }
    }

    /// A client address this host's own connections show.
    fn learn(&mut self, ip: IpAddr, scope: &Scope, m: &mut Matcher, source: u32) {
        if self.addresses.contains(&ip) {
            return;
        }
        self.addresses.push(ip);
        self.in_scope |= scope.keeps(ip);
        let hosts = m.hosts_of.entry(ip).or_default();
        if !hosts.contains(&source) {
            hosts.push(source);
        }
    }

    /// Lets go of connects older than `before`: a socket allowed to a proxy that never
    /// established is counted.
    fn expire_attempts(&mut self, before: i64) {
        while let Some(&(t, cookie)) = self.attempt_order.front() {
            if t >= before {
                break;
            }
            self.attempt_order.pop_front();
            if let Some((_, to_proxy, established)) = self.attempts.remove(&cookie) {
                self.allowed_never_connected += u64::from(to_proxy && !established);
            }
        }
    }

    fn count_denied(&mut self, f: &Fields, dst: SocketAddr, time: i64) {
        // Socket creation has no destination: the kernel records 0.0.0.0 or :: port 0.
        let destination = (!(dst.ip().is_unspecified() && dst.port() == 0)).then_some(dst);
        let proto = f.connection_info.protocol_num.unwrap_or_default();
        let why = f.unmapped.reason.map_or(0, |r| r.0);
        let key = (destination, proto, f.actor.process.name.to_string(), why);
        if self.denied.len() >= MAX_DENIED_GROUPS && !self.denied.contains_key(&key) {
            self.denied_ungrouped += 1;
            return;
        }
        let g = self.denied.entry(key).or_insert_with(|| DeniedGroup {
            destination,
            protocol: protocol::name(proto).map_or_else(|| proto.to_string(), str::to_owned),
            process: f.actor.process.name.to_string(),
            reason: reason::name(why).to_owned(),
            count: 0,
            first_time: time,
            last_time: time,
        });
        g.count += 1;
        g.first_time = g.first_time.min(time);
        g.last_time = g.last_time.max(time);
    }

    fn finish(mut self, label: String, log: LogCheck) -> HostCheck {
        self.expire_attempts(i64::MAX);
        let (host, host_from) = self.name.take().unwrap_or((label, HostFrom::Label));
        let findings = !(self.proxy_unmatched.is_empty()
            && self.kernel_unmatched.is_empty()
            && self.established_without_attempt.is_empty()
            && log.unreadable.is_empty());
        let mut denied: Vec<DeniedGroup> = self.denied.into_values().collect();
        denied.sort_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| {
                (a.destination, &a.protocol, &a.process, &a.reason).cmp(&(
                    b.destination,
                    &b.protocol,
                    &b.process,
                    &b.reason,
                ))
            })
        });
        HostCheck {
            host,
            host_from,
            verdict: Verdict::of(log.intact, findings),
            log,
            addresses: self.addresses,
            matched: self.matched,
            kernel_proxy_connections: self.kernel_proxy_connections,
            proxy_unmatched: self.proxy_unmatched,
            kernel_unmatched: self.kernel_unmatched,
            established_without_attempt: self.established_without_attempt,
            allowed_never_connected: self.allowed_never_connected,
            direct_listed_connections: self.direct_listed_connections,
            denied,
            denied_ungrouped: self.denied_ungrouped,
            unrecorded: self.unrecorded,
            unrecorded_attempts: self.unrecorded_attempts,
        }
    }
}

fn unknown(f: &Fields) -> String {
    format!(
        "not a record of tank's (class_uid {}, log_name {})",
        f.class_uid.map_or("-".to_owned(), |c| c.to_string()),
        f.metadata.log_name.map_or("-", LogName::as_str)
    )
}

impl Proxy {
    /// Takes in one proxy log record; returns a connection to match, or why the record cannot
    /// be read.
    fn record(
        &mut self,
        f: &Fields,
        at: At,
        scope: &Scope,
        activity: &mut Builder,
    ) -> Result<Option<(Tuple, Item)>, String> {
        let At {
            line,
            seq,
            timeline,
            ..
        } = at;
        match f.kind() {
            Kind::Proxy => {}
            Kind::Request => {
                self.inspected.requests += 1;
                let uid = f.metadata.correlation_uid.as_deref().unwrap_or_default();
                match self.requests.get_mut(uid) {
                    Some(n) => *n += 1,
                    None => {
                        self.requests.insert(uid.to_owned(), 1);
                    }
                }
                return Ok(None);
            }
            Kind::Lifecycle {
                log: LogName::Proxy,
                ..
            } => return Ok(None),
            Kind::Lifecycle { .. } | Kind::Kernel | Kind::Unrecorded => {
                return Err("a kernel record in the proxy log".to_owned())
            }
            Kind::Unknown => return Err(unknown(f)),
        }
        if self.host.is_none() {
            self.host = f.device.hostname.as_deref().map(str::to_owned);
        }
        let (Some(client), Some(listener)) = (f.src_endpoint.addr(), f.proxy.addr()) else {
            return Err("src_endpoint or proxy has no ip and port".to_owned());
        };
        let (Some(start_time), Some(action)) = (f.start_time, f.action) else {
            return Err("no start_time or action".to_owned());
        };
        let opens = f.unmapped.opens == Some(true);
        if let (Some(uid), Some("inspected")) = (&f.metadata.uid, f.unmapped.tunnel.as_deref()) {
            self.tunnel(uid, opens, line, f.unmapped.requests);
        }
        // A tunnel is matched on its opening record; its closing record repeats the 4-tuple.
        if f.unmapped.closes.is_some() || !scope.keeps(client.ip()) {
            return Ok(None);
        }
        let allowed = action == Action::Allowed;
        let counted = if allowed {
            activity::Kind::ProxyAllowed
        } else {
            activity::Kind::ProxyDenied
        };
        let rule = f.unmapped.rule.as_deref().unwrap_or_default();
        activity.add(timeline, counted, start_time);
        activity.rule(rule, allowed);
        self.proxy_records += 1;
        Ok(Some((
            (client, listener),
            Item::Proxy {
                conn: PendingProxy {
                    line,
                    seq,
                    start_time,
                    client,
                    hostname: f.dst_endpoint.hostname.as_deref().map(Box::from),
                    port: f.dst_endpoint.port,
                    action,
                    rule: rule.into(),
                },
            },
        )))
    }

    /// An inspected tunnel's record: its opening, or its end with the count of its requests,
    /// held against the request records naming it. The count is in the closing record; a
    /// tunnel opened and never closed (the proxy died) has none, so its requests are neither
    /// miscounted nor orphaned.
    fn tunnel(&mut self, uid: &str, opens: bool, line: usize, requests: Option<u64>) {
        if opens {
            self.inspected.tunnels += 1;
            self.open_tunnels.insert(uid.to_owned());
            return;
        }
        if !self.open_tunnels.remove(uid) {
            self.inspected.tunnels += 1;
        }
        let says = requests.unwrap_or(0);
        let found = self.requests.remove(uid).unwrap_or(0);
        if found != says {
            self.inspected.miscounted.push(
                TunnelRequests {
                    line,
                    uid: uid.to_owned(),
                    says,
                    found,
                },
                self.max_listed,
            );
        }
    }

    fn finish(mut self, log: LogCheck) -> ProxyCheck {
        for uid in &self.open_tunnels {
            self.requests.remove(uid);
        }
        let mut orphaned: Vec<(String, u64)> = self.requests.into_iter().collect();
        orphaned.sort();
        orphaned.truncate(self.max_listed);
        self.inspected.orphaned = orphaned.into_iter().collect();
        let i = &self.inspected;
        let findings = !(i.miscounted.is_empty()
            && i.orphaned.is_empty()
            && log.unreadable.is_empty()
            && self.unattributed == 0);
        ProxyCheck {
            host: self.host.unwrap_or_default(),
            verdict: Verdict::of(log.intact, findings),
            log,
            proxy_records: self.proxy_records,
            matched: self.matched,
            unattributed: self.unattributed,
            inspected: self.inspected,
        }
    }
}

/// The window: the connections of the last `window_ms + late_ms`, by 4-tuple, each paired
/// with its nearest other half so far. A pair is final when its connections leave the window;
/// until then a newcomer nearer in time to one of them takes it over (a client port reused
/// within the window, or logs listing connections out of time order), so the pairs nearest
/// in time win as if every record had been read first.
struct Matcher {
    window: u64,
    /// How long past its time a connection is held: the window plus the lateness allowed.
    hold: i64,
    max_listed: usize,
    tuples: HashMap<Tuple, Vec<Held>>,
    tuples_room: usize,
    /// (time it leaves, id, its tuple) of everything held, soonest first.
    leaving: BinaryHeap<Reverse<(i64, u64, Tuple)>>,
    next_id: u64,
    held: u64,
    peak: u64,
    /// The hosts whose connections show each client address (as the proxy sees it).
    hosts_of: HashMap<IpAddr, Vec<u32>>,
    /// Unmatched proxy records whose address no single host showed (yet), by address and
    /// proxy log; the first of them listed.
    strays: HashMap<(IpAddr, u32), u64>,
    stray_list: Vec<(u32, PendingProxy)>,
}

/// A connection in the window.
struct Held {
    id: u64,
    /// The source it was read from.
    source: u32,
    time: i64,
    kernel_side: bool,
    /// The other half it is paired with, and whether that pair is final (one of them left).
    mate: Option<(u64, bool)>,
    item: Item,
}

impl Matcher {
    fn new(opts: &Options) -> Self {
        Self {
            window: opts.window_ms,
            hold: (opts.window_ms.saturating_add(opts.late_ms)).min(i64::MAX as u64 / 2) as i64,
            max_listed: opts.max_listed,
            tuples: HashMap::default(),
            tuples_room: 0,
            leaving: BinaryHeap::new(),
            next_id: 0,
            held: 0,
            peak: 0,
            hosts_of: HashMap::default(),
            strays: HashMap::default(),
            stray_list: Vec::new(),
        }
    }

    /// A connection read from `cursors[source]` enters the window, paired with the nearest
    /// other half within the window that is free, or paired with one farther from it.
    fn arrive(&mut self, source: u32, (tuple, item): (Tuple, Item)) {
        let time = item.time();
        let kernel_side = matches!(item, Item::Kernel { .. });
        let id = self.next_id;
        self.next_id += 1;
        // Most tuples hold one pair: room for two, not the four a first push reserves.
        let held = self
            .tuples
            .entry(tuple)
            .or_insert_with(|| Vec::with_capacity(2));
        let distance = |a: i64, b: i64| a.abs_diff(b);
        let best = held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.kernel_side != kernel_side)
            .filter_map(|(i, h)| {
                let dt = distance(h.time, time);
                let free = match h.mate {
                    None => true,
                    Some((_, true)) => return None,
                    Some((mate, false)) => {
                        let mate = held.iter().find(|m| m.id == mate).expect("mates are held");
                        if dt >= distance(h.time, mate.time) {
                            return None;
                        }
                        false
                    }
                };
                (dt <= self.window).then_some((dt, !free, i))
            })
            .min();
        let mut mate = None;
        if let Some((_, _, i)) = best {
            let other = &mut held[i];
            let jilted = other.mate.replace((id, false)).map(|(m, _)| m);
            mate = Some((other.id, false));
            if let Some(jilted) = jilted {
                Self::repair(held, jilted, self.window, id);
            }
        }
        held.push(Held {
            id,
            source,
            time,
            kernel_side,
            mate,
            item,
        });
        half_empty(&mut self.tuples, &mut self.tuples_room);
        self.leaving
            .push(Reverse((time.saturating_add(self.hold), id, tuple)));
        self.held += 1;
        self.peak = self.peak.max(self.held);
    }

    /// `jilted` lost its other half to a nearer newcomer: it takes the nearest free one left
    /// within the window, if any (`newcomer` is not free yet: it is being placed).
    fn repair(held: &mut [Held], jilted: u64, window: u64, newcomer: u64) {
        let j = held
            .iter()
            .position(|h| h.id == jilted)
            .expect("mates are held");
        let (side, time) = (held[j].kernel_side, held[j].time);
        held[j].mate = None;
        let best = held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.kernel_side != side && h.mate.is_none() && h.id != newcomer)
            .map(|(i, h)| (h.time.abs_diff(time), i))
            .filter(|(dt, _)| *dt <= window)
            .min();
        if let Some((_, i)) = best {
            held[i].mate = Some((jilted, false));
            held[j].mate = Some((held[i].id, false));
        }
    }

    /// Lets go of every connection due to leave before `now` (the newest record time the
    /// merge has reached): a paired one is matched, for good; an unpaired one is a finding.
    fn expire(&mut self, now: i64, cursors: &mut [Cursor]) {
        while let Some(Reverse((t, id, tuple))) = self.leaving.peek().copied() {
            if t >= now {
                break;
            }
            self.leaving.pop();
            let held = self
                .tuples
                .get_mut(&tuple)
                .expect("held connections have a tuple");
            let i = held
                .iter()
                .position(|h| h.id == id)
                .expect("held until it leaves");
            let gone = held.swap_remove(i);
            match gone.mate {
                Some((mate, settled)) => {
                    if !settled {
                        // The pair is final: count it once, when its first half leaves.
                        let m = held
                            .iter_mut()
                            .find(|h| h.id == mate)
                            .expect("mates are held");
                        m.mate = Some((gone.id, true));
                        let (host, proxy) = if gone.kernel_side {
                            (gone.source, m.source)
                        } else {
                            (m.source, gone.source)
                        };
                        if let State::Host(h) = &mut cursors[host as usize].state {
                            h.matched += 1;
                        }
                        if let State::Proxy(p) = &mut cursors[proxy as usize].state {
                            p.matched += 1;
                        }
                    }
                    if held.is_empty() {
                        self.tuples.remove(&tuple);
                    }
                }
                None => {
                    if held.is_empty() {
                        self.tuples.remove(&tuple);
                    }
                    self.unmatched(gone, cursors);
                }
            }
            self.held -= 1;
        }
    }

    fn unmatched(&mut self, held: Held, cursors: &mut [Cursor]) {
        match held.item {
            Item::Kernel { conn, .. } => {
                if let State::Host(h) = &mut cursors[held.source as usize].state {
                    h.kernel_unmatched.push(conn, self.max_listed);
                }
            }
            Item::Proxy { conn, .. } => {
                match self.hosts_of.get(&conn.client.ip()).map(Vec::as_slice) {
                    Some(&[host]) => {
                        let log = &cursors[held.source as usize].label;
                        let listed = conn.listed(log);
                        if let State::Host(h) = &mut cursors[host as usize].state {
                            h.proxy_unmatched.push(listed, self.max_listed);
                        }
                    }
                    _ => {
                        *self
                            .strays
                            .entry((conn.client.ip(), held.source))
                            .or_default() += 1;
                        if self.stray_list.len() < self.max_listed {
                            self.stray_list.push((held.source, conn));
                        }
                    }
                }
            }
        }
    }

    fn finish(mut self, cursors: Vec<Cursor>, opts: &Options, activity: Activity) -> Fleet {
        let labels: Vec<String> = cursors.iter().map(|c| c.label.clone()).collect();
        let mut hosts: Vec<Option<Host>> = Vec::new();
        let mut proxies: Vec<Option<Proxy>> = Vec::new();
        let mut logs = Vec::new();
        for c in cursors {
            logs.push(Some(LogCheck::new(
                c.label,
                c.verifier.finish(),
                c.unreadable,
            )));
            match c.state {
                State::Host(h) => {
                    hosts.push(Some(*h));
                    proxies.push(None);
                }
                State::Proxy(p) => {
                    hosts.push(None);
                    proxies.push(Some(*p));
                }
            }
        }
        // Strays whose address one host showed after all (later in its log): that host's.
        let mut unattributed = Listed::default();
        let host_name = |hosts: &[Option<Host>], i: u32| {
            hosts[i as usize]
                .as_ref()
                .and_then(|h| h.name.as_ref().map(|(n, _)| n.clone()))
                .unwrap_or_else(|| labels[i as usize].clone())
        };
        let mut strays: Vec<_> = self.strays.into_iter().collect();
        strays.sort();
        for ((ip, proxy), n) in strays {
            match self.hosts_of.get(&ip).map(Vec::as_slice) {
                Some(&[host]) => {
                    let h = hosts[host as usize].as_mut().expect("a host");
                    h.proxy_unmatched.count += n;
                }
                _ => {
                    unattributed.count += n;
                    if let Some(p) = proxies[proxy as usize].as_mut() {
                        p.unattributed += n;
                    }
                }
            }
        }
        for (proxy, conn) in std::mem::take(&mut self.stray_list) {
            let listed = conn.listed(&labels[proxy as usize]);
            match self.hosts_of.get(&conn.client.ip()).map(Vec::as_slice) {
                Some(&[host]) => {
                    let h = hosts[host as usize].as_mut().expect("a host");
                    if h.proxy_unmatched.listed.len() < self.max_listed {
                        h.proxy_unmatched.listed.push(listed);
                    }
                }
                claimed => {
                    let claimed_by = claimed
                        .unwrap_or_default()
                        .iter()
                        .map(|&h| host_name(&hosts, h))
                        .collect();
                    unattributed.listed.push(Unattributed {
                        record: listed,
                        claimed_by,
                    });
                }
            }
        }
        let mut fleet_hosts = Vec::new();
        let mut fleet_proxies = Vec::new();
        let mut left_out = Vec::new();
        for (i, (h, p)) in hosts.into_iter().zip(proxies).enumerate() {
            let log = logs[i].take().expect("one log per source");
            if let Some(h) = h {
                if opts.clients.is_empty() || h.in_scope {
                    fleet_hosts.push(h.finish(labels[i].clone(), log));
                } else {
                    left_out.push(labels[i].clone());
                }
            } else if let Some(p) = p {
                fleet_proxies.push(p.finish(log));
            }
        }
        let mut s = Summary {
            hosts: fleet_hosts.len() as u64,
            proxies: fleet_proxies.len() as u64,
            unattributed: unattributed.count,
            ..Summary::default()
        };
        for h in &fleet_hosts {
            s.hosts_with_findings += u64::from(h.verdict != Verdict::Consistent);
            s.tampered_logs += u64::from(!h.log.intact);
            s.matched += h.matched;
            s.kernel_proxy_connections += h.kernel_proxy_connections;
            s.proxy_unmatched += h.proxy_unmatched.count;
            s.kernel_unmatched += h.kernel_unmatched.count;
            s.established_without_attempt += h.established_without_attempt.count;
        }
        for p in &fleet_proxies {
            s.tampered_logs += u64::from(!p.log.intact);
            s.proxy_records += p.proxy_records;
        }
        let verdict = fleet_hosts
            .iter()
            .map(|h| h.verdict)
            .chain(fleet_proxies.iter().map(|p| p.verdict))
            .chain((!unattributed.is_empty()).then_some(Verdict::Discrepancies))
            .max()
            .unwrap_or(Verdict::Consistent);
        Fleet {
            verdict,
            window_ms: opts.window_ms,
            late_ms: opts.late_ms,
            nat: opts.nat.clone(),
            clients: opts.clients.clone(),
            summary: s,
            hosts: fleet_hosts,
            proxies: fleet_proxies,
            unattributed,
            left_out,
            peak_window: self.peak,
            activity,
        }
    }
}
