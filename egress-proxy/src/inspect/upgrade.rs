//! WebSocket upgrades inside an inspected tunnel. The upgrade request is judged like any
//! other request ([`super::exchange`]: host, methods, paths, denials, credentials); when
//! allowed it goes to the origin on an HTTP/1.1 connection of its own, and after the
//! origin's `101` the two upgraded streams are relayed both ways here, counted and charged
//! to the rule's budget (bytes out and in, each read no larger than the room left, so a
//! WebSocket stops at a byte ceiling like a tunnel), with a credential's secret masked
//! towards the agent, until both sides close, a ceiling is reached, the tunnel idles out or
//! the proxy shuts down. The request's record is written when the relay ends.
//!
//! Only `Upgrade: websocket` on HTTP/1.1 is relayed; any other upgrade token is stripped
//! and the request forwarded as a plain one. The agent-facing HTTP/2 side does not offer
//! extended CONNECT (RFC 8441), so a client wanting a WebSocket opens HTTP/1.1 for it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::record::RequestFacts;
use super::Tunnel;
use crate::budget::{Charge, Kind};
use crate::credentials::StreamMask;

/// How long masked bytes that could begin the secret wait for the rest of a message.
const MASK_HOLD: Duration = Duration::from_millis(20);

/// The `Upgrade` value of an HTTP/1.1 WebSocket upgrade request, if `headers` ask for one.
pub fn websocket(version: http::Version, headers: &HeaderMap) -> Option<HeaderValue> {
    let tokens = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let upgrade = headers.get(header::UPGRADE)?;
    (version == http::Version::HTTP_11
        && tokens(header::CONNECTION)
            .iter()
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
        && tokens(header::UPGRADE)
            .iter()
            .any(|t| t.eq_ignore_ascii_case("websocket")))
    .then(|| upgrade.clone())
}

/// Sets the hop-by-hop headers of an upgrade (the rest were stripped).
pub fn set_upgrade_headers(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// An upgrade the origin accepted, waiting for the agent's side to be handed over.
pub struct Pending {
    /// The origin's upgraded stream.
    pub origin: hyper::upgrade::Upgraded,
    /// The upgrade request's facts; its record is written when the relay ends.
    pub facts: RequestFacts,
    /// Masks the injected credential's secret towards the agent.
    pub mask: Option<StreamMask>,
}

/// A direction's budget: how much its next read may take, and charging what it moved.
struct Meter<'a>(Option<(&'a Charge, Kind)>);

impl Meter<'_> {
    fn take(&self, want: usize) -> std::io::Result<usize> {
        self.0.map_or(Ok(want), |(c, kind)| c.take(kind, want))
    }
    fn moved(&self, n: usize) {
        if let Some((c, kind)) = self.0 {
            c.moved(kind, n as u64);
        }
    }
}

/// Relays an accepted upgrade both ways. `early` holds bytes the agent sent past the
/// upgrade request.
pub async fn relay<A: AsyncRead + AsyncWrite + Unpin>(
    agent: A,
    early: Bytes,
    pending: Pending,
    tunnel: &Tunnel,
    idle_timeout: Duration,
    cut: &CancellationToken,
) {
    let Pending {
        origin,
        mut facts,
        mut mask,
    } = pending;
    let (mut agent_r, mut agent_w) = tokio::io::split(agent);
    let (mut origin_r, mut origin_w) = tokio::io::split(TokioIo::new(origin));
    let (sent, received) = (facts.bytes_out.clone(), facts.bytes_in.clone());
    let charge = facts.charge.clone();
    let (out_meter, in_meter) = (
        Meter(charge.as_deref().map(|c| (c, Kind::BytesOut))),
        Meter(charge.as_deref().map(|c| (c, Kind::BytesIn))),
    );
    let activity = &tunnel.activity;
    activity.touch();
    let up = async {
        let mut early = &early[..];
        while !early.is_empty() {
            let n = out_meter.take(early.len())?;
            origin_w.write_all(&early[..n]).await?;
            origin_w.flush().await?;
            sent.fetch_add(n as u64, Ordering::Relaxed);
            out_meter.moved(n);
            early = &early[n..];
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let want = out_meter.take(buf.len())?;
            let n = agent_r.read(&mut buf[..want]).await?;
            if n == 0 {
                return origin_w.shutdown().await;
            }
            origin_w.write_all(&buf[..n]).await?;
            origin_w.flush().await?;
            sent.fetch_add(n as u64, Ordering::Relaxed);
            out_meter.moved(n);
            activity.touch();
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let want = in_meter.take(buf.len())?;
            let read = origin_r.read(&mut buf[..want]);
            let n = match mask.as_mut() {
                Some(m) if m.holding() => match tokio::time::timeout(MASK_HOLD, read).await {
                    Ok(n) => n?,
                    Err(_) => {
                        // The message paused on bytes that could begin the secret: they
                        // were not the secret (yet), pass them on.
                        let tail = m.finish();
                        agent_w.write_all(&tail).await?;
                        agent_w.flush().await?;
                        received.fetch_add(tail.len() as u64, Ordering::Relaxed);
                        in_meter.moved(tail.len());
                        continue;
                    }
                },
                _ => read.await?,
            };
            let out = match mask.as_mut() {
                Some(m) if n == 0 => m.finish(),
                Some(m) => m.feed(&buf[..n]),
                None => buf[..n].to_vec(),
            };
            agent_w.write_all(&out).await?;
            agent_w.flush().await?;
            received.fetch_add(out.len() as u64, Ordering::Relaxed);
            in_meter.moved(out.len());
            if n == 0 {
                return agent_w.shutdown().await;
            }
            activity.touch();
        }
    };
    facts.error = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.err().map(|e| format!("WebSocket relay: {e}")),
        () = cut.cancelled() => Some("WebSocket cut at shutdown".into()),
        () = super::idle(activity, idle_timeout) => Some("WebSocket idle timeout".into()),
    };
    facts.finish(tunnel);
}
