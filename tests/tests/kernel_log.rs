//! The kernel audit log on a full disk and rotated (root only): the loader stops draining, the ring buffer
//! fills and the kernel refuses further attempts and counts them; `status` says why; nothing
//! that reached the listener goes unrecorded, no line is partial, and once space returns the
//! loader drains again by itself, with an outage record, the chain intact (also after a
//! restart).
//!
//! The full disk is a 256 KiB tmpfs of the test's own, filled with a file and unlinked to give
//! space back. Targets are listeners this test opens on loopback.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tank_ebpf_common::chain;
use tank_integration_tests::{counter, network_records, probe, unique, Loader, TestCgroups};

/// A tmpfs of 256 KiB on a fresh directory, unmounted on drop (also on failure).
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(unique("tank-full-disk"));
        std::fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tank-test"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", dir.display());
        Self { dir }
    }

    /// Fills the disk with a file until the kernel refuses more.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("fill");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        for _ in 0..100_000 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        for _ in 0..4096 {
            if f.write_all(&[0]).is_err() {
                break;
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Connections accepted by `l` so far (drained without blocking).
fn arrivals(l: &TcpListener, count: &mut usize) -> usize {
    while l.accept().is_ok() {
        *count += 1;
    }
    *count
}

/// Allowed connect records to `port` in the log (the log's chain is checked on the way).
fn recorded(log: &std::path::Path, port: u16) -> usize {
    network_records(log)
        .iter()
        .filter(|r| {
            r.unmapped.hook.as_str() == "connect4"
                && r.action.as_str() == "Allowed"
                && r.dst_endpoint.port == Some(port)
        })
        .count()
}

#[test]
fn a_full_kernel_log_fails_closed_and_recovers_with_the_chain_intact() {
    tank_integration_tests::require_root();
    let cg = TestCgroups::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let addr = target.local_addr().unwrap();
    let disk = SmallDisk::mount();
    let log = disk.dir.join("kernel-audit.jsonl");
    let mut loader = Loader::configure(
        &cg,
        &format!("proxies = [\"{addr}\"]\nring_buffer_bytes = 4096\n[audit]\nreserve_bytes = 8192\nrotate_bytes = 0\n"),
    );
    let text = std::fs::read_to_string(&loader.config).unwrap().replace(
        &format!("audit_log = \"{}\"", loader.audit_log.display()),
        &format!("audit_log = \"{}\"", log.display()),
    );
    std::fs::write(&loader.config, text).unwrap();
    loader.audit_log = log.clone();
    loader.restart();
    let mut accepted = 0;
    assert_eq!(probe(&cg.agent, None, &["tcp", &addr.to_string()]).1, "ok");

    let fill = disk.fill();
    // Attempts go on while the log's allocated space lasts, then the ring fills and the kernel
    // refuses them.
    let (mut ok, mut refused) = (1, 0);
    for _ in 0..3000 {
        match probe(&cg.agent, None, &["tcp", &addr.to_string()])
            .1
            .as_str()
        {
            "ok" => ok += 1,
            "EPERM" => refused += 1,
            other => panic!("probe: {other}"),
        }
        if refused >= 5 {
            break;
        }
    }
    assert!(
        refused >= 5,
        "the full disk never made the kernel refuse ({ok} allowed)"
    );
    assert_eq!(
        arrivals(&target, &mut accepted),
        ok,
        "every allowed attempt arrived"
    );
    let status = loader.status();
    assert!(counter(&status, "unrecorded_denied") >= 5, "{status}");
    let problem = status["audit_log"]["problem"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}"));
    assert!(problem.contains("bytes free"), "{problem}");
    let out = loader.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT WRITABLE"));
    // Never a partial line; the chain verifies while the disk is still full.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with('\n'));
    assert!(chain::verify(&log).unwrap().is_intact());

    // Space returns: the loader drains again by itself.
    std::fs::remove_file(&fill).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if probe(&cg.agent, None, &["tcp", &addr.to_string()]).1 == "ok" {
            ok += 1;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the loader never drained again:\n{}",
            loader.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(arrivals(&target, &mut accepted), ok);
    // Every connection that arrived has its record: nothing allowed went unrecorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded(&log, addr.port()) < ok {
        assert!(
            Instant::now() < deadline,
            "{} records for {ok} arrivals",
            recorded(&log, addr.port())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(recorded(&log, addr.port()), ok);
    let (_, records) = chain::read(&log).unwrap();
    let outage = records
        .iter()
        .find(|r| r.value["unmapped"]["event"] == "audit_outage")
        .expect("an outage record");
    assert!(outage.value["unmapped"]["error"]
        .as_str()
        .unwrap()
        .contains("no space"));
    assert!(loader.status()["audit_log"]["problem"].is_null());

    // And after a restart.
    loader.stop();
    loader.restart();
    assert_eq!(probe(&cg.agent, None, &["tcp", &addr.to_string()]).1, "ok");
    loader.stop();
    let report = chain::verify(&log).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}

#[test]
fn the_kernel_log_rotates_into_segments_that_verify_as_one_chain() {
    tank_integration_tests::require_root();
    let cg = TestCgroups::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap();
    let mut loader = Loader::start(
        &cg,
        &format!("proxies = [\"{addr}\"]\n[audit]\nrotate_bytes = 4096\nkeep_segments = 3\n"),
    );
    // The drain rotates after a durable batch, and takes a lone event at its 250 ms tick:
    // spaced out, each probe is a batch of its own.
    for _ in 0..30 {
        assert_eq!(probe(&cg.agent, None, &["tcp", &addr.to_string()]).1, "ok");
        std::thread::sleep(Duration::from_millis(300));
    }
    loader.stop();
    let (report, records) = chain::read(&loader.audit_log).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(
        report.segments.len(),
        4,
        "3 kept segments and the active file"
    );
    assert!(
        report.segments[0].first_seq > 1,
        "retention removed the oldest"
    );
    assert!(records
        .iter()
        .any(|r| r.value["unmapped"]["event"] == "segment"));
    // A missing segment is caught.
    std::fs::remove_file(&report.segments[1].file).unwrap();
    let report = chain::verify(&loader.audit_log).unwrap();
    assert!(
        matches!(report.problems[..], [chain::Problem::MissingSegment { .. }]),
        "{:?}",
        report.problems
    );
}
