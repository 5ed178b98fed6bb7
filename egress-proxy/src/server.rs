//! The proxy server: listeners, one task per client connection, reload and shutdown.
//!
//! Each connection: admission (connection caps) → request head (size cap, read timeout) →
//! client network → policy → resolution (hosts table, then the system resolver) → address
//! check → connect to exactly a checked address → relay → one audit record. Errors of one
//! connection are logged and recorded, never propagated; the accept loops survive them.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tank_ebpf_common::ocsf::proxy::RequestKind;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::audit::{Audit, Draft};
use crate::config::{self, Config};
use crate::http::{parse_request, response, Request};
use crate::metrics::Metrics;
use crate::policy::{Limits, Policy, Reason, Refusal};
use crate::relay::{self, Upstream};
use crate::target::{Host, Target};

/// State shared by every connection.
pub struct Shared {
    policy: RwLock<Arc<Policy>>,
    local_addrs: RwLock<Arc<Vec<IpAddr>>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    audit: Audit,
    hostname: String,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
    /// Cut every tunnel now (shutdown grace over).
    cut: CancellationToken,
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The addresses a started proxy listens on (written to `--ready-file`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Bound {
    /// Proxy listeners, ports resolved.
    pub listen: Vec<SocketAddr>,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
    /// Process id.
    pub pid: u32,
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // `[::]` must not also take IPv4, so `0.0.0.0` and `[::]` can both be listed.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid c_int option value on our socket.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Raises the soft open-files limit to the hard limit: every tunnel holds two sockets and
/// two pipes.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                debug!(from = old, to = lim.rlim_max, "raised the open-files limit");
            }
        }
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then drains. `config_path` is re-read on SIGHUP.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    raise_nofile();
    let metrics = Arc::new(Metrics::default());
    metrics.audit_healthy.set(1);
    let mut listeners = Vec::new();
    for addr in &config.listen {
        listeners.push(bind(*addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    let admin = match config.admin_listen {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "the admin listener is not on loopback; anyone who reaches it can read the metrics");
            }
            Some(bind(addr).with_context(|| format!("cannot listen on {addr} (admin_listen)"))?)
        }
        None => None,
    };
    // Listeners first: a proxy that cannot listen fails before touching the audit log.
    let (audit, audit_thread) = Audit::open(&config.audit_log, metrics.clone())
        .with_context(|| format!("cannot open the audit log `{}`", config.audit_log.display()))?;
    let bound = Bound {
        listen: listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<_>>()?,
        admin: admin.as_ref().map(|l| l.local_addr()).transpose()?,
        pid: std::process::id(),
    };
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(config.policy.clone())),
        local_addrs: RwLock::new(Arc::new(crate::addr::local_addresses())),
        metrics: metrics.clone(),
        audit,
        hostname,
        per_client: Mutex::new(HashMap::new()),
        total: AtomicUsize::new(0),
        cut: CancellationToken::new(),
    });

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for l in listeners {
        loops.push(tokio::spawn(accept_loop(
            l,
            shared.clone(),
            tracker.clone(),
            stop.clone(),
        )));
    }
    if let Some(l) = admin {
        loops.push(tokio::spawn(admin_loop(l, shared.clone(), stop.clone())));
    }
    for a in &bound.listen {
        info!(addr = %a, "listening for proxy clients");
    }
    if let Some(a) = bound.admin {
        info!(addr = %a, "admin listener: /metrics, /healthz");
    }
    if let Some(path) = &ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&bound)?)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the ready file `{}`", path.display()))?;
    }

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&config_path, &config, &shared),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    stop.cancel();
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    let grace = shared.policy().limits.shutdown_grace;
    info!(
        connections = shared.total.load(Ordering::Relaxed),
        grace_secs = grace.as_secs_f64(),
        "shutting down: no new connections; draining open ones"
    );
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(grace) => {
            warn!(connections = shared.total.load(Ordering::Relaxed), "shutdown grace over; cutting the remaining tunnels");
        }
        _ = term.recv() => warn!("second SIGTERM; cutting the remaining tunnels"),
        _ = int.recv() => warn!("second SIGINT; cutting the remaining tunnels"),
    }
    shared.cut.cancel();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        error!("connections still open 10 s after being cut; exiting without their audit records");
    }
    drop(shared);
    tokio::task::spawn_blocking(move || audit_thread.join()).await?;
    info!("stopped");
    Ok(())
}

fn reload(path: &Path, running: &Config, shared: &Shared) {
    match config::load(path) {
        Ok(new) => {
            if new.listen != running.listen
                || new.admin_listen != running.admin_listen
                || new.audit_log != running.audit_log
            {
                warn!(
                    "`listen`, `admin_listen` and `audit_log` changes take effect only on restart"
                );
            }
            info!(
                allowed = new.policy.allowed.len(),
                denied = new.policy.denied.len(),
                "policy reloaded from {}",
                path.display()
            );
            *shared.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new.policy);
            *shared
                .local_addrs
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Arc::new(crate::addr::local_addresses());
            shared.metrics.reloads_ok.inc();
        }
        Err(e) => {
            shared.metrics.reloads_rejected.inc();
            error!(
                "reload rejected, keeping the previous policy: {:#}",
                anyhow::Error::from(e)
            );
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let local = match stream.local_addr() {
                    Ok(l) => l,
                    Err(e) => {
                        debug!(%peer, "connection gone before it could be handled: {e}");
                        continue;
                    }
                };
                tracker.spawn(handle(shared.clone(), stream, peer, local));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the loop survives.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Holds a connection's place under the connection caps.
struct Admission {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.active_connections.add(-1);
        let mut map = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, client: IpAddr, limits: &Limits) -> Result<Admission, Refusal> {
    let total = shared.total.fetch_add(1, Ordering::Relaxed) + 1;
    shared.metrics.active_connections.add(1);
    {
        let mut map = shared.per_client.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(client).or_insert(0) += 1;
    }
    let admission = Admission {
        shared: shared.clone(),
        client,
    };
    if total > limits.max_connections {
        return Err(Refusal::new(
            Reason::ConnectionLimit,
            format!(
                "the proxy has {} connections open (max_connections)",
                limits.max_connections
            ),
        ));
    }
    let mine = shared
        .per_client
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&client)
        .copied()
        .unwrap_or(0);
    if mine > limits.max_connections_per_client {
        return Err(Refusal::new(
            Reason::ClientConnectionLimit,
            format!(
                "{client} has {} connections open (max_connections_per_client)",
                limits.max_connections_per_client
            ),
        ));
    }
    Ok(admission)
}

async fn handle(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let policy = shared.policy();
    let mut draft = Draft::new(peer, local);
    // The admission holds the connection's place under the caps until its record is queued.
    let admission = match admit(&shared, peer.ip(), &policy.limits) {
        Ok(admission) => {
            let _ = stream.set_nodelay(true);
            serve(&shared, &policy, &mut stream, &mut draft).await;
            Some(admission)
        }
        Err(refusal) => {
            warn!(client = %peer, limit = refusal.reason.as_str(), "{}; refusing the connection", refusal.detail);
            refuse(&shared, &mut stream, &mut draft, refusal, "").await;
            None
        }
    };
    if draft.allowed {
        match draft.kind {
            RequestKind::Http => shared.metrics.allowed_http.inc(),
            _ => shared.metrics.allowed_connect.inc(),
        }
    }
    let record = draft.finish(&shared.hostname);
    shared.audit.record(record).await;
    drop(admission);
}

/// Answers a refusal, records it in the draft and the metrics.
async fn refuse(
    shared: &Shared,
    stream: &mut TcpStream,
    draft: &mut Draft,
    refusal: Refusal,
    what: &str,
) {
    let (status, text) = refusal.reason.status();
    let by = refusal.by().to_owned();
    let body = if what.is_empty() {
        format!("egress-proxy: refused: {}\n", refusal.detail)
    } else {
        format!("egress-proxy: refused {what}: {}\n", refusal.detail)
    };
    shared.metrics.refused(refusal.reason);
    if !matches!(
        refusal.reason,
        Reason::ConnectionLimit | Reason::ClientConnectionLimit
    ) {
        info!(client = %draft.client, request = what, by = %by, "refused: {}", refusal.detail);
    }
    let bytes = response(status, text, &[("X-Tank-Refused-By", &by)], &body);
    let _ = relay::write_all(stream, &bytes).await;
    relay::linger(stream).await;
    draft.allowed = false;
    draft.rule = by;
    draft.error = Some(refusal.detail);
}

async fn upstream_error(
    shared: &Shared,
    stream: &mut TcpStream,
    draft: &mut Draft,
    stage: &str,
    detail: String,
    what: &str,
) {
    shared.metrics.upstream_errors.inc();
    warn!(client = %draft.client, request = what, stage, "{detail}");
    let body = format!("egress-proxy: {what}: {detail}\n");
    let bytes = response(502, "Bad Gateway", &[("X-Tank-Error", stage)], &body);
    let _ = relay::write_all(stream, &bytes).await;
    relay::linger(stream).await;
    draft.error = Some(detail);
}

enum HeadFail {
    Closed,
    TooLarge,
    Timeout,
    Cut,
    Bad(String),
    Io(io::Error),
}

/// Reads until a whole request head is parsed. Returns it with the bytes read past it.
async fn read_head(
    stream: &mut TcpStream,
    limits: &Limits,
    cut: &CancellationToken,
) -> Result<(Request, Vec<u8>), HeadFail> {
    let deadline = Instant::now() + limits.header_read_timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let room = limits.max_header_bytes - buf.len();
        if room == 0 {
            return Err(HeadFail::TooLarge);
        }
        let want = room.min(chunk.len());
        let n = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])) => match r {
                Err(_) => return Err(HeadFail::Timeout),
                Ok(Err(e)) => return Err(HeadFail::Io(e)),
                Ok(Ok(n)) => n,
            },
            () = cut.cancelled() => return Err(HeadFail::Cut),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadFail::Closed
            } else {
                HeadFail::Bad("client closed mid-head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf) {
            Ok(Some((req, len))) => return Ok((req, buf.split_off(len))),
            Ok(None) => {}
            Err(crate::http::HeadError::TooManyHeaders) => return Err(HeadFail::TooLarge),
            Err(e) => return Err(HeadFail::Bad(e.to_string())),
        }
    }
}

async fn resolve(policy: &Policy, target: &Target) -> Result<Vec<IpAddr>, String> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![*ip]),
        Host::Name(name) => {
            if let Some(addrs) = policy.hosts.get(name) {
                return Ok(addrs.clone());
            }
            if !policy.system_resolver {
                return Err(format!(
                    "{name} is not in [hosts] and system_resolver = false"
                ));
            }
            let addrs: Vec<IpAddr> = tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| format!("cannot resolve {name}: {e}"))?
                .map(|sa| sa.ip())
                .collect();
            if addrs.is_empty() {
                return Err(format!("{name} has no address"));
            }
            Ok(addrs)
        }
    }
}

async fn serve(shared: &Shared, policy: &Policy, stream: &mut TcpStream, draft: &mut Draft) {
    let limits = &policy.limits;
    let (req, early) = match read_head(stream, limits, &shared.cut).await {
        Ok(x) => x,
        Err(fail) => {
            let refusal = match fail {
                HeadFail::Closed => {
                    draft.rule = Reason::BadRequest.as_str().to_owned();
                    draft.error = Some("client closed before sending a request".into());
                    return;
                }
                HeadFail::Cut => {
                    draft.rule = Reason::BadRequest.as_str().to_owned();
                    draft.error = Some("cut at shutdown before a request arrived".into());
                    return;
                }
                HeadFail::Io(e) => {
                    draft.rule = Reason::BadRequest.as_str().to_owned();
                    draft.error = Some(format!("reading the request: {e}"));
                    return;
                }
                HeadFail::TooLarge => {
                    warn!(client = %draft.client, max_header_bytes = limits.max_header_bytes, "request head too large");
                    Refusal::new(
                        Reason::HeaderTooLarge,
                        format!(
                            "request head exceeds {} bytes (max_header_bytes)",
                            limits.max_header_bytes
                        ),
                    )
                }
                HeadFail::Timeout => {
                    warn!(client = %draft.client, "request head not received in time (header_read_timeout_secs)");
                    Refusal::new(
                        Reason::HeaderTimeout,
                        format!(
                            "request head not received within {} s (header_read_timeout_secs)",
                            limits.header_read_timeout.as_secs_f64()
                        ),
                    )
                }
                HeadFail::Bad(why) => Refusal::new(Reason::BadRequest, why),
            };
            refuse(shared, stream, draft, refusal, "").await;
            return;
        }
    };
    let target = req.target().clone();
    draft.host = Some(target.host.to_plain_string());
    draft.port = Some(target.port);
    let what = match &req {
        Request::Connect { .. } => {
            draft.kind = RequestKind::Connect;
            format!("CONNECT {target}")
        }
        Request::Http { method, url, .. } => {
            draft.kind = RequestKind::Http;
            draft.http = Some((method.clone(), url.clone()));
            format!("{method} {url}")
        }
    };
    if !policy.client_allowed(draft.client.ip()) {
        let r = Refusal::new(
            Reason::ClientNetwork,
            format!("{} is not in client_networks", draft.client.ip()),
        );
        return refuse(shared, stream, draft, r, &what).await;
    }
    if !shared.audit.is_healthy() {
        let r = Refusal::new(
            Reason::AuditUnavailable,
            "the audit log cannot be written; nothing passes unrecorded",
        );
        return refuse(shared, stream, draft, r, &what).await;
    }
    let path = match &req {
        Request::Http { path, .. } => Some(path.as_str()),
        Request::Connect { .. } => None,
    };
    let method_upper = req.method().to_ascii_uppercase();
    let rule = match policy.decide(&target, &method_upper, path) {
        Ok(rule) => rule,
        Err(r) => return refuse(shared, stream, draft, r, &what).await,
    };
    draft.rule = rule.id.clone();

    // Resolve and connect within connect_timeout; only checked addresses are dialled.
    let deadline = Instant::now() + limits.connect_timeout;
    let resolved = tokio::select! {
        r = tokio::time::timeout_at(deadline, resolve(policy, &target)) => r.unwrap_or_else(|_| Err("resolution timed out (connect_timeout_secs)".into())),
        () = shared.cut.cancelled() => Err("cut at shutdown".into()),
    };
    let addrs = match resolved {
        Ok(a) => a,
        Err(e) => {
            draft.allowed = true;
            return upstream_error(shared, stream, draft, "resolve", e, &what).await;
        }
    };
    let local = shared
        .local_addrs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let addrs = match policy.connectable(rule, &addrs, &local) {
        Ok(a) => a,
        Err(mut r) => {
            r.detail = format!(
                "{} resolves only to refused addresses: {} (rule {})",
                target.host, r.detail, rule.id
            );
            return refuse(shared, stream, draft, r, &what).await;
        }
    };
    draft.allowed = true;
    let mut origin = None;
    let mut last_err = String::new();
    for ip in &addrs {
        draft.ip = Some(*ip);
        let sa = SocketAddr::new(*ip, target.port);
        let attempt = tokio::select! {
            r = tokio::time::timeout_at(deadline, TcpStream::connect(sa)) => r,
            () = shared.cut.cancelled() => { last_err = "cut at shutdown".into(); break }
        };
        match attempt {
            Ok(Ok(s)) => {
                origin = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = format!("cannot connect to {sa}: {e}"),
            Err(_) => {
                last_err = format!("connecting to {sa} timed out (connect_timeout_secs)");
                break;
            }
        }
    }
    let Some(origin) = origin else {
        return upstream_error(shared, stream, draft, "connect", last_err, &what).await;
    };
    let _ = origin.set_nodelay(true);
    debug!(client = %draft.client, request = %what, rule = %rule.id, origin = ?draft.ip, "allowed");

    let upstream = match &req {
        Request::Connect { .. } => {
            if let Err(e) =
                relay::write_all(stream, b"HTTP/1.1 200 Connection established\r\n\r\n").await
            {
                draft.error = Some(format!("writing the CONNECT answer: {e}"));
                return;
            }
            Upstream::Tunnel
        }
        Request::Http { head, body, .. } => {
            if let Err(e) = relay::write_all(&origin, head).await {
                return upstream_error(
                    shared,
                    stream,
                    draft,
                    "connect",
                    format!("sending the request: {e}"),
                    &what,
                )
                .await;
            }
            draft.traffic.bytes_out = head.len() as u64;
            shared.metrics.bytes_out.add(head.len() as u64);
            Upstream::Body(*body)
        }
    };
    shared.metrics.active_tunnels.add(1);
    let outcome = relay::relay(
        stream,
        &origin,
        upstream,
        &early,
        limits.idle_timeout,
        &shared.cut,
        &shared.metrics,
    )
    .await;
    shared.metrics.active_tunnels.add(-1);
    if matches!(outcome.end, relay::End::Idle) {
        shared.metrics.idle_timeouts.inc();
        info!(client = %draft.client, request = %what, "closed after idle_timeout_secs without traffic");
    }
    draft.traffic.bytes_in = outcome.bytes_in;
    draft.traffic.bytes_out += outcome.bytes_out;
    draft.error = outcome.end.error();
}

async fn admin_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return false,
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|&b| b == b' ');
            let (method, path) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let path = path.split(|&b| b == b'?').next().unwrap_or_default();
            let reply = match (method, path) {
                (b"GET", b"/metrics") => {
                    let body = shared.metrics.render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                }
                (b"GET", b"/healthz") if shared.audit.is_healthy() => {
                    response(200, "OK", &[], "ok\n")
                }
                (b"GET", b"/healthz") => {
                    response(503, "Service Unavailable", &[], "audit log not writable\n")
                }
                _ => response(404, "Not Found", &[], "try /metrics or /healthz\n"),
            };
            let _ = relay::write_all(&stream, &reply).await;
            relay::linger(&mut stream).await;
        });
    }
}
