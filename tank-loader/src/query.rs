//! The few `bpf(2)` commands aya 0.14 does not offer in the form tank needs.
//!
//! - `BPF_PROG_QUERY`: which programs are attached directly to a cgroup for one hook. aya 0.14
//!   offers no query for cgroup attachments, and `status` and the tests must see the kernel's
//!   own answer (not what the loader believes it attached).
//! - `BPF_LINK_CREATE` and `BPF_OBJ_PIN` for the cgroup sockopt link: aya 0.14 cannot turn a
//!   `CgroupSockoptLink` into the `FdLink` that pinning needs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

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

/// A BPF link of `program` on `cgroup` at `attach_type` (the kernel's `bpf_link_create`).
pub fn cgroup_link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    // bpf_attr.link_create: prog_fd, target_fd, attach_type, flags; the rest zero.
    let mut attr = [0u32; 16];
    attr[0] = program.as_raw_fd() as u32;
    attr[1] = cgroup.as_raw_fd() as u32;
    attr[2] = attach_type;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the BPF object behind `fd` at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    // bpf_attr.obj_pin: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u32; 16];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

fn bpf(cmd: libc::c_long, attr: &mut [u32; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr for `cmd`; pointers in it outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}
