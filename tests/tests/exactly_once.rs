//! Every attempt in the kernel log exactly once (root only): across `kill -9` of the loader
//! under load, and for attempts the kernel could not record, which the log must account for
//! as soon as the counters move. Judged against the kernel's own counters.

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use tank_ebpf_common::chain;
use tank_ebpf_common::ocsf::kernel::{NetworkRecord, UnrecordedRecord};
use tank_ebpf_common::ocsf::{self, Kind};
use tank_integration_tests::{counter, probe, workspace_bin, Loader, TestCgroups};

/// The kernel log, verified, split into event records and unrecorded records.
fn read_log(loader: &Loader) -> (Vec<NetworkRecord>, Vec<UnrecordedRecord>) {
    let (report, records) = chain::read(&loader.audit_log).expect("read the kernel log");
    assert!(report.is_intact(), "{:?}", report.problems);
    let (mut events, mut unrecorded) = (Vec::new(), Vec::new());
    for r in records {
        match ocsf::parse(&r.value) {
            Ok(Kind::Kernel(k)) => events.push(k),
            Ok(Kind::Unrecorded(u)) => unrecorded.push(u),
            Ok(_) => {}
            Err(e) => panic!("line {}: {e}", r.line),
        }
    }
    (events, unrecorded)
}

/// Recorded attempts (allowed + denied) and unrecorded ones, from the kernel's counters.
fn kernel_counts(loader: &Loader) -> (u64, u64) {
    let s = loader.status();
    let recorded = counter(&s, "allowed") + counter(&s, "denied");
    let unrecorded = [
        "unrecorded_denied",
        "unrecorded_allowed",
        "unrecorded_established",
    ]
    .iter()
    .map(|c| counter(&s, c))
    .sum();
    (recorded, unrecorded)
}

/// Waits (bounded) until the log holds `recorded` events.
fn wait_logged(loader: &Loader, recorded: u64) -> Vec<NetworkRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (events, _) = read_log(loader);
        if events.len() as u64 >= recorded || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No event twice: ring positions strictly increase through the log, across restarts.
fn assert_each_once(events: &[NetworkRecord]) {
    let mut seen = HashSet::new();
    for pair in events.windows(2) {
        assert!(
            pair[0].unmapped.ring_pos < pair[1].unmapped.ring_pos,
            "an event written twice or out of order: {:#?}",
            pair
        );
    }
    for e in events {
        let key = (e.unmapped.cookie, e.unmapped.ktime_ns, e.unmapped.hook);
        assert!(seen.insert(key), "event written twice: {e:#?}");
    }
}

#[test]
fn twelve_kill_9s_under_load_leave_every_event_in_the_log_exactly_once() {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = other.local_addr().unwrap().to_string();
    let config = format!(
        "proxies = [\"{}\"]\nring_buffer_bytes = 16777216",
        proxy.local_addr().unwrap()
    );
    let mut loader = Loader::start(&cg, &config);

    // Two floods of denied connects keep the drain busy while the loader is killed.
    let floods: Vec<_> = (0..2)
        .map(|_| {
            let (agent, other) = (cg.agent.clone(), other.clone());
            std::thread::spawn(move || probe(&agent, Some(65534), &["flood", &other, "15000"]).1)
        })
        .collect();
    for i in 0..12u64 {
        // Kill at varying points of a drain pass.
        std::thread::sleep(Duration::from_millis(60 + 37 * (i % 5)));
        loader.kill9();
        std::thread::sleep(Duration::from_millis(20));
        loader.restart();
    }
    for f in floods {
        assert_eq!(f.join().unwrap(), "ok=0 eperm=15000 other=0");
    }
    loader.stop();
    loader.restart();

    let (recorded, unrecorded) = kernel_counts(&loader);
    assert_eq!(unrecorded, 0, "the 16 MiB ring never filled");
    assert!(recorded >= 30_000, "{recorded} recorded attempts");
    let events = wait_logged(&loader, recorded);
    assert_eq!(
        events.len() as u64,
        recorded,
        "the log must hold each recorded attempt once"
    );
    assert_each_once(&events);
    let starts = chain::read(&loader.audit_log)
        .unwrap()
        .1
        .iter()
        .filter(|r| r.value["class_uid"] == 6002)
        .count();
    assert_eq!(starts, 14);
}

#[test]
fn attempts_refused_for_a_full_ring_are_written_into_the_log_and_shown() {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = other.local_addr().unwrap().to_string();
    let config = format!(
        "proxies = [\"{}\"]\nring_buffer_bytes = 4096",
        proxy.local_addr().unwrap()
    );
    let mut loader = Loader::start(&cg, &config);
    // With the drain gone the 4 KiB ring fills; the rest are refused unrecorded.
    loader.kill9();
    assert_eq!(
        probe(&cg.agent, Some(65534), &["flood", &other, "200"]).1,
        "ok=0 eperm=200 other=0"
    );
    loader.restart();
    let (recorded, unrecorded) = kernel_counts(&loader);
    assert_eq!(recorded + unrecorded, 200);
    assert!(unrecorded > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (events, counted) = loop {
        let (events, counted) = read_log(&loader);
        if !counted.is_empty() || Instant::now() > deadline {
            break (events, counted);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(events.len() as u64, recorded);
    assert_eq!(counted.iter().map(|u| u.count).sum::<u64>(), unrecorded);
    assert_eq!(counted[0].unmapped.unrecorded.as_str(), "unrecorded_denied");
    assert_eq!(counted[0].unmapped.totals.unrecorded_denied, unrecorded);

    // More of them while the loader runs: a new record for just the new ones, at once.
    loader.kill9();
    probe(&cg.agent, Some(65534), &["flood", &other, "100"]);
    loader.restart();
    let (_, unrecorded_now) = kernel_counts(&loader);
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let (_, counted) = read_log(&loader);
        if counted.len() >= 2 || Instant::now() > deadline {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(counted.len(), 2, "{counted:#?}");
    assert_eq!(counted[1].count, unrecorded_now - unrecorded);
    // A restart does not count them again.
    loader.stop();
    loader.restart();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(read_log(&loader).1.len(), 2);

    // trace and the cross-check show them.
    let out = loader.cli(&["trace", "--history", "--no-follow"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let rows: Vec<_> = text.lines().filter(|l| l.contains("UNRECORDED")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].contains(&format!("{unrecorded} attempts denied with no record")));
    let empty = loader.dir.path().join("empty-proxy.jsonl");
    chain::ChainWriter::open(&empty).unwrap().0.sync().unwrap();
    let out = Command::new(workspace_bin("tank-loader"))
        .args(["audit", "cross-check", "--kernel"])
        .arg(&loader.audit_log)
        .arg("--proxy")
        .arg(&empty)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = format!(
        "attempts the kernel could not record (ring buffer full), as logged: {unrecorded_now}\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&line), "{text}{err}");
}
