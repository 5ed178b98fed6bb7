//! Plain `http://` forwarding: method and path rules, the head the origin receives, request
//! bodies delimited exactly, and no second request smuggled past the policy.

mod common;
use common::*;

fn start(dir: &std::path::Path, port: u16) -> Proxy {
    Proxy::start(
        dir,
        &format!(
            r#"allowed_domains = [
  {{ domain = "files.test", ports = [{port}], methods = ["GET", "HEAD"], path_prefixes = ["/pub/"], allow_private = true }},
  {{ domain = "upload.test", ports = [{port}], methods = ["POST"], allow_private = true }},
]
[hosts]
"files.test" = "127.0.0.1"
"upload.test" = "127.0.0.1"
"#
        ),
    )
}

#[test]
fn curl_plain_http_is_allowed_and_refused_by_method_and_path() {
    let dir = tempdir();
    let origin = Origin::http();
    let proxy = start(dir.path(), origin.port);
    let url = |p: &str| format!("http://files.test:{}{p}", origin.port);

    let (code, body, err) = curl(&["-x", &proxy.url(), &url("/pub/a.txt")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello from the origin: /pub/a.txt body=0\n");

    let (_, out, _) = curl(&["-i", "-x", &proxy.url(), "-X", "DELETE", &url("/pub/a.txt")]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(
        header(&out, "X-Tank-Refused-By"),
        Some("method-not-allowed")
    );
    let (_, out, _) = curl(&["-i", "-x", &proxy.url(), &url("/private/key")]);
    assert_eq!(
        header(&out, "X-Tank-Refused-By"),
        Some("path-not-allowed"),
        "{out}"
    );
    // A dot-segment cannot climb out of the allowed prefix.
    let (_, out, _) = curl(&[
        "-i",
        "--path-as-is",
        "-x",
        &proxy.url(),
        &url("/pub/../private/key"),
    ]);
    assert_eq!(
        header(&out, "X-Tank-Refused-By"),
        Some("path-not-allowed"),
        "{out}"
    );
    // CONNECT to a rule restricted to paths is refused: the proxy could not see them.
    let (_, head) = connect_tunnel(proxy.addr, &format!("files.test:{}", origin.port));
    assert_eq!(
        header(&head, "X-Tank-Refused-By"),
        Some("method-not-allowed"),
        "{head}"
    );
    assert_eq!(origin.served(), 1, "a refused request reached the origin");

    let records = proxy.wait_records(5);
    let get = record_where(
        &records,
        &[
            ("/url/url_string", &url("/pub/a.txt")),
            ("/unmapped/http_method", "GET"),
        ],
    );
    assert_eq!(get["unmapped"]["kind"], "http");
    assert!(get["traffic"]["bytes_out"].as_u64().unwrap() > 0);
    assert!(get["traffic"]["bytes_in"].as_u64().unwrap() > 0);
    let delete = record_where(&records, &[("/unmapped/http_method", "DELETE")]);
    assert_eq!(delete["action"], "Denied");
    assert_eq!(
        proxy.metric("egress_proxy_requests_total{decision=\"allowed\",kind=\"http\"}"),
        1.0
    );
}

#[test]
fn the_origin_gets_a_clean_head_and_exactly_one_request() {
    let dir = tempdir();
    let origin = Origin::http();
    let proxy = start(dir.path(), origin.port);
    let p = origin.port;

    // Host is rewritten to the URL's authority; proxy headers are dropped; a pipelined
    // second request (to a path the policy refuses) never reaches the origin.
    let req = format!(
        "GET http://files.test:{p}/pub/x HTTP/1.1\r\nHost: evil.test\r\nProxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\nGET http://files.test:{p}/private/y HTTP/1.1\r\nHost: files.test\r\n\r\n"
    );
    let out = raw_request(proxy.addr, req.as_bytes());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("hello from the origin: /pub/x"), "{out}");
    assert!(!out.contains("/private/y"), "{out}");
    let heads = origin.requests.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(
        heads[0],
        format!(
            "GET /pub/x HTTP/1.1\r\nHost: files.test:{p}\r\nX-Kept: 2\r\nConnection: close\r\n\r\n"
        )
    );

    // A Content-Length body is forwarded exactly; bytes after it are not.
    let req = format!("POST http://upload.test:{p}/u HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello worldGET /smuggled HTTP/1.1\r\n\r\n");
    let out = raw_request(proxy.addr, req.as_bytes());
    assert!(out.contains("hello from the origin: /u body=11"), "{out}");
    // A chunked body reaches the origin whole (it reads no chunked bodies, so check the
    // head and that the proxy passed the request on).
    let req = format!("POST http://upload.test:{p}/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let out = raw_request(proxy.addr, req.as_bytes());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let heads = origin.requests.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(heads.iter().all(|h| !h.contains("smuggled")), "{heads:?}");
    assert!(
        heads[2].contains("Transfer-Encoding: chunked\r\n"),
        "{heads:?}"
    );
    // Ambiguous framing is refused before any origin sees it.
    let out = raw_request(
        proxy.addr,
        format!("POST http://upload.test:{p}/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(header(&out, "X-Tank-Refused-By"), Some("bad-request"));
    assert_eq!(origin.served(), 3);
    let records = proxy.wait_records(4);
    // bytes_out: the rewritten head plus exactly the 11 body bytes, not the smuggled rest.
    let head = format!("POST /u HTTP/1.1\r\nHost: upload.test:{p}\r\nContent-Length: 11\r\nConnection: close\r\n\r\n");
    let post = record_where(
        &records,
        &[("/url/url_string", &format!("http://upload.test:{p}/u"))],
    );
    assert_eq!(
        post["traffic"]["bytes_out"].as_u64().unwrap() as usize,
        head.len() + 11
    );
    record_where(&records, &[("/unmapped/rule", "bad-request")]);
}

#[test]
fn a_malformed_chunked_body_gets_a_400_and_a_record_that_says_so() {
    let dir = tempdir();
    let origin = Origin::http();
    let proxy = start(dir.path(), origin.port);
    let p = origin.port;
    let req = format!("POST http://upload.test:{p}/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
    let out = raw_request(proxy.addr, req.as_bytes());
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(header(&out, "X-Tank-Refused-By"), Some("bad-request"));
    assert!(out.contains("malformed chunked request body"), "{out}");
    let r = &proxy.wait_records(1)[0];
    assert!(
        r["unmapped"]["error"]
            .as_str()
            .unwrap()
            .contains("malformed chunked request body; answered 400"),
        "{r}"
    );
}
