//! Inspected tunnels end to end: the real proxy binary with a CA made by `egress-proxy ca
//! init`, a GitHub-like HTTPS origin on loopback (tests/common/https.rs), and clients inside
//! one CONNECT tunnel. What each test judges is what the origin received and what the audit
//! log holds, besides what the client was answered.

mod common;
use common::https::{make_ca, CertKind, HttpsOrigin, TunnelClient};
use common::*;

use std::path::Path;

/// The GitHub example of docs/proxy.md, on the origin's port: one repository allowed on
/// the git host and the API host, everything else on them refused.
fn github_policy(dir: &Path, origin: &HttpsOrigin) -> String {
    let p = origin.port;
    format!(
        r#"allowed_domains = [
  {{ domain = "github.test", ports = [{p}], inspect = true, allow_private = true, name = "git", methods = ["GET", "POST"], path_prefixes = ["/git/owner/repo.git/", "/owner/repo.git/"] }},
  {{ domain = "api.github.test", ports = [{p}], inspect = true, allow_private = true, name = "api", methods = ["GET"], path_prefixes = ["/repos/owner/repo/"], redact_query = true }},
]
denied_domains = [
  {{ domain = "api.github.test", methods = ["DELETE"] }},
]
[hosts]
"github.test" = "127.0.0.1"
"api.github.test" = "127.0.0.1"
[inspection]
ca_dir = "{ca}"
upstream_ca = "{up}"
"#,
        ca = make_ca(dir, "ca", &["github.test"]).display(),
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
fn one_repository_is_allowed_and_another_refused_inside_one_tunnel_every_http_version_pairing() {
    for origin_alpn in [&["h2"][..], &["http/1.1"][..]] {
        for agent_alpn in [&["h2"][..], &["http/1.1"][..]] {
            let dir = tempdir();
            let origin = HttpsOrigin::start(
                dir.path(),
                &["github.test", "api.github.test"],
                origin_alpn,
                CertKind::Good,
                None,
            );
            let proxy = Proxy::start(dir.path(), &github_policy(dir.path(), &origin));
            let ca = dir.path().join("ca/ca.pem");
            let auth = format!("api.github.test:{}", origin.port);
            let case = format!("agent {agent_alpn:?} origin {origin_alpn:?}");
            rt().block_on(async {
                let mut c =
                    TunnelClient::open(proxy.addr, &auth, "api.github.test", &ca, agent_alpn)
                        .await
                        .unwrap();
                assert_eq!(c.alpn.as_deref(), Some(agent_alpn[0].as_bytes()), "{case}");
                let ok = c
                    .send(
                        "GET",
                        "/repos/owner/repo/issues?state=open&token=abc",
                        &[],
                        None,
                    )
                    .await
                    .unwrap();
                assert_eq!(ok.status, 200, "{case}: {ok:?}");
                assert!(
                    ok.body.contains("\"full_name\":\"owner/repo/issues\""),
                    "{case}: {ok:?}"
                );
                let no = c
                    .send(
                        "GET",
                        "/repos/owner/other/issues",
                        &[("accept", "application/vnd.github+json")],
                        None,
                    )
                    .await
                    .unwrap();
                assert_eq!(no.status, 403, "{case}: {no:?}");
                assert_eq!(
                    no.header("x-tank-refused-by"),
                    Some("path-not-allowed"),
                    "{case}"
                );
                let json: serde_json::Value = serde_json::from_str(&no.body).unwrap();
                assert_eq!(json["reason"], "path-not-allowed", "{case}");
                assert!(
                    json["detail"]
                        .as_str()
                        .unwrap()
                        .contains("/repos/owner/other/issues"),
                    "{case}"
                );
                // A dot-segment escape and a denied method are refused too; no JSON asked, text.
                let esc = c
                    .send("GET", "/repos/owner/repo/../other/issues", &[], None)
                    .await
                    .unwrap();
                assert_eq!(esc.status, 403, "{case}: {esc:?}");
                assert!(
                    esc.body.starts_with("egress-proxy: refused"),
                    "{case}: {esc:?}"
                );
                let del = c
                    .send("DELETE", "/repos/owner/repo/issues/1", &[], None)
                    .await
                    .unwrap();
                assert_eq!(
                    del.header("x-tank-refused-by"),
                    Some("denied_domains:api.github.test"),
                    "{case}: {del:?}"
                );
                // The tunnel is still good for allowed requests.
                let again = c
                    .send("GET", "/repos/owner/repo/pulls", &[], None)
                    .await
                    .unwrap();
                assert_eq!(again.status, 200, "{case}: {again:?}");
            });
            // What arrived: exactly the two allowed requests, in the origin's own version.
            let seen = origin.seen();
            let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
            assert_eq!(
                paths,
                [
                    "/repos/owner/repo/issues?state=open&token=abc",
                    "/repos/owner/repo/pulls"
                ],
                "{case}"
            );
            let want_version = if origin_alpn[0] == "h2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            };
            assert!(
                seen.iter().all(|s| s.version == want_version),
                "{case}: {seen:?}"
            );
            assert!(
                seen.iter()
                    .all(|s| s.header("host").is_some() || s.version == "HTTP/2.0"),
                "{case}"
            );

            // The tunnel record is written when the tunnel ends (the client is gone now).
            let proxy_records = wait_for(
                std::time::Duration::from_secs(10),
                "the tunnel record",
                || {
                    let r = proxy.records();
                    r.iter()
                        .any(|r| r["unmapped"]["kind"] == "connect")
                        .then_some(r)
                },
            );
            let tunnel = record_where(&proxy_records, &[("/unmapped/kind", "connect")]);
            let uid = tunnel["metadata"]["uid"]
                .as_str()
                .expect("tunnel uid")
                .to_owned();
            assert_eq!(tunnel["class_uid"], 4001);
            assert_eq!(tunnel["unmapped"]["tunnel"], "inspected");
            assert_eq!(tunnel["unmapped"]["requests"], 5, "{case}: {tunnel}");
            assert_eq!(tunnel["unmapped"]["sni"], "api.github.test");
            assert_eq!(tunnel["unmapped"]["rule"], "allowed_domains:api");
            let requests: Vec<_> = proxy_records
                .iter()
                .filter(|r| r["class_uid"] == 4002)
                .collect();
            assert_eq!(requests.len(), 5, "{case}: {proxy_records:#?}");
            for r in &requests {
                assert_eq!(r["metadata"]["correlation_uid"], uid.as_str(), "{case}");
                assert_eq!(r["metadata"]["log_name"], "proxy");
                assert!(
                    !r["http_request"]["url"]["url_string"]
                        .as_str()
                        .unwrap()
                        .contains('?'),
                    "query not redacted: {r}"
                );
            }
            let first = &requests
                .iter()
                .find(|r| {
                    r["http_request"]["url"]["url_string"]
                        .as_str()
                        .unwrap()
                        .ends_with("/issues")
                        && r["action"] == "Allowed"
                })
                .unwrap();
            assert_eq!(first["type_uid"], 400203);
            assert_eq!(first["http_response"]["code"], 200);
            assert_eq!(first["unmapped"]["rule"], "allowed_domains:api");
            assert!(first["traffic"]["bytes_in"].as_u64().unwrap() > 10);
            let want_agent = if agent_alpn[0] == "h2" {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            };
            assert_eq!(first["http_request"]["version"], want_agent, "{case}");
            let refused: Vec<_> = requests
                .iter()
                .filter(|r| r["action"] == "Denied")
                .collect();
            assert_eq!(refused.len(), 3, "{case}");
            assert!(refused
                .iter()
                .all(|r| r["http_response"]["code"] == 403 && r["disposition"] == "Blocked"));
        }
    }
}

#[test]
fn an_origin_that_fails_verification_gets_the_agent_a_502_naming_why() {
    for (kind, why) in [
        (CertKind::WrongName, "notvalidforname"),
        (CertKind::Expired, "expired"),
        (CertKind::SelfSigned, "unknownissuer"),
    ] {
        let dir = tempdir();
        let origin = HttpsOrigin::start(dir.path(), &["github.test"], &["http/1.1"], kind, None);
        let proxy = Proxy::start(dir.path(), &github_policy(dir.path(), &origin));
        let (_, head) = connect_tunnel(proxy.addr, &format!("github.test:{}", origin.port));
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        assert_eq!(header(&head, "X-Tank-Error"), Some("origin-tls"), "{head}");
        let squashed = head.to_lowercase().replace([' ', '_'], "");
        assert!(squashed.contains(why), "{why}: {head}");
        assert!(origin.seen().is_empty());
        let r = &proxy.wait_records(1)[0];
        assert!(
            r["unmapped"]["error"]
                .as_str()
                .unwrap()
                .contains("origin certificate not accepted"),
            "{r}"
        );
    }
}

#[test]
fn a_request_for_another_host_or_a_client_hello_for_another_name_is_refused() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["github.test", "api.github.test"],
        &["http/1.1"],
        CertKind::Good,
        None,
    );
    let proxy = Proxy::start(dir.path(), &github_policy(dir.path(), &origin));
    let ca = dir.path().join("ca/ca.pem");
    let auth = format!("api.github.test:{}", origin.port);
    rt().block_on(async {
        let mut c = TunnelClient::open(proxy.addr, &auth, "api.github.test", &ca, &["http/1.1"])
            .await
            .unwrap();
        let fronted = c
            .send("GET", "/repos/owner/repo/x", &[], Some("github.test"))
            .await
            .unwrap();
        assert_eq!(fronted.status, 403, "{fronted:?}");
        assert_eq!(fronted.header("x-tank-refused-by"), Some("host-mismatch"));
        // SNI naming another host than the CONNECT: refused before any request.
        let e = TunnelClient::open(proxy.addr, &auth, "github.test", &ca, &["http/1.1"])
            .await
            .err();
        assert!(e.is_some(), "a ClientHello for another name was served");
    });
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());
    let records = proxy.wait_records(3);
    let r = record_where(&records, &[("/unmapped/rule", "sni-mismatch")]);
    assert_eq!(r["unmapped"]["sni"], "github.test");
    assert_eq!(r["action"], "Denied");
}

/// A stolen CA key could sign a leaf for any name; clients that honour name constraints
/// refuse it. Shown with curl (OpenSSL) against a server presenting such a leaf directly.
#[test]
fn a_leaf_the_ca_signs_for_a_name_outside_its_constraints_is_rejected_by_curl() {
    let dir = tempdir();
    let ca_dir = make_ca(dir.path(), "ca", &["github.test"]);
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
    )
    .unwrap();
    let issuer = ca_params.self_signed(&ca_key).unwrap();
    for (name, ok) in [("bank.test", false), ("api.github.test", true)] {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer, &ca_key)
            .unwrap();
        let server = tls_server(leaf.der().clone(), key);
        let (code, _, err) = curl(&[
            "--cacert",
            ca_dir.join("ca.pem").to_str().unwrap(),
            "--resolve",
            &format!("{name}:{}:127.0.0.1", server.1),
            &format!("https://{name}:{}/", server.1),
        ]);
        if ok {
            assert_eq!(code, 0, "{name}: {err}");
        } else {
            assert_eq!(
                code, 60,
                "{name}: curl accepted a leaf outside the constraints: {err}"
            );
            assert!(
                err.contains("permitted subtree violation") || err.contains("name constraint"),
                "{err}"
            );
        }
    }
}

/// A bare TLS server answering `ok` with `cert`, on loopback; dropped = stopped.
fn tls_server(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rcgen::KeyPair,
) -> (tokio::runtime::Runtime, u16) {
    use tokio::io::AsyncWriteExt;
    let config = common::tls::server_config(cert, &key, &[]);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (rt, port)
}

use tokio_rustls::rustls;
