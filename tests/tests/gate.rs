//! The kernel gate on a real kernel (root only): what is allowed, what gets EPERM, what is
//! recorded, and that enforcement survives the loader.
//!
//! Targets are listeners this test opens on loopback; nothing else is ever contacted.

use std::net::{TcpListener, UdpSocket};

use tank_ebpf_common::event::hook;
use tank_integration_tests::{counter, network_records, probe, Loader, TestCgroups};

/// Loopback listeners: one the config names as the proxy, one it does not.
struct Targets {
    proxy: TcpListener,
    other: TcpListener,
    other6: TcpListener,
    udp: UdpSocket,
}

impl Targets {
    fn new() -> Self {
        Self {
            proxy: TcpListener::bind("127.0.0.1:0").unwrap(),
            other: TcpListener::bind("127.0.0.1:0").unwrap(),
            other6: TcpListener::bind("[::1]:0").unwrap(),
            udp: UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    }
    fn proxy(&self) -> String {
        self.proxy.local_addr().unwrap().to_string()
    }
    fn other(&self) -> String {
        self.other.local_addr().unwrap().to_string()
    }
    fn other6(&self) -> String {
        self.other6.local_addr().unwrap().to_string()
    }
    fn mapped_other(&self) -> String {
        format!(
            "[::ffff:127.0.0.1]:{}",
            self.other.local_addr().unwrap().port()
        )
    }
    fn mapped_proxy(&self) -> String {
        format!(
            "[::ffff:127.0.0.1]:{}",
            self.proxy.local_addr().unwrap().port()
        )
    }
    fn udp(&self) -> String {
        self.udp.local_addr().unwrap().to_string()
    }
    fn config(&self) -> String {
        format!("proxies = [\"{}\"]", self.proxy())
    }
}

#[test]
fn unlisted_ipv4_ipv6_and_mapped_destinations_get_eperm_and_the_proxy_connects() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let _loader = Loader::start(&cg, &t.config());
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.other()]).1,
        "EPERM"
    );
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.other6()]).1,
        "EPERM"
    );
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.mapped_other()]).1,
        "EPERM"
    );
    assert_eq!(probe(&cg.agent, Some(65534), &["tcp", &t.proxy()]).1, "ok");
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.mapped_proxy()]).1,
        "ok",
        "mapped form of the proxy is the proxy"
    );
}

#[test]
fn udp_sendto_and_connected_udp_to_unlisted_targets_are_refused() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let _loader = Loader::start(&cg, &t.config());
    assert_eq!(
        probe(&cg.agent, Some(65534), &["udp-sendto", &t.udp()]).1,
        "EPERM"
    );
    assert_eq!(
        probe(&cg.agent, Some(65534), &["udp-connect", &t.udp()]).1,
        "EPERM"
    );
}

#[test]
fn listed_udp_endpoint_is_reachable_and_its_tcp_port_is_not() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let _loader = Loader::start(
        &cg,
        &format!(
            "{}\n[[allow]]\nendpoint = \"{}\"\nprotocol = \"udp\"\n",
            t.config(),
            t.udp()
        ),
    );
    assert_eq!(probe(&cg.agent, None, &["udp-sendto", &t.udp()]).1, "ok");
    assert_eq!(probe(&cg.agent, None, &["udp-connect", &t.udp()]).1, "ok");
    // Same address and port over TCP is another endpoint: not listed.
    let tcp_same_port = TcpListener::bind(t.udp()).ok();
    if tcp_same_port.is_some() {
        assert_eq!(probe(&cg.agent, None, &["tcp", &t.udp()]).1, "EPERM");
    }
}

#[test]
fn a_process_in_a_sibling_cgroup_is_untouched() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let _loader = Loader::start(&cg, &t.config());
    assert_eq!(probe(&cg.sibling, None, &["tcp", &t.other()]).1, "ok");
    assert_eq!(probe(&cg.sibling, None, &["udp-sendto", &t.udp()]).1, "ok");
    assert_eq!(probe(&cg.agent, None, &["tcp", &t.other()]).1, "EPERM");
}

#[test]
fn every_attempt_reaches_the_audit_log_with_its_fields() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let loader = Loader::start(&cg, &t.config());
    let cgroup_id = loader.status()["cgroup"]["id"].as_u64().expect("cgroup id");
    let (denied_pid, _) = probe(&cg.agent, Some(65534), &["tcp", &t.other()]);
    let (allowed_pid, _) = probe(&cg.agent, Some(65534), &["tcp", &t.proxy()]);
    let (udp_pid, _) = probe(&cg.agent, Some(65534), &["udp-sendto", &t.udp()]);
    let (v6_pid, _) = probe(&cg.agent, Some(65534), &["tcp", &t.other6()]);
    // Four attempts, and the established record of the allowed one.
    let records = loader.records(5);
    let find = |pid: u32| {
        records
            .iter()
            .find(|r| r.actor.process.pid == pid)
            .unwrap_or_else(|| panic!("no record for pid {pid}: {records:?}"))
    };

    let denied = find(denied_pid);
    assert_eq!(
        (
            denied.action.as_str(),
            denied.activity_id,
            denied.unmapped.reason.as_str()
        ),
        ("Denied", 5, "not_listed")
    );
    assert_eq!(denied.dst_endpoint.addr(), t.other.local_addr().ok());
    assert_eq!(denied.actor.process.name, "tank-probe");
    assert_eq!(denied.actor.process.user.uid, "65534");
    assert_eq!(denied.unmapped.gid, 65534);
    assert_eq!(denied.unmapped.cgroup_id, cgroup_id);
    assert_eq!(denied.unmapped.hook.0, hook::CONNECT4);
    assert_eq!(
        (
            denied.connection_info.protocol_name.as_str(),
            denied.unmapped.sock_type
        ),
        ("tcp", 1)
    );
    assert_ne!(denied.unmapped.cookie, 0);
    assert!(
        denied.time > 1_600_000_000_000,
        "wall-clock ms: {}",
        denied.time
    );

    let allowed = find(allowed_pid);
    assert_eq!(
        (allowed.action.as_str(), allowed.unmapped.reason.as_str()),
        ("Allowed", "proxy")
    );
    assert_eq!(allowed.dst_endpoint.addr(), t.proxy.local_addr().ok());

    let udp = find(udp_pid);
    assert_eq!(
        (
            udp.unmapped.hook.as_str(),
            udp.connection_info.protocol_name.as_str(),
            udp.action.as_str()
        ),
        ("sendmsg4", "udp", "Denied")
    );

    let v6 = find(v6_pid);
    assert_eq!(
        (
            v6.unmapped.hook.as_str(),
            v6.dst_endpoint.ip,
            v6.connection_info.protocol_ver_id
        ),
        (
            "connect6",
            Some(std::net::Ipv6Addr::LOCALHOST.into()),
            Some(6)
        )
    );

    let status = loader.status();
    assert_eq!(counter(&status, "allowed"), 1);
    assert_eq!(counter(&status, "denied"), 3);
}

#[test]
fn kill_9_of_the_loader_leaves_enforcement_and_a_restart_loses_no_record() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let mut loader = Loader::start(&cg, &t.config());
    loader.kill9();

    // No loader: the pinned gate still decides, and events wait in the ring buffer.
    let (pid, outcome) = probe(&cg.agent, Some(65534), &["tcp", &t.other()]);
    assert_eq!(outcome, "EPERM");
    assert_eq!(probe(&cg.agent, Some(65534), &["tcp", &t.proxy()]).1, "ok");

    loader.restart();
    // The denial, the proxy connect and its established record.
    let records = loader.records(3);
    assert!(
        records
            .iter()
            .any(|r| r.actor.process.pid == pid && !r.allowed()),
        "attempt made while the loader was dead is missing"
    );
    assert_eq!(records.len(), 3, "{records:#?}");
}

#[test]
fn a_restart_re_adopts_and_attaches_nothing_twice() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let mut loader = Loader::start(&cg, &t.config());
    let before = loader.status();
    loader.stop();
    loader.restart();
    loader.kill9();
    loader.restart();
    let after = loader.status();
    assert_eq!(after["enforcing"], true, "{after}");
    for (b, a) in before["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["hooks"].as_array().unwrap())
    {
        assert_eq!(
            a["attachments"], 1,
            "hook {} attached more than once: {after}",
            a["hook"]
        );
        assert_eq!(
            a["program_id"], b["program_id"],
            "hook {} was replaced, not adopted",
            a["hook"]
        );
    }
    let starts: Vec<_> = tank_ebpf_common::chain::read(&loader.audit_log)
        .unwrap()
        .1
        .into_iter()
        .filter(|r| r.value["class_uid"] == 6002)
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(starts[2].value["unmapped"]["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["outcome"] == "adopted"));
    assert_eq!(probe(&cg.agent, None, &["tcp", &t.other()]).1, "EPERM");
}

#[test]
fn a_full_ring_buffer_denies_even_the_proxy_and_counts_it() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let mut loader = Loader::start(&cg, &format!("{}\nring_buffer_bytes = 4096", t.config()));
    // Stop the drain so the 4 KiB ring fills (about 36 events of 104 bytes + headers).
    loader.kill9();
    let flood = probe(&cg.agent, Some(65534), &["flood", &t.other(), "200"]).1;
    assert_eq!(flood, "ok=0 eperm=200 other=0");
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.proxy()]).1,
        "EPERM",
        "an allowlisted connect with no room to record it must fail"
    );
    let status = loader.status();
    let unrecorded = counter(&status, "unrecorded_denied");
    let recorded = counter(&status, "denied") + counter(&status, "allowed");
    assert!(unrecorded >= 1, "{status}");
    assert_eq!(
        recorded + unrecorded,
        201,
        "every attempt is recorded or counted: {status}"
    );

    // Once drained, the log holds exactly the recorded attempts.
    loader.restart();
    assert_eq!(loader.records(recorded as usize).len() as u64, recorded);
    assert_eq!(counter(&loader.status(), "unrecorded_allowed"), 0);
}

#[test]
fn audit_mode_records_and_allows() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let loader = Loader::start(&cg, &format!("{}\nmode = \"audit\"", t.config()));
    let (pid, outcome) = probe(&cg.agent, Some(65534), &["tcp", &t.other()]);
    assert_eq!(outcome, "ok");
    let records = loader.records(1);
    let r = records
        .iter()
        .find(|r| r.actor.process.pid == pid)
        .expect("audit-mode attempt recorded");
    assert_eq!(
        (
            r.action.as_str(),
            r.unmapped.reason.as_str(),
            r.unmapped.mode.as_str()
        ),
        ("Allowed", "audit_not_listed", "audit")
    );
    assert_eq!(loader.status()["mode"], "audit");
}

#[test]
fn detach_is_refused_while_the_loader_runs_and_then_removes_enforcement_on_record() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let mut loader = Loader::start(&cg, &t.config());
    let refused = loader.cli(&["detach"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop tank-loader first"),
        "{refused:?}"
    );
    assert_eq!(probe(&cg.agent, None, &["tcp", &t.other()]).1, "EPERM");

    loader.stop();
    let out = loader.cli(&["detach"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        probe(&cg.agent, None, &["tcp", &t.other()]).1,
        "ok",
        "detach must remove enforcement"
    );
    let status = loader.cli(&["status"]);
    assert!(
        !status.status.success(),
        "status must exit 1 when not enforcing"
    );
    let log = tank_ebpf_common::chain::read(&loader.audit_log).unwrap();
    assert!(log.0.is_intact());
    let last = &log.1.last().unwrap().value;
    assert_eq!(
        (last["class_uid"].as_u64(), last["activity_id"].as_u64()),
        (Some(6002), Some(2)),
        "removal is on record: {last}"
    );
    assert_eq!(network_records(&loader.audit_log).len(), 1);
}

#[test]
fn an_established_connection_is_recorded_with_its_whole_4_tuple_under_the_attempts_cookie() {
    let cg = TestCgroups::new();
    let t = Targets::new();
    let loader = Loader::start(&cg, &t.config());
    let mut peers = Vec::new();
    for target in [t.proxy(), t.mapped_proxy()] {
        let (pid, outcome) = probe(&cg.agent, Some(65534), &["tcp", &target]);
        assert_eq!(outcome, "ok");
        // The listener's view of the client is the 4-tuple the kernel record must name.
        let (_, peer) = t.proxy.accept().unwrap();
        peers.push((pid, peer));
    }
    let records = loader.records(4);
    for (pid, peer) in peers {
        let attempt = records
            .iter()
            .find(|r| {
                r.actor.process.pid == pid
                    && [hook::CONNECT4, hook::CONNECT6].contains(&r.unmapped.hook.0)
            })
            .unwrap_or_else(|| panic!("no attempt of pid {pid} in {records:#?}"));
        let est = records
            .iter()
            .find(|r| {
                r.unmapped.hook.0 == hook::ESTABLISHED
                    && r.unmapped.cookie == attempt.unmapped.cookie
            })
            .unwrap_or_else(|| panic!("no established record for {attempt:#?} in {records:#?}"));
        assert_eq!(est.src_endpoint.addr(), Some(peer), "{est:#?}");
        assert_eq!(est.dst_endpoint.addr(), t.proxy.local_addr().ok());
        assert_eq!(
            (est.action.as_str(), est.unmapped.reason.as_str()),
            ("Allowed", "proxy")
        );
        // The process is copied from the attempt: the kernel callback runs outside it.
        assert_eq!(
            (est.actor.process.pid, est.actor.process.user.uid.as_str()),
            (pid, "65534")
        );
        assert!(est.unmapped.ktime_ns >= attempt.unmapped.ktime_ns);
    }
    // A denied attempt never establishes, and UDP has no handshake.
    assert_eq!(
        probe(&cg.agent, Some(65534), &["tcp", &t.other()]).1,
        "EPERM"
    );
    let records = loader.records(5);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.unmapped.hook.0 == hook::ESTABLISHED)
            .count(),
        2,
        "{records:#?}"
    );
    assert_eq!(counter(&loader.status(), "unrecorded_established"), 0);
}
