//! The audit log: one chained record per connection, shaped after OCSF Network Activity
//! (class 4001), written through [`tank_ebpf_common::chain`].
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

use serde::Serialize;
use tank_ebpf_common::chain::{ChainError, ChainWriter};
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
    /// `http://host[:port]/path?query`.
    pub url_string: String,
}

/// A plain-HTTP request.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRequest {
    /// The method.
    pub http_method: String,
    /// The URL.
    pub url: Url,
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
    /// 1 opened/allowed, 5 refused.
    pub activity_id: u32,
    /// 400100 + activity_id.
    pub type_uid: u32,
    /// Record time (= end_time), ms since the epoch.
    pub time: u64,
    /// When the connection was accepted.
    pub start_time: u64,
    /// When it ended.
    pub end_time: u64,
    /// end - start, ms.
    pub duration: u64,
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
    /// Bytes each way.
    pub traffic: Traffic,
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
        }
    }

    /// The finished record.
    pub fn finish(self, hostname: &str) -> Record {
        let duration = self.started.elapsed().as_millis() as u64;
        let end = self.start_ms + duration;
        let (activity_id, action, action_id, disposition, disposition_id, severity_id) =
            if self.allowed {
                (1, "Allowed", 1, "Allowed", 1, 1)
            } else {
                (5, "Denied", 2, "Blocked", 2, 3)
            };
        Record {
            class_uid: 4001,
            category_uid: 4,
            activity_id,
            type_uid: 400100 + activity_id,
            time: end,
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
                hostname: self.host,
                ip: self.ip,
                port: self.port,
            },
            connection_info: ConnectionInfo {
                protocol_name: "tcp",
                protocol_num: 6,
                direction_id: 2,
            },
            traffic: self.traffic,
            http_request: self.http,
            unmapped: Unmapped {
                kind: self.kind,
                rule: self.rule,
                error: self.error,
            },
        }
    }
}

/// The sending side of the audit log.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Record>,
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
    pub async fn record(&self, record: Record) {
        if self.tx.send(record).await.is_err() {
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
    mut rx: mpsc::Receiver<Record>,
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
                match writer.append(&r) {
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
