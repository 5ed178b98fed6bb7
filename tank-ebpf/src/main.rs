//! tank's kernel gate: cgroup `sock_addr` programs on the agent's cgroup.
//!
//! connect4/connect6 (TCP and connected UDP) and sendmsg4/sendmsg6 (unconnected UDP `sendto`,
//! `sendmmsg`, TCP Fast Open) let a task in the guarded cgroup reach only destinations in the
//! allow map; everything else fails with EPERM. Every attempt, allowed or denied, is one event in
//! the ring buffer. When the ring buffer has no room the attempt is denied (even allowlisted) and
//! counted, so nothing is ever allowed unrecorded; audit mode allows it and counts it apart.
//!
//! Kernel requirements: cgroup sock_addr programs (4.17; sendmsg hooks 4.18), BPF ring buffer
//! (5.8), BPF links for cgroups (5.7; the loader pins them).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
    EbpfContext,
};
use tank_ebpf_common::{
    allow::{self, ipv4_mapped, AllowKey},
    counters,
    event::{self, hook, reason, verdict, Event},
    settings::{self, mode},
};

/// What a cgroup sock_addr program returns to let the call proceed.
const SOCK_ADDR_PASS: i32 = 1;
/// What it returns to fail the call with EPERM.
const SOCK_ADDR_REJECT: i32 = 0;

// Map names are the constants in tank-ebpf-common; aya names a map after its static.
// All maps are pinned by name, so a restarted or upgraded loader reuses the same maps.
#[map]
static TANK_ALLOW: HashMap<AllowKey, u8> = HashMap::pinned(allow::MAX_ENTRIES, 0);

#[map]
static TANK_SETTINGS: Array<u32> = Array::pinned(settings::COUNT, 0);

#[map]
static TANK_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

#[map]
static TANK_EVENTS: RingBuf = RingBuf::pinned(event::DEFAULT_RING_BYTES, 0);

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
    gate(&ctx, hook::SENDMSG4, destination4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tank_sendmsg6(ctx: SockAddrContext) -> i32 {
    gate(&ctx, hook::SENDMSG6, destination6(&ctx))
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

/// Judges one attempt, records it, and returns the sock_addr verdict.
#[inline(always)]
fn gate(ctx: &SockAddrContext, hook: u8, dst_addr: [u8; 16]) -> i32 {
    // SAFETY: as in destination4.
    let sa = unsafe { &*ctx.sock_addr };
    // user_port holds the port in network byte order in its first two bytes.
    let dst_port = u16::from_be(unsafe { core::ptr::read_volatile(&sa.user_port) } as u16);
    let protocol = sa.protocol;
    let key = AllowKey::new(dst_addr, dst_port, protocol as u8);
    // SAFETY: the value is a plain byte read at once.
    let listed = unsafe { TANK_ALLOW.get(&key) }.copied();
    // An unreadable mode is treated as enforce: fail closed.
    let mode = TANK_SETTINGS.get(settings::MODE).copied().unwrap_or(mode::ENFORCE);
    let audit = mode == mode::AUDIT;

    let (verdict, reason) = match listed {
        Some(allow::kind::PROXY) => (verdict::ALLOW, reason::PROXY),
        Some(_) => (verdict::ALLOW, reason::LISTED_ENDPOINT),
        None if audit => (verdict::ALLOW, reason::AUDIT_NOT_LISTED),
        None => (verdict::DENY, reason::NOT_LISTED),
    };

    let Some(mut entry) = TANK_EVENTS.reserve::<Event>(0) else {
        // No room for the record. Enforce mode fails closed: an allowed attempt must never go
        // unrecorded, so it is denied too. Audit mode never denies, so it only counts.
        if audit {
            count(counters::UNRECORDED_ALLOWED);
            return SOCK_ADDR_PASS;
        }
        count(counters::UNRECORDED_DENIED);
        return SOCK_ADDR_REJECT;
    };

    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(Event {
        // SAFETY: helpers allowed in sock_addr programs, called with the program's own context.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        dst_addr,
        src_addr: [0; 16],
        dst_port,
        src_port: 0,
        family: sa.family as u16,
        sock_type: sa.type_ as u16,
        protocol: protocol as u16,
        hook,
        verdict,
        reason,
        mode: mode as u8,
        _pad: [0; 2],
    });
    entry.submit(0);

    if verdict == verdict::ALLOW {
        count(counters::ALLOWED);
        SOCK_ADDR_PASS
    } else {
        count(counters::DENIED);
        SOCK_ADDR_REJECT
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = TANK_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; sock_addr programs run with migration disabled.
        unsafe { *n += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
