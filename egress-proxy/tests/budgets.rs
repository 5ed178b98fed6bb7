//! Exfiltration budgets, through the real proxy binary with real clients and an origin on
//! loopback that counts what arrives: a client just under its ceiling keeps working over
//! several windows; one that crosses it has its tunnel cut at the crossing (the bytes past
//! it measured at the origin) and its next requests refused `429`; plain-HTTP bodies and
//! request counts are held to their ceilings; `tunnel_secs` cuts a long tunnel; and neither
//! a reload nor a restart (after SIGKILL) resets the count.

mod common;
use common::https::{make_ca, CertKind, HttpsOrigin, TunnelClient};
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TCP origin that reads and counts everything each connection sends, answering nothing.
struct Sink {
    port: u16,
    bytes: Arc<AtomicU64>,
    closed: Arc<AtomicUsize>,
}

impl Sink {
    fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (bytes, closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)));
        let (b, c) = (bytes.clone(), closed.clone());
        // The thread ends with the test process; it only ever serves loopback.
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let (b, c) = (b.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Sink {
            port,
            bytes,
            closed,
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

fn rules(port: u16, budget: &str) -> String {
    format!(
        "allowed_domains = [{{ domain = \"up.test\", ports = [{port}], allow_private = true, name = \"up\", budget = {budget} }}]\n[hosts]\n\"up.test\" = \"127.0.0.1\"\n"
    )
}

fn tunnel(proxy: SocketAddr, port: u16) -> TcpStream {
    let (s, head) = connect_tunnel(proxy, &format!("up.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Writes `total` bytes in 64 KiB writes until the proxy cuts the tunnel; returns bytes the
/// socket accepted.
fn push_until_cut(s: &mut TcpStream, total: usize) -> usize {
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < total {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

const USED: &str =
    "egress_proxy_budget_used{rule=\"allowed_domains:up\",client=\"127.0.0.1\",kind=\"bytes_out\"}";

#[test]
fn just_under_the_ceiling_keeps_working_over_several_windows() {
    let dir = tempdir();
    let sink = Sink::start();
    let proxy = Proxy::start(
        dir.path(),
        &rules(
            sink.port,
            "{ bytes_out = \"64 KiB/2s\", requests = \"20/2s\" }",
        ),
    );
    // 6 KiB every 250 ms is 48 KiB per 2 s: at most nine sends (54 KiB) fall in a window and
    // its trailing bucket. Three windows and more, one long tunnel, new tunnels on the way.
    let mut s = tunnel(proxy.addr, sink.port);
    let piece = vec![b'u'; 6 << 10];
    let start = Instant::now();
    let mut sent = 0u64;
    for i in 0..28 {
        s.write_all(&piece)
            .unwrap_or_else(|e| panic!("send {i} refused after {sent} bytes: {e}"));
        sent += piece.len() as u64;
        if i % 4 == 0 {
            drop(tunnel(proxy.addr, sink.port));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(start.elapsed() >= Duration::from_secs(6));
    wait_for(Duration::from_secs(5), "every byte at the origin", || {
        (sink.bytes() == sent).then_some(())
    });
    assert!(
        sent > 2 * (64 << 10),
        "the test must outlast two windows' ceilings"
    );
    let used = proxy.metric(USED);
    assert!(used > 0.0 && used <= (64 << 10) as f64, "{used}");
    drop(s);
    let records = proxy.wait_records(8);
    assert!(
        records
            .iter()
            .all(|r| r["unmapped"]["budget"]["state"] != "exceeded"),
        "{records:#?}"
    );
    assert!(records.iter().all(|r| r["action"] == "Allowed"));
}

#[test]
fn crossing_the_ceiling_cuts_the_tunnel_there_and_refuses_what_follows() {
    let dir = tempdir();
    let sink = Sink::start();
    let limit: u64 = 256 << 10;
    let proxy = Proxy::start(
        dir.path(),
        &rules(sink.port, "{ bytes_out = \"256 KiB/h\" }"),
    );
    let mut s = tunnel(proxy.addr, sink.port);
    s.write_all(&[b'a'; 16 << 10]).unwrap();
    wait_for(Duration::from_secs(5), "the first 16 KiB", || {
        (sink.bytes() == 16 << 10).then_some(())
    });
    // Then 4 MiB as fast as the socket takes it: the proxy must stop at the ceiling.
    let accepted = push_until_cut(&mut s, 4 << 20);
    wait_for(Duration::from_secs(10), "the origin side closed", || {
        (sink.closed.load(Ordering::SeqCst) >= 1).then_some(())
    });
    let arrived = sink.bytes();
    let overshoot = arrived as i64 - limit as i64;
    eprintln!(
        "budget crossing: ceiling {limit} B, client pushed {} B, origin got {arrived} B, overshoot {overshoot} B",
        accepted + (16 << 10)
    );
    // Reads never ask for more than the room left: nothing past the ceiling arrives, and
    // everything up to it does. (The bound the design promises is one read buffer.)
    assert!(
        overshoot <= 1 << 20,
        "overshoot {overshoot} beyond one read buffer"
    );
    assert_eq!(arrived, limit, "the tunnel was not cut at the ceiling");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // New requests are refused 429, naming rule and kind, in JSON with when to retry.
    let (_, answer) = connect_tunnel(proxy.addr, &format!("up.test:{}", sink.port));
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert_eq!(
        header(&answer, "X-Tank-Refused-By"),
        Some("budget:allowed_domains:up:bytes_out")
    );
    let retry: u64 = header(&answer, "Retry-After").unwrap().parse().unwrap();
    assert!((1..=3600 + 225).contains(&retry), "{retry}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["reason"], "budget");
    assert_eq!(body["budget"]["limit"], limit);
    assert_eq!(body["budget"]["used"], limit);
    assert_eq!(body["budget"]["window_secs"], 3600);
    assert_eq!(
        sink.closed.load(Ordering::SeqCst),
        1,
        "the refused tunnel reached the origin"
    );

    // Each recorded with the budget and the figure that crossed it.
    let records = proxy.wait_records(2);
    let cut = record_where(&records, &[("/unmapped/rule", "allowed_domains:up")]);
    assert_eq!(cut["action"], "Allowed");
    assert_eq!(cut["traffic"]["bytes_out"], limit);
    assert_eq!(cut["unmapped"]["budget"]["state"], "exceeded");
    assert_eq!(cut["unmapped"]["budget"]["kind"], "bytes_out");
    assert_eq!(cut["unmapped"]["budget"]["used"], limit);
    assert!(
        cut["unmapped"]["error"]
            .as_str()
            .unwrap()
            .contains("cut by budget:allowed_domains:up:bytes_out"),
        "{cut:#}"
    );
    let refused = record_where(
        &records,
        &[("/unmapped/rule", "budget:allowed_domains:up:bytes_out")],
    );
    assert_eq!(refused["action"], "Denied");
    assert_eq!(refused["unmapped"]["budget"]["state"], "exceeded");

    // Metrics per rule and client; the 80% warning went to the log.
    assert_eq!(proxy.metric(USED), limit as f64);
    assert_eq!(proxy.metric(&USED.replace("used", "remaining")), 0.0);
    assert_eq!(
        proxy.metric("egress_proxy_budget_events_total{event=\"cut\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_budget_events_total{event=\"refused\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_budget_events_total{event=\"warning\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("egress_proxy_refusals_total{reason=\"budget\"}"),
        1.0
    );
    let log = proxy.log_text();
    assert!(
        log.contains("budget: client passed 80% of its ceiling"),
        "{log}"
    );
}

#[test]
fn plain_http_bodies_and_request_counts_are_held_to_their_ceilings() {
    let dir = tempdir();
    let web = Origin::http();
    let sink = Sink::start();
    let body = format!(
        "allowed_domains = [\n  {{ domain = \"web.test\", ports = [{}], allow_private = true, name = \"web\", budget = {{ bytes_out = \"8 KiB/h\" }} }},\n  {{ domain = \"up.test\", ports = [{}], allow_private = true, name = \"up\", budget = {{ requests = \"3/h\" }} }},\n]\n[hosts]\n\"web.test\" = \"127.0.0.1\"\n\"up.test\" = \"127.0.0.1\"\n",
        web.port, sink.port
    );
    let proxy = Proxy::start(dir.path(), &body);
    let post = |size: usize| {
        let req = format!(
            "POST http://web.test:{}/up HTTP/1.1\r\nHost: web.test\r\nContent-Length: {size}\r\n\r\n{}",
            web.port,
            "b".repeat(size)
        );
        raw_request(proxy.addr, req.as_bytes())
    };
    assert!(post(3000).starts_with("HTTP/1.1 200"));
    assert!(post(3000).starts_with("HTTP/1.1 200"));
    // A third would pass 8 KiB with its head: refused before a byte is forwarded.
    let third = post(3000);
    assert!(third.starts_with("HTTP/1.1 429"), "{third}");
    assert_eq!(
        header(&third, "X-Tank-Refused-By"),
        Some("budget:allowed_domains:web:bytes_out")
    );
    assert_eq!(web.served(), 2);

    for _ in 0..3 {
        drop(tunnel(proxy.addr, sink.port));
    }
    let (_, fourth) = connect_tunnel(proxy.addr, &format!("up.test:{}", sink.port));
    assert!(fourth.starts_with("HTTP/1.1 429"), "{fourth}");
    assert_eq!(
        header(&fourth, "X-Tank-Refused-By"),
        Some("budget:allowed_domains:up:requests")
    );
    wait_for(
        Duration::from_secs(5),
        "three tunnels at the origin",
        || (sink.closed.load(Ordering::SeqCst) == 3).then_some(()),
    );
}

#[test]
fn tunnel_secs_cuts_a_tunnel_that_stays_open_too_long() {
    let dir = tempdir();
    let sink = Sink::start();
    let proxy = Proxy::start(dir.path(), &rules(sink.port, "{ tunnel_secs = 1 }"));
    let start = Instant::now();
    let mut s = tunnel(proxy.addr, sink.port);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let records = proxy.wait_records(1);
    assert_eq!(records[0]["unmapped"]["budget"]["kind"], "tunnel_secs");
    assert_eq!(records[0]["unmapped"]["budget"]["limit"], 1);
    assert_eq!(records[0]["unmapped"]["budget"]["state"], "exceeded");
}

#[test]
fn neither_a_reload_nor_a_restart_resets_the_count() {
    let dir = tempdir();
    let sink = Sink::start();
    let limit: u64 = 256 << 10;
    let config = rules(sink.port, "{ bytes_out = \"256 KiB/h\" }");
    let mut proxy = Proxy::start(dir.path(), &config);
    let mut s = tunnel(proxy.addr, sink.port);
    s.write_all(&vec![b'r'; 200 << 10]).unwrap();
    drop(s);
    wait_for(Duration::from_secs(5), "200 KiB at the origin", || {
        (sink.bytes() == 200 << 10).then_some(())
    });
    // A reload (even one that changes the rule's other settings) keeps the count.
    proxy.reload_with(&config_text(
        dir.path(),
        &rules(
            sink.port,
            "{ bytes_out = \"256 KiB/h\", requests = \"100/h\" }",
        ),
    ));
    assert_eq!(proxy.metric(USED), (200 << 10) as f64);

    // Killed without a goodbye, once the state has had its second to be saved.
    std::thread::sleep(Duration::from_millis(1500));
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    proxy.wait_exit(Duration::from_secs(10));
    assert!(Path::new(&format!("{}.budgets", proxy.audit.display())).exists());
    let proxy = Proxy::start(dir.path(), &config);
    assert_eq!(proxy.metric(USED), (200 << 10) as f64);

    // What is left is 56 KiB: the next tunnel is cut there.
    let mut s = tunnel(proxy.addr, sink.port);
    push_until_cut(&mut s, 1 << 20);
    wait_for(Duration::from_secs(10), "the second tunnel closed", || {
        (sink.closed.load(Ordering::SeqCst) >= 2).then_some(())
    });
    assert_eq!(
        sink.bytes(),
        limit,
        "the restart gave the client a fresh budget"
    );
    let (_, answer) = connect_tunnel(proxy.addr, &format!("up.test:{}", sink.port));
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
}

#[test]
fn check_names_a_bad_budget_by_file_line_and_column() {
    let dir = tempdir();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        config_text(
            dir.path(),
            "allowed_domains = [\n  { domain = \"up.test\", budget = { bytes_out = \"20 MiB/hr2\" } },\n]\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("{}:7:48: budget `bytes_out`", file.display())),
        "{err}"
    );
}

#[test]
fn requests_inside_an_inspected_tunnel_are_charged_one_by_one() {
    let dir = tempdir();
    let origin = HttpsOrigin::start(
        dir.path(),
        &["api.github.test"],
        &["h2"],
        CertKind::Good,
        None,
    );
    let body = format!(
        "allowed_domains = [{{ domain = \"api.github.test\", ports = [{p}], inspect = true, allow_private = true, name = \"api\", budget = {{ requests = \"2/h\" }} }}]\n[hosts]\n\"api.github.test\" = \"127.0.0.1\"\n[inspection]\nca_dir = \"{ca}\"\nupstream_ca = \"{up}\"\n",
        p = origin.port,
        ca = make_ca(dir.path(), "ca", &["github.test"]).display(),
        up = origin.ca_pem.display(),
    );
    let proxy = Proxy::start(dir.path(), &body);
    let ca = dir.path().join("ca/ca.pem");
    let auth = format!("api.github.test:{}", origin.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = TunnelClient::open(proxy.addr, &auth, "api.github.test", &ca, &["h2"])
            .await
            .unwrap();
        for _ in 0..2 {
            let ok = c.send("GET", "/repos/o/r", &[], None).await.unwrap();
            assert_eq!(ok.status, 200, "{ok:?}");
        }
        // The third request of the hour is refused inside the tunnel, which stays open.
        let no = c
            .send("GET", "/repos/o/r", &[("accept", "application/json")], None)
            .await
            .unwrap();
        assert_eq!(no.status, 429, "{no:?}");
        assert_eq!(
            no.header("x-tank-refused-by"),
            Some("budget:allowed_domains:api:requests")
        );
        assert!(no.header("retry-after").is_some(), "{no:?}");
        let json: serde_json::Value = serde_json::from_str(&no.body).unwrap();
        assert_eq!(json["budget"]["limit"], 2);
        let again = c.send("GET", "/repos/o/r", &[], None).await.unwrap();
        assert_eq!(again.status, 429);
    });
    assert_eq!(
        origin.seen().len(),
        2,
        "a refused request reached the origin"
    );
    let records = proxy.wait_records(4);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["unmapped"]["rule"] == "budget:allowed_domains:api:requests")
        .collect();
    assert_eq!(refused.len(), 2, "{records:#?}");
    assert_eq!(refused[0]["class_uid"], 4002);
    assert_eq!(refused[0]["unmapped"]["budget"]["used"], 2);
}

#[test]
fn tunnels_crossing_at_once_overshoot_by_at_most_one_read_each() {
    let dir = tempdir();
    let sink = Sink::start();
    let limit: u64 = 1 << 20;
    let proxy = Proxy::start(dir.path(), &rules(sink.port, "{ bytes_out = \"1 MiB/h\" }"));
    const TUNNELS: usize = 3;
    // All open before any sends, then all pushing at once.
    let streams: Vec<TcpStream> = (0..TUNNELS)
        .map(|_| tunnel(proxy.addr, sink.port))
        .collect();
    let pushers: Vec<_> = streams
        .into_iter()
        .map(|mut s| std::thread::spawn(move || push_until_cut(&mut s, 16 << 20)))
        .collect();
    for p in pushers {
        p.join().unwrap();
    }
    wait_for(Duration::from_secs(10), "every tunnel cut", || {
        (sink.closed.load(Ordering::SeqCst) == TUNNELS).then_some(())
    });
    let arrived = sink.bytes();
    let overshoot = arrived.saturating_sub(limit);
    eprintln!("{TUNNELS} tunnels at once: ceiling {limit} B, origin got {arrived} B, overshoot {overshoot} B");
    assert!(arrived >= limit, "cut before the ceiling: {arrived}");
    // Each tunnel may have had one read in flight (at most the room it saw, ≤ 1 MiB).
    assert!(
        overshoot <= (TUNNELS as u64 - 1) * limit,
        "overshoot {overshoot} beyond one read per tunnel"
    );
    let records = proxy.wait_records(TUNNELS);
    assert!(records
        .iter()
        .all(|r| r["unmapped"]["budget"]["state"] == "exceeded"));
}
