//! Finding the agent's cgroup in the cgroup v2 hierarchy.
//!
//! The cgroup2 mount point differs between hosts (`/sys/fs/cgroup` on Fedora, a hybrid
//! `/sys/fs/cgroup/unified` elsewhere), so it is read from `/proc/self/mountinfo`, never assumed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    find_cgroup2(&text).context("no cgroup2 filesystem is mounted; tank needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // mount-id parent major:minor root mount-point options [optional...] - fstype source opts
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent's cgroup directory on this host.
#[derive(Clone, Debug)]
pub struct AgentCgroup {
    /// Absolute directory of the cgroup.
    pub dir: PathBuf,
    /// Its path inside the hierarchy, as configured.
    pub path: PathBuf,
    /// Its cgroup id (the kernfs inode number), as `bpf_get_current_cgroup_id()` reports it.
    pub id: u64,
}

impl AgentCgroup {
    /// Resolves `path` (inside the hierarchy) against the cgroup2 mount, creating it if absent,
    /// so enforcement can be in place before the agent is started into it.
    pub fn open_or_create(path: &Path) -> anyhow::Result<Self> {
        let dir = cgroup2_mount()?.join(path.strip_prefix("/").unwrap_or(path));
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the agent cgroup {}", dir.display()))?;
            tracing::info!(cgroup = %dir.display(), "created the agent cgroup");
        }
        Self::open(path)
    }

    /// Resolves an existing cgroup.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let dir = cgroup2_mount()?.join(path.strip_prefix("/").unwrap_or(path));
        let meta = std::fs::metadata(&dir)
            .with_context(|| format!("agent cgroup {} does not exist", dir.display()))?;
        if !meta.is_dir() || !dir.join("cgroup.procs").exists() {
            bail!("{} is not a cgroup v2 directory", dir.display());
        }
        Ok(Self {
            id: meta.ino(),
            dir,
            path: path.to_owned(),
        })
    }

    /// Depth in the cgroup2 hierarchy (`/tank/agent` is 2): the level at which nft's
    /// `socket cgroupv2` and the BPF LSM program find the agent among a task's ancestors.
    pub fn level(&self) -> u32 {
        self.path
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count() as u32
    }

    /// An open descriptor of the cgroup directory, for attaching programs.
    pub fn fd(&self) -> anyhow::Result<std::fs::File> {
        std::fs::File::open(&self.dir)
            .with_context(|| format!("cannot open cgroup {}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let line = "41 25 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(line), Some(PathBuf::from("/mnt/with space")));
    }
}
