//! Where the cross-check's logs come from: a [`Source`] is one log as a stream of its raw
//! lines in chain order, from files (a series of rotated segments) or from a log store, so
//! the same verification and matching serve both. Each source's chain is verified as its
//! lines go by (`chain::StreamVerifier`), so no source is ever held whole in memory.

use std::io;
use std::path::PathBuf;

use tank_ebpf_common::chain::{self, Head, Line};
use tank_ebpf_common::ocsf::LogName;

/// One log to cross-check: whose it is, which kind, and its lines.
pub struct Source {
    /// Where it was read from, as the report names it: the first path of a file series, or
    /// what a store was asked for (e.g. `clickhouse://host/db host=agent-1`). The host a
    /// kernel log belongs to is the one its records name (`device.hostname` of its start
    /// record), not this label.
    pub label: String,
    /// Kernel log (one agent host's) or proxy log (one proxy host's).
    pub kind: LogName,
    /// Its anchor (`<log>.head`), when the source has one: a log that ends before it, or
    /// whose anchored record changed, does not verify.
    pub anchor: Option<Head>,
    /// The first `seq` the source gives on purpose (a time range read from a store), so its
    /// chain is not missing its start; `None`: the whole log.
    pub starts_at: Option<u64>,
    /// Its lines in chain order. [`Line::File`] marks where each file of a series begins (a
    /// store gives none); an `Err` ends the cross-check as an input that cannot be read.
    pub lines: Box<dyn Iterator<Item = io::Result<Line>> + Send>,
}

impl Source {
    /// The log `paths` names (a log file with its rotated segments beside it, a directory of
    /// one log's segments, or several segment files; see `chain::series`), read as it goes.
    pub fn files(kind: LogName, paths: &[PathBuf]) -> io::Result<Self> {
        let series = chain::series(paths)?;
        // Open every file now, so a missing or unreadable one is an input error up front.
        for file in &series.files {
            std::fs::File::open(file)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        }
        Ok(Self {
            label: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            kind,
            anchor: chain::read_anchor(&series)?,
            starts_at: None,
            lines: Box::new(chain::lines(&series)),
        })
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("label", &self.label)
            .field("kind", &self.kind)
            .field("anchor", &self.anchor)
            .finish_non_exhaustive()
    }
}
