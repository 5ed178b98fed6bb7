//! Limits, each with its own answer and log line: request head size, head read timeout
//! (slowloris), idle tunnels, per-client and global connection caps, outsiders judged at
//! accept, the admin listener's connection cap.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn body(p: u16, limits: &str) -> String {
    format!("allowed_domains = [{{ domain = \"a.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"a.test\" = \"127.0.0.1\"\n[limits]\n{limits}")
}

#[test]
fn an_oversized_head_gets_431_and_a_slow_one_408() {
    let dir = tempdir();
    let origin = Origin::echo();
    let proxy = Proxy::start(
        dir.path(),
        &body(
            origin.port,
            "max_header_bytes = 2048\nheader_read_timeout_secs = 1\n",
        ),
    );

    let big = format!(
        "CONNECT a.test:{} HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        origin.port,
        "p".repeat(4000)
    );
    let out = raw_request(proxy.addr, big.as_bytes());
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(header(&out, "X-Tank-Refused-By"), Some("header-too-large"));

    // Slowloris: half a head, then nothing.
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT a.test:1 HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let took = start.elapsed();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(header(&out, "X-Tank-Refused-By"), Some("header-timeout"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(origin.served(), 0);

    let log = proxy.log_text();
    assert!(log.contains("request head too large"), "{log}");
    assert!(log.contains("request head not received in time"), "{log}");
    let records = proxy.wait_records(2);
    assert_eq!(records[0]["unmapped"]["rule"], "header-too-large");
    assert_eq!(records[0]["unmapped"]["kind"], "invalid");
    assert_eq!(records[1]["unmapped"]["rule"], "header-timeout");
}

#[test]
fn an_idle_tunnel_is_closed_and_recorded() {
    let dir = tempdir();
    let origin = Origin::echo();
    let proxy = Proxy::start(dir.path(), &body(origin.port, "idle_timeout_secs = 1\n"));
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("a.test:{}", origin.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
    }
    // ...silence closes it.
    let start = Instant::now();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let r = &proxy.wait_records(1)[0];
    assert_eq!(r["unmapped"]["error"], "idle timeout");
    assert_eq!(r["traffic"]["bytes_out"], 4);
    assert_eq!(proxy.metric("egress_proxy_idle_timeouts_total"), 1.0);
    assert!(proxy.log_text().contains("closed after idle_timeout_secs"));
}

#[test]
fn connection_caps_refuse_with_429_and_503() {
    let dir = tempdir();
    let origin = Origin::echo();
    let proxy = Proxy::start(
        dir.path(),
        &body(
            origin.port,
            "max_connections_per_client = 2\nmax_connections = 3\n",
        ),
    );
    let auth = format!("a.test:{}", origin.port);
    let (a, h) = connect_tunnel(proxy.addr, &auth);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let (b, h) = connect_tunnel(proxy.addr, &auth);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    // A third from the same client address.
    let out = raw_request(
        proxy.addr,
        format!("CONNECT {auth} HTTP/1.1\r\n\r\n").as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
    assert_eq!(
        header(&out, "X-Tank-Refused-By"),
        Some("client-connection-limit")
    );
    // Another client address takes the last global slot; a fourth connection is over it.
    let v6 = |addr| {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut c = v6(proxy.addr6);
    write!(c, "CONNECT {auth} HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 12];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    let mut d = v6(proxy.addr6);
    write!(d, "CONNECT {auth} HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = d.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert_eq!(header(&out, "X-Tank-Refused-By"), Some("connection-limit"));
    let log = proxy.log_text();
    assert!(
        log.contains("(max_connections_per_client); refusing the connection"),
        "{log}"
    );
    assert!(
        log.contains("(max_connections); refusing the connection"),
        "{log}"
    );

    // Closing tunnels frees the slots.
    drop((a, b, c));
    wait_for(Duration::from_secs(10), "the slots to be freed", || {
        (proxy.metric("egress_proxy_active_connections") == 0.0).then_some(())
    });
    let (_, h) = connect_tunnel(proxy.addr, &auth);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"client-connection-limit\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"connection-limit\"}"),
        1.0
    );
}

#[test]
fn an_outsider_holding_a_thousand_idle_connections_costs_the_agent_nothing() {
    raise_nofile();
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    // The agent host is 127.0.0.1; 127.0.0.2 is an outsider.
    let config = format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nadmin_listen = \"127.0.0.1:0\"\nclient_networks = [\"127.0.0.1/32\"]\naudit_log = \"{}\"\nsystem_resolver = false\nallowed_domains = [{{ domain = \"a.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"a.test\" = \"127.0.0.1\"\n[limits]\nmax_connections = 200\n",
        dir.path().join("audit.jsonl").display()
    );
    let proxy = Proxy::start_raw(dir.path(), &config);
    let mut outsiders: Vec<TcpStream> = (0..1000)
        .map(|_| bind_connect("127.0.0.2", proxy.addr))
        .collect();
    let auth = format!("a.test:{p}");
    for i in 0..50 {
        let (_, head) = connect_tunnel(proxy.addr, &auth);
        assert!(head.starts_with("HTTP/1.1 200"), "agent tunnel {i}: {head}");
    }
    // Each outsider was answered and closed without sending a byte.
    for (i, s) in outsiders.iter_mut().enumerate() {
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("outsider {i} got no answer: {e}"));
        assert!(out.starts_with("HTTP/1.1 403"), "outsider {i}: {out}");
        assert_eq!(header(&out, "X-Tank-Refused-By"), Some("client-network"));
    }
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"client-network\"}"),
        1000.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"connection-limit\"}"),
        0.0
    );
}

#[test]
fn the_admin_listener_holds_a_bounded_number_of_connections() {
    raise_nofile();
    let dir = tempdir();
    let proxy = Proxy::start(dir.path(), "");
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.pid))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut held: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(proxy.admin).unwrap())
        .collect();
    // What the proxy closed at once reads as end of stream; what it keeps times out.
    let mut kept = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("the admin listener answered an idle connection"),
            Err(_) => kept += 1,
        }
    }
    assert!(
        kept <= 32,
        "the admin listener kept {kept} idle connections open"
    );
    assert!(
        fds() <= before + 40,
        "the proxy holds {} descriptors, {before} before",
        fds()
    );
    drop(held);
    wait_for(Duration::from_secs(10), "/healthz", || {
        let mut s = TcpStream::connect(proxy.admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(())
    });
}
