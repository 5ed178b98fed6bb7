//! One request inside an inspected tunnel: judged with the policy's vocabulary (host must
//! be the tunnel's, then methods, paths and denials on the normalised path), credentials
//! set, forwarded to the origin in the form its HTTP version wants, the response passed
//! back (secret masked), and one HTTP Activity record written when the response ends.
//! A refusal is a `403` inside TLS with `X-Tank-Refused-By` (and a JSON body for clients
//! that accept JSON); the tunnel stays open for the next request. A WebSocket upgrade is
//! judged the same way; once the origin answers `101` it is handed to [`super::upgrade`].

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use super::body::{full, ProxyBody, Tap};
use super::record::RequestFacts;
use super::upgrade::{self, Pending};
use super::Tunnel;
use crate::budget::Kind;
use crate::credentials::{Applied, StreamMask};
use crate::policy::{Reason, Refusal};
use crate::target::{parse_authority, Host};

/// Serves one request of the tunnel. Never fails: every outcome is a response.
pub async fn serve(
    tunnel: Arc<Tunnel>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut facts = RequestFacts::start(&tunnel, &req);
    tunnel.requests.fetch_add(1, Ordering::Relaxed);
    let _busy = tunnel.activity.busy();
    let accepts_json = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("json")));
    match forward(&tunnel, req, &mut facts).await {
        Ok(response) => Ok(response),
        Err(Answer::Refused(refusal)) => {
            tunnel.metrics.refused(refusal.reason);
            info!(tunnel = %tunnel.uid, request = %facts.line(), by = refusal.by(), "refused inside an inspected tunnel: {}", refusal.detail);
            let response = refusal_response(&refusal, accepts_json);
            facts.refused(&refusal);
            facts.status = Some(response.status().as_u16());
            facts.finish(&tunnel);
            Ok(response)
        }
        Err(Answer::Upstream(detail)) => {
            tunnel.metrics.upstream_errors.inc();
            warn!(tunnel = %tunnel.uid, request = %facts.line(), "{detail}");
            let body = format!("egress-proxy: {}: {detail}\n", facts.line());
            let response = Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .header("X-Tank-Error", "origin")
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(full(body))
                .expect("valid response");
            facts.error = Some(detail);
            facts.status = Some(502);
            facts.finish(&tunnel);
            Ok(response)
        }
    }
}

enum Answer {
    Refused(Refusal),
    Upstream(String),
}

fn refusal_response(refusal: &Refusal, json: bool) -> Response<ProxyBody> {
    let (status, _) = refusal.reason.status();
    let (body, content_type) = if json {
        (refusal.json(), "application/json")
    } else {
        (
            format!("egress-proxy: refused: {}\n", refusal.detail),
            "text/plain; charset=utf-8",
        )
    };
    let mut builder = Response::builder();
    if let Some(b) = &refusal.budget {
        builder = builder.header(header::RETRY_AFTER, b.retry_after_secs);
    }
    builder
        .status(status)
        .header("X-Tank-Refused-By", refusal.by())
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body))
        .expect("valid response")
}

/// The request's host must be the tunnel's: a `Host` or `:authority` naming another host
/// would reach whatever else the origin serves (domain fronting).
fn check_authority(tunnel: &Tunnel, req: &Request<Incoming>) -> Result<(), Refusal> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_owned(),
        None => match req.headers().get(header::HOST).map(|h| h.to_str()) {
            Some(Ok(h)) => h.to_owned(),
            Some(Err(_)) => {
                return Err(Refusal::new(
                    Reason::BadRequest,
                    "the Host header is not ASCII",
                ))
            }
            None => {
                return Err(Refusal::new(
                    Reason::BadRequest,
                    "the request names no host (Host or :authority)",
                ))
            }
        },
    };
    let mismatch = || {
        Refusal::new(
            Reason::HostMismatch,
            format!(
                "the request is for `{authority}` but the tunnel is to {}",
                tunnel.target
            ),
        )
    };
    let named = parse_authority(&authority, Some(tunnel.target.port)).map_err(|_| mismatch())?;
    if named != tunnel.target {
        return Err(mismatch());
    }
    Ok(())
}

async fn forward(
    tunnel: &Arc<Tunnel>,
    req: Request<Incoming>,
    facts: &mut RequestFacts,
) -> Result<Response<ProxyBody>, Answer> {
    // Space for the record first: a full disk refuses the request rather than serve it
    // unrecorded.
    facts.held = tunnel.audit.hold().await;
    if facts.held.is_none() {
        return Err(Answer::Refused(Refusal::new(
            Reason::AuditUnavailable,
            "the audit log cannot be written; nothing passes unrecorded",
        )));
    }
    check_authority(tunnel, &req).map_err(Answer::Refused)?;
    let method = req.method().as_str().to_ascii_uppercase();
    // Judged on the normal form, which is also what the origin is sent.
    let normal = crate::path::normalise(req.uri().path_and_query().map_or("/", |p| p.as_str()))
        .map_err(|e| Answer::Refused(Refusal::new(Reason::BadRequest, e.to_string())))?;
    let rule = tunnel
        .policy
        .decide(&tunnel.target, &method, Some(&normal))
        .map_err(Answer::Refused)?;
    let path = normal.to_string();
    facts.decided_by(rule);
    let charge = tunnel
        .budgets
        .charge(&tunnel.policy, rule, tunnel.client.ip());
    if let Some(c) = &charge {
        facts.charge = Some(c.clone());
        c.admit(0).map_err(Answer::Refused)?;
    }
    let host = match &tunnel.target.host {
        Host::Name(n) => n.as_str(),
        Host::Ip(_) => unreachable!("inspected tunnels are to names (checked at load)"),
    };

    let (parts, body) = req.into_parts();
    let websocket = upgrade::websocket(parts.version, &parts.headers);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let mut mask = None;
    if let Some(c) = tunnel
        .policy
        .credentials
        .iter()
        .find(|c| c.applies(host, normal.path()))
    {
        match c.apply(&mut headers) {
            Applied::Injected => {
                facts.credential = Some(c.name.clone());
                mask = Some(c.clone());
            }
            Applied::Mismatch => {
                return Err(Answer::Refused(Refusal::new(
                    Reason::CredentialMismatch,
                    format!(
                        "header `{}` must be absent or `{}` on requests to {host}: the proxy sets credential `{}` itself",
                        c.header, c.placeholder_value(), c.name
                    ),
                )))
            }
        }
    }
    let authority = if tunnel.target.port == 443 {
        host.to_owned()
    } else {
        tunnel.target.to_string()
    };
    // An upgrade goes on an HTTP/1.1 connection of its own, whatever the tunnel's origin
    // connection speaks.
    let origin_h2 = tunnel.origin.h2 && websocket.is_none();
    let uri: http::Uri = if origin_h2 {
        format!("https://{authority}{path}")
    } else {
        path.clone()
    }
    .parse()
    .map_err(|e| {
        Answer::Refused(Refusal::new(
            Reason::BadRequest,
            format!("bad request target: {e}"),
        ))
    })?;
    if origin_h2 {
        headers.remove(header::HOST);
    } else {
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&authority).expect("a canonical authority is a header value"),
        );
    }
    let sent = facts.bytes_out.clone();
    let body = Tap::new(body.map_err(Into::into).boxed(), sent)
        .metered(charge.clone().map(|c| (c, Kind::BytesOut)))
        .boxed();
    let mut upstream = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(body)
        .expect("valid request");
    *upstream.headers_mut() = headers;
    if let Some(value) = &websocket {
        upgrade::set_upgrade_headers(upstream.headers_mut(), value.clone());
        if mask.is_some() {
            // Compressed frames (permessage-deflate) would hide an echoed secret from
            // the mask, as an encoded body would.
            upstream
                .headers_mut()
                .remove(header::SEC_WEBSOCKET_EXTENSIONS);
        }
    }

    let mut response = match websocket {
        Some(_) => tunnel.origin.upgrade(upstream).await,
        None => tunnel.origin.send(upstream).await,
    }
    .map_err(|e| {
        // A request body cut at its budget's ceiling is a refusal, not an origin failure.
        match charge.as_ref().and_then(|c| c.cut_refusal()) {
            Some(refusal) => Answer::Refused(refusal),
            None => Answer::Upstream(e),
        }
    })?;
    let accepted = websocket.is_some() && response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgraded = if accepted {
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| Answer::Upstream(format!("origin upgrade: {e}")))?;
        Some(upgraded)
    } else {
        None
    };
    let (mut parts, body) = response.into_parts();
    let origin_upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(c) = &mask {
        mask_headers(&mut parts.headers, c.secret.expose());
    }
    facts.status = Some(parts.status.as_u16());
    if let Some(origin) = upgraded {
        let value = origin_upgrade.unwrap_or(HeaderValue::from_static("websocket"));
        upgrade::set_upgrade_headers(&mut parts.headers, value);
        debug!(tunnel = %tunnel.uid, request = %facts.line(), "upgraded to WebSocket");
        let pending = Pending {
            origin,
            facts: std::mem::replace(facts, RequestFacts::placeholder()),
            mask: mask.as_ref().map(|c| StreamMask::new(&c.secret)),
        };
        *tunnel.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(pending);
        return Ok(Response::from_parts(parts, full(Bytes::new())));
    }
    debug!(tunnel = %tunnel.uid, request = %facts.line(), status = parts.status.as_u16(), "forwarded");
    let received = facts.bytes_in.clone();
    let done = Arc::new(Mutex::new(Some(std::mem::replace(
        facts,
        RequestFacts::placeholder(),
    ))));
    let t = tunnel.clone();
    let body = Tap::new(body.map_err(Into::into).boxed(), received)
        .masking(mask.as_ref().map(|c| StreamMask::new(&c.secret)))
        .metered(charge.map(|c| (c, Kind::BytesIn)))
        .on_end(move || {
            if let Some(f) = done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                f.finish(&t);
            }
        })
        .boxed();
    Ok(Response::from_parts(parts, body))
}

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Masks a secret echoed in response headers (same length, `*`).
fn mask_headers(headers: &mut HeaderMap, secret: &[u8]) {
    for value in headers.values_mut() {
        let mut bytes = value.as_bytes().to_vec();
        if crate::credentials::mask(&mut bytes, secret) > 0 {
            *value = HeaderValue::from_bytes(&bytes).expect("masking keeps header bytes valid");
        }
    }
}
