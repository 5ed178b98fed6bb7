//! Opaque tunnels to a TLS port (`tls_ports`): the ClientHello is read before anything is
//! relayed; its SNI must be the CONNECT host; SNI and ALPN land in the tunnel's record; a
//! tunnel that does not start with a ClientHello is refused unless the rule is `opaque`.
//! Judged by what the origin served.

mod common;
use common::https::{CertKind, HttpsOrigin, TunnelClient};
use common::*;

use std::io::{Read, Write};

fn policy(tls_port: u16, plain_port: u16) -> String {
    format!(
        r#"tls_ports = [{tls_port}, {plain_port}]
allowed_domains = [
  {{ domain = "origin.test", ports = [{tls_port}], allow_private = true }},
  {{ domain = "plain.test", ports = [{plain_port}], allow_private = true }},
  {{ domain = "ssh.test", ports = [{plain_port}], allow_private = true, opaque = true }},
]
[hosts]
"origin.test" = "127.0.0.1"
"other.test" = "127.0.0.1"
"plain.test" = "127.0.0.1"
"ssh.test" = "127.0.0.1"
"#
    )
}

#[test]
fn a_client_hello_for_the_connect_host_passes_and_is_recorded() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["origin.test", "other.test"],
        &["h2", "http/1.1"],
        CertKind::Good,
        None,
    );
    let plain = Origin::http();
    let proxy = Proxy::start(dir.path(), &policy(origin.port, plain.port));
    let (code, body, err) = curl(&[
        "-x",
        &proxy.url(),
        "--cacert",
        origin.ca_pem.to_str().unwrap(),
        "--http2",
        &format!("https://origin.test:{}/hello", origin.port),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(body.starts_with("hello GET /hello HTTP/2.0"), "{body}");
    let r = &proxy.wait_records(1)[0];
    assert_eq!(r["action"], "Allowed");
    assert_eq!(r["unmapped"]["sni"], "origin.test");
    assert_eq!(r["unmapped"]["alpn"], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(r["unmapped"]["tunnel"], "opaque");
}

#[test]
fn a_client_hello_naming_another_host_is_refused_before_any_byte_reaches_the_origin() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["origin.test", "other.test"],
        &["http/1.1"],
        CertKind::Good,
        None,
    );
    let plain = Origin::http();
    let proxy = Proxy::start(dir.path(), &policy(origin.port, plain.port));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // CONNECT to the allowed host, then a ClientHello for a host no rule allows (the origin
    // would serve it: it has a certificate for both names).
    let got = rt.block_on(TunnelClient::open(
        proxy.addr,
        &format!("origin.test:{}", origin.port),
        "other.test",
        &origin.ca_pem,
        &["http/1.1"],
    ));
    assert!(
        got.is_err(),
        "a tunnel with a ClientHello for other.test was relayed"
    );
    assert!(origin.seen().is_empty());
    let r = &proxy.wait_records(1)[0];
    assert_eq!(r["action"], "Denied");
    assert_eq!(r["unmapped"]["rule"], "sni-mismatch");
    assert_eq!(r["unmapped"]["sni"], "other.test");
    assert!(
        r["unmapped"]["error"]
            .as_str()
            .unwrap()
            .contains("other.test"),
        "{r}"
    );
}

#[test]
fn a_tunnel_to_a_tls_port_that_does_not_start_with_tls_is_refused_unless_opaque() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["origin.test"],
        &["http/1.1"],
        CertKind::Good,
        None,
    );
    let plain = Origin::http();
    let proxy = Proxy::start(dir.path(), &policy(origin.port, plain.port));
    // Plain HTTP inside a tunnel to a TLS port: refused, the origin serves nothing.
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("plain.test:{}", plain.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /smuggled HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(plain.served(), 0);
    // Garbage that starts like a TLS record but is not a ClientHello: refused too.
    let (mut s, _) = connect_tunnel(proxy.addr, &format!("plain.test:{}", plain.port));
    s.write_all(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
        .unwrap();
    let _ = s.read_to_end(&mut rest);
    // The same bytes under an `opaque` rule pass.
    let (mut s, _) = connect_tunnel(proxy.addr, &format!("ssh.test:{}", plain.port));
    s.write_all(b"GET /opaque HTTP/1.1\r\nHost: ssh.test\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.contains("hello from the origin: /opaque"),
        "{answer}"
    );
    assert_eq!(plain.served(), 1);
    drop(s); // the tunnel (and its record) ends when both sides have closed

    let records = proxy.wait_records(3);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["unmapped"]["rule"] == "not-tls")
        .collect();
    assert_eq!(refused.len(), 2, "{records:#?}");
    assert!(refused.iter().any(|r| r["unmapped"]["error"]
        .as_str()
        .unwrap()
        .contains("malformed TLS ClientHello")));
    let opaque = record_where(&records, &[("/dst_endpoint/hostname", "ssh.test")]);
    assert_eq!(opaque["action"], "Allowed");
    assert!(opaque["unmapped"].get("sni").is_none());
}
