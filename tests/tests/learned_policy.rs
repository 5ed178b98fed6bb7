//! A policy learnt in audit mode, then enforced (root: real kernel, nft, namespaces, the
//! three-host topology of the demo).
//!
//! A site rolls tank out by watching first: the loader runs in audit mode with its nft layer
//! off, the agent does its work (a fetch through the proxy, and a query to a site service it
//! reaches directly), and an exfiltration attempt past the proxy that audit mode lets through.
//! `tank-loader policy suggest` over the learning window writes the loader's config;
//! `egress-proxy policy suggest` the proxy's. Enforcing the loader's suggestion, the same work
//! passes and the attempt that audit mode only recorded is refused. Judged by what arrives on
//! the internet host (a packet capture there), not by what the agent's calls returned.

use std::process::Command;
use std::time::Duration;

use tank_ebpf_common::event::{hook, reason};
use tank_integration_tests::topology::{TwoHosts, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PORT};
use tank_integration_tests::{network_records, nft_section, unique, workspace_bin, Capture};

/// The site service the agent's work reaches directly (a resolver, an internal cache).
const SERVICE_PORT: u16 = 5353;
/// Where the exfiltration attempt goes: the same host, a port nothing listed.
const EXFIL_PORT: u16 = 9999;

/// One UDP datagram from the agent to `ORIGIN_IP:port`; whether the send call succeeded.
fn agent_udp(hosts: &TwoHosts, port: u16, payload: &str) -> bool {
    let script = format!(
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'{payload}', ('{ORIGIN_IP}', {port}))"
    );
    let (code, _) = hosts.run_agent(hosts.agent_command("python3").args(["-c", &script]));
    code == 0
}

/// The agent's work: a fetch through the proxy and a query to the site service. Returns
/// whether the fetch succeeded and the hosts the query's datagram reached.
fn work(hosts: &TwoHosts, marker: &str) -> (bool, Vec<std::net::IpAddr>) {
    let capture = Capture::start(&hosts.internet.path, "eth0", marker);
    let (code, out) = hosts.curl_via_proxy(&format!("https://{ORIGIN_NAME}/hello.txt"));
    assert!(agent_udp(hosts, SERVICE_PORT, marker), "the site query");
    let fetched = code == 0 && out.contains("hello");
    (fetched, capture.finish())
}

/// The exfiltration attempt; the hosts its datagram reached.
fn exfiltrate(hosts: &TwoHosts, marker: &str) -> Vec<std::net::IpAddr> {
    let capture = Capture::start(&hosts.internet.path, "eth0", marker);
    agent_udp(hosts, EXFIL_PORT, marker);
    capture.finish()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a tank command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_policy_learnt_in_audit_mode_lets_the_work_through_and_refuses_what_audit_only_recorded() {
    let mut hosts = TwoHosts::start_in_audit_mode();
    let origin: std::net::IpAddr = ORIGIN_IP.parse().unwrap();

    // Learning: the work, then (after the window the operator learns from) the attempt,
    // which audit mode lets through and records.
    let (fetched, reached) = work(&hosts, &unique("work-audit"));
    assert!(fetched, "the proxied fetch failed in audit mode");
    assert_eq!(reached, [origin], "the site query in audit mode");
    std::thread::sleep(Duration::from_millis(50));
    let learnt_until = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    let secret = unique("exfil-audit");
    assert_eq!(
        exfiltrate(&hosts, &secret),
        [origin],
        "audit mode refuses nothing"
    );
    let attempt = hosts.loader.wait_record(|r| {
        r.dst_endpoint.port == Some(EXFIL_PORT) && r.unmapped.reason.0 == reason::AUDIT_NOT_LISTED
    });
    assert!(attempt.allowed(), "{attempt:?}");
    hosts.wait_proxy_records(1);

    // The suggestions, from the learning window.
    let suggested = run(Command::new(workspace_bin("tank-loader"))
        .args(["policy", "suggest", "--cgroup"])
        .arg(&hosts.cgroups.agent_path)
        .args(["--until", &learnt_until.to_string()])
        .arg(&hosts.loader.audit_log));
    assert!(
        suggested.contains(&format!("endpoint = \"{ORIGIN_IP}:{SERVICE_PORT}\"")),
        "{suggested}"
    );
    assert!(
        !suggested.contains(&format!(":{EXFIL_PORT}\"")),
        "the attempt after the window was suggested: {suggested}"
    );
    assert!(
        suggested.contains(&format!("proxies = [\"{PROXY_IP}:{PROXY_PORT}\"]")),
        "{suggested}"
    );
    // A log that does not verify teaches nothing: one line, exit 2 (both binaries).
    let edited = hosts.dir.path().join("kernel-edited.jsonl");
    let text = std::fs::read_to_string(&hosts.loader.audit_log).unwrap();
    std::fs::write(&edited, text.replacen("\"pid\":", "\"pid\": ", 1)).unwrap();
    let out = Command::new(workspace_bin("tank-loader"))
        .args(["policy", "suggest"])
        .arg(&edited)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let proxy_suggested = run(Command::new(workspace_bin("egress-proxy"))
        .args(["policy", "suggest"])
        .arg(&hosts.proxy_log));
    assert!(
        proxy_suggested.contains(&format!("domain = \"{ORIGIN_NAME}\"")),
        "{proxy_suggested}"
    );
    let proxy_config = hosts.dir.path().join("proxy-suggested.toml");
    std::fs::write(&proxy_config, &proxy_suggested).unwrap();
    run(Command::new(workspace_bin("egress-proxy"))
        .arg("check")
        .arg(&proxy_config));

    // Enforcing the loader's suggestion (with the test's own pins, log and nft table, and
    // nft on again: enforcement is both layers).
    hosts.loader.stop();
    let (nft, table) = nft_section("");
    let config = format!(
        "pin_dir = \"{}\"\naudit_log = \"{}\"\n{suggested}\n{nft}",
        hosts.loader.pin_dir.display(),
        hosts.loader.audit_log.display()
    );
    std::fs::write(&hosts.loader.config, config).unwrap();
    hosts.loader.nft_table = Some(table);
    run(Command::new(workspace_bin("tank-loader"))
        .arg("check")
        .arg(&hosts.loader.config));
    hosts.loader.restart();

    let (fetched, reached) = work(&hosts, &unique("work-enforce"));
    assert!(fetched, "the proxied fetch failed under the learnt policy");
    assert_eq!(reached, [origin], "the site query under the learnt policy");
    let secret = unique("exfil-enforce");
    let reached = exfiltrate(&hosts, &secret);
    assert!(
        reached.is_empty(),
        "the attempt audit mode only recorded reached {reached:?}"
    );
    let refused = hosts
        .loader
        .wait_record(|r| r.dst_endpoint.port == Some(EXFIL_PORT) && !r.allowed());
    assert_eq!(refused.unmapped.hook.0, hook::SENDMSG4, "{refused:?}");
    // One chain across both runs, and it verifies (network_records panics otherwise).
    let records = network_records(&hosts.loader.audit_log);
    let service = records
        .iter()
        .filter(|r| r.dst_endpoint.port == Some(SERVICE_PORT))
        .map(|r| r.unmapped.reason.0)
        .collect::<Vec<_>>();
    assert_eq!(
        service,
        [reason::AUDIT_NOT_LISTED, reason::LISTED_ENDPOINT],
        "the site query: learnt, then listed"
    );
}
