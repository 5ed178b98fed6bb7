//! Admission: the accept loop of each proxy listener, and what a connection is judged on
//! the moment it is accepted, before it may send a byte: its client network, then the
//! connection caps (`max_connections`, `max_connections_per_client`) it holds its place
//! under until its audit record is queued. A client outside `client_networks` is answered
//! and closed at once and never counts under the caps, so outsiders holding connections
//! open cannot crowd out the agent hosts.
//!
//! Descriptors: a tunnel holds two sockets, and a pipe for each direction that has bytes in
//! flight (six at most; an idle tunnel two), and a refused connection one while it
//! lingers, so `max_connections` is checked against `RLIMIT_NOFILE` at start and
//! lowered, with one line, to what it leaves room for; refused connections lingering at
//! once are capped at the same number, and past it answered and closed at once. A spare
//! descriptor is kept so that, should `accept` still meet `EMFILE`, a waiting connection is
//! taken, answered `503` and closed rather than left unanswered. The spare is freed only
//! when a connection is already waiting (`poll` says so): freed on speculation, another
//! task's next socket takes it and it is gone. Meanwhile accepting pauses 10 ms at a time,
//! growing to 1 s while no spare can be had, with one warning per episode.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{connection, Shared};
use crate::audit::Draft;
use crate::http::response;
use crate::policy::{Limits, Policy, Reason, Refusal};
use crate::relay;

/// Descriptors one connection may hold: client and origin sockets, a pipe each way while
/// both directions move bytes at once, plus one for a refused connection lingering in its
/// place.
const FDS_PER_CONNECTION: usize = 7;
/// Descriptors kept for everything else: listeners, the audit log, the runtime, the admin
/// listener's connections, the spare, and the relay's pool of empty pipes.
const FDS_RESERVED: usize = 96 + 2 * relay::POOLED_PIPES;
/// Longest pause between accepts while descriptors are exhausted.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Raises the soft open-files limit to the hard limit and returns how many connections it
/// leaves room for.
pub(super) fn descriptor_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return usize::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                debug!(from = old, to = lim.rlim_max, "raised the open-files limit");
            } else {
                lim.rlim_cur = old;
            }
        }
    }
    let nofile = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    (nofile.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION).max(1)
}

/// Says, in one line, when `max_connections` is lowered to the descriptor cap.
pub(super) fn check_cap(limits: &Limits, cap: usize) {
    if limits.max_connections > cap {
        warn!(
            "max_connections = {} needs {} open files, more than RLIMIT_NOFILE allows: lowered to {cap} (raise LimitNOFILE= to serve more)",
            limits.max_connections,
            limits.max_connections * FDS_PER_CONNECTION + FDS_RESERVED
        );
    }
}

/// A descriptor held in reserve for answering at `EMFILE`.
fn spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Accepts proxy clients until `stop`, one tracked task per connection.
pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut reserve = spare();
    let mut backoff: Option<Duration> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = None;
                let local = match stream.local_addr() {
                    Ok(l) => l,
                    Err(e) => {
                        debug!(%peer, "connection gone before it could be handled: {e}");
                        continue;
                    }
                };
                let policy = shared.policy();
                let verdict = match judge(&shared, peer.ip(), &policy) {
                    Ok(admission) => Verdict {
                        refusal: None,
                        place: Place::Admitted(admission),
                    },
                    Err(refusal) => match RefusalSlot::take(&shared) {
                        Some(slot) => Verdict {
                            refusal: Some(refusal),
                            place: Place::Refusing(slot),
                        },
                        None => {
                            let draft = answer_now(&shared, stream, peer, refusal);
                            record_later(&tracker, &shared, draft);
                            continue;
                        }
                    },
                };
                tracker.spawn(connection::handle(
                    shared.clone(),
                    policy,
                    stream,
                    peer,
                    local,
                    verdict,
                ));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                if backoff.is_none() {
                    warn!("accept failed: {e}; answering from the spare descriptor, backing off");
                }
                if reserve.is_none() {
                    reserve = spare();
                }
                // The spare is freed only for a connection already waiting: freed while
                // none is, the next descriptor any task opens takes it, and it is lost.
                if reserve.is_some() && waiting(&listener) {
                    drop(reserve.take());
                    if let Ok(Ok((stream, peer))) =
                        tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
                    {
                        let refusal = Refusal::new(
                            Reason::ConnectionLimit,
                            "the proxy is out of file descriptors (RLIMIT_NOFILE)",
                        );
                        // Answered and closed here, so the descriptor is back for the spare.
                        let draft = answer_now(&shared, stream, peer, refusal);
                        record_later(&tracker, &shared, draft);
                    }
                    reserve = spare();
                    backoff = Some(Duration::from_millis(10));
                    continue;
                }
                // Nothing to answer, or no spare to answer with: wait for a descriptor to be
                // freed. With a spare, a new connection waits at most a short tick; without
                // one, nothing can be answered anyway, so the pause grows.
                let pause = match (backoff, reserve.is_some()) {
                    (None, _) | (_, true) => Duration::from_millis(10),
                    (Some(p), false) => {
                        debug!("accept failed: {e}; no spare descriptor");
                        (p * 2).min(MAX_BACKOFF)
                    }
                };
                backoff = Some(pause);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                // Anything else: back off instead of spinning; the loop survives.
                let pause = match backoff {
                    None => {
                        warn!("accept failed: {e}; backing off");
                        Duration::from_millis(10)
                    }
                    Some(p) => {
                        debug!("accept failed: {e}");
                        (p * 2).min(MAX_BACKOFF)
                    }
                };
                backoff = Some(pause);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// True when a connection waits in the listener's queue (`poll`, no descriptor needed).
fn waiting(listener: &TcpListener) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut fd, 1, 0) == 1 && fd.revents & libc::POLLIN != 0 }
}

/// Answers a refused connection at once, without a task or a linger, closes it, and
/// returns its record: for refusals past [`MAX_REFUSING`] and on the spare descriptor.
fn answer_now(shared: &Shared, stream: TcpStream, peer: SocketAddr, refusal: Refusal) -> Draft {
    let local = stream.local_addr().unwrap_or(peer);
    shared.metrics.refused(refusal.reason);
    let (status, text) = refusal.reason.status();
    let body = format!("egress-proxy: refused: {}\n", refusal.detail);
    let bytes = response(status, text, &[("X-Tank-Refused-By", refusal.by())], &body);
    let _ = stream.try_write(&bytes);
    drop(stream);
    let mut draft = Draft::new(peer, local);
    draft.rule = refusal.by().to_owned();
    draft.error = Some(refusal.detail);
    draft
}

/// Queues the record of a connection answered by [`answer_now`].
fn record_later(tracker: &TaskTracker, shared: &Arc<Shared>, draft: Draft) {
    let shared = shared.clone();
    tracker.spawn(async move {
        shared.audit.finish(&draft, &shared.hostname).await;
    });
}

/// What accept decided about a connection: served, or answered with a refusal. Either way
/// it holds a place until its record is queued.
pub(super) struct Verdict {
    /// `None`: served.
    pub refusal: Option<Refusal>,
    /// Dropped once the record is queued.
    pub place: Place,
}

/// The place a connection holds.
pub(super) enum Place {
    /// Under the connection caps.
    Admitted(#[allow(dead_code, reason = "held for its Drop")] Admission),
    /// Among the refused connections lingering.
    Refusing(#[allow(dead_code, reason = "held for its Drop")] RefusalSlot),
}

/// Refused connections answered and lingering at once, at most (and never more than the
/// descriptor budget's connection cap): each holds a descriptor, and a client chooses how
/// many it opens. Past it, a refusal is answered and closed in the accept loop itself.
const MAX_REFUSING: usize = 256;

/// A refused connection's place among those lingering.
pub(super) struct RefusalSlot(Arc<Shared>);

impl RefusalSlot {
    fn take(shared: &Arc<Shared>) -> Option<RefusalSlot> {
        let cap = MAX_REFUSING.min(shared.connection_cap);
        if shared.refusing.fetch_add(1, Ordering::Relaxed) < cap {
            Some(RefusalSlot(shared.clone()))
        } else {
            shared.refusing.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::Relaxed);
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

/// Judges a connection at accept: its client network, then the caps. An admitted
/// connection is counted until its [`Admission`] drops; a refused one is not counted.
fn judge(shared: &Arc<Shared>, client: IpAddr, policy: &Policy) -> Result<Admission, Refusal> {
    if !policy.client_allowed(client) {
        return Err(Refusal::new(
            Reason::ClientNetwork,
            format!("{client} is not in client_networks"),
        ));
    }
    admit(shared, client, &policy.limits)
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
    let max = limits.max_connections.min(shared.connection_cap);
    if total > max {
        return Err(Refusal::new(
            Reason::ConnectionLimit,
            format!("the proxy has {max} connections open (max_connections)"),
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
