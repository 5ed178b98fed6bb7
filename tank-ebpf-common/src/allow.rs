//! The allow map: which (address, port, protocol) an agent may reach directly.
//!
//! The loader fills it with the egress proxy endpoints and any endpoints the operator lists;
//! the kernel programs look every connect/sendmsg destination up in it.

/// Name of the allow map in the eBPF object and under the pin directory.
pub const MAP_NAME: &str = "TANK_ALLOW";

/// Largest number of entries the allow map holds.
pub const MAX_ENTRIES: u32 = 16_384;

/// Key of the allow map.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so an IPv6 socket that
/// connects to a mapped address is judged by exactly the same entry as an IPv4 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// Destination address, network byte order, IPv4 mapped into IPv6.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IP protocol number (6 = TCP, 17 = UDP).
    pub protocol: u8,
    /// Explicit padding; always zero so keys hash identically on both sides.
    pub _pad: u8,
}

/// Value of the allow map: why this destination is allowed.
pub mod kind {
    /// The destination is an egress proxy endpoint.
    pub const PROXY: u8 = 1;
    /// The destination is an endpoint the operator listed explicitly.
    pub const ENDPOINT: u8 = 2;
}

impl AllowKey {
    /// A key for `addr` (already IPv4-mapped if IPv4), `port` and `protocol`.
    pub const fn new(addr: [u8; 16], port: u16, protocol: u8) -> Self {
        Self {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// `a.b.c.d` as `::ffff:a.b.c.d`, in network byte order.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no implicit padding (20 bytes, checked below), every bit pattern valid.
unsafe impl aya::Pod for AllowKey {}

const _: () = assert!(core::mem::size_of::<AllowKey>() == 20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_into_ipv6() {
        let mapped = ipv4_mapped([192, 0, 2, 7]);
        assert_eq!(
            std::net::Ipv6Addr::from(mapped),
            std::net::Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()
        );
    }
}
