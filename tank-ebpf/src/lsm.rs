//! BPF LSM `socket_create`: socket families no cgroup hook sees.
//!
//! The cgroup sock_create hook runs only for AF_INET/AF_INET6. AF_VSOCK reaches the hypervisor
//! around every IP control, AF_PACKET writes frames below IP, and a coding agent needs neither;
//! so the agent's tasks may create only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK sockets.
//!
//! An LSM program runs for every task on the host, so it scopes itself: the task's cgroup
//! ancestor at the agent cgroup's depth must be the agent cgroup (ids in the settings map). The
//! loader writes the scope before attaching; while it is unset the program judges nothing,
//! because refusing sockets host-wide would break the host. Kernel sockets (`kern`) are
//! never judged: the kernel creates them on its own behalf.
//!
//! Loads only where the kernel allows BPF LSM programs (5.7+, `bpf` in the active LSM list;
//! Fedora does). Elsewhere the loader says so on every start and in `status`, and the seccomp
//! profile under image/seccomp holds the same family list.

use aya_ebpf::{
    helpers::generated::bpf_get_current_ancestor_cgroup_id, macros::lsm, programs::LsmContext,
};
use tank_ebpf_common::{
    event::{hook, reason},
    settings,
};

use crate::record::{current_mode, record, refusal_verdict, Attempt};
use crate::setting;

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const EPERM: i32 = 1;

#[lsm(hook = "socket_create")]
pub fn tank_socket_create(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_create, int family, int type, int protocol, int kern), and the
    // previous LSM program's verdict as the last argument.
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        // Another LSM program refused already: keep its answer.
        return previous;
    }
    if kern != 0
        || matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK)
        || !in_agent_cgroup()
    {
        return 0;
    }
    let mode = current_mode();
    let allowed = record(&Attempt {
        cookie: 0,
        dst_addr: [0; 16],
        dst_port: 0,
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        hook: hook::LSM_SOCKET_CREATE,
        reason: reason::FAMILY_NOT_ALLOWED,
        verdict: refusal_verdict(mode),
        mode,
    });
    if allowed {
        0
    } else {
        -EPERM
    }
}

/// Whether the current task is in the agent cgroup or below it.
#[inline(always)]
fn in_agent_cgroup() -> bool {
    let id = u64::from(setting(settings::AGENT_ID_LO))
        | (u64::from(setting(settings::AGENT_ID_HI)) << 32);
    if id == 0 {
        return false;
    }
    // SAFETY: a helper available to LSM programs; an out-of-range level returns 0.
    let ancestor =
        unsafe { bpf_get_current_ancestor_cgroup_id(setting(settings::AGENT_LEVEL) as i32) };
    ancestor == id
}
