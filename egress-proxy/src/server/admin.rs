//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz` (503 while the
//! audit log cannot be written). Deliberately tiny: one request per connection, read with a
//! timeout and a size cap, then closed; at most [`MAX_ADMIN_CONNECTIONS`] at once, so
//! connections held open there cannot take the proxy's descriptors.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::http::response;
use crate::relay;

/// Admin connections served at once; more are closed as they arrive. A scraper needs one.
const MAX_ADMIN_CONNECTIONS: usize = 32;
/// Time an admin client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the admin endpoints until `stop`.
pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(READ_TIMEOUT, async {
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
