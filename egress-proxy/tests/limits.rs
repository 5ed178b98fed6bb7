//! Limits, each with its own answer and log line: request head size, head read timeout
//! (slowloris), idle tunnels, per-client and global connection caps, outsiders judged at
//! accept, the admin listener's connection cap, and a low open-files limit.

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

/// A config whose only client network is 127.0.0.1 (127.0.0.2 is an outsider), allowing
/// `a.test:PORT` (loopback), with `limits` in its `[limits]` table.
fn agent_only(dir: &std::path::Path, port: u16, limits: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nadmin_listen = \"127.0.0.1:0\"\nclient_networks = [\"127.0.0.1/32\"]\naudit_log = \"{}\"\nsystem_resolver = false\n{}",
        dir.join("audit.jsonl").display(),
        body(port, limits)
    )
}

#[test]
fn an_outsider_holding_a_thousand_idle_connections_costs_the_agent_nothing() {
    raise_nofile();
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    // The agent host is 127.0.0.1; 127.0.0.2 is an outsider.
    let proxy = Proxy::start_raw(
        dir.path(),
        &agent_only(dir.path(), p, "max_connections = 200\n"),
    );
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
    let held: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(proxy.admin).unwrap())
        .collect();
    // The proxy closes what is past its cap as it accepts it: within 3 s (well inside the
    // old 5 s read timeout) all but at most 32 read as closed, and its descriptors stay
    // within 40 of where they were.
    for s in &held {
        s.set_nonblocking(true).unwrap();
    }
    let closed = |held: &[TcpStream]| {
        held.iter()
            .filter(|s| matches!(s.peek(&mut [0u8; 1]), Ok(0)))
            .count()
    };
    wait_for(
        Duration::from_secs(3),
        "the admin listener to close what is past its cap",
        || (held.len() - closed(&held) <= 32).then_some(()),
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

#[test]
fn at_a_low_open_files_limit_every_client_gets_an_answer() {
    raise_nofile();
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start_limited(dir.path(), &agent_only(dir.path(), p, ""), Some(600));
    let log = proxy.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("max_connections = 8192 needs"))
        .unwrap_or_else(|| panic!("no line about lowering max_connections:\n{log}"));
    let cap: usize = line
        .split("lowered to ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((40..100).contains(&cap), "{line}");

    // 150 tunnels held open, each carrying a byte both ways (so each holds its pipes too).
    let auth = format!("a.test:{p}");
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..150 {
        let (mut s, head) = connect_tunnel(proxy.addr, &auth);
        if head.starts_with("HTTP/1.1 200") {
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            open.push(s);
        } else {
            assert!(head.starts_with("HTTP/1.1 503"), "tunnel {i}: {head}");
            refused += 1;
        }
    }
    assert_eq!(open.len(), cap);
    assert_eq!(refused, 150 - cap);

    // Past the descriptors themselves: 400 connections at once, each answered, none hangs.
    let burst: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(proxy.addr).ok())
        .collect();
    for (i, mut s) in burst.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"CONNECT a.test:1 HTTP/1.1\r\n\r\n");
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => {}
            // A reset after the answer was read counts as answered.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection {i} got no answer: {e}"),
        }
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 503"),
            "connection {i}: {out}"
        );
    }
    let log = proxy.log_text();
    let warnings = log.matches("accept failed").count();
    assert!(warnings <= 10, "{warnings} accept warnings:\n{log}");
    assert!(
        !log.contains("audit log could not be"),
        "the audit log ran out of descriptors:\n{log}"
    );

    drop(open);
    wait_for(Duration::from_secs(10), "the tunnels to close", || {
        (proxy.metric("egress_proxy_active_connections") == 0.0).then_some(())
    });
    let (_, head) = connect_tunnel(proxy.addr, &auth);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Descriptors exhausted under the proxy's feet: its limit lowered to just above its
    // spare descriptor (the last /dev/null it opened). Connections held open fill what
    // is free below it; from then on the spare answers each, and nothing hangs.
    let fd_dir = format!("/proc/{}/fd", proxy.pid);
    let spare: u64 = std::fs::read_dir(&fd_dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            (std::fs::read_link(e.path()).ok()? == std::path::Path::new("/dev/null"))
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .max()
        .expect("the spare descriptor");
    set_nofile(proxy.pid, spare + 1);
    // Connections held open fill what is free below the limit; once the spare has answered
    // one, the next are read and closed, as clients do, and each must be answered.
    let mut held = Vec::new();
    // Answers that name the exhaustion: from the spare (503), or, when a descriptor was
    // freed just in time for the client's socket, the origin connect failing (502).
    let (mut spare_answers, mut exhausted_answers) = (0, 0);
    for i in 0..100 {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(format!("CONNECT {auth} HTTP/1.1\r\n\r\n").as_bytes());
        let mut head = [0u8; 512];
        match s.read(&mut head) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&head[..n]);
                assert!(text.starts_with("HTTP/1.1 "), "connection {i}: {text}");
                spare_answers += usize::from(text.contains("out of file descriptors"));
                exhausted_answers += usize::from(
                    text.contains("out of file descriptors")
                        || text.contains("Too many open files"),
                );
            }
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "connection {i} got no answer: {e}\n{}",
                proxy.log_text()
            ),
        }
        // Held until the spare has answered (a 502's descriptor is the proxy's again after
        // its linger, so holding cannot starve it); then read and closed.
        if spare_answers == 0 {
            held.push(s);
        } else if exhausted_answers >= 10 {
            break;
        }
    }
    assert!(
        exhausted_answers >= 10 && spare_answers >= 1,
        "{exhausted_answers} answers named the exhaustion, {spare_answers} of them from the spare descriptor"
    );
    let log = proxy.log_text();
    let warnings = log.matches("accept failed").count();
    assert!(warnings <= 10, "{warnings} accept warnings:\n{log}");
    set_nofile(proxy.pid, 600);
    drop(held);
}

/// Sets a running process's open-files limit (soft; the hard limit stays 600).
fn set_nofile(pid: u32, soft: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: 600,
    };
    // SAFETY: prlimit(2) on our child's pid with a valid rlimit.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}
