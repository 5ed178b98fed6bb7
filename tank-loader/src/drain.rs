//! Draining the kernel ring buffer into the audit log.
//!
//! The loader is the ring buffer's only reader: a second reader would take events away from
//! the log. `tank-loader trace` therefore follows the log, never the ring buffer.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use tank_ebpf_common::chain::ChainWriter;
use tank_ebpf_common::event::Event;
use tokio::io::unix::AsyncFd;

use crate::record::{Clock, Origin};

/// How often the log is made durable and its anchor moved even when the ring buffer is quiet
/// and how often the ring buffer is polled in case a wakeup was missed.
const TICK: Duration = Duration::from_millis(250);

/// Drains `ring` into `log` until `shutdown` resolves, then drains what is left and syncs.
pub async fn run(
    ring: RingBuf<MapData>,
    log: &mut ChainWriter,
    origin: &Origin,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    // SAFETY: the AsyncFd owns the ring buffer, so its descriptor outlives the registration.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("cannot watch the ring buffer: {}", e.into_parts().1))?;
    let mut tick = tokio::time::interval(TICK);
    let mut written = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer wait failed")?;
                written += drain(guard.get_inner_mut(), log, origin)?;
                guard.clear_ready();
            }
            _ = tick.tick() => {
                written += drain(ring.get_mut(), log, origin)?;
            }
            () = &mut shutdown => {
                written += drain(ring.get_mut(), log, origin)?;
                log.sync()?;
                return Ok(written);
            }
        }
    }
}

/// Moves every pending event into the log and makes the batch durable. Returns the count.
fn drain(
    ring: &mut RingBuf<MapData>,
    log: &mut ChainWriter,
    origin: &Origin,
) -> anyhow::Result<u64> {
    let clock = Clock::now();
    let mut n = 0;
    while let Some(item) = ring.next() {
        let Some(event) = parse(&item) else {
            tracing::error!(len = item.len(), "ring buffer item of unexpected size; kernel and loader disagree on the event layout");
            continue;
        };
        log.append(&origin.network_record(&event, &clock))?;
        n += 1;
    }
    if n > 0 {
        let head = log.sync()?;
        tracing::debug!(events = n, seq = head.seq, hash = %head.hash, "audit log synced");
    }
    Ok(n)
}

fn parse(bytes: &[u8]) -> Option<Event> {
    (bytes.len() == std::mem::size_of::<Event>())
        // SAFETY: the length matches and Event is plain data valid for every bit pattern.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}
