//! cgroup `sock_create`: the AF_INET/AF_INET6 sockets no connect hook judges.
//!
//! A raw socket writes whole IP packets, a ping socket sends ICMP echo, and protocols other
//! than TCP and UDP (SCTP, UDP-Lite, MPTCP's subflows) have paths the sock_addr gate was not
//! written for; none of them is needed by a coding agent. The kernel runs this hook only for
//! AF_INET and AF_INET6 (inet_create/inet6_create): other families are the LSM program's and the
//! seccomp profile's job. It runs after the protocol's own init, so a ping socket refused by
//! `ping_group_range` never reaches it, and after the protocol number is resolved (0 becomes 6
//! or 17), so `protocol` is the real one.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
    EbpfContext,
};
use tank_ebpf_common::{
    event::{hook, reason},
    settings,
};

use crate::record::{current_mode, record, refusal_verdict, Attempt};
use crate::setting;

/// What a cgroup sock program returns to let the socket be created.
const SOCK_PASS: i32 = 1;
/// What it returns to fail `socket()` with EPERM.
const SOCK_REJECT: i32 = 0;

const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_MPTCP: u32 = 262;

#[cgroup_sock(sock_create)]
pub fn tank_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock to sock programs.
    let sk = unsafe { &*ctx.sock };
    let (family, sock_type, protocol) = (sk.family, sk.type_, sk.protocol);
    let refusal = if sock_type == SOCK_RAW {
        Some(reason::RAW_SOCKET)
    } else if protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 {
        Some(reason::PING_SOCKET)
    } else if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        None
    } else if protocol == IPPROTO_MPTCP && setting(settings::ALLOW_MPTCP) == 1 {
        None
    } else {
        Some(reason::PROTOCOL_NOT_ALLOWED)
    };
    let Some(reason) = refusal else {
        // Plain TCP and UDP sockets are not recorded here: the gate records what they reach.
        return SOCK_PASS;
    };
    let mode = current_mode();
    let allowed = record(&Attempt {
        // SAFETY: a helper allowed in sock programs, called with the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        dst_addr: [0; 16],
        dst_port: 0,
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        hook: hook::SOCK_CREATE,
        reason,
        // Audit mode refuses nothing, here as in the gate; the reason says what enforce would do.
        verdict: refusal_verdict(mode),
        mode,
    });
    if allowed {
        SOCK_PASS
    } else {
        SOCK_REJECT
    }
}
