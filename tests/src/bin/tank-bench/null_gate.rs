//! The null gate: at every cgroup hook the real gate uses (`tank_loader::gate::HOOKS`, so a
//! hook added there is added here), a program that lets everything through at once and
//! records nothing. Its cgroup measured beside the unconfined and the guarded ones splits the
//! gate's connect cost in two: what any gate on these hooks costs (the kernel's code around
//! each hook plus one empty program run: the floor), and what tank's programs do on top
//! (judging, recording).
//!
//! Loaded from raw instructions (no object file to build) and attached by BPF links this
//! process holds: the kernel detaches them when it exits, also if it dies.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use tank_integration_tests::bpf_fd;
use tank_loader::gate::{HookKind, HOOKS};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

// `enum bpf_prog_type` values.
const CGROUP_SKB: u32 = 8;
const CGROUP_SOCK: u32 = 9;
const SOCK_OPS: u32 = 13;
const CGROUP_SOCK_ADDR: u32 = 18;
const CGROUP_SOCKOPT: u32 = 25;

/// `r0 = 1; exit`: allow (every one of these program types reads 1 as "go on").
const ALLOW: [u64; 2] = [mov64_imm(0, 1), EXIT];
/// `r2 = 0; optlen = r2; r0 = 1; exit`: the setsockopt hook's allow. As tank's program does,
/// it sets `optlen` 0 (use the caller's value); leaving it makes the kernel copy the value
/// into a buffer of its own on every call, a cost tank does not pay.
const SOCKOPT_ALLOW: [u64; 4] = [
    mov64_imm(2, 0),
    // `struct bpf_sockopt`: three pointers, then level, optname, optlen (offset 32).
    stx_w(1, 2, 32),
    mov64_imm(0, 1),
    EXIT,
];
const EXIT: u64 = 0x95;

/// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov64_imm(dst: u64, imm: u32) -> u64 {
    0xb7 | dst << 8 | (imm as u64) << 32
}

/// `*(u32 *)(dst + off) = src` (BPF_STX | BPF_MEM | BPF_W).
const fn stx_w(dst: u64, src: u64, off: u16) -> u64 {
    0x63 | (dst | src << 4) << 8 | (off as u64) << 16
}

/// The null programs' links on one cgroup; dropping it detaches them.
pub struct NullGate {
    _links: Vec<OwnedFd>,
}

impl NullGate {
    /// Attaches a null program to `cgroup` at every cgroup hook of the real gate.
    pub fn attach(cgroup: &Path) -> Self {
        let dir = std::fs::File::open(cgroup)
            .unwrap_or_else(|e| panic!("cannot open cgroup {}: {e}", cgroup.display()));
        let links = HOOKS
            .iter()
            .filter_map(|hook| {
                let attach_type = hook.cgroup_attach_type()?;
                let (prog_type, insns): (u32, &[u64]) = match hook.kind {
                    HookKind::SockAddr(_) => (CGROUP_SOCK_ADDR, &ALLOW),
                    HookKind::Sock(_) => (CGROUP_SOCK, &ALLOW),
                    HookKind::SockOps => (SOCK_OPS, &ALLOW),
                    HookKind::Sockopt => (CGROUP_SOCKOPT, &SOCKOPT_ALLOW),
                    HookKind::Skb(_) => (CGROUP_SKB, &ALLOW),
                    HookKind::Lsm(_) => return None,
                };
                let prog = load(prog_type, attach_type, insns, hook.name());
                Some(link(&prog, &dir, attach_type, hook.name()))
            })
            .collect();
        Self { _links: links }
    }
}

/// `BPF_PROG_LOAD` of `insns` as a `prog_type` program for `attach_type`.
fn load(prog_type: u32, attach_type: u32, insns: &[u64], what: &str) -> OwnedFd {
    let license = c"GPL";
    let ptr = |p: u64| [p as u32, (p >> 32) as u32];
    let [insns_lo, insns_hi] = ptr(insns.as_ptr() as u64);
    let [license_lo, license_hi] = ptr(license.as_ptr() as u64);
    // `union bpf_attr`'s load member, by 4-byte word: prog_type, insn_cnt, insns, license,
    // log_level, log_size, log_buf (2), kern_version, prog_flags, prog_name (4),
    // prog_ifindex, expected_attach_type (word 17); the rest zero.
    let mut attr = [0u32; 32];
    attr[..6].copy_from_slice(&[
        prog_type,
        insns.len() as u32,
        insns_lo,
        insns_hi,
        license_lo,
        license_hi,
    ]);
    attr[17] = attach_type;
    bpf_fd(
        BPF_PROG_LOAD,
        &mut attr,
        &format!("null program for {what}"),
    )
}

/// `BPF_LINK_CREATE` of `prog` on `cgroup` at `attach_type`.
fn link(prog: &OwnedFd, cgroup: &std::fs::File, attach_type: u32, what: &str) -> OwnedFd {
    // `link_create`: prog_fd, target_fd, attach_type, flags.
    let mut attr = [0u32; 16];
    attr[..3].copy_from_slice(&[
        prog.as_raw_fd() as u32,
        cgroup.as_raw_fd() as u32,
        attach_type,
    ]);
    bpf_fd(BPF_LINK_CREATE, &mut attr, &format!("null link for {what}"))
}
