//! Name resolution through the proxy's own asynchronous resolver, against a DNS server this
//! test runs on loopback (never the host's resolver): slow names do not make a fast allowed
//! name fail, each lookup has its own timeout, and lookups in flight are bounded.

mod common;
use common::*;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A DNS server on 127.0.0.1: names under `fast.dns.test` get A 127.0.0.1 (and an empty
/// AAAA answer) at once; names starting `slow` are never answered. Stopped when dropped.
struct Dns {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    /// Every name asked (lowercase, no trailing dot) and when, in order.
    asked: Arc<Mutex<Vec<(std::time::Instant, String)>>>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Dns {
    fn start() -> Dns {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let socket = rt
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        // Room for a burst of hundreds of questions while this thread is slow to run.
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a valid c_int on our socket; failure only shrinks the room.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        rt.spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                log.lock()
                    .unwrap()
                    .push((std::time::Instant::now(), name.clone()));
                if name.starts_with("slow") {
                    continue;
                }
                let a = name.ends_with("fast.dns.test") && qtype == 1;
                let mut out = Vec::with_capacity(qend + 16);
                out.extend_from_slice(&buf[..2]); // id
                out.extend_from_slice(&[0x81, 0x80]); // response, RD, RA, NOERROR
                out.extend_from_slice(&[0, 1, 0, u8::from(a), 0, 0, 0, 0]);
                out.extend_from_slice(&buf[12..qend]);
                if a {
                    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
                }
                let _ = socket.send_to(&out, from).await;
            }
        });
        Dns {
            runtime: Some(rt),
            addr,
            asked,
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }
}

/// The question's name, type, and where it ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

/// An echo origin, the DNS server, and a proxy resolving `*.dns.test` through it only, with
/// `extra` in its `[resolver]` table (and any tables after).
fn start(extra: &str) -> (tempfile::TempDir, Origin, Dns, Proxy) {
    let dir = tempdir();
    let origin = Origin::echo();
    let dns = Dns::start();
    let config = format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nadmin_listen = \"127.0.0.1:0\"\nclient_networks = [\"127.0.0.0/8\"]\naudit_log = \"{}\"\nsystem_resolver = true\nallowed_domains = [{{ domain = \"*.dns.test\", ports = [{}], allow_private = true }}]\n[resolver]\nnameservers = [\"{}\"]\n{extra}",
        dir.path().join("audit.jsonl").display(),
        origin.port,
        dns.addr
    );
    let proxy = Proxy::start_raw(dir.path(), &config);
    (dir, origin, dns, proxy)
}

fn send_connect(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "CONNECT {authority} HTTP/1.1\r\n\r\n").unwrap();
    s
}

fn answer(mut s: TcpStream) -> String {
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn six_hundred_slow_lookups_do_not_make_a_fast_name_fail() {
    raise_nofile();
    // The slow lookups stay pending for the whole test (their timeout is
    // lookups_in_flight_are_bounded's to show), however slowly a loaded machine runs it.
    let (_dir, origin, dns, proxy) =
        start("lookup_timeout_secs = 60\n[limits]\nconnect_timeout_secs = 120\n");
    let p = origin.port;
    let slow: Vec<TcpStream> = (0..600)
        .map(|i| send_connect(proxy.addr, &format!("slow-{i}.dns.test:{p}")))
        .collect();
    let start = std::time::Instant::now();
    loop {
        let names: HashSet<String> = dns
            .asked()
            .into_iter()
            .filter(|n| n.starts_with("slow"))
            .collect();
        if names.len() == 600 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of 600 slow names were asked:\n{}",
            names.len(),
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // While all 600 are pending, a fast allowed name resolves and its tunnel works.
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("www.fast.dns.test:{p}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    drop(s);
    for (i, s) in slow.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("slow lookup {i} was no longer pending: {other:?}"),
        }
    }
    let records = proxy.wait_records(1);
    let fast = record_where(&records, &[("/dst_endpoint/hostname", "www.fast.dns.test")]);
    assert_eq!(fast["action"], "Allowed");
    assert_eq!(fast["dst_endpoint"]["ip"], "127.0.0.1");
}

#[test]
fn lookups_in_flight_are_bounded() {
    let (_dir, origin, dns, proxy) = start(
        "lookup_timeout_secs = 1\nmax_concurrent_lookups = 10\n[limits]\nconnect_timeout_secs = 1.5\n",
    );
    let p = origin.port;
    let slow: Vec<TcpStream> = (0..50)
        .map(|i| send_connect(proxy.addr, &format!("slow-{i}.dns.test:{p}")))
        .collect();
    let outs: Vec<String> = slow.into_iter().map(answer).collect();
    for out in &outs {
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    }
    // A lookup holds its slot for up to its 1 s timeout: in the first half second after the
    // first question, only names holding one of the ten slots reached the server.
    let asked = dns.asked.lock().unwrap().clone();
    let first = asked[0].0;
    let early: HashSet<&str> = asked
        .iter()
        .filter(|(t, _)| t.duration_since(first) < Duration::from_millis(500))
        .map(|(_, n)| n.as_str())
        .collect();
    assert!(!early.is_empty() && early.len() <= 10, "{early:?}");
    let busy = outs
        .iter()
        .filter(|o| o.contains("every lookup slot was busy"))
        .count();
    assert!(busy > 0, "no lookup waited for a slot: {outs:?}");
    let names: HashSet<String> = dns.asked().into_iter().collect();
    assert!(names.len() < 50, "every name was asked: {names:?}");
}
