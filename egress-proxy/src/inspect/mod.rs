//! Inspected tunnels: for a host whose rule says `inspect = true`, the proxy answers the
//! CONNECT, terminates the agent's TLS with a leaf from its CA ([`crate::ca`]), opens its
//! own verified TLS to the origin ([`origin`]), and judges, forwards and records every
//! request inside on its own ([`exchange`], [`record`]).
//!
//! Followed from the CONNECT: the connection pipeline (`server::connection`) admits the
//! tunnel on host and port and dials a checked address; [`open_origin`] verifies the
//! origin's certificate for exactly the CONNECT host **before** the agent gets its `200`
//! (a failure is a `502` naming the reason); [`serve`] reads the agent's ClientHello (its
//! SNI must be the CONNECT host), finishes the handshake offering `h2` and `http/1.1`, and
//! serves HTTP/1.1 or HTTP/2 as negotiated, independently of what the origin speaks. An
//! HTTP/1.1 connection whose request was upgraded to a WebSocket ends in [`upgrade`]'s relay.

mod body;
mod exchange;
mod io;
pub mod origin;
mod record;
mod upgrade;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use tank_ebpf_common::ocsf::proxy::TunnelKind;

use crate::audit::{Audit, Draft};
use crate::budget::Budgets;
use crate::ca::Ca;
use crate::metrics::Metrics;
use crate::policy::{Policy, Reason, Refusal, Rule};
use crate::target::Target;

pub use io::Counts;

/// The CA and the origin trust of inspected tunnels (`[inspection]` in the config).
pub struct Inspection {
    /// The CA that mints the agent-facing leaves.
    pub ca: Arc<Ca>,
    /// TLS towards origins: system roots plus `upstream_ca`.
    pub origin_tls: Arc<rustls::ClientConfig>,
    /// The same, offering HTTP/1.1 only (WebSocket upgrades).
    origin_tls_h1: Arc<rustls::ClientConfig>,
    upstream_ca: Option<PathBuf>,
    agent_tls: Mutex<HashMap<String, AgentTls>>,
}

/// A host's leaf and the agent-facing TLS configuration made with it.
type AgentTls = (Arc<rustls::sign::CertifiedKey>, Arc<rustls::ServerConfig>);

impl std::fmt::Debug for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspection")
            .field("ca", &self.ca)
            .field("upstream_ca", &self.upstream_ca)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Inspection {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca && self.upstream_ca == other.upstream_ca
    }
}
impl Eq for Inspection {}

impl Inspection {
    /// Loads the CA (proving key and certificate belong together) and the origin trust.
    pub fn load(cert: &Path, key: &Path, upstream_ca: Option<&Path>) -> Result<Self, String> {
        let ca = Ca::load(cert, key).map_err(|e| e.to_string())?;
        let origin_tls = origin::client_config(upstream_ca)?;
        Ok(Self {
            ca: Arc::new(ca),
            origin_tls_h1: origin::h1_only(&origin_tls),
            origin_tls,
            upstream_ca: upstream_ca.map(Path::to_owned),
            agent_tls: Mutex::new(HashMap::new()),
        })
    }

    /// The agent-facing TLS configuration for `host`: its leaf, ALPN `h2` then `http/1.1`.
    fn agent_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let leaf = self.ca.leaf(host).map_err(|e| e.to_string())?;
        let mut cache = self.agent_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, config)) = cache.get(host) {
            if Arc::ptr_eq(l, &leaf) {
                return Ok(config.clone());
            }
        }
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        cache.insert(host.to_owned(), (leaf, config.clone()));
        Ok(config)
    }
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Verifies the origin: TLS over the dialled `tcp` for exactly the CONNECT host, then the
/// HTTP handshake in the version the origin chose. Errors are one line for the `502`.
pub async fn open_origin(
    inspection: &Inspection,
    target: &Target,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<origin::Origin, String> {
    let addr = tcp
        .peer_addr()
        .map_err(|e| format!("origin connection: {e}"))?;
    let host = target.host.to_plain_string();
    let tls = origin::tls(&inspection.origin_tls, &host, tcp, timeout).await?;
    origin::Origin::new(
        tls,
        addr,
        &host,
        inspection.origin_tls.clone(),
        inspection.origin_tls_h1.clone(),
        timeout,
    )
    .await
}

/// The idle clock of a tunnel: it runs only while no request is in flight.
struct Activity {
    busy: AtomicUsize,
    base: Instant,
    last: AtomicU64,
}

struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            busy: AtomicUsize::new(0),
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }
    /// When the tunnel goes idle, if nothing happens before.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        (self.busy.load(Ordering::Relaxed) == 0)
            .then(|| self.base + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle)
    }
}

/// What every exchange of one inspected tunnel shares.
pub struct Tunnel {
    policy: Arc<Policy>,
    target: Target,
    rule: Rule,
    origin: origin::Origin,
    origin_addr: SocketAddr,
    client: SocketAddr,
    audit: Audit,
    metrics: Arc<Metrics>,
    hostname: String,
    uid: String,
    requests: AtomicU64,
    activity: Activity,
    budgets: Arc<Budgets>,
    upgraded: Mutex<Option<upgrade::Pending>>,
}

/// Resolves when the tunnel has been idle for `timeout` (no request in flight, no bytes).
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        match activity.idle_at(timeout) {
            Some(at) if Instant::now() >= at => return,
            Some(at) => tokio::time::sleep_until(at.min(Instant::now() + timeout)).await,
            None => tokio::time::sleep(timeout.min(Duration::from_secs(1))).await,
        }
    }
}

/// What [`serve`] needs from the connection pipeline.
pub struct Setup {
    /// The policy the tunnel was admitted under.
    pub policy: Arc<Policy>,
    /// The CONNECT target.
    pub target: Target,
    /// The verified origin.
    pub origin: origin::Origin,
    /// Where request records go.
    pub audit: Audit,
    /// The proxy's metrics.
    pub metrics: Arc<Metrics>,
    /// The proxy host's name, for records.
    pub hostname: String,
    /// Cut at shutdown.
    pub cut: CancellationToken,
    /// Budgets the requests inside are charged to.
    pub budgets: Arc<Budgets>,
}

/// A record id unique across this proxy's runs: start time, process and a counter.
pub fn new_uid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{:x}",
        crate::audit::now_ms(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Serves an inspected tunnel whose `200` the agent already has. `early` holds bytes the
/// agent sent past the CONNECT head. Fills the tunnel's draft: uid, TLS facts, request
/// count, bytes on the agent connection, and a refusal if the ClientHello was wrong.
pub async fn serve(setup: Setup, agent: &mut TcpStream, early: Vec<u8>, draft: &mut Draft) {
    let Setup {
        policy,
        target,
        origin,
        audit,
        metrics,
        hostname,
        cut,
        budgets,
    } = setup;
    // Normally given to the opening record already.
    let uid = draft.uid.get_or_insert_with(new_uid).clone();
    draft.tunnel = Some(TunnelKind::Inspected);
    let rule = policy
        .inspecting(&target)
        .expect("serve is called for inspected targets only")
        .clone();
    let inspection = policy
        .inspection
        .clone()
        .expect("validated: inspect rules need [inspection]");
    let host = target.host.to_plain_string();
    let counts = Arc::new(Counts::default());
    let io = io::AgentIo::new(early, agent, counts.clone());
    let limits = policy.limits.clone();

    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(limits.header_read_timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return not_tls(
                draft,
                &metrics,
                format!("no TLS ClientHello from the agent: {e}"),
            )
        }
        Err(_) => {
            return not_tls(
                draft,
                &metrics,
                "no TLS ClientHello within header_read_timeout_secs".into(),
            )
        }
    };
    let hello = start.client_hello();
    draft.sni = hello.server_name().map(str::to_ascii_lowercase);
    draft.alpn = hello
        .alpn()
        .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
        .unwrap_or_default();
    if let Some(sni) = draft.sni.clone().filter(|sni| *sni != host) {
        let r = Refusal::new(
            Reason::SniMismatch,
            format!("the ClientHello names `{sni}`, the tunnel is to {host}"),
        );
        metrics.refused(r.reason);
        info!(client = %draft.client, tunnel = %uid, "refused: {}", r.detail);
        draft.allowed = false;
        draft.rule = r.by().to_owned();
        draft.error = Some(r.detail);
        return;
    }
    let config = match inspection.agent_config(&host) {
        Ok(c) => c,
        Err(e) => {
            draft.error = Some(format!("cannot mint a certificate for {host}: {e}"));
            return;
        }
    };
    let tls_stream =
        match tokio::time::timeout(limits.header_read_timeout, start.into_stream(config)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                draft.error = Some(format!("TLS handshake with the agent failed: {e}"));
                return finish(draft, &counts, 0);
            }
            Err(_) => {
                draft.error = Some("TLS handshake with the agent timed out".into());
                return finish(draft, &counts, 0);
            }
        };
    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let tunnel = Arc::new(Tunnel {
        policy: policy.clone(),
        origin_addr: draft
            .ip
            .map_or(draft.local, |ip| SocketAddr::new(ip, target.port)),
        target,
        rule,
        origin,
        client: draft.client,
        audit,
        metrics: metrics.clone(),
        hostname,
        uid: uid.clone(),
        requests: AtomicU64::new(0),
        activity: Activity::new(),
        budgets,
        upgraded: Mutex::new(None),
    });
    debug!(tunnel = %uid, agent_h2 = h2, origin_h2 = tunnel.origin.h2, "inspected tunnel open");
    metrics.active_tunnels.add(1);
    let t = tunnel.clone();
    // Boxed: an HTTP/1.1 connection is polled without shutdown (to take its stream back
    // for a WebSocket), which wants an `Unpin` future.
    let service = hyper::service::service_fn(move |req| Box::pin(exchange::serve(t.clone(), req)));
    let io = TokioIo::new(tls_stream);
    let idle = idle(&tunnel.activity, limits.idle_timeout);
    let ended = if h2 {
        let mut conn = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service),
        );
        drive(
            &mut conn,
            |c, cx| std::future::Future::poll(c.as_mut(), cx),
            |c| c.as_mut().graceful_shutdown(),
            &cut,
            idle,
        )
        .await
    } else {
        let mut conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service);
        let ended = drive(
            &mut conn,
            |c, cx| c.poll_without_shutdown(cx),
            |c| std::pin::Pin::new(c).graceful_shutdown(),
            &cut,
            idle,
        )
        .await;
        let parts = conn.into_parts();
        let mut agent = parts.io.into_inner();
        let pending = tunnel
            .upgraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match pending {
            Some(p) => {
                let t = &tunnel;
                upgrade::relay(agent, parts.read_buf, p, t, limits.idle_timeout, &cut).await
            }
            None => {
                use tokio::io::AsyncWriteExt;
                let _ = tokio::time::timeout(Duration::from_secs(5), agent.shutdown()).await;
            }
        }
        ended
    };
    metrics.active_tunnels.add(-1);
    draft.error = ended;
    finish(draft, &counts, tunnel.requests.load(Ordering::Relaxed));
}

/// Runs a server connection (`poll` drives it) to its end; on shutdown or idleness asks it
/// to close and gives it a moment to.
async fn drive<C>(
    conn: &mut C,
    poll: impl Fn(&mut C, &mut Context<'_>) -> Poll<Result<(), hyper::Error>>,
    shutdown: impl FnOnce(&mut C),
    cut: &CancellationToken,
    idle: impl std::future::Future<Output = ()>,
) -> Option<String> {
    tokio::pin!(idle);
    let why = {
        let mut served = std::future::poll_fn(|cx| poll(conn, cx));
        tokio::select! {
            r = &mut served => return r.err().filter(|e| !e.is_incomplete_message()).map(|e| e.to_string()),
            () = cut.cancelled() => "cut at shutdown",
            () = &mut idle => "idle timeout",
        }
    };
    shutdown(conn);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| poll(conn, cx)),
    )
    .await;
    Some(why.to_owned())
}

fn finish(draft: &mut Draft, counts: &Counts, requests: u64) {
    draft.traffic.bytes_out = counts.from_agent.load(Ordering::Relaxed);
    draft.traffic.bytes_in = counts.to_agent.load(Ordering::Relaxed);
    draft.requests = Some(requests);
}

fn not_tls(draft: &mut Draft, metrics: &Metrics, detail: String) {
    let r = Refusal::new(Reason::NotTls, detail);
    metrics.refused(r.reason);
    draft.allowed = false;
    draft.rule = r.by().to_owned();
    draft.error = Some(r.detail);
}
