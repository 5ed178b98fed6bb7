//! The 4-tuple of every TCP connection the gate let through: a `sock_ops` program on the
//! active-established callback records the local address and port the kernel chose, tied to
//! the connect attempt's record by socket cookie. An auditor matches it to the proxy's record
//! of the same connection (`tank-loader audit cross-check`).
//!
//! The passive-established callback records every connection *into* the agent that completed
//! its handshake (from the host itself; from elsewhere only in audit mode, see
//! [`crate::inbound`]): what the agent writes on it passes no outbound hook, so the log must
//! say it exists.
//!
//! Kernel requirements: cgroup sock_ops (4.13), `bpf_get_socket_cookie` for sock_ops (4.20).

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use tank_ebpf_common::{
    allow::{self, ipv4_mapped, AllowKey},
    event::{hook, reason, verdict},
    settings::mode,
};

use crate::record::{current_mode, record_established, Attempt};
use crate::TANK_ALLOW;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u16 = 6;
const SOCK_STREAM: u16 = 1;

/// Observes only: sock_ops programs cannot refuse a connection, and this one never changes a
/// socket's options.
#[sock_ops]
pub fn tank_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(&ctx, true),
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext, passive: bool) {
    let family = ctx.family();
    // SAFETY: the kernel hands a valid bpf_sock_ops. Every field is read whatever the family,
    // each with its own constant offset: reading only one family's fields lets LLVM merge the
    // two branches into a load through a computed context pointer, which the verifier refuses.
    let ops = unsafe { &*ctx.ops };
    let (l4, r4) = unsafe {
        (
            core::ptr::read_volatile(&ops.local_ip4),
            core::ptr::read_volatile(&ops.remote_ip4),
        )
    };
    let (l6, r6) = (ip6(&ops.local_ip6), ip6(&ops.remote_ip6));
    let (local, remote) = if family == AF_INET {
        (ipv4_mapped(l4.to_ne_bytes()), ipv4_mapped(r4.to_ne_bytes()))
    } else {
        (l6, r6)
    };
    // local_port is in host byte order; remote_port holds the network-order port in its
    // upper half on little-endian kernels, so a 32-bit byte swap yields the port.
    let local_port = unsafe { core::ptr::read_volatile(&ops.local_port) } as u16;
    let remote_port = u32::from_be(unsafe { core::ptr::read_volatile(&ops.remote_port) }) as u16;
    // The same lookup the connect made, so the record says which kind of endpoint this is.
    // SAFETY: the value is a plain byte read at once.
    let listed =
        unsafe { TANK_ALLOW.get(&AllowKey::new(remote, remote_port, IPPROTO_TCP as u8)) }.copied();
    let mode = current_mode();
    let reason = match listed {
        _ if passive => reason::INBOUND_ACCEPTED,
        Some(allow::kind::PROXY) => reason::PROXY,
        Some(_) => reason::LISTED_ENDPOINT,
        None if mode == mode::AUDIT => reason::AUDIT_NOT_LISTED,
        None => reason::NO_LONGER_LISTED,
    };
    record_established(
        &Attempt {
            // SAFETY: a helper allowed in sock_ops programs, called with the program's context.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            dst_addr: remote,
            dst_port: remote_port,
            family: family as u16,
            sock_type: SOCK_STREAM,
            protocol: IPPROTO_TCP,
            hook: if passive {
                hook::ACCEPTED
            } else {
                hook::ESTABLISHED
            },
            reason,
            verdict: verdict::ALLOW,
            mode,
        },
        (local, local_port),
    );
}

/// An IPv6 address field of `bpf_sock_ops`, read as four 4-byte loads at constant offsets:
/// the verifier refuses wider loads and any load through a computed context pointer, so no
/// loop here.
#[inline(always)]
fn ip6(words: &[u32; 4]) -> [u8; 16] {
    // SAFETY: `words` is a field of the kernel's valid bpf_sock_ops.
    let w = unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    };
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w[0].to_ne_bytes());
    out[4..8].copy_from_slice(&w[1].to_ne_bytes());
    out[8..12].copy_from_slice(&w[2].to_ne_bytes());
    out[12..16].copy_from_slice(&w[3].to_ne_bytes());
    out
}
