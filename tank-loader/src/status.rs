//! `tank-loader status`: what the kernel is enforcing right now, read from the kernel itself.
//!
//! It reads the pins, asks the kernel which programs are attached to the cgroup and sums the
//! counters; it does not trust anything the running loader believes.

use std::os::fd::AsFd;
use std::path::PathBuf;

use serde::Serialize;
use tank_ebpf_common::{chain, counters};

use crate::cgroup::AgentCgroup;
use crate::config::{Config, Mode};
use crate::{gate, query};

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// True when every hook is pinned and attached exactly once to the agent cgroup.
    pub enforcing: bool,
    /// Mode read from the pinned settings map.
    pub mode: Option<Mode>,
    /// The agent cgroup.
    pub cgroup: CgroupStatus,
    /// One entry per hook.
    pub hooks: Vec<HookStatus>,
    /// Counters summed over CPUs, by name.
    pub counters: Option<serde_json::Map<String, serde_json::Value>>,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// The audit log.
    pub audit_log: LogStatus,
}

/// The agent cgroup as found on this host.
#[derive(Debug, Serialize)]
pub struct CgroupStatus {
    /// Path inside the hierarchy.
    pub path: PathBuf,
    /// Directory, when it exists.
    pub dir: Option<PathBuf>,
    /// cgroup id, when it exists.
    pub id: Option<u64>,
}

/// One hook.
#[derive(Debug, Serialize)]
pub struct HookStatus {
    /// connect4, connect6, sendmsg4, sendmsg6.
    pub hook: &'static str,
    /// A link pin exists.
    pub pinned: bool,
    /// Program behind the pinned link.
    pub program_id: Option<u32>,
    /// That program is attached to the agent cgroup.
    pub attached: bool,
    /// Programs attached directly to the cgroup at this hook (1 when healthy).
    pub attachments: usize,
}

/// The audit log.
#[derive(Debug, Serialize)]
pub struct LogStatus {
    /// Its path.
    pub path: PathBuf,
    /// A writer (the loader) holds it.
    pub loader_running: bool,
    /// The last durable record (`seq`, hash), from its anchor.
    pub anchor: Option<chain::Head>,
}

/// Collects the status for `cfg`.
pub fn collect(cfg: &Config) -> Status {
    let cgroup = AgentCgroup::open(&cfg.cgroup).ok();
    let cgroup_fd = cgroup.as_ref().and_then(|c| c.fd().ok());
    let hooks: Vec<HookStatus> = gate::HOOKS
        .iter()
        .map(|hook| {
            let pin = gate::link_pin(&cfg.pin_dir, hook);
            let program_id = aya::programs::links::PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|l| aya::programs::links::FdLink::from(l).info().ok())
                .map(|i| i.program_id());
            let attached_ids = cgroup_fd
                .as_ref()
                .and_then(|fd| query::attached_programs(fd.as_fd(), hook.attach_type).ok())
                .unwrap_or_default();
            HookStatus {
                hook: hook.name,
                pinned: pin.exists(),
                program_id,
                attached: program_id.is_some_and(|id| attached_ids.contains(&id)),
                attachments: attached_ids.len(),
            }
        })
        .collect();
    let counters = gate::read_counters(&cfg.pin_dir).ok().map(|sums| {
        counters::NAMES.iter().zip(sums).map(|(name, n)| ((*name).to_owned(), n.into())).collect()
    });
    let anchor = std::fs::read(chain::anchor_path(&cfg.audit_log)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    Status {
        enforcing: hooks.iter().all(|h| h.attached && h.attachments == 1),
        mode: gate::read_mode(&cfg.pin_dir).ok(),
        cgroup: CgroupStatus { path: cfg.cgroup.clone(), dir: cgroup.as_ref().map(|c| c.dir.clone()), id: cgroup.as_ref().map(|c| c.id) },
        hooks,
        counters,
        pin_dir: cfg.pin_dir.clone(),
        audit_log: LogStatus {
            path: cfg.audit_log.clone(),
            loader_running: chain::is_held(&cfg.audit_log).unwrap_or(false),
            anchor,
        },
    }
}

/// Human rendering.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let yes = |b: bool| if b { "yes" } else { "NO" };
    out += &format!("enforcing:   {}\n", if s.enforcing { "yes" } else { "NO (see hooks below)" });
    out += &format!("mode:        {}\n", s.mode.map_or("unknown (no pinned settings)".to_owned(), |m| format!("{m:?}").to_lowercase()));
    out += &format!(
        "cgroup:      {} ({})\n",
        s.cgroup.path.display(),
        match (&s.cgroup.dir, s.cgroup.id) {
            (Some(dir), Some(id)) => format!("{}, id {id}", dir.display()),
            _ => "does not exist".to_owned(),
        }
    );
    out += &format!("pins:        {}\n", s.pin_dir.display());
    out += "hooks:\n";
    for h in &s.hooks {
        out += &format!(
            "  {:<9} pinned {:<3}  attached {:<3}  program {:<6}  programs on cgroup {}\n",
            h.hook, yes(h.pinned), yes(h.attached), h.program_id.map_or("-".to_owned(), |i| i.to_string()), h.attachments
        );
    }
    match &s.counters {
        Some(c) => {
            out += "counters:\n";
            for name in counters::NAMES {
                out += &format!("  {name:<19} {}\n", c.get(name).unwrap_or(&serde_json::Value::Null));
            }
        }
        None => out += "counters:    unavailable (no pinned counters)\n",
    }
    out += &format!(
        "audit log:   {} (loader {}, last durable seq {})\n",
        s.audit_log.path.display(),
        if s.audit_log.loader_running { "running" } else { "not running" },
        s.audit_log.anchor.as_ref().map_or("-".to_owned(), |a| a.seq.to_string())
    );
    out
}
