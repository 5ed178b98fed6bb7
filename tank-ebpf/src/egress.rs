//! `cgroup_skb/egress`: packets of the agent's sockets whose IP header sends them somewhere
//! other than the destination the gate judged.
//!
//! Socket options are the setsockopt program's ([`crate::sockopt`]), but the same headers can
//! be set for one message as ancillary data, which no sock_addr hook sees: `udp_sendmsg` runs
//! the sendmsg hook before it takes `faddr` from an `IP_RETOPTS` source route, and on kernels
//! with CONFIG_IPV6_MIP6 `ip6_datagram_send_ctl` accepts a type 2 routing header. So every
//! packet is checked here, after the kernel built its IP header: IPv4 options of any kind
//! (the agent cannot set them any other way; source routes redirect) and an IPv6 routing
//! header, behind up to three hop-by-hop or destination-options headers, are refused and
//! recorded. Everything else passes after reading one or two header bytes: this is the only
//! tank program that runs per packet, and it is kept to that.
//!
//! Kernel requirements: cgroup skb programs (4.10).

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use tank_ebpf_common::event::{hook, reason};

use crate::skb::{refuse, Refused, ETH_P_IPV6_BE, ETH_P_IP_BE, SKB_PASS};

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;

#[cgroup_skb(egress)]
pub fn tank_egress(ctx: SkBuffContext) -> i32 {
    let protocol = ctx.skb.protocol();
    let refusal = if protocol == ETH_P_IP_BE {
        ipv4_options(&ctx)
    } else if protocol == ETH_P_IPV6_BE {
        ipv6_routing_header(&ctx)
    } else {
        None
    };
    let Some((reason, family, dst_addr)) = refusal else {
        return SKB_PASS;
    };
    // remote_port: the socket's peer port, network order in the low 16 bits.
    let dst_port = u16::from_be(ctx.skb.remote_port() as u16);
    refuse(
        &ctx,
        Refused {
            remote: (dst_addr, dst_port),
            local: None,
            family,
            sock_type: 0,
            protocol: 0,
            hook: hook::EGRESS,
            reason,
        },
    )
}

/// IPv4 with options (IHL above 5 words): the reason, family and the real destination.
#[inline(always)]
fn ipv4_options(ctx: &SkBuffContext) -> Option<(u8, u16, [u8; 16])> {
    // An unreadable header is not ours to judge: the kernel built it.
    let version_ihl: u8 = ctx.load(0).ok()?;
    if version_ihl & 0x0f <= 5 {
        return None;
    }
    let daddr: [u8; 4] = ctx.load(16).ok()?;
    Some((
        reason::IP_OPTIONS,
        2,
        tank_ebpf_common::allow::ipv4_mapped(daddr),
    ))
}

/// IPv6 with a routing header: the reason, family and the real (first-segment) destination.
#[inline(always)]
fn ipv6_routing_header(ctx: &SkBuffContext) -> Option<(u8, u16, [u8; 16])> {
    let mut next: u8 = ctx.load(6).ok()?;
    let mut offset = IPV6_HEADER_LEN;
    // A routing header may follow hop-by-hop and destination options; three is more than
    // RFC 8200's order allows before it.
    for _ in 0..3 {
        if next != NEXTHDR_HOP && next != NEXTHDR_DEST {
            break;
        }
        let ext: [u8; 2] = ctx.load(offset).ok()?;
        next = ext[0];
        offset += (usize::from(ext[1]) + 1) * 8;
    }
    if next != NEXTHDR_ROUTING {
        return None;
    }
    let daddr: [u8; 16] = ctx.load(24).ok()?;
    Some((reason::IPV6_ROUTING_HEADER, 10, daddr))
}
