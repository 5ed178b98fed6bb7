//! Draining the kernel ring buffer into the audit log.
//!
//! The loader is the ring buffer's only reader: a second reader would take events away from
//! the log. `tank-loader trace` therefore follows the log, never the ring buffer.
//!
//! An `established` event comes from a kernel callback that runs outside the connecting task,
//! so it names no process; the drain copies the process from the connect attempt with the same
//! socket cookie ([`Attempts`]), so every record of a connection says who made it.
//!
//! A full disk fails closed ([`LogState`]): the event the log has no space for is kept, and the
//! drain stops reading the ring buffer, so the ring fills and the kernel refuses further
//! attempts and counts them (`unrecorded_denied`). When space returns the kept event is written,
//! then an outage record, and draining goes on: nothing allowed goes unrecorded.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use tank_ebpf_common::chain::{ChainWriter, Head};
use tank_ebpf_common::event::{hook, verdict, Event};
use tank_ebpf_common::ocsf::kernel::{Formatter, LifecycleRecord};
use tank_ebpf_common::ocsf::lifecycle;
use tokio::io::unix::AsyncFd;

use crate::metrics::DrainStats;

/// How often the log is made durable and its anchor moved even when the ring buffer is quiet
/// and how often the ring buffer is polled in case a wakeup was missed.
const TICK: Duration = Duration::from_millis(250);

/// How often, at most, a moved anchor also goes to the system log (besides start and shutdown).
const ANCHOR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Drains `ring` into `log` until `shutdown` resolves, then drains what is left and syncs.
pub async fn run(
    ring: RingBuf<MapData>,
    log: &mut ChainWriter,
    records: &Formatter,
    hostname: &str,
    stats: &DrainStats,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    // SAFETY: the AsyncFd owns the ring buffer, so its descriptor outlives the registration.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("cannot watch the ring buffer: {}", e.into_parts().1))?;
    let mut tick = tokio::time::interval(TICK);
    let mut attempts = Attempts::default();
    let mut stall = LogState::new(hostname);
    let mut anchor = AnchorLog::start(log.head());
    let mut written = 0;
    // SIGHUP: logrotate moved the log away; continue in a new file at its path.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let record = stall.lifecycle("log reopened after being moved away (SIGHUP)", "reopened");
                if log.reopen(&record)? {
                    tracing::info!(log = %log.path().display(), "audit log had been moved away; continuing in a new file, linked to the last record");
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer wait failed")?;
                written += drain(guard.get_inner_mut(), &mut attempts, log, records, &mut stall, stats)?;
                guard.clear_ready();
            }
            _ = tick.tick() => {
                written += drain(ring.get_mut(), &mut attempts, log, records, &mut stall, stats)?;
            }
            () = &mut shutdown => {
                written += drain(ring.get_mut(), &mut attempts, log, records, &mut stall, stats)?;
                if stall.event.is_some() {
                    tracing::error!("stopping while the audit log has no space: the event it could not take is lost with this loader; the ring buffer keeps the rest for the next one");
                }
                log_anchor(log.sync()?);
                return Ok(written);
            }
        }
        anchor.moved(log.head());
    }
}

/// The drain's view of its log: while it has no space, the one event taken from the ring and
/// not written, and since when; the lifecycle records it writes about the log.
struct LogState {
    hostname: String,
    event: Option<(Event, i64)>,
    since_ms: i64,
    error: String,
}

impl LogState {
    fn new(hostname: &str) -> Self {
        Self {
            hostname: hostname.to_owned(),
            event: None,
            since_ms: 0,
            error: String::new(),
        }
    }

    /// Writes the kept event and then the outage record; false while there is still no space.
    fn resume(&mut self, log: &mut ChainWriter, records: &Formatter) -> anyhow::Result<bool> {
        let Some((event, unix_ns)) = self.event else {
            return Ok(true);
        };
        match log.append_with(|link, line| records.write(line, link, &event, unix_ns)) {
            Err(e) if e.is_full() => return Ok(false),
            r => r?,
        };
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut outage = self.lifecycle(
            "the audit log had no space: the ring buffer filled and the kernel refused attempts (counter unrecorded_denied)",
            "audit_outage",
        );
        outage.unmapped = serde_json::json!({"event": "audit_outage", "since": self.since_ms, "until": until, "error": self.error});
        // Drawn from the reserve the writer keeps for it.
        log.append_keeping(&outage, 0)?;
        tracing::info!(
            since = self.since_ms,
            "audit log writable again; draining the ring buffer"
        );
        self.event = None;
        Ok(true)
    }

    /// A lifecycle record of the loader about its log (`unmapped.event`).
    fn lifecycle(&self, message: &str, event: &str) -> LifecycleRecord {
        LifecycleRecord::new(
            &self.hostname,
            env!("CARGO_PKG_VERSION"),
            lifecycle::OTHER,
            message.to_owned(),
            serde_json::json!({ "event": event }),
        )
    }

    fn begin(&mut self, event: Event, unix_ns: i64, error: &tank_ebpf_common::chain::ChainError) {
        self.event = Some((event, unix_ns));
        self.since_ms = tank_ebpf_common::ocsf::unix_ms(unix_ns);
        self.error = error.to_string();
        tracing::error!(%error, "audit log has no space: no longer draining the ring buffer, so the kernel refuses new attempts until space returns");
    }
}

/// Puts the log's anchor (the last durable record's `seq` and hash) into the system log too:
/// journald ships it off the host, so a log and anchor rewritten together on the host still
/// disagree with it. At start, when it moved (at most every [`ANCHOR_LOG_INTERVAL`]) and at
/// shutdown; `drain` syncs every batch it writes, so the head is durable whenever it is logged.
struct AnchorLog {
    logged_at: Instant,
    seq: u64,
}

impl AnchorLog {
    fn start(head: &Head) -> Self {
        log_anchor(head);
        Self {
            logged_at: Instant::now(),
            seq: head.seq,
        }
    }

    fn moved(&mut self, head: &Head) {
        if head.seq != self.seq && self.logged_at.elapsed() >= ANCHOR_LOG_INTERVAL {
            log_anchor(head);
            (self.logged_at, self.seq) = (Instant::now(), head.seq);
        }
    }
}

fn log_anchor(head: &Head) {
    tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");
}

/// Moves every pending event into the log and makes the batch durable. Returns the count.
fn drain(
    ring: &mut RingBuf<MapData>,
    attempts: &mut Attempts,
    log: &mut ChainWriter,
    records: &Formatter,
    stall: &mut LogState,
    stats: &DrainStats,
) -> anyhow::Result<u64> {
    let clock = Clock::now();
    let mut n = 0;
    let mut oldest_ktime_ns = 0;
    if let Some((event, _)) = stall.event {
        if !stall.resume(log, records)? {
            return Ok(0);
        }
        stats.event(&event);
        oldest_ktime_ns = event.ktime_ns;
        n += 1;
    }
    while let Some(item) = ring.next() {
        let Some(mut event) = parse(&item) else {
            tracing::error!(len = item.len(), "ring buffer item of unexpected size; kernel and loader disagree on the event layout");
            continue;
        };
        attempts.join(&mut event);
        let unix_ns = clock.unix_ns(event.ktime_ns);
        match log.append_with(|link, line| records.write(line, link, &event, unix_ns)) {
            Ok(_) => {
                stats.event(&event);
                if n == 0 {
                    oldest_ktime_ns = event.ktime_ns;
                }
                n += 1;
            }
            Err(e) if e.is_full() => {
                stall.begin(event, unix_ns, &e);
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if n > 0 {
        let head = log.sync()?;
        stats.batch(n, head.seq, oldest_ktime_ns);
        tracing::debug!(events = n, seq = head.seq, hash = %head.hash, "audit log synced");
        if stall.event.is_none() && log.rotation_due() {
            let record = stall.lifecycle("new audit log segment", "segment");
            match log.rotate(&record) {
                Ok(r) => {
                    tracing::info!(segment = %r.segment.display(), removed = r.removed.len(), "audit log rotated")
                }
                // The active file stays as it was; tried again after the next batch.
                Err(e) => {
                    tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "audit log rotation failed; continuing in the current file")
                }
            }
        }
    }
    Ok(n)
}

/// Converts kernel monotonic nanoseconds into wall-clock time.
#[derive(Clone, Copy, Debug)]
struct Clock {
    offset_ns: i64,
}

impl Clock {
    /// Samples the offset between CLOCK_REALTIME and CLOCK_MONOTONIC now.
    fn now() -> Self {
        use nix::time::{clock_gettime, ClockId};
        let ns = |id| {
            let t = clock_gettime(id).expect("CLOCK_REALTIME and CLOCK_MONOTONIC exist");
            t.tv_sec() * 1_000_000_000 + t.tv_nsec()
        };
        Self {
            offset_ns: ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC),
        }
    }

    /// ns since the Unix epoch of a `bpf_ktime_get_ns()` value.
    fn unix_ns(&self, ktime_ns: u64) -> i64 {
        (ktime_ns as i64).saturating_add(self.offset_ns)
    }
}

/// The process of recent allowed TCP connect attempts, by socket cookie, until their
/// `established` event arrives. Bounded: a connection whose handshake never completes must not
/// hold memory forever, so the oldest entries go first.
#[derive(Default)]
struct Attempts {
    by_cookie: HashMap<u64, Event>,
    order: VecDeque<u64>,
}

impl Attempts {
    /// Far more than the connections a host has in their handshake at once.
    const CAP: usize = 16_384;

    /// Remembers an allowed TCP connect, or fills an `established` event's process fields
    /// from its attempt (left zero when the attempt is unknown: logged before a restart).
    fn join(&mut self, event: &mut Event) {
        match event.hook {
            hook::CONNECT4 | hook::CONNECT6
                if event.verdict == verdict::ALLOW && event.protocol == 6 =>
            {
                // `order` may still hold cookies already joined; cookies are never reused
                // within a boot, so dropping one that is gone is harmless.
                if self.order.len() == Self::CAP {
                    if let Some(old) = self.order.pop_front() {
                        self.by_cookie.remove(&old);
                    }
                }
                if self.by_cookie.insert(event.cookie, *event).is_none() {
                    self.order.push_back(event.cookie);
                }
            }
            hook::ESTABLISHED => {
                if let Some(a) = self.by_cookie.remove(&event.cookie) {
                    event.pid = a.pid;
                    event.tgid = a.tgid;
                    event.uid = a.uid;
                    event.gid = a.gid;
                    event.comm = a.comm;
                    event.cgroup_id = a.cgroup_id;
                }
            }
            _ => {}
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Event> {
    (bytes.len() == std::mem::size_of::<Event>())
        // SAFETY: the length matches and Event is plain data valid for every bit pattern.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(hook: u8, cookie: u64) -> Event {
        Event {
            ktime_ns: 1,
            cookie,
            cgroup_id: 0,
            pid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            comm: [0; 16],
            dst_addr: [0; 16],
            src_addr: [0; 16],
            dst_port: 3128,
            src_port: 0,
            family: 2,
            sock_type: 1,
            protocol: 6,
            hook,
            verdict: verdict::ALLOW,
            reason: 1,
            mode: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn an_established_event_takes_the_process_of_its_attempt() {
        let mut attempts = Attempts::default();
        let mut connect = event(hook::CONNECT4, 7);
        (connect.tgid, connect.pid, connect.uid, connect.cgroup_id) = (100, 101, 1000, 9);
        connect.comm[..4].copy_from_slice(b"curl");
        attempts.join(&mut connect);
        let mut other = event(hook::ESTABLISHED, 8);
        attempts.join(&mut other);
        assert_eq!(other.tgid, 0, "no attempt with cookie 8");
        let mut est = event(hook::ESTABLISHED, 7);
        attempts.join(&mut est);
        assert_eq!(
            (est.tgid, est.pid, est.uid, est.cgroup_id),
            (100, 101, 1000, 9)
        );
        assert_eq!(&est.comm[..4], b"curl");
        assert!(attempts.by_cookie.is_empty());
    }

    #[test]
    fn attempts_that_never_establish_are_forgotten_oldest_first() {
        let mut attempts = Attempts::default();
        for cookie in 0..(Attempts::CAP as u64 + 10) {
            let mut e = event(hook::CONNECT6, cookie);
            e.tgid = 1;
            attempts.join(&mut e);
        }
        assert_eq!(attempts.by_cookie.len(), Attempts::CAP);
        assert!(!attempts.by_cookie.contains_key(&9));
        assert!(attempts.by_cookie.contains_key(&10));
        // Denied attempts and UDP are never remembered.
        let mut denied = event(hook::CONNECT4, u64::MAX);
        denied.verdict = verdict::DENY;
        attempts.join(&mut denied);
        assert!(!attempts.by_cookie.contains_key(&u64::MAX));
    }
}
