//! Path rules judged on the one normal form ([`egress_proxy::path`]) and forwarded in it:
//! each known bypass of a `/private/` denial is refused before the origin sees it, an
//! encoded slash never climbs out of an allowed prefix, and a tunnel to a host with
//! request-level denials is refused (its requests could not be judged).

mod common;
use common::*;

fn start(dir: &std::path::Path, port: u16) -> Proxy {
    Proxy::start(
        dir,
        &format!(
            r#"allowed_domains = [
  {{ domain = "files.test", ports = [{port}], allow_private = true }},
  {{ domain = "pub.test", ports = [{port}], path_prefixes = ["/pub/"], allow_private = true }},
]
denied_domains = [{{ domain = "files.test", path_prefixes = ["/private/"] }}]
[hosts]
"files.test" = "127.0.0.1"
"pub.test" = "127.0.0.1"
"#
        ),
    )
}

fn get(proxy: &Proxy, host: &str, port: u16, path: &str) -> String {
    raw_request(
        proxy.addr,
        format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
    )
}

#[test]
fn every_known_bypass_of_a_path_denial_is_refused_before_the_origin() {
    let dir = tempdir();
    let origin = Origin::http();
    let p = origin.port;
    let proxy = start(dir.path(), p);

    let out = get(&proxy, "files.test", p, "/public/a.txt");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(origin.served(), 1);
    for path in [
        "/private/secret.txt",
        "/%70rivate/secret.txt",
        "//private/secret.txt",
        "/./private/secret.txt",
        "/pub/../private/secret.txt",
        "/private%2fsecret.txt",
        "/private%2Fsecret.txt",
        "/pub%2f..%2fprivate%2fsecret.txt",
        "/%2e/private/secret.txt",
        "/pub/%2e%2e/private/secret.txt",
        "///./pub/..//private/secret.txt",
    ] {
        let out = get(&proxy, "files.test", p, path);
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
        assert_eq!(
            header(&out, "X-Tank-Refused-By"),
            Some("denied_domains:files.test"),
            "{path}: {out}"
        );
    }
    // Ambiguous to origins: refused as malformed.
    for path in [
        "/private\\secret.txt",
        "/x%5c..%5cprivate/secret.txt",
        "/a%zz",
    ] {
        let out = get(&proxy, "files.test", p, path);
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
    }
    assert_eq!(origin.served(), 1, "the origin served a denied path");

    // What is forwarded is the normal form that was judged.
    let out = get(&proxy, "files.test", p, "/public//./x/../%61.txt?q=%2e%2e");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let heads = origin.requests.lock().unwrap().clone();
    assert!(
        heads
            .last()
            .unwrap()
            .starts_with("GET /public/a.txt?q=%2e%2e HTTP/1.1\r\n"),
        "{heads:?}"
    );

    let records = proxy.wait_records(16);
    let denied = records
        .iter()
        .filter(|r| r["unmapped"]["rule"] == "denied_domains:files.test")
        .count();
    assert_eq!(denied, 11);
    assert!(!records.iter().any(|r| r["action"] == "Allowed"
        && r["http_request"]["url"]["url_string"]
            .as_str()
            .unwrap_or("")
            .contains("private")));
}

#[test]
fn an_encoded_slash_never_climbs_out_of_an_allowed_prefix() {
    let dir = tempdir();
    let origin = Origin::http();
    let p = origin.port;
    let proxy = start(dir.path(), p);
    let out = get(&proxy, "pub.test", p, "/pub/a.txt");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    for path in [
        "/pub%2f..%2fadmin",
        "/pub%2Fa.txt",
        "/pub/../admin",
        "/%70ub/../admin",
    ] {
        let out = get(&proxy, "pub.test", p, path);
        assert_eq!(
            header(&out, "X-Tank-Refused-By"),
            Some("path-not-allowed"),
            "{path}: {out}"
        );
    }
    assert_eq!(origin.served(), 1);
}

#[test]
fn a_tunnel_to_a_host_with_path_denials_is_refused() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = start(dir.path(), p);
    let (_, head) = connect_tunnel(proxy.addr, &format!("files.test:{p}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(
        header(&head, "X-Tank-Refused-By"),
        Some("denied_domains:files.test")
    );
    assert!(head.contains("tunnel would hide"), "{head}");
    assert_eq!(origin.served(), 0);
}
