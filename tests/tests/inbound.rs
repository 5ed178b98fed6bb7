//! Connections opened *into* the agent (issue 10, item 2).
//!
//! The agent runs on the host network and may listen on a host port; whoever connects in
//! receives whatever it writes, and no outbound hook sees that. Each test puts the agent in a
//! namespace of its own wired to a "remote" one, has it listen and write a marker to every
//! connection it accepts, and judges by what the remote end *receives*. A connection from the
//! host itself (over loopback) must still work, and be recorded as accepted. Each layer is
//! tried alone: the BPF programs with nft off, and nft with the gate in audit mode.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use tank_integration_tests::topology::{wire, Netns};
use tank_integration_tests::{
    in_netns, nft_section, probe_command, unique, Loader, ProbeOpts, TestCgroups,
};

const AGENT: Option<u32> = Some(65534);

/// An endpoint's address as text ("" when it has none).
fn ip(e: &tank_ebpf_common::ocsf::Endpoint) -> String {
    e.ip.map(|a| a.to_string()).unwrap_or_default()
}
const AGENT_ADDR: &str = "10.202.0.2";
const REMOTE_ADDR: &str = "10.202.0.1";

struct Inbound {
    loader: Loader,
    cg: TestCgroups,
    agent_ns: Netns,
    remote_ns: Netns,
}

impl Inbound {
    /// `nft`: whether the nftables layer is on (in the agent's namespace); `mode`: the gate's.
    fn new(mode: &str, nft: bool) -> Self {
        let agent_ns = Netns::new();
        let remote_ns = Netns::new();
        wire(&agent_ns, "a0", &remote_ns, "b0");
        agent_ns.ip(&["addr", "add", "10.202.0.2/24", "dev", "a0"]);
        remote_ns.ip(&["addr", "add", "10.202.0.1/24", "dev", "b0"]);
        let cg = TestCgroups::new();
        let section = if nft {
            nft_section("").0
        } else {
            String::new()
        };
        let mut loader = Loader::configure(
            &cg,
            &format!("mode = \"{mode}\"\nproxies = [\"{REMOTE_ADDR}:3128\"]\n{section}"),
        );
        loader.set_netns(&agent_ns.path);
        loader.restart();
        Self {
            loader,
            cg,
            agent_ns,
            remote_ns,
        }
    }

    /// Starts `tank-probe serve` in `cgroup` (in the agent's namespace, as the agent user) on
    /// `port`; returns once it listens.
    fn serve(
        &self,
        cgroup: &Path,
        port: u16,
        mark: &str,
    ) -> (Child, BufReader<std::process::ChildStdout>) {
        let opts = ProbeOpts {
            uid: AGENT,
            netns: Some(&self.agent_ns.path),
            seccomp: false,
        };
        let mut child = probe_command(cgroup, &opts)
            .args(["serve", &format!("0.0.0.0:{port}"), mark, "4"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tank-probe serve");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        (child, out)
    }

    /// Connects to the agent's port from the network namespace at `ns`, to `addr`; returns
    /// what it received.
    fn receive(ns: &Path, addr: &str, port: u16) -> Vec<u8> {
        in_netns(ns, || {
            let target: SocketAddr = format!("{addr}:{port}").parse().unwrap();
            let Ok(mut conn) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
                return Vec::new();
            };
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            got
        })
    }

    /// The row: from the unguarded sibling a remote client gets the marker (the channel is
    /// real); from the agent cgroup it gets nothing, while the host itself still does. Returns
    /// the port and how many connections the agent accepted.
    fn remote_refused_host_accepted(&self) -> (u16, String) {
        let port = 20000 + (std::process::id() % 20000) as u16;
        let mark = format!("M:{}", unique("inbound"));
        let (mut sibling, _) = self.serve(&self.cg.sibling, port, &mark);
        let got = Self::receive(&self.remote_ns.path, AGENT_ADDR, port);
        let _ = sibling.kill();
        let _ = sibling.wait();
        assert_eq!(
            got,
            mark.as_bytes(),
            "a remote client of the unguarded sibling got the marker"
        );

        let port = port + 1;
        let (mut agent, mut out) = self.serve(&self.cg.agent, port, &mark);
        let remote = Self::receive(&self.remote_ns.path, AGENT_ADDR, port);
        let host = Self::receive(&self.agent_ns.path, "127.0.0.1", port);
        let own_addr = Self::receive(&self.agent_ns.path, AGENT_ADDR, port);
        let mut accepted = String::new();
        out.read_line(&mut accepted).unwrap();
        let _ = agent.wait();
        assert!(
            remote.is_empty(),
            "a remote client received {:?} from the agent",
            String::from_utf8_lossy(&remote)
        );
        assert_eq!(
            host,
            mark.as_bytes(),
            "the host itself connects in over 127.0.0.1"
        );
        assert_eq!(
            own_addr,
            mark.as_bytes(),
            "and over the agent host's own address"
        );
        (port, accepted.trim().to_owned())
    }
}

#[test]
fn the_bpf_layer_alone_drops_and_records_connections_from_other_hosts() {
    let t = Inbound::new("enforce", false);
    let (port, accepted) = t.remote_refused_host_accepted();
    assert_eq!(
        accepted, "accepted=2",
        "only the host's two connections were accepted"
    );
    let attempt = t.loader.wait_record(|r| {
        r.unmapped.hook.as_str() == "inbound" && r.src_endpoint.port == Some(port)
    });
    assert_eq!(
        (
            attempt.action.as_str(),
            attempt.unmapped.reason.as_str(),
            ip(&attempt.dst_endpoint)
        ),
        ("Denied", "not_from_host", REMOTE_ADDR.to_owned()),
        "{attempt:?}"
    );
    assert_eq!(attempt.connection_info.direction_id, 1, "inbound");
    assert_eq!(
        attempt.actor.process.user.uid, "65534",
        "the listening socket's owner"
    );
    for from in ["127.0.0.1", AGENT_ADDR] {
        let r = t.loader.wait_record(|r| {
            r.unmapped.hook.as_str() == "accepted"
                && r.dst_endpoint.ip == from.parse().ok()
                && r.src_endpoint.port == Some(port)
        });
        assert_eq!(
            (r.action.as_str(), r.unmapped.reason.as_str()),
            ("Allowed", "inbound_accepted")
        );
        assert_eq!(r.connection_info.direction_id, 1);
    }
}

#[test]
fn nft_alone_keeps_the_agents_data_from_other_hosts() {
    // The gate in audit mode refuses nothing (it records what it would refuse); nft must hold.
    let t = Inbound::new("audit", true);
    // nft judges the agent's packets, not the remote's: the remote's handshake completes (the
    // SYN-ACK comes from a request socket no cgroup match sees), but nothing the agent writes
    // reaches it, which the row checks above.
    let (port, _) = t.remote_refused_host_accepted();
    let attempt = t.loader.wait_record(|r| {
        r.unmapped.hook.as_str() == "inbound" && r.src_endpoint.port == Some(port)
    });
    assert_eq!(
        (attempt.action.as_str(), attempt.unmapped.mode.as_str()),
        ("Allowed", "audit")
    );
    let refused = t.loader.status()["layers"]["nft"]["table"]["refused_packets"]
        .as_u64()
        .expect("nft refused counter in status");
    assert!(refused >= 1, "nft counted the refused replies");
}

#[test]
fn both_layers_refuse_and_record_connections_from_other_hosts() {
    let t = Inbound::new("enforce", true);
    let (port, accepted) = t.remote_refused_host_accepted();
    assert_eq!(accepted, "accepted=2");
    let attempt = t.loader.wait_record(|r| {
        r.unmapped.hook.as_str() == "inbound" && r.src_endpoint.port == Some(port)
    });
    assert_eq!(
        (attempt.action.as_str(), ip(&attempt.dst_endpoint)),
        ("Denied", REMOTE_ADDR.to_owned())
    );
}
