//! The server's lifecycle: binding the listeners, the state every connection shares,
//! reloading the policy on SIGHUP, and shutdown (stop accepting, drain for
//! `shutdown_grace_secs`, cut what is left, flush the audit log).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{admin, admission, resolve::Resolver};
use crate::addr::LocalAddrs;
use crate::audit::Audit;
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// State shared by every connection.
pub struct Shared {
    policy: RwLock<Arc<Policy>>,
    local_addrs: Arc<LocalAddrs>,
    resolver: RwLock<Arc<Resolver>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    pub(super) audit: Audit,
    pub(super) hostname: String,
    /// Open connections per client address (the per-client cap).
    pub(super) per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Open connections in all (the proxy-wide cap).
    pub(super) total: AtomicUsize,
    /// Refused connections answered and lingering.
    pub(super) refusing: AtomicUsize,
    /// Connections the open-files limit leaves room for (`max_connections` is lowered to it).
    pub(super) connection_cap: usize,
    /// Cut every tunnel now (shutdown grace over).
    pub(super) cut: CancellationToken,
}

impl Shared {
    /// The policy in force (a reload swaps it; a connection keeps the one it started with).
    pub(super) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The resolver in force.
    pub(super) fn resolver(&self) -> Arc<Resolver> {
        self.resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The proxy host's own addresses, never dialled.
    pub(super) fn local_addrs(&self) -> Arc<Vec<IpAddr>> {
        self.local_addrs.get()
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

/// Runs the proxy until SIGTERM/SIGINT, then drains. `config_path` is re-read on SIGHUP.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let connection_cap = admission::descriptor_cap();
    let resolver = Resolver::new(&config.policy)?;
    admission::check_cap(&config.policy.limits, connection_cap);
    for w in &config.warnings {
        warn!("{w}");
    }
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
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let (audit, audit_thread) = Audit::open(
        &config.audit_log,
        config.audit.clone(),
        hostname.clone(),
        metrics.clone(),
    )
    .with_context(|| format!("cannot open the audit log `{}`", config.audit_log.display()))?;
    let bound = Bound {
        listen: listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<_>>()?,
        admin: admin.as_ref().map(|l| l.local_addr()).transpose()?,
        pid: std::process::id(),
    };
    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(config.policy.clone())),
        resolver: RwLock::new(Arc::new(resolver)),
        local_addrs: LocalAddrs::follow(),
        metrics: metrics.clone(),
        audit,
        hostname,
        per_client: Mutex::new(HashMap::new()),
        total: AtomicUsize::new(0),
        refusing: AtomicUsize::new(0),
        connection_cap,
        cut: CancellationToken::new(),
    });

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for l in listeners {
        loops.push(tokio::spawn(admission::accept_loop(
            l,
            shared.clone(),
            tracker.clone(),
            stop.clone(),
        )));
    }
    if let Some(l) = admin {
        loops.push(tokio::spawn(admin::accept_loop(
            l,
            shared.clone(),
            stop.clone(),
        )));
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
            _ = hup.recv() => {
                reload(&config_path, &config, &shared);
                // For logrotate's `create` mode: continue in a new file if the log was moved.
                shared.audit.reopen().await;
            }
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
        Ok(new) if !shared.resolver().fits(&new.policy) => match Resolver::new(&new.policy) {
            Ok(resolver) => {
                *shared.resolver.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(resolver);
                apply(path, running, shared, new);
            }
            Err(e) => {
                shared.metrics.reloads_rejected.inc();
                error!("reload rejected, keeping the previous policy: {e:#}");
            }
        },
        Ok(new) => apply(path, running, shared, new),
        Err(e) => {
            shared.metrics.reloads_rejected.inc();
            error!(
                "reload rejected, keeping the previous policy: {:#}",
                anyhow::Error::from(e)
            );
        }
    }
}

/// Puts a reloaded configuration in force.
fn apply(path: &Path, running: &Config, shared: &Shared, new: Config) {
    for w in &new.warnings {
        warn!("{w}");
    }
    admission::check_cap(&new.policy.limits, shared.connection_cap);
    if new.listen != running.listen
        || new.admin_listen != running.admin_listen
        || new.audit_log != running.audit_log
        || new.audit != running.audit
    {
        warn!("`listen`, `admin_listen`, `audit_log` and `[audit]` changes take effect only on restart");
    }
    info!(
        allowed = new.policy.allowed.len(),
        denied = new.policy.denied.len(),
        "policy reloaded from {}",
        path.display()
    );
    *shared.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new.policy);
    shared.local_addrs.refresh();
    shared.metrics.reloads_ok.inc();
}
