//! Which resolved addresses the proxy may connect to.
//!
//! A name an agent may reach can still resolve (by accident, a DNS rebind, or a hostile
//! zone) to something inside the proxy's own network. Every address is classified after
//! resolution and before the connect:
//! - [`AddrClass::Public`] is connectable;
//! - [`AddrClass::Private`] covers loopback, RFC 1918, link-local, CGNAT, unique-local,
//!   documentation/benchmarking and similar ranges, and the proxy host's own interface
//!   addresses: connectable only through a rule with `allow_private = true`;
//! - [`AddrClass::Forbidden`] covers unspecified (`0.0.0.0` reaches the local host on Linux),
//!   multicast, broadcast/reserved, and cloud metadata and credential endpoints: never
//!   connectable.
//!
//! Addresses that embed an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by it.
//!
//! The proxy host's own addresses are followed as they change ([`LocalAddrs`]): a netlink
//! subscription to address events triggers a re-read, so an address added after start is
//! never reachable under a name mapped to it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, warn};

/// The class of an address; the `&'static str` is a stable short name used in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrClass {
    /// Connectable under any rule.
    Public,
    /// Connectable only under a rule with `allow_private = true`.
    Private(&'static str),
    /// Never connectable.
    Forbidden(&'static str),
}

/// Cloud metadata and credential endpoints: AWS/GCP/Azure/OpenStack IMDS, AWS ECS task
/// credentials, AWS EKS Pod Identity, Alibaba, Azure's wireserver (it hands out VM
/// extension settings and certificates, and is routed, not link-local).
const METADATA_V4: [Ipv4Addr; 5] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(169, 254, 170, 23),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(168, 63, 129, 16),
];
/// AWS IMDS and EKS Pod Identity over IPv6.
const METADATA_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),
];

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// Classifies an IPv4 address.
pub fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    use AddrClass::*;
    if METADATA_V4.contains(&ip) {
        return Forbidden("metadata");
    }
    let table: &[([u8; 4], u32, AddrClass)] = &[
        ([0, 0, 0, 0], 8, Forbidden("unspecified")),
        ([224, 0, 0, 0], 4, Forbidden("multicast")),
        ([240, 0, 0, 0], 4, Forbidden("reserved")), // includes 255.255.255.255
        ([127, 0, 0, 0], 8, Private("loopback")),
        ([10, 0, 0, 0], 8, Private("private")),
        ([172, 16, 0, 0], 12, Private("private")),
        ([192, 168, 0, 0], 16, Private("private")),
        ([169, 254, 0, 0], 16, Private("link-local")),
        ([100, 64, 0, 0], 10, Private("cgnat")),
        ([192, 0, 0, 0], 24, Private("special-purpose")),
        ([192, 0, 2, 0], 24, Private("documentation")),
        ([198, 51, 100, 0], 24, Private("documentation")),
        ([203, 0, 113, 0], 24, Private("documentation")),
        ([198, 18, 0, 0], 15, Private("benchmarking")),
        ([192, 88, 99, 0], 24, Private("special-purpose")),
    ];
    table
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map_or(Public, |(_, _, class)| *class)
}

/// Classifies an IPv6 address.
pub fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    use AddrClass::*;
    if METADATA_V6.contains(&ip) {
        return Forbidden("metadata");
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        return Forbidden("unspecified");
    }
    if ip.is_loopback() {
        return Private("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s[0] {
        // ::/96 (IPv4-compatible, deprecated) and the rest of ::/8.
        0x0000 => Forbidden("reserved"),
        // NAT64 well-known prefix: judged by the IPv4 it reaches.
        0x0064 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => classify_v4(embedded(s[6], s[7])),
        0x0064 if s[1] == 0xff9b && s[2] == 1 => Private("nat64-local"),
        0x0100 if s[1..4] == [0, 0, 0] => Forbidden("discard"),
        0x2001 if s[1] == 0x0db8 => Private("documentation"),
        // 3fff::/20 (RFC 9637).
        0x3fff if s[1] < 0x1000 => Private("documentation"),
        0x2001 if s[1] == 0 => Private("teredo"),
        0x2001 if s[1] < 0x200 => Private("special-purpose"),
        0x2002 => match classify_v4(embedded(s[1], s[2])) {
            Public => Public,
            other => other,
        },
        x if x & 0xfe00 == 0xfc00 => Private("unique-local"),
        x if x & 0xffc0 == 0xfe80 => Private("link-local"),
        x if x & 0xffc0 == 0xfec0 => Private("site-local"),
        x if x & 0xff00 == 0xff00 => Forbidden("multicast"),
        _ => Public,
    }
}

/// Classifies an address.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The addresses of this host's interfaces (a target resolving to one is `Private`).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(addr) = ifa.address else { continue };
            if let Some(sin) = addr.as_sockaddr_in() {
                out.push(IpAddr::V4(sin.ip()));
            } else if let Some(sin6) = addr.as_sockaddr_in6() {
                out.push(IpAddr::V6(sin6.ip()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The proxy host's own addresses, kept current.
pub struct LocalAddrs {
    addrs: RwLock<Arc<Vec<IpAddr>>>,
}

impl LocalAddrs {
    /// Reads the addresses now and, from inside a tokio runtime, follows their changes
    /// until the runtime stops. If the netlink subscription cannot be had, says so once and
    /// keeps the addresses read now (refreshed on reload).
    pub fn follow() -> Arc<LocalAddrs> {
        // Subscribe first, then read: a change between the two is not lost.
        let socket = subscribe();
        let me = Arc::new(LocalAddrs {
            addrs: RwLock::new(Arc::new(local_addresses())),
        });
        // SAFETY: the AsyncFd takes the OwnedFd; nothing else closes or re-registers it.
        let registered = socket.and_then(|fd| {
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(io::Error::from)
        });
        match registered {
            Ok(fd) => {
                let weak = Arc::downgrade(&me);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(mut ready) = fd.readable().await else {
                            return;
                        };
                        // Drain every queued event; an overrun (ENOBUFS) also means "re-read".
                        loop {
                            // SAFETY: recv into a buffer we own, on our netlink socket.
                            let n = unsafe {
                                libc::recv(
                                    fd.get_ref().as_raw_fd(),
                                    buf.as_mut_ptr().cast(),
                                    buf.len(),
                                    libc::MSG_DONTWAIT,
                                )
                            };
                            if n >= 0 {
                                continue;
                            }
                            let e = io::Error::last_os_error();
                            match e.raw_os_error() {
                                Some(libc::EAGAIN) => {
                                    ready.clear_ready();
                                    break;
                                }
                                Some(libc::ENOBUFS | libc::EINTR) => continue,
                                _ => {
                                    warn!("stopped following the host's address changes: {e}");
                                    return;
                                }
                            }
                        }
                        let Some(me) = weak.upgrade() else { return };
                        me.refresh();
                        debug!("the host's addresses changed; re-read them");
                    }
                });
            }
            Err(e) => warn!(
                "cannot follow the host's address changes ({e}); its addresses are re-read only on reload"
            ),
        }
        me
    }

    /// The addresses now.
    pub fn get(&self) -> Arc<Vec<IpAddr>> {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads them.
    pub fn refresh(&self) {
        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(local_addresses());
    }
}

/// A non-blocking netlink socket subscribed to IPv4 and IPv6 address events.
fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    // SAFETY: bind with a valid sockaddr_nl of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddrClass::*;

    fn c(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn v4_ranges() {
        assert_eq!(c("93.184.216.34"), Public);
        assert_eq!(c("8.8.8.8"), Public);
        assert_eq!(c("127.0.0.1"), Private("loopback"));
        assert_eq!(c("127.255.0.9"), Private("loopback"));
        assert_eq!(c("10.1.2.3"), Private("private"));
        assert_eq!(c("172.16.0.1"), Private("private"));
        assert_eq!(c("172.31.255.255"), Private("private"));
        assert_eq!(c("172.32.0.1"), Public);
        assert_eq!(c("192.168.1.1"), Private("private"));
        assert_eq!(c("169.254.1.1"), Private("link-local"));
        assert_eq!(c("100.64.0.1"), Private("cgnat"));
        assert_eq!(c("100.127.255.255"), Private("cgnat"));
        assert_eq!(c("100.128.0.0"), Public);
        assert_eq!(c("0.0.0.0"), Forbidden("unspecified"));
        assert_eq!(c("0.1.2.3"), Forbidden("unspecified"));
        assert_eq!(c("224.0.0.1"), Forbidden("multicast"));
        assert_eq!(c("255.255.255.255"), Forbidden("reserved"));
        assert_eq!(c("169.254.169.254"), Forbidden("metadata"));
        assert_eq!(c("100.100.100.200"), Forbidden("metadata"));
        assert_eq!(c("168.63.129.16"), Forbidden("metadata"));
        assert_eq!(c("169.254.170.23"), Forbidden("metadata"));
        assert_eq!(c("168.63.129.17"), Public);
    }

    #[test]
    fn v6_ranges() {
        assert_eq!(c("2606:4700::1111"), Public);
        assert_eq!(c("::1"), Private("loopback"));
        assert_eq!(c("::"), Forbidden("unspecified"));
        assert_eq!(c("fd00::1"), Private("unique-local"));
        assert_eq!(c("fc00::1"), Private("unique-local"));
        assert_eq!(c("fe80::1"), Private("link-local"));
        assert_eq!(c("ff02::1"), Forbidden("multicast"));
        assert_eq!(c("fd00:ec2::254"), Forbidden("metadata"));
        assert_eq!(c("fd00:ec2::23"), Forbidden("metadata"));
        assert_eq!(c("fd00:ec2::24"), Private("unique-local"));
        assert_eq!(c("3fff::1"), Private("documentation"));
        assert_eq!(c("3fff:fff:ffff::1"), Private("documentation"));
        assert_eq!(c("3fff:1000::1"), Public);
        // Embedded IPv4 is judged by the IPv4.
        assert_eq!(c("::ffff:127.0.0.1"), Private("loopback"));
        assert_eq!(c("::ffff:169.254.169.254"), Forbidden("metadata"));
        assert_eq!(c("::ffff:8.8.8.8"), Public);
        assert_eq!(c("64:ff9b::10.0.0.1"), Private("private"));
        assert_eq!(c("64:ff9b::8.8.8.8"), Public);
        assert_eq!(c("2002:7f00:1::"), Private("loopback"));
        assert_eq!(c("2002:0808:0808::"), Public);
        assert_eq!(c("::127.0.0.1"), Forbidden("reserved"));
    }

    #[test]
    fn local_addresses_include_loopback() {
        assert!(local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
