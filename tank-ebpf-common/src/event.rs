//! The record the kernel programs write to the ring buffer for every attempt they judge.

/// Name of the ring buffer in the eBPF object and under the pin directory.
pub const MAP_NAME: &str = "TANK_EVENTS";

/// Default ring buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// One judged attempt.
///
/// Addresses are in network byte order with IPv4 mapped into IPv6 (`::ffff:a.b.c.d`); ports
/// are in host byte order. `family` says what the socket itself was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds; userspace converts to wall time.
    pub ktime_ns: u64,
    /// Socket cookie: ties the records of one socket together.
    pub cookie: u64,
    /// cgroup v2 id of the task that made the attempt.
    pub cgroup_id: u64,
    /// Kernel thread id.
    pub pid: u32,
    /// Thread-group id: what userspace calls the process id.
    pub tgid: u32,
    /// Real user id of the task.
    pub uid: u32,
    /// Real group id of the task.
    pub gid: u32,
    /// Task name, NUL padded.
    pub comm: [u8; 16],
    /// Destination address.
    pub dst_addr: [u8; 16],
    /// Local (source) address, where the hook knows it; zero otherwise.
    pub src_addr: [u8; 16],
    /// Destination port.
    pub dst_port: u16,
    /// Local (source) port, where the hook knows it; zero otherwise.
    pub src_port: u16,
    /// Socket address family (`AF_INET` = 2, `AF_INET6` = 10).
    pub family: u16,
    /// Socket type (`SOCK_STREAM` = 1, `SOCK_DGRAM` = 2, ...).
    pub sock_type: u16,
    /// IP protocol number.
    pub protocol: u16,
    /// Which program judged it (one of [`hook`]).
    pub hook: u8,
    /// One of [`verdict`].
    pub verdict: u8,
    /// Why (one of [`reason`]).
    pub reason: u8,
    /// Mode in force (one of [`crate::settings::mode`], narrowed to a byte).
    pub mode: u8,
    /// Explicit padding to the 8-byte alignment; always zero.
    pub _pad: [u8; 2],
}

impl Event {
    /// An example: `curl` (tgid 100, uid 1000, cgroup 9) refused a TCP connect to
    /// 192.0.2.1:443 over IPv6 (`::ffff:192.0.2.1`), not listed. For tests and docs; change
    /// what matters with `Event { hook, ..Event::EXAMPLE }`.
    pub const EXAMPLE: Event = Event {
        ktime_ns: 1_000,
        cookie: 77,
        cgroup_id: 9,
        pid: 101,
        tgid: 100,
        uid: 1000,
        gid: 1000,
        comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        dst_addr: crate::allow::ipv4_mapped([192, 0, 2, 1]),
        src_addr: [0; 16],
        dst_port: 443,
        src_port: 0,
        family: 10,
        sock_type: 1,
        protocol: 6,
        hook: hook::CONNECT6,
        verdict: verdict::DENY,
        reason: reason::NOT_LISTED,
        mode: 0,
        _pad: [0; 2],
    };
}

/// Which kernel program produced an event.
pub mod hook {
    /// `cgroup/connect4`.
    pub const CONNECT4: u8 = 1;
    /// `cgroup/connect6`.
    pub const CONNECT6: u8 = 2;
    /// `cgroup/sendmsg4`.
    pub const SENDMSG4: u8 = 3;
    /// `cgroup/sendmsg6`.
    pub const SENDMSG6: u8 = 4;
    /// `cgroup/sock_create`: an AF_INET/AF_INET6 socket being created. Events carry the
    /// socket's family, type and protocol; there is no destination yet (zero address and port).
    pub const SOCK_CREATE: u8 = 5;
    /// BPF LSM `socket_create`: a socket of any family being created (where BPF LSM loads).
    pub const LSM_SOCKET_CREATE: u8 = 6;
    /// `sock_ops` active-established callback: a TCP connection of the guarded cgroup
    /// completed its handshake. The event carries the whole 4-tuple (the local address and
    /// port the kernel chose in `src_*`) and the socket cookie of its connect attempt. It runs
    /// outside the connecting task, so the task fields are zero; userspace copies them from
    /// the attempt with the same cookie.
    pub const ESTABLISHED: u8 = 7;
    /// `cgroup/setsockopt`: a socket option that would send the agent's packets somewhere
    /// other than the destination the gate judged (IPv4 source routes, IPv6 routing and other
    /// extension headers). No destination: the event carries the socket's family, type and
    /// protocol.
    pub const SETSOCKOPT: u8 = 8;
    /// `cgroup_skb/egress`: a packet of the agent's sockets carrying IPv4 options or an IPv6
    /// routing header, set per message as ancillary data (which no sock_addr hook sees). The
    /// event carries the packet's real destination address and the socket's remote port.
    pub const EGRESS: u8 = 9;
    /// `sock_ops` passive-established callback: a TCP connection *into* one of the agent's
    /// listening sockets completed its handshake. `dst_*` is the remote end (who connected),
    /// `src_*` the agent's local address and port. Task fields are zero (it runs in softirq);
    /// the socket's owner is not known here.
    pub const ACCEPTED: u8 = 10;
    /// `cgroup_skb/ingress`: a TCP connection attempt (SYN) to one of the agent's sockets from
    /// another host. `dst_*` is the remote end that tried, `src_*` the agent's address and port;
    /// the task fields carry the socket owner's uid and cgroup.
    pub const INBOUND: u8 = 11;

    /// Every hook with its stable name (in audit records, pin names and `status`). A new hook
    /// needs a line here, and nowhere else.
    pub const NAMES: &[(u8, &str)] = &[
        (CONNECT4, "connect4"),
        (CONNECT6, "connect6"),
        (SENDMSG4, "sendmsg4"),
        (SENDMSG6, "sendmsg6"),
        (SOCK_CREATE, "sock_create"),
        (LSM_SOCKET_CREATE, "lsm_socket_create"),
        (ESTABLISHED, "established"),
        (SETSOCKOPT, "setsockopt"),
        (EGRESS, "egress"),
        (ACCEPTED, "accepted"),
        (INBOUND, "inbound"),
    ];

    /// Stable name of a hook code, `unknown` for a code this build does not know.
    pub fn name(code: u8) -> &'static str {
        super::name_in(NAMES, code)
    }

    /// The code of a stable name.
    pub fn code(name: &str) -> Option<u8> {
        super::code_in(NAMES, name)
    }
}

/// What the kernel did with the attempt.
pub mod verdict {
    /// The attempt went ahead.
    pub const ALLOW: u8 = 1;
    /// The attempt failed with EPERM.
    pub const DENY: u8 = 2;
}

/// Why the kernel decided as it did. Stable: never renumber, keep retired codes reserved.
pub mod reason {
    /// Allowed: the destination is an egress proxy endpoint.
    pub const PROXY: u8 = 1;
    /// Allowed: the destination is an endpoint the operator listed.
    pub const LISTED_ENDPOINT: u8 = 2;
    /// Denied: the destination is not in the allow map.
    pub const NOT_LISTED: u8 = 3;
    /// Allowed in audit mode although the destination is not in the allow map.
    pub const AUDIT_NOT_LISTED: u8 = 4;
    /// A raw socket (`SOCK_RAW`): it would bypass every transport-level check. Refused in
    /// enforce mode; in audit mode the same reason comes with verdict allow.
    pub const RAW_SOCKET: u8 = 5;
    /// An ICMP/ICMPv6 datagram ("ping") socket: a channel no connect hook judges.
    pub const PING_SOCKET: u8 = 6;
    /// An IP protocol other than TCP and UDP (MPTCP unless the config allows it, SCTP, ...).
    pub const PROTOCOL_NOT_ALLOWED: u8 = 7;
    /// A socket family other than AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK (AF_VSOCK,
    /// AF_PACKET, ...).
    pub const FAMILY_NOT_ALLOWED: u8 = 8;
    /// An established connection whose destination is no longer in the allow map: the policy
    /// changed between the connect that was allowed and the end of the handshake.
    pub const NO_LONGER_LISTED: u8 = 9;
    /// IPv4 options (`IP_OPTIONS`, or `IP_RETOPTS` ancillary data): loose and strict source
    /// routes send the packet to their first hop, not to the destination the gate judged.
    pub const IP_OPTIONS: u8 = 10;
    /// IPv6 extension headers set by socket option (`IPV6_RTHDR`, `IPV6_HOPOPTS`,
    /// `IPV6_DSTOPTS`, `IPV6_RTHDRDSTOPTS`, the RFC 2292 forms and `IPV6_2292PKTOPTIONS`): a
    /// routing header sends the packet to its first segment, not to the destination judged.
    pub const IPV6_EXTENSION_HEADERS: u8 = 11;
    /// A packet carrying an IPv6 routing header (set as ancillary data on one message).
    pub const IPV6_ROUTING_HEADER: u8 = 12;
    /// A connection attempt into the agent from another host: whoever connects in receives
    /// what the agent writes, past every outbound check. Only the host itself may connect in.
    pub const NOT_FROM_HOST: u8 = 13;
    /// A connection into the agent was accepted (from the host itself, or in audit mode).
    pub const INBOUND_ACCEPTED: u8 = 14;

    /// Every reason with its stable name (in audit records). A new reason needs a line here.
    pub const NAMES: &[(u8, &str)] = &[
        (PROXY, "proxy"),
        (LISTED_ENDPOINT, "listed_endpoint"),
        (NOT_LISTED, "not_listed"),
        (AUDIT_NOT_LISTED, "audit_not_listed"),
        (RAW_SOCKET, "raw_socket"),
        (PING_SOCKET, "ping_socket"),
        (PROTOCOL_NOT_ALLOWED, "protocol_not_allowed"),
        (FAMILY_NOT_ALLOWED, "family_not_allowed"),
        (NO_LONGER_LISTED, "no_longer_listed"),
        (IP_OPTIONS, "ip_options"),
        (IPV6_EXTENSION_HEADERS, "ipv6_extension_headers"),
        (IPV6_ROUTING_HEADER, "ipv6_routing_header"),
        (NOT_FROM_HOST, "not_from_host"),
        (INBOUND_ACCEPTED, "inbound_accepted"),
    ];

    /// Stable name of a reason code, `unknown` for a code this build does not know.
    pub fn name(code: u8) -> &'static str {
        super::name_in(NAMES, code)
    }

    /// The code of a stable name.
    pub fn code(name: &str) -> Option<u8> {
        super::code_in(NAMES, name)
    }
}

fn name_in(names: &[(u8, &'static str)], code: u8) -> &'static str {
    names
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unknown", |(_, n)| n)
}

fn code_in(names: &[(u8, &str)], name: &str) -> Option<u8> {
    names.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, explicit padding only (checked below), every bit pattern valid.
unsafe impl aya::Pod for Event {}

const _: () = assert!(core::mem::size_of::<Event>() == 104);
const _: () = assert!(core::mem::align_of::<Event>() == 8);
