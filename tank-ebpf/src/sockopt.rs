//! cgroup `setsockopt`: the socket options that send the agent's packets somewhere other than
//! the destination the gate judged.
//!
//! The sock_addr gate judges the address passed to connect or sendto. Two kinds of option,
//! open to every uid, make the kernel send to another address: IPv4 `IP_OPTIONS` with a loose
//! or strict source route (the packet goes to the first hop; TCP and UDP both route to it,
//! `tcp_v4_connect` and `udp_sendmsg` take `opt.faddr` after the connect hook ran), and IPv6
//! `IPV6_RTHDR` (a type 4 segment routing header needs no capability; the packet goes to the
//! segment `fl6_update_dst` picks). Both are refused here, whatever the socket's state, so an
//! established connection cannot be re-routed either. The other IPv6 extension-header options
//! (hop-by-hop, destination options, the RFC 2292 forms, and `IPV6_2292PKTOPTIONS`, which parses
//! ancillary data, routing headers included, into sticky options) go with them: a coding agent
//! needs none. Every other option passes untouched.
//!
//! Passing, the program sets `optlen` to 0: the kernel then hands the caller's own buffer to
//! the option's handler. Left as it was, the kernel takes the program's copy of the value to be
//! an edit and hands the handler that copy instead: a `kmalloc`, a copy and a `kfree` on every
//! `setsockopt` of the agent (about 7% of a `SO_LINGER` call's CPU samples in the agent's cgroup
//! here). Nothing here reads the value, only the level and name, so what the handler reads is
//! still what was judged.
//!
//! Kernel requirements: cgroup sockopt programs (5.3).

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use tank_ebpf_common::event::{hook, reason};

use crate::record::{current_mode, record, refusal_verdict, Attempt};

/// What a cgroup sockopt program returns to let the kernel handle the option.
const SOCKOPT_PASS: i32 = 1;
/// What it returns to fail `setsockopt` with EPERM.
const SOCKOPT_REJECT: i32 = 0;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
// include/uapi/linux/in6.h and ipv6.h.
const IPV6_2292HOPOPTS: i32 = 3;
const IPV6_2292DSTOPTS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_HOPOPTS: i32 = 54;
const IPV6_RTHDRDSTOPTS: i32 = 55;
const IPV6_RTHDR: i32 = 57;
const IPV6_DSTOPTS: i32 = 59;

#[cgroup_sockopt(setsockopt)]
pub fn tank_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sockopt to sockopt programs.
    let opt = unsafe { &*ctx.sockopt };
    let reason = match (opt.level, opt.optname) {
        (SOL_IP, IP_OPTIONS) => reason::IP_OPTIONS,
        (
            SOL_IPV6,
            IPV6_2292HOPOPTS | IPV6_2292DSTOPTS | IPV6_2292RTHDR | IPV6_2292PKTOPTIONS
            | IPV6_HOPOPTS | IPV6_RTHDRDSTOPTS | IPV6_RTHDR | IPV6_DSTOPTS,
        ) => reason::IPV6_EXTENSION_HEADERS,
        _ => return pass(&ctx),
    };
    // SAFETY: `sk` is always set for sockopt programs.
    let sk = unsafe { &*opt.__bindgen_anon_1.sk };
    let mode = current_mode();
    let allowed = record(&Attempt {
        // No socket cookie helper for sockopt programs; the task fields say who it was.
        cookie: 0,
        dst_addr: [0; 16],
        dst_port: 0,
        family: sk.family as u16,
        sock_type: sk.type_ as u16,
        protocol: sk.protocol as u16,
        hook: hook::SETSOCKOPT,
        reason,
        // Audit mode refuses nothing; the reason says what enforce would do.
        verdict: refusal_verdict(mode),
        mode,
    });
    if allowed {
        pass(&ctx)
    } else {
        SOCKOPT_REJECT
    }
}

/// Lets the kernel handle the option with the caller's own value (see the module doc).
#[inline(always)]
fn pass(ctx: &SockoptContext) -> i32 {
    // SAFETY: `optlen` is writable in setsockopt programs; 0 means "use the caller's value".
    unsafe { (*ctx.sockopt).optlen = 0 };
    SOCKOPT_PASS
}
