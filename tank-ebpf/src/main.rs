//! tank's kernel programs, all in one object so they share one set of pinned maps.
//!
//! - [`sock_addr`]: the gate. connect4/connect6 (TCP, connected UDP, TCP Fast Open, io_uring
//!   connects) and sendmsg4/sendmsg6 (unconnected UDP `sendto`, `sendmmsg`) let a task in the
//!   guarded cgroup reach only destinations in the allow map.
//! - [`sock_create`]: refuses, in the guarded cgroup, the AF_INET/AF_INET6 sockets no connect
//!   hook judges: raw sockets, ping sockets, protocols other than TCP and UDP.
//! - [`lsm`]: BPF LSM `socket_create`, refusing families other than AF_UNIX, AF_INET, AF_INET6
//!   and AF_NETLINK (AF_VSOCK, AF_PACKET, ...) to the agent cgroup's tasks, where the kernel
//!   lets BPF LSM programs load.
//! - [`sockopt`]: refuses the socket options that route packets past the destination the gate
//!   judged (IPv4 source routes, IPv6 routing and extension headers).
//! - [`egress`]: refuses packets that carry such headers anyway, set per message as ancillary
//!   data; the one per-packet program, reading one or two header bytes.
//! - [`sock_ops`]: once a TCP connection the gate allowed is established, records its local
//!   address and port, so the kernel's record names the whole 4-tuple the proxy sees; and
//!   records every connection accepted into the agent.
//! - [`inbound`]: drops and records TCP connection attempts into the agent from other hosts
//!   (ingress only).
//!
//! Every refusal, and every attempt the gate judges, is one event in the ring buffer
//! ([`record`]). When the ring buffer has no room an attempt is refused (even an allowlisted
//! one) and counted, so nothing is ever allowed unrecorded; audit mode allows it and counts it
//! apart.
//!
//! Kernel requirements: cgroup sock_addr programs (4.17; sendmsg hooks 4.18), cgroup
//! sock_create (4.10), BPF ring buffer (5.8), BPF links for cgroups (5.7; the loader pins them),
//! BPF LSM (5.7, `lsm=...,bpf` on the kernel command line), sock_ops with socket cookies (4.20),
//! cgroup sockopt (5.3), cgroup skb (4.10).
#![no_std]
#![no_main]

mod egress;
mod inbound;
mod lsm;
mod record;
mod skb;
mod sock_addr;
mod sock_create;
mod sock_ops;
mod sockopt;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use tank_ebpf_common::{
    allow::{self, AllowKey},
    counters, event, settings,
};

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

/// A settings slot; an unreadable slot reads as 0, which every slot defines as the strict
/// value (enforce mode, MPTCP refused, LSM scope unset).
#[inline(always)]
fn setting(slot: u32) -> u32 {
    TANK_SETTINGS.get(slot).copied().unwrap_or(0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: BPF LSM programs and several helpers are only available to GPL programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
