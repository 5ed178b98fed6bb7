//! The nftables baseline on a real kernel with the real `nft` (root only): the table tank
//! installs, that it refuses the agent's packets on its own (the BPF gate in audit mode lets
//! them through), atomic replacement, other tables left alone, and removal by detach only.
//!
//! Targets are loopback listeners this test opens. Every table a test makes has a unique name
//! and is removed on drop, also when the test fails.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

use tank_integration_tests::{nft_section, probe, unique, Loader, TestCgroups};

/// `nft -j list table inet NAME`, parsed; `None` when the table does not exist.
fn list(table: &str) -> Option<serde_json::Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", table])
        .output()
        .expect("run nft");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("nft JSON"))
}

fn rules(table: &serde_json::Value) -> Vec<serde_json::Value> {
    table["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule").cloned())
        .collect()
}

fn refused(table: &str) -> u64 {
    let t = list(table).expect("table exists");
    t["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| {
            o.get("counter")
                .filter(|c| c["name"] == "refused")
                .map(|c| c["packets"].as_u64().unwrap())
        })
        .expect("refused counter")
}

/// A table of someone else's, which tank must never touch.
struct ForeignTable(String);

impl ForeignTable {
    fn new() -> Self {
        let name = unique("tank-it-foreign");
        let script = format!("table inet {name} {{\n\tchain c {{\n\t\ttype filter hook output priority 10; policy accept;\n\t\ttcp dport 9 counter accept\n\t}}\n}}\n");
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "cannot create the foreign table"
        );
        Self(name)
    }
}

impl Drop for ForeignTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

#[test]
fn the_table_matches_the_agent_cgroup_and_uid_range_and_accepts_only_the_endpoints() {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let (nft, table) = nft_section("uid_range = \"100000-165535\"");
    let loader = Loader::start(
        &cg,
        &format!(
            "proxies = [\"{}\"]\n[[allow]]\nendpoint = \"[::1]:53\"\nprotocol = \"udp\"\n{nft}",
            proxy.local_addr().unwrap()
        ),
    );
    let t = list(&table).expect("table installed");
    let chain = t["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("chain").filter(|c| c["name"] == "output"))
        .expect("output chain")
        .clone();
    assert_eq!(
        (
            chain["hook"].as_str(),
            chain["prio"].as_i64(),
            chain["type"].as_str()
        ),
        (Some("output"), Some(0), Some("filter"))
    );
    let text = serde_json::to_string(&rules(&t)).unwrap();
    // nft names the cgroup relative to /sys/fs/cgroup: on a hybrid host that starts "unified/".
    let mount = tank_loader::cgroup::cgroup2_mount().unwrap();
    let nft_path = cg
        .agent
        .strip_prefix("/sys/fs/cgroup")
        .unwrap()
        .display()
        .to_string();
    assert!(
        text.contains(&format!("\"right\":\"{nft_path}\"")) && text.contains("cgroupv2"),
        "cgroup match for {nft_path} (mount {}): {text}",
        mount.display()
    );
    assert!(
        text.contains("\"skuid\"") && text.contains("100000") && text.contains("165535"),
        "uid range: {text}"
    );
    assert!(
        text.contains(&format!("\"right\":{}", proxy.local_addr().unwrap().port())),
        "proxy accept: {text}"
    );
    assert!(
        text.contains("\"right\":\"::1\"") && text.contains("\"right\":53"),
        "listed IPv6 UDP endpoint: {text}"
    );
    assert!(
        text.contains("\"established\"") && text.contains("\"related\""),
        "replies of accepted flows: {text}"
    );
    assert!(
        text.contains("\"reject\":{\"expr\":\"admin-prohibited\",\"type\":\"icmpx\"}"),
        "icmpx reject: {text}"
    );
    assert!(
        text.contains("\"limit\"") && text.contains("tank-refused"),
        "rate-limited log: {text}"
    );
    // Loopback only for replies on connections the host opened into the agent.
    assert_eq!(text.matches("\"oif\"").count(), 1, "{text}");
    assert!(
        text.contains("{\"match\":{\"left\":{\"ct\":{\"key\":\"direction\"}},\"op\":\"==\",\"right\":\"reply\"}},{\"match\":{\"left\":{\"meta\":{\"key\":\"oif\"}},\"op\":\"==\",\"right\":\"lo\"}}"),
        "loopback accepted in the reply direction only: {text}"
    );
    assert!(
        !text.contains("\"iif\"") && !text.contains("127.0.0.0"),
        "no blanket loopback accept: {text}"
    );
    // 2 jumps (cgroup, uid) + 3 ct (own flows, related, host's inbound) + 2 endpoints + log
    // + reject.
    assert_eq!(rules(&t).len(), 9);
    let status = loader.status();
    assert_eq!(status["layers"]["nft"]["table"]["rules"], 9, "{status}");
}

#[test]
fn with_the_gate_in_audit_mode_nft_still_refuses_and_counts_while_the_proxy_works() {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other6 = TcpListener::bind("[::1]:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (nft, table) = nft_section("");
    let loader = Loader::start(
        &cg,
        &format!(
            "mode = \"audit\"\nproxies = [\"{}\"]\n{nft}",
            proxy.local_addr().unwrap()
        ),
    );
    assert_eq!(refused(&table), 0);

    let (pid, outcome) = probe(
        &cg.agent,
        Some(65534),
        &["tcp", &other.local_addr().unwrap().to_string()],
    );
    // icmpx admin-prohibited reaches a TCP connect as EHOSTUNREACH (IPv4) / EACCES (IPv6).
    assert_eq!(
        outcome, "EHOSTUNREACH",
        "nft must refuse what the audit-mode gate allowed"
    );
    let r = loader.record_of(pid);
    assert_eq!(
        (r.action.as_str(), r.unmapped.reason.as_str()),
        ("Allowed", "audit_not_listed"),
        "the gate let it through"
    );
    let after_tcp = refused(&table);
    assert!(after_tcp >= 1, "counted");

    assert_ne!(
        probe(
            &cg.agent,
            Some(65534),
            &["tcp", &other6.local_addr().unwrap().to_string()]
        )
        .1,
        "ok",
        "IPv6 refused too"
    );
    assert_eq!(
        probe(
            &cg.agent,
            Some(65534),
            &["udp-sendto", &udp.local_addr().unwrap().to_string()]
        )
        .1,
        "EPERM",
        "UDP refused at output"
    );
    assert!(refused(&table) >= after_tcp + 2);

    assert_eq!(
        probe(
            &cg.agent,
            Some(65534),
            &["tcp", &proxy.local_addr().unwrap().to_string()]
        )
        .1,
        "ok",
        "the proxy stays reachable"
    );
    assert_eq!(
        probe(
            &cg.sibling,
            Some(65534),
            &["tcp", &other.local_addr().unwrap().to_string()]
        )
        .1,
        "ok",
        "other cgroups are not matched"
    );
}

#[test]
fn zero_endpoints_install_a_table_that_rejects_everything_from_the_agent() {
    let cg = TestCgroups::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (nft, table) = nft_section("");
    let _loader = Loader::start(&cg, &format!("mode = \"audit\"\n{nft}"));
    let t = list(&table).expect("table installed");
    // The cgroup jump, 3 ct, log, reject: no accept of any destination.
    assert_eq!(rules(&t).len(), 6);
    assert!(!serde_json::to_string(&rules(&t))
        .unwrap()
        .contains("\"dport\""));
    assert_eq!(
        probe(
            &cg.agent,
            Some(65534),
            &["tcp", &listener.local_addr().unwrap().to_string()]
        )
        .1,
        "EHOSTUNREACH"
    );
    assert!(refused(&table) >= 1);
}

#[test]
fn a_restart_replaces_the_table_atomically_exit_leaves_it_detach_removes_it_and_other_tables_are_untouched(
) {
    let foreign = ForeignTable::new();
    let foreign_before = list(&foreign.0).expect("foreign table");
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let (nft, table) = nft_section("");
    let mut loader = Loader::start(
        &cg,
        &format!("proxies = [\"{}\"]\n{nft}", proxy.local_addr().unwrap()),
    );
    assert_eq!(rules(&list(&table).unwrap()).len(), 6 + 1);

    // A new policy: one more endpoint. The restart swaps the table in one transaction.
    loader.stop();
    assert!(
        list(&table).is_some(),
        "the table stays when the loader exits"
    );
    let config = std::fs::read_to_string(&loader.config)
        .unwrap()
        .replace("proxies = [", "proxies = [\"127.0.0.1:1\", ");
    std::fs::write(&loader.config, config).unwrap();
    loader.restart();
    assert_eq!(rules(&list(&table).unwrap()).len(), 6 + 2);

    loader.stop();
    let out = loader.cli(&["detach"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("removed nftables table inet {table}")));
    assert!(list(&table).is_none(), "detach removes the table");
    assert_eq!(
        list(&foreign.0),
        Some(foreign_before),
        "another table is left exactly as it was"
    );
}

#[test]
fn a_failing_nft_transaction_stops_the_loader_before_it_is_ready() {
    let cg = TestCgroups::new();
    let (nft, table) = nft_section("");
    let mut loader = Loader::configure(&cg, &nft);
    // No nft to be found: the transaction cannot happen.
    loader.set_env("PATH", "/nonexistent");
    let err = loader
        .try_restart()
        .expect_err("the loader must refuse to start without its nft table");
    assert!(
        err.contains(&format!("cannot install the nftables table inet {table}")),
        "{err}"
    );
    assert!(list(&table).is_none());
}
