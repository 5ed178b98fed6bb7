//! What the two cgroup skb programs ([`crate::egress`], [`crate::inbound`]) share: their
//! verdicts, the protocol numbers as `__sk_buff` holds them, and recording a refused packet
//! under its socket's owner.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    programs::SkBuffContext,
    EbpfContext,
};

use crate::record::{current_mode, record_packet, refusal_verdict, Attempt};

/// What a cgroup skb program returns to let the packet through.
pub const SKB_PASS: i32 = 1;
/// What it returns to drop it (on egress the sender's call fails with EPERM).
pub const SKB_DROP: i32 = 0;

/// `ETH_P_IP` and `ETH_P_IPV6` as `__sk_buff.protocol` holds them (network byte order).
pub const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
pub const ETH_P_IPV6_BE: u32 = 0x86ddu16.to_be() as u32;

/// A packet one of the skb programs refuses.
pub struct Refused {
    /// The other end: where the packet was going, or where it came from.
    pub remote: ([u8; 16], u16),
    /// The agent's end, where the packet names it.
    pub local: Option<([u8; 16], u16)>,
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    pub hook: u8,
    pub reason: u8,
}

/// Records `p` under the packet's socket (cookie, owner uid, cgroup: the program may run in
/// softirq, outside any meaningful task) and returns the skb verdict. Audit mode lets it
/// through, recorded.
#[inline(always)]
pub fn refuse(ctx: &SkBuffContext, p: Refused) -> i32 {
    let mode = current_mode();
    let allowed = record_packet(
        &Attempt {
            // SAFETY: a helper allowed in cgroup skb programs, called with the program's context.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            dst_addr: p.remote.0,
            dst_port: p.remote.1,
            family: p.family,
            sock_type: p.sock_type,
            protocol: p.protocol,
            hook: p.hook,
            reason: p.reason,
            verdict: refusal_verdict(mode),
            mode,
        },
        p.local,
        ctx.get_socket_uid(),
        // SAFETY: as above.
        unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) },
    );
    if allowed {
        SKB_PASS
    } else {
        SKB_DROP
    }
}
