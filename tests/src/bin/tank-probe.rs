//! `tank-probe`: one attempt to get out, made with the plain system calls an attacker would use,
//! and its outcome on stdout (`ok`, or the errno name such as `EPERM`).
//!
//! The tests run it inside the guarded cgroup (optionally as an unprivileged user, inside a
//! test network namespace, under the agent's seccomp profile) so each attempt is a real process
//! making a real system call, not a simulation. Options are applied in this order: join the
//! cgroup, enter the network namespace, drop to the user, apply the seccomp profile.
//!
//! Usage: tank-probe [--cgroup DIR] [--netns PATH] [--uid N] [--seccomp] ATTEMPT ARGS...
//!   tcp ADDR:PORT               TCP connect
//!   udp-sendto ADDR:PORT        unconnected UDP sendto
//!   udp-connect ADDR:PORT       connect a UDP socket, then send
//!   udp-sendmmsg ADDR:PORT      two datagrams in one sendmmsg
//!   tcp-fastopen ADDR:PORT      sendto with MSG_FASTOPEN on a fresh TCP socket
//!   io-uring-connect ADDR:PORT  a TCP connect submitted through io_uring
//!   io-uring-setup              create an io_uring instance
//!   dns ADDR:PORT               a DNS query (A example.invalid) over UDP
//!   socket FAMILY TYPE PROTO    create a socket (never connected); FAMILY may exceed 32 bits
//!   socketpair FAMILY TYPE      create a socket pair
//!   exec-child ATTEMPT...       fork+exec tank-probe ATTEMPT...; prints "child=PID OUTCOME"
//!   escape-cgroup DIR ADDR:PORT move to cgroup DIR, then TCP connect; prints "move=.. tcp=.."
//!   detach PIN_DIR CGROUP_DIR   unpin tank's links/maps and BPF_PROG_DETACH its hooks
//!   run CMD ARGS...             run a command; prints "ok" or "exit=N"
//!   flood ADDR:PORT N           N TCP connects; prints "ok=A eperm=B other=C"
//!   reroute HEADER HOW VIA ADDR:PORT MARK
//!                               put HEADER (rthdr, srr, pktoptions, cmsg-srr, cmsg-rthdr,
//!                               cmsg-pktinfo) naming VIA on a send of MARK to ADDR:PORT made
//!                               HOW (udp-sendto, udp-connect, tcp-fastopen, tcp); prints
//!                               "opt=.. send=.." (see tank_integration_tests::reroute)
//!   handed-in scm|pidfd CGROUP UID ADDR:PORT
//!                               a child moves to CGROUP, becomes UID and makes a TCP socket;
//!                               we (still in our cgroup) take it over SCM_RIGHTS or with
//!                               pidfd_getfd and connect it to ADDR:PORT
//!   serve ADDR:PORT MARK SECONDS
//!                               listen on ADDR:PORT, print "ready", then for SECONDS write MARK
//!                               to every connection accepted; prints "accepted=N"
//!   udp-connect-cmsg ADDR:PORT MARK
//!                               connect a UDP socket, then send MARK with an IP_TOS (IPv4) or
//!                               IPV6_TCLASS (IPv6) cmsg

use std::ffi::CString;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{SockaddrLike, SockaddrStorage};
use tank_integration_tests::reroute::{cvt, show, socket as new_socket};

type Outcome = std::io::Result<()>;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(dir) = take_opt(&mut args, "--cgroup") {
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("join the cgroup");
    }
    if let Some(path) = take_opt(&mut args, "--netns") {
        let ns = std::fs::File::open(&path).expect("open the network namespace");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the network namespace");
    }
    let seccomp = args.iter().position(|a| a == "--seccomp").map(|i| {
        args.remove(i);
        tank_integration_tests::seccomp::load_profile()
    });
    if let Some(uid) = take_opt(&mut args, "--uid") {
        let uid: u32 = uid.parse().expect("numeric uid");
        nix::unistd::setgroups(&[]).expect("setgroups");
        nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");
    }
    if let Some(filter) = &seccomp {
        tank_integration_tests::seccomp::apply(filter);
    }
    let attempt = args.first().map(String::as_str).unwrap_or("");
    let target = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let number = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let outcome = match attempt {
        "tcp" => TcpStream::connect_timeout(&target(1), Duration::from_secs(2)).map(drop),
        "udp-sendto" => bind_any(&target(1))
            .and_then(|s| s.send_to(b"probe", target(1)))
            .map(drop),
        "udp-connect" => bind_any(&target(1))
            .and_then(|s| s.connect(target(1)).and_then(|()| s.send(b"probe")))
            .map(drop),
        "udp-sendmmsg" => sendmmsg(&target(1)),
        "tcp-fastopen" => fast_open(&target(1)),
        "io-uring-connect" => io_uring_connect(&target(1)),
        "io-uring-setup" => io_uring::IoUring::new(4).map(drop),
        "dns" => bind_any(&target(1))
            .and_then(|s| s.send_to(&dns_query(), target(1)))
            .map(drop),
        "socket" => raw_socket(libc::SYS_socket, number(1), number(2), number(3)),
        "socketpair" => raw_socket(libc::SYS_socketpair, number(1), number(2), 0),
        "exec-child" => {
            // /proc/self/exe, not our path: the checkout may sit in a directory the probe's
            // dropped uid cannot enter, and the magic link needs no path walk.
            let child = Command::new("/proc/self/exe")
                .args(&args[1..])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("fork and exec the child");
            let pid = child.id();
            let out = child.wait_with_output().expect("wait for the child");
            println!(
                "child={pid} {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
            return;
        }
        "escape-cgroup" => {
            let moved = std::fs::write(
                format!("{}/cgroup.procs", args.get(1).unwrap_or_else(|| usage())),
                std::process::id().to_string(),
            );
            let tcp = TcpStream::connect_timeout(&target(2), Duration::from_secs(2)).map(drop);
            println!("move={} tcp={}", show(&moved), show(&tcp));
            return;
        }
        "detach" => {
            println!(
                "{}",
                detach(
                    args.get(1).unwrap_or_else(|| usage()),
                    args.get(2).unwrap_or_else(|| usage())
                )
            );
            return;
        }
        "run" => {
            let status = Command::new(args.get(1).unwrap_or_else(|| usage()))
                .args(&args[2..])
                .status()
                .expect("run the command");
            println!(
                "{}",
                if status.success() {
                    "ok".to_owned()
                } else {
                    format!("exit={}", status.code().unwrap_or(-1))
                }
            );
            return;
        }
        "reroute" => {
            use tank_integration_tests::reroute::{attempt, Header, Send};
            let header = args
                .get(1)
                .and_then(|a| Header::parse(a))
                .unwrap_or_else(|| usage());
            let how = args
                .get(2)
                .and_then(|a| Send::parse(a))
                .unwrap_or_else(|| usage());
            let via = args
                .get(3)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage());
            let mark = args.get(5).unwrap_or_else(|| usage());
            println!("{}", attempt(header, how, via, target(4), mark.as_bytes()));
            return;
        }
        "serve" => {
            let listener = std::net::TcpListener::bind(target(1)).expect("listen");
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            println!("ready");
            let mark = args.get(2).unwrap_or_else(|| usage());
            let until = std::time::Instant::now() + Duration::from_secs(number(3));
            let mut accepted = 0;
            while std::time::Instant::now() < until {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        accepted += 1;
                        let _ = std::io::Write::write_all(&mut conn, mark.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            println!("accepted={accepted}");
            return;
        }
        "handed-in" => handed_in(
            args.get(1).unwrap_or_else(|| usage()),
            args.get(2).unwrap_or_else(|| usage()),
            number(3) as u32,
            &target(4),
        ),
        "udp-connect-cmsg" => udp_connect_cmsg(&target(1), args.get(2).unwrap_or_else(|| usage())),
        "flood" => {
            let n = number(2);
            let (mut ok, mut eperm, mut other) = (0, 0, 0);
            for _ in 0..n {
                match TcpStream::connect_timeout(&target(1), Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => other += 1,
                }
            }
            println!("ok={ok} eperm={eperm} other={other}");
            return;
        }
        _ => usage(),
    };
    println!("{}", show(&outcome));
}

fn bind_any(target: &SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
}

/// A TCP socket made outside our cgroup by another uid, handed to us, then connected.
fn handed_in(how: &str, cgroup: &str, uid: u32, target: &SocketAddr) -> Outcome {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (mut ours, mut theirs) = UnixStream::pair()?;
    // SAFETY: fork in a single-threaded probe; the child only makes syscalls and exits.
    let child = match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            std::fs::write(format!("{cgroup}/cgroup.procs"), "0")
                .expect("move to the creator cgroup");
            nix::unistd::setgroups(&[]).expect("setgroups");
            nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");
            let sock = new_socket(target, libc::SOCK_STREAM).expect("creator's socket");
            let fd = sock.as_raw_fd();
            if how == "scm" {
                nix::sys::socket::sendmsg::<()>(
                    theirs.as_raw_fd(),
                    &[std::io::IoSlice::new(b"s")],
                    &[nix::sys::socket::ControlMessage::ScmRights(&[fd])],
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .expect("SCM_RIGHTS");
            } else {
                theirs
                    .write_all(&fd.to_ne_bytes())
                    .expect("tell the fd number");
            }
            // Hold the socket until the parent says it has its own copy.
            let _ = theirs.read(&mut [0u8; 1]);
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(theirs);
    let sock = if how == "scm" {
        let mut buf = [0u8; 1];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            ours.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let fd = msg
            .cmsgs()?
            .find_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .ok_or_else(|| std::io::Error::other("no descriptor passed"))?;
        // SAFETY: a descriptor SCM_RIGHTS just installed for us.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    } else {
        let mut number = [0u8; 4];
        ours.read_exact(&mut number)?;
        // SAFETY: plain pidfd_open(2)/pidfd_getfd(2); the descriptors are owned at once.
        let pidfd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) } as i32)?;
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
        let fd = cvt(unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                pidfd.as_raw_fd(),
                i32::from_ne_bytes(number),
                0,
            )
        } as i32)?;
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    };
    ours.write_all(b"k")?;
    let _ = nix::sys::wait::waitpid(child, None);
    let addr = SockaddrStorage::from(*target);
    // SAFETY: addr outlives the call.
    cvt(unsafe { libc::connect(sock.as_raw_fd(), addr.as_ptr(), addr.len()) }).map(drop)
}

/// A connected UDP socket's send with ancillary data, as QUIC stacks and resolvers make it.
fn udp_connect_cmsg(target: &SocketAddr, mark: &str) -> Outcome {
    use tank_integration_tests::reroute::{control, sendmsg};
    let sock = new_socket(target, libc::SOCK_DGRAM)?;
    let addr = SockaddrStorage::from(*target);
    // SAFETY: addr outlives the call.
    cvt(unsafe { libc::connect(sock.as_raw_fd(), addr.as_ptr(), addr.len()) })?;
    let tos = 0x10i32.to_ne_bytes();
    let cmsg = if target.is_ipv4() {
        control(libc::SOL_IP, libc::IP_TOS, &tos)
    } else {
        control(libc::SOL_IPV6, libc::IPV6_TCLASS, &tos)
    };
    sendmsg(sock.as_raw_fd(), None, &cmsg, mark.as_bytes(), 0)
}

/// socket(2)/socketpair(2) through syscall(2), so a family with bits above 32 reaches the
/// kernel (and the seccomp filter) exactly as given. The socket is closed at once.
fn raw_socket(nr: libc::c_long, family: u64, sock_type: u64, protocol: u64) -> Outcome {
    let mut fds = [0i32; 2];
    // SAFETY: raw socket(2)/socketpair(2); the last argument is only read by socketpair.
    let rc = unsafe { libc::syscall(nr, family, sock_type, protocol, fds.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let opened: &[i32] = if nr == libc::SYS_socketpair {
        &fds
    } else {
        &[rc as i32]
    };
    for fd in opened {
        // SAFETY: descriptors the call just returned.
        unsafe { libc::close(*fd) };
    }
    Ok(())
}

fn sendmmsg(target: &SocketAddr) -> Outcome {
    let sock = new_socket(target, libc::SOCK_DGRAM)?;
    let addr = SockaddrStorage::from(*target);
    let mut payloads = [*b"probe-1", *b"probe-2"];
    let mut iovs: Vec<libc::iovec> = payloads
        .iter_mut()
        .map(|p| libc::iovec {
            iov_base: p.as_mut_ptr().cast(),
            iov_len: p.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is valid; the fields that matter are set below.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = addr.len();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs, their iovecs, payloads and addr outlive the call.
    cvt(unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) })
        .map(drop)
}

fn fast_open(target: &SocketAddr) -> Outcome {
    let sock = new_socket(target, libc::SOCK_STREAM)?;
    let addr = SockaddrStorage::from(*target);
    let data = b"GET / HTTP/1.0\r\n\r\n";
    // SAFETY: data and addr outlive the call.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            addr.as_ptr(),
            addr.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn io_uring_connect(target: &SocketAddr) -> Outcome {
    let mut ring = io_uring::IoUring::new(4)?;
    let sock = new_socket(target, libc::SOCK_STREAM)?;
    let addr = SockaddrStorage::from(*target);
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(sock.as_raw_fd()),
        addr.as_ptr(),
        addr.len(),
    )
    .build();
    // SAFETY: sock and addr outlive the operation: we wait for its completion below.
    unsafe { ring.submission().push(&op) }
        .map_err(|_| std::io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let result = ring.completion().next().expect("one completion").result();
    if result < 0 {
        return Err(std::io::Error::from_raw_os_error(-result));
    }
    Ok(())
}

/// A minimal DNS query: id 0x7461, recursion desired, one question `example.invalid IN A`.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x74, 0x61, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "invalid"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Tries, as whoever runs it, to take tank's enforcement apart: unpin every link and map,
/// open a pinned link, enumerate programs and links by id, and detach each hook's programs
/// from the cgroup with BPF_PROG_DETACH.
fn detach(pin_dir: &str, cgroup_dir: &str) -> String {
    let mut results = Vec::new();
    let pins = tank_loader::gate::HOOKS
        .iter()
        .chain([&tank_loader::gate::LSM_HOOK])
        .map(|h| tank_loader::gate::link_pin(std::path::Path::new(pin_dir), h))
        .chain(
            [
                "TANK_ALLOW",
                "TANK_SETTINGS",
                "TANK_COUNTERS",
                "TANK_EVENTS",
            ]
            .map(|m| std::path::Path::new(pin_dir).join(m)),
        );
    for pin in pins {
        results.push(format!(
            "unlink {}={}",
            pin.display(),
            show(&std::fs::remove_file(&pin))
        ));
    }
    let link =
        tank_loader::gate::link_pin(std::path::Path::new(pin_dir), &tank_loader::gate::HOOKS[0]);
    results.push(format!("obj_get={}", show(&bpf_obj_get(&link))));
    // Descriptors by id would let BPF_LINK_DETACH work without the pins.
    for (name, cmd) in [
        ("link_next_id", BPF_LINK_GET_NEXT_ID),
        ("prog_next_id", BPF_PROG_GET_NEXT_ID),
    ] {
        results.push(format!(
            "{name}={}",
            show(&bpf(cmd, &mut [0u64; 8]).map(drop))
        ));
    }
    match std::fs::File::open(cgroup_dir) {
        Ok(cgroup) => {
            for hook in tank_loader::gate::HOOKS {
                let attach_type = hook.cgroup_attach_type().expect("cgroup hook");
                results.push(format!(
                    "prog_detach {}={}",
                    hook.name(),
                    show(&bpf_prog_detach(&cgroup, attach_type))
                ));
            }
        }
        Err(e) => results.push(format!("open cgroup={}", show(&Err(e)))),
    }
    results.join(";")
}

const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised bpf_attr prefix large enough for both commands.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn bpf_prog_detach(cgroup: &std::fs::File, attach_type: u32) -> Outcome {
    // target_fd (u32), attach_bpf_fd (u32), attach_type (u32), attach_flags (u32).
    let mut attr = [0u64; 8];
    attr[0] = u64::from(cgroup.as_raw_fd() as u32);
    attr[1] = u64::from(attach_type);
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

fn bpf_obj_get(path: &std::path::Path) -> Outcome {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
    // pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the descriptor BPF_OBJ_GET just returned; closing it changes nothing pinned.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn take_opt(args: &mut Vec<String>, name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    let value = args.get(i + 1).cloned().unwrap_or_else(|| usage());
    args.drain(i..=i + 1);
    Some(value)
}

fn usage() -> ! {
    eprintln!("usage: tank-probe [--cgroup DIR] [--netns PATH] [--uid N] [--seccomp] ATTEMPT ARGS... (see the source's header)");
    std::process::exit(2)
}
