//! The bypass matrix: every way out of the agent cgroup we know of, each a named test that
//! asserts it was refused and says by which layer, and that it was recorded (or, where no
//! layer can record it, that enforcement is still intact afterwards).
//!
//! Every test runs the full stack as in production (BPF gate, sock_create, LSM where the
//! kernel loads it, the nftables table) with a loopback "proxy", and attacks from inside the
//! agent cgroup as uid 65534 unless the row needs a stronger attacker (root in the container,
//! which holds CAP_NET_RAW under Podman's defaults). Targets are loopback listeners or
//! addresses inside a network namespace the test creates; nothing else is contacted, and no
//! AF_VSOCK socket is ever connected.
//!
//! Each test prints its row (`| technique | layer that stopped it | recorded |`) straight to
//! stderr, past the test harness' capture; `--test-threads=1` prints them as one table.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use tank_integration_tests::{
    nft_section, probe, probe_with, Loader, ProbeOpts, TestCgroups, TestNetns,
};

const AGENT: Option<u32> = Some(65534);

/// The agent cgroup with every layer in place and a loopback listener as its proxy.
struct Stack {
    loader: Loader,
    proxy: TcpListener,
    table: String,
    cg: TestCgroups,
}

impl Stack {
    fn new() -> Self {
        let cg = TestCgroups::new();
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let (nft, table) = nft_section("");
        let loader = Loader::start(
            &cg,
            &format!("proxies = [\"{}\"]\n{nft}", proxy.local_addr().unwrap()),
        );
        let status = loader.status();
        assert_eq!(status["enforcing"], true, "{status}");
        Self {
            loader,
            proxy,
            table,
            cg,
        }
    }

    fn agent(&self) -> &Path {
        &self.cg.agent
    }

    /// The one connection record of process `pid`, which must be a refusal by `hook` for
    /// `reason`. Returns the row's "recorded" cell.
    fn refusal_recorded(&self, pid: u32, hook: &str, reason: &str) -> String {
        let r = self.loader.record_of(pid);
        assert_eq!(
            (
                r.action.as_str(),
                r.unmapped.hook.as_str(),
                r.unmapped.reason.as_str()
            ),
            ("Denied", hook, reason),
            "{r:?}"
        );
        format!("yes ({hook}, {reason})")
    }

    fn lsm_in_force(&self) -> bool {
        self.loader.status()["layers"]["lsm"]["in_force"]
            .as_bool()
            .expect("layers.lsm.in_force")
    }
}

fn row(technique: &str, layer: &str, recorded: &str) {
    // A leading newline: libtest has written "test NAME ... " on the current line.
    let line = format!("\n| {technique:<44} | {layer:<44} | {recorded:<40} |\n");
    // Straight to the process' stderr: the harness captures print!/eprint! of passing tests.
    std::io::stderr().write_all(line.as_bytes()).unwrap();
}

fn addr(l: &TcpListener) -> String {
    l.local_addr().unwrap().to_string()
}

/// A TCP connect refused by the gate and recorded.
fn gate_refuses_tcp(s: &Stack, opts: &ProbeOpts<'_>, target: &str, hook: &str) -> String {
    let (pid, outcome) = probe_with(s.agent(), opts, &["tcp", target]);
    assert_eq!(outcome, "EPERM", "tcp {target}");
    s.refusal_recorded(pid, hook, "not_listed")
}

#[test]
fn tcp_to_a_non_proxy_ipv4_address() {
    let s = Stack::new();
    let ns = TestNetns::new();
    let target = ns.in_netns(|| TcpListener::bind("192.0.2.1:0").unwrap());
    let opts = ProbeOpts {
        uid: AGENT,
        netns: Some(&ns.path),
        seccomp: false,
    };
    // Reachable at all: the same attempt from the sibling cgroup gets through.
    assert_eq!(
        probe_with(&s.cg.sibling, &opts, &["tcp", &addr(&target)]).1,
        "ok"
    );
    let recorded = gate_refuses_tcp(&s, &opts, &addr(&target), "connect4");
    row(
        "TCP to a non-proxy IPv4 address",
        "gate (connect4)",
        &recorded,
    );
}

#[test]
fn tcp_to_a_non_proxy_ipv6_address() {
    let s = Stack::new();
    let ns = TestNetns::new();
    let target = ns.in_netns(|| TcpListener::bind("[2001:db8::1]:0").unwrap());
    let opts = ProbeOpts {
        uid: AGENT,
        netns: Some(&ns.path),
        seccomp: false,
    };
    assert_eq!(
        probe_with(&s.cg.sibling, &opts, &["tcp", &addr(&target)]).1,
        "ok"
    );
    let recorded = gate_refuses_tcp(&s, &opts, &addr(&target), "connect6");
    row(
        "TCP to a non-proxy IPv6 address",
        "gate (connect6)",
        &recorded,
    );
}

#[test]
fn ipv4_mapped_ipv6_destination() {
    let s = Stack::new();
    let ns = TestNetns::new();
    let target = ns.in_netns(|| TcpListener::bind("0.0.0.0:0").unwrap());
    let mapped = format!("[::ffff:192.0.2.1]:{}", target.local_addr().unwrap().port());
    let opts = ProbeOpts {
        uid: AGENT,
        netns: Some(&ns.path),
        seccomp: false,
    };
    assert_eq!(probe_with(&s.cg.sibling, &opts, &["tcp", &mapped]).1, "ok");
    let (pid, outcome) = probe_with(s.agent(), &opts, &["tcp", &mapped]);
    assert_eq!(outcome, "EPERM");
    let recorded = s.refusal_recorded(pid, "connect6", "not_listed");
    let r = s.loader.record_of(pid);
    assert_eq!(
        r.dst_endpoint.ip,
        Some([192, 0, 2, 1].into()),
        "mapped destinations are judged and recorded as IPv4"
    );
    row(
        "IPv4-mapped IPv6 destination",
        "gate (connect6, mapped key)",
        &recorded,
    );
}

#[test]
fn the_proxy_address_on_another_port() {
    let s = Stack::new();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        probe(s.agent(), AGENT, &["tcp", &addr(&s.proxy)]).1,
        "ok",
        "the proxy itself is reachable"
    );
    let recorded = gate_refuses_tcp(
        &s,
        &ProbeOpts {
            uid: AGENT,
            ..ProbeOpts::default()
        },
        &addr(&other),
        "connect4",
    );
    row(
        "the proxy's address on another port",
        "gate (connect4)",
        &recorded,
    );
}

#[test]
fn udp_sendto() {
    let s = Stack::new();
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(
        s.agent(),
        AGENT,
        &["udp-sendto", &target.local_addr().unwrap().to_string()],
    );
    assert_eq!(outcome, "EPERM");
    row(
        "UDP sendto",
        "gate (sendmsg4)",
        &s.refusal_recorded(pid, "sendmsg4", "not_listed"),
    );
}

#[test]
fn connected_udp() {
    let s = Stack::new();
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(
        s.agent(),
        AGENT,
        &["udp-connect", &target.local_addr().unwrap().to_string()],
    );
    assert_eq!(outcome, "EPERM");
    row(
        "connected UDP",
        "gate (connect4)",
        &s.refusal_recorded(pid, "connect4", "not_listed"),
    );
}

#[test]
fn udp_sendmmsg() {
    let s = Stack::new();
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(
        s.agent(),
        AGENT,
        &["udp-sendmmsg", &target.local_addr().unwrap().to_string()],
    );
    assert_eq!(outcome, "EPERM");
    row(
        "sendmmsg",
        "gate (sendmsg4)",
        &s.refusal_recorded(pid, "sendmsg4", "not_listed"),
    );
}

#[test]
fn tcp_fast_open() {
    let tfo =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").expect("tcp_fastopen sysctl");
    assert!(
        tfo.trim().parse::<u32>().expect("number") & 1 == 1,
        "client TCP Fast Open is off on this host: the row would test nothing"
    );
    let s = Stack::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(s.agent(), AGENT, &["tcp-fastopen", &addr(&target)]);
    assert_eq!(outcome, "EPERM");
    // A fast-open sendto connects implicitly: the kernel runs the connect hook for it.
    row(
        "TCP Fast Open (sendto MSG_FASTOPEN)",
        "gate (connect4)",
        &s.refusal_recorded(pid, "connect4", "not_listed"),
    );
}

#[test]
fn connect_through_io_uring() {
    let s = Stack::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        probe(&s.cg.sibling, AGENT, &["io-uring-connect", &addr(&target)]).1,
        "ok",
        "io_uring works here"
    );
    let (_, outcome) = probe(s.agent(), AGENT, &["io-uring-connect", &addr(&target)]);
    assert_eq!(outcome, "EPERM");
    // The connect may run on an io_uring worker thread: find the record by destination.
    let port = target.local_addr().unwrap().port();
    let records = s.loader.records(1);
    let r = records
        .iter()
        .find(|r| r.dst_endpoint.port == Some(port))
        .unwrap_or_else(|| panic!("no record for port {port}: {records:?}"));
    assert_eq!(
        (r.action.as_str(), r.unmapped.hook.as_str()),
        ("Denied", "connect4")
    );
    row(
        "connect submitted through io_uring",
        "gate (connect4); seccomp refuses io_uring",
        "yes (connect4, not_listed)",
    );
}

#[test]
fn ping_socket() {
    let s = Stack::new();
    let ns = TestNetns::new();
    let opts = ProbeOpts {
        uid: AGENT,
        netns: Some(&ns.path),
        seccomp: false,
    };
    // In this namespace ping sockets are open to every group: the sibling gets one.
    assert_eq!(
        probe_with(&s.cg.sibling, &opts, &["socket", "2", "2", "1"]).1,
        "ok"
    );
    let (pid, outcome) = probe_with(s.agent(), &opts, &["socket", "2", "2", "1"]);
    assert_eq!(outcome, "EPERM");
    let recorded = s.refusal_recorded(pid, "sock_create", "ping_socket");
    let (pid6, outcome6) = probe_with(s.agent(), &opts, &["socket", "10", "2", "58"]);
    assert_eq!(outcome6, "EPERM", "ICMPv6 ping socket");
    s.refusal_recorded(pid6, "sock_create", "ping_socket");
    row("ping socket (ICMP and ICMPv6)", "sock_create", &recorded);
}

#[test]
fn raw_socket() {
    let s = Stack::new();
    // uid 65534 lacks CAP_NET_RAW, so the kernel refuses before any hook. Root in a Podman
    // container holds it: that is the attacker here.
    assert_eq!(
        probe(s.agent(), AGENT, &["socket", "2", "3", "255"]).1,
        "EPERM"
    );
    assert_eq!(
        probe(&s.cg.sibling, None, &["socket", "2", "3", "255"]).1,
        "ok",
        "root gets a raw socket outside the agent cgroup"
    );
    let (pid, outcome) = probe(s.agent(), None, &["socket", "2", "3", "255"]);
    assert_eq!(outcome, "EPERM");
    let recorded = s.refusal_recorded(pid, "sock_create", "raw_socket");
    let (pid6, outcome6) = probe(s.agent(), None, &["socket", "10", "3", "58"]);
    assert_eq!(outcome6, "EPERM");
    s.refusal_recorded(pid6, "sock_create", "raw_socket");
    row(
        "raw socket (as root with CAP_NET_RAW)",
        "sock_create",
        &recorded,
    );
}

/// A socket family no cgroup hook sees: refused by BPF LSM (and recorded) where it loads,
/// otherwise by the seccomp profile, which this test then applies as the container runtime
/// would. Returns the row's layer and recorded cells.
fn family_row(s: &Stack, uid: Option<u32>, family: &str, sock_type: &str) -> (String, String) {
    let args = ["socket", family, sock_type, "0"];
    // Outside the agent cgroup and without the profile the family is available here: the
    // refusal below is tank's doing, not the kernel's.
    assert_eq!(
        probe(&s.cg.sibling, uid, &args).1,
        "ok",
        "family {family} unavailable on this host: the row would test nothing"
    );
    if s.lsm_in_force() {
        let (pid, outcome) = probe(s.agent(), uid, &args);
        assert_eq!(outcome, "EPERM");
        return (
            "BPF LSM socket_create".into(),
            s.refusal_recorded(pid, "lsm_socket_create", "family_not_allowed"),
        );
    }
    // Without LSM the cgroup hooks never see this family: only the profile stands.
    assert_eq!(
        probe(s.agent(), uid, &args).1,
        "ok",
        "no BPF layer sees this family here; if one does now, update the matrix"
    );
    let opts = ProbeOpts {
        uid,
        seccomp: true,
        ..ProbeOpts::default()
    };
    assert_eq!(probe_with(s.agent(), &opts, &args).1, "EPERM");
    (
        "seccomp profile (LSM cannot load here)".into(),
        "no: seccomp refusals are not logged".into(),
    )
}

#[test]
fn af_packet_socket() {
    let s = Stack::new();
    // As uid 65534 the kernel itself refuses (no CAP_NET_RAW); as root it would not.
    assert_eq!(
        probe(s.agent(), AGENT, &["socket", "17", "3", "0"]).1,
        "EPERM"
    );
    let (layer, recorded) = family_row(&s, None, "17", "3");
    row("AF_PACKET socket (as root)", &layer, &recorded);
}

#[test]
fn af_vsock_socket_created_never_connected() {
    let s = Stack::new();
    // Create only: tank-probe's `socket` closes the socket at once, it never connects.
    let (layer, recorded) = family_row(&s, AGENT, "40", "1");
    row(
        "AF_VSOCK socket (created, never connected)",
        &layer,
        &recorded,
    );
}

#[test]
fn dns_query_to_a_resolver_that_is_not_allowlisted() {
    let s = Stack::new();
    let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(
        s.agent(),
        AGENT,
        &["dns", &resolver.local_addr().unwrap().to_string()],
    );
    assert_eq!(outcome, "EPERM");
    row(
        "DNS query to a resolver not allowlisted",
        "gate (sendmsg4)",
        &s.refusal_recorded(pid, "sendmsg4", "not_listed"),
    );
}

#[test]
fn loopback_service_not_allowlisted() {
    let s = Stack::new();
    // 127.0.0.2 is loopback too, and not the proxy's address.
    let service = TcpListener::bind("127.0.0.2:0").unwrap();
    assert_eq!(
        probe(&s.cg.sibling, AGENT, &["tcp", &addr(&service)]).1,
        "ok"
    );
    let recorded = gate_refuses_tcp(
        &s,
        &ProbeOpts {
            uid: AGENT,
            ..ProbeOpts::default()
        },
        &addr(&service),
        "connect4",
    );
    row(
        "loopback service not allowlisted",
        "gate (connect4); nft behind it",
        &recorded,
    );
}

#[test]
fn ipv6_link_local_target() {
    let s = Stack::new();
    let ns = TestNetns::new();
    let scope = ns.ifindex();
    let target = ns.in_netns(|| {
        TcpListener::bind(SocketAddr::V6(
            format!("[fe80::1%{scope}]:0").parse().unwrap(),
        ))
        .unwrap()
    });
    let dest = format!("[fe80::1%{scope}]:{}", target.local_addr().unwrap().port());
    let opts = ProbeOpts {
        uid: AGENT,
        netns: Some(&ns.path),
        seccomp: false,
    };
    assert_eq!(probe_with(&s.cg.sibling, &opts, &["tcp", &dest]).1, "ok");
    let recorded = gate_refuses_tcp(&s, &opts, &dest, "connect6");
    row("IPv6 link-local target", "gate (connect6)", &recorded);
}

#[test]
fn mptcp_socket() {
    let s = Stack::new();
    assert_eq!(
        probe(&s.cg.sibling, AGENT, &["socket", "2", "1", "262"]).1,
        "ok",
        "MPTCP is enabled on this host"
    );
    let (pid, outcome) = probe(s.agent(), AGENT, &["socket", "2", "1", "262"]);
    assert_eq!(outcome, "EPERM");
    row(
        "MPTCP socket",
        "sock_create (allow_mptcp = false)",
        &s.refusal_recorded(pid, "sock_create", "protocol_not_allowed"),
    );
}

#[test]
fn a_forked_and_execd_child() {
    let s = Stack::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_, out) = probe(s.agent(), AGENT, &["exec-child", "tcp", &addr(&target)]);
    let (child, outcome) = out
        .strip_prefix("child=")
        .and_then(|r| r.split_once(' '))
        .unwrap_or_else(|| panic!("unexpected answer {out}"));
    assert_eq!(outcome, "EPERM");
    let recorded = s.refusal_recorded(child.parse().unwrap(), "connect4", "not_listed");
    row(
        "a forked and exec'd child",
        "gate (inherited cgroup)",
        &recorded,
    );
}

#[test]
fn moving_itself_to_the_parent_cgroup() {
    let s = Stack::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    for escape in [
        &s.cg.root,
        &s.cg.sibling,
        &tank_loader::cgroup::cgroup2_mount().unwrap(),
    ] {
        let (pid, out) = probe(
            s.agent(),
            AGENT,
            &["escape-cgroup", escape.to_str().unwrap(), &addr(&target)],
        );
        assert_eq!(
            out,
            "move=EACCES tcp=EPERM",
            "escape to {}",
            escape.display()
        );
        s.refusal_recorded(pid, "connect4", "not_listed");
    }
    let procs = std::fs::read_to_string(s.cg.root.join("cgroup.procs")).unwrap();
    assert!(
        procs.trim().is_empty(),
        "nothing moved into the parent: {procs}"
    );
    row(
        "moving itself to the parent cgroup",
        "cgroupfs permissions (kernel)",
        "the move: no; the attempt after it: yes",
    );
}

#[test]
fn detaching_the_programs_as_the_agent_user() {
    let s = Stack::new();
    let before = s.loader.status();
    let cgroup = s.agent().to_str().unwrap().to_owned();
    let (_, out) = probe(
        s.agent(),
        AGENT,
        &["detach", s.loader.pin_dir.to_str().unwrap(), &cgroup],
    );
    for result in out.split(';') {
        // EPERM/EACCES: no privilege. EINVAL: BPF_PROG_DETACH of a multi-attached cgroup hook
        // needs a program or link descriptor, which the user cannot obtain.
        let outcome = result.rsplit('=').next().unwrap();
        assert!(
            ["EPERM", "EACCES", "EINVAL"].contains(&outcome),
            "{result} in {out}"
        );
    }
    for needed in [
        "unlink",
        "obj_get",
        "prog_detach",
        "link_next_id",
        "prog_next_id",
    ] {
        assert!(out.contains(needed), "attempt {needed} missing from {out}");
    }
    let after = s.loader.status();
    assert_eq!(after["enforcing"], true, "{after}");
    assert_eq!(
        after["hooks"], before["hooks"],
        "programs and attachments unchanged"
    );
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let (pid, outcome) = probe(s.agent(), AGENT, &["tcp", &addr(&target)]);
    assert_eq!(outcome, "EPERM");
    s.refusal_recorded(pid, "connect4", "not_listed");
    row(
        "detaching the programs (unpin, PROG_DETACH)",
        "bpffs permissions; CAP_SYS_ADMIN for ids",
        "no; gate verified intact after",
    );
}

#[test]
fn flushing_the_nft_table_as_the_agent_user() {
    let s = Stack::new();
    let rules = |loader: &Loader| {
        loader.status()["layers"]["nft"]["table"]["rules"]
            .as_u64()
            .expect("nft rules in status")
    };
    let before = rules(&s.loader);
    assert!(before >= 4, "table {} has {before} rules", s.table);
    let (_, out) = probe(
        s.agent(),
        AGENT,
        &["run", "nft", "flush", "table", "inet", &s.table],
    );
    assert_ne!(out, "ok", "nft flush as the agent user must fail");
    let (_, out) = probe(
        s.agent(),
        AGENT,
        &["run", "nft", "delete", "table", "inet", &s.table],
    );
    assert_ne!(out, "ok", "nft delete as the agent user must fail");
    assert_eq!(rules(&s.loader), before, "table {} unchanged", s.table);
    row(
        "flushing the nft table as the agent user",
        "netlink needs CAP_NET_ADMIN",
        "no; table verified intact after",
    );
}
