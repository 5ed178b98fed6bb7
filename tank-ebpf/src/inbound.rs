//! `cgroup_skb/ingress`: connection attempts into the agent from other hosts.
//!
//! The agent runs on the host network, so it can listen on a host port; whoever connects in
//! receives whatever it writes, and no outbound hook sees that. A TCP SYN (without ACK) to one
//! of the agent's sockets is let through only when it arrived on the loopback interface, i.e.
//! from the host itself; from anywhere else it is dropped and recorded. The remote end gets no
//! answer. A datagram sent in needs no such rule: any reply is a send the gate judges.
//!
//! This runs per packet on the agent's *ingress* path only (nothing on egress), after the
//! kernel delivered the packet to the socket: it reads the protocol and the TCP flags and
//! returns. Accepted connections are recorded by the sock_ops program ([`crate::sock_ops`]).
//!
//! Kernel requirements: cgroup skb programs (4.10).

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use tank_ebpf_common::{
    allow::ipv4_mapped,
    event::{hook, reason},
};

use crate::skb::{refuse, Refused, ETH_P_IPV6_BE, ETH_P_IP_BE, SKB_PASS};

const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The loopback device is interface 1 in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_skb(ingress)]
pub fn tank_inbound(ctx: SkBuffContext) -> i32 {
    // SAFETY: the kernel hands a valid __sk_buff to skb programs.
    if unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX {
        return SKB_PASS;
    }
    let protocol = ctx.skb.protocol();
    let attempt = if protocol == ETH_P_IP_BE {
        syn4(&ctx)
    } else if protocol == ETH_P_IPV6_BE {
        syn6(&ctx)
    } else {
        None
    };
    let Some((family, remote, local)) = attempt else {
        return SKB_PASS;
    };
    refuse(
        &ctx,
        Refused {
            remote,
            local: Some(local),
            family,
            sock_type: 1,
            protocol: u16::from(IPPROTO_TCP),
            hook: hook::INBOUND,
            reason: reason::NOT_FROM_HOST,
        },
    )
}

/// An address and a port (host order).
type End = ([u8; 16], u16);

/// A TCP SYN over IPv4: family, remote end, local end.
#[inline(always)]
fn syn4(ctx: &SkBuffContext) -> Option<(u16, End, End)> {
    let header: [u8; 20] = ctx.load(0).ok()?;
    if header[9] != IPPROTO_TCP {
        return None;
    }
    let l4 = usize::from(header[0] & 0x0f) * 4;
    let (ports, flags) = tcp(ctx, l4)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return None;
    }
    let src: [u8; 4] = [header[12], header[13], header[14], header[15]];
    let dst: [u8; 4] = [header[16], header[17], header[18], header[19]];
    Some((2, (ipv4_mapped(src), ports.0), (ipv4_mapped(dst), ports.1)))
}

/// A TCP SYN over IPv6 (TCP right after the fixed header): family, remote end, local end.
#[inline(always)]
fn syn6(ctx: &SkBuffContext) -> Option<(u16, End, End)> {
    let next: u8 = ctx.load(6).ok()?;
    if next != IPPROTO_TCP {
        return None;
    }
    let (ports, flags) = tcp(ctx, 40)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return None;
    }
    let src: [u8; 16] = ctx.load(8).ok()?;
    let dst: [u8; 16] = ctx.load(24).ok()?;
    Some((10, (src, ports.0), (dst, ports.1)))
}

/// Source and destination port and the flags byte of the TCP header at `offset`.
#[inline(always)]
fn tcp(ctx: &SkBuffContext, offset: usize) -> Option<((u16, u16), u8)> {
    let head: [u8; 14] = ctx.load(offset).ok()?;
    Some((
        (
            u16::from_be_bytes([head[0], head[1]]),
            u16::from_be_bytes([head[2], head[3]]),
        ),
        head[13],
    ))
}
