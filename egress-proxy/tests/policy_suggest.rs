//! `egress-proxy policy suggest` on a real log: the real proxy serves an agent's work (plain
//! HTTP with methods and paths, tunnels, many sibling mirror names) and its refusals (a denied
//! name, an unlisted one); the suggestion from its log passes `egress-proxy check`, holds the
//! names, ports, methods, paths, a wildcard for the siblings and budgets, never a refused name;
//! and a proxy enforcing it lets the same work through and still refuses the rest.

mod common;
use common::*;

use std::io::{Read, Write};
use std::process::Command;

const MIRRORS: [&str; 5] = ["a", "b", "c", "d", "e"];

fn hosts() -> String {
    let mut h = String::from("[hosts]\n\"web.test\" = \"127.0.0.1\"\n\"api.test\" = \"127.0.0.1\"\n\"evil.test\" = \"127.0.0.1\"\n\"other.test\" = \"127.0.0.1\"\n");
    for m in MIRRORS {
        h.push_str(&format!("\"{m}.mirror.test\" = \"127.0.0.1\"\n"));
    }
    h
}

/// The agent's work; panics if any of it is refused.
fn work(proxy: &Proxy, web: u16, echo: u16) {
    for path in ["/pub/a.txt", "/pub/b.txt"] {
        let r = raw_request(
            proxy.addr,
            format!("GET http://web.test:{web}{path} HTTP/1.1\r\nHost: web.test\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "GET {path}: {r}");
    }
    let r = raw_request(
        proxy.addr,
        format!("POST http://web.test:{web}/upload/x HTTP/1.1\r\nHost: web.test\r\nContent-Length: 100\r\n\r\n{}", "p".repeat(100)).as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "POST: {r}");
    let names = MIRRORS.iter().map(|m| format!("{m}.mirror.test"));
    for host in std::iter::once("api.test".to_owned()).chain(names) {
        let (mut s, head) = connect_tunnel(proxy.addr, &format!("{host}:{echo}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
        let data = vec![b'w'; 10_000];
        s.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
    }
}

fn refused(proxy: &Proxy, authority: &str) -> String {
    let (_, head) = connect_tunnel(proxy.addr, authority);
    assert!(
        !head.starts_with("HTTP/1.1 200"),
        "{authority} was let through"
    );
    header(&head, "X-Tank-Refused-By")
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_policy_learnt_from_a_real_log_passes_check_and_enforces_the_same_work() {
    let dir = tempdir();
    let web = Origin::http();
    let echo = Origin::echo();
    let (w, e) = (web.port, echo.port);
    let learning = format!(
        "allowed_domains = [\n  {{ domain = \"web.test\", ports = [{w}], allow_private = true }},\n  {{ domain = \"api.test\", ports = [{e}], allow_private = true }},\n  {{ domain = \"*.mirror.test\", ports = [{e}], allow_private = true }},\n]\ndenied_domains = [\"evil.test\"]\n{}",
        hosts()
    );
    let mut proxy = Proxy::start(dir.path(), &learning);
    work(&proxy, w, e);
    assert_eq!(
        refused(&proxy, &format!("evil.test:{e}")),
        "denied_domains:evil.test"
    );
    assert_eq!(refused(&proxy, &format!("other.test:{e}")), "default-deny");
    proxy.stop();

    let out = Command::new(BIN)
        .args(["policy", "suggest"])
        .arg(&proxy.audit)
        .output()
        .unwrap();
    let suggestion = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- suggestion ---\n{suggestion}");
    let rules: Vec<&str> = suggestion
        .lines()
        .filter(|l| l.trim_start().starts_with("{ domain"))
        .collect();
    assert_eq!(rules.len(), 3, "{suggestion}");
    let web_rule = rules.iter().find(|r| r.contains("\"web.test\"")).unwrap();
    assert!(web_rule.contains(&format!("ports = [{w}]")), "{web_rule}");
    assert!(
        web_rule.contains("methods = [\"GET\", \"POST\"]"),
        "{web_rule}"
    );
    assert!(
        web_rule.contains("path_prefixes = [\"/pub/\", \"/upload/\"]"),
        "{web_rule}"
    );
    assert!(web_rule.contains("allow_private = true"), "{web_rule}");
    let api = rules.iter().find(|r| r.contains("\"api.test\"")).unwrap();
    // 10 000 bytes each way in the peak hour, twice that, in whole KiB.
    assert!(api.contains("bytes_out = \"20 KiB/h\""), "{api}");
    assert!(api.contains("requests = \"2/min\""), "{api}");
    assert!(
        rules.iter().any(|r| r.contains("\"*.mirror.test\"")),
        "{suggestion}"
    );
    assert!(suggestion.contains("# wildcard: 5 sibling names seen under mirror.test"));
    assert!(
        suggestion.contains("first 20"),
        "first/last seen: {suggestion}"
    );
    for never in ["evil.test", "other.test"] {
        assert!(
            rules.iter().all(|r| !r.contains(never)),
            "{never} suggested: {suggestion}"
        );
        assert!(
            suggestion.contains(&format!("#   {never} (")),
            "{suggestion}"
        );
    }

    // It passes check as it is.
    let file = dir.path().join("suggested.toml");
    std::fs::write(&file, &suggestion).unwrap();
    let check = Command::new(BIN).arg("check").arg(&file).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Enforced (with this test's listeners and [hosts]): the same work passes, the rest is
    // refused, now by default deny.
    let doc: toml::Table = suggestion.parse().unwrap();
    let mut table = toml::Table::new();
    table.insert("allowed_domains".into(), doc["allowed_domains"].clone());
    let enforce_dir = tempdir();
    let proxy = Proxy::start(
        enforce_dir.path(),
        &format!("{}\n{}", toml::to_string(&table).unwrap(), hosts()),
    );
    work(&proxy, w, e);
    assert_eq!(refused(&proxy, &format!("evil.test:{e}")), "default-deny");
    assert_eq!(refused(&proxy, &format!("other.test:{e}")), "default-deny");
    let put = raw_request(
        proxy.addr,
        format!("PUT http://web.test:{w}/pub/a.txt HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    );
    assert!(put.starts_with("HTTP/1.1 403"), "{put}");
    let other_path = raw_request(
        proxy.addr,
        format!("GET http://web.test:{w}/private/k HTTP/1.1\r\nHost: web.test\r\n\r\n").as_bytes(),
    );
    assert!(other_path.starts_with("HTTP/1.1 403"), "{other_path}");
}

#[test]
fn a_log_that_does_not_verify_teaches_nothing() {
    let dir = tempdir();
    let echo = Origin::echo();
    let mut proxy = Proxy::start(
        dir.path(),
        &format!(
            "allowed_domains = [{{ domain = \"api.test\", ports = [{}], allow_private = true }}]\n[hosts]\n\"api.test\" = \"127.0.0.1\"\n",
            echo.port
        ),
    );
    for _ in 0..2 {
        let (_, head) = connect_tunnel(proxy.addr, &format!("api.test:{}", echo.port));
        assert!(head.starts_with("HTTP/1.1 200"));
    }
    proxy.wait_records(2);
    proxy.stop();
    let text = std::fs::read_to_string(&proxy.audit).unwrap();
    std::fs::write(&proxy.audit, text.replacen("api.test", "evil.test", 1)).unwrap();
    let out = Command::new(BIN)
        .args(["policy", "suggest"])
        .arg(&proxy.audit)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("does not verify"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
