//! Packets sent somewhere other than the destination the gate judged (issue 10, items 1 and 3).
//!
//! The gate judges the address given to connect or sendto. IPv4 source routes and IPv6
//! routing headers make the kernel send to another address (the first hop, the first
//! segment), and any uid may set them. Each test here puts the agent on one side of a veth
//! pair in namespaces of its own and captures on the far side, where both the allowed endpoint
//! and the detour address live: the judge is which destination the marked packets carried
//! when they arrived, not the errno. Every row first runs the same attempt from the sibling
//! cgroup, which tank does not guard, to show the kernel really sends it to the detour, then
//! from the agent cgroup with nft off: layer 1 alone must hold.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

use tank_integration_tests::topology::{wire, Netns};
use tank_integration_tests::NetworkRecord;
use tank_integration_tests::{probe_with, unique, Capture, Loader, ProbeOpts, TestCgroups};

const AGENT: Option<u32> = Some(65534);
/// Far side: the allowed endpoint and the detour, one subnet with the agent.
const ALLOWED4: &str = "10.201.0.1";
const DETOUR4: &str = "10.201.0.3";
const ALLOWED6: &str = "2001:db8:1::1";
const DETOUR6: &str = "2001:db8:1::3";

/// The agent's namespace wired to the far one, listeners on the allowed endpoints, the loader
/// (nft off) allowing exactly those.
struct Far {
    loader: Loader,
    cg: TestCgroups,
    agent_ns: Netns,
    far_ns: Netns,
    port: u16,
    _listeners: (TcpListener, TcpListener, UdpSocket, UdpSocket),
}

impl Far {
    fn new(mode: &str) -> Self {
        let agent_ns = Netns::new();
        let far_ns = Netns::new();
        wire(&agent_ns, "a0", &far_ns, "b0");
        for addr in ["10.201.0.2/24", "2001:db8:1::2/64"] {
            agent_ns.ip(&["addr", "add", addr, "dev", "a0", "nodad"]);
        }
        for addr in [
            "10.201.0.1/24",
            "10.201.0.3/24",
            "2001:db8:1::1/64",
            "2001:db8:1::3/64",
        ] {
            far_ns.ip(&["addr", "add", addr, "dev", "b0", "nodad"]);
        }
        // Client TCP Fast Open without a cookie, so the SYN itself carries the data.
        agent_ns.sysctl("net/ipv4/tcp_fastopen", "5");
        let listeners = tank_integration_tests::in_netns(&far_ns.path, || {
            let t4 = TcpListener::bind(format!("{ALLOWED4}:0")).unwrap();
            let port = t4.local_addr().unwrap().port();
            (
                t4,
                TcpListener::bind(format!("[{ALLOWED6}]:{port}")).unwrap(),
                UdpSocket::bind(format!("{ALLOWED4}:{port}")).unwrap(),
                UdpSocket::bind(format!("[{ALLOWED6}]:{port}")).unwrap(),
            )
        });
        let port = listeners.0.local_addr().unwrap().port();
        let cg = TestCgroups::new();
        let mut allow = String::new();
        for ip in [ALLOWED4, "[2001:db8:1::1]"] {
            for proto in ["tcp", "udp"] {
                allow +=
                    &format!("[[allow]]\nendpoint = \"{ip}:{port}\"\nprotocol = \"{proto}\"\n");
            }
        }
        let loader = Loader::start(&cg, &format!("mode = \"{mode}\"\nproxies = []\n{allow}"));
        Self {
            loader,
            cg,
            agent_ns,
            far_ns,
            port,
            _listeners: listeners,
        }
    }

    fn target(&self, v6: bool) -> String {
        if v6 {
            format!("[{ALLOWED6}]:{}", self.port)
        } else {
            format!("{ALLOWED4}:{}", self.port)
        }
    }

    /// Runs `tank-probe reroute` from `cgroup` with a fresh marker; returns the probe's pid,
    /// its answer and the destinations of the marked packets that arrived on the far side.
    fn attempt(&self, cgroup: &std::path::Path, args: &[&str]) -> (u32, String, Vec<IpAddr>) {
        self.attempt_as(AGENT, cgroup, args)
    }

    /// [`Far::attempt`] as `uid` (`None`: root, holding CAP_NET_RAW as root in a container does).
    fn attempt_as(
        &self,
        uid: Option<u32>,
        cgroup: &std::path::Path,
        args: &[&str],
    ) -> (u32, String, Vec<IpAddr>) {
        let mark = format!("M:{}", unique("reroute"));
        let capture = Capture::start(&self.far_ns.path, "b0", &mark);
        let mut full = vec!["reroute"];
        full.extend_from_slice(args);
        full.push(&mark);
        let opts = ProbeOpts {
            uid,
            netns: Some(&self.agent_ns.path),
            seccomp: false,
        };
        let (pid, out) = probe_with(cgroup, &opts, &full);
        (pid, out, capture.finish())
    }

    /// The attempt's row: from the sibling the marked packets reach the detour; from the
    /// agent none do, and the agent's process has a record by `hook` for `reason`.
    fn refused(
        &self,
        uid: Option<u32>,
        (header, how): (&str, &str),
        v6: bool,
        (hook, reason): (&str, &str),
    ) -> NetworkRecord {
        let detour = if v6 { DETOUR6 } else { DETOUR4 };
        let target = self.target(v6);
        let args = [header, how, detour, &target];
        let (_, out, seen) = self.attempt_as(uid, &self.cg.sibling, &args);
        let detour_ip: IpAddr = detour.parse().unwrap();
        assert!(
            seen.contains(&detour_ip),
            "{header}/{how} from the unguarded sibling ({out}) did not reach {detour}: {seen:?}; the row would test nothing"
        );
        let (pid, out, seen) = self.attempt_as(uid, &self.cg.agent, &args);
        assert!(
            !seen.contains(&detour_ip),
            "{header}/{how} from the agent cgroup ({out}) reached the detour {detour}: {seen:?}"
        );
        let r = if hook == "egress" {
            self.egress_record(pid)
        } else {
            self.record(pid, hook)
        };
        assert_eq!(
            (r.action.as_str(), r.unmapped.reason.as_str()),
            ("Denied", reason),
            "{r:?}"
        );
        r
    }

    /// Waits (bounded) for the record of `pid` by `hook`.
    fn record(&self, pid: u32, hook: &str) -> NetworkRecord {
        self.loader
            .wait_record(|r| r.actor.process.pid == pid && r.unmapped.hook.as_str() == hook)
    }

    /// The egress record of the datagram `pid` sent: the egress program names the socket
    /// (cookie, owner uid, cgroup), and the sendmsg record with the same cookie names the
    /// process.
    fn egress_record(&self, pid: u32) -> NetworkRecord {
        let sent = self.loader.wait_record(|r| {
            r.actor.process.pid == pid && r.unmapped.hook.as_str().starts_with("sendmsg")
        });
        let r = self.loader.wait_record(|r| {
            r.unmapped.hook.as_str() == "egress" && r.unmapped.cookie == sent.unmapped.cookie
        });
        assert_eq!(r.actor.process.user.uid, sent.actor.process.user.uid);
        assert_eq!(r.unmapped.cgroup_id, sent.unmapped.cgroup_id);
        r
    }
}

#[test]
fn ipv6_routing_header_by_socket_option_with_every_kind_of_send() {
    let f = Far::new("enforce");
    // Any uid may set a type 4 routing header.
    for how in ["udp-sendto", "udp-connect", "tcp-fastopen", "tcp"] {
        f.refused(
            AGENT,
            ("rthdr", how),
            true,
            ("setsockopt", "ipv6_extension_headers"),
        );
    }
}

#[test]
fn ipv4_source_route_by_socket_option_with_every_kind_of_send() {
    let f = Far::new("enforce");
    // Source routes need CAP_NET_RAW here (uid 65534 gets EPERM from the kernel itself),
    // which root in a Podman container holds: that is the attacker.
    for how in ["udp-sendto", "udp-connect", "tcp-fastopen"] {
        f.refused(None, ("srr", how), false, ("setsockopt", "ip_options"));
    }
    // On an established TCP connection the kernel keeps the route chosen at connect until it
    // is invalidated (then `ip_queue_xmit` routes to the first hop): nothing reaches the
    // detour even unguarded today, and the option is refused and recorded all the same.
    let target = f.target(false);
    let args = ["srr", "tcp", DETOUR4, target.as_str()];
    let detour: IpAddr = DETOUR4.parse().unwrap();
    let (_, out, seen) = f.attempt_as(None, &f.cg.sibling, &args);
    assert!(
        out.starts_with("opt=ok") && !seen.contains(&detour),
        "{out} {seen:?}"
    );
    let (pid, out, seen) = f.attempt_as(None, &f.cg.agent, &args);
    assert!(
        out.starts_with("opt=EPERM") && !seen.contains(&detour),
        "{out} {seen:?}"
    );
    f.record(pid, "setsockopt");
}

#[test]
fn ipv4_source_route_as_ancillary_data() {
    let f = Far::new("enforce");
    // The sendmsg hook saw the allowed endpoint; the packet was headed for the first hop.
    // As root with CAP_NET_RAW, as for the socket option.
    let r = f.refused(
        None,
        ("cmsg-srr", "udp-sendto"),
        false,
        ("egress", "ip_options"),
    );
    assert_eq!(
        r.dst_endpoint.ip,
        DETOUR4.parse().ok(),
        "the record names where it was really going"
    );
}

#[test]
fn ipv6_routing_header_as_ancillary_data_or_packet_options() {
    let f = Far::new("enforce");
    let target = f.target(true);
    for header in ["cmsg-rthdr", "pktoptions"] {
        let args = [header, "udp-sendto", DETOUR6, target.as_str()];
        let (_, sibling, seen) = f.attempt(&f.cg.sibling, &args);
        let detour: IpAddr = DETOUR6.parse().unwrap();
        if seen.contains(&detour) {
            // A kernel with CONFIG_IPV6_MIP6 takes a type 2 header from ancillary data.
            let (pid, out, seen) = f.attempt(&f.cg.agent, &args);
            assert!(
                !seen.contains(&detour),
                "{header} from the agent ({out}) reached the detour"
            );
            if header == "pktoptions" {
                f.record(pid, "setsockopt");
            } else {
                f.egress_record(pid);
            }
        } else {
            // Without MIP6 the kernel itself refuses every routing header in ancillary data.
            assert!(
                sibling.contains("EINVAL"),
                "{header} from the sibling: {sibling}"
            );
            let (_, out, seen) = f.attempt(&f.cg.agent, &args);
            assert!(
                !seen.contains(&detour),
                "{header} from the agent ({out}) reached the detour"
            );
        }
    }
}

#[test]
fn a_routing_header_in_audit_mode_goes_through_and_both_layers_record_it() {
    // Audit mode refuses nothing: the setsockopt program lets the header be set and the egress
    // program then sees it on the packet. Both record what enforce mode would have refused.
    let f = Far::new("audit");
    let target = f.target(true);
    let (pid, out, seen) = f.attempt(&f.cg.agent, &["rthdr", "udp-sendto", DETOUR6, &target]);
    assert_eq!(out, "opt=ok send=ok");
    assert!(seen.contains(&DETOUR6.parse().unwrap()), "{seen:?}");
    let set = f.record(pid, "setsockopt");
    assert_eq!(
        (set.action.as_str(), set.unmapped.reason.as_str()),
        ("Allowed", "ipv6_extension_headers")
    );
    let sent = f.egress_record(pid);
    assert_eq!(
        (sent.action.as_str(), sent.unmapped.reason.as_str()),
        ("Allowed", "ipv6_routing_header")
    );
    assert_eq!(sent.dst_endpoint.ip, DETOUR6.parse().ok());
}

#[test]
fn source_address_options_choose_the_source_never_the_destination() {
    // IP_PKTINFO / IPV6_PKTINFO name a source address and interface. Naming the detour (not
    // an address of the agent's host) fails; either way nothing reaches the detour, and what
    // arrives is addressed to the allowed endpoint.
    let f = Far::new("enforce");
    for (v6, detour) in [(false, DETOUR4), (true, DETOUR6)] {
        let target = f.target(v6);
        let (_, out, seen) = f.attempt(
            &f.cg.agent,
            &["cmsg-pktinfo", "udp-sendto", detour, &target],
        );
        assert!(!seen.contains(&detour.parse().unwrap()), "{out}: {seen:?}");
        let own = if v6 { "2001:db8:1::2" } else { "10.201.0.2" };
        let (_, out, seen) = f.attempt(&f.cg.agent, &["cmsg-pktinfo", "udp-sendto", own, &target]);
        assert_eq!(out, "opt=- send=ok");
        let allowed: IpAddr = target.parse::<SocketAddr>().unwrap().ip();
        assert_eq!(
            seen,
            vec![allowed],
            "the datagram went to the allowed endpoint only"
        );
    }
}

#[test]
fn connected_udp_with_ancillary_data_is_judged_by_its_peer() {
    let f = Far::new("enforce");
    for v6 in [false, true] {
        let target = f.target(v6);
        let mark = format!("M:{}", unique("cmsg"));
        let capture = Capture::start(&f.far_ns.path, "b0", &mark);
        let opts = ProbeOpts {
            uid: AGENT,
            netns: Some(&f.agent_ns.path),
            seccomp: false,
        };
        let (pid, out) = probe_with(&f.cg.agent, &opts, &["udp-connect-cmsg", &target, &mark]);
        let seen = capture.finish();
        assert_eq!(
            out, "ok",
            "send with a cmsg on a UDP socket connected to {target}"
        );
        let peer: SocketAddr = target.parse().unwrap();
        assert_eq!(seen, vec![peer.ip()], "the datagram arrived at its peer");
        let hook = if v6 { "sendmsg6" } else { "sendmsg4" };
        let r = f.record(pid, hook);
        assert_eq!(r.action.as_str(), "Allowed", "{r:?}");
        assert_eq!(
            (r.dst_endpoint.ip, r.dst_endpoint.port),
            (Some(peer.ip()), Some(peer.port()))
        );
    }
}
