//! Attempts to send the agent's packets somewhere other than the destination the gate judges:
//! IPv4 source routes and IPv6 routing headers, set as socket options or per message as
//! ancillary data, and the per-message source options (`IP_PKTINFO`/`IPV6_PKTINFO`) that only
//! look as if they could. `tank-probe reroute` runs them; tests/tests/reroute.rs judges them by
//! what arrives on the far side.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{SockaddrLike, SockaddrStorage};

/// How a header is put on the packets.
#[derive(Clone, Copy, Debug)]
pub enum Header {
    /// `setsockopt(IPV6_RTHDR)` with a type 4 (segment routing) header whose first segment is
    /// the detour address.
    Rthdr,
    /// `setsockopt(IP_OPTIONS)` with a loose source route through the detour address.
    Srr,
    /// `setsockopt(IPV6_2292PKTOPTIONS)` holding an `IPV6_RTHDR` cmsg (type 2, as the kernel
    /// accepts from ancillary data) through the detour address.
    PktOptions,
    /// An `IP_RETOPTS` cmsg with a loose source route, on one sendmsg.
    CmsgSrr,
    /// An `IPV6_RTHDR` cmsg (type 2) on one sendmsg.
    CmsgRthdr,
    /// An `IP_PKTINFO`/`IPV6_PKTINFO` cmsg naming the detour address as the source, on one
    /// sendmsg: it chooses the source and interface, never the destination.
    CmsgPktinfo,
}

/// How the probe then sends to the (allowed) destination.
#[derive(Clone, Copy, Debug)]
pub enum Send {
    /// Unconnected UDP `sendto`.
    UdpSendto,
    /// UDP `connect`, then `send`.
    UdpConnect,
    /// `sendto(MSG_FASTOPEN)` on a fresh TCP socket.
    TcpFastOpen,
    /// TCP connect, then the header, then a write on the established connection.
    TcpEstablished,
}

impl Header {
    /// Parses the probe's argument.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "rthdr" => Self::Rthdr,
            "srr" => Self::Srr,
            "pktoptions" => Self::PktOptions,
            "cmsg-srr" => Self::CmsgSrr,
            "cmsg-rthdr" => Self::CmsgRthdr,
            "cmsg-pktinfo" => Self::CmsgPktinfo,
            _ => return None,
        })
    }

    fn is_cmsg(self) -> bool {
        matches!(self, Self::CmsgSrr | Self::CmsgRthdr | Self::CmsgPktinfo)
    }
}

impl Send {
    /// Parses the probe's argument.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "udp-sendto" => Self::UdpSendto,
            "udp-connect" => Self::UdpConnect,
            "tcp-fastopen" => Self::TcpFastOpen,
            "tcp" => Self::TcpEstablished,
            _ => return None,
        })
    }
}

/// Runs one attempt and returns `opt=<outcome> send=<outcome>` (`ok` or an errno name; `-`
/// where that step does not apply).
pub fn attempt(header: Header, how: Send, via: IpAddr, target: SocketAddr, mark: &[u8]) -> String {
    let sock_type = match how {
        Send::UdpSendto | Send::UdpConnect => libc::SOCK_DGRAM,
        Send::TcpFastOpen | Send::TcpEstablished => libc::SOCK_STREAM,
    };
    let sock = match socket(&target, sock_type) {
        Ok(s) => s,
        Err(e) => return format!("socket={}", show(&Err(e))),
    };
    let addr = SockaddrStorage::from(target);
    let fd = sock.as_raw_fd();
    // A SYN sent to the detour is dropped there (no source routing accepted): bound the wait.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: timeout outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of_val(&timeout) as u32,
        )
    };
    let mut opt = "-".to_owned();
    if let Send::UdpConnect | Send::TcpEstablished = how {
        // SAFETY: addr outlives the call.
        if let Err(e) = cvt(unsafe { libc::connect(fd, addr.as_ptr(), addr.len()) }) {
            return format!("connect={}", show(&Err(e)));
        }
    }
    if !header.is_cmsg() {
        opt = show(&set_header(fd, header, via));
    }
    let dest = matches!(how, Send::UdpSendto | Send::TcpFastOpen).then_some(&addr);
    let flags = if let Send::TcpFastOpen = how {
        libc::MSG_FASTOPEN
    } else {
        0
    };
    let control = if header.is_cmsg() {
        cmsg(header, via)
    } else {
        Vec::new()
    };
    let send = sendmsg(fd, dest, &control, mark, flags);
    // Give a TCP segment time to leave before the socket closes.
    std::thread::sleep(std::time::Duration::from_millis(100));
    format!("opt={opt} send={}", show(&send))
}

/// A type 4 routing header with two segments; the kernel fills segment 0 with the destination
/// and sends to segment 1 (`segments_left` = 1): `via`.
fn srh(via: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0, 4, 4, 1, 1, 0, 0, 0];
    h.extend_from_slice(&[0; 16]);
    h.extend_from_slice(&via);
    h
}

/// A type 2 routing header (the only kind ancillary data may carry, with CONFIG_IPV6_MIP6).
fn rthdr2(via: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0, 2, 2, 1, 0, 0, 0, 0];
    h.extend_from_slice(&via);
    h
}

/// An IPv4 loose source route whose first hop is `via` (the kernel appends the destination).
fn lsrr(via: [u8; 4]) -> Vec<u8> {
    let mut o = vec![131, 7, 4];
    o.extend_from_slice(&via);
    o.push(0); // IPOPT_END, padding to a word
    o
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn v4(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or([0; 4], |a| a.octets()),
    }
}

fn set_header(fd: i32, header: Header, via: IpAddr) -> std::io::Result<()> {
    let (level, name, value) = match header {
        Header::Rthdr => (libc::SOL_IPV6, libc::IPV6_RTHDR, srh(v6(via))),
        Header::Srr => (libc::SOL_IP, libc::IP_OPTIONS, lsrr(v4(via))),
        Header::PktOptions => (
            libc::SOL_IPV6,
            6, // IPV6_2292PKTOPTIONS
            control(libc::SOL_IPV6, libc::IPV6_RTHDR, &rthdr2(v6(via))),
        ),
        _ => unreachable!("ancillary data is sent with the message"),
    };
    // SAFETY: value outlives the call.
    cvt(unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as u32) })
        .map(drop)
}

fn cmsg(header: Header, via: IpAddr) -> Vec<u8> {
    match (header, via) {
        (Header::CmsgSrr, _) => control(libc::SOL_IP, libc::IP_RETOPTS, &lsrr(v4(via))),
        (Header::CmsgRthdr, _) => control(libc::SOL_IPV6, libc::IPV6_RTHDR, &rthdr2(v6(via))),
        (Header::CmsgPktinfo, IpAddr::V4(a)) => {
            // struct in_pktinfo { ifindex, spec_dst (the source), addr }
            let mut info = vec![0u8; 12];
            info[4..8].copy_from_slice(&a.octets());
            control(libc::SOL_IP, libc::IP_PKTINFO, &info)
        }
        (Header::CmsgPktinfo, IpAddr::V6(a)) => {
            // struct in6_pktinfo { addr, ifindex }
            let mut info = a.octets().to_vec();
            info.extend_from_slice(&0u32.to_ne_bytes());
            control(libc::SOL_IPV6, libc::IPV6_PKTINFO, &info)
        }
        _ => unreachable!("socket options are set before sending"),
    }
}

/// One control message (`cmsghdr` + data, padded as CMSG_SPACE).
pub fn control(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
    // SAFETY: CMSG_* are pure arithmetic on lengths.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(data.len() as u32) as usize,
            libc::CMSG_LEN(data.len() as u32) as usize,
        )
    };
    let mut buf = vec![0u8; space];
    let header = libc::cmsghdr {
        cmsg_len: len,
        cmsg_level: level,
        cmsg_type: ty,
    };
    let hlen = std::mem::size_of::<libc::cmsghdr>();
    // SAFETY: buf holds at least a cmsghdr; it is plain old data.
    unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast(), header) };
    buf[hlen..hlen + data.len()].copy_from_slice(data);
    buf
}

/// sendmsg(2) of `payload` with `control` to `dest` (or the connected peer).
pub fn sendmsg(
    fd: i32,
    dest: Option<&SockaddrStorage>,
    control: &[u8],
    payload: &[u8],
    flags: i32,
) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some(d) = dest {
        msg.msg_name = d.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = d.len();
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !control.is_empty() {
        msg.msg_control = control.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len();
    }
    // SAFETY: everything msg points to outlives the call.
    let rc = unsafe { libc::sendmsg(fd, &msg, flags) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A socket of `target`'s family.
pub fn socket(target: &SocketAddr, sock_type: i32) -> std::io::Result<OwnedFd> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = cvt(unsafe { libc::socket(family, sock_type | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ok` or the errno's name.
pub fn show(outcome: &std::io::Result<()>) -> String {
    match outcome {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.raw_os_error().map_or_else(
            || e.to_string(),
            |code| format!("{:?}", nix::errno::Errno::from_raw(code)),
        ),
    }
}

/// A libc return code as a Result.
pub fn cvt(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
