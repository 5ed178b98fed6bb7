//! Writing one event to the ring buffer and counting it: shared by every program, so each
//! records the same fields the same way and the "no room" rule is decided once.

use aya_ebpf::bindings::{
    BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
};
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

/// The verdict of something a program refuses: audit mode refuses nothing (the reason still
/// says what enforce mode would do).
#[inline(always)]
pub fn refusal_verdict(mode: u32) -> u8 {
    if mode == mode::AUDIT {
        verdict::ALLOW
    } else {
        verdict::DENY
    }
}

/// Records `a` and returns whether the attempt may go ahead.
///
/// With no room in the ring buffer, enforce mode refuses the attempt: an allowed attempt must
/// never go unrecorded, so it is refused too. Audit mode never refuses, so it only counts.
#[inline(always)]
pub fn record(a: &Attempt) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    record_as(
        a,
        None,
        Task {
            pid: pid_tgid as u32,
            tgid: (pid_tgid >> 32) as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            // SAFETY: a helper every program type that calls `record` may call, no arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        },
    )
}

/// [`record`] for a packet: programs that may run outside the sending task (in softirq, on
/// a retransmit) name the socket's owner and cgroup instead of whatever task is current.
/// `local` is the agent's end, where the packet names it.
#[inline(always)]
pub fn record_packet(
    a: &Attempt,
    local: Option<([u8; 16], u16)>,
    uid: u32,
    cgroup_id: u64,
) -> bool {
    record_as(
        a,
        local,
        Task {
            uid,
            cgroup_id,
            ..Task::NONE
        },
    )
}

#[inline(always)]
fn record_as(a: &Attempt, local: Option<([u8; 16], u16)>, task: Task) -> bool {
    let written = write(a, task, local);
    if !written {
        if a.mode == mode::AUDIT {
            count(counters::UNRECORDED_ALLOWED);
            return true;
        }
        count(counters::UNRECORDED_DENIED);
        return false;
    }
    if a.verdict == verdict::ALLOW {
        count(counters::ALLOWED);
        true
    } else {
        count(counters::DENIED);
        false
    }
}

/// Records the 4-tuple of an established connection (`a` describes the remote end,
/// `local` the address and port the kernel chose). It cannot refuse anything: the attempt
/// was judged and recorded at connect. With no room it is counted, so `status` shows that
/// a cross-check will miss this connection's 4-tuple.
#[inline(always)]
pub fn record_established(a: &Attempt, local: ([u8; 16], u16)) {
    // The callback runs in softirq or on whichever task releases the socket: there is no
    // meaningful current task. Userspace joins the attempt's task by cookie.
    if !write(a, Task::NONE, Some(local)) {
        count(counters::UNRECORDED_ESTABLISHED);
    }
}

/// Who made an attempt.
struct Task {
    pid: u32,
    tgid: u32,
    uid: u32,
    gid: u32,
    comm: [u8; 16],
    cgroup_id: u64,
}

impl Task {
    const NONE: Task = Task {
        pid: 0,
        tgid: 0,
        uid: 0,
        gid: 0,
        comm: [0; 16],
        cgroup_id: 0,
    };
}

/// Writes one event; false when the ring buffer has no room.
///
/// The reader is woken only when the events waiting cross another eighth of the ring; below
/// the first it finds them at its own 250 ms tick. The kernel's default wakes it whenever it
/// has caught up, so at a modest rate of attempts it woke, drained one or two events and
/// synced the log once per attempt, on the same cores as the attempts (issue 10, item 7).
/// Waking on every event past an eighth instead (as this did before) cost a wakeup interrupt
/// per attempt whenever the reader was behind or stopped, which is when attempts come
/// fastest: the denied flood fell from 1.74M to 0.23M attempts/s. Events sit in the pinned
/// ring buffer until drained, so a later wakeup delays the log line, never loses it.
#[inline(always)]
fn write(a: &Attempt, task: Task, local: Option<([u8; 16], u16)>) -> bool {
    let Some(mut entry) = TANK_EVENTS.reserve::<Event>(0) else {
        return false;
    };
    let (src_addr, src_port) = local.unwrap_or(([0; 16], 0));
    entry.write(Event {
        // SAFETY: a helper every program type of this object may call, with no arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cookie: a.cookie,
        cgroup_id: task.cgroup_id,
        pid: task.pid,
        tgid: task.tgid,
        uid: task.uid,
        gid: task.gid,
        comm: task.comm,
        dst_addr: a.dst_addr,
        src_addr,
        dst_port: a.dst_port,
        src_port,
        family: a.family,
        sock_type: a.sock_type,
        protocol: a.protocol,
        hook: a.hook,
        verdict: a.verdict,
        reason: a.reason,
        mode: a.mode as u8,
        _pad: [0; 2],
    });
    entry.submit(wakeup());
    true
}

/// Bytes an event takes in the ring buffer: its 8-byte header and the event, 8-aligned.
const SLOT: u64 = (8 + core::mem::size_of::<Event>() as u64).next_multiple_of(8);

/// Submit flags: wake the reader only for the event that takes the waiting bytes past another
/// eighth of the ring buffer. Concurrent writers may step over a boundary together, and then
/// nobody wakes the reader for that eighth: the next eighth, or the reader's tick, does.
#[inline(always)]
fn wakeup() -> u64 {
    // Reserved but not yet read, this event included.
    let waiting = TANK_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let step = TANK_EVENTS.query(BPF_RB_RING_SIZE as u64) / 8;
    if step > 0 && waiting >= step && waiting % step < SLOT {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = TANK_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; BPF programs run with migration disabled.
        unsafe { *n += 1 };
    }
}
