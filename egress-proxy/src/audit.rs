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
    /// This record's id (inspected tunnels: their requests' `correlation_uid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The tunnel record's `uid`, for request records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_uid: Option<String>,
}

impl Metadata {
    fn proxy(uid: Option<String>, correlation_uid: Option<String>) -> Self {
        Metadata {
            product: Product {
                name: "egress-proxy",
                vendor_name: "tank",
                version: env!("CARGO_PKG_VERSION"),
            },
            version: "1.1.0",
            log_name: "proxy",
            uid,
            correlation_uid,
        }
    }
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
    /// `inspected` for tunnels whose requests were judged (and recorded) one by one,
    /// `opaque` for tunnels relayed as bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<&'static str>,
    /// Requests served inside an inspected tunnel (each has its own record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
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
    /// What the tunnel's TLS ClientHello said, when one was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Proxy-specific fields.
    pub unmapped: Unmapped,
}

/// OCSF `tls`: what the agent's ClientHello asked for.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tls {
    /// The server name (SNI), if the ClientHello named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The ALPN protocols offered, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
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
    /// Record id, set for inspected tunnels.
    pub uid: Option<String>,
    /// The ClientHello's server name and ALPN, when one was read.
    pub tls: Option<Tls>,
    /// `inspected` or `opaque`, for tunnels.
    pub tunnel: Option<&'static str>,
    /// Requests served inside an inspected tunnel.
    pub requests: Option<u64>,
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
            uid: None,
            tls: None,
            tunnel: None,
            requests: None,
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
            metadata: Metadata::proxy(self.uid, None),
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
            tls: self.tls,
            unmapped: Unmapped {
                kind: self.kind,
                rule: self.rule,
                error: self.error,
                tunnel: self.tunnel,
                requests: self.requests,
            },
        }
    }
}

/// One request inside an inspected tunnel, as the proxy knows it when the response ends.
#[derive(Clone, Debug)]
pub struct Request {
    /// Allowed (forwarded) or refused inside the tunnel.
    pub allowed: bool,
    /// Received at, ms since the epoch.
    pub start_ms: u64,
    /// Until the response ended, ms.
    pub duration_ms: u64,
    /// The agent host.
    pub client: SocketAddr,
    /// The origin address the tunnel is connected to.
    pub origin: SocketAddr,
    /// The tunnel's host.
    pub host: String,
    /// The method, as sent.
    pub method: String,
    /// `https://host[:port]/path[?query]` (query left out where the rule redacts it).
    pub url: String,
    /// `HTTP/1.1` or `HTTP/2`, towards the agent.
    pub version: &'static str,
    /// The status the agent got.
    pub status: Option<u16>,
    /// Response body bytes.
    pub bytes_in: u64,
    /// Request body bytes.
    pub bytes_out: u64,
    /// The deciding rule, or the refusal's reason.
    pub rule: String,
    /// The credential injected, by name.
    pub credential: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
    /// The tunnel record's `metadata.uid`.
    pub tunnel_uid: String,
}

/// OCSF HTTP Activity (4002): one request inside an inspected tunnel.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    /// 4002.
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// OCSF HTTP Activity's activity by method (3 Get, 6 Post...; 99 Other).
    pub activity_id: u32,
    /// 400200 + activity_id.
    pub type_uid: u32,
    /// = end_time.
    pub time: u64,
    /// Request received.
    pub start_time: u64,
    /// Response ended.
    pub end_time: u64,
    /// ms.
    pub duration: u64,
    /// 1 allowed, 3 refused.
    pub severity_id: u32,
    /// `Allowed` / `Denied`.
    pub action: &'static str,
    /// 1 / 2.
    pub action_id: u32,
    /// `Allowed` / `Blocked`.
    pub disposition: &'static str,
    /// 1 / 2.
    pub disposition_id: u32,
    /// With `correlation_uid` = the tunnel record's `uid`.
    pub metadata: Metadata,
    /// The proxy host.
    pub device: Device,
    /// The agent host.
    pub src_endpoint: Endpoint,
    /// The origin.
    pub dst_endpoint: DstEndpoint,
    /// The request.
    pub http_request: InnerHttpRequest,
    /// The response, when one was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_response: Option<HttpResponse>,
    /// Body bytes each way.
    pub traffic: Traffic,
    /// Proxy-specific fields.
    pub unmapped: RequestUnmapped,
}

/// OCSF `http_request` of a request inside a tunnel.
#[derive(Clone, Debug, Serialize)]
pub struct InnerHttpRequest {
    /// The method.
    pub http_method: String,
    /// The URL.
    pub url: Url,
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: &'static str,
}

/// OCSF `http_response`.
#[derive(Clone, Debug, Serialize)]
pub struct HttpResponse {
    /// The status code.
    pub code: u16,
}

/// Request-record fields outside OCSF.
#[derive(Clone, Debug, Serialize)]
pub struct RequestUnmapped {
    /// Always `request`.
    pub kind: &'static str,
    /// The deciding rule, or the refusal reason.
    pub rule: String,
    /// The `[[credentials]]` entry injected, by name (never its secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

/// OCSF HTTP Activity's activity_id for a method.
fn http_activity(method: &str) -> u32 {
    match method.to_ascii_uppercase().as_str() {
        "CONNECT" => 1,
        "DELETE" => 2,
        "GET" => 3,
        "HEAD" => 4,
        "OPTIONS" => 5,
        "POST" => 6,
        "PUT" => 7,
        "TRACE" => 8,
        _ => 99,
    }
}

impl RequestRecord {
    /// The record of `r`, written on `hostname`.
    pub fn new(r: Request, hostname: &str) -> Self {
        let activity_id = http_activity(&r.method);
        let end = r.start_ms + r.duration_ms;
        let (action, action_id, disposition, disposition_id, severity_id) = if r.allowed {
            ("Allowed", 1, "Allowed", 1, 1)
        } else {
            ("Denied", 2, "Blocked", 2, 3)
        };
        RequestRecord {
            class_uid: 4002,
            category_uid: 4,
            activity_id,
            type_uid: 400200 + activity_id,
            time: end,
            start_time: r.start_ms,
            end_time: end,
            duration: r.duration_ms,
            severity_id,
            action,
            action_id,
            disposition,
            disposition_id,
            metadata: Metadata::proxy(None, Some(r.tunnel_uid)),
            device: Device {
                hostname: hostname.to_owned(),
            },
            src_endpoint: r.client.into(),
            dst_endpoint: DstEndpoint {
                hostname: Some(r.host),
                ip: Some(crate::policy::canonical_ip(r.origin.ip())),
                port: Some(r.origin.port()),
            },
            http_request: InnerHttpRequest {
                http_method: r.method,
                url: Url { url_string: r.url },
                version: r.version,
            },
            http_response: r.status.map(|code| HttpResponse { code }),
            traffic: Traffic {
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
            },
            unmapped: RequestUnmapped {
                kind: "request",
                rule: r.rule,
                credential: r.credential,
                error: r.error,
            },
        }
    }
}

/// A record of either kind, as queued for the writer.
#[derive(Debug)]
enum Entry {
    Connection(Record),
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
    pub async fn record(&self, record: Record) {
        self.send(Entry::Connection(record)).await
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
