//! `tank-loader run`: put enforcement in place, then drain events into the audit log.
//!
//! Order matters for fail-closed: the audit log is opened (and locked) before anything is
//! attached, so a loader that cannot record never starts enforcing-with-gaps; the programs are
//! attached and pinned, and the nftables table installed, before systemd is told we are ready,
//! so the agent never starts unguarded. Everything privileged (BPF, nft) happens before the
//! loader drops every capability.

use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use aya::maps::{Map, MapData, PerCpuArray};
use tank_ebpf_common::chain::ChainWriter;
use tank_ebpf_common::ocsf::kernel::LifecycleRecord;
use tank_ebpf_common::ocsf::lifecycle;
use tank_ebpf_common::{counters, event};

use crate::cgroup::AgentCgroup;
use crate::config::Config;
use crate::drain::Drain;
use crate::gate::LsmState;
use crate::metrics::{self, DrainStats};
use crate::ring::Ring;
use crate::{gate, nft, privileges};

/// Runs the loader until SIGTERM or SIGINT. Enforcement stays pinned when it returns.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let started = std::time::SystemTime::now();
    let cfg = Config::load(config_path)?;
    let cgroup = AgentCgroup::open_or_create(&cfg.cgroup)?;

    if let Some(dir) = cfg.audit_log.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .with_context(|| format!("cannot create audit log directory {}", dir.display()))?;
    }
    let (mut log, recovery) = ChainWriter::open_with(&cfg.audit_log, cfg.audit.clone())?;
    if let Some(r) = recovery {
        tracing::warn!(log = %cfg.audit_log.display(), partial_bytes = r.partial_bytes,
            "the audit log ended in a partial record (a crash mid-write, never synced); it was cut and its events are drained again from the ring");
    }

    // Maps a previous run pinned hold what it read; new ones hold nothing the log has.
    let reused = [event::MAP_NAME, counters::MAP_NAME]
        .iter()
        .all(|m| cfg.pin_dir.join(m).exists());
    let installed = gate::install(&cfg, &cgroup)?;
    let hostname = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    let hooks: Vec<_> = installed.hooks.iter()
        .map(|(h, outcome, id)| serde_json::json!({"hook": h.name(), "outcome": outcome, "program_id": id}))
        .collect();
    for (hook, outcome, id) in &installed.hooks {
        tracing::info!(
            hook = hook.name(),
            ?outcome,
            program_id = id,
            "hook in place"
        );
    }
    match &installed.lsm {
        LsmState::InForce => {}
        // Loud on every start: without it, only the container's seccomp profile keeps the agent
        // from AF_VSOCK, AF_PACKET and the other families.
        LsmState::Unavailable(reason) => tracing::warn!(%reason,
            "BPF LSM layer NOT in force: this kernel does not load tank's socket_create program; socket families other than unix/inet/inet6/netlink are refused only by the agent container's seccomp profile (image/seccomp/tank-agent.json). Set lsm = \"required\" to refuse to start without it"),
        LsmState::Off => tracing::warn!("BPF LSM layer off (lsm = \"off\"): socket families other than unix/inet/inet6/netlink are refused only by the agent container's seccomp profile"),
    }
    let nft_state = if cfg.nft.enabled {
        let state = nft::install(&cfg.nft, &cgroup, &cfg.endpoints)?;
        tracing::info!(table = %state.table, rules = state.rules, "nftables baseline in place");
        Some(state)
    } else {
        if nft::remove(&cfg.nft.table)? {
            tracing::warn!(table = %cfg.nft.table, "nftables baseline disabled in the config: removed its table");
        }
        tracing::warn!("nftables baseline off ([nft] enabled = false): the BPF gate is the only egress control");
        None
    };
    let endpoints: Vec<_> = cfg.endpoints.iter()
        .map(|e| serde_json::json!({"endpoint": e.addr.to_string(), "protocol": e.protocol, "proxy": e.is_proxy}))
        .collect();
    let mut ebpf = installed.ebpf;
    let take = |ebpf: &mut aya::Ebpf, name| {
        ebpf.take_map(name)
            .with_context(|| format!("map {name} missing from the object"))
    };
    let ring = match take(&mut ebpf, event::MAP_NAME)? {
        Map::RingBuf(data) => Ring::new(data)?,
        _ => anyhow::bail!("map {} is not a ring buffer", event::MAP_NAME),
    };
    let counters = match take(&mut ebpf, counters::MAP_NAME)? {
        Map::PerCpuArray(data) => data,
        _ => anyhow::bail!("map {} is not a per-CPU array", counters::MAP_NAME),
    };
    // Programs stay loaded through their pinned links; the loader needs only these two maps.
    drop(ebpf);
    let stats = Arc::new(DrainStats::new(log.head().seq));
    let metrics = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            // The metrics thread reads the counters and ring positions through handles of its
            // own; the drain keeps the originals.
            let sources = metrics::Sources {
                drain: stats.clone(),
                counters: PerCpuArray::try_from(Map::PerCpuArray(MapData::from_fd(
                    counters.fd().as_fd().try_clone_to_owned()?,
                )?))?,
                ring: metrics::RingPositions::map(
                    &ring.as_fd().try_clone_to_owned()?,
                    ring.size(),
                )?,
                started,
            };
            // Metrics are for watching, not for enforcing: an address in use must not keep the
            // loader (and so the agent, bound to it) down. The missing target shows in Prometheus.
            match metrics::prepare(addr, config_path) {
                Ok(prepared) => Some((prepared, sources)),
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "metrics NOT served; enforcement and the audit log are unaffected"
                    );
                    None
                }
            }
        }
    };
    let drain = Drain::new(
        ring,
        PerCpuArray::try_from(Map::PerCpuArray(counters))?,
        &log,
        &cfg.audit_log,
        &hostname,
        reused,
        stats,
    )?;

    log.append(&LifecycleRecord::new(
        &hostname,
        env!("CARGO_PKG_VERSION"),
        lifecycle::START,
        format!("enforcement in place on cgroup {}", cgroup.path.display()),
        serde_json::json!({
            "cgroup": cgroup.path, "cgroup_id": cgroup.id, "mode": cfg.mode,
            "hooks": hooks, "endpoints": endpoints, "loader_pid": std::process::id(),
            "lsm": installed.lsm, "nft": nft_state, "ring_pos": drain.ring_pos(),
        }),
    ))?;
    let head = log.sync()?;
    // The anchor also goes to the system log, which is shipped off the host.
    tracing::info!(seq = head.seq, hash = %head.hash, "audit anchor");

    privileges::drop_all()?;
    // After the drop: threads started before it would keep the capabilities.
    let _metrics = match metrics {
        Some((prepared, sources)) => {
            let running = prepared.start(sources)?;
            tracing::info!(addr = %running.addr, "metrics at http://{}/metrics", running.addr);
            Some(running)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The handlers are in place before systemd hears we are ready: a SIGTERM right after
    // readiness must stop the drain cleanly, not kill the loader mid-batch.
    let shutdown = {
        let _runtime = runtime.enter();
        shutdown_signal()?
    };
    notify_ready();
    tracing::info!(cgroup = %cgroup.dir.display(), cgroup_id = cgroup.id, mode = ?cfg.mode,
        endpoints = cfg.endpoints.len(), log = %cfg.audit_log.display(), "enforcing; draining events into the audit log");
    let written = runtime.block_on(drain.run(&mut log, shutdown))?;
    tracing::info!(
        events = written,
        seq = log.head().seq,
        "stopping; enforcement stays pinned (`tank-loader detach` removes it)"
    );
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Tells systemd (Type=notify) that enforcement is in place. No-op outside systemd.
fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|s| {
        let bytes = socket.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            s.send_to_addr(b"READY=1\nSTATUS=enforcing", &addr)
        } else {
            s.send_to(b"READY=1\nSTATUS=enforcing", Path::new(&socket))
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
}
