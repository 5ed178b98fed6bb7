//! Segments of a rotated log: their names, how to find them, compression and retention.
//!
//! The active file keeps the log's name; a rotated segment is `<log>.<first seq, 20 digits>`,
//! and `<log>.<first seq>.zst` once compressed. Zero-padded, so a shell glob and a directory
//! listing sort them oldest first, and the name says where in the chain a segment begins.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The writer's `segment` field on the first record of a segment: where it continues from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentLink {
    /// File name of the segment before (as rotated, without `.zst`); `null` when the log was
    /// moved away by someone else (logrotate) and the writer reopened its path.
    pub previous: Option<String>,
    /// `seq` of the last record of the segment before.
    pub previous_last_seq: u64,
    /// Segments the writer deleted under its retention rule when this one began.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Every record up to this `seq` was deleted by retention (0: none ever was).
    #[serde(default)]
    pub removed_through_seq: u64,
}

/// The path of the segment of `log` that begins at `first_seq` (uncompressed).
pub(super) fn segment_path(log: &Path, first_seq: u64) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{first_seq:020}"));
    PathBuf::from(name)
}

/// What a file name says: `(log name, first seq, compressed)` for a segment.
fn parse_name(name: &str) -> Option<(&str, u64, bool)> {
    let (rest, compressed) = match name.strip_suffix(".zst") {
        Some(r) => (r, true),
        None => (name, false),
    };
    let (base, digits) = rest.rsplit_once('.')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty())
        .then(|| (base, digits.parse().ok()))
        .and_then(|(b, s)| Some((b, s?, compressed)))
}

/// One rotated segment on disk.
#[derive(Clone, Debug)]
pub(super) struct OnDisk {
    pub first_seq: u64,
    pub path: PathBuf,
}

/// The rotated segments of `log`, oldest first; where both a segment and its `.zst` exist (a
/// compression cut short), the uncompressed one.
pub(super) fn rotated(log: &Path) -> io::Result<Vec<OnDisk>> {
    let dir = match log.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let want = log.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut found: Vec<(u64, bool, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some((base, seq, compressed)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        if base == want {
            found.push((seq, compressed, entry.path()));
        }
    }
    // Uncompressed sorts first within a seq, and the first of each seq is kept.
    found.sort();
    found.dedup_by_key(|(seq, _, _)| *seq);
    Ok(found
        .into_iter()
        .map(|(first_seq, _, path)| OnDisk { first_seq, path })
        .collect())
}

/// The lines of a segment or log file, decompressing a `.zst`.
pub(super) fn reader(path: &Path) -> io::Result<Box<dyn BufRead + Send>> {
    let file = File::open(path)?;
    if path.extension().is_some_and(|e| e == "zst") {
        Ok(Box::new(BufReader::new(zstd::stream::read::Decoder::new(
            file,
        )?)))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// Compresses `segment` to `segment.zst` (written aside, synced, renamed), keeping its
/// modification time for retention by age, then removes the original. On failure (a full
/// disk) the partial output is removed and the segment stays uncompressed.
pub(super) fn compress(segment: &Path) -> io::Result<()> {
    let mut out_name = segment.as_os_str().to_owned();
    out_name.push(".zst");
    let out = PathBuf::from(out_name);
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let input = File::open(segment)?;
        let mtime = input.metadata()?.modified()?;
        let mut output = File::create(&tmp)?;
        zstd::stream::copy_encode(&input, &mut output, 3)?;
        output.flush()?;
        output.set_modified(mtime)?;
        output.sync_all()?;
        // Retention may have deleted the segment while it waited or was being compressed: a
        // copy must not bring it back.
        if !segment.exists() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        fs::rename(&tmp, &out)
    })();
    match result {
        Ok(()) => fs::remove_file(segment),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The segments retention removes: the oldest while more than `keep` remain, and those last
/// written before `older_than`. `segments` is oldest first; the newest is always kept.
pub(super) fn expired(
    segments: &[OnDisk],
    keep: Option<usize>,
    older_than: Option<SystemTime>,
) -> Vec<OnDisk> {
    let Some(newest) = segments.len().checked_sub(1) else {
        return Vec::new();
    };
    let by_count = keep.map_or(0, |k| segments.len().saturating_sub(k.max(1)));
    segments[..newest]
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            *i < by_count
                || older_than.is_some_and(|t| {
                    fs::metadata(&s.path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|m| m < t)
                })
        })
        .map(|(_, s)| s.clone())
        .collect()
}

/// The files of a log series to verify, oldest first, and the anchor of its active file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    /// Segments then the active file.
    pub files: Vec<PathBuf>,
    /// `<log>.head` of the active file, when the series ends in it and it exists.
    pub anchor: Option<PathBuf>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Finds the segments named by `paths`:
/// - a directory: every segment of the one log in it (`*.jsonl` and its rotated segments);
/// - one log file: its rotated segments beside it, then the file (so a rotated log verifies
///   whole by its usual name);
/// - one segment file, or several files: those files; sorted oldest first when every name
///   is one of a tank log's, otherwise in the order given (logrotate's own names).
pub fn series(paths: &[PathBuf]) -> io::Result<Series> {
    match paths {
        [] => Err(invalid("no audit log given".into())),
        [dir] if dir.is_dir() => of_directory(dir),
        [one] => {
            let name = one.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if parse_name(name).is_some() {
                return Ok(Series {
                    files: vec![one.clone()],
                    anchor: None,
                });
            }
            let mut files: Vec<PathBuf> = rotated(one)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.path)
                .collect();
            if one.exists() || files.is_empty() {
                files.push(one.clone());
            }
            let anchor = Some(super::anchor_path(one)).filter(|a| a.exists());
            Ok(Series { files, anchor })
        }
        many => {
            let keys: Option<Vec<(String, u64)>> = many
                .iter()
                .map(|p| {
                    let name = p.file_name()?.to_str()?;
                    Some(match parse_name(name) {
                        Some((base, seq, _)) => (base.to_owned(), seq),
                        None => (name.to_owned(), u64::MAX),
                    })
                })
                .collect();
            let mut files: Vec<(Option<(String, u64)>, PathBuf)> = match &keys {
                Some(k) if k.iter().all(|(b, _)| *b == k[0].0) => k
                    .iter()
                    .cloned()
                    .map(Some)
                    .zip(many.iter().cloned())
                    .collect(),
                _ => many.iter().cloned().map(|p| (None, p)).collect(),
            };
            files.sort_by_key(|(k, _)| k.as_ref().map(|(_, s)| *s));
            let last = files.last().map(|(_, p)| p.clone());
            let anchor = last
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    parse_name(name).is_none()
                })
                .map(|p| super::anchor_path(&p))
                .filter(|a| a.exists());
            Ok(Series {
                files: files.into_iter().map(|(_, p)| p).collect(),
                anchor,
            })
        }
    }
}

fn of_directory(dir: &Path) -> io::Result<Series> {
    let mut logs = std::collections::BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((base, _, _)) = parse_name(name) {
            logs.insert(base.to_owned());
        } else if name.ends_with(".jsonl") {
            logs.insert(name.to_owned());
        }
    }
    match logs.len() {
        1 => series(&[dir.join(logs.pop_first().expect("one log"))]),
        0 => Err(invalid(format!(
            "{} holds no audit log (*.jsonl or its segments)",
            dir.display()
        ))),
        _ => Err(invalid(format!(
            "{} holds several audit logs ({}); name one of them",
            dir.display(),
            logs.into_iter().collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_sort_oldest_first() {
        assert_eq!(
            parse_name("a.jsonl.00000000000000000017.zst"),
            Some(("a.jsonl", 17, true))
        );
        assert_eq!(
            parse_name("a.jsonl.00000000000000000001"),
            Some(("a.jsonl", 1, false))
        );
        for not in [
            "a.jsonl",
            "a.jsonl.1",
            "a.jsonl.head",
            ".00000000000000000001",
        ] {
            assert_eq!(parse_name(not), None, "{not}");
        }
        let p = segment_path(Path::new("/l/a.jsonl"), 17);
        assert_eq!(p, Path::new("/l/a.jsonl.00000000000000000017"));
    }
}
