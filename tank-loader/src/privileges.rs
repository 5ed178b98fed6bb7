//! Dropping privileges once enforcement is in place.
//!
//! Everything that needs privilege happens before the drain starts: loading programs and
//! creating maps (CAP_BPF, CAP_SYS_ADMIN on older kernels), attaching to the cgroup and pinning
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN), mounting bpffs, creating the cgroup and opening the log. The
//! drain only reads an already mapped ring buffer and appends to an already open file, so the
//! loader keeps no capability at all afterwards; a compromised loader cannot detach the gate.

use anyhow::Context;
use caps::CapSet;

/// Clears every capability set, including the bounding set, and sets no_new_privs.
pub fn drop_all() -> anyhow::Result<()> {
    for cap in caps::runtime::thread_all_supported() {
        // Dropping from the bounding set needs CAP_SETPCAP, so it goes first.
        caps::drop(None, CapSet::Bounding, cap)
            .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set)
            .with_context(|| format!("cannot clear the {set:?} capability set"))?;
    }
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    Ok(())
}
