//! The command line: `check` with line-precise errors and its exit codes, `run` refusing a
//! bad config with a one-line error, and `--help` that teaches.

mod common;
use common::*;

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_valid_file_and_reports_every_problem_by_line_and_column() {
    let dir = tempdir();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        config_text(dir.path(), "allowed_domains = [\"github.com\", \"*.pythonhosted.org\"]\ndenied_domains = [\"gist.github.com\"]\n"),
    )
    .unwrap();
    let (code, out, err) = run(&["check", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (2 allowed, 1 denied rules"), "{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = [\"127.0.0.1:3128\"]\nclient_networks = [\"10.0.0.0/33\"]\naudit_log = \"a.jsonl\"\nallowed_domains = [\n  \"ok.test\",\n  \"bad domain.test\",\n  { domain = \"x.test\", ports = [0] },\n]\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let b = bad.display();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with(&format!("{b}:2:20: ")), "{err}");
    assert!(
        lines[1].starts_with(&format!("{b}:6:3: allowed_domains: `bad domain.test`")),
        "{err}"
    );
    assert!(lines[2].starts_with(&format!("{b}:7:32: port 0")), "{err}");

    // A syntax error and an unknown key (camelCase from another tool) are line-precise too.
    std::fs::write(
        &bad,
        "listen = [\"127.0.0.1:3128\"]\nallowedDomains = [\"x\"]\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{b}:2:1: unknown field `allowedDomains`")),
        "{err}"
    );

    let (code, _, err) = run(&["check", dir.path().join("nope.toml").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.starts_with("egress-proxy: cannot read config"), "{err}");
    assert!(
        err.contains("No such file"),
        "the cause chain is missing: {err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_one_line_and_exit_2() {
    let dir = tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = []\nclient_networks = [\"127.0.0.1\"]\naudit_log = \"a.jsonl\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "egress-proxy: {}:1:10: `listen` needs at least one address",
            bad.display()
        )),
        "{err}"
    );
    assert!(
        !dir.path().join("a.jsonl").exists(),
        "no audit log before the config is valid"
    );

    // A listener that cannot bind: exit 2, cause chain included.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = dir.path().join("taken.toml");
    std::fs::write(
        &cfg,
        format!("listen = [\"{}\"]\nadmin_listen = \"off\"\nclient_networks = [\"127.0.0.1\"]\naudit_log = \"a.jsonl\"\n", taken.local_addr().unwrap()),
    )
    .unwrap();
    let (code, _, err) = run(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        !dir.path().join("a.jsonl").exists(),
        "the audit log was touched by a proxy that could not start"
    );
    assert!(
        last.starts_with("egress-proxy: cannot listen on 127.0.0.1:"),
        "{err}"
    );
    assert!(last.contains("in use"), "{err}");
}

#[test]
fn help_teaches_the_commands_and_exit_codes() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for word in ["run", "check", "audit", "Exit codes"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (code, out, _) = run(&["audit", "verify", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--json") && out.contains("reordered"), "{out}");
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

#[test]
fn check_prints_a_syntax_error_as_one_line_and_warnings_without_failing() {
    let dir = tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        config_text(dir.path(), "allowed_domains = [\"x.test\"\n"),
    )
    .unwrap();
    let (code, _, err) = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("{}:7:1: ", bad.display())),
        "{err}"
    );

    let (code, _, err) = run(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");

    let warned = dir.path().join("warned.toml");
    std::fs::write(
        &warned,
        config_text(
            dir.path(),
            "allowed_domains = [\"gist.github.com\"]\ndenied_domains = [\"*.github.com\"]\n",
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["check", warned.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 warnings"), "{out}");
    assert!(
        err.starts_with(&format!(
            "{}:6:20: warning: allowed_domains:gist.github.com never applies",
            warned.display()
        )),
        "{err}"
    );
}

#[test]
fn the_binary_writes_its_own_man_pages_and_completions() {
    let dir = tempdir();
    let out_dir = dir.path().to_str().unwrap();
    let (code, _, err) = run(&["generate-manual", out_dir]);
    assert_eq!(code, 0, "{err}");
    for page in [
        "egress-proxy.1",
        "egress-proxy-check.1",
        "egress-proxy-audit-verify.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join("man").join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    // Internal subcommands get no page.
    assert!(!dir
        .path()
        .join("man/egress-proxy-generate-manual.1")
        .exists());
    let bash = std::fs::read_to_string(dir.path().join("completions/bash/egress-proxy")).unwrap();
    assert!(bash.contains("check"), "{bash}");
    assert!(dir.path().join("completions/zsh/_egress-proxy").exists());
    assert!(dir
        .path()
        .join("completions/fish/egress-proxy.fish")
        .exists());
}
