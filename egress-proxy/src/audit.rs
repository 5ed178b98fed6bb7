//! The audit log, shaped after OCSF Network Activity (class 4001) and written through
//! [`tank_ebpf_common::chain`]: a connection that relays gets an opening record before the
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
//! and serves again. Records are bounded in size (URLs and error texts are cut), so one
//! client cannot fill the disk quickly with long refused requests. The writer also rotates the
//! log into segments (docs/operations.md).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tank_ebpf_common::chain::{self, ChainError, ChainWriter};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Records queued for the writer at most.
const QUEUE: usize = 8192;
/// Records appended between two checks of the clock at most.
const BATCH: usize = 1024;
/// Least time between two syncs of the audit log.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Log space each open tunnel holds for its closing record: records are far smaller, since
/// every variable field is cut to a bound ([`MAX_URL`], [`MAX_TEXT`]).
pub const CLOSE_RESERVE: u64 = 4096;
/// Bytes of a URL kept in a record; the rest is cut and its length noted.
pub const MAX_URL: usize = 1024;
/// Bytes of an error text kept in a record.
pub const MAX_TEXT: usize = 512;
/// How often a writer that cannot write tries again.
const RETRY: Duration = Duration::from_millis(100);

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// OCSF product metadata.
#[derive(Clone, Debug, Serialize)]
pub struct Product {
    /// Always `egress-proxy`.
    pub name: &'static str,
    /// Always `tank`.
    pub vendor_name: &'static str,
    /// The crate version.
    pub version: &'static str,
}

/// OCSF metadata.
#[derive(Clone, Debug, Serialize)]
pub struct Metadata {
    /// The product.
    pub product: Product,
    /// OCSF schema version.
    pub version: &'static str,
    /// Always `proxy`.
    pub log_name: &'static str,
}

/// OCSF device.
#[derive(Clone, Debug, Serialize)]
pub struct Device {
    /// The proxy host's name.
    pub hostname: String,
}

/// An address and port.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self {
            ip: crate::policy::canonical_ip(a.ip()),
            port: a.port(),
        }
    }
}

/// The destination.
#[derive(Clone, Debug, Serialize)]
pub struct DstEndpoint {
    /// The canonical target host (name or address), `null` when no request was parsed.
    pub hostname: Option<String>,
    /// The address connected to (or last tried), `null` if none.
    pub ip: Option<IpAddr>,
    /// The target port, `null` when no request was parsed.
    pub port: Option<u16>,
}

/// OCSF connection info.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    /// `tcp`.
    pub protocol_name: &'static str,
    /// 6.
    pub protocol_num: u8,
    /// 2 (outbound).
    pub direction_id: u8,
}

/// Bytes relayed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Traffic {
    /// Origin to client.
    pub bytes_in: u64,
    /// Client to origin.
    pub bytes_out: u64,
}

/// The URL of a plain-HTTP request.
#[derive(Clone, Debug, Serialize)]
pub struct Url {
    /// `http://host[:port]/path?query`, cut after [`MAX_URL`] bytes (ending in `…`).
    pub url_string: String,
}

impl HttpRequest {
    /// A request as recorded: its URL cut to [`MAX_URL`] bytes, the full length in
    /// `url_bytes` when it was cut.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            http_method: bounded(method.to_owned(), 32),
            url: Url {
                url_string: bounded(url.to_owned(), MAX_URL),
            },
            url_bytes: (url.len() > MAX_URL).then_some(url.len()),
        }
    }
}

/// A plain-HTTP request.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRequest {
    /// The method.
    pub http_method: String,
    /// The URL.
    pub url: Url,
    /// The URL's length when it was cut (not OCSF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_bytes: Option<usize>,
}

/// Fields outside OCSF.
#[derive(Clone, Debug, Serialize)]
pub struct Unmapped {
    /// `connect`, `http`, or `invalid` (no request could be parsed).
    pub kind: &'static str,
    /// The rule that decided (`allowed_domains:<name>`, `denied_domains:<name>`), or the
    /// refusal reason when no rule did (`default-deny`, `private-address`, ...).
    pub rule: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// One audit record.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// 4001, Network Activity.
    pub class_uid: u32,
    /// 4, Network Activity.
    pub category_uid: u32,
    /// 1 Open (an opening record, or a connection recorded whole), 2 Close (a closing
    /// record), 5 Refuse.
    pub activity_id: u32,
    /// 400100 + activity_id.
    pub type_uid: u32,
    /// Record time (end_time; start_time in an opening record), ms since the epoch.
    pub time: u64,
    /// When the connection was accepted.
    pub start_time: u64,
    /// When it ended; `null` in an opening record.
    pub end_time: Option<u64>,
    /// end - start, ms; `null` in an opening record.
    pub duration: Option<u64>,
    /// 1 informational (allowed), 3 medium (refused).
    pub severity_id: u32,
    /// `Allowed` / `Denied`.
    pub action: &'static str,
    /// 1 / 2.
    pub action_id: u32,
    /// `Allowed` / `Blocked`.
    pub disposition: &'static str,
    /// 1 / 2.
    pub disposition_id: u32,
    /// Product and schema.
    pub metadata: Metadata,
    /// The proxy host.
    pub device: Device,
    /// The client (agent host) as the proxy saw it.
    pub src_endpoint: Endpoint,
    /// The proxy's end of the client connection.
    pub proxy_endpoint: Endpoint,
    /// The target.
    pub dst_endpoint: DstEndpoint,
    /// TCP, outbound.
    pub connection_info: ConnectionInfo,
    /// Bytes each way; absent from an opening record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
    /// Plain-HTTP requests only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_request: Option<HttpRequest>,
    /// Proxy-specific fields.
    pub unmapped: Unmapped,
}

/// What is known about a connection while it is handled; turned into a [`Record`] at its end.
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
    /// Kind (`connect`, `http`, `invalid`).
    pub kind: &'static str,
    /// Target host.
    pub host: Option<String>,
    /// Target port.
    pub port: Option<u16>,
    /// Address connected to.
    pub ip: Option<IpAddr>,
    /// Plain-HTTP request.
    pub http: Option<HttpRequest>,
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
}

impl Draft {
    /// A draft for a connection accepted now.
    pub fn new(client: SocketAddr, local: SocketAddr) -> Self {
        Self {
            start_ms: now_ms(),
            started: Instant::now(),
            client,
            local,
            kind: "invalid",
            host: None,
            port: None,
            ip: None,
            http: None,
            allowed: false,
            rule: String::new(),
            error: None,
            traffic: Traffic::default(),
            opened: None,
        }
    }

    /// The opening record of an allowed connection about to relay: decision, 4-tuple, rule.
    pub fn opening(&self, hostname: &str) -> Record {
        self.record(hostname, None)
    }

    /// The record of the connection's end: its closing record when it was opened, else the
    /// one record of a refused or failed connection.
    pub fn finish(&self, hostname: &str) -> Record {
        let duration = self.started.elapsed().as_millis() as u64;
        self.record(hostname, Some(duration))
    }

    fn record(&self, hostname: &str, duration: Option<u64>) -> Record {
        let end = duration.map(|d| self.start_ms + d);
        let (activity_id, action, action_id, disposition, disposition_id, severity_id) =
            match (self.allowed, &self.opened, end) {
                (true, Some(_), Some(_)) => (2, "Allowed", 1, "Allowed", 1, 1),
                (true, _, _) => (1, "Allowed", 1, "Allowed", 1, 1),
                (false, _, _) => (5, "Denied", 2, "Blocked", 2, 3),
            };
        Record {
            class_uid: 4001,
            category_uid: 4,
            activity_id,
            type_uid: 400100 + activity_id,
            time: end.unwrap_or(self.start_ms),
            start_time: self.start_ms,
            end_time: end,
            duration,
            severity_id,
            action,
            action_id,
            disposition,
            disposition_id,
            metadata: Metadata {
                product: Product {
                    name: "egress-proxy",
                    vendor_name: "tank",
                    version: env!("CARGO_PKG_VERSION"),
                },
                version: "1.1.0",
                log_name: "proxy",
            },
            device: Device {
                hostname: hostname.to_owned(),
            },
            src_endpoint: self.client.into(),
            proxy_endpoint: self.local.into(),
            dst_endpoint: DstEndpoint {
                hostname: self.host.clone(),
                ip: self.ip,
                port: self.port,
            },
            connection_info: ConnectionInfo {
                protocol_name: "tcp",
                protocol_num: 6,
                direction_id: 2,
            },
            traffic: end.map(|_| self.traffic.clone()),
            http_request: self.http.clone(),
            unmapped: Unmapped {
                kind: self.kind,
                rule: self.rule.clone(),
                error: self.error.clone().map(|e| bounded(e, MAX_TEXT)),
            },
        }
    }
}

/// A written opening record: its `seq`, which the closing record names.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    seq: u64,
}

/// What the writer thread is asked to do.
enum Entry {
    /// A connection recorded whole (refused, or failed before relaying).
    Whole(Record),
    /// An opening record; answered with its `seq` once written, or `None` when refused.
    Open(Record, oneshot::Sender<Option<Opened>>),
    /// The closing record of an opened connection.
    Close(Record, Opened),
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
                "audit log ended in a partial record (crash mid-write); it stays in the log and `audit verify` reports it"
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
            held: 0,
            outage: None,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || state.run())
            .expect("spawn audit writer");
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
    pub async fn opening(&self, record: Record) -> Option<Opened> {
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
    /// Bytes held for the closing records of open tunnels.
    held: u64,
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
        // The outage record comes before anything written after the outage.
        if self.outage.is_some() && !matches!(entry, Entry::Close(..)) && !self.end_outage() {
            match entry {
                Entry::Open(_, reply) => {
                    let _ = reply.send(None);
                }
                Entry::Whole(_) => self.lost(),
                Entry::Close(..) | Entry::Reopen => {}
            }
            return;
        }
        let result = match entry {
            Entry::Whole(r) => self.writer.append_keeping(&r, self.reserve + self.held),
            Entry::Open(r, reply) => {
                let keep = self.reserve + self.held + CLOSE_RESERVE;
                let written = self.writer.append_opening(&r, keep);
                let opened = written.as_ref().ok().map(|&seq| Opened { seq });
                if opened.is_some() {
                    self.held += CLOSE_RESERVE;
                }
                let _ = reply.send(opened);
                written
            }
            Entry::Close(r, opened) => {
                self.held = self.held.saturating_sub(CLOSE_RESERVE);
                // Only its own share and the other tunnels' stay untouched.
                self.writer.append_closing(&r, opened.seq, self.held)
            }
            Entry::Reopen => {
                let record = lifecycle(
                    &self.hostname,
                    "log reopened after being moved away (SIGHUP)",
                    serde_json::json!({}),
                );
                match self.writer.reopen(&record) {
                    Ok(true) => {
                        tracing::info!(log = %self.writer.path().display(), "audit log had been moved away; continuing in a new file, linked to the last record");
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
                "since": o.since_ms, "until": now_ms(), "error": bounded(o.error.clone(), MAX_TEXT),
                "unrecorded_refusals": o.unrecorded,
            }),
        );
        // It needs the same room as any refusal record after it.
        if self
            .writer
            .append_keeping(&record, self.reserve + self.held)
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
            serde_json::json!({}),
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

/// An OCSF Application Lifecycle (6002) record of the proxy itself: an outage of its log, a
/// new segment, a reopened file.
fn lifecycle(hostname: &str, message: &str, details: serde_json::Value) -> serde_json::Value {
    let now = now_ms();
    serde_json::json!({
        "class_uid": 6002, "category_uid": 6, "activity_id": 99, "type_uid": 600299,
        "time": now, "severity_id": 1, "message": message,
        "metadata": {"product": {"name": "egress-proxy", "vendor_name": "tank", "version": env!("CARGO_PKG_VERSION")},
                     "version": "1.1.0", "log_name": "proxy"},
        "device": {"hostname": hostname},
        "app": {"name": "egress-proxy", "vendor_name": "tank", "version": env!("CARGO_PKG_VERSION")},
        "unmapped": details,
    })
}
