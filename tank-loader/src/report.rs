//! `audit cross-check --html FILE`: the cross-check as one self-contained HTML page an auditor
//! can attach to a sign-off.
//!
//! Verdict first, then the findings, then pictures (activity over time per host, refusals by
//! process and by destination, proxy records by rule, the chain of each log with its head).
//! Self-contained on purpose: no script at all, no font, image or style fetched from anywhere
//! (a Content-Security-Policy forbids it too), pictures are inline SVG. Everything taken from
//! the logs is escaped: process names and hostnames are the agent's to choose. The page is
//! built from the bounded [`Fleet`] report and lists are cut at [`MAX_ROWS`], so a week of
//! records opens as fast as a minute of them.

use std::collections::HashMap;
use std::fmt::Write as _;

use tank_ebpf_common::chain::Problem;

use crate::activity::{Kind, Series};
use crate::crosscheck::{
    when, DeniedGroup, Fleet, HostCheck, KernelConnection, LogCheck, ProxyConnection, Verdict,
};

/// Most rows of any list; the rest are counted and left to `--json`.
pub const MAX_ROWS: usize = 100;
/// Most bars in a bar chart; the rest are summed into one.
const MAX_BARS: usize = 12;
/// Most hosts whose findings, timelines and chains are drawn in full (those with findings
/// first); the hosts table lists [`MAX_ROWS`] of them.
const MAX_HOSTS_DRAWN: usize = 12;
const BLUE: &str = "#2f6fb0";
const RED: &str = "#c0392b";
const GREEN: &str = "#27885a";

/// The whole page.
pub fn html(c: &Fleet) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let (class, word, meaning) = match c.verdict {
        Verdict::Consistent => (
            "ok",
            "CONSISTENT",
            "Every chain verifies and every proxied connection appears in both logs.",
        ),
        Verdict::Discrepancies => (
            "warn",
            "DISCREPANCIES",
            "Every chain verifies, but the logs disagree: see the findings.",
        ),
        Verdict::Tampered => (
            "bad",
            "TAMPERED",
            "A log failed chain verification: records were edited, removed, reordered or cut.",
        ),
    };
    let s = &c.summary;
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>tank cross-check: {word}</title><style>{STYLE}</style></head><body>\n\
         <header class=\"verdict {class}\"><h1>Verdict: {word}</h1><p>{meaning}</p>\
         <p class=\"numbers\">{} of {} proxy records matched &middot; {} kernel connections to a proxy \
         &middot; {} hosts ({} with findings), {} proxy logs &middot; {} unattributed \
         &middot; logs {}</p></header>\n",
        s.matched,
        s.proxy_records,
        s.kernel_proxy_connections,
        s.hosts,
        s.hosts_with_findings,
        s.proxies,
        c.unattributed.count,
        match s.tampered_logs {
            0 => "intact".to_owned(),
            n => format!("{n} not intact"),
        },
    );
    let files = |logs: Vec<&LogCheck>| {
        let mut names: Vec<String> = logs
            .iter()
            .take(3)
            .map(|l| format!("<code>{}</code>", esc(&l.file)))
            .collect();
        if logs.len() > 3 {
            names.push(format!("{} more", logs.len() - 3));
        }
        names.join(", ")
    };
    let _ = writeln!(
        o,
        "<p class=\"meta\">Kernel logs {}; proxy logs {}; match window {} ms; {}{}; \
         report by tank-loader {}.</p>",
        files(c.hosts.iter().map(|h| &h.log).collect()),
        files(c.proxies.iter().map(|p| &p.log).collect()),
        c.window_ms,
        if c.nat.is_empty() {
            "no NAT".to_owned()
        } else {
            esc(&c
                .nat
                .iter()
                .map(|n| format!("NAT {}={}", n.kernel, n.proxy))
                .collect::<Vec<_>>()
                .join(", "))
        },
        if c.clients.is_empty() {
            String::new()
        } else {
            format!(
                "; only clients {} ({} kernel logs left out)",
                esc(&c
                    .clients
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")),
                c.left_out.len()
            )
        },
        env!("CARGO_PKG_VERSION"),
    );
    findings(&mut o, c);
    pictures(&mut o, c);
    o += "</body></html>\n";
    o
}

/// The hosts to draw in full: those with findings first, at most [`MAX_HOSTS_DRAWN`].
fn drawn(c: &Fleet) -> Vec<&HostCheck> {
    let mut hosts: Vec<&HostCheck> = c.hosts.iter().collect();
    hosts.sort_by_key(|h| std::cmp::Reverse(h.verdict));
    hosts.truncate(MAX_HOSTS_DRAWN);
    hosts
}

fn findings(o: &mut String, c: &Fleet) {
    o.push_str("<section><h2>Findings</h2>\n");
    let mut any = false;
    let several = c.proxies.len() > 1;
    for p in &c.proxies {
        let name = if several {
            format!("Proxy log {}", p.log.file)
        } else {
            "Proxy log".to_owned()
        };
        any |= log_findings(o, &name, &p.log);
        let titled = |t: &str| {
            if several {
                format!("{name}: {t}")
            } else {
                t.to_owned()
            }
        };
        let i = &p.inspected;
        if !i.miscounted.is_empty() {
            any = true;
            let rows = i.miscounted.listed.iter().map(|t| {
                vec![
                    t.line.to_string(),
                    t.uid.clone(),
                    t.says.to_string(),
                    t.found.to_string(),
                ]
            });
            table(
                o,
                &titled("Inspected tunnels whose request records do not add up"),
                "warn",
                &["line", "tunnel uid", "tunnel says", "request records"],
                i.miscounted.count,
                rows,
            );
        }
        if !i.orphaned.is_empty() {
            any = true;
            let rows = i
                .orphaned
                .iter()
                .map(|(uid, n)| vec![uid.clone(), n.to_string()]);
            table(
                o,
                &titled("Request records naming no tunnel record (a lost record)"),
                "warn",
                &["tunnel uid", "request records"],
                i.orphaned.len() as u64,
                rows,
            );
        }
    }
    if !c.unattributed.is_empty() {
        any = true;
        let rows = c.unattributed.listed.iter().map(|u| {
            let mut row = proxy_row(&u.record);
            row.push(u.claimed_by.join(", "));
            row
        });
        table(
            o,
            "Proxy records from an address no kernel log accounts for (unattributed)",
            "warn",
            &[
                "log",
                "line",
                "seq",
                "time",
                "client",
                "destination",
                "action",
                "rule",
                "shown by hosts",
            ],
            c.unattributed.count,
            rows,
        );
    }
    if c.hosts.len() > 1 {
        hosts_table(o, c);
    }
    for h in drawn(c) {
        let name = if c.hosts.len() > 1 {
            format!("Host {}", h.host)
        } else {
            "Kernel log".to_owned()
        };
        any |= log_findings(o, &name, &h.log);
        // A fleet's lists name their host; one host's read as they always did.
        let titled = |t: &str| {
            if c.hosts.len() > 1 {
                format!("{name}: {t}")
            } else {
                t.to_owned()
            }
        };
        if !h.proxy_unmatched.is_empty() {
            any = true;
            table(o, &titled("Proxy records with no kernel record (traffic not from the agent's cgroup, or a lost kernel record)"), "warn",
                &["log", "line", "seq", "time", "client", "destination", "action", "rule"], h.proxy_unmatched.count,
                h.proxy_unmatched.listed.iter().map(proxy_row));
        }
        for (title, list) in [
            (
                "Kernel connections to the proxy with no proxy record (proxy log lost or cut)",
                &h.kernel_unmatched,
            ),
            (
                "Established connections with no connect attempt (kernel record lost)",
                &h.established_without_attempt,
            ),
        ] {
            if !list.is_empty() {
                any = true;
                table(
                    o,
                    &titled(title),
                    "warn",
                    &["line", "seq", "time", "cookie", "from", "to", "process"],
                    list.count,
                    list.listed.iter().map(kernel_row),
                );
            }
        }
        if !h.unrecorded.is_empty() {
            // Not a discrepancy (the kernel log accounts for them), but attempts with no record.
            any = true;
            let rows = h.unrecorded.listed.iter().map(|u| {
                vec![
                    u.line.to_string(),
                    u.seq.to_string(),
                    u.start_time.map_or("-".to_owned(), when),
                    when(u.end_time),
                    u.counter.clone(),
                    u.count.to_string(),
                ]
            });
            table(
                o,
                &titled("Attempts the kernel could not record (ring buffer full), as the kernel log accounts for them"),
                "warn",
                &["line", "seq", "from", "to", "counter", "count"],
                h.unrecorded.count,
                rows,
            );
        }
    }
    if !any {
        o.push_str("<p class=\"none\">No findings: every chain verifies and every proxied connection is in both logs.</p>\n");
    }
    let sum = |f: fn(&HostCheck) -> u64| c.hosts.iter().map(f).sum::<u64>();
    let _ = write!(
        o,
        "<p class=\"info\">Informational: {} allowed connects to a proxy never established (e.g. proxy down); \
         {} direct connections to listed endpoints; {} groups of denied attempts (below).</p>\n</section>\n",
        sum(|h| h.allowed_never_connected),
        sum(|h| h.direct_listed_connections),
        sum(|h| h.denied.len() as u64),
    );
}

/// A log's chain problems and unreadable records; true if it has any.
fn log_findings(o: &mut String, name: &str, log: &LogCheck) -> bool {
    if !log.problems.is_empty() {
        let rows = log.described.iter().map(|p| vec![p.clone()]);
        table(
            o,
            &format!("{name}: chain problems"),
            "bad",
            &["problem"],
            log.problems.len() as u64,
            rows,
        );
    }
    if !log.unreadable.is_empty() {
        let rows = log
            .unreadable
            .listed
            .iter()
            .map(|u| vec![u.line.to_string(), u.seq.to_string(), u.why.clone()]);
        table(
            o,
            &format!("{name}: records the check could not read"),
            "warn",
            &["line", "seq", "why"],
            log.unreadable.count,
            rows,
        );
    }
    !log.problems.is_empty() || !log.unreadable.is_empty()
}

/// One row per host, those with findings first.
fn hosts_table(o: &mut String, c: &Fleet) {
    let mut hosts: Vec<&HostCheck> = c.hosts.iter().collect();
    hosts.sort_by_key(|h| std::cmp::Reverse(h.verdict));
    let rows = hosts.into_iter().map(|h| {
        vec![
            h.host.clone(),
            format!("{:?}", h.verdict).to_lowercase(),
            h.addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            format!("{} of {}", h.matched, h.kernel_proxy_connections),
            h.proxy_unmatched.count.to_string(),
            h.kernel_unmatched.count.to_string(),
            if h.log.intact {
                "intact".to_owned()
            } else {
                format!("{} problem(s)", h.log.problems.len())
            },
        ]
    });
    table(
        o,
        "Hosts",
        "plain",
        &[
            "host",
            "verdict",
            "addresses",
            "matched",
            "proxy records unmatched",
            "kernel connections unmatched",
            "chain",
        ],
        c.hosts.len() as u64,
        rows,
    );
}

fn proxy_row(p: &ProxyConnection) -> Vec<String> {
    vec![
        p.log.clone(),
        p.line.to_string(),
        p.seq.to_string(),
        when(p.start_time),
        p.client.to_string(),
        p.destination.clone(),
        p.action.as_str().to_owned(),
        p.rule.clone(),
    ]
}

fn kernel_row(k: &KernelConnection) -> Vec<String> {
    vec![
        k.line.to_string(),
        k.seq.to_string(),
        when(k.time),
        k.cookie.to_string(),
        k.src.map_or("-".to_owned(), |a| a.to_string()),
        k.dst.to_string(),
        format!("{} (pid {})", k.process, k.pid),
    ]
}

/// A titled table of at most [`MAX_ROWS`] of `total` rows.
fn table(
    o: &mut String,
    title: &str,
    class: &str,
    header: &[&str],
    total: u64,
    rows: impl Iterator<Item = Vec<String>>,
) {
    let _ = write!(
        o,
        "<h3 class=\"{class}\">{} ({total})</h3>\n<table><tr>",
        esc(title)
    );
    for h in header {
        let _ = write!(o, "<th>{}</th>", esc(h));
    }
    o.push_str("</tr>\n");
    let mut shown = 0u64;
    for row in rows.take(MAX_ROWS) {
        shown += 1;
        o.push_str("<tr>");
        for cell in row {
            let _ = write!(o, "<td>{}</td>", esc(&cell));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
    if total > shown {
        let _ = writeln!(
            o,
            "<p class=\"more\">{} more not shown; `--json` lists them (up to --max-listed).</p>",
            total - shown
        );
    }
}

fn pictures(o: &mut String, c: &Fleet) {
    let a = &c.activity;
    o.push_str("<section><h2>Activity over time</h2>\n");
    if a.hosts.is_empty() {
        o.push_str("<p class=\"none\">The logs hold no network record.</p>\n");
    }
    // The proxies, then the hosts drawn in full.
    let drawn_hosts: Vec<&str> = drawn(c).iter().map(|h| h.host.as_str()).collect();
    let timelines: Vec<_> = a
        .hosts
        .iter()
        .filter(|t| t.log == "proxy" || drawn_hosts.contains(&t.host.as_str()))
        .collect();
    for h in &timelines {
        let _ = writeln!(
            o,
            "<h3>{} log, host <code>{}</code></h3>",
            h.log,
            esc(&h.host)
        );
        timeline(o, a.start_ms, a.bucket_ms, &h.series);
    }
    if timelines.len() < a.hosts.len() {
        let _ = writeln!(
            o,
            "<p class=\"more\">{} more timelines not drawn; `--json` has them all.</p>",
            a.hosts.len() - timelines.len()
        );
    }
    o.push_str("</section>\n<section><h2>Refusals by the kernel</h2>\n");
    // Sums by key; a week of denials to random ports is many groups, so no linear search.
    let mut by_process: HashMap<String, u64> = HashMap::new();
    let mut by_destination: HashMap<String, u64> = HashMap::new();
    let several = c.hosts.len() > 1;
    let denied: Vec<(&HostCheck, &DeniedGroup)> = c
        .hosts
        .iter()
        .flat_map(|h| h.denied.iter().map(move |g| (h, g)))
        .collect();
    for (_, g) in &denied {
        let dst = g
            .destination
            .map_or(format!("(socket creation: {})", g.reason), |d| {
                format!("{d} {}", g.protocol)
            });
        for (list, key) in [
            (&mut by_process, g.process.clone()),
            (&mut by_destination, dst),
        ] {
            *list.entry(key).or_default() += g.count;
        }
    }
    for (title, sums) in [
        ("By process", by_process),
        ("By destination", by_destination),
    ] {
        let mut list: Vec<(String, u64)> = sums.into_iter().collect();
        // Most first; equal counts by name, so the page is the same for the same logs.
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let _ = writeln!(o, "<h3>{title}</h3>");
        let bars: Vec<(String, Vec<u64>)> = list.into_iter().map(|(k, n)| (k, vec![n])).collect();
        bar_chart(o, &bars, &[("denied attempts", RED)]);
    }
    let mut header = vec![
        "count",
        "destination",
        "protocol",
        "process",
        "reason",
        "first",
        "last",
    ];
    if several {
        header.insert(0, "host");
    }
    table(
        o,
        "Denied attempts by destination, process and reason",
        "plain",
        &header,
        denied.len() as u64,
        denied.iter().map(|(h, g)| {
            let mut cells = g.cells();
            if several {
                cells.insert(0, h.host.clone());
            }
            cells
        }),
    );
    o.push_str("</section>\n<section><h2>Proxy records by rule</h2>\n");
    let rules: Vec<(String, Vec<u64>)> = a
        .proxy_rules
        .iter()
        .map(|r| (r.rule.clone(), vec![r.allowed, r.denied]))
        .collect();
    bar_chart(o, &rules, &[("allowed", BLUE), ("refused", RED)]);
    o.push_str("</section>\n<section><h2>Chains</h2>\n");
    for p in &c.proxies {
        chain(o, "proxy", &p.log);
    }
    let hosts = drawn(c);
    for h in &hosts {
        chain(o, "kernel", &h.log);
    }
    if hosts.len() < c.hosts.len() {
        let _ = writeln!(
            o,
            "<p class=\"more\">{} more kernel logs not drawn (the hosts table has their chains).</p>",
            c.hosts.len() - hosts.len()
        );
    }
    o.push_str("</section>\n");
}

/// A line chart of `series` (equal lengths) over buckets of `bucket_ms` from `start_ms`.
fn timeline(o: &mut String, start_ms: i64, bucket_ms: i64, series: &[Series]) {
    let (w, h, left, bottom) = (760.0, 190.0, 52.0, 26.0);
    let n = series.first().map_or(1, |s| s.counts.len()).max(1);
    let max = series
        .iter()
        .flat_map(|s| s.counts.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let x = |i: usize| {
        left + (w - left - 10.0)
            * if n == 1 {
                0.5
            } else {
                i as f64 / (n - 1) as f64
            }
    };
    let y = |v: u64| 8.0 + (h - bottom - 8.0) * (1.0 - v as f64 / max as f64);
    let _ = write!(
        o,
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" class=\"axis\"/>\
         <line x1=\"{left}\" y1=\"8\" x2=\"{left}\" y2=\"{}\" class=\"axis\"/>\
         <text x=\"{}\" y=\"14\" text-anchor=\"end\">{max}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\
         <text x=\"{left}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        h - bottom,
        w - 10.0,
        h - bottom,
        h - bottom,
        left - 4.0,
        left - 4.0,
        h - bottom,
        h - 6.0,
        when(start_ms),
        w - 10.0,
        h - 6.0,
        when(start_ms + bucket_ms * n as i64),
    );
    for s in series {
        let (color, dash) = style(s.kind);
        let points: Vec<String> = s
            .counts
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
            points.join(" ")
        );
        if n == 1 {
            let _ = write!(
                o,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>",
                x(0),
                y(s.counts[0])
            );
        }
    }
    o.push_str("</svg>\n<p class=\"legend\">");
    for s in series {
        let color = style(s.kind).0;
        let _ = write!(
            o,
            "<span style=\"color:{color}\">&#9632;</span> {} ({}) ",
            s.name, s.total
        );
    }
    let _ = writeln!(o, "&middot; per {}</p>", duration(bucket_ms));
}

/// How a series is drawn: allowed blue, refused red, connections green and dashed (they often
/// run on top of the allowed attempts).
fn style(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::AttemptAllowed | Kind::ProxyAllowed => (BLUE, "none"),
        Kind::AttemptDenied | Kind::ProxyDenied => (RED, "none"),
        Kind::Connection => (GREEN, "7 4"),
    }
}

/// Horizontal bars, one per label, each split into `parts` (name and colour, stacked).
fn bar_chart(o: &mut String, bars: &[(String, Vec<u64>)], parts: &[(&str, &str)]) {
    if bars.is_empty() {
        o.push_str("<p class=\"none\">None.</p>\n");
        return;
    }
    let mut shown: Vec<(String, Vec<u64>)> = bars.iter().take(MAX_BARS).cloned().collect();
    if bars.len() > MAX_BARS {
        let mut rest = vec![0; parts.len()];
        for (_, v) in &bars[MAX_BARS..] {
            for (r, n) in rest.iter_mut().zip(v) {
                *r += n;
            }
        }
        shown.push((format!("({} others)", bars.len() - MAX_BARS), rest));
    }
    let max = shown
        .iter()
        .map(|(_, v)| v.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, row, label) = (760.0, 22.0, 300.0);
    let h = row * shown.len() as f64 + 4.0;
    let _ = write!(
        o,
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">"
    );
    for (i, (name, values)) in shown.iter().enumerate() {
        let top = 2.0 + row * i as f64;
        let _ = write!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            label - 6.0,
            top + 15.0,
            esc(&ellipsize(name, 44))
        );
        let mut x = label;
        for (v, (_, color)) in values.iter().zip(parts) {
            let len = (w - label - 70.0) * *v as f64 / max as f64;
            let _ = write!(
                o,
                "<rect x=\"{x:.1}\" y=\"{}\" width=\"{len:.1}\" height=\"16\" fill=\"{color}\"/>",
                top + 2.0
            );
            x += len;
        }
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            x + 5.0,
            top + 15.0,
            values.iter().sum::<u64>()
        );
    }
    o.push_str("</svg>\n");
    if parts.len() > 1 {
        o.push_str("<p class=\"legend\">");
        for (p, color) in parts {
            let _ = write!(o, "<span style=\"color:{color}\">&#9632;</span> {p} ");
        }
        o.push_str("</p>\n");
    }
}

/// A log's chain: a strip of links ending in its head, red where a problem is, and its facts.
fn chain(o: &mut String, name: &str, log: &LogCheck) {
    let intact = log.problems.is_empty();
    let anchor = match &log.anchor {
        None => "no anchor file beside the log".to_owned(),
        Some(a) if *a == log.head => format!("anchor names the head (seq {})", a.seq),
        Some(a) => format!(
            "anchor names seq {}, the log ends at seq {}",
            a.seq, log.head.seq
        ),
    };
    let _ = write!(
        o,
        "<h3 class=\"{}\">{name} log: {}</h3>\n<table>\
         <tr><th>file</th><td><code>{}</code></td></tr><tr><th>records</th><td>{}</td></tr>\
         <tr><th>files</th><td>{}</td></tr><tr><th>opened, never closed</th><td>{}</td></tr>\
         <tr><th>head</th><td>seq {} &middot; <code>{}</code></td></tr><tr><th>anchor</th><td>{}</td></tr></table>\n",
        if intact { "ok" } else { "bad" },
        if intact { "intact".to_owned() } else { format!("{} problem(s)", log.problems.len()) },
        esc(&log.file),
        log.records,
        log.segments,
        log.unclosed,
        log.head.seq,
        log.head.hash,
        esc(&anchor),
    );
    // Each problem marks the link at its place in the log (by line, or by seq); a cut end
    // marks the last link.
    let links = 24u64;
    let bad: Vec<u64> = log
        .problems
        .iter()
        .map(|p| match p {
            Problem::Malformed { line }
            | Problem::SeqGap { line, .. }
            | Problem::HashMismatch { line }
            | Problem::PartialLastLine { line }
            | Problem::UnknownClose { line, .. } => *line as u64,
            Problem::AnchorMismatch { seq } => *seq,
            // A series' problems mark the seq where the gap or misplaced segment begins.
            Problem::MissingStart { .. } => 1,
            Problem::MissingSegment { from: seq, .. }
            | Problem::SegmentTruncated { last: seq, .. }
            | Problem::SegmentOutOfOrder { first_seq: seq, .. } => *seq,
            // A replaced segment names no seq; like a cut end, it marks the last link.
            Problem::Truncated { .. } | Problem::SegmentReplaced { .. } => log.records,
        })
        .map(|at| (at.saturating_sub(1) * links / log.records.max(1)).min(links - 1))
        .collect();
    let _ = write!(
        o,
        "<svg class=\"chain\" viewBox=\"0 0 760 34\" width=\"760\" height=\"34\" role=\"img\">"
    );
    for i in 0..links {
        let fill = if bad.contains(&i) { RED } else { GREEN };
        let _ = write!(
            o,
            "<rect x=\"{}\" y=\"6\" width=\"22\" height=\"22\" rx=\"5\" fill=\"{fill}\"/>",
            4 + i * 28
        );
        if i + 1 < links {
            let _ = write!(
                o,
                "<line x1=\"{}\" y1=\"17\" x2=\"{}\" y2=\"17\" class=\"link\"/>",
                26 + i * 28,
                32 + i * 28
            );
        }
    }
    let _ = writeln!(
        o,
        "<text x=\"756\" y=\"22\" text-anchor=\"end\">head {}</text></svg>",
        log.head.seq
    );
}

fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max - 1).chain(['…']).collect()
    }
}

fn duration(ms: i64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => format!("{} d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms => format!("{} s", ms / 1000),
    }
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:820px;padding:0 16px 40px;color:#1d1d1f}\
h1{margin:0;font-size:28px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}h3{font-size:15px;margin:18px 0 6px}\
.verdict{padding:18px 20px;border-radius:8px;margin:18px 0 8px;color:#fff}.verdict p{margin:6px 0 0}\
.verdict.ok{background:#1e7d4f}.verdict.warn{background:#b9770e}.verdict.bad{background:#a93226}\
.numbers{opacity:.9}h3.bad{color:#a93226}h3.warn{color:#9a6400}h3.ok{color:#1e7d4f}\
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:4px 0}th,td{border:1px solid #e1e1e1;padding:3px 6px;text-align:left;vertical-align:top}\
th{background:#f5f5f7}td{word-break:break-all}code{font-size:12px}.meta,.info,.more,.legend{color:#555;font-size:12.5px}\
.none{color:#1e7d4f}svg text{font:11px system-ui,sans-serif;fill:#333}.axis{stroke:#999}.link{stroke:#27885a;stroke-width:3}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Builder;
    use crate::crosscheck::{Listed, ProxyCheck, Summary};
    use tank_ebpf_common::chain::{self, Head};

    fn log_check(problems: Vec<Problem>) -> LogCheck {
        LogCheck {
            file: "/var/log/tank/kernel-audit.jsonl".into(),
            intact: problems.is_empty(),
            records: 10,
            head: Head {
                seq: 10,
                hash: chain::Hash([0xab; 32]),
            },
            anchor: None,
            described: problems.iter().map(|p| p.to_string()).collect(),
            problems,
            segments: 1,
            unclosed: 0,
            unreadable: Listed::default(),
        }
    }

    fn host(kernel_problems: Vec<Problem>) -> HostCheck {
        HostCheck {
            host: "agent-<1>".into(),
            host_from: crate::crosscheck::HostFrom::StartRecord,
            verdict: if kernel_problems.is_empty() {
                Verdict::Consistent
            } else {
                Verdict::Tampered
            },
            log: log_check(kernel_problems),
            addresses: vec!["10.0.0.5".parse().unwrap()],
            matched: 2,
            kernel_proxy_connections: 2,
            proxy_unmatched: Listed::default(),
            kernel_unmatched: Listed::default(),
            established_without_attempt: Listed::default(),
            allowed_never_connected: 0,
            direct_listed_connections: 0,
            denied: (0..150)
                .map(|i| DeniedGroup {
                    destination: Some(format!("192.0.2.1:{}", 1000 + i).parse().unwrap()),
                    protocol: "tcp".into(),
                    process: "<script>alert(1)</script>".into(),
                    reason: "not_listed".into(),
                    count: 1,
                    first_time: 1_800_000_000_000,
                    last_time: 1_800_000_000_000,
                })
                .collect(),
            denied_ungrouped: 0,
            unrecorded: Listed::default(),
            unrecorded_attempts: 0,
        }
    }

    fn report(verdict: Verdict, kernel_problems: Vec<Problem>) -> Fleet {
        let mut activity = Builder::default();
        let agent = activity.timeline("kernel", "agent-<1>");
        activity.add(agent, Kind::AttemptDenied, 1_800_000_000_000);
        activity.rule("allowed_domains:web", true);
        Fleet {
            verdict,
            window_ms: 5000,
            late_ms: 60_000,
            nat: vec![],
            clients: vec![],
            summary: Summary {
                hosts: 1,
                proxies: 1,
                matched: 2,
                proxy_records: 2,
                kernel_proxy_connections: 2,
                ..Summary::default()
            },
            hosts: vec![host(kernel_problems)],
            proxies: vec![ProxyCheck {
                host: "proxy".into(),
                verdict: Verdict::Consistent,
                log: log_check(vec![]),
                proxy_records: 2,
                matched: 2,
                unattributed: 0,
                inspected: Default::default(),
            }],
            unattributed: Listed::default(),
            left_out: vec![],
            peak_window: 1,
            activity: activity.finish(),
        }
    }

    #[test]
    fn the_verdict_comes_first_and_log_text_is_escaped_and_lists_are_capped() {
        let page = html(&report(Verdict::Consistent, vec![]));
        let verdict = page.find("Verdict: CONSISTENT").expect("verdict");
        assert!(verdict < page.find("Findings").unwrap());
        assert!(page.find("Findings").unwrap() < page.find("Activity over time").unwrap());
        assert!(
            !page.contains("<script"),
            "no script, escaped process names"
        );
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("agent-&lt;1&gt;"));
        assert!(page.contains("50 more not shown"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "nothing fetched"
        );
        assert!(page.contains("default-src 'none'"));
        assert!(page.contains("No findings"));
    }

    #[test]
    fn the_page_does_not_grow_with_the_logs() {
        let mut big = report(Verdict::Consistent, vec![]);
        let mut activity = Builder::default();
        let agent = activity.timeline("kernel", "agent");
        for i in 0..1_000_000i64 {
            activity.add(agent, Kind::AttemptDenied, 1_800_000_000_000 + i * 600);
        }
        big.activity = activity.finish();
        big.hosts[0].denied = (0..50_000u32)
            .map(|i| DeniedGroup {
                destination: Some(format!("192.0.2.{}:{}", i % 250, 1000 + i).parse().unwrap()),
                protocol: "udp".into(),
                process: format!("p{}", i % 5000),
                reason: "not_listed".into(),
                count: 20,
                first_time: 1_800_000_000_000,
                last_time: 1_800_600_000_000,
            })
            .collect();
        let small = html(&report(Verdict::Consistent, vec![])).len();
        let page = html(&big);
        assert!(
            page.len() < small + 60_000,
            "{} bytes against {small}",
            page.len()
        );
        assert!(page.contains("(4988 others)") && page.contains("49900 more not shown"));
    }

    #[test]
    fn a_tampered_log_shows_its_problems_in_the_findings_and_on_its_chain() {
        let page = html(&report(
            Verdict::Tampered,
            vec![Problem::HashMismatch { line: 4 }],
        ));
        assert!(page.contains("Verdict: TAMPERED"));
        assert!(page.contains("Kernel log: chain problems (1)"));
        assert!(page.contains("kernel log: 1 problem(s)"));
        assert!(page.contains("<td>line 4: prev does not match"), "{page}");
        assert!(page.contains("#c0392b\"/>"), "a red link on the chain");
        assert!(!page.contains("No findings"));
    }

    #[test]
    fn attempts_the_kernel_could_not_record_are_a_finding() {
        let mut c = report(Verdict::Consistent, vec![]);
        c.hosts[0].unrecorded.push(
            crate::crosscheck::UnrecordedGroup {
                line: 7,
                seq: 7,
                counter: "unrecorded_denied".into(),
                count: 1234,
                start_time: None,
                end_time: 1_800_000_000_000,
            },
            10,
        );
        let page = html(&c);
        assert!(page.contains("could not record (ring buffer full)"));
        assert!(page.contains("<td>unrecorded_denied</td><td>1234</td>"));
        assert!(!page.contains("No findings"));
    }
}
