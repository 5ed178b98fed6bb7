//! Dropping privileges once enforcement is in place.
//!
//! Everything that needs privilege happens before the drain starts: loading programs and
//! creating maps (CAP_BPF, CAP_SYS_ADMIN on older kernels), attaching to the cgroup and pinning
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN), mounting bpffs, creating the cgroup and opening the log. The
//! drain only reads an already mapped ring buffer and appends to an already open file, so the
//! loader keeps no capability at all afterwards; a compromised loader cannot detach the gate.
//!
//! One exception, only when metrics are on: the layer helper (`tank-loader watch-layers`, see
//! `metrics.rs`) keeps CAP_NET_ADMIN to read nftables and the cgroup's programs. It is a separate
//! process that reads no input, so the loader cannot borrow the capability, nor ptrace it (a
//! process without capabilities cannot trace one that has some).

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

/// For the layer helper (`tank-loader watch-layers`): keeps CAP_NET_ADMIN alone (reading
/// nftables and the cgroup's attached programs needs it), also across its exec of `nft`
/// (ambient set), drops everything else including the bounding set, sets no_new_privs and asks
/// for SIGKILL when the loader that started it dies.
pub fn keep_only_net_admin() -> anyhow::Result<()> {
    use caps::Capability::CAP_NET_ADMIN;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("cannot set the parent-death signal")?;
    for cap in caps::runtime::thread_all_supported() {
        if cap != CAP_NET_ADMIN {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
        }
    }
    let only: caps::CapsHashSet = [CAP_NET_ADMIN].into_iter().collect();
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &only)
            .with_context(|| format!("cannot set the {set:?} capability set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("cannot clear the ambient set")?;
    caps::raise(None, CapSet::Ambient, CAP_NET_ADMIN)
        .context("cannot raise CAP_NET_ADMIN in the ambient set")?;
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    Ok(())
}
