//! A second real client: Python's urllib over CONNECT with HTTPS_PROXY, to a local TLS
//! origin, allowed and refused.

mod common;
use common::*;

use std::process::Command;

/// Fetches `url` with urllib through `proxy`; prints `OK <status> <body>` or `ERR <text>`.
fn urllib(proxy: &str, ca: &std::path::Path, url: &str) -> String {
    let python = require_tool("python3", "python3");
    let script = r#"
import os, ssl, sys, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=os.environ["TEST_CA"])
try:
    with urllib.request.urlopen(sys.argv[1], context=ctx, timeout=20) as r:
        print("OK", r.status, r.read().decode())
except urllib.error.URLError as e:
    print("ERR", e)
except OSError as e:
    print("ERR", e)
"#;
    let out = Command::new(python)
        .args(["-c", script, url])
        .env("HTTPS_PROXY", proxy)
        .env("https_proxy", proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("TEST_CA", ca)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn python_urllib_tunnels_to_an_allowed_origin_and_is_refused_elsewhere() {
    let dir = tempdir();
    let origin = Origin::tls(dir.path(), &["origin.test", "pkgs.test"]);
    let proxy = Proxy::start(
        dir.path(),
        &format!(
            "allowed_domains = [{{ domain = \"origin.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"origin.test\" = \"127.0.0.1\"\n\"pkgs.test\" = \"127.0.0.1\"\n",
            p = origin.port
        ),
    );
    let ca = origin.ca_pem.clone().unwrap();

    let ok = urllib(
        &proxy.url(),
        &ca,
        &format!("https://origin.test:{}/simple/", origin.port),
    );
    assert_eq!(ok, "OK 200 hello from the origin: /simple/ body=0");
    let refused = urllib(
        &proxy.url(),
        &ca,
        &format!("https://pkgs.test:{}/simple/", origin.port),
    );
    assert!(
        refused.starts_with("ERR") && refused.contains("403"),
        "{refused}"
    );
    assert_eq!(origin.served(), 1);

    let records = proxy.wait_records(2);
    assert_eq!(
        record_where(&records, &[("/dst_endpoint/hostname", "origin.test")])["action"],
        "Allowed"
    );
    let refused = record_where(&records, &[("/dst_endpoint/hostname", "pkgs.test")]);
    assert_eq!(refused["action"], "Denied");
    assert_eq!(refused["unmapped"]["rule"], "default-deny");
}
