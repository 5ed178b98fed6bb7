//! Graceful shutdown on SIGTERM: listeners close at once, open tunnels keep working until
//! they end or the grace period runs out, every connection is recorded, the log verifies.

mod common;
use common::*;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn body(p: u16, grace: &str) -> String {
    format!("allowed_domains = [{{ domain = \"a.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"a.test\" = \"127.0.0.1\"\n[limits]\nshutdown_grace_secs = {grace}\n")
}

fn echo_once(s: &mut std::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

#[test]
fn sigterm_drains_open_tunnels_then_exits_cleanly() {
    let dir = tempdir();
    let origin = Origin::echo();
    let mut proxy = Proxy::start(dir.path(), &body(origin.port, "30"));
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("a.test:{}", origin.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_once(&mut s, b"before");

    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for(Duration::from_secs(10), "the drain to start", || {
        proxy.log_text().contains("draining").then_some(())
    });
    // No new connections...
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "still accepting after SIGTERM"
    );
    // ...but the open tunnel still relays.
    std::thread::sleep(Duration::from_millis(300));
    assert!(proxy.is_running());
    echo_once(&mut s, b"during the drain");
    drop(s);
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let records = read_records(&proxy.audit);
    assert_eq!(records.len(), 1);
    assert!(records[0]["unmapped"]["error"].is_null(), "{}", records[0]);
    assert_eq!(records[0]["traffic"]["bytes_out"], 22);
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&proxy.audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn tunnels_still_open_after_the_grace_period_are_cut_and_recorded() {
    let dir = tempdir();
    let origin = Origin::echo();
    let mut proxy = Proxy::start(dir.path(), &body(origin.port, "1"));
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("a.test:{}", origin.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_once(&mut s, b"x");
    let start = Instant::now();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15));
    let took = start.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap_or(0),
        0,
        "the tunnel was not closed"
    );
    let records = read_records(&proxy.audit);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["unmapped"]["error"], "cut at shutdown");
    assert!(proxy.log_text().contains("shutdown grace over"));
}
