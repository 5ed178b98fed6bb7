//! The BPF filesystem where tank pins its maps and links, so enforcement outlives the loader.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{bail, Context};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// Makes sure `pin_dir` exists on a bpffs, mounting one at /sys/fs/bpf when that is where it
/// belongs and nothing is mounted there yet.
pub fn prepare(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing)? {
        if !pin_dir.starts_with(DEFAULT_MOUNT) {
            bail!("pin_dir {} is not on a BPF filesystem; mount one there (mount -t bpf bpf DIR) or use a directory under {DEFAULT_MOUNT}", pin_dir.display());
        }
        nix::mount::mount(
            Some("bpf"),
            DEFAULT_MOUNT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .with_context(|| format!("cannot mount bpffs at {DEFAULT_MOUNT}"))?;
        tracing::info!(mount = DEFAULT_MOUNT, "mounted the BPF filesystem");
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir.join("links"))
        .with_context(|| format!("cannot create pin directory {}", pin_dir.display()))
}

fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let stat =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}
