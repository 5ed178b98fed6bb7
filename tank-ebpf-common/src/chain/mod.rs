//! The tamper-evident audit log: JSON Lines where each record names the hash of the one before.
//!
//! Both tank's audit logs use this one format: the kernel log written by `tank-loader` and
//! the request log written by `egress-proxy`, so one verifier serves an auditor for both.
//!
//! # Format
//! One JSON object per line, each an OCSF event (`crate::ocsf`). The chain's fields live
//! where OCSF has room for them:
//! - `metadata.sequence` (the record's `seq`): 1 for the first record, then +1 per record, no
//!   gaps, across every segment;
//! - `unmapped.prev`: lowercase hex SHA-256 of the previous record's line (its exact bytes,
//!   without the newline); 64 zeros ([`Hash::GENESIS`]) for the first record;
//! - `unmapped.segment` (first record of a segment only): a [`SegmentLink`] naming the segment
//!   before;
//! - `unmapped.opens: true` on a record that opens a span (a proxy tunnel), `unmapped.closes:
//!   <seq>` on the record that closes it: [`verify`] lists spans never closed (the writer died
//!   while they were open).
//!
//! An edit to a record breaks the next record's `prev`; a deleted or reordered record breaks
//! `seq` and `prev`; a crash mid-write leaves a partial last line, which is reported and never
//! accepted. The last record has no successor to vouch for it, so the writer also keeps an
//! anchor beside the log (`<log>.head`: the `seq` and hash of the last record it made
//! durable), and [`verify`] reports a log that ends before its anchor, or whose anchored record
//! changed. An attacker who can rewrite both files can rewrite history; the writers therefore
//! also log each anchor to their system log (journald), which is shipped off the host.
//!
//! # Segments
//! A writer can rotate its log ([`Rotation`]): the active file is renamed to
//! `<log>.<first seq, 20 digits>` (then compressed to `….zst`) and a new active file begins
//! whose first record continues the chain and carries a [`SegmentLink`]. [`series`] finds the
//! segments of a log and [`read_series`] verifies them as one chain, so a missing, reordered,
//! truncated or replaced segment is reported (see [`Problem`]).
//!
//! # Durability and a full disk
//! [`ChainWriter::append`] formats a record into the writer's batch; the batch reaches the file
//! in large `write(2)`s on an `O_APPEND` descriptor (when it reaches [`FLUSH_BYTES`], at
//! [`ChainWriter::flush`], after an opening record and at every sync), so a crash can only cut
//! the last line. [`ChainWriter::sync`] writes and makes durable (`fdatasync`) everything
//! appended so far and then moves the anchor; callers decide how often (see
//! docs/audit-format.md for each log's policy). Space for records is allocated ahead of the
//! end of the file (`fallocate`, keeping the size), and a writer keeps a reserve allocated for
//! records that must still fit when the disk is full (a tunnel's closing record, an outage
//! record). A record that cannot be given space is refused whole ([`ChainError::Full`]); a
//! write that fails anyway is cut back off the file, so a full disk never leaves a partial line.

mod segment;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use segment::{series, SegmentLink, Series};
pub use verify::{
    lines, read, read_anchor, read_series, verify, ChainFields, Line, Lines, Problem, Record,
    Report, SegmentSummary, StreamVerifier,
};
pub use writer::{
    ChainWriter, Options, Recovery, Rotated, Rotation, Settings, FLUSH_BYTES, RESUME_ROOM,
};

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

    /// 64 hex digits (either case). Every record's `prev` goes through here, so it decodes
    /// by table rather than through `hex`'s general decoder (a tenth of the time); errors
    /// are `hex`'s, for the same inputs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        /// The value of each hex digit, 0xff for any other byte.
        const VALUE: [u8; 256] = {
            let mut t = [0xff; 256];
            let mut i = 0;
            while i < 10 {
                t[b'0' as usize + i] = i as u8;
                i += 1;
            }
            let mut i = 0;
            while i < 6 {
                t[b'a' as usize + i] = 10 + i as u8;
                t[b'A' as usize + i] = 10 + i as u8;
                i += 1;
            }
            t
        };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(if digits.len() % 2 == 1 {
                hex::FromHexError::OddLength
            } else {
                hex::FromHexError::InvalidStringLength
            });
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let (hi, lo) = (VALUE[usize::from(pair[0])], VALUE[usize::from(pair[1])]);
            if (hi | lo) == 0xff {
                let at = if hi == 0xff { 2 * i } else { 2 * i + 1 };
                return Err(hex::FromHexError::InvalidHexCharacter {
                    c: char::from(digits[at]),
                    index: at,
                });
            }
            out[i] = hi << 4 | lo;
        }
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

/// Where a record holds its `seq`: `metadata.sequence`.
const SEQ: (&str, &str) = ("metadata", "sequence");
/// Where a record holds its `prev`: `unmapped.prev`.
const PREV: (&str, &str) = ("unmapped", "prev");
/// The writer's other fields, all in `unmapped`: a segment's link, a span's opening and close.
const SEGMENT: &str = "segment";
const OPENS: &str = "opens";
const CLOSES: &str = "closes";

/// The `seq` and `prev` of a parsed record, if it has both.
fn link_of(record: &serde_json::Value) -> Option<(u64, &str)> {
    let seq = record.get(SEQ.0)?.get(SEQ.1)?.as_u64()?;
    let prev = record.get(PREV.0)?.get(PREV.1)?.as_str()?;
    Some((seq, prev))
}

/// The writer's field `key` of a parsed record (in `unmapped`).
fn chain_field<'a>(record: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    record.get("unmapped")?.get(key)
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
    /// No space for the record and the reserve kept after it: nothing was written.
    #[error("audit log `{path}`: no space for a {bytes}-byte record and the {keep}-byte reserve kept after it (disk full); nothing written")]
    Full {
        /// The log.
        path: PathBuf,
        /// The record's size.
        bytes: u64,
        /// The reserve that had to stay allocated after it.
        keep: u64,
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
    #[error("audit record is not a JSON object free of the chain's fields `metadata.sequence` and `unmapped.prev`, `unmapped.segment`, `unmapped.opens`, `unmapped.closes`")]
    BadRecord,
}

impl ChainError {
    /// True when the record was refused for lack of space (it may fit once space returns).
    pub fn is_full(&self) -> bool {
        match self {
            ChainError::Full { .. } => true,
            ChainError::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The position of a record in a chain: its `seq` and the hex SHA-256 of its line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    /// Sequence number (0 for an empty log).
    pub seq: u64,
    /// Hash of the record's line ([`Hash::GENESIS`] for an empty log).
    pub hash: Hash,
}

impl Head {
    fn genesis() -> Self {
        Self {
            seq: 0,
            hash: Hash::GENESIS,
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

/// What `audit verify` says about its exit status, in both binaries' `--help` and man pages.
pub const VERIFY_EXIT_CODES: &str = "Exit codes: 0 intact; 1 problems found (each listed); 2 the \
     file cannot be read, or a usage error.";

/// `audit verify`, as both binaries run it: verifies the series `files` names (a log, a
/// directory, or several segments), writes the report to `out` (as JSON with `json`) or one
/// line naming what could not be read to `err`, and returns the exit status
/// [`VERIFY_EXIT_CODES`] describes.
pub fn verify_command(
    program: &str,
    files: &[PathBuf],
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<u8> {
    let label = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let report = match read_series(files) {
        Ok((r, _)) => r,
        Err(e) => {
            writeln!(err, "{program}: cannot read audit log `{label}`: {e}")?;
            return Ok(2);
        }
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(report.render(&label).as_bytes())?;
    }
    Ok(if report.is_intact() { 0 } else { 1 })
}
