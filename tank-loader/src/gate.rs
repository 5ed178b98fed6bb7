//! The kernel gate: loading `tank-ebpf`, filling its maps, attaching it to the agent's cgroup
//! and pinning everything so enforcement outlives the loader.
//!
//! Restarts re-adopt: a pinned link whose program is byte-identical (same kernel tag) and still
//! attached to the configured cgroup is kept as it is. Otherwise the new program is attached
//! *next to* the old one before the old link is removed: while both run, an attempt needs both
//! to allow it, so there is no moment with the cgroup unguarded and, afterwards, exactly one
//! attachment per hook.

use std::collections::HashMap as StdHashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramInfo};
use aya::{Ebpf, EbpfLoader};
use tank_ebpf_common::{allow, counters, event, settings};

use crate::cgroup::AgentCgroup;
use crate::config::{Config, Mode};
use crate::{bpffs, query};

/// The compiled kernel programs, built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tank-ebpf.o"));

/// One hook of the gate.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// Name used for the link pin, in logs and in `status`.
    pub name: &'static str,
    /// Program name in the object.
    program: &'static str,
    /// Kernel `bpf_attach_type` (BPF_CGROUP_INET4_CONNECT = 10, INET6_CONNECT = 11,
    /// UDP4_SENDMSG = 14, UDP6_SENDMSG = 15).
    pub attach_type: u32,
}

/// Every hook tank attaches to the agent cgroup.
pub const HOOKS: [Hook; 4] = [
    Hook { name: "connect4", program: "tank_connect4", attach_type: 10 },
    Hook { name: "connect6", program: "tank_connect6", attach_type: 11 },
    Hook { name: "sendmsg4", program: "tank_sendmsg4", attach_type: 14 },
    Hook { name: "sendmsg6", program: "tank_sendmsg6", attach_type: 15 },
];

/// What `install` did for one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing was pinned: attached fresh.
    Attached,
    /// The pinned link runs the same program on the same cgroup: kept.
    Adopted,
    /// The pinned link ran another program or sat on another cgroup: replaced without a gap.
    Replaced,
}

/// The loaded gate: its maps, and what happened to each hook.
pub struct Installed {
    /// The loaded object; its maps are the pinned ones.
    pub ebpf: Ebpf,
    /// Per hook: what was done and the id of the program now attached.
    pub hooks: Vec<(Hook, Outcome, u32)>,
}

/// Path of the pin of `hook`'s link under `pin_dir`.
pub fn link_pin(pin_dir: &Path, hook: &Hook) -> PathBuf {
    pin_dir.join("links").join(hook.name)
}

/// Loads the gate, writes the policy into its maps and makes sure each hook is attached exactly
/// once to `cgroup`, pinned under `cfg.pin_dir`.
pub fn install(cfg: &Config, cgroup: &AgentCgroup) -> anyhow::Result<Installed> {
    bpffs::prepare(&cfg.pin_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&cfg.pin_dir)
        .map_max_entries(event::MAP_NAME, cfg.ring_buffer_bytes)
        .load(OBJECT)
        .context("cannot load tank's eBPF object into the kernel")?;
    warn_on_ring_size(&ebpf, cfg);
    apply_policy(&mut ebpf, cfg)?;

    let cgroup_fd = cgroup.fd()?;
    let mut hooks = Vec::with_capacity(HOOKS.len());
    for hook in HOOKS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(hook.program)
            .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?
            .try_into()?;
        program.load().with_context(|| format!("the kernel refused program {}", hook.program))?;
        let tag = program.info()?.tag();
        let pin = link_pin(&cfg.pin_dir, &hook);
        let attached = query::attached_programs(cgroup_fd.as_fd(), hook.attach_type)
            .with_context(|| format!("cannot query programs on {}", cgroup.dir.display()))?;

        let old = match PinnedLink::from_pin(&pin) {
            Ok(link) => Some(FdLink::from(link)),
            Err(_) if !pin.exists() => None,
            Err(e) => return Err(e).with_context(|| format!("cannot open pinned link {}", pin.display())),
        };
        if let Some(old) = &old {
            let old_program = old.info()?.program_id();
            if attached.contains(&old_program) && program_tag(old_program)? == Some(tag) {
                hooks.push((hook, Outcome::Adopted, old_program));
                continue;
            }
        }

        // bpf_link_create takes no attach flags for cgroups: link attachments always stack
        // like BPF_F_ALLOW_MULTI, which is what lets old and new run side by side.
        let link_id = program
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {} to {}", hook.program, cgroup.dir.display()))?;
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        // bpffs refuses names with a dot.
        let staged = pin.with_file_name(format!("{}_staged", hook.name));
        let _ = std::fs::remove_file(&staged);
        let link = link.pin(&staged).with_context(|| format!("cannot pin link at {}", staged.display()))?;
        let outcome = match old {
            Some(old) => {
                // The new program already guards the cgroup; closing our descriptor and
                // unpinning drop the last references to the old link, which detaches it.
                drop(old);
                std::fs::remove_file(&pin).with_context(|| format!("cannot remove old link pin {}", pin.display()))?;
                Outcome::Replaced
            }
            None => Outcome::Attached,
        };
        std::fs::rename(&staged, &pin).with_context(|| format!("cannot move link pin to {}", pin.display()))?;
        drop(link);
        hooks.push((hook, outcome, program.info()?.id()));
    }
    Ok(Installed { ebpf, hooks })
}

/// Writes mode and allowlist into the (pinned) maps. New entries go in before stale ones are
/// removed, so a restart with the same policy never denies an allowed endpoint in passing.
fn apply_policy(ebpf: &mut Ebpf, cfg: &Config) -> anyhow::Result<()> {
    let wanted: StdHashMap<allow::AllowKey, u8> = cfg.endpoints.iter().map(|e| e.allow_entry()).collect();
    let mut allow_map: HashMap<_, allow::AllowKey, u8> = HashMap::try_from(map_mut(ebpf, allow::MAP_NAME)?)?;
    for (key, kind) in &wanted {
        allow_map.insert(key, kind, 0).context("cannot fill the allow map")?;
    }
    let stale: Vec<_> = allow_map.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
    for key in stale {
        allow_map.remove(&key).context("cannot prune the allow map")?;
    }
    let mut settings_map: Array<_, u32> = Array::try_from(map_mut(ebpf, settings::MAP_NAME)?)?;
    settings_map.set(settings::MODE, mode_code(cfg.mode), 0).context("cannot set the mode")?;
    Ok(())
}

fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => settings::mode::ENFORCE,
        Mode::Audit => settings::mode::AUDIT,
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// A pinned ring buffer keeps the size it was created with; say so instead of pretending.
fn warn_on_ring_size(ebpf: &Ebpf, cfg: &Config) {
    let Some(Map::RingBuf(data)) = ebpf.map(event::MAP_NAME) else { return };
    if let Ok(info) = data.info() {
        if info.max_entries() != cfg.ring_buffer_bytes {
            tracing::warn!(
                pinned = info.max_entries(),
                configured = cfg.ring_buffer_bytes,
                "the pinned ring buffer keeps its size; the new size takes effect after `tank-loader detach` and a fresh start"
            );
        }
    }
}

fn program_tag(id: u32) -> anyhow::Result<Option<u64>> {
    for info in aya::programs::loaded_programs() {
        let info: ProgramInfo = info?;
        if info.id() == id {
            return Ok(Some(info.tag()));
        }
    }
    Ok(None)
}

/// Opens one of tank's pinned maps.
pub fn pinned_map(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("cannot open pinned map {} (is tank-loader set up?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// Sums the per-CPU counters, indexed as in [`counters`].
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<[u64; counters::COUNT as usize]> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(pinned_map(pin_dir, counters::MAP_NAME)?)?;
    let mut sums = [0u64; counters::COUNT as usize];
    for (slot, sum) in sums.iter_mut().enumerate() {
        *sum = map.get(&(slot as u32), 0)?.iter().sum();
    }
    Ok(sums)
}

/// Reads the mode from the pinned settings map.
pub fn read_mode(pin_dir: &Path) -> anyhow::Result<Mode> {
    let map: Array<_, u32> = Array::try_from(pinned_map(pin_dir, settings::MAP_NAME)?)?;
    Ok(if map.get(&settings::MODE, 0)? == settings::mode::AUDIT { Mode::Audit } else { Mode::Enforce })
}

/// Removes every link and map tank pinned under `pin_dir`: the one way enforcement ends.
/// Returns the pins removed.
pub fn detach(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = HOOKS.iter().map(|h| link_pin(pin_dir, h));
    let maps = [allow::MAP_NAME, settings::MAP_NAME, counters::MAP_NAME, event::MAP_NAME].map(|m| pin_dir.join(m));
    for pin in links.chain(maps) {
        match std::fs::remove_file(&pin) {
            Ok(()) => removed.push(pin),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove pin {}", pin.display())),
        }
    }
    for dir in [pin_dir.join("links"), pin_dir.to_owned()] {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}
