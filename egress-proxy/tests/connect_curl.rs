//! curl through the proxy (CONNECT) to a local TLS origin with a throwaway CA: allowed and
//! refused by domain and port, over IPv4 and IPv6 listeners, with the audit record and the
//! metrics each exchange leaves.

mod common;
use common::*;

fn policy(origin_port: u16) -> String {
    format!(
        r#"allowed_domains = [
  {{ domain = "origin.test", ports = [{origin_port}], allow_private = true }},
  {{ domain = "*.origin.test", ports = [{origin_port}], allow_private = true }},
]
denied_domains = ["blocked.origin.test"]
[hosts]
"origin.test" = "127.0.0.1"
"api.origin.test" = "127.0.0.1"
"blocked.origin.test" = "127.0.0.1"
"other.test" = "127.0.0.1"
"#
    )
}

fn curl_via(proxy: &str, ca: &std::path::Path, url: &str) -> (i32, String, String) {
    curl(&["-v", "--cacert", ca.to_str().unwrap(), "-x", proxy, url])
}

#[test]
fn curl_reaches_an_allowed_tls_origin_through_a_tunnel() {
    let dir = tempdir();
    let origin = Origin::tls(dir.path(), &["origin.test", "api.origin.test"]);
    let proxy = Proxy::start(dir.path(), &policy(origin.port));
    let ca = origin.ca_pem.clone().unwrap();

    let (code, body, err) = curl_via(
        &proxy.url(),
        &ca,
        &format!("https://origin.test:{}/hello", origin.port),
    );
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(body, "hello from the origin: /hello body=0\n");
    // A subdomain through the wildcard rule, via the IPv6 listener.
    let (code, body, err) = curl_via(
        &format!("http://{}", proxy.addr6),
        &ca,
        &format!("https://API.Origin.Test.:{}/v6", origin.port),
    );
    assert_eq!(code, 0, "curl over the IPv6 listener failed: {err}");
    assert_eq!(body, "hello from the origin: /v6 body=0\n");
    assert_eq!(origin.served(), 2);

    let records = proxy.wait_records(2);
    let r = &record_where(&records, &[("/dst_endpoint/hostname", "origin.test")]);
    assert_eq!(r["class_uid"], 4001);
    assert_eq!(r["category_uid"], 4);
    // The closing record (Close), linked to the opening record (Open) written before the 200.
    assert_eq!(r["activity_id"], 2);
    assert_eq!(r["type_uid"], 400102);
    let opening = read_chain(&proxy.audit)
        .into_iter()
        .find(|o| o["metadata"]["sequence"] == r["unmapped"]["closes"])
        .expect("the opening record the closing record names");
    assert_eq!(opening["unmapped"]["opens"], true);
    assert_eq!(opening["activity_id"], 1);
    assert_eq!(opening["start_time"], r["start_time"]);
    assert_eq!(opening["src_endpoint"], r["src_endpoint"]);
    assert_eq!(opening["unmapped"]["rule"], r["unmapped"]["rule"]);
    assert!(opening["end_time"].is_null() && opening.get("traffic").is_none());
    assert_eq!(r["action"], "Allowed");
    assert_eq!(r["action_id"], 1);
    assert_eq!(r["disposition"], "Allowed");
    assert_eq!(r["disposition_id"], 1);
    assert_eq!(r["metadata"]["product"]["name"], "egress-proxy");
    assert_eq!(r["metadata"]["product"]["vendor_name"], "tank");
    assert_eq!(r["metadata"]["version"], "1.1.0");
    assert_eq!(r["metadata"]["log_name"], "proxy");
    assert!(r["device"]["hostname"].is_string());
    assert_eq!(r["src_endpoint"]["ip"], "127.0.0.1");
    assert!(r["src_endpoint"]["port"].as_u64().unwrap() > 0);
    assert_eq!(r["proxy"]["ip"], "127.0.0.1");
    assert_eq!(r["proxy"]["port"], proxy.addr.port());
    assert_eq!(r["dst_endpoint"]["hostname"], "origin.test");
    assert_eq!(r["dst_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(r["dst_endpoint"]["port"], origin.port);
    assert_eq!(r["connection_info"]["protocol_name"], "tcp");
    assert_eq!(r["connection_info"]["protocol_num"], 6);
    assert_eq!(r["connection_info"]["direction_id"], 2);
    // TLS handshake plus request/response: well over a few hundred bytes each way.
    assert!(r["traffic"]["bytes_in"].as_u64().unwrap() > 500, "{r}");
    assert!(r["traffic"]["bytes_out"].as_u64().unwrap() > 200, "{r}");
    assert_eq!(r["unmapped"]["kind"], "connect");
    assert_eq!(
        r["unmapped"]["rule"],
        format!("allowed_domains:origin.test:{}", origin.port)
    );
    assert!(r["unmapped"]["error"].is_null(), "{r}");
    let (start, end, time) = (
        r["start_time"].as_u64().unwrap(),
        r["end_time"].as_u64().unwrap(),
        r["time"].as_u64().unwrap(),
    );
    assert!(start <= end && time == end && r["duration"].as_u64().unwrap() == end - start);
    assert!(r.get("url").is_none());
    // The IPv6 one: the client and proxy ends are IPv6, the canonical host is recorded.
    let v6 = record_where(&records, &[("/dst_endpoint/hostname", "api.origin.test")]);
    assert_eq!(v6["src_endpoint"]["ip"], "::1");
    assert_eq!(v6["proxy"]["port"], proxy.addr6.port());
    assert_eq!(
        v6["unmapped"]["rule"],
        format!("allowed_domains:*.origin.test:{}", origin.port)
    );

    assert_eq!(
        proxy.metric("egress_proxy_requests_total{decision=\"allowed\",kind=\"connect\"}"),
        2.0
    );
    assert_eq!(proxy.metric("egress_proxy_active_tunnels"), 0.0);
    assert!(proxy.metric("egress_proxy_bytes_total{direction=\"in\"}") > 1000.0);
}

#[test]
fn curl_is_refused_by_domain_and_port_with_a_header_naming_the_rule() {
    let dir = tempdir();
    let origin = Origin::tls(
        dir.path(),
        &["origin.test", "blocked.origin.test", "other.test"],
    );
    let proxy = Proxy::start(dir.path(), &policy(origin.port));
    let ca = origin.ca_pem.clone().unwrap();

    // denied_domains wins over the allowing wildcard.
    let (code, _, err) = curl_via(
        &proxy.url(),
        &ca,
        &format!("https://blocked.origin.test:{}/", origin.port),
    );
    assert_ne!(code, 0);
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    assert!(
        err.contains("< X-Tank-Refused-By: denied_domains:blocked.origin.test"),
        "{err}"
    );
    // A domain no rule names.
    let (code, _, err) = curl_via(
        &proxy.url(),
        &ca,
        &format!("https://other.test:{}/", origin.port),
    );
    assert_ne!(code, 0);
    assert!(err.contains("< X-Tank-Refused-By: default-deny"), "{err}");
    // An allowed domain on a port no rule allows (443 is only the default of other rules).
    let (code, _, err) = curl_via(&proxy.url(), &ca, "https://origin.test:443/");
    assert_ne!(code, 0);
    assert!(
        err.contains("< X-Tank-Refused-By: port-not-allowed"),
        "{err}"
    );
    assert_eq!(origin.served(), 0, "a refused request reached the origin");

    let records = proxy.wait_records(3);
    let rules: Vec<&str> = records
        .iter()
        .map(|r| r["unmapped"]["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            "denied_domains:blocked.origin.test",
            "default-deny",
            "port-not-allowed"
        ]
    );
    for r in &records {
        assert_eq!(r["activity_id"], 5);
        assert_eq!(r["type_uid"], 400105);
        assert_eq!(r["action"], "Denied");
        assert_eq!(r["action_id"], 2);
        assert_eq!(r["disposition"], "Blocked");
        assert_eq!(r["disposition_id"], 2);
        assert!(r["dst_endpoint"]["ip"].is_null());
        assert_eq!(r["unmapped"]["kind"], "connect");
        assert!(r["unmapped"]["error"].is_string());
    }
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"denied-domain\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"default-deny\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"port-not-allowed\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_requests_total{decision=\"denied\",kind=\"any\"}"),
        3.0
    );
}
