//! The appliance's files in this repository (image/), as the image and boot tests read them.

use std::path::{Path, PathBuf};

/// The agent user's UID: sysusers.d, the loader's cgroup and `user@2000.service` all name it.
pub const AGENT_UID: u32 = 2000;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A repository file (path relative to the root), as text.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// A systemd-style INI file: (section, key, value, line) in file order.
pub fn parse_ini(text: &str) -> Vec<(String, String, String, usize)> {
    let mut out = Vec::new();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", i + 1));
        out.push((
            section.clone(),
            k.trim().to_owned(),
            v.trim().to_owned(),
            i + 1,
        ));
    }
    out
}

/// The values of `key` in `section`, in file order.
pub fn values<'a>(
    ini: &'a [(String, String, String, usize)],
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    ini.iter()
        .filter(|(s, k, _, _)| s == section && k == key)
        .map(|(_, _, v, _)| v.as_str())
        .collect()
}

/// The `content: |` block of the write_files entry for `path` in the cloud-init example.
pub fn cloud_init_file(path: &str) -> String {
    let text = read("image/cloud-init/user-data.yaml");
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != format!("- path: {path}"))
        .skip(1);
    lines
        .by_ref()
        .find(|l| l.trim() == "content: |")
        .unwrap_or_else(|| panic!("no content for {path}"));
    let block: Vec<&str> = lines
        .take_while(|l| l.starts_with("      ") || l.trim().is_empty())
        .collect();
    block
        .iter()
        .map(|l| format!("{}\n", l.get(6..).unwrap_or("")))
        .collect()
}
