//! Admission: the accept loop of each proxy listener, and the connection caps
//! (`max_connections`, `max_connections_per_client`) a connection holds its place under
//! until its audit record is queued.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{connection, Shared};
use crate::policy::{Limits, Reason, Refusal};

/// Accepts proxy clients until `stop`, one tracked task per connection.
pub(super) async fn accept_loop(
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
                tracker.spawn(connection::handle(shared.clone(), stream, peer, local));
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
pub(super) struct Admission {
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

/// Counts the connection under the caps, or refuses it (and then does not count it).
pub(super) fn admit(
    shared: &Arc<Shared>,
    client: IpAddr,
    limits: &Limits,
) -> Result<Admission, Refusal> {
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
