//! The gate: cgroup `sock_addr` programs judging every connect and every unconnected send of
//! the guarded cgroup against the allow map.
//!
//! A send on a *connected* UDP socket that carries ancillary data (IP_TOS, IP_PKTINFO,
//! UDP_SEGMENT: QUIC stacks and resolvers do this) also runs the sendmsg hook, because the
//! cmsg makes `udp_sendmsg` treat it as unconnected; the hook then sees no address at all
//! (`0.0.0.0:0`, `[::]:0`). The datagram goes to the socket's connected peer, which is what is
//! judged and recorded there. An unconnected send with port 0 fails with EINVAL before the hook,
//! so port 0 here always means "the connected peer".

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use tank_ebpf_common::{
    allow::{self, ipv4_mapped, AllowKey},
    event::{hook, reason, verdict},
    settings::mode,
};

use crate::record::{current_mode, record, Attempt};
use crate::TANK_ALLOW;

/// What a cgroup sock_addr program returns to let the call proceed.
const SOCK_ADDR_PASS: i32 = 1;
/// What it returns to fail the call with EPERM.
const SOCK_ADDR_REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn tank_connect4(ctx: SockAddrContext) -> i32 {
    gate(&ctx, hook::CONNECT4, destination4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn tank_connect6(ctx: SockAddrContext) -> i32 {
    gate(&ctx, hook::CONNECT6, destination6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tank_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (dst_addr, dst_port) = match user_port(&ctx) {
        0 => peer4(&ctx),
        port => (destination4(&ctx), port),
    };
    judge(&ctx, hook::SENDMSG4, dst_addr, dst_port)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tank_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (dst_addr, dst_port) = match user_port(&ctx) {
        0 => peer6(&ctx),
        port => (destination6(&ctx), port),
    };
    judge(&ctx, hook::SENDMSG6, dst_addr, dst_port)
}

/// The port passed to the call, in host byte order.
#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in destination4. user_port holds the port in network byte order in its first
    // two bytes.
    u16::from_be(unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) } as u16)
}

fn destination4(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: the kernel hands a valid bpf_sock_addr to sock_addr programs.
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    ipv4_mapped(ip.to_ne_bytes())
}

fn destination6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut addr = [0u8; 16];
    // The verifier accepts only 4-byte loads of user_ip6 on older kernels; volatile keeps LLVM
    // from merging them. IPv4-mapped destinations come out as our mapped IPv4 keys.
    for i in 0..4 {
        // SAFETY: as in destination4.
        let word = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    addr
}

/// The connected peer of an IPv4 (or IPv4-mapped) UDP socket: address and port.
fn peer4(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: `sk` is always set for sock_addr programs; bpf_sock fields are read-only loads.
    let sk = unsafe { &*(*ctx.sock_addr).__bindgen_anon_1.sk };
    let ip = unsafe { core::ptr::read_volatile(&sk.dst_ip4) };
    let port = unsafe { core::ptr::read_volatile(&sk.dst_port) };
    (ipv4_mapped(ip.to_ne_bytes()), u16::from_be(port))
}

/// The connected peer of an IPv6 UDP socket: address and port.
fn peer6(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: as in peer4.
    let sk = unsafe { &*(*ctx.sock_addr).__bindgen_anon_1.sk };
    let mut addr = [0u8; 16];
    for i in 0..4 {
        // SAFETY: as in peer4; 4-byte loads, as for user_ip6.
        let word = unsafe { core::ptr::read_volatile(&sk.dst_ip6[i]) };
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let port = unsafe { core::ptr::read_volatile(&sk.dst_port) };
    (addr, u16::from_be(port))
}

/// Judges one attempt to the address passed to the call.
#[inline(always)]
fn gate(ctx: &SockAddrContext, hook: u8, dst_addr: [u8; 16]) -> i32 {
    judge(ctx, hook, dst_addr, user_port(ctx))
}

/// Judges one attempt, records it, and returns the sock_addr verdict.
#[inline(always)]
fn judge(ctx: &SockAddrContext, hook: u8, dst_addr: [u8; 16], dst_port: u16) -> i32 {
    // SAFETY: as in destination4.
    let sa = unsafe { &*ctx.sock_addr };
    let protocol = sa.protocol;
    let key = AllowKey::new(dst_addr, dst_port, protocol as u8);
    // SAFETY: the value is a plain byte read at once.
    let listed = unsafe { TANK_ALLOW.get(&key) }.copied();
    let mode = current_mode();
    let (verdict, reason) = match listed {
        Some(allow::kind::PROXY) => (verdict::ALLOW, reason::PROXY),
        Some(_) => (verdict::ALLOW, reason::LISTED_ENDPOINT),
        None if mode == mode::AUDIT => (verdict::ALLOW, reason::AUDIT_NOT_LISTED),
        None => (verdict::DENY, reason::NOT_LISTED),
    };
    let allowed = record(&Attempt {
        // SAFETY: a helper allowed in sock_addr programs, called with the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        dst_addr,
        dst_port,
        family: sa.family as u16,
        sock_type: sa.type_ as u16,
        protocol: protocol as u16,
        hook,
        reason,
        verdict,
        mode,
    });
    if allowed {
        SOCK_ADDR_PASS
    } else {
        SOCK_ADDR_REJECT
    }
}
