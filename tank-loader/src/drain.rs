//! Draining the kernel ring buffer into the audit log: every event exactly once, and every
//! attempt the kernel could not record accounted for in the log.
//!
//! The loader is the ring buffer's only reader: a second reader would take events away from
//! the log. `tank-loader trace` therefore follows the log, never the ring buffer.
//!
//! Each pass reads what the ring holds ([`Ring`], in place), formats each event straight into
//! the chain's batch (no allocation per record), appends a record for any unrecorded counter
//! that moved since the last pass, makes the batch durable (one `fdatasync`, anchor moved),
//! and only then hands the ring its space back. Each event and each durable batch is also
//! counted in [`DrainStats`] (plain stores, no allocation) for the loader's metrics. A loader killed mid-pass leaves the events in
//! the ring; the next one skips those its predecessor already logged (by `unmapped.ring_pos`)
//! and logs the rest. The unrecorded totals the log has accounted for are kept in a checkpoint
//! beside the log (`<log>.drain`), for the same reason.
//!
//! A full disk fails closed ([`Stall`]): the events the log has no space for stay in the ring
//! (the drain reads them again later), and while the log has no room the drain stops reading,
//! so the ring fills and the kernel refuses further attempts and counts them
//! (`unrecorded_denied`). When space returns the drain writes an outage record and goes on:
//! nothing allowed goes unrecorded. After each durable batch the log rotates when due, and
//! SIGHUP makes it continue in a new file if logrotate moved it away.
//!
//! An `established` event comes from a kernel callback that runs outside the connecting task,
//! so it names no process; the drain copies the process from the connect attempt with the same
//! socket cookie ([`Attempts`]), so every record of a connection says who made it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;
use tank_ebpf_common::chain::{self, ChainError, ChainWriter};
use tank_ebpf_common::event::{hook, verdict, Event};
use tank_ebpf_common::ocsf::kernel::{
    Formatter, LifecycleRecord, UnrecordedRecord, UnrecordedTotals,
};
use tank_ebpf_common::ocsf::lifecycle;
use tokio::io::unix::AsyncFd;

use crate::metrics::DrainStats;
use crate::ring::Ring;

/// How often the ring buffer and the counters are looked at when no wakeup comes (a ring that
/// is full sends none, and counters send none), and the log made durable if anything is new.
const TICK: Duration = Duration::from_millis(250);

/// Least time between two anchors logged to the system log.
const ANCHOR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Events appended between two syncs at most: bounds the batch a crash can force the next
/// loader to read again.
const BATCH: usize = 1 << 16;

/// What the drain has accounted for, kept beside the log in `<log>.drain` after each sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The ring position everything before which is in the log.
    pub ring_pos: u64,
    /// The unrecorded totals the log has records for.
    pub unrecorded: UnrecordedTotals,
}

/// Where the checkpoint of the log at `log` lives.
pub fn checkpoint_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".drain");
    PathBuf::from(name)
}

/// The drain's state across passes.
pub struct Drain {
    ring: Ring,
    counters: PerCpuArray<MapData, u64>,
    records: Formatter,
    hostname: String,
    attempts: Attempts,
    /// What the metrics read: counts per event, records and lag per durable batch.
    stats: Arc<DrainStats>,
    /// Totals the log has accounted for, and when the drain last looked (ms).
    accounted: UnrecordedTotals,
    looked_ms: Option<i64>,
    checkpoint: CheckpointFile,
    /// When the anchor last went to the system log.
    anchor_logged: Option<Instant>,
    /// Set while the log has no space.
    stall: Option<Stall>,
}

/// A spell during which the log had no space for records.
struct Stall {
    since_ms: i64,
    error: String,
}

impl Drain {
    /// A drain of `ring` into `log`, resuming where the previous loader stopped: `reused` says
    /// whether the ring and counter maps are the ones a previous run pinned (else they are
    /// new and hold nothing the log has).
    pub fn new(
        mut ring: Ring,
        counters: PerCpuArray<MapData, u64>,
        log: &ChainWriter,
        log_path: &Path,
        hostname: &str,
        reused: bool,
        stats: Arc<DrainStats>,
    ) -> anyhow::Result<Self> {
        let checkpoint = checkpoint_path(log_path);
        let saved: Option<Checkpoint> = std::fs::read(&checkpoint)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let tail = log.tail();
        let tail_pos = tail.and_then(|t| t.pointer("/unmapped/ring_pos")?.as_u64());
        // The unrecorded record, when last, is the newest account; else the checkpoint is.
        let tail_totals = tail
            .and_then(|t| t.pointer("/unmapped/totals"))
            .and_then(|t| UnrecordedTotals::deserialize(t).ok());
        let mut accounted = UnrecordedTotals::default();
        if reused {
            if let Some(pos) = tail_pos.or(saved.map(|c| c.ring_pos)) {
                if ring.resume(pos) {
                    tracing::info!(
                        ring_pos = pos,
                        "resuming the ring buffer after what the log holds"
                    );
                }
            }
            accounted = tail_totals
                .or(saved.map(|c| c.unrecorded))
                .unwrap_or_default();
        }
        let mut drain = Self {
            ring,
            counters,
            records: Formatter::new(hostname, env!("CARGO_PKG_VERSION")),
            hostname: hostname.to_owned(),
            attempts: Attempts::default(),
            stats,
            accounted,
            looked_ms: None,
            checkpoint: CheckpointFile::open(checkpoint, &saved.unwrap_or_default())?,
            anchor_logged: None,
            stall: None,
        };
        // Counters that went back are new maps (a reboot): nothing of theirs is accounted for.
        let now = drain.totals()?;
        if now
            .by_slot()
            .iter()
            .zip(accounted.by_slot())
            .any(|((_, n), (_, a))| n < &a)
        {
            drain.accounted = UnrecordedTotals::default();
        }
        Ok(drain)
    }

    /// The position the next record would be read from (the Start record names it).
    pub fn ring_pos(&self) -> u64 {
        self.ring.position()
    }

    /// Drains into `log` until `shutdown` resolves, then drains what is left. Returns the
    /// events written.
    pub async fn run(
        self,
        log: &mut ChainWriter,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<u64> {
        let mut this = self;
        let fd = this.ring.as_fd().try_clone_to_owned()?;
        // SAFETY: the AsyncFd owns the descriptor, so it outlives the registration.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| anyhow::anyhow!("cannot watch the ring buffer: {}", e.into_parts().1))?;
        let mut tick = tokio::time::interval(TICK);
        let mut written = 0;
        // SIGHUP: logrotate moved the log away; continue in a new file at its path.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch SIGHUP")?;
        // The head the drain starts from (the Start record's), before any batch.
        this.stats.batch(0, log.head().seq, None);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let record = this.lifecycle("log reopened after being moved away (SIGHUP)", "reopened");
                    if log.reopen(&record)? {
                        tracing::info!(log = %log.path().display(), "audit log had been moved away; continuing in a new file, linked to the last record");
                    }
                }
                guard = fd.readable() => {
                    // Cleared first: a wakeup during the pass then stays for the next wait.
                    guard.context("ring buffer wait failed")?.clear_ready();
                    written += this.pass(log)?;
                }
                _ = tick.tick() => written += this.pass(log)?,
                () = &mut shutdown => {
                    written += this.pass(log)?;
                    if this.stall.is_some() {
                        tracing::error!("stopping while the audit log has no space: the ring buffer keeps the events not logged for the next loader");
                    }
                    let head = log.head();
                    tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");
                    return Ok(written);
                }
            }
        }
    }

    /// Moves everything pending into the log, durably, batch by batch. Returns the events.
    /// On a full disk it makes durable what fitted and stalls: later passes read nothing until
    /// the log has room again.
    pub fn pass(&mut self, log: &mut ChainWriter) -> anyhow::Result<u64> {
        if self.stall.is_some() && !self.resume(log)? {
            return Ok(0);
        }
        let mut total = 0;
        loop {
            let (events, oldest_ktime_ns, full) = self.read_batch(log)?;
            let counted = match full {
                None => match self.account(log) {
                    Err(e)
                        if e.downcast_ref::<ChainError>()
                            .is_some_and(ChainError::is_full) =>
                    {
                        self.begin_stall(e.to_string());
                        false
                    }
                    r => r?,
                },
                Some(e) => {
                    self.begin_stall(e.to_string());
                    false
                }
            };
            if events == 0 && !counted {
                return Ok(total);
            }
            let head = log.sync()?;
            self.stats.batch(events as u64, head.seq, oldest_ktime_ns);
            if self
                .anchor_logged
                .is_none_or(|t| t.elapsed() >= ANCHOR_LOG_INTERVAL)
            {
                // The anchor also goes to the system log, which is shipped off the host.
                tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");
                self.anchor_logged = Some(Instant::now());
            } else {
                tracing::debug!(events, seq = head.seq, hash = %head.hash, "audit log synced");
            }
            let checkpoint = Checkpoint {
                ring_pos: self.ring.position(),
                unrecorded: self.accounted,
            };
            self.checkpoint.write(&checkpoint)?;
            self.ring.commit(checkpoint.ring_pos);
            total += events as u64;
            if self.stall.is_some() {
                return Ok(total);
            }
            self.rotate_if_due(log);
            if !self.ring.pending() {
                return Ok(total);
            }
        }
    }

    fn begin_stall(&mut self, error: String) {
        tracing::error!(%error, "audit log has no space: no longer draining the ring buffer, so the kernel refuses new attempts until space returns");
        self.stall = Some(Stall {
            since_ms: tank_ebpf_common::ocsf::unix_ms(Clock::now().unix_ns(Clock::monotonic_ns())),
            error,
        });
    }

    /// Ends a stall once the log has room again, with an outage record; false while it has not.
    fn resume(&mut self, log: &mut ChainWriter) -> anyhow::Result<bool> {
        let Some(stall) = &self.stall else {
            return Ok(true);
        };
        match log.make_room(log.reserve_bytes() + chain::RESUME_ROOM) {
            Err(e) if e.is_full() => return Ok(false),
            r => r?,
        }
        let until = tank_ebpf_common::ocsf::unix_ms(Clock::now().unix_ns(Clock::monotonic_ns()));
        let mut outage = self.lifecycle(
            "the audit log had no space: the ring buffer filled and the kernel refused attempts (counter unrecorded_denied)",
            "audit_outage",
        );
        outage.unmapped = serde_json::json!({"event": "audit_outage", "since": stall.since_ms, "until": until, "error": stall.error});
        log.append(&outage)?;
        log.sync()?;
        tracing::info!(
            since = stall.since_ms,
            "audit log writable again; draining the ring buffer"
        );
        self.stall = None;
        Ok(true)
    }

    fn rotate_if_due(&self, log: &mut ChainWriter) {
        if !log.rotation_due() {
            return;
        }
        let record = self.lifecycle("new audit log segment", "segment");
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

    /// Appends up to [`BATCH`] events from the ring. Returns how many, the kernel time of the
    /// first (the batch's oldest), if any, and the error that stopped it when the log had no
    /// space: the events from there on stay in the ring, to be read again.
    fn read_batch(
        &mut self,
        log: &mut ChainWriter,
    ) -> Result<(usize, Option<u64>, Option<ChainError>), ChainError> {
        let clock = Clock::now();
        let Self {
            ring,
            records,
            attempts,
            stats,
            ..
        } = self;
        let (mut failed, mut oldest_ktime_ns) = (None, None);
        let (mut appended, mut logged_to) = (0, ring.position());
        ring.read(BATCH, |item| {
            if failed.is_some() {
                return;
            }
            let Some(mut event) = parse(item.data) else {
                tracing::error!(len = item.data.len(), "ring buffer item of unexpected size; kernel and loader disagree on the event layout");
                return;
            };
            attempts.join(&mut event);
            let unix_ns = clock.unix_ns(event.ktime_ns);
            if let Err(e) = log.append_with(|link, line| {
                records.write(line, link, &event, unix_ns, item.end)
            }) {
                attempts.again(&event);
                failed = Some(e);
                return;
            }
            stats.event(&event);
            oldest_ktime_ns.get_or_insert(event.ktime_ns);
            (appended, logged_to) = (appended + 1, item.end);
        });
        match failed {
            Some(e) if e.is_full() => {
                ring.resume(logged_to);
                Ok((appended, oldest_ktime_ns, Some(e)))
            }
            Some(e) => Err(e),
            None => Ok((appended, oldest_ktime_ns, None)),
        }
    }

    /// The kernel's unrecorded counters, summed over CPUs.
    fn totals(&self) -> anyhow::Result<UnrecordedTotals> {
        let sum = |slot| -> anyhow::Result<u64> {
            Ok(self
                .counters
                .get(&slot, 0)
                .context("cannot read the kernel's counters")?
                .iter()
                .sum())
        };
        use tank_ebpf_common::counters::*;
        Ok(UnrecordedTotals {
            unrecorded_denied: sum(UNRECORDED_DENIED)?,
            unrecorded_allowed: sum(UNRECORDED_ALLOWED)?,
            unrecorded_established: sum(UNRECORDED_ESTABLISHED)?,
        })
    }

    /// Appends a record for each unrecorded counter that moved since the log last accounted
    /// for it. Returns whether it appended any.
    fn account(&mut self, log: &mut ChainWriter) -> anyhow::Result<bool> {
        let now = self.totals()?;
        let unix_ns = Clock::now().unix_ns(Clock::monotonic_ns());
        let since = self
            .looked_ms
            .replace(tank_ebpf_common::ocsf::unix_ms(unix_ns));
        let mut any = false;
        for ((slot, total), (_, before)) in now.by_slot().into_iter().zip(self.accounted.by_slot())
        {
            if total <= before {
                continue;
            }
            let record = UnrecordedRecord::new(
                &self.hostname,
                env!("CARGO_PKG_VERSION"),
                slot,
                total - before,
                since,
                unix_ns,
                now,
                self.ring.position(),
            );
            tracing::warn!(
                counter = record.unmapped.unrecorded.as_str(),
                count = record.count,
                "{}",
                record.message
            );
            log.append(&record)?;
            any = true;
        }
        self.accounted = now;
        Ok(any)
    }
}

/// The checkpoint file, kept open and rewritten in place at a fixed width: like the log's
/// anchor, it still moves when the disk is full (a new file, or a rename, would need space).
struct CheckpointFile {
    path: PathBuf,
    file: std::fs::File,
}

impl CheckpointFile {
    /// Far more than a checkpoint's JSON with every number at its widest.
    const WIDTH: usize = 255;

    /// Opens the checkpoint at `path` and writes `current` (what it held) at the full width,
    /// so its space is taken now, while there is some.
    fn open(path: PathBuf, current: &Checkpoint) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .with_context(|| format!("cannot open the drain checkpoint {}", path.display()))?;
        let this = Self { path, file };
        this.write(current)?;
        Ok(this)
    }

    fn write(&self, c: &Checkpoint) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut body = serde_json::to_vec(c)?;
        body.resize(Self::WIDTH.max(body.len()), b' ');
        body.push(b'\n');
        self.file
            .write_all_at(&body, 0)
            .with_context(|| format!("cannot write the drain checkpoint {}", self.path.display()))
    }
}

/// Converts kernel monotonic nanoseconds into wall-clock time.
#[derive(Clone, Copy, Debug)]
struct Clock {
    offset_ns: i64,
}

impl Clock {
    /// CLOCK_MONOTONIC now, in the units of `bpf_ktime_get_ns()`.
    fn monotonic_ns() -> u64 {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC exists");
        (t.tv_sec() * 1_000_000_000 + t.tv_nsec()) as u64
    }

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

impl Attempts {
    /// `event`, joined, was not logged and will be read again: an `established` event gives
    /// back the process it took from its attempt.
    fn again(&mut self, event: &Event) {
        if event.hook == hook::ESTABLISHED && self.by_cookie.insert(event.cookie, *event).is_none()
        {
            self.order.push_back(event.cookie);
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
