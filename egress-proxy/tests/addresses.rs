//! Names and addresses: a name resolving to a private address is refused unless its rule
//! allows private addresses; IP literals need a rule naming them; metadata addresses are
//! never reached; malformed and disguised targets are refused; names are canonicalised;
//! clients outside client_networks are refused.

mod common;
use common::*;

fn refused_by(head: &str) -> &str {
    header(head, "X-Tank-Refused-By").unwrap_or_else(|| panic!("no X-Tank-Refused-By in:\n{head}"))
}

#[test]
fn a_name_resolving_to_a_private_address_is_refused_unless_allowed() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start(
        dir.path(),
        &format!(
            r#"allowed_domains = [
  "internal.test:{p}",
  {{ domain = "lab.test", ports = [{p}], allow_private = true }},
  {{ domain = "metadata.test", ports = [{p}], allow_private = true }},
  {{ domain = "unspecified.test", ports = [{p}], allow_private = true }},
  "nowhere.test:{p}",
]
[hosts]
"internal.test" = "127.0.0.1"
"lab.test" = ["::1", "127.0.0.1"]
"metadata.test" = "169.254.169.254"
"unspecified.test" = "0.0.0.0"
"#
        ),
    );
    let (_, head) = connect_tunnel(proxy.addr, &format!("internal.test:{p}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(refused_by(&head), "private-address");
    assert!(head.contains("127.0.0.1 is loopback"), "{head}");
    // Cloud metadata and 0.0.0.0 are never reached, not even with allow_private.
    let (_, head) = connect_tunnel(proxy.addr, &format!("metadata.test:{p}"));
    assert_eq!(refused_by(&head), "forbidden-address", "{head}");
    let (_, head) = connect_tunnel(proxy.addr, &format!("unspecified.test:{p}"));
    assert_eq!(refused_by(&head), "forbidden-address", "{head}");
    assert_eq!(origin.served(), 0);

    // allow_private: the first checked address that accepts is used (::1 has no listener,
    // 127.0.0.1 does), and exactly that address is recorded.
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("lab.test:{p}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    use std::io::{Read, Write};
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    drop(s);
    assert_eq!(origin.served(), 1);

    // A name neither in [hosts] nor resolvable (system resolver off) is a 502, not a 403.
    let (_, head) = connect_tunnel(proxy.addr, &format!("nowhere.test:{p}"));
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(header(&head, "X-Tank-Error"), Some("resolve"));

    let records = proxy.wait_records(5);
    let by_host = |h: &str| record_where(&records, &[("/dst_endpoint/hostname", h)]);
    let internal = by_host("internal.test");
    assert_eq!(internal["unmapped"]["rule"], "private-address");
    assert!(internal["dst_endpoint"]["ip"].is_null());
    let lab = by_host("lab.test");
    assert_eq!(lab["action"], "Allowed");
    assert_eq!(lab["dst_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(lab["traffic"]["bytes_in"], 4);
    assert_eq!(lab["traffic"]["bytes_out"], 4);
    let nowhere = by_host("nowhere.test");
    assert_eq!(nowhere["action"], "Allowed");
    assert!(nowhere["unmapped"]["error"]
        .as_str()
        .unwrap()
        .contains("not in [hosts]"));
}

#[test]
fn ip_literals_are_refused_unless_a_rule_names_them() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start(
        dir.path(),
        &format!(
            r#"allowed_domains = [
  {{ domain = "127.0.0.1", ports = [{p}], allow_private = true }},
  "127.0.0.2:{p}",
]
"#
        ),
    );
    let (_, head) = connect_tunnel(proxy.addr, &format!("127.0.0.3:{p}"));
    assert_eq!(refused_by(&head), "ip-literal", "{head}");
    let (_, head) = connect_tunnel(proxy.addr, &format!("[::1]:{p}"));
    assert_eq!(refused_by(&head), "ip-literal", "{head}");
    // Named, but loopback without allow_private.
    let (_, head) = connect_tunnel(proxy.addr, &format!("127.0.0.2:{p}"));
    assert_eq!(refused_by(&head), "private-address", "{head}");
    // Disguised forms of 127.0.0.1 are malformed targets, not matches.
    for disguised in [
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "[::ffff:7f00:1]x",
    ] {
        let (_, head) = connect_tunnel(proxy.addr, &format!("{disguised}:{p}"));
        assert!(head.starts_with("HTTP/1.1 400"), "{disguised}: {head}");
        assert_eq!(refused_by(&head), "bad-request");
    }
    assert_eq!(origin.served(), 0);
    let (s, head) = connect_tunnel(proxy.addr, &format!("127.0.0.1:{p}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(s);
    let records = proxy.wait_records(9);
    let allowed: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "Allowed")
        .collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(
        allowed[0]["unmapped"]["rule"],
        format!("allowed_domains:127.0.0.1:{p}")
    );
    assert_eq!(allowed[0]["dst_endpoint"]["hostname"], "127.0.0.1");
}

#[test]
fn names_are_canonicalised_before_matching() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start(
        dir.path(),
        &format!(
            r#"allowed_domains = [{{ domain = "bücher.test", ports = [{p}], allow_private = true }}, {{ domain = "origin.test", ports = [{p}], allow_private = true }}]
[hosts]
"BÜCHER.test" = "127.0.0.1"
"origin.test" = "127.0.0.1"
"#
        ),
    );
    for spelling in [
        "ORIGIN.test",
        "origin.test.",
        "xn--bcher-kva.test",
        "XN--BCHER-KVA.TEST.",
    ] {
        let (s, head) = connect_tunnel(proxy.addr, &format!("{spelling}:{p}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{spelling}: {head}");
        drop(s);
    }
    for bad in [
        "origin..test",
        "-origin.test",
        "origin.test..",
        "ori gin.test",
        "origin.test:99999",
        "origin.test",
    ] {
        // "origin.test" alone has no port: CONNECT needs one.
        let (_, head) = connect_tunnel(proxy.addr, bad);
        assert!(head.starts_with("HTTP/1.1 400"), "{bad}: {head}");
    }
    let records = proxy.wait_records(10);
    let mut allowed: Vec<&str> = records
        .iter()
        .filter(|r| r["action"] == "Allowed")
        .map(|r| r["dst_endpoint"]["hostname"].as_str().unwrap())
        .collect();
    allowed.sort();
    assert_eq!(
        allowed,
        [
            "origin.test",
            "origin.test",
            "xn--bcher-kva.test",
            "xn--bcher-kva.test"
        ]
    );
}

#[test]
fn clients_outside_client_networks_are_refused_and_recorded() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    // Only 127.0.0.2 may use the proxy; the test connects from 127.0.0.1.
    let config = format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nadmin_listen = \"127.0.0.1:0\"\nclient_networks = [\"127.0.0.2/32\"]\naudit_log = \"{}\"\nsystem_resolver = false\nallowed_domains = [{{ domain = \"127.0.0.1\", ports = [{p}], allow_private = true }}]\n",
        dir.path().join("audit.jsonl").display()
    );
    let proxy = Proxy::start_raw(dir.path(), &config);
    let (_, head) = connect_tunnel(proxy.addr, &format!("127.0.0.1:{p}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(refused_by(&head), "client-network");
    // From 127.0.0.2 it works.
    let mut s = bind_connect("127.0.0.2", proxy.addr);
    use std::io::{Read, Write};
    write!(s, "CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    drop(s);
    // The origin's accept may trail the proxy's completed connect.
    wait_for(
        std::time::Duration::from_secs(10),
        "the origin to accept",
        || (origin.served() == 1).then_some(()),
    );
    let records = proxy.wait_records(2);
    assert_eq!(
        record_where(&records, &[("/unmapped/rule", "client-network")])["src_endpoint"]["ip"],
        "127.0.0.1"
    );
    let last = records
        .iter()
        .find(|r| r["action"] == "Allowed")
        .expect("an allowed record");
    assert_eq!(last["src_endpoint"]["ip"], "127.0.0.2");
}

/// Runs `ip ARGS` (in the calling thread's network namespace), panicking on failure.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (package iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_address_the_proxy_host_gains_after_start_is_its_own() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it gives the proxy a network namespace of its own and adds an address there (cargo xtask test runs it as root)"
    );
    // A thread in a new, anonymous network namespace: the proxy, the origin and every
    // address live there and vanish with it.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", "tp0", "type", "veth", "peer", "name", "tp1"]);
        ip(&["link", "set", "tp0", "up"]);
        ip(&["link", "set", "tp1", "up"]);
        // Listens on every address of the namespace, so whatever the proxy dials arrives.
        let origin = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        origin.set_nonblocking(true).unwrap();
        let p = origin.local_addr().unwrap().port();
        let dir = tempdir();
        // 100.200.0.1 is a public-class address: only being the proxy host's own makes it
        // private.
        let proxy = Proxy::start(
            dir.path(),
            &format!(
                "allowed_domains = [\"late.test:{p}\"]\n[hosts]\n\"late.test\" = \"100.200.0.1\"\n"
            ),
        );
        let (_, head) = connect_tunnel(proxy.addr, &format!("late.test:{p}"));
        assert!(
            head.starts_with("HTTP/1.1 502"),
            "not yet an address of the host, and unroutable: {head}"
        );

        ip(&["addr", "add", "100.200.0.1/32", "dev", "tp0"]);
        // The change reaches the proxy as a netlink event; allow it a moment to arrive.
        wait_for(
            std::time::Duration::from_secs(10),
            "the proxy to see its new address",
            || {
                let (_, head) = connect_tunnel(proxy.addr, &format!("late.test:{p}"));
                (!head.starts_with("HTTP/1.1 200")).then_some(())
            },
        );
        while origin.accept().is_ok() {} // anything that arrived before the event
        let (_, head) = connect_tunnel(proxy.addr, &format!("late.test:{p}"));
        assert_eq!(refused_by(&head), "private-address", "{head}");
        assert!(head.contains("100.200.0.1 is local-interface"), "{head}");
        match origin.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => {
                panic!("the origin was reached through the proxy host's own address: {other:?}")
            }
        }
    })
    .join()
    .expect("the test thread");
}
