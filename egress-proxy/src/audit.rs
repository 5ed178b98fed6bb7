//! The audit log: one chained record per connection, an OCSF Network Activity record
//! ([`tank_ebpf_common::ocsf::proxy::ConnectionRecord`]), and one HTTP Activity record per
//! request inside an inspected tunnel ([`RequestRecord`]), written through
//! [`tank_ebpf_common::chain`].
//!
//! Records go to one writer thread over a bounded channel. The thread appends every record
//! queued, then makes the batch durable with one `fdatasync` and moves the anchor (group
//! commit). Syncs are at least [`SYNC_INTERVAL`] apart: a record arriving after a quiet
//! spell is synced at once; under load the writer gathers records for the rest of the
//! interval and one sync covers them all. So a record is durable at most one interval
//! plus one sync after it is queued, and the disk sees at most 100 syncs a second however
//! many connections there are.
//!
//! Never fail open: if appending or syncing fails, the proxy is marked unhealthy and refuses
//! new requests (`audit-unavailable`) until a later sync succeeds.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tank_ebpf_common::chain::{ChainError, ChainWriter};
use tank_ebpf_common::ocsf::proxy::{
    BudgetNote, Connection, ConnectionRecord, ProxyDetails, RequestKind, RequestRecord, Traffic,
    TunnelKind, Url,
};
use tank_ebpf_common::ocsf::Endpoint;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Records queued for the writer at most.
const QUEUE: usize = 8192;
/// Records appended between two checks of the clock at most.
const BATCH: usize = 1024;
/// Least time between two syncs of the audit log.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(10);

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
            uid: None,
            tunnel: None,
            sni: None,
            alpn: Vec::new(),
            requests: None,
            budget: None,
        }
    }

    /// The finished record.
    pub fn finish(self, hostname: &str) -> ConnectionRecord {
        let (http_method, url) = self.http.unzip();
        let connection = Connection {
            allowed: self.allowed,
            start_ms: self.start_ms as i64,
            duration_ms: self.started.elapsed().as_millis() as i64,
            client: self.client,
            local: self.local,
            // With no request parsed, the only destination there was is the proxy itself.
            target: match (self.host, self.ip) {
                (None, None) => self.local.into(),
                (hostname, ip) => Endpoint {
                    hostname,
                    ip,
                    port: self.port,
                    ..Endpoint::default()
                },
            },
            traffic: self.traffic,
            url: url.map(|url_string| Url { url_string }),
            uid: self.uid,
            details: ProxyDetails {
                kind: self.kind,
                rule: self.rule,
                http_method,
                error: self.error,
                tunnel: self.tunnel,
                sni: self.sni,
                alpn: self.alpn,
                requests: self.requests,
                budget: self.budget.map(Box::new),
            },
        };
        ConnectionRecord::new(connection, hostname, env!("CARGO_PKG_VERSION"))
    }
}

/// A record of either kind, as queued for the writer.
#[derive(Debug)]
enum Entry {
    Connection(Box<ConnectionRecord>),
    Request(Box<RequestRecord>),
}

/// The sending side of the audit log.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Entry>,
    healthy: Arc<AtomicBool>,
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
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<(Audit, AuditThread), ChainError> {
        let (mut writer, recovery) = ChainWriter::open(path)?;
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
        let h = healthy.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_loop(writer, rx, h, metrics))
            .expect("spawn audit writer");
        Ok((Audit { tx, healthy }, AuditThread(thread)))
    }

    /// Queues a record; waits if the writer is behind (backpressure, never dropping).
    pub async fn record(&self, record: ConnectionRecord) {
        self.send(Entry::Connection(Box::new(record))).await
    }

    /// Queues a request record of an inspected tunnel.
    pub async fn record_request(&self, record: RequestRecord) {
        self.send(Entry::Request(Box::new(record))).await
    }

    async fn send(&self, entry: Entry) {
        if self.tx.send(entry).await.is_err() {
            tracing::error!("audit writer is gone; record lost");
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// False after a failed append or sync, until a sync succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

fn writer_loop(
    mut writer: ChainWriter,
    mut rx: mpsc::Receiver<Entry>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_anchor_log = Instant::now();
    let mut last_sync = Instant::now() - SYNC_INTERVAL;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        let mut ok = true;
        loop {
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            for r in batch.drain(..) {
                let appended = match &r {
                    Entry::Connection(r) => writer.append(r),
                    Entry::Request(r) => writer.append(r),
                };
                match appended {
                    Ok(_) => metrics.audit_records.inc(),
                    Err(e) => {
                        ok = false;
                        metrics.audit_errors.inc();
                        tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "audit record could not be appended; refusing new requests");
                    }
                }
            }
            // Under load, gather what arrives until the interval since the last sync is over.
            if last_sync.elapsed() >= SYNC_INTERVAL || rx.is_closed() && rx.is_empty() {
                break;
            }
            std::thread::sleep(
                Duration::from_millis(1).min(SYNC_INTERVAL.saturating_sub(last_sync.elapsed())),
            );
        }
        last_sync = Instant::now();
        match writer.sync() {
            Ok(head) => {
                if last_anchor_log.elapsed() >= Duration::from_secs(10) {
                    // The anchor also goes to the system log, which is shipped off the host.
                    tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");
                    last_anchor_log = Instant::now();
                }
            }
            Err(e) => {
                ok = false;
                metrics.audit_errors.inc();
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "audit log could not be synced; refusing new requests");
            }
        }
        if healthy.swap(ok, Ordering::Relaxed) != ok && ok {
            tracing::info!("audit log writable again; serving requests");
        }
        metrics.audit_healthy.set(ok as i64);
    }
    let head = writer.head();
    tracing::info!(seq = head.seq, hash = %head.hash, "audit log closed");
}
