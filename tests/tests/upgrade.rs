//! A new loader meeting maps pinned by another tank version (issue 10, item 6).
//!
//! The maps stay pinned across restarts, so an upgraded loader finds the old ones. aya would
//! reuse them whatever their shape; the loader must instead refuse with one line that says what
//! to do, change nothing, and leave the programs already attached enforcing. Each test pins a
//! map of another layout where a previous run left tank's (as an older tank did, with a counter
//! map of 4 slots where this one has 5), and judges enforcement by what reaches a listener.

use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tank_integration_tests::{bpf_fd, counter, probe, Loader, TestCgroups};

const AGENT: Option<u32> = Some(65534);
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// A fresh array map of `slots` u32/u64 values, as an older tank would have pinned it.
fn array_map(map_type: u32, value_size: u32, slots: u32) -> OwnedFd {
    // bpf_attr.map_create: map_type, key_size, value_size, max_entries; the rest zero.
    let mut attr = [0u32; 16];
    attr[..4].copy_from_slice(&[map_type, 4, value_size, slots]);
    bpf_fd(BPF_MAP_CREATE, &mut attr, "BPF_MAP_CREATE")
}

/// Whether a connection reached `listener` (which is non-blocking).
fn arrived(listener: &TcpListener) -> bool {
    std::thread::sleep(Duration::from_millis(200));
    listener.accept().is_ok()
}

/// The agent reaches the proxy and nothing else: judged at both listeners.
fn still_enforcing(cg: &TestCgroups, proxy: &TcpListener, other: &TcpListener) {
    let (_, out) = probe(
        &cg.agent,
        AGENT,
        &["tcp", &other.local_addr().unwrap().to_string()],
    );
    assert_eq!(out, "EPERM");
    assert!(!arrived(other), "an unlisted listener got a connection");
    let (_, out) = probe(
        &cg.agent,
        AGENT,
        &["tcp", &proxy.local_addr().unwrap().to_string()],
    );
    assert_eq!(out, "ok");
    assert!(arrived(proxy), "the proxy got the agent's connection");
}

/// Starts a loader, stops it (its programs and maps stay pinned), swaps the pin `map` for one
/// made by `older`, and checks the new start refuses in one line and changes nothing.
fn refuses_a_map_of_another_layout(map: &str, older: OwnedFd) {
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    other.set_nonblocking(true).unwrap();
    let mut loader = Loader::start(
        &cg,
        &format!("proxies = [\"{}\"]\n", proxy.local_addr().unwrap()),
    );
    still_enforcing(&cg, &proxy, &other);
    loader.stop();
    let before = loader.status()["hooks"].clone();

    let pin = loader.pin_dir.join(map);
    std::fs::remove_file(&pin).unwrap();
    tank_loader::query::obj_pin(older.as_fd(), &pin).unwrap();
    let err = loader
        .try_restart()
        .expect_err("a loader meeting a map of another layout must refuse");
    let line = err
        .lines()
        .find_map(|l| l.find("tank-loader: ").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        line.contains(&format!("pinned map {}", pin.display()))
            && line.contains("another layout")
            && line.contains("tank-loader detach"),
        "{line}"
    );
    assert_eq!(err.matches("tank-loader: ").count(), 1, "one line: {err}");
    // Nothing changed: the same programs, still attached, still enforcing.
    assert_eq!(loader.status()["hooks"], before);
    still_enforcing(&cg, &proxy, &other);

    // What the line says to do works: detach, start again, and the new maps are in place.
    let out = loader.cli(&["detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    loader.restart();
    still_enforcing(&cg, &proxy, &other);
    assert!(counter(&loader.status(), "unrecorded_established") == 0);
}

#[test]
fn a_counter_map_of_four_slots_is_refused_in_one_line() {
    refuses_a_map_of_another_layout(
        tank_ebpf_common::counters::MAP_NAME,
        array_map(BPF_MAP_TYPE_PERCPU_ARRAY, 8, 4),
    );
}

#[test]
fn a_settings_map_of_fewer_slots_is_refused_in_one_line() {
    refuses_a_map_of_another_layout(
        tank_ebpf_common::settings::MAP_NAME,
        array_map(BPF_MAP_TYPE_ARRAY, 4, 3),
    );
}
