//! `BPF_PROG_QUERY`: which programs are attached directly to a cgroup for one hook.
//!
//! aya 0.14 offers no query for cgroup sock_addr attachments, and `status` and the tests
//! must see the kernel's own answer (not what the loader believes it attached).

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_QUERY: libc::c_long = 16;

/// `bpf_attr` for `BPF_PROG_QUERY` (include/uapi/linux/bpf.h, stable since 4.15).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached directly (not inherited) to `cgroup` at `attach_type`.
pub fn attached_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix and ids outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}
