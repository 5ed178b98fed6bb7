//! `tank-demo` (run by `cargo xtask demo`, root): tank on a throwaway agent cgroup with a
//! built-in default policy. A stand-in proxy listens on loopback; an "agent" makes one allowed
//! and several forbidden attempts; `trace` and `status` show what the kernel did; everything
//! is torn down at the end, also on failure.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

use tank_integration_tests::{probe, workspace_bin, Loader, TestCgroups};

fn main() {
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy stand-in");
    let other = TcpListener::bind("127.0.0.1:0").expect("forbidden service");
    let other6 = TcpListener::bind("[::1]:0").expect("forbidden IPv6 service");
    let dns = UdpSocket::bind("127.0.0.1:0").expect("forbidden resolver");
    let cgroups = TestCgroups::new();
    let loader = Loader::start(
        &cgroups,
        &format!("proxies = [\"{}\"]", proxy.local_addr().unwrap()),
    );
    println!(
        "== tank-loader is enforcing on {} (config {})\n",
        cgroups.agent.display(),
        loader.config.display()
    );

    let attempts = [
        (
            "fetch through the proxy",
            vec!["tcp".to_owned(), proxy.local_addr().unwrap().to_string()],
        ),
        (
            "direct connect to another service",
            vec!["tcp".to_owned(), other.local_addr().unwrap().to_string()],
        ),
        (
            "IPv6 direct connect",
            vec!["tcp".to_owned(), other6.local_addr().unwrap().to_string()],
        ),
        (
            "IPv4-mapped IPv6 trick",
            vec![
                "tcp".to_owned(),
                format!("[::ffff:127.0.0.1]:{}", other.local_addr().unwrap().port()),
            ],
        ),
        (
            "DNS exfiltration over UDP",
            vec![
                "udp-sendto".to_owned(),
                dns.local_addr().unwrap().to_string(),
            ],
        ),
    ];
    println!("== the agent (uid 65534, inside the cgroup) tries:");
    for (what, args) in &attempts {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, outcome) = probe(&cgroups.agent, Some(65534), &args);
        println!("   {what:<36} -> {outcome}");
    }
    loader.records(attempts.len());

    println!("\n== tank-loader trace --history --no-follow");
    show(&loader, &["trace", "--history", "--no-follow"]);
    println!("\n== tank-loader status");
    show(&loader, &["status"]);
    println!("\n== tank-loader audit verify");
    let out = Command::new(workspace_bin("tank-loader"))
        .args(["audit", "verify"])
        .arg(&loader.audit_log)
        .output()
        .expect("verify");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\n== tearing down (loader stopped, gate detached, cgroup removed)");
}

fn show(loader: &Loader, args: &[&str]) {
    let out = loader.cli(args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
