//! The audit log: OCSF Network Activity records
//! ([`tank_ebpf_common::ocsf::proxy::ConnectionRecord`]) and, for each request inside an
//! inspected tunnel, an HTTP Activity record ([`RequestRecord`]), written through
//! [`tank_ebpf_common::chain`]. A connection that relays gets an opening record before the
//! `200` or the first forwarded byte and a closing record linked to it; a connection refused
//! or failed before relaying gets one record.
//!
//! Records go to one writer thread over a bounded channel. An opening record is answered as
//! soon as its `write(2)` returned, so the connection waits a write, never a sync. The thread
//! appends every record queued, then makes the batch durable with one `fdatasync` and moves
//! the anchor (group commit). Syncs are at least [`SYNC_INTERVAL`] apart: a record arriving
//! after a quiet spell is synced at once; under load the writer gathers records for the rest of
//! the interval and one sync covers them all. So a record is durable at most one interval plus
//! one sync after it is queued, and the disk sees at most 100 syncs a second.
//!
//! Never fail open, never lose what was recorded. Each open tunnel holds [`CLOSE_RESERVE`]
//! bytes of the log's allocated space for its closing record, so a full disk refuses new
//! tunnels (`503 audit-unavailable`) while every open one can still be closed. While the log
//! cannot be written the proxy refuses everything and counts what it could not record; once
//! space returns the writer appends an outage record (when, why, how many went unrecorded)
//! and serves again. Records are bounded in size (URLs and error texts are cut, `ocsf::proxy::MAX_URL`), so one
//! client cannot fill the disk quickly with long refused requests. The writer also rotates the
//! log into segments (docs/operations.md).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tank_ebpf_common::chain::{self, ChainError, ChainWriter};
use tank_ebpf_common::ocsf::kernel::LifecycleRecord;
use tank_ebpf_common::ocsf::proxy::{
    BudgetNote, Connection, ConnectionRecord, Phase, ProxyDetails, RequestKind, RequestRecord,
    Traffic, TunnelKind, Url, MAX_TEXT, PRODUCT,
};
use tank_ebpf_common::ocsf::{lifecycle, Endpoint, LogName};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Records queued for the writer at most.
const QUEUE: usize = 8192;
/// Records appended between two checks of the clock at most.
const BATCH: usize = 1024;
/// Least time between two syncs of the audit log.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Log space each open tunnel holds for its closing record: records are far smaller, since
/// every variable field is cut to a bound (`ocsf::proxy::MAX_URL`, `MAX_TEXT`).
pub const CLOSE_RESERVE: u64 = 4096;
/// How often a writer that cannot write tries again.
const RETRY: Duration = Duration::from_millis(100);
/// How often the writer checks that the log's path still names the file it writes.
const PATH_CHECK: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What is known about a connection while it is handled; turned into a record at its end.
#[derive(Debug)]
pub struct Draft {
    /// Wall-clock start, ms.
    pub start_ms: u64,
    /// Monotonic start.
    pub started: Instant,
    /// Client.
    pub client: SocketAddr,
    /// Proxy side.
    pub local: SocketAddr,
    /// What the client asked for.
    pub kind: RequestKind,
    /// Target host.
    pub host: Option<String>,
    /// Target port.
    pub port: Option<u16>,
    /// Address connected to.
    pub ip: Option<IpAddr>,
    /// Method and URL of a plain-HTTP request.
    pub http: Option<(String, String)>,
    /// Allowed (true) or refused.
    pub allowed: bool,
    /// Deciding rule or reason.
    pub rule: String,
    /// Error.
    pub error: Option<String>,
    /// Bytes.
    pub traffic: Traffic,
    /// Its opening record, once written.
    pub opened: Option<Opened>,
    /// Record id, set for inspected tunnels (their requests' `correlation_uid`).
    pub uid: Option<String>,
    /// Inspected or opaque, for tunnels.
    pub tunnel: Option<TunnelKind>,
    /// The ClientHello's server name, when one was read.
    pub sni: Option<String>,
    /// The ClientHello's ALPN protocols.
    pub alpn: Vec<String>,
    /// Requests served inside an inspected tunnel.
    pub requests: Option<u64>,
    /// The budget the connection ran into.
    pub budget: Option<BudgetNote>,
}

impl Draft {
    /// A draft for a connection accepted now.
    pub fn new(client: SocketAddr, local: SocketAddr) -> Self {
        Self {
            start_ms: now_ms(),
            started: Instant::now(),
            client,
            local,
            kind: RequestKind::Invalid,
            host: None,
            port: None,
            ip: None,
            http: None,
            allowed: false,
            rule: String::new(),
            error: None,
            traffic: Traffic::default(),
            opened: None,
            uid: None,
            tunnel: None,
            sni: None,
            alpn: Vec::new(),
            requests: None,
            budget: None,
        }
    }

    /// The opening record of an allowed connection about to relay: decision, 4-tuple, rule.
    pub fn opening(&self, hostname: &str) -> ConnectionRecord {
        self.record(hostname, Phase::Opening)
    }

    /// The record of the connection's end: its closing record when it was opened, else the
    /// one record of a refused or failed connection.
    pub fn finish(&self, hostname: &str) -> ConnectionRecord {
        match self.opened {
            Some(_) => self.closing(hostname),
            None => self.record(hostname, Phase::Whole),
        }
    }

    /// The closing record of a connection that had an opening record.
    pub fn closing(&self, hostname: &str) -> ConnectionRecord {
        self.record(hostname, Phase::Closing)
    }

    fn record(&self, hostname: &str, phase: Phase) -> ConnectionRecord {
        let (http_method, url) = self.http.clone().unzip();
        let (url, url_bytes) = url.as_deref().map(Url::bounded).unzip();
        let connection = Connection {
            allowed: self.allowed,
            start_ms: self.start_ms as i64,
            duration_ms: self.started.elapsed().as_millis() as i64,
            phase,
            client: self.client,
            local: self.local,
            // With no request parsed, the only destination there was is the proxy itself.
            target: match (self.host.clone(), self.ip) {
                (None, None) => self.local.into(),
                (hostname, ip) => Endpoint {
                    hostname,
                    ip,
                    port: self.port,
                    ..Endpoint::default()
                },
            },
            traffic: self.traffic.clone(),
            url,
            uid: self.uid.clone(),
            details: ProxyDetails {
                kind: self.kind,
                rule: self.rule.clone(),
                http_method,
                error: self.error.clone(),
                url_bytes: url_bytes.flatten(),
                tunnel: self.tunnel,
                sni: self.sni.clone(),
                alpn: self.alpn.clone(),
                requests: self.requests,
                budget: self.budget.clone().map(Box::new),
            },
        };
        ConnectionRecord::new(connection, hostname, env!("CARGO_PKG_VERSION"))
    }
}

/// A written opening record: its `seq`, which the closing record names.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    seq: u64,
}

/// Log space held for the record of one request being served in an inspected tunnel, given
/// back when the record is written or, should the request be dropped unrecorded, when the
/// hold is dropped.
#[derive(Debug)]
pub struct Held(Arc<AtomicU64>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(CLOSE_RESERVE, Ordering::Relaxed);
    }
}

/// What the writer thread is asked to do.
enum Entry {
    /// A connection recorded whole (refused, or failed before relaying).
    Whole(ConnectionRecord),
    /// An opening record; answered with its `seq` once written, or `None` when refused.
    Open(ConnectionRecord, oneshot::Sender<Option<Opened>>),
    /// The closing record of an opened connection.
    Close(ConnectionRecord, Opened),
    /// Hold space for the record of a request about to be served in an inspected tunnel;
    /// answered with the hold, or `None` when refused.
    Hold(oneshot::Sender<Option<Held>>),
    /// A request record of an inspected tunnel, with the space held for it if any.
    Request(Box<RequestRecord>, Option<Held>),
    /// SIGHUP: continue in a new file if logrotate moved the log away.
    Reopen,
}

/// The sending side of the audit log.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Entry>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entry::Whole(_) => "Whole",
            Entry::Open(..) => "Open",
            Entry::Close(..) => "Close",
            Entry::Hold(_) => "Hold",
            Entry::Request(..) => "Request",
            Entry::Reopen => "Reopen",
        })
    }
}

/// The writer thread; join it after dropping every [`Audit`] to flush the log.
#[derive(Debug)]
pub struct AuditThread(std::thread::JoinHandle<()>);

impl AuditThread {
    /// Waits until every queued record is written and synced.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Audit {
    /// Opens (or continues) the chained log at `path` and starts its writer thread.
    pub fn open(
        path: &Path,
        opts: chain::Options,
        hostname: String,
        metrics: Arc<Metrics>,
    ) -> Result<(Audit, AuditThread), ChainError> {
        let reserve = opts.reserve_bytes;
        let (mut writer, recovery) = ChainWriter::open_with(path, opts)?;
        if let Some(r) = recovery {
            tracing::warn!(
                log = %path.display(),
                partial_bytes = r.partial_bytes,
                "audit log ended in a partial record (crash mid-write, never synced); it was cut and the chain continues from the last complete record"
            );
        }
        // Anchor what is there now, so a log cut before the first new record is caught.
        writer.sync()?;
        tracing::info!(log = %path.display(), seq = writer.head().seq, hash = %writer.head().hash, "audit log opened");
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let state = Writer {
            writer,
            rx,
            healthy: healthy.clone(),
            metrics,
            hostname,
            reserve,
            held: Arc::default(),
            outage: None,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || state.run())
            .expect("spawn audit writer");
        // A log deleted or moved without SIGHUP: the writer checks its path every second, also
        // when idle, and continues there rather than in a lost inode. A weak sender, so the
        // writer still ends when the last connection's sender is gone.
        let weak = tx.downgrade();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PATH_CHECK);
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let _ = tx.try_send(Entry::Reopen);
            }
        });
        Ok((Audit { tx, healthy }, AuditThread(thread)))
    }

    async fn send(&self, entry: Entry) {
        if self.tx.send(entry).await.is_err() {
            tracing::error!("audit writer is gone; record lost");
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// Writes the opening record of a connection about to relay; `None` when it could not be
    /// written (the connection must then be refused: nothing passes unrecorded).
    pub async fn opening(&self, record: ConnectionRecord) -> Option<Opened> {
        let (tx, rx) = oneshot::channel();
        self.send(Entry::Open(record, tx)).await;
        rx.await.ok().flatten()
    }

    /// Queues the record of a connection's end (its closing record when it was opened);
    /// waits if the writer is behind (backpressure, never dropping).
    pub async fn finish(&self, draft: &Draft, hostname: &str) {
        let record = draft.finish(hostname);
        self.send(match draft.opened {
            Some(opened) => Entry::Close(record, opened),
            None => Entry::Whole(record),
        })
        .await;
    }

    /// Holds log space for the record of a request about to be served inside an inspected
    /// tunnel, so a full disk cannot leave it served unrecorded; `None` when there is none
    /// (the request must then be refused).
    pub async fn hold(&self) -> Option<Held> {
        let (tx, rx) = oneshot::channel();
        self.send(Entry::Hold(tx)).await;
        rx.await.ok().flatten()
    }

    /// Queues the record of a request of an inspected tunnel, written in the space `held` for
    /// it if any; waits if the writer is behind (backpressure, never dropping).
    pub async fn record_request(&self, record: RequestRecord, held: Option<Held>) {
        self.send(Entry::Request(Box::new(record), held)).await;
    }

    /// Asks the writer to continue in a new file if the log was moved away (SIGHUP).
    pub async fn reopen(&self) {
        self.send(Entry::Reopen).await;
    }

    /// False while the log cannot be written, until the outage record is written.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A spell during which the log could not be written.
struct Outage {
    since_ms: u64,
    error: String,
    /// Records that could not be written (refused requests, closing records).
    unrecorded: u64,
}

/// The writer thread's state.
struct Writer {
    writer: ChainWriter,
    rx: mpsc::Receiver<Entry>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    hostname: String,
    /// Bytes every record but a closing or outage record leaves allocated.
    reserve: u64,
    /// Bytes held for the closing records of open tunnels and the records of requests being
    /// served in inspected tunnels ([`Held`]).
    held: Arc<AtomicU64>,
    outage: Option<Outage>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_anchor_log = Instant::now();
        let mut last_sync = Instant::now() - SYNC_INTERVAL;
        loop {
            let first = if self.outage.is_some() {
                // Wake to retry even when nothing arrives: recovery needs no traffic.
                match self.rx.try_recv() {
                    Ok(e) => Some(e),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(RETRY);
                        if self.end_outage() {
                            self.sync(&mut last_anchor_log);
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                self.rx.blocking_recv()
            };
            let Some(first) = first else { break };
            batch.push(first);
            loop {
                while batch.len() < BATCH {
                    match self.rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                for entry in batch.drain(..) {
                    self.write(entry);
                }
                // Under load, gather what arrives until the interval since the last sync is over.
                if last_sync.elapsed() >= SYNC_INTERVAL || self.rx.is_closed() && self.rx.is_empty()
                {
                    break;
                }
                std::thread::sleep(
                    Duration::from_millis(1).min(SYNC_INTERVAL.saturating_sub(last_sync.elapsed())),
                );
            }
            last_sync = Instant::now();
            self.sync(&mut last_anchor_log);
            self.rotate_if_due();
        }
        let head = self.writer.head();
        tracing::info!(seq = head.seq, hash = %head.hash, "audit log closed");
    }

    fn write(&mut self, entry: Entry) {
        // Closing records and records of held requests have their space; everything else
        // waits for the outage record, which comes before anything written after the outage.
        let has_room = matches!(entry, Entry::Close(..) | Entry::Request(_, Some(_)));
        if self.outage.is_some() && !has_room && !self.end_outage() {
            match entry {
                Entry::Open(_, reply) => {
                    let _ = reply.send(None);
                }
                Entry::Hold(reply) => {
                    let _ = reply.send(None);
                }
                Entry::Whole(_) | Entry::Request(..) => self.lost(),
                Entry::Close(..) | Entry::Reopen => {}
            }
            return;
        }
        let result = match entry {
            Entry::Whole(r) => self.writer.append_keeping(&r, self.reserve + self.held()),
            Entry::Request(r, None) => self.writer.append_keeping(&r, self.reserve + self.held()),
            Entry::Request(r, Some(own)) => {
                drop(own);
                // Only the other holds stay untouched.
                self.writer.append_keeping(&r, self.held())
            }
            Entry::Open(r, reply) => {
                let keep = self.reserve + self.held() + CLOSE_RESERVE;
                let written = self.writer.append_opening(&r, keep);
                let opened = written.as_ref().ok().map(|&seq| Opened { seq });
                if opened.is_some() {
                    self.held.fetch_add(CLOSE_RESERVE, Ordering::Relaxed);
                }
                let _ = reply.send(opened);
                written
            }
            Entry::Close(r, opened) => {
                self.held.fetch_sub(CLOSE_RESERVE, Ordering::Relaxed);
                // Only its own share and the other tunnels' stay untouched.
                self.writer.append_closing(&r, opened.seq, self.held())
            }
            Entry::Hold(reply) => {
                let keep = self.reserve + self.held() + CLOSE_RESERVE;
                match self.writer.make_room(keep) {
                    Ok(()) => {
                        self.held.fetch_add(CLOSE_RESERVE, Ordering::Relaxed);
                        // A request cancelled meanwhile drops the hold it was sent.
                        let _ = reply.send(Some(Held(self.held.clone())));
                        Ok(0)
                    }
                    Err(e) => {
                        let _ = reply.send(None);
                        self.fail(&e);
                        return;
                    }
                }
            }
            Entry::Reopen => {
                let record = lifecycle(
                    &self.hostname,
                    "log continued in a new file: the old one was moved or deleted",
                    serde_json::json!({"event": "reopened"}),
                );
                match self.writer.reopen(&record) {
                    Ok(true) => {
                        tracing::warn!(log = %self.writer.path().display(), "audit log had been moved or deleted; continuing in a new file at its path, linked to the last record");
                        Ok(0)
                    }
                    Ok(false) => Ok(0),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(0) => {}
            Ok(_) => self.metrics.audit_records.inc(),
            Err(e) => {
                self.fail(&e);
                self.lost();
            }
        }
    }

    fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts a record that could not be written (refused requests are never served).
    fn lost(&mut self) {
        if let Some(o) = &mut self.outage {
            o.unrecorded += 1;
        }
    }

    fn fail(&mut self, e: &ChainError) {
        self.metrics.audit_errors.inc();
        if self.outage.is_none() {
            // The whole cause chain, kept as text for the outage record.
            let mut error = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                error = format!("{error}: {c}");
                cause = c.source();
            }
            tracing::error!(%error, full = e.is_full(), "audit log cannot be written; refusing new requests until it can");
            self.outage = Some(Outage {
                since_ms: now_ms(),
                error,
                unrecorded: 0,
            });
        }
        self.healthy.store(false, Ordering::Relaxed);
        self.metrics.audit_healthy.set(0);
    }

    /// Tries to write the outage record; true (serving again) when it was written.
    fn end_outage(&mut self) -> bool {
        let Some(o) = &self.outage else { return true };
        let record = lifecycle(
            &self.hostname,
            "audit log could not be written; requests were refused",
            serde_json::json!({
                "event": "audit_outage", "since": o.since_ms, "until": now_ms(), "error": tank_ebpf_common::ocsf::proxy::bounded(o.error.clone(), MAX_TEXT),
                "unrecorded_refusals": o.unrecorded,
            }),
        );
        // It needs the same room as any refusal record after it, and serving resumes only
        // with room for more than itself (else the next request meets the full disk again).
        if self
            .writer
            .append_keeping(&record, self.reserve + self.held() + chain::RESUME_ROOM)
            .is_err()
        {
            return false;
        }
        let o = self.outage.take().expect("in an outage");
        tracing::info!(
            unrecorded = o.unrecorded,
            "audit log writable again; serving requests"
        );
        self.healthy.store(true, Ordering::Relaxed);
        self.metrics.audit_healthy.set(1);
        true
    }

    fn sync(&mut self, last_anchor_log: &mut Instant) {
        match self.writer.sync() {
            Ok(head) => {
                if last_anchor_log.elapsed() >= Duration::from_secs(10) {
                    // The anchor also goes to the system log, which is shipped off the host.
                    tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");
                    *last_anchor_log = Instant::now();
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    fn rotate_if_due(&mut self) {
        if self.outage.is_some() || !self.writer.rotation_due() {
            return;
        }
        let record = lifecycle(
            &self.hostname,
            "new audit log segment",
            serde_json::json!({"event": "segment"}),
        );
        match self.writer.rotate(&record) {
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

/// The proxy's own lifecycle record about its log (`unmapped.event` says what: `audit_outage`,
/// `segment`, `reopened`).
pub fn lifecycle(hostname: &str, message: &str, details: serde_json::Value) -> LifecycleRecord {
    LifecycleRecord::of(
        PRODUCT,
        LogName::Proxy,
        hostname,
        env!("CARGO_PKG_VERSION"),
        lifecycle::OTHER,
        message.to_owned(),
        details,
    )
}
