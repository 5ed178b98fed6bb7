//! The kernel programs: loading `tank-ebpf`, filling its maps, attaching each program (the
//! sock_addr gate, sock_create, sock_ops, setsockopt and skb egress on the agent's cgroup, BPF LSM `socket_create` where the
//! kernel allows it) and pinning everything so enforcement outlives the loader.
//!
//! Restarts re-adopt: a pinned link whose program is byte-identical (same kernel tag) and still
//! attached (to the configured cgroup, for cgroup hooks) is kept as it is. Otherwise the new
//! program is attached *next to* the old one before the old link is removed: while both run, an
//! attempt needs both to allow it, so there is no moment unguarded and, afterwards, exactly one
//! attachment per hook. One routine ([`place`]) does this for every kind of hook.

use std::collections::HashMap as StdHashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt,
    Lsm, ProgramInfo, SockOps,
};
use aya::{Btf, Ebpf, EbpfLoader};
use tank_ebpf_common::event::hook;
use tank_ebpf_common::{allow, counters, event, settings};

use crate::cgroup::AgentCgroup;
use crate::config::{Config, LsmMode, Mode};
use crate::{bpffs, query};

/// The compiled kernel programs, built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tank-ebpf.o"));

/// One hook tank attaches a program to.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// Its code in events (one of [`hook`]); its name (for the link pin, in logs and in
    /// `status`) comes from there.
    pub code: u8,
    /// Program name in the object.
    program: &'static str,
    /// Where the program goes.
    pub kind: HookKind,
}

/// Where a hook's program is attached.
#[derive(Clone, Copy, Debug)]
pub enum HookKind {
    /// A cgroup `sock_addr` program on the agent cgroup, at this kernel `bpf_attach_type`
    /// (BPF_CGROUP_INET4_CONNECT = 10, INET6_CONNECT = 11, UDP4_SENDMSG = 14, UDP6_SENDMSG = 15).
    SockAddr(u32),
    /// A cgroup `sock` program on the agent cgroup, at this `bpf_attach_type`
    /// (BPF_CGROUP_INET_SOCK_CREATE = 2).
    Sock(u32),
    /// The cgroup `sock_ops` program on the agent cgroup (BPF_CGROUP_SOCK_OPS = 3).
    SockOps,
    /// The cgroup `setsockopt` program on the agent cgroup (BPF_CGROUP_SETSOCKOPT = 22).
    Sockopt,
    /// A cgroup `skb` program on the agent cgroup, at this `bpf_attach_type`
    /// (BPF_CGROUP_INET_INGRESS = 0, BPF_CGROUP_INET_EGRESS = 1).
    Skb(u32),
    /// A BPF LSM program on this LSM hook; it is host-wide and scopes itself to the agent
    /// cgroup through the settings map.
    Lsm(&'static str),
}

impl Hook {
    /// The stable name: the one the audit records use.
    pub fn name(&self) -> &'static str {
        hook::name(self.code)
    }

    /// The `bpf_attach_type` on the agent cgroup, for cgroup hooks.
    pub fn cgroup_attach_type(&self) -> Option<u32> {
        match self.kind {
            HookKind::SockAddr(t) | HookKind::Sock(t) | HookKind::Skb(t) => Some(t),
            HookKind::SockOps => Some(3),
            HookKind::Sockopt => Some(22),
            HookKind::Lsm(_) => None,
        }
    }
}

/// Every hook tank attaches to the agent cgroup; each must be in place for `status` to call the
/// cgroup enforced.
pub const HOOKS: [Hook; 9] = [
    Hook {
        code: hook::CONNECT4,
        program: "tank_connect4",
        kind: HookKind::SockAddr(10),
    },
    Hook {
        code: hook::CONNECT6,
        program: "tank_connect6",
        kind: HookKind::SockAddr(11),
    },
    Hook {
        code: hook::SENDMSG4,
        program: "tank_sendmsg4",
        kind: HookKind::SockAddr(14),
    },
    Hook {
        code: hook::SENDMSG6,
        program: "tank_sendmsg6",
        kind: HookKind::SockAddr(15),
    },
    Hook {
        code: hook::SOCK_CREATE,
        program: "tank_sock_create",
        kind: HookKind::Sock(2),
    },
    Hook {
        code: hook::ESTABLISHED,
        program: "tank_sock_ops",
        kind: HookKind::SockOps,
    },
    Hook {
        code: hook::SETSOCKOPT,
        program: "tank_setsockopt",
        kind: HookKind::Sockopt,
    },
    Hook {
        code: hook::EGRESS,
        program: "tank_egress",
        kind: HookKind::Skb(1),
    },
    Hook {
        code: hook::INBOUND,
        program: "tank_inbound",
        kind: HookKind::Skb(0),
    },
];

/// The BPF LSM hook, used as `lsm` in the config says.
pub const LSM_HOOK: Hook = Hook {
    code: hook::LSM_SOCKET_CREATE,
    program: "tank_socket_create",
    kind: HookKind::Lsm("socket_create"),
};

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

/// The loaded programs: their maps, and what happened to each hook.
pub struct Installed {
    /// The loaded object; its maps are the pinned ones.
    pub ebpf: Ebpf,
    /// Per hook in place: what was done and the id of the program now attached.
    pub hooks: Vec<(Hook, Outcome, u32)>,
    /// Whether the BPF LSM layer is in force, and if not, why.
    pub lsm: LsmState,
}

/// The BPF LSM layer after `install`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum LsmState {
    /// Attached and pinned.
    InForce,
    /// `lsm = "off"` in the config.
    Off,
    /// `lsm = "auto"` and the kernel would not take it: the reason, from the kernel.
    Unavailable(String),
}

/// Path of the pin of `hook`'s link under `pin_dir`.
pub fn link_pin(pin_dir: &Path, hook: &Hook) -> PathBuf {
    pin_dir.join("links").join(hook.name())
}

/// Loads the gate, writes the policy into its maps and makes sure each hook is attached exactly
/// once to `cgroup`, pinned under `cfg.pin_dir`.
pub fn install(cfg: &Config, cgroup: &AgentCgroup) -> anyhow::Result<Installed> {
    bpffs::prepare(&cfg.pin_dir)?;
    refuse_stale_pins(&cfg.pin_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&cfg.pin_dir)
        .map_max_entries(event::MAP_NAME, cfg.ring_buffer_bytes)
        .load(OBJECT)
        .context("cannot load tank's eBPF object into the kernel")?;
    warn_on_ring_size(&ebpf, cfg);
    apply_policy(&mut ebpf, cfg, cgroup)?;

    let cgroup_fd = cgroup.fd()?;
    let mut hooks = Vec::with_capacity(HOOKS.len() + 1);
    for hook in HOOKS {
        hooks.push(place(&mut ebpf, hook, &cfg.pin_dir, cgroup, &cgroup_fd)?);
    }
    let lsm = match cfg.lsm {
        LsmMode::Off => {
            remove_pin(&link_pin(&cfg.pin_dir, &LSM_HOOK))?;
            LsmState::Off
        }
        LsmMode::Auto | LsmMode::Required => match place(
            &mut ebpf,
            LSM_HOOK,
            &cfg.pin_dir,
            cgroup,
            &cgroup_fd,
        ) {
            Ok(placed) => {
                hooks.push(placed);
                LsmState::InForce
            }
            Err(e) if cfg.lsm == LsmMode::Required => return Err(e.context(
                "lsm = \"required\" but the BPF LSM program cannot be put in place on this kernel",
            )),
            Err(e) => LsmState::Unavailable(format!("{e:#}")),
        },
    };
    Ok(Installed { ebpf, hooks, lsm })
}

/// Loads `hook`'s program and makes sure it is attached exactly once, adopting what a previous
/// run pinned when it is the same program, replacing it without a gap otherwise.
fn place(
    ebpf: &mut Ebpf,
    hook: Hook,
    pin_dir: &Path,
    cgroup: &AgentCgroup,
    cgroup_fd: &std::fs::File,
) -> anyhow::Result<(Hook, Outcome, u32)> {
    let loaded = load(ebpf, &hook)?;
    let pin = link_pin(pin_dir, &hook);
    let old = match PinnedLink::from_pin(&pin) {
        Ok(link) => Some(FdLink::from(link)),
        Err(_) if !pin.exists() => None,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open pinned link {}", pin.display()))
        }
    };
    if let Some(old) = &old {
        let old_program = old.info()?.program_id();
        let still_attached = match hook.cgroup_attach_type() {
            Some(attach_type) => query::attached_programs(cgroup_fd.as_fd(), attach_type)
                .with_context(|| format!("cannot query programs on {}", cgroup.dir.display()))?
                .contains(&old_program),
            // An LSM link is its own attachment: while it is pinned, the program runs.
            None => true,
        };
        if still_attached && program_tag(old_program)? == Some(loaded.tag()) {
            return Ok((hook, Outcome::Adopted, old_program));
        }
    }

    // bpffs refuses names with a dot.
    let staged = pin.with_file_name(format!("{}_staged", hook.name()));
    let _ = std::fs::remove_file(&staged);
    let link = attach(ebpf, &hook, cgroup_fd, &staged)
        .with_context(|| format!("cannot attach {} ({})", hook.program, hook.name()))?;
    let link = link
        .pin(&staged)
        .with_context(|| format!("cannot pin link at {}", staged.display()))?;
    let outcome = match old {
        Some(old) => {
            // The new program already guards; closing our descriptor and unpinning drop the
            // last references to the old link, which detaches it.
            drop(old);
            std::fs::remove_file(&pin)
                .with_context(|| format!("cannot remove old link pin {}", pin.display()))?;
            Outcome::Replaced
        }
        None => Outcome::Attached,
    };
    std::fs::rename(&staged, &pin)
        .with_context(|| format!("cannot move link pin to {}", pin.display()))?;
    drop(link);
    Ok((hook, outcome, loaded.id()))
}

/// Asks the kernel to load `hook`'s program (the verifier runs here).
fn load(ebpf: &mut Ebpf, hook: &Hook) -> anyhow::Result<ProgramInfo> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    let refused = || format!("the kernel refused program {}", hook.program);
    match hook.kind {
        HookKind::SockAddr(_) => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            p.load().with_context(refused)?;
            Ok(p.info()?)
        }
        HookKind::Sock(_) => {
            let p: &mut CgroupSock = program.try_into()?;
            p.load().with_context(refused)?;
            Ok(p.info()?)
        }
        HookKind::SockOps => {
            let p: &mut SockOps = program.try_into()?;
            p.load().with_context(refused)?;
            Ok(p.info()?)
        }
        HookKind::Sockopt => {
            let p: &mut CgroupSockopt = program.try_into()?;
            p.load().with_context(refused)?;
            Ok(p.info()?)
        }
        HookKind::Skb(_) => {
            let p: &mut CgroupSkb = program.try_into()?;
            p.load().with_context(refused)?;
            Ok(p.info()?)
        }
        HookKind::Lsm(lsm_hook) => {
            let btf = Btf::from_sys_fs()
                .context("BPF LSM needs the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
            let p: &mut Lsm = program.try_into()?;
            p.load(lsm_hook, &btf).with_context(refused)?;
            Ok(p.info()?)
        }
    }
}

/// Attaches a loaded program and hands back its link, not yet pinned (`scratch` is a free pin
/// path it may use on the way).
fn attach(
    ebpf: &mut Ebpf,
    hook: &Hook,
    cgroup_fd: &std::fs::File,
    scratch: &Path,
) -> anyhow::Result<FdLink> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    // bpf_link_create takes no attach flags for cgroups: link attachments always stack like
    // BPF_F_ALLOW_MULTI, which is what lets old and new run side by side.
    Ok(match hook.kind {
        HookKind::SockAddr(_) => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            let id = p.attach(cgroup_fd, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        HookKind::Sock(_) => {
            let p: &mut CgroupSock = program.try_into()?;
            let id = p.attach(cgroup_fd, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        HookKind::SockOps => {
            let p: &mut SockOps = program.try_into()?;
            let id = p.attach(cgroup_fd, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        HookKind::Sockopt => {
            // aya 0.14 has no FdLink for sockopt links: create the link ourselves, pin it and
            // take it back through the pin, then free the scratch path.
            let p: &mut CgroupSockopt = program.try_into()?;
            let attach_type = hook.cgroup_attach_type().expect("a cgroup hook");
            let link = query::cgroup_link_create(p.fd()?.as_fd(), cgroup_fd.as_fd(), attach_type)?;
            query::obj_pin(link.as_fd(), scratch)?;
            let pinned = PinnedLink::from_pin(scratch);
            std::fs::remove_file(scratch)?;
            FdLink::from(pinned?)
        }
        HookKind::Skb(attach_type) => {
            let p: &mut CgroupSkb = program.try_into()?;
            let kind = match attach_type {
                0 => CgroupSkbAttachType::Ingress,
                1 => CgroupSkbAttachType::Egress,
                t => return Err(anyhow!("no cgroup skb attach type {t}")),
            };
            let id = p.attach(cgroup_fd, kind, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        HookKind::Lsm(_) => {
            let p: &mut Lsm = program.try_into()?;
            let id = p.attach()?;
            p.take_link(id)?.into()
        }
    })
}

/// Writes mode, MPTCP choice, the agent cgroup's place (for the LSM program's scope) and the
/// allowlist into the (pinned) maps. New entries go in before stale ones are removed, so a
/// restart with the same policy never denies an allowed endpoint in passing.
fn apply_policy(ebpf: &mut Ebpf, cfg: &Config, cgroup: &AgentCgroup) -> anyhow::Result<()> {
    let wanted: StdHashMap<allow::AllowKey, u8> =
        cfg.endpoints.iter().map(|e| e.allow_entry()).collect();
    let mut allow_map: HashMap<_, allow::AllowKey, u8> =
        HashMap::try_from(map_mut(ebpf, allow::MAP_NAME)?)?;
    for (key, kind) in &wanted {
        allow_map
            .insert(key, kind, 0)
            .context("cannot fill the allow map")?;
    }
    let stale: Vec<_> = allow_map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for key in stale {
        allow_map
            .remove(&key)
            .context("cannot prune the allow map")?;
    }
    let mut settings_map: Array<_, u32> = Array::try_from(map_mut(ebpf, settings::MAP_NAME)?)?;
    let values = [
        (settings::MODE, mode_code(cfg.mode)),
        (settings::ALLOW_MPTCP, u32::from(cfg.allow_mptcp)),
        (settings::AGENT_LEVEL, cgroup.level()),
        (settings::AGENT_ID_LO, cgroup.id as u32),
        (settings::AGENT_ID_HI, (cgroup.id >> 32) as u32),
    ];
    for (slot, value) in values {
        settings_map.set(slot, value, 0).with_context(|| {
            format!("cannot write settings slot {slot} (a settings map pinned by an older tank has fewer slots: `tank-loader detach`, then start again)")
        })?;
    }
    Ok(())
}

fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => settings::mode::ENFORCE,
        Mode::Audit => settings::mode::AUDIT,
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Refuses to start on maps pinned with another layout than this loader's programs use.
///
/// aya reuses a map pinned under the same name whatever its shape, and the kernel lets the
/// programs load against it: a counter map pinned by an older tank with fewer slots would drop
/// the new slots' counts, a settings map would read its missing slots as 0. Replacing the maps
/// in place would orphan what the old ring buffer still holds and reset the counters, so the
/// loader stops here instead, before touching anything: the programs already attached keep
/// enforcing with the maps they have, and the error says how to upgrade. The ring buffer's size
/// alone may differ (it is configurable; [`warn_on_ring_size`] reports it).
fn refuse_stale_pins(pin_dir: &Path) -> anyhow::Result<()> {
    let object = aya_obj::Object::parse(OBJECT).context("cannot parse tank's eBPF object")?;
    for (name, wanted) in &object.maps {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("cannot inspect pinned map {}", path.display()))?;
        let shape = |key: u32, value: u32, entries: u32, flags: u32| {
            format!("key {key} B, value {value} B, {entries} entries, flags {flags:#x}")
        };
        let is_ring = name == event::MAP_NAME;
        let entries = |n: u32| if is_ring { 0 } else { n };
        let found = shape(
            pinned.key_size(),
            pinned.value_size(),
            entries(pinned.max_entries()),
            pinned.map_flags(),
        );
        let needed = shape(
            wanted.key_size(),
            wanted.value_size(),
            entries(wanted.max_entries()),
            wanted.map_flags(),
        );
        if found != needed {
            anyhow::bail!(
                "pinned map {} has another layout ({found}) than this tank-loader needs ({needed}): it was pinned by another tank version. Nothing was changed and the programs attached now keep enforcing with it; to upgrade, stop the agent, run `tank-loader detach`, then start tank-loader again",
                path.display()
            );
        }
    }
    Ok(())
}

/// A pinned ring buffer keeps the size it was created with; say so instead of pretending.
fn warn_on_ring_size(ebpf: &Ebpf, cfg: &Config) {
    let Some(Map::RingBuf(data)) = ebpf.map(event::MAP_NAME) else {
        return;
    };
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
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open pinned map {} (is tank-loader set up?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// Sums the per-CPU counters, indexed as in [`counters`].
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<[u64; counters::COUNT as usize]> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(pinned_map(pin_dir, counters::MAP_NAME)?)?;
    sum_counters(&map)
}

/// Sums the per-CPU counters of an open counter map, indexed as in [`counters`].
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> anyhow::Result<[u64; counters::COUNT as usize]> {
    let mut sums = [0u64; counters::COUNT as usize];
    for (slot, sum) in sums.iter_mut().enumerate() {
        *sum = map.get(&(slot as u32), 0)?.iter().sum();
    }
    Ok(sums)
}

/// Reads the mode from the pinned settings map.
pub fn read_mode(pin_dir: &Path) -> anyhow::Result<Mode> {
    let map: Array<_, u32> = Array::try_from(pinned_map(pin_dir, settings::MAP_NAME)?)?;
    Ok(if map.get(&settings::MODE, 0)? == settings::mode::AUDIT {
        Mode::Audit
    } else {
        Mode::Enforce
    })
}

/// Removes every link and map tank pinned under `pin_dir`: the one way enforcement ends.
/// Returns the pins removed.
pub fn detach(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = HOOKS
        .iter()
        .chain([&LSM_HOOK])
        .map(|h| link_pin(pin_dir, h));
    let maps = [
        allow::MAP_NAME,
        settings::MAP_NAME,
        counters::MAP_NAME,
        event::MAP_NAME,
    ]
    .map(|m| pin_dir.join(m));
    for pin in links.chain(maps) {
        if remove_pin(&pin)? {
            removed.push(pin);
        }
    }
    for dir in [pin_dir.join("links"), pin_dir.to_owned()] {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}

/// Removes one pin; false when there was none.
fn remove_pin(pin: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove pin {}", pin.display())),
    }
}
