//! The agent container's seccomp profile (image/seccomp/tank-agent.json), applied to real
//! processes exactly as written: each refused socket family gets EPERM, each allowed one is
//! created, and io_uring (whose IORING_OP_SOCKET would go around the filter) is refused.
//!
//! The probes run as root in a sibling-style cgroup of their own, so the kernel itself would
//! grant every family a test names (checked without the profile first): the EPERM comes from
//! the profile. No socket is ever connected; AF_VSOCK sockets are only created.

use tank_integration_tests::{probe, probe_with, ProbeOpts, TestCgroups};

const SECCOMP: ProbeOpts<'static> = ProbeOpts {
    uid: None,
    netns: None,
    seccomp: true,
};

/// (family, type, name). Refused families the kernel here can create without the profile.
const REFUSED_CREATABLE: &[(&str, &str, &str)] =
    &[("17", "3", "AF_PACKET"), ("40", "1", "AF_VSOCK")];
/// Refused families whatever this kernel has (it may lack the protocol: then the filter must
/// still answer EPERM before the kernel could answer EAFNOSUPPORT).
const REFUSED_ANY: &[(&str, &str, &str)] = &[
    ("0", "1", "AF_UNSPEC"),
    ("3", "2", "AF_AX25"),
    ("4", "2", "AF_IPX"),
    ("5", "2", "AF_APPLETALK"),
    ("9", "5", "AF_X25"),
    ("15", "3", "AF_KEY"),
    ("31", "1", "AF_BLUETOOTH"),
    ("38", "5", "AF_ALG"),
    ("42", "2", "AF_QIPCRTR"),
    ("44", "3", "AF_XDP"),
    ("45", "2", "AF_MCTP"),
    // AF_VSOCK with bits above 32 set: the kernel truncates the family to an int.
    ("4294967336", "1", "AF_VSOCK | 1 << 32"),
];
const ALLOWED: &[(&str, &str, &str)] = &[
    ("1", "1", "AF_UNIX"),
    ("2", "1", "AF_INET"),
    ("10", "2", "AF_INET6"),
    ("16", "3", "AF_NETLINK"),
];

#[test]
fn the_profile_refuses_every_family_but_unix_inet_inet6_netlink() {
    let cg = TestCgroups::new();
    for (family, sock_type, name) in REFUSED_CREATABLE {
        assert_eq!(
            probe(&cg.sibling, None, &["socket", family, sock_type, "0"]).1,
            "ok",
            "{name} must be creatable without the profile"
        );
        assert_eq!(
            probe_with(&cg.sibling, &SECCOMP, &["socket", family, sock_type, "0"]).1,
            "EPERM",
            "{name} under the profile"
        );
    }
    for (family, sock_type, name) in REFUSED_ANY {
        assert_eq!(
            probe_with(&cg.sibling, &SECCOMP, &["socket", family, sock_type, "0"]).1,
            "EPERM",
            "{name} under the profile"
        );
    }
    for (family, sock_type, name) in ALLOWED {
        assert_eq!(
            probe_with(&cg.sibling, &SECCOMP, &["socket", family, sock_type, "0"]).1,
            "ok",
            "{name} under the profile"
        );
    }
}

#[test]
fn socketpair_is_filtered_like_socket() {
    let cg = TestCgroups::new();
    assert_eq!(
        probe_with(&cg.sibling, &SECCOMP, &["socketpair", "1", "1"]).1,
        "ok",
        "AF_UNIX pairs stay"
    );
    assert_eq!(
        probe_with(&cg.sibling, &SECCOMP, &["socketpair", "40", "1"]).1,
        "EPERM",
        "AF_VSOCK pair"
    );
    assert_eq!(
        probe_with(&cg.sibling, &SECCOMP, &["socketpair", "17", "3"]).1,
        "EPERM",
        "AF_PACKET pair"
    );
}

#[test]
fn io_uring_is_refused_because_it_creates_sockets_out_of_the_filters_sight() {
    let cg = TestCgroups::new();
    assert_eq!(
        probe(&cg.sibling, None, &["io-uring-setup"]).1,
        "ok",
        "io_uring works here without the profile"
    );
    assert_eq!(
        probe_with(&cg.sibling, &SECCOMP, &["io-uring-setup"]).1,
        "EPERM"
    );
}
