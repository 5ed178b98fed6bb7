//! The BPF LSM layer's `lsm = "auto" | "required"` on a real kernel (root only).
//!
//! Where the kernel refuses BPF LSM programs (these machines: BPF_PROG_LOAD answers EPERM),
//! auto must start and say loudly, in its log and in `status`, that the layer is not in force;
//! required must refuse to start with one clear line. Where the kernel loads them (Fedora),
//! the same tests check the layer instead: the program is in force and refuses AF_VSOCK
//! creation in the agent cgroup, on record. Either way every branch asserts.

use tank_integration_tests::{probe, Loader, TestCgroups};

/// Whether this kernel loads tank's LSM program, as the loader reports it.
fn lsm_loads(loader: &Loader) -> bool {
    loader.status()["layers"]["lsm"]["in_force"]
        .as_bool()
        .expect("layers.lsm.in_force in status")
}

#[test]
fn auto_uses_the_lsm_where_it_loads_and_degrades_loudly_where_it_does_not() {
    let cg = TestCgroups::new();
    let mut loader = Loader::start(&cg, "lsm = \"auto\"");
    let status = loader.status();
    assert_eq!(
        status["enforcing"], true,
        "auto never stops enforcement: {status}"
    );
    if lsm_loads(&loader) {
        let (pid, outcome) = probe(&cg.agent, Some(65534), &["socket", "40", "1", "0"]);
        assert_eq!(
            outcome, "EPERM",
            "AF_VSOCK (created, never connected) refused by the LSM program"
        );
        let r = loader.record_of(pid);
        assert_eq!(
            (r.unmapped.hook.as_str(), r.unmapped.reason.as_str()),
            ("lsm_socket_create", "family_not_allowed")
        );
        return;
    }
    let lsm = &status["layers"]["lsm"];
    assert_eq!(lsm["config"], "auto");
    assert!(
        lsm["reason"]
            .as_str()
            .unwrap()
            .contains("does not load BPF LSM programs"),
        "{lsm}"
    );
    let human = String::from_utf8(loader.cli(&["status"]).stdout).unwrap();
    assert!(
        human.contains("lsm         NOT in force (lsm = \"auto\")"),
        "{human}"
    );
    assert!(
        human.contains("seccomp     applied by the container runtime"),
        "{human}"
    );
    // Loud on every start, not only the first.
    loader.stop();
    loader.restart();
    let warnings = loader.logs().matches("BPF LSM layer NOT in force").count();
    assert_eq!(warnings, 2, "one warning per start: {}", loader.logs());
    assert!(
        loader.logs().contains("Operation not permitted"),
        "the kernel's reason is in the warning: {}",
        loader.logs()
    );
    let start = tank_ebpf_common::chain::read(&loader.audit_log)
        .unwrap()
        .1
        .into_iter()
        .rev()
        .find(|r| r.value["class_uid"] == 6002)
        .unwrap();
    assert_eq!(
        start.value["unmapped"]["lsm"]["state"], "unavailable",
        "{}",
        start.value
    );
}

#[test]
fn required_refuses_to_start_without_the_lsm() {
    let cg = TestCgroups::new();
    let mut loader = Loader::configure(&cg, "lsm = \"required\"");
    match loader.try_restart() {
        Ok(()) => assert!(
            lsm_loads(&loader),
            "required started: the LSM program must be in force"
        ),
        Err(output) => {
            let error: Vec<&str> = output
                .lines()
                .filter(|l| l.contains("tank-loader: "))
                .collect();
            assert_eq!(error.len(), 1, "one error line: {output}");
            assert!(
                error[0]
                    .contains("lsm = \"required\" but the BPF LSM program cannot be put in place"),
                "{}",
                error[0]
            );
        }
    }
}
