//! The loader's Prometheus metrics, scraped by a real Prometheus server (root only): the
//! series move when the agent is refused, by the gate (enforce mode) and by the nftables
//! baseline (gate in audit mode), and the layers read as in force.

use std::net::{SocketAddr, TcpListener};

use tank_integration_tests::prometheus::{free_port, http_get, Prometheus};
use tank_integration_tests::{nft_section, probe, Loader, TestCgroups};

/// The agent (uid 65534 in the agent cgroup) connects to `to`; returns the probe's outcome.
fn agent_connects(cg: &TestCgroups, to: SocketAddr) -> String {
    probe(&cg.agent, Some(65534), &["tcp", &to.to_string()]).1
}

#[test]
fn prometheus_sees_refusals_by_the_gate_and_by_nft_move_the_loader_series() {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (nft, _) = nft_section("");
    let config = |mode: &str| {
        format!(
            "mode = \"{mode}\"\nmetrics_listen = \"{metrics}\"\nproxies = [\"{}\"]\n{nft}",
            proxy.local_addr().unwrap()
        )
    };
    let mut loader = Loader::start(&cg, &config("enforce"));
    let prom = Prometheus::start(&[metrics]);

    // Scraped, with the layers the loader put in place.
    prom.wait_for("up{job=\"tank\"}", |v| v == 1.0);
    for layer in ["gate", "sock_create", "nft"] {
        prom.wait_for(&format!("tank_layer_in_force{{layer=\"{layer}\"}}"), |v| {
            v == 1.0
        });
    }
    let start = prom.wait_for("tank_loader_start_time_seconds", |v| v > 1e9);
    let denied = "sum(tank_attempts_total{verdict=\"deny\",reason=\"not_listed\"}) or vector(0)";
    let before = prom.wait_for(denied, |_| true);
    let head = prom.wait_for("tank_audit_chain_head_sequence", |v| v >= 1.0);
    let written = "tank_ring_buffer_written_bytes_total";
    let ring_before = prom.wait_for(written, |_| true);

    // Refused by the gate: the attempt counter and the chain head move.
    assert_eq!(agent_connects(&cg, other.local_addr().unwrap()), "EPERM");
    prom.wait_for(denied, |v| v >= before + 1.0);
    prom.wait_for("tank_audit_chain_head_sequence", |v| v > head);
    // The positions are read from the ring buffer itself: one event and its header at least.
    let event = std::mem::size_of::<tank_ebpf_common::event::Event>() as f64 + 8.0;
    prom.wait_for(written, |v| v >= ring_before + event);
    prom.wait_for("tank_audit_records_written_total", |v| v >= 1.0);
    assert_eq!(agent_connects(&cg, proxy.local_addr().unwrap()), "ok");
    prom.wait_for(
        "tank_attempts_total{hook=\"connect4\",verdict=\"allow\",reason=\"proxy\"}",
        |v| v >= 1.0,
    );
    prom.wait_for(
        "tank_established_connections_total{reason=\"proxy\"}",
        |v| v >= 1.0,
    );
    prom.wait_for("tank_ring_buffer_size_bytes", |v| v >= 4096.0);
    prom.wait_for("tank_unrecorded_total{kind=\"denied\"}", |v| v == 0.0);

    // The agent cannot read the metrics: loopback is not on its allowlist.
    assert_eq!(agent_connects(&cg, metrics), "EPERM");

    // Gate in audit mode: it lets the attempt through, nft refuses its packets.
    loader.stop();
    std::fs::write(
        &loader.config,
        std::fs::read_to_string(&loader.config)
            .unwrap()
            .replace("mode = \"enforce\"", "mode = \"audit\""),
    )
    .unwrap();
    loader.restart();
    prom.wait_for("tank_loader_start_time_seconds", |v| v > start);
    let refused = "tank_nft_refused_packets_total";
    let before = prom.wait_for(refused, |_| true);
    assert_eq!(
        agent_connects(&cg, other.local_addr().unwrap()),
        "EHOSTUNREACH"
    );
    prom.wait_for(refused, |v| v > before);
    prom.wait_for(
        "tank_attempts_total{verdict=\"allow\",reason=\"audit_not_listed\"}",
        |v| v >= 1.0,
    );

    // The loader holds no capability; its layer helper holds CAP_NET_ADMIN (bit 12) alone.
    let caps = |pid: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap();
        u64::from_str_radix(eff.trim(), 16).unwrap()
    };
    let loader_pid = loader.pid().to_string();
    assert_eq!(caps(&loader_pid), 0, "the loader kept capabilities");
    let children =
        std::fs::read_to_string(format!("/proc/{loader_pid}/task/{loader_pid}/children")).unwrap();
    let helper = children
        .split_whitespace()
        .next()
        .expect("the layer helper runs");
    assert_eq!(
        caps(helper),
        1 << 12,
        "the helper holds more than CAP_NET_ADMIN"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{helper}/cmdline")).unwrap();
    assert!(cmdline.contains("watch-layers"), "{cmdline}");

    // The endpoint serves /metrics only.
    assert_eq!(http_get(metrics, "/").unwrap().0, 404);
}

#[test]
fn a_metrics_address_in_use_leaves_enforcement_and_the_log_running() {
    let cg = TestCgroups::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let loader = Loader::start(
        &cg,
        &format!("metrics_listen = \"{}\"\n", taken.local_addr().unwrap()),
    );
    assert!(
        loader.logs().contains("metrics NOT served"),
        "{}",
        loader.logs()
    );
    assert_eq!(agent_connects(&cg, other.local_addr().unwrap()), "EPERM");
    assert_eq!(loader.records(1).len(), 1, "still recording");
}
