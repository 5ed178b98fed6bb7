//! Bad inspection input gets one clear line from `egress-proxy check` (and so the proxy
//! never starts, or a reload is rejected, with it): an inspect rule with no CA, a CA key that
//! is not its certificate's, a CA whose name constraints do not cover a rule, and rules or
//! credentials that cannot mean anything.

mod common;
use common::https::make_ca;
use common::*;

use std::path::Path;
use std::process::Command;

/// `check` on the test config with `body`: (exit code, stderr lines).
fn check(dir: &Path, body: &str) -> (i32, Vec<String>) {
    let config = dir.join("proxy.toml");
    std::fs::write(&config, config_text(dir, body)).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap(),
        err.lines()
            .filter(|l| !l.contains("warning"))
            .map(str::to_owned)
            .collect(),
    )
}

fn one_line(dir: &Path, body: &str, want: &[&str]) {
    let (code, lines) = check(dir, body);
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    for w in want {
        assert!(lines[0].contains(w), "`{w}` not in {lines:?}");
    }
    assert!(lines[0].contains("proxy.toml:"), "no position: {lines:?}");
}

#[test]
fn inspection_mistakes_are_one_line_each() {
    let dir = tempdir();
    let d = dir.path();
    let good = make_ca(d, "ca", &["github.test"]);
    let other = make_ca(d, "other", &["github.test"]);
    let rule = r#"allowed_domains = [{ domain = "api.github.test", inspect = true }]"#;

    one_line(
        d,
        &format!("{rule}\n"),
        &["`inspect = true` needs a CA", "ca init"],
    );

    let (code, lines) = check(
        d,
        &format!("{rule}\n[inspection]\nca_dir = \"{}\"\n", good.display()),
    );
    assert_eq!(code, 0, "{lines:?}");

    // A key from another CA beside the certificate.
    let mixed = d.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(good.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(other.join("ca.key"), mixed.join("ca.key")).unwrap();
    one_line(
        d,
        &format!("{rule}\n[inspection]\nca_dir = \"{}\"\n", mixed.display()),
        &["does not match the certificate"],
    );

    let narrow = make_ca(d, "narrow", &["api.github.test"]);
    one_line(
        d,
        &format!("allowed_domains = [{{ domain = \"github.test\", inspect = true }}]\n[inspection]\nca_dir = \"{}\"\n", narrow.display()),
        &["may not mint for `github.test`", "api.github.test"],
    );
    one_line(
        d,
        &format!("allowed_domains = [{{ domain = \"api.github.test\", inspect = true, opaque = true }}]\n[inspection]\nca_dir = \"{}\"\n", good.display()),
        &["both `inspect` and `opaque`"],
    );
    one_line(
        d,
        &format!("allowed_domains = [{{ domain = \"192.0.2.1\", inspect = true }}]\n[inspection]\nca_dir = \"{}\"\n", good.display()),
        &["never for addresses"],
    );
    one_line(
        d,
        &format!(
            "{rule}\n[inspection]\nca_dir = \"{}\"\nupstream_ca = \"missing.pem\"\n",
            good.display()
        ),
        &["upstream_ca", "missing.pem"],
    );
    std::fs::write(d.join("tok"), "x").unwrap();
    std::fs::set_permissions(
        d.join("tok"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    one_line(
        d,
        &format!("{rule}\n[inspection]\nca_dir = \"{}\"\n[[credentials]]\nname = \"gh\"\nhost = \"uninspected.test\"\nheader = \"Authorization\"\nvalue = \"Bearer {{secret}}\"\nsecret_file = \"tok\"\n", good.display()),
        &["no `inspect = true` rule covers"],
    );
}
