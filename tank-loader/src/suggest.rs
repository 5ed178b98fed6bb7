//! `tank-loader policy suggest`: the `[[allow]]` endpoints the agent reached directly while the
//! gate was in audit mode (resolvers, internal services), as a config `tank-loader check`
//! accepts.
//!
//! The kernel logs are read through the chain (a log that does not verify is refused) and
//! parsed as [`tank_ebpf_common::ocsf::kernel::NetworkRecord`]s. An endpoint is suggested
//! when a connect or send reached it in audit mode although nothing listed it
//! (`audit_not_listed`), or it is listed already (`listed_endpoint`); the proxies are the
//! destinations judged `proxy`. Attempts refused in enforce mode, raw and ping sockets and
//! other protocols are never suggested: they are listed as comments with counts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use tank_ebpf_common::event::{hook, reason};
use tank_ebpf_common::ocsf::kernel::NetworkRecord;
use tank_ebpf_common::ocsf::{self, protocol, Kind};

/// What to learn from.
#[derive(Clone, Debug)]
pub struct Options {
    /// Kernel audit logs.
    pub logs: Vec<PathBuf>,
    /// Records before this (ms since the epoch) are left out.
    pub since: Option<i64>,
    /// Records after this are left out.
    pub until: Option<i64>,
    /// The agent cgroup written in the suggestion.
    pub cgroup: String,
}

#[derive(Default)]
struct Seen {
    count: u64,
    first: i64,
    last: i64,
    /// `comm (uid N)` of the processes that reached it.
    by: BTreeSet<String>,
}

/// Reads the logs and writes the suggested config.
pub fn suggest(opts: &Options) -> anyhow::Result<String> {
    if opts.logs.is_empty() {
        bail!("name at least one kernel audit log");
    }
    let mut endpoints: BTreeMap<(SocketAddr, &'static str), Seen> = BTreeMap::new();
    let mut proxies: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut never: BTreeMap<String, u64> = BTreeMap::new();
    let mut records = 0u64;
    for log in &opts.logs {
        let read = ocsf::read_verified(log, "tank-loader audit verify")
            .with_context(|| format!("cannot learn from `{}`", log.display()))?;
        for r in read {
            let Kind::Kernel(k) = r else {
                continue;
            };
            if opts.since.is_some_and(|s| k.time < s) || opts.until.is_some_and(|u| k.time > u) {
                continue;
            }
            records += 1;
            learn(&k, &mut endpoints, &mut proxies, &mut never);
        }
    }
    Ok(render(opts, records, &endpoints, &proxies, &never))
}

fn learn(
    k: &NetworkRecord,
    endpoints: &mut BTreeMap<(SocketAddr, &'static str), Seen>,
    proxies: &mut BTreeSet<SocketAddr>,
    never: &mut BTreeMap<String, u64>,
) {
    let outbound = [
        hook::CONNECT4,
        hook::CONNECT6,
        hook::SENDMSG4,
        hook::SENDMSG6,
    ];
    if !outbound.contains(&k.unmapped.hook.0) {
        return;
    }
    let (Some(ip), Some(port)) = (k.dst_endpoint.ip, k.dst_endpoint.port) else {
        return;
    };
    let dst = SocketAddr::new(ip, port);
    let proto = match k.connection_info.protocol_num {
        protocol::TCP => Some("tcp"),
        protocol::UDP => Some("udp"),
        _ => None,
    };
    let why = k.unmapped.reason.0;
    match (why, proto) {
        (reason::PROXY, _) => {
            proxies.insert(dst);
        }
        (reason::AUDIT_NOT_LISTED | reason::LISTED_ENDPOINT, Some(p)) if port != 0 => {
            let seen = endpoints.entry((dst, p)).or_default();
            seen.count += 1;
            if seen.first == 0 || k.time < seen.first {
                seen.first = k.time;
            }
            seen.last = seen.last.max(k.time);
            let process = &k.actor.process;
            seen.by
                .insert(format!("{} (uid {})", process.name, process.user.uid));
        }
        _ => {
            let what = format!(
                "{dst} {} ({})",
                k.connection_info.protocol_name,
                k.unmapped.reason.as_str()
            );
            *never.entry(what).or_default() += 1;
        }
    }
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render(
    opts: &Options,
    records: u64,
    endpoints: &BTreeMap<(SocketAddr, &'static str), Seen>,
    proxies: &BTreeSet<SocketAddr>,
    never: &BTreeMap<String, u64>,
) -> String {
    let mut o = String::new();
    let logs: Vec<String> = opts.logs.iter().map(|p| p.display().to_string()).collect();
    let _ = writeln!(
        o,
        "# Suggested by `tank-loader policy suggest` from {} ({records} attempts).",
        logs.join(", ")
    );
    let _ = writeln!(
        o,
        "# Every [[allow]] endpoint is reached directly, past the proxy: review each before enforcing."
    );
    let _ = writeln!(o, "cgroup = {}", quoted(&opts.cgroup));
    let _ = writeln!(o, "mode = \"enforce\"");
    let p: Vec<String> = proxies.iter().map(|a| quoted(&a.to_string())).collect();
    let _ = writeln!(o, "proxies = [{}]", p.join(", "));
    for ((dst, proto), seen) in endpoints {
        let by: Vec<&str> = seen.by.iter().map(String::as_str).collect();
        let _ = writeln!(
            o,
            "\n[[allow]]\nendpoint = {}\nprotocol = \"{proto}\"\ncomment = {}",
            quoted(&dst.to_string()),
            quoted(&format!(
                "reached {} times by {}; first {}, last {}",
                seen.count,
                by.join(", "),
                ocsf::rfc3339_secs(seen.first),
                ocsf::rfc3339_secs(seen.last)
            ))
        );
    }
    if !never.is_empty() {
        let _ = writeln!(
            o,
            "\n# Never suggested (refused, or not an endpoint a rule can name):"
        );
    }
    for (what, n) in never {
        let _ = writeln!(o, "#   {what}: {n}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tank_ebpf_common::allow::ipv4_mapped;
    use tank_ebpf_common::chain::ChainWriter;
    use tank_ebpf_common::chain::{Hash, Link};
    use tank_ebpf_common::event::{verdict, Event};
    use tank_ebpf_common::ocsf::kernel::Formatter;

    /// The record of `e` as the drain writes it, chain fields left to the log's writer.
    fn record(e: &Event, ms: i64) -> serde_json::Value {
        let mut line = Vec::new();
        let link = Link {
            seq: 1,
            prev: &Hash::GENESIS,
        };
        Formatter::new("agent", "0").write(&mut line, link, e, ms * 1_000_000, 0);
        let mut v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        v["metadata"].as_object_mut().unwrap().remove("sequence");
        v["unmapped"].as_object_mut().unwrap().remove("prev");
        v
    }

    fn event(comm: &str, dst: [u8; 4], port: u16, proto: u16, why: u8, mode: u8) -> Event {
        let mut e = Event {
            dst_addr: ipv4_mapped(dst),
            dst_port: port,
            family: 2,
            hook: if proto == 17 {
                hook::SENDMSG4
            } else {
                hook::CONNECT4
            },
            sock_type: if proto == 17 { 2 } else { 1 },
            protocol: proto,
            verdict: if why == reason::NOT_LISTED {
                verdict::DENY
            } else {
                verdict::ALLOW
            },
            reason: why,
            mode,
            ..Event::EXAMPLE
        };
        e.comm = [0; 16];
        e.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        e
    }

    #[test]
    fn endpoints_reached_in_audit_mode_become_allow_entries_that_check_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("kernel.jsonl");
        let (mut w, _) = ChainWriter::open(&log).unwrap();
        let t0 = 1_796_119_200_000;
        let dns = || {
            event(
                "resolvconf",
                [192, 0, 2, 53],
                53,
                17,
                reason::AUDIT_NOT_LISTED,
                1,
            )
        };
        let events = [
            event("curl", [10, 0, 0, 1], 3128, 6, reason::PROXY, 1),
            dns(),
            dns(),
            event(
                "python3",
                [192, 0, 2, 80],
                8080,
                6,
                reason::AUDIT_NOT_LISTED,
                1,
            ),
            event("curl", [203, 0, 113, 9], 443, 6, reason::NOT_LISTED, 0),
        ];
        for (i, e) in events.iter().enumerate() {
            w.append(&record(e, t0 + i as i64 * 1000)).unwrap();
        }
        w.sync().unwrap();
        let text = suggest(&Options {
            logs: vec![log],
            since: None,
            until: None,
            cgroup: "/tank/agent".into(),
        })
        .unwrap();
        let cfg = Config::parse(&text, "suggested.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let eps: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|e| format!("{} {:?} {}", e.addr, e.protocol, e.is_proxy))
            .collect();
        assert_eq!(
            eps,
            [
                "10.0.0.1:3128 Tcp true",
                "192.0.2.53:53 Udp false",
                "192.0.2.80:8080 Tcp false"
            ],
            "{text}"
        );
        assert!(
            text.contains("reached 2 times by resolvconf (uid 1000); first 2026-12-01T10:00:01Z"),
            "{text}"
        );
        assert!(
            text.contains("#   203.0.113.9:443 tcp (not_listed): 1"),
            "{text}"
        );
        assert!(text.contains("mode = \"enforce\""));
    }
}
