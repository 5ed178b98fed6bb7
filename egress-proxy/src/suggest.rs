//! `egress-proxy policy suggest`: the smallest policy that would have allowed what the audit
//! logs show the agent doing.
//!
//! Sites roll tank out by watching first and writing the allowlist after; this writes it from
//! the records. The logs are read through the chain (a log that does not verify is refused:
//! a policy is not learnt from records that may have been edited) and parsed as the record
//! types of [`tank_ebpf_common::ocsf::proxy`]. What is suggested:
//! - one rule per name allowed, with the ports it was reached on; never a name that was
//!   refused (those are listed as comments with the reason and a count, so an operator sees
//!   what the agent asked for and decides);
//! - methods and path prefixes where requests were seen (plain HTTP, inspected tunnels);
//! - `*.parent` only where at least `wildcard_at` sibling names were seen under it and no
//!   denied name was, said so in a comment;
//! - budgets: the peak per client host over the window the budget uses (sliding), times the
//!   margin, rounded up;
//! - counts and first and last seen as comments.
//!
//! The output is a whole config (`listen`, `client_networks` and `audit_log` from the records)
//! that `egress-proxy check` accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tank_ebpf_common::ocsf::proxy::{ConnectionRecord, RequestKind, RequestRecord, TunnelKind};
use tank_ebpf_common::ocsf::{self, Kind};

use crate::addr::{classify, AddrClass};
use crate::budget::{format_ceiling, Ceiling};

/// What to learn from.
#[derive(Clone, Debug)]
pub struct Options {
    /// The proxy audit logs.
    pub logs: Vec<PathBuf>,
    /// Records ending before this (ms since the epoch) are left out.
    pub since: Option<i64>,
    /// Records ending after this are left out.
    pub until: Option<i64>,
    /// Budgets are the observed peak times this.
    pub margin: f64,
    /// Sibling names under one parent from which a wildcard is suggested.
    pub wildcard_at: usize,
}

/// Windows of the suggested budgets.
const BYTES_WINDOW_SECS: u64 = 3600;
const REQUESTS_WINDOW_SECS: u64 = 60;

#[derive(Default)]
struct Seen {
    ports: BTreeSet<u16>,
    tunnels: u64,
    http: u64,
    requests: u64,
    methods: BTreeMap<String, u64>,
    prefixes: BTreeSet<String>,
    inspected: bool,
    private: Option<IpAddr>,
    first: i64,
    last: i64,
    /// (time, client, bytes out, bytes in) per connection or request.
    events: Vec<(i64, IpAddr, u64, u64)>,
    /// Longest opaque tunnel, ms.
    longest_ms: i64,
}

impl Seen {
    fn at(&mut self, start: i64, end: i64) {
        if self.first == 0 || start < self.first {
            self.first = start;
        }
        self.last = self.last.max(end);
    }
}

/// Everything learnt from the logs.
#[derive(Default)]
struct Learnt {
    names: BTreeMap<String, Seen>,
    /// Names a `denied_domains` rule refused: no wildcard covers them.
    denied: BTreeSet<String>,
    /// `name (reason)` of refusals, with counts.
    refused: BTreeMap<String, u64>,
    listen: BTreeSet<String>,
    clients: BTreeSet<IpAddr>,
    records: u64,
    /// Opening records, and closing records: a relayed connection is learnt from its closing
    /// record, which holds its bytes and duration.
    opened: u64,
    closed: u64,
    first: i64,
    last: i64,
}

/// Reads the logs and writes the suggested config.
pub fn suggest(opts: &Options) -> anyhow::Result<String> {
    if opts.logs.is_empty() {
        bail!("name at least one audit log");
    }
    let mut learnt = Learnt::default();
    // Inspected tunnels' uid → name, for their requests.
    let mut tunnels: BTreeMap<String, String> = BTreeMap::new();
    let mut requests: Vec<RequestRecord> = Vec::new();
    for log in &opts.logs {
        let records = ocsf::read_verified(log, "egress-proxy audit verify")
            .with_context(|| format!("cannot learn from `{}`", log.display()))?;
        for r in records {
            match r {
                Kind::Proxy(c) if in_range(opts, c.time) => {
                    if let Some(uid) = &c.metadata.uid {
                        if let Some(h) = &c.dst_endpoint.hostname {
                            tunnels.insert(uid.clone(), h.clone());
                        }
                    }
                    learnt.connection(&c);
                }
                Kind::Request(r) if in_range(opts, r.time) => requests.push(*r),
                _ => {}
            }
        }
    }
    for r in &requests {
        learnt.request(r, &tunnels);
    }
    Ok(render(&learnt, opts))
}

fn in_range(opts: &Options, t: i64) -> bool {
    opts.since.is_none_or(|s| t >= s) && opts.until.is_none_or(|u| t <= u)
}

impl Learnt {
    fn connection(&mut self, c: &ConnectionRecord) {
        if c.end_time.is_none() {
            self.opened += 1;
            return;
        }
        if c.activity_id == ocsf::network_activity::CLOSE {
            self.closed += 1;
        }
        self.records += 1;
        if self.first == 0 || c.start_time < self.first {
            self.first = c.start_time;
        }
        self.last = self.last.max(c.time);
        let rule = c.unmapped.rule.as_str();
        let client = c.src_endpoint.ip;
        let Some(host) = c.dst_endpoint.hostname.clone() else {
            return;
        };
        if c.unmapped.kind == RequestKind::Invalid || rule == "client-network" {
            return;
        }
        if rule.starts_with("denied_domains:") {
            self.denied.insert(host.clone());
        }
        if !c.allowed() || host.parse::<IpAddr>().is_ok() {
            *self.refused.entry(format!("{host} ({rule})")).or_default() += 1;
            return;
        }
        if let (Some(ip), Some(port)) = (c.proxy.ip, c.proxy.port) {
            self.listen
                .insert(std::net::SocketAddr::new(ip, port).to_string());
        }
        if let Some(ip) = client {
            self.clients.insert(ip);
        }
        let seen = self.names.entry(host).or_default();
        seen.at(c.start_time, c.time);
        if let Some(p) = c.dst_endpoint.port {
            seen.ports.insert(p);
        }
        if let Some(ip) = c.dst_endpoint.ip {
            if matches!(classify(ip), AddrClass::Private(_)) {
                seen.private = Some(ip);
            }
        }
        match (c.unmapped.kind, c.unmapped.tunnel) {
            (RequestKind::Http, _) => {
                seen.http += 1;
                if let Some(m) = &c.unmapped.http_method {
                    *seen.methods.entry(m.to_ascii_uppercase()).or_default() += 1;
                }
                if let Some(url) = &c.url {
                    seen.prefixes.insert(prefix_of(path_of(&url.url_string)));
                }
            }
            (_, Some(TunnelKind::Inspected)) => {
                seen.tunnels += 1;
                seen.inspected = true;
                return; // its requests carry the bytes
            }
            _ => {
                seen.tunnels += 1;
                seen.longest_ms = seen.longest_ms.max(c.duration.unwrap_or(0));
            }
        }
        if let Some(ip) = client {
            let t = c.traffic.clone().unwrap_or_default();
            seen.events.push((c.time, ip, t.bytes_out, t.bytes_in));
        }
    }

    fn request(&mut self, r: &RequestRecord, tunnels: &BTreeMap<String, String>) {
        let host = r
            .metadata
            .correlation_uid
            .as_ref()
            .and_then(|u| tunnels.get(u))
            .cloned()
            .or_else(|| r.dst_endpoint.hostname.clone());
        let Some(host) = host else { return };
        let rule = r.unmapped.rule.as_str();
        if rule.starts_with("denied_domains:") {
            self.denied.insert(host.clone());
        }
        if !r.allowed() {
            let what = format!(
                "{host} {} {} ({rule})",
                r.http_request.http_method,
                prefix_of(path_of(&r.http_request.url.url_string))
            );
            *self.refused.entry(what).or_default() += 1;
            return;
        }
        let Some(seen) = self.names.get_mut(&host) else {
            return;
        };
        seen.requests += 1;
        seen.at(r.start_time, r.time);
        *seen
            .methods
            .entry(r.http_request.http_method.to_ascii_uppercase())
            .or_default() += 1;
        seen.prefixes
            .insert(prefix_of(path_of(&r.http_request.url.url_string)));
        if let Some(ip) = r.src_endpoint.ip {
            seen.events
                .push((r.time, ip, r.traffic.bytes_out, r.traffic.bytes_in));
        }
    }
}

/// The path of `scheme://authority/path?query`.
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    path.split(['?', '#']).next().unwrap_or("/")
}

/// The directory of a path, at most three segments deep: `/repos/o/r/issues` → `/repos/o/r/`.
fn prefix_of(path: &str) -> String {
    let dir = &path[..path.rfind('/').map_or(1, |i| i + 1)];
    let mut out = String::from("/");
    for seg in dir.split('/').filter(|s| !s.is_empty()).take(3) {
        out.push_str(seg);
        out.push('/');
    }
    out
}

/// The prefixes none of the others already covers.
fn minimal(prefixes: &BTreeSet<String>) -> Vec<String> {
    prefixes
        .iter()
        .filter(|p| {
            !prefixes
                .iter()
                .any(|q| q != *p && p.starts_with(q.as_str()))
        })
        .cloned()
        .collect()
}

/// The largest sum over any `window_ms` per client (sliding), of `pick`.
fn peak(
    events: &[(i64, IpAddr, u64, u64)],
    window_ms: i64,
    pick: impl Fn(&(i64, IpAddr, u64, u64)) -> u64,
) -> u64 {
    let mut by_client: BTreeMap<IpAddr, Vec<(i64, u64)>> = BTreeMap::new();
    for e in events {
        by_client.entry(e.1).or_default().push((e.0, pick(e)));
    }
    let mut best = 0;
    for mut v in by_client.into_values() {
        v.sort_unstable();
        let (mut lo, mut sum) = (0, 0u64);
        for hi in 0..v.len() {
            sum += v[hi].1;
            while v[hi].0 - v[lo].0 >= window_ms {
                sum -= v[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
    }
    best
}

/// `x` rounded up to a figure the config writes plainly (whole KiB, MiB or GiB).
fn round_bytes(x: f64) -> u64 {
    let x = x.ceil().max(1024.0) as u64;
    for unit in [1u64 << 30, 1 << 20, 1 << 10] {
        if x >= unit * 4 || unit == 1 << 10 {
            return x.div_ceil(unit) * unit;
        }
    }
    x
}

fn render(l: &Learnt, opts: &Options) -> String {
    let mut o = String::new();
    let _ =
        writeln!(
        o,
        "# Suggested by `egress-proxy policy suggest` from {} ({} connection records, {} – {}).",
        opts.logs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        l.records,
        if l.first > 0 { ocsf::rfc3339_secs(l.first) } else { "-".into() },
        if l.last > 0 { ocsf::rfc3339_secs(l.last) } else { "-".into() },
    );
    let _ = writeln!(o, "# Review every rule before enforcing it. Budgets: the peak per client host over the window, x {}.", opts.margin);
    let listen: Vec<String> = l.listen.iter().map(|a| format!("\"{a}\"")).collect();
    let listen = if listen.is_empty() {
        "\"127.0.0.1:3128\"".to_owned()
    } else {
        listen.join(", ")
    };
    let _ = writeln!(o, "listen = [{listen}]");
    let clients: Vec<String> = l.clients.iter().map(|c| format!("\"{c}\"")).collect();
    let _ = writeln!(
        o,
        "client_networks = [{}]",
        if clients.is_empty() {
            "\"127.0.0.1\"".to_owned()
        } else {
            clients.join(", ")
        }
    );
    let log = opts
        .logs
        .first()
        .map_or(Path::new("audit.jsonl"), |p| p.as_path());
    let _ = writeln!(o, "audit_log = {}", toml_string(&log.display().to_string()));

    // Wildcards: a parent with enough siblings seen and no denied name below it.
    let mut by_parent: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in l.names.keys() {
        if let Some((_, parent)) = name.split_once('.') {
            if parent.contains('.') {
                by_parent.entry(parent).or_default().push(name);
            }
        }
    }
    let mut wild: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (parent, kids) in by_parent {
        let denied_below = l.denied.iter().any(|d| d.ends_with(&format!(".{parent}")));
        let plain = kids
            .iter()
            .all(|k| !l.names[*k].inspected && l.names[*k].prefixes.is_empty());
        if kids.len() >= opts.wildcard_at && !denied_below && plain {
            wild.insert(parent, kids);
        }
    }

    let _ = writeln!(o, "allowed_domains = [");
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for (parent, kids) in &wild {
        let mut merged = Seen::default();
        for k in kids {
            let s = &l.names[*k];
            merged.ports.extend(&s.ports);
            merged.tunnels += s.tunnels;
            merged.http += s.http;
            merged.requests += s.requests;
            merged.private = merged.private.or(s.private);
            merged.at(s.first, s.last);
            merged.events.extend(&s.events);
            merged.longest_ms = merged.longest_ms.max(s.longest_ms);
            done.insert(k);
        }
        let _ = writeln!(
            o,
            "  # wildcard: {} sibling names seen under {parent} ({})",
            kids.len(),
            kids.join(", ")
        );
        rule(&mut o, &format!("*.{parent}"), &merged, opts);
    }
    for (name, seen) in &l.names {
        if !done.contains(name.as_str()) {
            rule(&mut o, name, seen, opts);
        }
    }
    let _ = writeln!(o, "]");
    if l.opened > l.closed {
        let _ = writeln!(
            o,
            "# {} connections were opened without a closing record in these logs (still open at their end, or cut by a crash): not learnt from.",
            l.opened - l.closed
        );
    }
    if !l.refused.is_empty() {
        let _ = writeln!(
            o,
            "# Refused in the logs, never suggested (add a rule yourself if the agent needs one):"
        );
    }
    for (what, n) in &l.refused {
        let _ = writeln!(o, "#   {what}: {n}");
    }
    o
}

fn rule(o: &mut String, domain: &str, s: &Seen, opts: &Options) {
    let mut what = Vec::new();
    for (n, one) in [
        (s.tunnels, "tunnel"),
        (s.http, "plain-HTTP request"),
        (s.requests, "inspected request"),
    ] {
        match n {
            0 => {}
            1 => what.push(format!("1 {one}")),
            n => what.push(format!("{n} {one}s")),
        }
    }
    if !s.methods.is_empty() {
        what.push(
            s.methods
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let _ = writeln!(
        o,
        "  # {domain}: {}; first {}, last {}",
        what.join(", "),
        ocsf::rfc3339_secs(s.first),
        ocsf::rfc3339_secs(s.last)
    );
    let prefixes = minimal(&s.prefixes);
    if s.inspected {
        let _ = writeln!(o, "  # inspected: add `inspect = true` (and [inspection]) to keep judging each request; seen methods {:?}, path prefixes {prefixes:?}", s.methods.keys().collect::<Vec<_>>());
    }
    let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
    let mut fields = vec![
        format!("domain = {}", toml_string(domain)),
        format!("ports = [{}]", ports.join(", ")),
    ];
    // Plain HTTP only (no tunnels): its methods and paths can be held to what was seen.
    if s.http > 0 && s.tunnels == 0 && !s.inspected {
        let m: Vec<String> = s.methods.keys().map(|m| toml_string(m)).collect();
        fields.push(format!("methods = [{}]", m.join(", ")));
        let p: Vec<String> = prefixes.iter().map(|p| toml_string(p)).collect();
        fields.push(format!("path_prefixes = [{}]", p.join(", ")));
    }
    if let Some(ip) = s.private {
        let _ = writeln!(o, "  # reached at a private address ({ip}): allow_private");
        fields.push("allow_private = true".to_owned());
    }
    let mut budget = Vec::new();
    let hour = (BYTES_WINDOW_SECS * 1000) as i64;
    for (key, peak) in [
        ("bytes_out", peak(&s.events, hour, |e| e.2)),
        ("bytes_in", peak(&s.events, hour, |e| e.3)),
    ] {
        if peak > 0 {
            let c = Ceiling {
                limit: round_bytes(peak as f64 * opts.margin),
                window_secs: BYTES_WINDOW_SECS,
            };
            budget.push(format!("{key} = \"{}\"", format_ceiling(c, true)));
        }
    }
    let minute = (REQUESTS_WINDOW_SECS * 1000) as i64;
    let requests = peak(&s.events, minute, |_| 1);
    if requests > 0 {
        let c = Ceiling {
            limit: (requests as f64 * opts.margin).ceil() as u64,
            window_secs: REQUESTS_WINDOW_SECS,
        };
        budget.push(format!("requests = \"{}\"", format_ceiling(c, false)));
    }
    if s.longest_ms > 0 {
        let secs = ((s.longest_ms as f64 / 1000.0 * opts.margin).ceil() as u64).div_ceil(60) * 60;
        budget.push(format!("tunnel_secs = {secs}"));
    }
    if !budget.is_empty() {
        fields.push(format!("budget = {{ {} }}", budget.join(", ")));
    }
    let _ = writeln!(o, "  {{ {} }},", fields.join(", "));
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_peaks() {
        assert_eq!(
            path_of("https://a.test/repos/o/r/issues?x=1"),
            "/repos/o/r/issues"
        );
        assert_eq!(prefix_of("/repos/o/r/issues"), "/repos/o/r/");
        assert_eq!(prefix_of("/simple/requests/"), "/simple/requests/");
        assert_eq!(prefix_of("/x"), "/");
        let set: BTreeSet<String> = ["/a/", "/a/b/", "/c/d/"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(minimal(&set), ["/a/", "/c/d/"]);
        let c: IpAddr = "10.0.0.1".parse().unwrap();
        let d: IpAddr = "10.0.0.2".parse().unwrap();
        let ev = [
            (0, c, 5, 0),
            (500, c, 5, 0),
            (1500, c, 5, 0),
            (100, d, 12, 0),
        ];
        assert_eq!(peak(&ev, 1000, |e| e.2), 12);
        assert_eq!(peak(&ev, 2000, |e| e.2), 15);
        assert_eq!(round_bytes(3000.0), 3072);
        assert_eq!(round_bytes(5_000_000.0), 5 << 20);
    }
}
