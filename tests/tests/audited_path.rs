//! The audited path end to end, on two hosts (root only): an agent host with the kernel gate
//! and nft baseline, a proxy host with egress-proxy, and an "internet" host with an HTTPS
//! origin, each its own network namespace ([`TwoHosts`]). Real clients (curl, git) go through
//! the real proxy; the kernel's and the proxy's logs must then agree exactly, and every way of
//! making them disagree must be flagged by `tank-loader audit cross-check`.

use std::path::Path;
use std::process::Command;

use tank_ebpf_common::chain::{self, ChainWriter};
use tank_ebpf_common::ocsf::validate;
use tank_integration_tests::topology::{
    TwoHosts, AGENT_IP, API_NAME, API_SECRET, FORBIDDEN_NAME, ORIGIN_IP, ORIGIN_NAME, PROXY_IP,
    PROXY_PORT,
};
use tank_integration_tests::{browser, workspace_bin};

/// `tank-loader audit cross-check` of `kernel` against `proxy`.
fn cross_check_command(kernel: &Path, proxy: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("tank-loader"));
    cmd.args(["audit", "cross-check", "--kernel"])
        .arg(kernel)
        .arg("--proxy")
        .arg(proxy);
    cmd
}

/// Runs the cross-check; returns its exit code and its JSON report.
fn cross_check(kernel: &Path, proxy: &Path) -> (i32, serde_json::Value) {
    let out = cross_check_command(kernel, proxy)
        .arg("--json")
        .output()
        .expect("run tank-loader audit cross-check");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cross-check --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The agent's real work: a file with curl, a repository with git, both over HTTPS through
/// the proxy. Returns how many proxied connections that made.
fn agent_fetches(hosts: &TwoHosts) -> usize {
    let (code, body) = hosts.curl_via_proxy(&format!("https://{ORIGIN_NAME}/hello.txt"));
    assert_eq!((code, body.as_str()), (0, "hello from the origin\n"));
    let clone = hosts.dir.path().join("home/tools");
    let (code, out) = hosts.run_agent(
        &mut hosts.proxied_git_clone(&format!("https://{ORIGIN_NAME}/tools.git"), &clone),
    );
    assert_eq!(code, 0, "git clone through the proxy failed: {out}");
    assert!(clone.join("README").exists());
    // curl made one connection; git made at least one (dumb HTTP may use several).
    let proxied = hosts.wait_proxy_records(2);
    assert!(proxied >= 2, "the proxy recorded {proxied} connections");
    proxied
}

/// The log's records minus the one at `skip` (0-based among all lines) and the record that
/// closes it, if any (a whole connection), re-chained so the chain itself verifies, spans
/// re-linked: what an attacker who can rewrite a whole log would produce.
fn rechain_without(from: &Path, to: &Path, skip: usize) {
    let (_, records) = chain::read(from).expect("read the log");
    let (mut writer, _) = ChainWriter::open(to).expect("open the rewritten log");
    let skipped = records[skip].seq;
    let mut renumbered = std::collections::HashMap::new();
    for (i, r) in records.into_iter().enumerate() {
        let mut value = r.value;
        let unmapped = value["unmapped"].as_object_mut().unwrap();
        unmapped.remove("prev");
        let opens = unmapped.remove("opens").is_some();
        let closes = unmapped.remove("closes").and_then(|c| c.as_u64());
        if i == skip || closes == Some(skipped) {
            continue;
        }
        value["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("sequence");
        let seq = match closes {
            Some(opened) => writer.append_closing(&value, renumbered[&opened], 0),
            None if opens => writer.append_opening(&value, 0),
            None => writer.append(&value),
        };
        renumbered.insert(r.seq, seq.unwrap());
    }
    writer.sync().unwrap();
}

/// A copy of the log without line `skip` (0-based), chain left broken.
fn delete_line(from: &Path, to: &Path, skip: usize) {
    let text = std::fs::read_to_string(from).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != skip)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(to, kept.join("\n") + "\n").unwrap();
}

/// Index (0-based line) of the first record in `log` satisfying `pred`.
fn line_of(log: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    let (_, records) = chain::read(log).unwrap();
    records
        .iter()
        .position(|r| pred(&r.value))
        .expect("a matching record")
}

#[test]
fn curl_and_git_through_the_proxy_match_the_kernel_records_one_to_one() {
    let mut hosts = TwoHosts::start();
    let proxied = agent_fetches(&hosts);
    // Denials are reported too, grouped by destination and process.
    let (code, out) = hosts.run_agent(hosts.agent_command("curl").args([
        "-sS",
        "--max-time",
        "5",
        "-k",
        &format!("https://{ORIGIN_IP}/hello.txt"),
    ]));
    assert_ne!(
        code, 0,
        "a direct connection to the origin got through: {out}"
    );
    hosts.wait_established(proxied);
    // The drain finds a lone event at its tick, not at once: wait for the refusal's record.
    let origin: std::net::IpAddr = ORIGIN_IP.parse().unwrap();
    hosts
        .loader
        .wait_record(|r| r.dst_endpoint.addr().is_some_and(|a| a.ip() == origin));
    hosts.stop_proxy();

    let (code, report) = cross_check(&hosts.loader.audit_log, &hosts.proxy_log);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["verdict"], "consistent", "{report:#}");
    assert_eq!(report["summary"]["matched"], proxied as u64, "{report:#}");
    let denied = report["hosts"][0]["denied"]
        .as_array()
        .expect("denied groups");
    assert!(
        denied.iter().any(|g| g["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with(ORIGIN_IP))
            && g["process"] == "curl"),
        "{report:#}"
    );

    // The human report says the same, and names both logs.
    let out = hosts.cross_check().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict: CONSISTENT"), "{text}");
    assert!(text.contains(&format!("{proxied} of {proxied}")), "{text}");

    // What both real programs wrote in a real run is valid OCSF, record by record.
    for log in [&hosts.loader.audit_log, &hosts.proxy_log] {
        let (_, records) = chain::read(log).unwrap();
        let values: Vec<_> = records.iter().map(|r| &r.value).collect();
        if let Err(violations) = validate::check(values) {
            panic!(
                "{}: records that are not valid OCSF:\n{violations}",
                log.display()
            );
        }
    }
}

#[test]
fn traffic_injected_at_the_proxy_from_outside_the_agent_cgroup_is_flagged() {
    let mut hosts = TwoHosts::start();
    let proxied = agent_fetches(&hosts);
    // Same host, same address, but not the agent's cgroup: the kernel gate never saw it.
    let out = hosts
        .agent
        .command("curl")
        .args(["-sS", "--max-time", "10", "--proxy", &hosts.proxy_url()])
        .arg("--cacert")
        .arg(&hosts.ca_pem)
        .arg(format!("https://{ORIGIN_NAME}/hello.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And a refused request from outside: recorded by the proxy, unknown to the kernel.
    let out = hosts
        .agent
        .command("curl")
        .args(["-sS", "--max-time", "10", "--proxy", &hosts.proxy_url()])
        .arg(format!("https://{FORBIDDEN_NAME}/"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    hosts.wait_proxy_records(proxied + 2);
    hosts.wait_established(proxied);
    hosts.stop_proxy();

    let (code, report) = cross_check(&hosts.loader.audit_log, &hosts.proxy_log);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["verdict"], "discrepancies");
    assert_eq!(report["summary"]["matched"], proxied as u64, "{report:#}");
    let unmatched = report["hosts"][0]["proxy_unmatched"]["listed"]
        .as_array()
        .unwrap();
    assert_eq!(unmatched.len(), 2, "{report:#}");
    assert!(unmatched.iter().all(|u| u["client"]
        .as_str()
        .is_some_and(|c| c.starts_with(&format!("{AGENT_IP}:")))));
    assert!(unmatched
        .iter()
        .any(|u| u["destination"] == format!("{FORBIDDEN_NAME}:443")));
    assert_eq!(
        report["hosts"][0]["kernel_unmatched"]["listed"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn a_deleted_proxy_record_is_flagged_even_when_the_proxy_log_is_rechained() {
    let mut hosts = TwoHosts::start();
    let proxied = agent_fetches(&hosts);
    hosts.wait_established(proxied);
    hosts.stop_proxy();
    let dir = tempfile::tempdir().unwrap();

    // A line cut out: the chain breaks, and the kernel's connection has no partner.
    let cut = dir.path().join("cut.jsonl");
    delete_line(&hosts.proxy_log, &cut, 0);
    let (code, report) = cross_check(&hosts.loader.audit_log, &cut);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report["verdict"], "tampered");
    assert_eq!(
        report["hosts"][0]["kernel_unmatched"]["listed"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{report:#}"
    );

    // Rewritten with a valid chain: only the kernel's record can tell.
    let rewritten = dir.path().join("rewritten.jsonl");
    rechain_without(&hosts.proxy_log, &rewritten, 0);
    let (code, report) = cross_check(&hosts.loader.audit_log, &rewritten);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["verdict"], "discrepancies");
    let missing = report["hosts"][0]["kernel_unmatched"]["listed"]
        .as_array()
        .unwrap();
    assert_eq!(missing.len(), 1, "{report:#}");
    assert_eq!(
        missing[0]["dst"],
        format!("{PROXY_IP}:{PROXY_PORT}"),
        "{report:#}"
    );
    assert_eq!(report["summary"]["matched"], proxied as u64 - 1);
}

#[test]
fn a_deleted_kernel_record_is_flagged_even_when_the_kernel_log_is_rechained() {
    let mut hosts = TwoHosts::start();
    let proxied = agent_fetches(&hosts);
    hosts.wait_established(proxied);
    hosts.stop_proxy();
    hosts.loader.stop();
    let dir = tempfile::tempdir().unwrap();
    let established = line_of(&hosts.loader.audit_log, |v| {
        v["unmapped"]["hook"] == "established"
    });

    let cut = dir.path().join("cut.jsonl");
    delete_line(&hosts.loader.audit_log, &cut, established);
    let (code, report) = cross_check(&cut, &hosts.proxy_log);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(
        report["hosts"][0]["proxy_unmatched"]["listed"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{report:#}"
    );

    let rewritten = dir.path().join("rewritten.jsonl");
    rechain_without(&hosts.loader.audit_log, &rewritten, established);
    let (code, report) = cross_check(&rewritten, &hosts.proxy_log);
    assert_eq!(code, 1, "{report:#}");
    let unmatched = report["hosts"][0]["proxy_unmatched"]["listed"]
        .as_array()
        .unwrap();
    assert_eq!(unmatched.len(), 1, "{report:#}");
    assert_eq!(report["summary"]["matched"], proxied as u64 - 1);

    // Deleting the attempt instead leaves an established connection with no attempt.
    let attempt = line_of(&hosts.loader.audit_log, |v| {
        v["unmapped"]["hook"] == "connect4" && v["unmapped"]["reason"] == "proxy"
    });
    let rewritten = dir.path().join("no-attempt.jsonl");
    rechain_without(&hosts.loader.audit_log, &rewritten, attempt);
    let (code, report) = cross_check(&rewritten, &hosts.proxy_log);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        report["hosts"][0]["established_without_attempt"]["listed"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{report:#}"
    );
}

#[test]
fn the_agent_host_cannot_go_around_the_proxy_although_the_network_would_let_it() {
    let hosts = TwoHosts::start();
    // Control: outside the agent cgroup the route to the origin works.
    let out = hosts
        .agent
        .command("curl")
        .args(["-sSk", "--max-time", "5"])
        .arg(format!("https://{ORIGIN_IP}/hello.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the topology does not route: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent: direct HTTPS, another port on the proxy host, and DNS are all refused.
    for args in [
        vec![
            "-sSk".to_owned(),
            "--max-time".into(),
            "5".into(),
            format!("https://{ORIGIN_IP}/hello.txt"),
        ],
        vec![
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            format!("http://{PROXY_IP}:22/"),
        ],
    ] {
        let (code, out) = hosts.run_agent(hosts.agent_command("curl").args(&args));
        assert_eq!(code, 7, "curl {args:?} should fail to connect: {out}");
    }
    // DNS (and any UDP) straight to a resolver on the internet host.
    let (code, out) = hosts.run_agent(hosts.agent_command("python3").args([
        "-c",
        &format!("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'exfil', ('{ORIGIN_IP}', 53))"),
    ]));
    assert!(code != 0 && out.contains("PermissionError"), "{out}");
    // The proxy refuses what its policy does not allow.
    let (code, out) = hosts.curl_via_proxy(&format!("https://{FORBIDDEN_NAME}/"));
    assert_ne!(code, 0);
    assert!(out.contains("403"), "{out}");
}

/// Writes the cross-check's HTML report of `kernel` against `proxy` to `html`; returns the
/// exit code.
fn html_report(kernel: &Path, proxy: &Path, html: &Path) -> i32 {
    let out = cross_check_command(kernel, proxy)
        .arg("--html")
        .arg(html)
        .output()
        .expect("run tank-loader audit cross-check --html");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code().unwrap_or(-1)
}

#[test]
fn the_html_report_of_a_real_run_and_of_a_tampered_one_show_their_verdict_in_a_browser() {
    let mut hosts = TwoHosts::start();
    let proxied = agent_fetches(&hosts);
    // Refusals for the pictures: a direct connection (kernel) and a forbidden name (proxy).
    let direct = format!("https://{ORIGIN_IP}/hello.txt");
    let (code, _) =
        hosts.run_agent(
            hosts
                .agent_command("curl")
                .args(["-sSk", "--max-time", "5", &direct]),
        );
    assert_ne!(code, 0);
    let (code, _) = hosts.curl_via_proxy(&format!("https://{FORBIDDEN_NAME}/"));
    assert_ne!(code, 0);
    hosts.wait_proxy_records(proxied + 1);
    hosts.wait_established(proxied + 1);
    hosts.stop_proxy();

    // Screenshots stay in target/tmp for a look (the README's picture is one of them).
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jsonl");
    delete_line(&hosts.proxy_log, &cut, 0);
    // The forbidden request came from the agent's cgroup too: both logs have it. The cut
    // removes the proxy's first record, so one kernel connection loses its partner.
    let total = proxied + 1;
    let consistent_summary = format!("{total} of {total} proxy records matched");
    let tampered_summary = format!("{} of {} proxy records matched", total - 1, total - 1);
    for (name, proxy_log, code, verdict, findings) in [
        (
            "consistent",
            hosts.proxy_log.as_path(),
            0,
            "Verdict: CONSISTENT",
            [consistent_summary.as_str(), "No findings"],
        ),
        (
            "tampered",
            cut.as_path(),
            3,
            "Verdict: TAMPERED",
            [tampered_summary.as_str(), "Proxy log: chain problems"],
        ),
    ] {
        let page = dir.path().join(format!("{name}.html"));
        assert_eq!(html_report(&hosts.loader.audit_log, proxy_log, &page), code);
        let source = std::fs::read_to_string(&page).unwrap();
        assert!(
            !source.contains("<script") && !source.contains("src="),
            "self-contained"
        );

        let text = browser::rendered_text(&page);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{name}: `{needle}` not rendered:\n{text}"))
        };
        // Verdict first, then findings, then the pictures and the chains.
        let order = [
            verdict,
            findings[0],
            "Findings",
            findings[1],
            "Activity over time",
            "Refusals by the kernel",
            "Proxy records by rule",
            "Chains",
        ]
        .map(at);
        assert!(order.is_sorted(), "{name}: sections out of order:\n{text}");
        if code == 3 {
            at("Kernel connections to the proxy with no proxy record");
        }
        at("kernel log, host");
        at(ORIGIN_IP);
        at("curl");
        at("default-deny");
        browser::screenshot(
            &page,
            &shots.join(format!("cross-check-{name}.png")),
            900,
            1500,
        );
    }
}

/// An inspected tunnel on the audited path: the agent (holding no token) calls the forge API
/// for the allowed repository and another one over one tunnel; the forge receives the token
/// the proxy set, only for the allowed request; the tunnel's record matches the kernel's, and
/// the cross-check counts its two request records.
#[test]
fn an_inspected_tunnel_matches_the_kernel_record_and_its_requests_are_counted() {
    let mut hosts = TwoHosts::start();
    let mut curl = hosts.proxied_curl(&format!("https://{API_NAME}/repos/owner/repo/issues"));
    curl.arg(format!("https://{API_NAME}/repos/owner/other/issues"))
        .args(["-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code}\n"]);
    let (code, out) = hosts.run_agent(&mut curl);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["200", "403"],
        "{out}"
    );
    let received = std::fs::read_to_string(&hosts.origin_received).unwrap_or_default();
    assert_eq!(
        received,
        format!("/repos/owner/repo/issues Authorization: Bearer {API_SECRET}\n"),
        "what the forge received"
    );
    hosts.wait_proxy_records(1);
    hosts.wait_established(1);
    hosts.stop_proxy();
    let (code, report) = cross_check(&hosts.loader.audit_log, &hosts.proxy_log);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["verdict"], "consistent", "{report:#}");
    assert_eq!(report["summary"]["matched"], 1, "{report:#}");
    assert_eq!(
        report["proxies"][0]["inspected"]["tunnels"], 1,
        "{report:#}"
    );
    assert_eq!(
        report["proxies"][0]["inspected"]["requests"], 2,
        "{report:#}"
    );
}
