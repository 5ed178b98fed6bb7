//! `[[credentials]]`: a secret the agent never holds, set by the proxy on inspected requests
//! to one host. Judged by what the origin received, what the agent got back, and what the
//! proxy's log and audit log hold (never the secret).

mod common;
use common::https::{make_ca, CertKind, HttpsOrigin, TunnelClient};
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const SECRET: &str = "s3cr3t-token-value-0123456789";

fn write_secret(dir: &Path, value: &str) {
    let p = dir.join("github-token");
    std::fs::write(&p, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn policy(dir: &Path, origin: &HttpsOrigin) -> String {
    let p = origin.port;
    format!(
        r#"allowed_domains = [
  {{ domain = "api.github.test", ports = [{p}], inspect = true, allow_private = true }},
  {{ domain = "other.test", ports = [{p}], inspect = true, allow_private = true }},
]
[hosts]
"api.github.test" = "127.0.0.1"
"other.test" = "127.0.0.1"
[inspection]
ca_dir = "{ca}"
upstream_ca = "{up}"
[[credentials]]
name = "github"
host = "api.github.test"
header = "Authorization"
value = "Bearer {{secret}}"
secret_file = "github-token"
"#,
        ca = make_ca(dir, "ca", &["api.github.test", "other.test"]).display(),
        up = origin.ca_pem.display(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_proxy_sets_the_secret_and_the_agent_can_neither_see_nor_replace_it() {
    let dir = tempdir();
    write_secret(dir.path(), SECRET);
    let origin = HttpsOrigin::start(
        dir.path(),
        &["api.github.test", "other.test"],
        &["h2", "http/1.1"],
        CertKind::Good,
        None,
    );
    let proxy = Proxy::start(dir.path(), &policy(dir.path(), &origin));
    let ca = dir.path().join("ca/ca.pem");
    let auth = format!("api.github.test:{}", origin.port);
    rt().block_on(async {
        let mut c = TunnelClient::open(proxy.addr, &auth, "api.github.test", &ca, &["h2"])
            .await
            .unwrap();
        // No header, then the placeholder: both get the secret at the origin.
        for sent in [None, Some("Bearer tank-credential-github")] {
            let mut h = vec![("accept-encoding", "gzip")];
            h.extend(sent.map(|v| ("authorization", v)));
            let got = c.send("GET", "/echo", &h, None).await.unwrap();
            assert_eq!(got.status, 200, "{got:?}");
            // The origin echoed the header in its body and its response headers: masked.
            let everything = format!("{:?}{}", got.headers, got.body);
            assert!(
                !everything.contains(SECRET),
                "the secret reached the agent: {everything}"
            );
            assert!(got.body.contains(&"*".repeat(SECRET.len())), "{}", got.body);
            assert!(
                got.header("x-echo-authorization").unwrap().contains("****"),
                "{got:?}"
            );
        }
        // A value of the agent's own is refused before it leaves.
        let got = c
            .send(
                "GET",
                "/echo",
                &[
                    ("authorization", "Bearer ghp_found_elsewhere"),
                    ("accept", "application/json"),
                ],
                None,
            )
            .await
            .unwrap();
        assert_eq!(got.status, 403, "{got:?}");
        assert_eq!(got.header("x-tank-refused-by"), Some("credential-mismatch"));
        assert!(!got.body.contains(SECRET));
    });
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(
            s.header("accept-encoding"),
            None,
            "an encoded body would hide an echo from the mask"
        );
    }

    // curl follows a redirect to another host with the placeholder (--location-trusted
    // resends Authorization): that host gets the placeholder, never the secret.
    let (code, body, err) = curl(&[
        "-x",
        &proxy.url(),
        "--cacert",
        ca.to_str().unwrap(),
        "-L",
        "--location-trusted",
        "-H",
        "Authorization: Bearer tank-credential-github",
        &format!(
            "https://api.github.test:{0}/redirect?to=https://other.test:{0}/echo",
            origin.port
        ),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!body.contains(SECRET), "{body}");
    let last = origin.seen().pop().unwrap();
    assert_eq!(last.path, "/echo");
    assert_eq!(
        last.header("authorization"),
        Some("Bearer tank-credential-github"),
        "{last:?}"
    );

    // The records name the credential; no file the proxy wrote holds the secret.
    let records = wait_for(
        std::time::Duration::from_secs(10),
        "the request records",
        || {
            let r = proxy.records();
            (r.iter().filter(|r| r["class_uid"] == 4002).count() >= 5).then_some(r)
        },
    );
    let injected = records
        .iter()
        .filter(|r| r["unmapped"]["credential"] == "github")
        .count();
    // Two on the tunnel, one on curl's first request (the redirect), none on other.test.
    assert_eq!(injected, 3, "{records:#?}");
    for f in ["audit.jsonl", "proxy.log"] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(!text.contains(SECRET), "{f} holds the secret");
    }
    assert!(!proxy.admin_get("/metrics").contains(SECRET));

    // A reload reads the secret file again.
    write_secret(dir.path(), "rotated-secret-value");
    proxy.reload_with(&std::fs::read_to_string(&proxy.config).unwrap());
    rt().block_on(async {
        let mut c = TunnelClient::open(proxy.addr, &auth, "api.github.test", &ca, &["http/1.1"])
            .await
            .unwrap();
        let got = c.send("GET", "/repos/x", &[], None).await.unwrap();
        assert_eq!(got.status, 200);
    });
    assert_eq!(
        origin.seen().pop().unwrap().header("authorization"),
        Some("Bearer rotated-secret-value")
    );
}

#[test]
fn a_missing_or_exposed_secret_file_is_one_line_at_check_time() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["api.github.test"],
        &["http/1.1"],
        CertKind::Good,
        None,
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        config_text(dir.path(), &policy(dir.path(), &origin)),
    )
    .unwrap();
    let check = || {
        let out = Command::new(BIN)
            .arg("check")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check();
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("credential `github`")
            && err.contains("github-token")
            && err.contains("No such file"),
        "{err}"
    );
    write_secret(dir.path(), SECRET);
    std::fs::set_permissions(
        dir.path().join("github-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("accessible to others") && !err.contains(SECRET),
        "{err}"
    );
    std::fs::set_permissions(
        dir.path().join("github-token"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(0), "{err}");
}
