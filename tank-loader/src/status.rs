//! `tank-loader status`: what the kernel is enforcing right now, read from the kernel itself.
//!
//! It reads the pins, asks the kernel which programs are attached to the cgroup, sums the
//! counters, probes whether the kernel loads BPF LSM programs and reads tank's nftables table;
//! it does not trust anything the running loader believes. `layers` lists each defence layer
//! and whether it is in force on this host (docs/security.md describes them).

use std::os::fd::AsFd;
use std::path::PathBuf;

use serde::Serialize;
use tank_ebpf_common::event::hook;
use tank_ebpf_common::ocsf::kernel::Hook;
use tank_ebpf_common::{chain, counters};

use crate::cgroup::AgentCgroup;
use crate::config::{Config, LsmMode, Mode};
use crate::{gate, nft, query};

/// What `status` says about the seccomp layer: the loader cannot see it from the host.
pub const SECCOMP_NOTE: &str =
    "applied by the container runtime (SeccompProfile=); see image/seccomp/tank-agent.json";

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// True when every cgroup hook is pinned and attached exactly once to the agent cgroup, the
    /// nftables table is present (when enabled) and the LSM program is in force (when required).
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
    /// Each defence layer and whether it is in force.
    pub layers: Layers,
}

/// The defence layers besides the gate's hooks (listed in `hooks`).
#[derive(Debug, Serialize)]
pub struct Layers {
    /// BPF LSM `socket_create`.
    pub lsm: LsmStatus,
    /// The nftables baseline.
    pub nft: NftStatus,
    /// The container's seccomp profile.
    pub seccomp: &'static str,
}

/// The BPF LSM layer.
#[derive(Debug, Serialize)]
pub struct LsmStatus {
    /// `lsm` in the config.
    pub config: LsmMode,
    /// Its link is pinned and holds a program.
    pub in_force: bool,
    /// The program behind the link.
    pub program_id: Option<u32>,
    /// Why it is not in force.
    pub reason: Option<String>,
}

/// The nftables layer.
#[derive(Debug, Serialize)]
pub struct NftStatus {
    /// `[nft] enabled`.
    pub enabled: bool,
    /// What the kernel holds; `None` when the table does not exist.
    pub table: Option<nft::TableState>,
    /// Why the table could not be read.
    pub error: Option<String>,
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
    /// The hook, by the stable name the audit records use (one of `event::hook`).
    pub hook: Hook,
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
    /// Bytes the log's writer can still use: free (to unprivileged writers too) on the log's
    /// file system, plus what it already holds allocated past the end of the log.
    pub free_bytes: Option<u64>,
    /// Why the log cannot take records, when the file system says so.
    pub problem: Option<String>,
}

/// Bytes free on the file system holding `path` (its directory when the file is gone), plus
/// the space the file holds allocated past its end (the writer's reserve and what it grew).
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent()?;
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let ahead = std::fs::metadata(path).map_or(0, |m| (m.blocks() * 512).saturating_sub(m.len()));
    Some(st.blocks_available() as u64 * st.fragment_size() as u64 + ahead)
}

/// The log's writer keeps `reserve` bytes allocated and allocates ahead in 64 KiB steps: with
/// less than that free it refuses records, stops draining, and the kernel refuses attempts.
fn log_problem(free: Option<u64>, reserve: u64) -> Option<String> {
    let free = free?;
    (free < reserve + 64 * 1024).then(|| format!(
        "its file system has {free} bytes free, less than the writer needs ({reserve}-byte reserve plus 64 KiB): the loader cannot write records, so it stops draining the ring buffer and the kernel refuses attempts (counted in unrecorded_denied) until space returns"
    ))
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
                .zip(hook.cgroup_attach_type())
                .and_then(|(fd, attach_type)| {
                    query::attached_programs(fd.as_fd(), attach_type).ok()
                })
                .unwrap_or_default();
            HookStatus {
                hook: Hook(hook.code),
                pinned: pin.exists(),
                program_id,
                attached: program_id.is_some_and(|id| attached_ids.contains(&id)),
                attachments: attached_ids.len(),
            }
        })
        .collect();
    let counters = gate::read_counters(&cfg.pin_dir).ok().map(|sums| {
        counters::NAMES
            .iter()
            .zip(sums)
            .map(|(name, n)| ((*name).to_owned(), n.into()))
            .collect()
    });
    let anchor = std::fs::read(chain::anchor_path(&cfg.audit_log))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let layers = Layers {
        lsm: lsm_status(cfg),
        nft: nft_status(cfg),
        seccomp: SECCOMP_NOTE,
    };
    let hooks_ok = hooks.iter().all(|h| h.attached && h.attachments == 1);
    let nft_ok = !cfg.nft.enabled || layers.nft.table.is_some();
    let lsm_ok = cfg.lsm != LsmMode::Required || layers.lsm.in_force;
    Status {
        enforcing: hooks_ok && nft_ok && lsm_ok,
        layers,
        mode: gate::read_mode(&cfg.pin_dir).ok(),
        cgroup: CgroupStatus {
            path: cfg.cgroup.clone(),
            dir: cgroup.as_ref().map(|c| c.dir.clone()),
            id: cgroup.as_ref().map(|c| c.id),
        },
        hooks,
        counters,
        pin_dir: cfg.pin_dir.clone(),
        audit_log: LogStatus {
            path: cfg.audit_log.clone(),
            loader_running: chain::is_held(&cfg.audit_log).unwrap_or(false),
            anchor,
            free_bytes: free_bytes(&cfg.audit_log),
            problem: log_problem(free_bytes(&cfg.audit_log), cfg.audit.reserve_bytes),
        },
    }
}

impl Status {
    /// Each layer and whether it is in force: the gate (every cgroup hook but sock_create
    /// attached), sock_create, the BPF LSM program and the nftables table.
    pub fn layers_in_force(&self) -> [(&'static str, bool); 4] {
        let gate = self
            .hooks
            .iter()
            .filter(|h| h.hook.0 != hook::SOCK_CREATE)
            .all(|h| h.attached);
        let sock_create = self
            .hooks
            .iter()
            .any(|h| h.hook.0 == hook::SOCK_CREATE && h.attached);
        [
            ("gate", gate),
            ("sock_create", sock_create),
            ("lsm", self.layers.lsm.in_force),
            ("nft", self.layers.nft.table.is_some()),
        ]
    }
}

fn lsm_status(cfg: &Config) -> LsmStatus {
    let program_id =
        aya::programs::links::PinnedLink::from_pin(gate::link_pin(&cfg.pin_dir, &gate::LSM_HOOK))
            .ok()
            .and_then(|l| aya::programs::links::FdLink::from(l).info().ok())
            .map(|i| i.program_id());
    let reason = match (program_id, cfg.lsm) {
        (Some(_), _) => None,
        (None, LsmMode::Off) => Some("lsm = \"off\" in the config".to_owned()),
        (None, _) => Some(
            match aya::sys::is_program_supported(aya::programs::ProgramType::Lsm(aya::programs::LsmAttachType::Mac)) {
                Ok(true) => "the kernel loads BPF LSM programs but tank's is not attached (is tank-loader started with this config?)".to_owned(),
                // Both mean the kernel would not load a trivial LSM program (here: EPERM).
                refused => format!(
                    "this kernel does not load BPF LSM programs ({}); families other than unix/inet/inet6/netlink are refused only by the container's seccomp profile",
                    refused.map_or_else(|e| format!("{:#}", anyhow::Error::from(e)), |_| "BPF_PROG_LOAD refused".to_owned())
                ),
            },
        ),
    };
    LsmStatus {
        config: cfg.lsm,
        in_force: program_id.is_some(),
        program_id,
        reason,
    }
}

fn nft_status(cfg: &Config) -> NftStatus {
    match nft::inspect(&cfg.nft.table) {
        Ok(table) => NftStatus {
            enabled: cfg.nft.enabled,
            table,
            error: None,
        },
        Err(e) => NftStatus {
            enabled: cfg.nft.enabled,
            table: None,
            error: Some(format!("{e:#}")),
        },
    }
}

/// Human rendering.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let yes = |b: bool| if b { "yes" } else { "NO" };
    out += &format!(
        "enforcing:   {}\n",
        if s.enforcing {
            "yes"
        } else {
            "NO (see hooks below)"
        }
    );
    out += &format!(
        "mode:        {}\n",
        s.mode
            .map_or("unknown (no pinned settings)".to_owned(), |m| format!(
                "{m:?}"
            )
            .to_lowercase())
    );
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
            "  {:<11} pinned {:<3}  attached {:<3}  program {:<6}  programs on cgroup {}\n",
            h.hook.as_str(),
            yes(h.pinned),
            yes(h.attached),
            h.program_id.map_or("-".to_owned(), |i| i.to_string()),
            h.attachments
        );
    }
    out += "layers:\n";
    let [(_, gate), (_, sock_create), ..] = s.layers_in_force();
    out += &format!(
        "  gate        {}\n",
        if gate {
            "in force (connect4/6, sendmsg4/6)"
        } else {
            "NOT in force (see hooks)"
        }
    );
    out += &format!(
        "  sock_create {}\n",
        if sock_create {
            "in force (raw, ping, non-TCP/UDP inet sockets refused)"
        } else {
            "NOT in force"
        }
    );
    let lsm = &s.layers.lsm;
    out += &match (&lsm.program_id, &lsm.reason) {
        (Some(id), _) => format!("  lsm         in force (socket_create, program {id})\n"),
        (None, reason) => format!(
            "  lsm         NOT in force (lsm = \"{}\"): {}\n",
            lsm.config.name(),
            reason.as_deref().unwrap_or("-")
        ),
    };
    let nft = &s.layers.nft;
    out += &match (&nft.table, &nft.error) {
        (Some(t), _) => format!(
            "  nft         in force (table inet {}, {} rules, {} packets refused)\n",
            t.table, t.rules, t.refused_packets
        ),
        (None, Some(e)) => format!("  nft         unknown: {e}\n"),
        (None, None) if nft.enabled => {
            "  nft         NOT in force: the table is missing\n".to_owned()
        }
        (None, None) => "  nft         off ([nft] enabled = false)\n".to_owned(),
    };
    out += &format!("  seccomp     {}\n", s.layers.seccomp);
    match &s.counters {
        Some(c) => {
            out += "counters:\n";
            for name in counters::NAMES {
                out += &format!(
                    "  {name:<19} {}\n",
                    c.get(name).unwrap_or(&serde_json::Value::Null)
                );
            }
        }
        None => out += "counters:    unavailable (no pinned counters)\n",
    }
    out += &format!(
        "audit log:   {} (loader {}, last durable seq {})\n",
        s.audit_log.path.display(),
        if s.audit_log.loader_running {
            "running"
        } else {
            "not running"
        },
        s.audit_log
            .anchor
            .as_ref()
            .map_or("-".to_owned(), |a| a.seq.to_string())
    );
    if let Some(p) = &s.audit_log.problem {
        out += &format!("             NOT WRITABLE: {p}\n");
    }
    out
}
