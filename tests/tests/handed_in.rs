//! Sockets the agent did not create (issue 10, item 5): made by a process of one of the
//! appliance's agent UIDs outside the agent cgroup and handed in over SCM_RIGHTS or taken with
//! pidfd_getfd. Such a socket keeps the cgroup it was made in, so the BPF gate never sees it;
//! only nft's `meta skuid` match can, if the appliance's `uid_range` covers its creator. Each
//! UID the appliance runs agent processes as (read from image/config/loader.toml) is tried, and
//! judged by whether the connection arrived at a listener. A UID outside the range is tried as
//! well, to show the check can fail.

use std::net::TcpListener;
use std::path::Path;

use tank_integration_tests::{nft_section, probe, Loader, TestCgroups};

/// The `uid_range` of the appliance's own loader config, as the image ships it.
fn appliance_uid_ranges() -> Vec<(u32, u32)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/config/loader.toml");
    let text = std::fs::read_to_string(&path).expect("image/config/loader.toml");
    tank_loader::config::Config::parse(&text, "loader.toml")
        .expect("the appliance config parses")
        .nft
        .uid_ranges
}

/// The agent user's UID, as image/sysusers.d declares it (`u agent UID ...`).
fn agent_uid() -> u32 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/sysusers.d/tank-agent.conf");
    let text = std::fs::read_to_string(&path).expect("image/sysusers.d/tank-agent.conf");
    text.lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["u", "agent", uid, ..] => uid.parse().ok(),
            _ => None,
        })
        .expect("the agent user's line")
}

/// Whether a connection reached `listener` (which is non-blocking).
fn arrived(listener: &TcpListener) -> bool {
    std::thread::sleep(std::time::Duration::from_millis(200));
    listener.accept().is_ok()
}

#[test]
fn a_socket_handed_in_by_any_agent_uid_is_refused_by_nft() {
    let ranges = appliance_uid_ranges();
    assert!(!ranges.is_empty(), "the appliance config has no uid_range");
    let cg = TestCgroups::new();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let list: Vec<String> = ranges.iter().map(|(a, b)| format!("\"{a}-{b}\"")).collect();
    let (nft, _table) = nft_section(&format!("uid_range = [{}]", list.join(", ")));
    let _loader = Loader::start(
        &cg,
        &format!("proxies = [\"{}\"]\n{nft}", proxy.local_addr().unwrap()),
    );
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let addr = target.local_addr().unwrap().to_string();
    let sibling = cg.sibling.to_str().unwrap();
    // The agent user itself, and both edges of every range (its subordinate UIDs).
    let mut uids = vec![agent_uid()];
    uids.extend(ranges.iter().flat_map(|&(a, b)| [a, b]));
    for how in ["scm", "pidfd"] {
        // A uid outside every range: its handed-in socket gets through, so the rows below
        // would see a miss.
        let outsider = 1234;
        assert!(ranges.iter().all(|&(a, b)| outsider < a || outsider > b));
        let (_, out) = probe(
            &cg.agent,
            None,
            &["handed-in", how, sibling, &outsider.to_string(), &addr],
        );
        assert_eq!(out, "ok", "{how} from uid {outsider}");
        assert!(arrived(&target), "{how}: the outsider's connection arrived");
        for uid in &uids {
            let (_, out) = probe(
                &cg.agent,
                None,
                &["handed-in", how, sibling, &uid.to_string(), &addr],
            );
            assert!(
                !arrived(&target),
                "{how}: a socket made by uid {uid} outside the agent cgroup got through ({out})"
            );
            assert_ne!(out, "ok", "{how} from uid {uid}");
        }
    }
}
