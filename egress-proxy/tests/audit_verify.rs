//! `egress-proxy audit verify` on a log the proxy wrote: intact, then each kind of
//! tampering (edit, deletion, reordering, truncation, a partial last line) is caught.
//! Exit codes: 0 intact, 1 problems, 2 unreadable.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

fn verify(path: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["audit", "verify"]).arg(path);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the log (and its anchor) with its lines changed by `f`.
fn tampered(
    src: &Path,
    dir: &Path,
    name: &str,
    f: impl FnOnce(&mut Vec<String>),
) -> std::path::PathBuf {
    let mut lines: Vec<String> = std::fs::read_to_string(src)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    f(&mut lines);
    let dst = dir.join(name);
    std::fs::write(
        &dst,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let mut head = dst.as_os_str().to_owned();
    head.push(".head");
    let mut src_head = src.as_os_str().to_owned();
    src_head.push(".head");
    std::fs::copy(&src_head, &head).unwrap();
    dst
}

#[test]
fn verify_accepts_the_proxy_log_and_catches_every_kind_of_tampering() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let mut proxy = Proxy::start(
        dir.path(),
        &format!("allowed_domains = [{{ domain = \"a.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"a.test\" = \"127.0.0.1\"\n"),
    );
    for i in 0..6 {
        let host = if i % 2 == 0 { "a.test" } else { "b.test" };
        let (s, _) = connect_tunnel(proxy.addr, &format!("{host}:{p}"));
        drop(s);
        proxy.wait_records(i + 1);
    }
    assert!(proxy.stop().success());
    let log = proxy.audit.clone();

    let (code, out, err) = verify(&log, false);
    assert_eq!(code, 0, "{out}{err}");
    // Three tunnels (opening and closing records) and three refusals.
    assert!(
        out.contains("intact: 9 records, last seq 9 (anchored at seq 9)"),
        "{out}"
    );
    let (code, out, _) = verify(&log, true);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["records"], 9);
    assert_eq!(report["unclosed"].as_array().unwrap().len(), 0);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    type Tamper = Box<dyn FnOnce(&mut Vec<String>)>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "edit",
            Box::new(|l| l[1] = l[1].replace("\"Allowed\"", "\"Denied\"")),
            "line 3: prev does not match",
        ),
        (
            "edit-last",
            Box::new(|l| l[8] = l[8].replace("\"Denied\"", "\"Allowed\"")),
            "differs from its anchored hash",
        ),
        (
            "delete",
            Box::new(|l| {
                l.remove(3);
            }),
            "line 4: seq 5 where 4 was due",
        ),
        (
            "reorder",
            Box::new(|l| l.swap(1, 2)),
            "line 2: seq 3 where 2 was due",
        ),
        (
            "truncate",
            Box::new(|l| l.truncate(4)),
            "log ends at seq 4 but its anchor names seq 9",
        ),
    ];
    for (name, f, expect) in cases {
        let path = tampered(&log, dir.path(), name, f);
        let (code, out, err) = verify(&path, false);
        assert_eq!(code, 1, "{name} not caught: {out}{err}");
        assert!(
            out.contains(expect),
            "{name}: expected `{expect}` in:\n{out}"
        );
        assert!(out.contains("NOT intact"), "{out}");
        let (code, out, _) = verify(&path, true);
        assert_eq!(code, 1);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(!report["problems"].as_array().unwrap().is_empty());
    }

    // A partial last line (a crash mid-write) is reported, never accepted.
    let partial = tampered(&log, dir.path(), "partial", |_| {});
    let mut bytes = std::fs::read(&partial).unwrap();
    bytes.extend_from_slice(b"{\"metadata\":{\"sequence\":10},\"unmapped\":{\"prev\":\"0a");
    std::fs::write(&partial, bytes).unwrap();
    let (code, out, _) = verify(&partial, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("line 10: partial record"), "{out}");

    // The proxy continues a log after such a crash: the fragment (never synced) is cut, so
    // the log verifies again.
    let mut proxy = Proxy::start_raw(
        dir.path(),
        &std::fs::read_to_string(&proxy.config)
            .unwrap()
            .replace(log.to_str().unwrap(), partial.to_str().unwrap()),
    );
    assert!(
        proxy.log_text().contains("partial record"),
        "{}",
        proxy.log_text()
    );
    let (s, _) = connect_tunnel(proxy.addr, &format!("a.test:{p}"));
    drop(s);
    wait_for(
        std::time::Duration::from_secs(10),
        "the record after recovery",
        || (read_chain(&partial).len() == 11).then_some(()),
    );
    assert!(proxy.stop().success());
    let (code, out, _) = verify(&partial, false);
    assert_eq!(code, 0, "{out}");
    assert!(!std::fs::read_to_string(&partial)
        .unwrap()
        .contains("\"prev\":\"0a\n"));
    assert_eq!(
        read_chain(&partial).last().unwrap()["metadata"]["sequence"],
        11
    );

    // Unreadable: exit 2 with a one-line error.
    let (code, _, err) = verify(&dir.path().join("missing.jsonl"), false);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("egress-proxy: cannot read audit log"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
