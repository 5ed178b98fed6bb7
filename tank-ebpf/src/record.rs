//! Writing one event to the ring buffer and counting it: shared by every program, so each
//! records the same fields the same way and the "no room" rule is decided once.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
};
use tank_ebpf_common::{
    counters,
    event::{verdict, Event},
    settings::{self, mode},
};

use crate::{setting, TANK_COUNTERS, TANK_EVENTS};

/// What a program decided about one attempt; the task's identity is added here.
pub struct Attempt {
    /// Socket cookie, where the hook has a socket (0 otherwise).
    pub cookie: u64,
    /// Destination (IPv4 mapped into IPv6), zero where there is none yet.
    pub dst_addr: [u8; 16],
    /// Destination port, zero where there is none yet.
    pub dst_port: u16,
    /// Socket family, type and protocol.
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    /// Which program judged it, and why (codes from `tank_ebpf_common::event`).
    pub hook: u8,
    pub reason: u8,
    /// The verdict before the "no room to record" rule: `verdict::ALLOW` or `verdict::DENY`.
    pub verdict: u8,
    /// The mode in force.
    pub mode: u32,
}

/// The mode in force. An unreadable mode is enforce: fail closed.
#[inline(always)]
pub fn current_mode() -> u32 {
    setting(settings::MODE)
}

/// Records `a` and returns whether the attempt may go ahead.
///
/// With no room in the ring buffer, enforce mode refuses the attempt: an allowed attempt must
/// never go unrecorded, so it is refused too. Audit mode never refuses, so it only counts.
#[inline(always)]
pub fn record(a: &Attempt) -> bool {
    let audit = a.mode == mode::AUDIT;
    let Some(mut entry) = TANK_EVENTS.reserve::<Event>(0) else {
        if audit {
            count(counters::UNRECORDED_ALLOWED);
            return true;
        }
        count(counters::UNRECORDED_DENIED);
        return false;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(Event {
        // SAFETY: helpers every program type of this object may call, with no arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cookie: a.cookie,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        dst_addr: a.dst_addr,
        src_addr: [0; 16],
        dst_port: a.dst_port,
        src_port: 0,
        family: a.family,
        sock_type: a.sock_type,
        protocol: a.protocol,
        hook: a.hook,
        verdict: a.verdict,
        reason: a.reason,
        mode: a.mode as u8,
        _pad: [0; 2],
    });
    entry.submit(0);
    if a.verdict == verdict::ALLOW {
        count(counters::ALLOWED);
        true
    } else {
        count(counters::DENIED);
        false
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = TANK_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; BPF programs run with migration disabled.
        unsafe { *n += 1 };
    }
}
