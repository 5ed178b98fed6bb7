//! The tamper-evident audit log: JSON Lines where each record names the hash of the one before.
//!
//! Both tank's audit logs use this one format: the kernel log written by `tank-loader` and
//! the request log written by `egress-proxy`, so one verifier serves an auditor for both.
//!
//! # Format
//! One JSON object per line, each an OCSF event (`crate::ocsf`). The chain's two fields live
//! where OCSF has room for them:
//! - `metadata.sequence` (the record's `seq`): 1 for the first record, then +1 per record, no
//!   gaps;
//! - `unmapped.prev`: lowercase hex SHA-256 of the previous record's line (its exact bytes,
//!   without the newline); 64 zeros ([`Hash::GENESIS`]) for the first record.
//!
//! An edit to a record breaks the next record's `prev`; a deleted or reordered record breaks
//! `seq` and `prev`; a crash mid-write leaves a partial last line, which is reported and never
//! accepted. The last record has no successor to vouch for it, so the writer also keeps an
//! anchor beside the log (`<log>.head`: the `seq` and hash of the last record it made
//! durable), and [`verify`] reports a log that ends before its anchor, or whose anchored record
//! changed. An attacker who can rewrite both files can rewrite history; the writers therefore
//! also log each anchor to their system log (journald), which is shipped off the host.
//!
//! # Durability
//! [`ChainWriter::append`] formats a record into the writer's batch; the batch reaches the file
//! in large `write(2)`s on an `O_APPEND` descriptor (when it reaches [`FLUSH_BYTES`], and at
//! every sync), so a crash can only cut the last line. [`ChainWriter::sync`] writes and makes
//! durable (`fdatasync`) everything appended so far and then moves the anchor; callers decide
//! how often (see docs/audit-format.md for each log's policy). Nothing appended is durable, or
//! even in the file, before a sync.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// A SHA-256 of one record's line; written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// `prev` of the first record: all zeros.
    pub const GENESIS: Hash = Hash([0; 32]);

    /// The hash of `line` (its bytes without the newline).
    pub fn of(line: &[u8]) -> Self {
        Self(Sha256::digest(line).into())
    }

    /// Lowercase hex, without allocating.
    pub fn hex(&self) -> [u8; 64] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        out
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.hex()).expect("hex is ASCII"))
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = hex::FromHexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a record needs from the chain to be written: its `seq` and the `prev` it must name.
#[derive(Clone, Copy, Debug)]
pub struct Link<'a> {
    /// `metadata.sequence` of the record.
    pub seq: u64,
    /// `unmapped.prev` of the record.
    pub prev: &'a Hash,
}

/// Failure to open or append to a chained log.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The log or its anchor could not be opened, read or written.
    #[error("audit log `{path}`: {action}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The existing log's last record cannot be continued from.
    #[error("audit log `{path}` cannot be continued: {problem}")]
    Unreadable {
        /// The log.
        path: PathBuf,
        /// What is wrong with its tail.
        problem: String,
    },
    /// Another writer holds the log: two writers would fork the chain.
    #[error("audit log `{path}` is held by another writer (is tank-loader or egress-proxy already running?)")]
    Locked {
        /// The log.
        path: PathBuf,
    },
    /// The record to append did not serialize to a JSON object free of the chain's fields.
    #[error("audit record is not a JSON object free of the chain's fields `metadata.sequence` and `unmapped.prev`")]
    BadRecord,
}

/// The position of a record in a chain: its `seq` and the hex SHA-256 of its line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    /// Sequence number (0 for an empty log).
    pub seq: u64,
    /// Hash of the record's line ([`Hash::GENESIS`] for an empty log).
    pub hash: Hash,
}

/// What [`ChainWriter::open`] found and repaired at the end of an existing log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of the partial last line a crash left; it stays in the log, terminated by a
    /// newline, and [`verify`] keeps reporting it.
    pub partial_bytes: usize,
}

/// A batch is written to the file once it holds this many bytes.
pub const FLUSH_BYTES: usize = 1 << 20;

/// Appends records to a chained log.
#[derive(Debug)]
pub struct ChainWriter {
    path: PathBuf,
    file: File,
    /// The last record appended.
    head: Head,
    /// The last record in the file: what `head` returns to if writing the batch fails.
    written: Head,
    /// Records appended since the last write, newline-terminated.
    batch: Vec<u8>,
    /// The last complete record the log held when it was opened.
    tail: Option<serde_json::Value>,
}

impl ChainWriter {
    /// Opens `path` for appending, creating it (mode 0640) if absent, and continues its chain.
    /// The writer holds an exclusive `flock` on the log for its lifetime.
    ///
    /// A partial last line (a crash mid-write) is terminated and reported in the returned
    /// [`Recovery`]; the chain continues from the last complete record.
    pub fn open(path: &Path) -> Result<(Self, Option<Recovery>), ChainError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |action| {
            move |source| ChainError::Io {
                path: path.to_owned(),
                action,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o640)
            .open(path)
            .map_err(io_err("open for appending"))?;
        lock(&file).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => ChainError::Locked {
                path: path.to_owned(),
            },
            _ => ChainError::Io {
                path: path.to_owned(),
                action: "lock",
                source: e,
            },
        })?;
        let (head, tail, partial_bytes) = read_tail(&mut file).map_err(|e| match e {
            TailError::Io(source) => ChainError::Io {
                path: path.to_owned(),
                action: "read its tail",
                source,
            },
            TailError::Bad(problem) => ChainError::Unreadable {
                path: path.to_owned(),
                problem,
            },
        })?;
        let recovery = if partial_bytes > 0 {
            file.write_all(b"\n")
                .map_err(io_err("terminate a partial last line"))?;
            Some(Recovery { partial_bytes })
        } else {
            None
        };
        Ok((
            Self {
                path: path.to_owned(),
                file,
                written: head.clone(),
                head,
                batch: Vec::with_capacity(FLUSH_BYTES + 64 * 1024),
                tail,
            },
            recovery,
        ))
    }

    /// Appends one record; `record` must serialize to a JSON object without the chain's
    /// fields, which are added here. Returns its `seq`.
    ///
    /// The record is in the file and durable only after [`Self::sync`].
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<u64, ChainError> {
        let serde_json::Value::Object(mut fields) =
            serde_json::to_value(record).map_err(|_| ChainError::BadRecord)?
        else {
            return Err(ChainError::BadRecord);
        };
        let seq = self.head.seq + 1;
        let prev = self.head.hash.to_string();
        for ((object, key), value) in [(SEQ, seq.into()), (PREV, prev.into())] {
            let slot = fields
                .entry(object)
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            match slot {
                serde_json::Value::Object(o) if !o.contains_key(key) => {
                    o.insert(key.to_owned(), value);
                }
                _ => return Err(ChainError::BadRecord),
            }
        }
        let body = serde_json::to_vec(&fields).map_err(|_| ChainError::BadRecord)?;
        self.append_with(|_, line| line.extend_from_slice(&body))
    }

    /// Appends one record that `write` formats straight into the line buffer, given the
    /// record's [`Link`] (its `seq` and `prev`, which it must write where [`append`] puts
    /// them): the path of writers that cannot afford an intermediate value. Returns its `seq`.
    ///
    /// [`append`]: Self::append
    pub fn append_with(
        &mut self,
        write: impl FnOnce(Link<'_>, &mut Vec<u8>),
    ) -> Result<u64, ChainError> {
        let seq = self.head.seq + 1;
        let start = self.batch.len();
        write(
            Link {
                seq,
                prev: &self.head.hash,
            },
            &mut self.batch,
        );
        let hash = Hash::of(&self.batch[start..]);
        self.batch.push(b'\n');
        self.head = Head { seq, hash };
        if self.batch.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Writes the batch to the file. On failure the records of the batch are dropped and the
    /// chain continues from the last record written.
    fn flush(&mut self) -> Result<(), ChainError> {
        let written = self.file.write_all(&self.batch);
        self.batch.clear();
        match written {
            Ok(()) => {
                self.written = self.head.clone();
                Ok(())
            }
            Err(source) => {
                self.head = self.written.clone();
                Err(ChainError::Io {
                    path: self.path.clone(),
                    action: "append records",
                    source,
                })
            }
        }
    }

    /// Writes every appended record, makes it durable, then moves the anchor to the last one.
    pub fn sync(&mut self) -> Result<&Head, ChainError> {
        self.flush()?;
        self.file.sync_data().map_err(|source| ChainError::Io {
            path: self.path.clone(),
            action: "fdatasync",
            source,
        })?;
        let anchor = anchor_path(&self.path);
        let tmp = anchor.with_extension("head.tmp");
        let body = serde_json::to_vec(&self.head).expect("Head serializes");
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &anchor))
            .map_err(|source| ChainError::Io {
                path: anchor.clone(),
                action: "write the anchor",
                source,
            })?;
        Ok(&self.head)
    }

    /// The last record appended.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The last complete record the log held when it was opened (`None` for an empty log):
    /// where a writer that continues a log finds what its predecessor last wrote.
    pub fn tail(&self) -> Option<&serde_json::Value> {
        self.tail.as_ref()
    }
}

impl Drop for ChainWriter {
    /// Writes what was appended since the last sync to the file (not durable), so dropping a
    /// writer does not throw records away.
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            let _ = self.file.write_all(&self.batch);
        }
    }
}

fn lock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a record holds its `seq`: `metadata.sequence`.
const SEQ: (&str, &str) = ("metadata", "sequence");
/// Where a record holds its `prev`: `unmapped.prev`.
const PREV: (&str, &str) = ("unmapped", "prev");

/// The `seq` and `prev` of a parsed record, if it has both.
fn link_of(record: &serde_json::Value) -> Option<(u64, &str)> {
    let seq = record.get(SEQ.0)?.get(SEQ.1)?.as_u64()?;
    let prev = record.get(PREV.0)?.get(PREV.1)?.as_str()?;
    Some((seq, prev))
}

/// True when a writer currently holds the log at `path`.
pub fn is_held(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    match lock(&file) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

/// Where the anchor of the log at `log` lives: `<log>.head`.
pub fn anchor_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

enum TailError {
    Io(io::Error),
    Bad(String),
}

/// Finds the last complete record (its head) and the length of a partial line after it.
fn read_tail(file: &mut File) -> Result<(Head, Option<serde_json::Value>, usize), TailError> {
    let len = file.seek(SeekFrom::End(0)).map_err(TailError::Io)?;
    if len == 0 {
        return Ok((
            Head {
                seq: 0,
                hash: Hash::GENESIS,
            },
            None,
            0,
        ));
    }
    // Read backwards in growing windows until the window holds a whole last record.
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(TailError::Io)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.take(len - start)
            .read_to_end(&mut buf)
            .map_err(TailError::Io)?;
        let partial = buf.iter().rev().take_while(|&&b| b != b'\n').count();
        let complete = &buf[..buf.len() - partial];
        if complete.is_empty() && start == 0 {
            // Only a partial line: a crash during the very first record.
            return Ok((
                Head {
                    seq: 0,
                    hash: Hash::GENESIS,
                },
                None,
                partial,
            ));
        }
        let body = &complete[..complete.len().saturating_sub(1)];
        match body.iter().rposition(|&b| b == b'\n') {
            Some(nl) => return head_of(&body[nl + 1..]).map(|(h, v)| (h, Some(v), partial)),
            None if start == 0 => return head_of(body).map(|(h, v)| (h, Some(v), partial)),
            None => window *= 4,
        }
    }
}

fn head_of(line: &[u8]) -> Result<(Head, serde_json::Value), TailError> {
    let value = serde_json::from_slice::<serde_json::Value>(line).ok();
    let seq = value.as_ref().and_then(|v| link_of(v).map(|(seq, _)| seq));
    match (seq, value) {
        (Some(seq), Some(value)) => Ok((
            Head {
                seq,
                hash: Hash::of(line),
            },
            value,
        )),
        _ => Err(TailError::Bad(
            "its last complete line is not a chained record".to_owned(),
        )),
    }
}

/// One way in which a log fails to verify.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// A line is not a JSON object with a numeric `metadata.sequence` and a hex
    /// `unmapped.prev`.
    Malformed {
        /// 1-based line number.
        line: usize,
    },
    /// `seq` is not the previous record's plus one: records deleted, inserted or reordered.
    SeqGap {
        /// 1-based line number.
        line: usize,
        /// The `seq` that should be here.
        expected: u64,
        /// The `seq` found.
        found: u64,
    },
    /// `prev` does not match the previous record: that record was edited, or records moved.
    HashMismatch {
        /// 1-based line number of the record whose `prev` does not match.
        line: usize,
    },
    /// The file ends in a line with no newline: a crash or a cut mid-record.
    PartialLastLine {
        /// 1-based line number.
        line: usize,
    },
    /// The log ends before the record its anchor names: records were cut off the end.
    Truncated {
        /// `seq` named by the anchor.
        anchored: u64,
        /// Last `seq` in the log.
        last: u64,
    },
    /// The record the anchor names differs from what the anchor recorded: it was edited.
    AnchorMismatch {
        /// `seq` named by the anchor.
        seq: u64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Malformed { line } => write!(f, "line {line}: not a chained record"),
            Problem::SeqGap {
                line,
                expected,
                found,
            } => {
                write!(f, "line {line}: seq {found} where {expected} was due (records deleted, inserted or reordered)")
            }
            Problem::HashMismatch { line } => {
                write!(f, "line {line}: prev does not match the record before it (that record was edited or moved)")
            }
            Problem::PartialLastLine { line } => {
                write!(f, "line {line}: partial record with no newline (crash or cut mid-write); never accepted")
            }
            Problem::Truncated { anchored, last } => {
                write!(f, "log ends at seq {last} but its anchor names seq {anchored} (records cut off the end)")
            }
            Problem::AnchorMismatch { seq } => write!(
                f,
                "record seq {seq} differs from its anchored hash (edited)"
            ),
        }
    }
}

/// A record of a verified log.
#[derive(Clone, Debug)]
pub struct Record {
    /// 1-based line number.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// The whole record, chain fields included.
    pub value: serde_json::Value,
}

/// The outcome of verifying a log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Complete records read.
    pub records: u64,
    /// The last complete record.
    pub head: Head,
    /// The anchor found beside the log, if any.
    pub anchor: Option<Head>,
    /// Everything that is wrong; empty for an intact log.
    pub problems: Vec<Problem>,
}

impl Report {
    /// True when the log verified with no problem at all.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// The human report of the log at `path`: one line when intact, else one line per
    /// problem and a summary.
    pub fn render(&self, path: &Path) -> String {
        let path = path.display();
        if self.is_intact() {
            let anchor = match &self.anchor {
                Some(a) => format!("anchored at seq {}", a.seq),
                None => "no anchor file".to_owned(),
            };
            return format!(
                "{path}: intact: {} records, last seq {} ({anchor})\n",
                self.records, self.head.seq
            );
        }
        let mut text: String = self
            .problems
            .iter()
            .map(|p| format!("{path}: {p}\n"))
            .collect();
        text += &format!(
            "{path}: NOT intact: {} problem(s) in {} records\n",
            self.problems.len(),
            self.records
        );
        text
    }
}

/// What `audit verify` says about its exit status, in both binaries' `--help` and man pages.
pub const VERIFY_EXIT_CODES: &str = "Exit codes: 0 intact; 1 problems found (each listed); 2 the \
     file cannot be read, or a usage error.";

/// `audit verify`, as both binaries run it: verifies `file`, writes the report to `out` (as
/// JSON with `json`) or one line naming what could not be read to `err`, and returns the exit
/// status [`VERIFY_EXIT_CODES`] describes.
pub fn verify_command(
    program: &str,
    file: &Path,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<u8> {
    let report = match verify(file) {
        Ok(r) => r,
        Err(e) => {
            writeln!(
                err,
                "{program}: cannot read audit log `{}`: {e}",
                file.display()
            )?;
            return Ok(2);
        }
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(report.render(file).as_bytes())?;
    }
    Ok(if report.is_intact() { 0 } else { 1 })
}

/// Verifies the log at `path` against its chain and its anchor, if one exists.
pub fn verify(path: &Path) -> io::Result<Report> {
    read(path).map(|(report, _)| report)
}

/// Verifies the log at `path` and returns its records (also those after a problem, so a
/// report can still say what the damaged log claims).
pub fn read(path: &Path) -> io::Result<(Report, Vec<Record>)> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut head = Head {
        seq: 0,
        hash: Hash::GENESIS,
    };
    let mut line_no = 0;
    let mut buf = Vec::new();
    let mut hashes: Vec<(u64, Hash)> = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            problems.push(Problem::PartialLastLine { line: line_no });
            break;
        }
        buf.pop();
        let parsed = serde_json::from_slice::<serde_json::Value>(&buf)
            .ok()
            .and_then(|v| {
                let (seq, prev) = link_of(&v)?;
                let prev = prev.parse::<Hash>().ok()?;
                Some((seq, prev, v))
            });
        let Some((seq, prev, value)) = parsed else {
            problems.push(Problem::Malformed { line: line_no });
            continue;
        };
        if seq != head.seq + 1 {
            problems.push(Problem::SeqGap {
                line: line_no,
                expected: head.seq + 1,
                found: seq,
            });
        }
        if prev != head.hash {
            problems.push(Problem::HashMismatch { line: line_no });
        }
        head = Head {
            seq,
            hash: Hash::of(&buf),
        };
        hashes.push((seq, head.hash));
        records.push(Record {
            line: line_no,
            seq,
            value,
        });
    }
    let anchor = match std::fs::read(anchor_path(path)) {
        Ok(bytes) => serde_json::from_slice::<Head>(&bytes).ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Some(anchor) = &anchor {
        match hashes.iter().rev().find(|(seq, _)| *seq == anchor.seq) {
            Some((_, hash)) if *hash != anchor.hash => {
                problems.push(Problem::AnchorMismatch { seq: anchor.seq })
            }
            Some(_) => {}
            None if anchor.seq > head.seq => problems.push(Problem::Truncated {
                anchored: anchor.seq,
                last: head.seq,
            }),
            None if anchor.seq != 0 => problems.push(Problem::AnchorMismatch { seq: anchor.seq }),
            None => {}
        }
    }
    Ok((
        Report {
            records: records.len() as u64,
            head,
            anchor,
            problems,
        },
        records,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut w, rec) = ChainWriter::open(&path).unwrap();
        assert_eq!(rec, None);
        for i in 0..n {
            assert_eq!(w.append(&json!({"i": i, "note": "x"})).unwrap(), i + 1);
        }
        w.sync().unwrap();
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn intact_log_verifies_with_the_chain_fields_in_place() {
        let (_d, path) = log_with(5);
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.records, 5);
        assert_eq!(report.anchor.unwrap().seq, 5);
        let first: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["metadata"]["sequence"], 1);
        assert_eq!(first["unmapped"]["prev"], Hash::GENESIS.to_string());
        assert_eq!(first["note"], "x");
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (_d, path) = log_with(3);
        let (mut w, _) = ChainWriter::open(&path).unwrap();
        assert_eq!(w.append(&json!({"more": true})).unwrap(), 4);
        w.sync().unwrap();
        assert!(verify(&path).unwrap().is_intact());
    }

    #[test]
    fn an_edit_is_caught() {
        let (_d, path) = log_with(4);
        let mut l = lines(&path);
        l[1] = l[1].replace("\"note\":\"x\"", "\"note\":\"y\"");
        write_lines(&path, &l);
        assert_eq!(
            verify(&path).unwrap().problems,
            vec![Problem::HashMismatch { line: 3 }]
        );
    }

    #[test]
    fn an_edit_of_the_last_record_is_caught_by_the_anchor() {
        let (_d, path) = log_with(4);
        let mut l = lines(&path);
        l[3] = l[3].replace("\"note\":\"x\"", "\"note\":\"y\"");
        write_lines(&path, &l);
        assert_eq!(
            verify(&path).unwrap().problems,
            vec![Problem::AnchorMismatch { seq: 4 }]
        );
    }

    #[test]
    fn a_deletion_is_caught() {
        let (_d, path) = log_with(4);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        let problems = verify(&path).unwrap().problems;
        assert!(
            problems.contains(&Problem::SeqGap {
                line: 2,
                expected: 2,
                found: 3
            }),
            "{problems:?}"
        );
        assert!(
            problems.contains(&Problem::HashMismatch { line: 2 }),
            "{problems:?}"
        );
    }

    #[test]
    fn a_reordering_is_caught() {
        let (_d, path) = log_with(4);
        let mut l = lines(&path);
        l.swap(1, 2);
        write_lines(&path, &l);
        let problems = verify(&path).unwrap().problems;
        assert!(
            problems.contains(&Problem::SeqGap {
                line: 2,
                expected: 2,
                found: 3
            }),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .filter(|p| matches!(p, Problem::HashMismatch { .. }))
                .count()
                >= 2
        );
    }

    #[test]
    fn truncation_of_whole_records_is_caught_by_the_anchor() {
        let (_d, path) = log_with(4);
        let mut l = lines(&path);
        l.truncate(2);
        write_lines(&path, &l);
        assert_eq!(
            verify(&path).unwrap().problems,
            vec![Problem::Truncated {
                anchored: 4,
                last: 2
            }]
        );
    }

    #[test]
    fn a_partial_last_line_is_reported_and_never_accepted() {
        let (_d, path) = log_with(3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"prev\":\"ab").unwrap();
        drop(f);
        assert_eq!(
            verify(&path).unwrap().problems,
            vec![Problem::PartialLastLine { line: 4 }]
        );

        // A writer restarting after the crash terminates the fragment and continues from seq 3;
        // the fragment stays reported.
        let (mut w, rec) = ChainWriter::open(&path).unwrap();
        assert_eq!(rec, Some(Recovery { partial_bytes: 19 }));
        assert_eq!(w.append(&json!({"after": "crash"})).unwrap(), 4);
        w.sync().unwrap();
        assert_eq!(
            verify(&path).unwrap().problems,
            vec![Problem::Malformed { line: 4 }]
        );
    }

    #[test]
    fn verify_command_reports_and_exits_by_the_one_rule() {
        let (dir, path) = log_with(3);
        let run = |path: &Path, json| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = verify_command("prog", path, json, &mut out, &mut err).unwrap();
            let text = |b| String::from_utf8(b).unwrap();
            (code, text(out), text(err))
        };
        let (code, out, err) = run(&path, false);
        let intact = format!(
            "{}: intact: 3 records, last seq 3 (anchored at seq 3)\n",
            path.display()
        );
        assert_eq!((code, out, err), (0, intact, String::new()));
        let (code, out, _) = run(&path, true);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((code, report["records"].as_u64()), (0, Some(3)));

        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        let (code, out, _) = run(&path, false);
        assert_eq!(code, 1);
        assert!(
            out.ends_with(&format!(
                "{}: NOT intact: 2 problem(s) in 2 records\n",
                path.display()
            )),
            "{out}"
        );

        let missing = dir.path().join("missing.jsonl");
        let (code, out, err) = run(&missing, false);
        assert_eq!((code, out.as_str()), (2, ""));
        assert!(
            err.starts_with("prog: cannot read audit log `") && err.lines().count() == 1,
            "{err}"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let (_d, path) = log_with(1);
        let (_w, _) = ChainWriter::open(&path).unwrap();
        assert!(is_held(&path).unwrap());
        assert!(matches!(
            ChainWriter::open(&path),
            Err(ChainError::Locked { .. })
        ));
    }

    #[test]
    fn reserved_fields_and_non_objects_are_refused() {
        let (_d, path) = log_with(0);
        let (mut w, _) = ChainWriter::open(&path).unwrap();
        assert!(matches!(
            w.append(&json!({"metadata": {"sequence": 9}})),
            Err(ChainError::BadRecord)
        ));
        assert!(matches!(
            w.append(&json!({"unmapped": {"prev": "x"}})),
            Err(ChainError::BadRecord)
        ));
        assert!(matches!(
            w.append(&json!({"unmapped": 1})),
            Err(ChainError::BadRecord)
        ));
        assert!(matches!(
            w.append(&json!([1, 2])),
            Err(ChainError::BadRecord)
        ));
        assert_eq!(w.append(&json!({})).unwrap(), 1);
    }
}
