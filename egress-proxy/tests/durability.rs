//! The audit promise under crash and full disk: a tunnel's opening record is in the log before
//! its `200`, so a proxy killed mid-tunnel leaves it there (and `audit verify` lists it as never
//! closed); on a full disk nothing is served unrecorded, no line is partial, the chain stays
//! intact, and the proxy recovers by itself with an outage record once space returns.
//!
//! The full-disk tests need root (they mount a small tmpfs, the full disk on demand) and fail
//! loudly without it. Each judges by what the origin received, what the log holds and what
//! `audit verify` says, also after a restart.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn verify(paths: &[&Path]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(paths)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Sends `n` bytes through an echo tunnel and reads them back.
fn echo(s: &mut TcpStream, n: usize) {
    let chunk = vec![b'e'; 64 * 1024];
    let mut reader = s.try_clone().unwrap();
    let reading = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < n {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        got
    });
    let mut sent = 0;
    while sent < n {
        let k = chunk.len().min(n - sent);
        s.write_all(&chunk[..k]).unwrap();
        sent += k;
    }
    assert_eq!(reading.join().unwrap(), n, "echoed bytes");
}

fn echo_body(port: u16) -> String {
    format!("allowed_domains = [{{ domain = \"echo.test\", ports = [{port}], allow_private = true }}]\n[hosts]\n\"echo.test\" = \"127.0.0.1\"\n")
}

#[test]
fn a_proxy_killed_mid_tunnel_leaves_the_opening_record_and_verify_lists_it_open() {
    let dir = tempdir();
    let origin = Origin::echo();
    let mut proxy = Proxy::start(dir.path(), &echo_body(origin.port));
    let (mut s, head) = connect_tunnel(proxy.addr, &format!("echo.test:{}", origin.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Written before the 200: already in the log (page cache) when the client reads it.
    let chain = read_chain(&proxy.audit);
    let opening = chain
        .iter()
        .find(|r| r["unmapped"]["opens"] == true)
        .unwrap_or_else(|| panic!("no opening record when the 200 arrived: {chain:#?}"));
    assert_eq!(opening["unmapped"]["kind"], "connect");
    assert_eq!(opening["action"], "Allowed");
    assert_eq!(opening["dst_endpoint"]["hostname"], "echo.test");
    assert_eq!(opening["dst_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(
        opening["src_endpoint"]["port"],
        s.local_addr().unwrap().port()
    );
    assert!(opening["unmapped"]["rule"]
        .as_str()
        .unwrap()
        .starts_with("allowed_domains:"));

    echo(&mut s, 1 << 20);
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    proxy.wait_exit(Duration::from_secs(10));

    let chain = read_chain(&proxy.audit);
    assert_eq!(chain.len(), 1, "{chain:#?}");
    assert!(chain.iter().all(|r| r["unmapped"].get("closes").is_none()));
    let (code, out) = verify(&[&proxy.audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: 1 records"), "{out}");
    assert!(
        out.contains(
            "1 opened and never closed (still open, or the writer died while they were): seq 1"
        ),
        "{out}"
    );
    let json = Command::new(BIN)
        .args(["audit", "verify", "--json"])
        .arg(&proxy.audit)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["unclosed"][0]["seq"], 1);

    // The proxy restarted on the log continues it; the dead tunnel stays listed.
    let mut proxy = Proxy::start_raw(dir.path(), &std::fs::read_to_string(&proxy.config).unwrap());
    let (s, _) = connect_tunnel(proxy.addr, &format!("echo.test:{}", origin.port));
    drop(s);
    proxy.wait_records(1);
    assert!(proxy.stop().success());
    let (code, out) = verify(&[&proxy.audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 opened and never closed"), "{out}");
}

#[test]
fn a_long_refused_url_makes_a_bounded_record() {
    let dir = tempdir();
    let origin = Origin::http();
    let proxy = Proxy::start(dir.path(), &echo_body(origin.port));
    let request = |path: &str| {
        let r = raw_request(
            proxy.addr,
            format!("GET http://denied.test/{path} HTTP/1.1\r\nHost: denied.test\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 403"), "{}", &r[..r.len().min(200)]);
    };
    request("short");
    request(&"a".repeat(16 * 1024 - 200));
    proxy.wait_records(2);
    let text = std::fs::read_to_string(&proxy.audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (short, long) = (lines[0].len(), lines[1].len());
    eprintln!("record of a refused request: {short} bytes with a short URL, {long} bytes with a 16 KiB URL");
    assert!(
        long < short + 1100,
        "a 16 KiB URL grew the record from {short} to {long} bytes"
    );
    let r: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert!(r["url"]["url_string"].as_str().unwrap().ends_with('…'));
    assert!(r["unmapped"]["url_bytes"].as_u64().unwrap() > 16_000);
    assert_eq!(origin.served(), 0);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop (also on failure).
struct SmallDisk {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a tmpfs as a full disk on demand: run it as root (cargo xtask test does)"
        );
        let parent = tempdir();
        let dir = parent.path().join("logfs");
        std::fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tank-test",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", dir.display());
        SmallDisk {
            dir,
            _parent: parent,
        }
    }

    /// Fills the disk with a file until the kernel refuses more.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("fill");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        // Bounded: the tmpfs is small.
        for _ in 0..1_000_000 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let _ = f.flush();
        // Page-granular leftovers too.
        for _ in 0..4096 {
            if f.write_all(&[0u8]).is_err() {
                break;
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn get(proxy: &Proxy, port: u16, path: &str) -> String {
    raw_request(
        proxy.addr,
        format!("GET http://web.test:{port}/{path} HTTP/1.1\r\nHost: web.test\r\n\r\n").as_bytes(),
    )
}

#[test]
fn a_full_disk_serves_nothing_unrecorded_keeps_the_chain_and_recovers() {
    let disk = SmallDisk::mount("256k");
    let dir = tempdir();
    let origin = Origin::http();
    let echo_origin = Origin::echo();
    let log = disk.dir.join("audit.jsonl");
    let body = format!(
        "allowed_domains = [{{ domain = \"web.test\", ports = [{}], allow_private = true }}, {{ domain = \"echo.test\", ports = [{}], allow_private = true }}]\n[hosts]\n\"web.test\" = \"127.0.0.1\"\n\"echo.test\" = \"127.0.0.1\"\n[audit]\nreserve_bytes = 8192\nrotate_bytes = 0\n",
        origin.port, echo_origin.port
    );
    let config = config_text(dir.path(), &body).replace(
        &dir.path().join("audit.jsonl").display().to_string(),
        &log.display().to_string(),
    );
    let mut proxy = Proxy::start_raw(dir.path(), &config);
    proxy.audit = log.clone();

    // A tunnel opened before the disk fills.
    let (mut tunnel, head) = connect_tunnel(proxy.addr, &format!("echo.test:{}", echo_origin.port));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo(&mut tunnel, 1000);

    let fill = disk.fill();
    // Requests go on while the log's preallocated space lasts, then are refused; each one
    // served must be recorded.
    let mut served_ok = 0;
    let mut refused = None;
    for i in 0..5000 {
        let r = get(&proxy, origin.port, &format!("n{i}"));
        if r.starts_with("HTTP/1.1 200") {
            served_ok += 1;
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the full disk never refused a request");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert_eq!(
        header(&refused, "X-Tank-Refused-By"),
        Some("audit-unavailable"),
        "{refused}"
    );
    assert_eq!(
        origin.served(),
        served_ok,
        "the origin served exactly the recorded requests"
    );
    for i in 0..5 {
        let r = get(&proxy, origin.port, &format!("after{i}"));
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    }
    let (t, _) = connect_tunnel(proxy.addr, &format!("echo.test:{}", echo_origin.port));
    drop(t);
    assert_eq!(
        origin.served(),
        served_ok,
        "nothing reached the origin while the log was full"
    );
    assert!(proxy.admin_get("/healthz").contains("503"));

    // The open tunnel keeps relaying and its closing record fits in the reserve.
    echo(&mut tunnel, 1650);
    drop(tunnel);
    let closed = wait_for(
        Duration::from_secs(10),
        "the tunnel's closing record",
        || {
            read_chain(&log).into_iter().find(|r| {
                r["unmapped"]["kind"] == "connect" && r["unmapped"].get("closes").is_some()
            })
        },
    );
    assert_eq!(closed["traffic"]["bytes_out"], 2650);
    assert_eq!(closed["traffic"]["bytes_in"], 2650);

    // Never a partial line, the chain intact while the disk is still full.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with('\n'));
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 0, "{out}");
    let served_records = read_records(&log)
        .iter()
        .filter(|r| r["unmapped"]["kind"] == "http" && r["unmapped"].get("closes").is_some())
        .count();
    assert_eq!(
        served_records, served_ok,
        "every request served has its record"
    );

    // Space returns: the proxy serves again by itself, after an outage record.
    std::fs::remove_file(&fill).unwrap();
    wait_for(Duration::from_secs(10), "the proxy to serve again", || {
        get(&proxy, origin.port, "back")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(proxy.admin_get("/healthz").contains("200"));
    let chain = read_chain(&log);
    let outage = chain
        .iter()
        .find(|r| r["class_uid"] == 6002)
        .unwrap_or_else(|| panic!("no outage record: {chain:#?}"));
    assert!(
        outage["unmapped"]["unrecorded_refusals"].as_u64().unwrap() >= 1,
        "{outage}"
    );
    assert!(
        outage["unmapped"]["error"]
            .as_str()
            .unwrap()
            .contains("no space"),
        "{outage}"
    );
    assert!(proxy.stop().success());
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("never closed"), "{out}");

    // And after a restart on the same log.
    let mut proxy = Proxy::start_raw(dir.path(), &config);
    proxy.audit = log.clone();
    assert!(get(&proxy, origin.port, "restarted").starts_with("HTTP/1.1 200"));
    proxy.wait_records(1);
    assert!(proxy.stop().success());
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_log_rotates_into_compressed_segments_that_verify_as_one_chain() {
    let dir = tempdir();
    let origin = Origin::echo();
    let body = format!(
        "{}[audit]\nrotate_bytes = 4096\nkeep_segments = 4\n",
        echo_body(origin.port)
    );
    let mut proxy = Proxy::start(dir.path(), &body);
    let mut last = 0;
    for _ in 0..40 {
        let (s, _) = connect_tunnel(proxy.addr, &format!("echo.test:{}", origin.port));
        drop(s);
        // Read across the segments: the active file starts anew at each rotation.
        last = wait_for(Duration::from_secs(10), "the closing record", || {
            let (_, records) = tank_ebpf_common::chain::read(&proxy.audit).ok()?;
            let closing = records
                .iter()
                .rev()
                .find(|r| r.value["unmapped"].get("closes").is_some())?;
            (closing.seq > last).then_some(closing.seq)
        });
    }
    assert!(proxy.stop().success());
    let segments = || {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("audit.jsonl.0"))
            .collect();
        v.sort();
        v
    };
    let zst = wait_for(Duration::from_secs(20), "compressed segments", || {
        let s = segments();
        (s.len() == 4 && s.iter().all(|p| p.extension().is_some_and(|e| e == "zst"))).then_some(s)
    });
    let log = dir.path().join("audit.jsonl");
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in 5 segments"), "{out}");
    // Retention removed the oldest, and the chain says so: the series starts mid-chain, intact.
    let (report, _) = tank_ebpf_common::chain::read(&log).unwrap();
    assert!(report.segments[0].first_seq > 1);
    let (code, out) = verify(&[dir.path()]);
    assert_eq!(code, 0, "{out}");
    // A missing segment is caught.
    std::fs::remove_file(&zst[1]).unwrap();
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a segment is missing"), "{out}");
}

/// One tunnel through `proxy` to `origin`, waited for until its log (as it is now) holds it.
fn one_tunnel(proxy: &Proxy, origin: &Origin) {
    let (s, _) = connect_tunnel(proxy.addr, &format!("echo.test:{}", origin.port));
    drop(s);
    proxy.wait_records(1);
}

#[test]
fn sighup_after_logrotate_moved_the_log_continues_in_a_new_linked_file() {
    let dir = tempdir();
    let origin = Origin::echo();
    let mut proxy = Proxy::start(dir.path(), &echo_body(origin.port));
    one_tunnel(&proxy, &origin);
    // logrotate's `create` mode: rename, then signal.
    let moved = dir.path().join("audit.jsonl.1");
    std::fs::rename(&proxy.audit, &moved).unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "the new log file", || {
        proxy.audit.exists().then_some(())
    });
    one_tunnel(&proxy, &origin);
    assert!(proxy.admin_get("/healthz").contains("200"));
    assert!(proxy.stop().success());
    let first = &read_chain(&proxy.audit)[0];
    assert_eq!(
        first["unmapped"]["segment"]["previous_last_seq"], 2,
        "{first}"
    );
    let (code, out) = verify(&[&moved, &proxy.audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: 5 records in 2 segments"), "{out}");
}

#[test]
fn a_deleted_log_is_noticed_and_writing_goes_on_at_its_path() {
    let dir = tempdir();
    let origin = Origin::echo();
    let mut proxy = Proxy::start(dir.path(), &echo_body(origin.port));
    one_tunnel(&proxy, &origin);
    std::fs::remove_file(&proxy.audit).unwrap();
    // No signal: the writer notices within its path check, even with no traffic.
    let first = wait_for(Duration::from_secs(10), "a new log at the path", || {
        read_chain(&proxy.audit).into_iter().next()
    });
    assert_eq!(first["unmapped"]["event"], "reopened", "{first}");
    assert_eq!(
        first["unmapped"]["segment"]["previous_last_seq"], 2,
        "{first}"
    );
    one_tunnel(&proxy, &origin);
    assert!(proxy.stop().success());
    assert_eq!(read_chain(&proxy.audit).len(), 3);
    // What came before is gone, and verify says so rather than passing the new file alone.
    let (code, out) = verify(&[&proxy.audit]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the series starts at seq 3"), "{out}");
}
