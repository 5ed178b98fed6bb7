//! One proxy connection, from its verdict at accept to its audit record: request head
//! (size cap, read timeout) → audit health → policy → resolution → address check → dial
//! exactly a checked address → relay → one record. Every refusal answers the client
//! with the structured reason (`X-Tank-Refused-By`) and lands in the record.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tank_ebpf_common::ocsf::proxy::{RequestKind, TunnelKind};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{admission::Verdict, Shared};
use crate::audit::Draft;
use crate::clienthello;
use crate::http::{response, HeadReader, Request};
use crate::inspect;
use crate::policy::{Limits, Policy, Reason, Refusal};
use crate::relay::{self, Upstream};
use crate::target::{Host, Target};

/// The refusal text while the audit log cannot be written.
const AUDIT_UNAVAILABLE: &str = "the audit log cannot be written; nothing passes unrecorded";

/// Serves one accepted connection, judged at accept ([`admission`]), and queues its audit
/// record.
pub(super) async fn handle(
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    verdict: Verdict,
) {
    let mut draft = Draft::new(peer, local);
    let Verdict { refusal, place } = verdict;
    match refusal {
        None => {
            let _ = stream.set_nodelay(true);
            serve(&shared, &policy, &mut stream, &mut draft).await;
        }
        Some(refusal) => {
            if refusal.reason != Reason::ClientNetwork {
                warn!(client = %peer, limit = refusal.reason.as_str(), "{}; refusing the connection", refusal.detail);
            }
            refuse(&shared, &mut stream, &mut draft, refusal, "").await;
        }
    }
    if draft.allowed {
        match draft.kind {
            RequestKind::Http => shared.metrics.allowed_http.inc(),
            _ => shared.metrics.allowed_connect.inc(),
        }
    }
    shared.audit.finish(&draft, &shared.hostname).await;
    // The connection's place (under the caps, or among the refusals lingering) is held
    // until its record is queued.
    drop(place);
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

/// Answers `502` for an allowed request the origin side could not serve.
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
    let mut head = HeadReader::default();
    let mut chunk = [0u8; 4096];
    loop {
        let room = limits.max_header_bytes - head.len();
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
            return Err(if head.is_empty() {
                HeadFail::Closed
            } else {
                HeadFail::Bad("client closed mid-head".into())
            });
        }
        match head.push(&chunk[..n]) {
            Ok(Some(done)) => return Ok(done),
            Ok(None) => {}
            Err(crate::http::HeadError::TooManyHeaders) => return Err(HeadFail::TooLarge),
            Err(e) => return Err(HeadFail::Bad(e.to_string())),
        }
    }
}

/// Dials the checked addresses in order within `deadline`; the first that answers wins.
/// `draft.ip` ends as the address last tried.
async fn dial(
    shared: &Shared,
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
    draft: &mut Draft,
) -> Result<TcpStream, String> {
    let mut last_err = String::new();
    for ip in addrs {
        draft.ip = Some(*ip);
        let sa = SocketAddr::new(*ip, port);
        let attempt = tokio::select! {
            r = tokio::time::timeout_at(deadline, TcpStream::connect(sa)) => r,
            () = shared.cut.cancelled() => return Err("cut at shutdown".into()),
        };
        match attempt {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last_err = format!("cannot connect to {sa}: {e}"),
            Err(_) => {
                return Err(format!(
                    "connecting to {sa} timed out (connect_timeout_secs)"
                ))
            }
        }
    }
    Err(last_err)
}

async fn serve(shared: &Shared, policy: &Arc<Policy>, stream: &mut TcpStream, draft: &mut Draft) {
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
    if !shared.audit.is_healthy() {
        let r = Refusal::new(Reason::AuditUnavailable, AUDIT_UNAVAILABLE);
        return refuse(shared, stream, draft, r, &what).await;
    }
    let path = match &req {
        Request::Http { path, .. } => Some(path),
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
    let resolver = shared.resolver();
    let resolved = tokio::select! {
        r = tokio::time::timeout_at(deadline, resolver.resolve(policy, &target, deadline)) => r.unwrap_or_else(|_| Err("resolution timed out (connect_timeout_secs)".into())),
        () = shared.cut.cancelled() => Err("cut at shutdown".into()),
    };
    let addrs = match resolved {
        Ok(a) => a,
        Err(e) => {
            draft.allowed = true;
            return upstream_error(shared, stream, draft, "resolve", e, &what).await;
        }
    };
    let local = shared.local_addrs();
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
    let origin = match dial(shared, &addrs, target.port, deadline, draft).await {
        Ok(s) => s,
        Err(e) => return upstream_error(shared, stream, draft, "connect", e, &what).await,
    };
    let _ = origin.set_nodelay(true);
    let inspection = match &req {
        Request::Connect { .. } => policy.inspecting(&target).and(policy.inspection.as_ref()),
        Request::Http { .. } => None,
    };
    if let Request::Connect { .. } = &req {
        // The opening record already says how the tunnel is relayed, and an inspected
        // tunnel's carries the uid its request records name.
        draft.tunnel = Some(match inspection {
            Some(_) => {
                draft.uid = Some(inspect::new_uid());
                TunnelKind::Inspected
            }
            None => TunnelKind::Opaque,
        });
    }
    // Record before relay: the opening record is written before the `200` or the first
    // forwarded byte, or the connection is refused.
    match shared.audit.opening(draft.opening(&shared.hostname)).await {
        Some(opened) => draft.opened = Some(opened),
        None => {
            let r = Refusal::new(Reason::AuditUnavailable, AUDIT_UNAVAILABLE);
            return refuse(shared, stream, draft, r, &what).await;
        }
    }
    debug!(client = %draft.client, request = %what, rule = %rule.id, origin = ?draft.ip, "allowed");

    if let Some(inspection) = inspection {
        return inspected(
            shared, policy, inspection, target, stream, origin, early, draft, &what,
        )
        .await;
    }
    let mut early = early;
    let upstream = match &req {
        Request::Connect { .. } => {
            if let Err(e) =
                relay::write_all(stream, b"HTTP/1.1 200 Connection established\r\n\r\n").await
            {
                draft.error = Some(format!("writing the CONNECT answer: {e}"));
                return;
            }
            if policy.tls_ports.contains(&target.port) && !rule.opaque {
                let host = match &target.host {
                    Host::Name(n) => Some(n.as_str()),
                    Host::Ip(_) => None,
                };
                match clienthello::check(
                    stream,
                    std::mem::take(&mut early),
                    host,
                    limits.header_read_timeout,
                )
                .await
                {
                    Ok((hello, read)) => {
                        (draft.sni, draft.alpn) = (hello.sni, hello.alpn);
                        early = read;
                    }
                    Err((hello, refusal)) => {
                        if let Some(h) = hello {
                            (draft.sni, draft.alpn) = (h.sni, h.alpn);
                        }
                        shared.metrics.refused(refusal.reason);
                        info!(client = %draft.client, request = %what, by = refusal.by(), "refused: {}", refusal.detail);
                        draft.allowed = false;
                        draft.rule = refusal.by().to_owned();
                        draft.error = Some(refusal.detail);
                        return;
                    }
                }
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
    // A malformed request body (the relay's only InvalidData) before the origin answered:
    // the client gets a 400 saying so rather than a bare close.
    if let relay::End::Error(e) = &outcome.end {
        if e.kind() == io::ErrorKind::InvalidData && outcome.bytes_in == 0 {
            shared.metrics.refused(Reason::BadRequest);
            let body = format!("egress-proxy: {what}: {e}\n");
            let bytes = response(
                400,
                "Bad Request",
                &[("X-Tank-Refused-By", Reason::BadRequest.as_str())],
                &body,
            );
            let _ = relay::write_all(stream, &bytes).await;
            relay::linger(stream).await;
            draft.error = Some(format!("{e}; answered 400 after forwarding the head"));
        }
    }
}

/// An inspected tunnel: the origin is verified for exactly the CONNECT host before the agent
/// gets its `200` (a failure is a `502` with the reason), then [`inspect::serve`] takes over.
#[allow(clippy::too_many_arguments)]
async fn inspected(
    shared: &Shared,
    policy: &Arc<Policy>,
    inspection: &inspect::Inspection,
    target: Target,
    stream: &mut TcpStream,
    origin: TcpStream,
    early: Vec<u8>,
    draft: &mut Draft,
    what: &str,
) {
    let limits = &policy.limits;
    let origin =
        match inspect::open_origin(inspection, &target, origin, limits.connect_timeout).await {
            Ok(o) => o,
            Err(e) => return upstream_error(shared, stream, draft, "origin-tls", e, what).await,
        };
    if let Err(e) = relay::write_all(stream, b"HTTP/1.1 200 Connection established\r\n\r\n").await {
        draft.error = Some(format!("writing the CONNECT answer: {e}"));
        return;
    }
    let setup = inspect::Setup {
        policy: policy.clone(),
        target,
        origin,
        audit: shared.audit.clone(),
        metrics: shared.metrics.clone(),
        hostname: shared.hostname.clone(),
        cut: shared.cut.clone(),
    };
    inspect::serve(setup, stream, early, draft).await
}
