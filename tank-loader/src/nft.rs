//! The nftables baseline: one `inet` table owned by tank that rejects every packet of the agent
//! except to the proxy and listed endpoints.
//!
//! It is the second, independent line behind the BPF gate: it judges packets at the output
//! hook, after routing, whatever system call produced them, and it does not depend on tank's
//! BPF programs being attached. Connections opened into the agent from other hosts are
//! refused here too, on the way out: the agent's packets on them travel in the conntrack reply
//! direction, and only those to the host itself over loopback pass, so nothing the agent writes
//! reaches a remote peer. (The SYN-ACK comes from a request socket, which `socket cgroupv2`
//! cannot match, so with this layer alone the handshake completes and the connection stays
//! mute.) An input-hook rule could refuse the SYN itself, but netfilter's input hook runs before
//! the socket's BPF ingress program, which would then never see, and never record, the attempt:
//! the BPF layer refuses and records it, this one keeps the data in. The reply rule also covers
//! a listening socket made outside the cgroup and handed in, through the UID match. It matches the agent by the socket's cgroup (`socket cgroupv2
//! level N "PATH"`, the agent cgroup and everything below it) and, where configured, by the
//! agent's host UID range (`meta skuid`).
//!
//! The table is written as one nft script and applied with one `nft -f` run, which the kernel
//! commits as one transaction: create-if-missing, delete, define. A restart with a changed
//! policy therefore swaps the whole table atomically, and a failed run changes nothing. Other
//! tables are never named. The table stays when the loader exits; `tank-loader detach` removes
//! it.
//!
//! Why a script rather than the JSON API for writing: nft 1.0.6 (Debian 12) cannot parse the
//! `socket cgroupv2` match in JSON ("Invalid socket key value"), and the table is useless
//! without it. Reading back goes through nft's JSON (`nftables` crate helper): that is how
//! `install` checks what the kernel holds and how `status` reports it. The JSON is read as
//! plain values, not the crate's typed schema, whose counters are `u32` and would fail to parse
//! once a counter passes 4 GiB.
//!
//! nft resolves the cgroup path by stat-ing `/sys/fs/cgroup/PATH` and stores the cgroup's id;
//! on a hybrid host cgroup2 is mounted at `/sys/fs/cgroup/unified`, so PATH starts with
//! `unified/` there while LEVEL is the depth inside the cgroup2 hierarchy. Both come from the
//! real mount, never assumed.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::cgroup::AgentCgroup;
use crate::config::{ip_key, Endpoint, NftConfig, Protocol};

/// Where nft looks cgroup paths up (hard-coded in nft).
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Name of the named counter of refused packets.
pub const REFUSED_COUNTER: &str = "refused";
/// Prefix of the kernel log lines of refused packets (rate-limited).
pub const LOG_PREFIX: &str = "tank-refused: ";

/// What the kernel holds for tank's table, read back through nft's JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TableState {
    /// The table's name (family `inet`).
    pub table: String,
    /// Rules in all its chains.
    pub rules: usize,
    /// Packets rejected so far (the `refused` counter).
    pub refused_packets: u64,
}

/// The nft script that (re)defines tank's table for `cgroup`, `endpoints` and `cfg`.
pub fn script(
    cfg: &NftConfig,
    cgroup: &AgentCgroup,
    endpoints: &[Endpoint],
) -> anyhow::Result<String> {
    let path = nft_cgroup_path(&cgroup.dir)?;
    let table = &cfg.table;
    let mut agent_match = vec![format!(
        "socket cgroupv2 level {} \"{}\" jump agent comment \"agent cgroup {}\"",
        cgroup.level(),
        path.display(),
        cgroup.path.display()
    )];
    if !cfg.uid_ranges.is_empty() {
        let uids: Vec<String> = cfg
            .uid_ranges
            .iter()
            .map(|&(first, last)| {
                if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                }
            })
            .collect();
        agent_match.push(format!(
            "meta skuid {{ {} }} jump agent comment \"agent host uids\"",
            uids.join(", ")
        ));
    }
    // Connections someone else opened *into* the agent (it may listen on a host port) carry
    // the agent's packets in the reply direction: only those from the host itself (over
    // loopback) go out; a remote peer never gets a SYN-ACK, let alone data.
    let mut agent = vec![
        "ct state established ct direction original accept comment \"the agent's accepted flows\"".to_owned(),
        "ct state related accept comment \"ICMP errors about them\"".to_owned(),
        "ct direction reply oif \"lo\" accept comment \"connections into the agent from the host itself\"".to_owned(),
    ];
    for e in endpoints {
        let family = match ip_key(e.addr.ip()) {
            IpAddr::V4(v4) => format!("ip daddr {v4}"),
            IpAddr::V6(v6) => format!("ip6 daddr {v6}"),
        };
        let transport = match e.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let what = if e.is_proxy {
            "proxy"
        } else {
            "listed endpoint"
        };
        agent.push(format!(
            "{family} {transport} dport {} accept comment \"{what}\"",
            e.addr.port()
        ));
    }
    // `limit` stops only its own rule when over the rate, so the log is bounded while the
    // counter and the reject in the next rule see every packet. icmpx answers IPv4 and IPv6.
    agent.push(format!(
        "limit rate 10/second burst 20 packets log prefix \"{LOG_PREFIX}\" level warn"
    ));
    agent.push(format!(
        "counter name \"{REFUSED_COUNTER}\" reject with icmpx admin-prohibited"
    ));

    let indent = |rules: &[String]| {
        rules
            .iter()
            .map(|r| format!("\t\t{r}\n"))
            .collect::<String>()
    };
    // The first two lines make the delete succeed whether or not the table exists; all of it
    // is one transaction.
    Ok(format!(
        "table inet {table} {{}}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tcounter {REFUSED_COUNTER} {{}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         {}\
         \t}}\n\
         \tchain agent {{\n\
         {}\
         \t}}\n\
         }}\n",
        indent(&agent_match),
        indent(&agent)
    ))
}

/// Installs (or atomically replaces) tank's table, then reads it back and checks the kernel
/// holds every rule. Returns what it holds.
pub fn install(
    cfg: &NftConfig,
    cgroup: &AgentCgroup,
    endpoints: &[Endpoint],
) -> anyhow::Result<TableState> {
    let script = script(cfg, cgroup, endpoints)?;
    let expected_rules = script
        .lines()
        .filter(|l| l.starts_with("\t\t") && !l.contains("type filter hook"))
        .count();
    apply(&script)
        .with_context(|| format!("cannot install the nftables table inet {}", cfg.table))?;
    let state = inspect(&cfg.table)?.with_context(|| {
        format!(
            "nftables table inet {} is missing right after installing it",
            cfg.table
        )
    })?;
    if state.rules != expected_rules {
        bail!(
            "nftables table inet {} holds {} rules after installing, expected {expected_rules}",
            cfg.table,
            state.rules
        );
    }
    Ok(state)
}

/// Deletes tank's table if it exists. Returns whether it did.
pub fn remove(table: &str) -> anyhow::Result<bool> {
    if inspect(table)?.is_none() {
        return Ok(false);
    }
    apply(&format!("delete table inet {table}\n"))
        .with_context(|| format!("cannot delete the nftables table inet {table}"))?;
    Ok(true)
}

/// Reads tank's table through nft's JSON; `None` when it does not exist.
pub fn inspect(table: &str) -> anyhow::Result<Option<TableState>> {
    let exists = run_nft(&["list", "tables", "inet"])?
        .lines()
        .any(|l| l.trim() == format!("table inet {table}"));
    if !exists {
        return Ok(None);
    }
    let json =
        nftables::helper::get_current_ruleset_raw(None::<&str>, ["list", "table", "inet", table])
            .with_context(|| format!("cannot read the nftables table inet {table}"))?;
    let ruleset: serde_json::Value =
        serde_json::from_str(&json).context("nft printed invalid JSON")?;
    let mut state = TableState {
        table: table.to_owned(),
        rules: 0,
        refused_packets: 0,
    };
    for object in ruleset["nftables"].as_array().into_iter().flatten() {
        if object.get("rule").is_some() {
            state.rules += 1;
        } else if let Some(counter) = object
            .get("counter")
            .filter(|c| c["name"] == REFUSED_COUNTER)
        {
            state.refused_packets = counter["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(Some(state))
}

/// The agent cgroup's directory as nft names it: relative to `/sys/fs/cgroup`.
fn nft_cgroup_path(dir: &Path) -> anyhow::Result<PathBuf> {
    dir.strip_prefix(NFT_CGROUP_ROOT).map(Path::to_owned).map_err(|_| {
        anyhow::anyhow!(
            "nft can only match cgroups under {NFT_CGROUP_ROOT}, and the agent cgroup is {}; mount cgroup2 there or set `enabled = false` in [nft]",
            dir.display()
        )
    })
}

/// Feeds `script` to `nft -f -`: one transaction.
fn apply(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `nft` (install the nftables package)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .context("cannot write to nft")?;
    let out = child.wait_with_output().context("nft did not finish")?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn run_nft(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .context("cannot run `nft` (install the nftables package)")?;
    if !out.status.success() {
        bail!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup(dir: &str, path: &str) -> AgentCgroup {
        AgentCgroup {
            dir: dir.into(),
            path: path.into(),
            id: 7,
        }
    }

    fn endpoint(addr: &str, protocol: Protocol, is_proxy: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            protocol,
            is_proxy,
        }
    }

    #[test]
    fn hybrid_mount_paths_keep_the_unified_prefix_and_the_hierarchy_level() {
        let cfg = NftConfig {
            enabled: true,
            table: "tank".into(),
            uid_ranges: vec![(2000, 2000), (100_000, 165_535)],
        };
        let s = script(
            &cfg,
            &cgroup("/sys/fs/cgroup/unified/x/agent", "/x/agent"),
            &[],
        )
        .unwrap();
        assert!(
            s.contains("socket cgroupv2 level 2 \"unified/x/agent\" jump agent"),
            "{s}"
        );
        assert!(
            s.contains("meta skuid { 2000, 100000-165535 } jump agent"),
            "{s}"
        );
        let s = script(&cfg, &cgroup("/sys/fs/cgroup/x/agent", "/x/agent"), &[]).unwrap();
        assert!(s.contains("socket cgroupv2 level 2 \"x/agent\""), "{s}");
        assert!(script(&cfg, &cgroup("/mnt/cg2/x/agent", "/x/agent"), &[]).is_err());
    }

    #[test]
    fn endpoints_become_accepts_before_the_reject_and_mapped_ipv4_is_ipv4() {
        let cfg = NftConfig {
            enabled: true,
            table: "t".into(),
            uid_ranges: Vec::new(),
        };
        let eps = [
            endpoint("[::ffff:192.0.2.1]:3128", Protocol::Tcp, true),
            endpoint("[2001:db8::5]:53", Protocol::Udp, false),
        ];
        let s = script(&cfg, &cgroup("/sys/fs/cgroup/a/b", "/a/b"), &eps).unwrap();
        let proxy = s
            .find("ip daddr 192.0.2.1 tcp dport 3128 accept")
            .expect("proxy accept");
        let dns = s
            .find("ip6 daddr 2001:db8::5 udp dport 53 accept")
            .expect("listed accept");
        let reject = s
            .find("reject with icmpx admin-prohibited")
            .expect("reject");
        assert!(proxy < reject && dns < reject);
        assert!(!s.contains("meta skuid"));
        // Loopback is accepted only for replies on connections the host opened into the
        // agent; the agent's own new connections over loopback are judged like any other.
        let loopback: Vec<&str> = s.lines().filter(|l| l.contains("\"lo\"")).collect();
        assert_eq!(loopback.len(), 1, "{s}");
        assert!(
            loopback[0].contains("ct direction reply oif \"lo\" accept"),
            "{s}"
        );
        assert!(
            !s.contains("iif") && !s.contains("127.0.0.0/8"),
            "no blanket loopback accept: {s}"
        );
        assert!(s.starts_with("table inet t {}\ndelete table inet t\ntable inet t {\n"));
    }
}
