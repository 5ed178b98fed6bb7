//! Verifying a log, or a series of its segments, as one chain.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use super::segment::{self, SegmentLink};
use super::{chain_field, link_of, Hash, Head, CLOSES, OPENS, SEGMENT};

/// One way in which a log fails to verify. Line numbers count across the whole series, as
/// if its segments were one file; [`Report::describe`] names the file and its own line.
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
    /// The series begins after seq 1 and no retention record accounts for what came before.
    MissingStart {
        /// The first file.
        file: String,
        /// Its first `seq`.
        first_seq: u64,
    },
    /// Records between two segments are missing: a whole segment between them is gone.
    MissingSegment {
        /// The segment after the gap.
        file: String,
        /// The segment its link names as the one before (`null`: reopened after logrotate).
        previous: Option<String>,
        /// The first `seq` missing.
        from: u64,
        /// The last `seq` missing.
        to: u64,
    },
    /// A segment ends before the record the next segment's link names as its last.
    SegmentTruncated {
        /// The cut segment.
        file: String,
        /// Its last `seq`.
        last: u64,
        /// The `seq` it should end at.
        expected_last: u64,
    },
    /// A segment begins at or before the end of the one given before it.
    SegmentOutOfOrder {
        /// The misplaced segment.
        file: String,
        /// Its first `seq`.
        first_seq: u64,
        /// The `seq` due.
        expected: u64,
    },
    /// A segment's first record does not chain to the last record of the segment before.
    SegmentReplaced {
        /// The segment whose first record does not chain.
        file: String,
    },
    /// A record closes a span that no earlier record of the series opened (or closes it twice).
    UnknownClose {
        /// 1-based line number.
        line: usize,
        /// The `seq` it claims to close.
        closes: u64,
    },
}

impl Problem {
    fn line(&self) -> Option<usize> {
        match self {
            Problem::Malformed { line }
            | Problem::SeqGap { line, .. }
            | Problem::HashMismatch { line }
            | Problem::PartialLastLine { line }
            | Problem::UnknownClose { line, .. } => Some(*line),
            _ => None,
        }
    }

    fn fmt_at(&self, at: &str, f: &mut impl std::fmt::Write) -> std::fmt::Result {
        match self {
            Problem::Malformed { .. } => write!(f, "{at}: not a chained record"),
            Problem::SeqGap {
                expected, found, ..
            } => {
                write!(f, "{at}: seq {found} where {expected} was due (records deleted, inserted or reordered)")
            }
            Problem::HashMismatch { .. } => {
                write!(f, "{at}: prev does not match the record before it (that record was edited or moved)")
            }
            Problem::PartialLastLine { .. } => {
                write!(f, "{at}: partial record with no newline (crash or cut mid-write); never accepted")
            }
            Problem::Truncated { anchored, last } => {
                write!(f, "log ends at seq {last} but its anchor names seq {anchored} (records cut off the end)")
            }
            Problem::AnchorMismatch { seq } => write!(
                f,
                "record seq {seq} differs from its anchored hash (edited)"
            ),
            Problem::MissingStart { file, first_seq } => write!(
                f,
                "{file}: the series starts at seq {first_seq} and no retention record accounts for the records before it (earlier segments missing: give the whole directory)"
            ),
            Problem::MissingSegment {
                file,
                previous,
                from,
                to,
            } => {
                let named = previous
                    .as_ref()
                    .map_or(String::new(), |p| format!(" (its link names {p})"));
                write!(f, "{file}: seq {from}..={to} missing before it: a segment is missing{named}")
            }
            Problem::SegmentTruncated {
                file,
                last,
                expected_last,
            } => write!(
                f,
                "{file}: ends at seq {last} but the next segment says it ended at seq {expected_last} (records cut off)"
            ),
            Problem::SegmentOutOfOrder {
                file,
                first_seq,
                expected,
            } => write!(
                f,
                "{file}: starts at seq {first_seq} where {expected} was due (segments reordered or repeated)"
            ),
            Problem::SegmentReplaced { file } => write!(
                f,
                "{file}: its first record does not chain to the last record of the segment before (one of them was replaced or edited)"
            ),
            Problem::UnknownClose { closes, .. } => write!(
                f,
                "{at}: closes seq {closes}, which opened nothing still open"
            ),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.line().map_or(String::new(), |l| format!("line {l}"));
        self.fmt_at(&at, f)
    }
}

/// A record of a verified log.
#[derive(Clone, Debug)]
pub struct Record {
    /// 1-based line number across the series.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
    /// The whole record, chain fields included.
    pub value: serde_json::Value,
}

/// One file of a verified series.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentSummary {
    /// The file.
    pub file: PathBuf,
    /// Complete records in it.
    pub records: u64,
    /// First and last `seq` (0 when empty).
    pub first_seq: u64,
    /// Last `seq`.
    pub last_seq: u64,
    /// Series line number of its first line, minus one.
    #[serde(skip)]
    pub line_offset: usize,
}

/// A span opened and never closed: the writer stopped or died while it was open.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Open {
    /// Line of the opening record.
    pub line: usize,
    /// Its `seq`.
    pub seq: u64,
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
    /// The files read, oldest first.
    pub segments: Vec<SegmentSummary>,
    /// Spans (proxy tunnels) opened and never closed: still open, or the writer died.
    pub unclosed: Vec<Open>,
}

impl Report {
    /// True when the log verified with no problem at all.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// A problem in words, naming the file and its own line when the series has several.
    pub fn describe(&self, p: &Problem) -> String {
        let at = match p.line() {
            Some(line) if self.segments.len() > 1 => {
                let s = self
                    .segments
                    .iter()
                    .rev()
                    .find(|s| s.line_offset < line)
                    .expect("line in a segment");
                format!("{} line {}", s.file.display(), line - s.line_offset)
            }
            Some(line) => format!("line {line}"),
            None => String::new(),
        };
        let mut text = String::new();
        p.fmt_at(&at, &mut text).expect("write to String");
        text
    }

    /// The report in words, as `audit verify` prints it; `label` names what was verified.
    pub fn render(&self, label: &str) -> String {
        let mut out = String::new();
        let segments = match self.segments.len() {
            0 | 1 => String::new(),
            n => format!(" in {n} segments"),
        };
        if self.is_intact() {
            let anchor = match &self.anchor {
                Some(a) => format!("anchored at seq {}", a.seq),
                None => "no anchor file".to_owned(),
            };
            out += &format!(
                "{label}: intact: {} records{segments}, last seq {} ({anchor})\n",
                self.records, self.head.seq
            );
        } else {
            for p in &self.problems {
                out += &format!("{label}: {}\n", self.describe(p));
            }
            out += &format!(
                "{label}: NOT intact: {} problem(s) in {} records{segments}\n",
                self.problems.len(),
                self.records
            );
        }
        if !self.unclosed.is_empty() {
            const SHOWN: usize = 10;
            let mut seqs: Vec<String> = self
                .unclosed
                .iter()
                .take(SHOWN)
                .map(|o| o.seq.to_string())
                .collect();
            if self.unclosed.len() > SHOWN {
                seqs.push(format!("and {} more", self.unclosed.len() - SHOWN));
            }
            out += &format!(
                "{label}: {} opened and never closed (still open, or the writer died while they were): seq {}\n",
                self.unclosed.len(),
                seqs.join(", ")
            );
        }
        out
    }
}

/// Verifies the log at `path` (with its rotated segments beside it, if any) against its chain
/// and its anchor.
pub fn verify(path: &Path) -> io::Result<Report> {
    read(path).map(|(report, _)| report)
}

/// Verifies the log at `path` (with its rotated segments) and returns its records, also
/// those after a problem, so a report can still say what the damaged log claims.
pub fn read(path: &Path) -> io::Result<(Report, Vec<Record>)> {
    read_series(&[path.to_owned()])
}

/// Verifies the series named by `paths` (see [`segment::series`]) as one chain.
pub fn read_series(paths: &[PathBuf]) -> io::Result<(Report, Vec<Record>)> {
    let series = segment::series(paths)?;
    let mut v = StreamVerifier::new(read_anchor(&series)?);
    let mut records = Vec::new();
    for line in lines(&series) {
        match line? {
            Line::File(path) => v.file(&path),
            Line::Complete(bytes) => records.extend(v.line(&bytes)),
            Line::Partial => v.partial(),
        }
    }
    Ok((v.finish(), records))
}

/// The anchor of `series` (`<log>.head` of its active file), if it has a readable one.
pub fn read_anchor(series: &segment::Series) -> io::Result<Option<Head>> {
    match series.anchor.as_deref().map(std::fs::read) {
        Some(Ok(bytes)) => Ok(serde_json::from_slice::<Head>(&bytes).ok()),
        Some(Err(e)) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(None),
    }
}

/// One item of a log's lines in chain order: what [`lines`] reads from a series of files, and
/// what a log store gives back (records only: a store has no files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// A file of the series begins; the lines after it are its own.
    File(PathBuf),
    /// One complete line, without its newline.
    Complete(Vec<u8>),
    /// A last line with no newline (a crash or a cut mid-record): reported, never accepted.
    Partial,
}

/// The lines of `series`, file by file, read as they are asked for (memory: one line).
pub fn lines(series: &segment::Series) -> Lines {
    Lines {
        files: series.files.clone().into_iter(),
        reader: None,
    }
}

/// The iterator [`lines`] returns.
pub struct Lines {
    files: std::vec::IntoIter<PathBuf>,
    reader: Option<Box<dyn BufRead + Send>>,
}

impl Iterator for Lines {
    type Item = io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some(reader) = self.reader.as_mut() else {
            let path = self.files.next()?;
            return Some(segment::reader(&path).map(|r| {
                self.reader = Some(r);
                Line::File(path)
            }));
        };
        // `read_until`, with the `memchr` crate's newline search (several times faster than
        // the standard library's on these ~1 KB lines) and one allocation of the line's size.
        let mut buf = Vec::new();
        loop {
            let available = match reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.reader = None;
                    return Some(Err(e));
                }
            };
            if available.is_empty() {
                self.reader = None;
                return if buf.is_empty() {
                    self.next()
                } else {
                    Some(Ok(Line::Partial))
                };
            }
            match memchr::memchr(b'\n', available) {
                Some(end) => {
                    if buf.is_empty() {
                        buf = available[..end].to_vec();
                    } else {
                        buf.extend_from_slice(&available[..end]);
                    }
                    reader.consume(end + 1);
                    return Some(Ok(Line::Complete(buf)));
                }
                None => {
                    let n = available.len();
                    buf.extend_from_slice(available);
                    reader.consume(n);
                }
            }
        }
    }
}

/// The chain's fields of one record, as [`StreamVerifier::chained`] takes them from a caller
/// that parsed the line itself (one parse for the chain and for what the caller reads).
#[derive(Clone, Debug)]
pub struct ChainFields {
    /// `metadata.sequence`.
    pub seq: u64,
    /// `unmapped.prev`.
    pub prev: Hash,
    /// `unmapped.segment`, on a segment's first record.
    pub segment: Option<SegmentLink>,
    /// `unmapped.opens` is `true`.
    pub opens: bool,
    /// `unmapped.closes`.
    pub closes: Option<u64>,
}

impl ChainFields {
    /// The chain's fields of a parsed record; `None` when it is not a chained record.
    pub fn of(value: &serde_json::Value) -> Option<Self> {
        let (seq, prev) = link_of(value)?;
        Some(Self {
            seq,
            prev: prev.parse().ok()?,
            segment: chain_field(value, SEGMENT)
                .and_then(|l| serde_json::from_value::<SegmentLink>(l.clone()).ok()),
            opens: chain_field(value, OPENS) == Some(&serde_json::Value::Bool(true)),
            closes: chain_field(value, CLOSES).and_then(|c| c.as_u64()),
        })
    }
}

/// Verifies one log's chain as its lines go by, keeping no record: memory is the spans still
/// open and one summary per file, whatever the log's length. [`read_series`] feeds it a series
/// of files; `audit cross-check` feeds it many logs at once, from files or a log store.
///
/// Feed it in chain order: [`file`](Self::file) when a file begins (none for a store),
/// [`line`](Self::line) or [`chained`](Self::chained) per complete line, [`partial`](Self::partial)
/// for a cut last line; then [`finish`](Self::finish).
pub struct StreamVerifier {
    problems: Vec<Problem>,
    segments: Vec<SegmentSummary>,
    /// The file being read, if the lines come from files.
    current: Option<SegmentSummary>,
    head: Option<Head>,
    line: usize,
    records: u64,
    anchor: Option<Head>,
    /// The hash of the last record whose `seq` the anchor names.
    anchored: Option<Hash>,
    removed_through: u64,
    first: Option<(String, u64)>,
    /// Spans open: `seq` of the opening record -> its line. Hashed (foldhash), not ordered:
    /// a proxy log opens and closes thousands of tunnels a second, and only the report at
    /// the end wants them in order.
    open: HashMap<u64, usize, foldhash::fast::RandomState>,
}

fn name_of(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl StreamVerifier {
    /// A verifier of a log whose anchor (`<log>.head`) says `anchor`, if it has one.
    pub fn new(anchor: Option<Head>) -> Self {
        Self {
            problems: Vec::new(),
            segments: Vec::new(),
            current: None,
            head: None,
            line: 0,
            records: 0,
            anchor,
            anchored: None,
            removed_through: 0,
            first: None,
            open: HashMap::default(),
        }
    }

    /// A verifier of part of a log on purpose, from `seq` on (a time range read from a log
    /// store): that the records before `seq` are absent is no problem; a record missing from
    /// `seq` on still is.
    pub fn starting_at(mut self, seq: Option<u64>) -> Self {
        if let Some(seq) = seq {
            self.removed_through = self.removed_through.max(seq.saturating_sub(1));
        }
        self
    }

    /// The 1-based line number of the last line fed, across the series.
    pub fn line_number(&self) -> usize {
        self.line
    }

    /// A new file of the series begins.
    pub fn file(&mut self, path: &Path) {
        self.segments.extend(self.current.take());
        self.current = Some(SegmentSummary {
            file: path.to_owned(),
            records: 0,
            first_seq: 0,
            last_seq: 0,
            line_offset: self.line,
        });
    }

    /// The last line of the current file has no newline.
    pub fn partial(&mut self) {
        self.line += 1;
        self.problems
            .push(Problem::PartialLastLine { line: self.line });
    }

    /// One complete line (without its newline): parses it, checks its link and returns it as
    /// a record, or `None` when it is not a chained record (a problem is noted).
    pub fn line(&mut self, line: &[u8]) -> Option<Record> {
        let value = serde_json::from_slice::<serde_json::Value>(line).ok();
        let fields = value.as_ref().and_then(ChainFields::of);
        let (line, seq) = self.chained(line, fields)?;
        Some(Record {
            line,
            seq,
            value: value.expect("fields come from the value"),
        })
    }

    /// One complete line whose chain fields the caller parsed (`None`: it has none, or it is
    /// not JSON): checks its link; returns its line number and `seq` when it is a record.
    pub fn chained(&mut self, line: &[u8], fields: Option<ChainFields>) -> Option<(usize, u64)> {
        self.line += 1;
        let Some(ChainFields {
            seq,
            prev,
            segment: link,
            opens,
            closes,
        }) = fields
        else {
            self.problems.push(Problem::Malformed { line: self.line });
            return None;
        };
        if let Some(l) = &link {
            self.removed_through = self.removed_through.max(l.removed_through_seq);
        }
        let first_in_file = self.current.as_ref().is_some_and(|s| s.records == 0);
        // Named only where a problem may need it, not on every line.
        let file = |v: &Self| {
            v.current
                .as_ref()
                .map_or(String::new(), |s| name_of(&s.file))
        };
        match self.head.clone() {
            None => {
                // A later start is judged at the end, once every retention record is read.
                self.first = Some((file(self), seq));
                if seq == 1 && prev != Hash::GENESIS {
                    self.problems
                        .push(Problem::HashMismatch { line: self.line });
                }
            }
            Some(head) if first_in_file => self.boundary(&file(self), &head, seq, prev, link),
            Some(head) => {
                if seq != head.seq + 1 {
                    self.problems.push(Problem::SeqGap {
                        line: self.line,
                        expected: head.seq + 1,
                        found: seq,
                    });
                }
                if prev != head.hash {
                    self.problems
                        .push(Problem::HashMismatch { line: self.line });
                }
            }
        }
        if opens {
            self.open.insert(seq, self.line);
        }
        if let Some(closes) = closes {
            let before_series = self.first.as_ref().is_some_and(|(_, f)| closes < *f);
            if self.open.remove(&closes).is_none() && !before_series {
                self.problems.push(Problem::UnknownClose {
                    line: self.line,
                    closes,
                });
            }
        }
        let head = Head {
            seq,
            hash: Hash::of(line),
        };
        if let Some(summary) = self.current.as_mut() {
            if summary.records == 0 {
                summary.first_seq = seq;
            }
            summary.last_seq = seq;
            summary.records += 1;
        }
        if self.anchor.as_ref().is_some_and(|a| a.seq == seq) {
            self.anchored = Some(head.hash);
        }
        self.head = Some(head);
        self.records += 1;
        Some((self.line, seq))
    }

    /// The first record of a file after the first: does it continue the file before?
    fn boundary(
        &mut self,
        file: &str,
        head: &Head,
        seq: u64,
        prev: Hash,
        link: Option<SegmentLink>,
    ) {
        let expected = head.seq + 1;
        let before = self.segments.last().map(|s| name_of(&s.file));
        if seq < expected {
            self.problems.push(Problem::SegmentOutOfOrder {
                file: file.to_owned(),
                first_seq: seq,
                expected,
            });
        } else if seq > expected {
            let previous = link.as_ref().and_then(|l| l.previous.clone());
            let named_before = before
                .as_deref()
                .zip(previous.as_deref())
                .is_some_and(|(b, p)| b.strip_suffix(".zst").unwrap_or(b) == p);
            match link {
                Some(l) if named_before && l.previous_last_seq > head.seq => {
                    self.problems.push(Problem::SegmentTruncated {
                        file: before.unwrap_or_default(),
                        last: head.seq,
                        expected_last: l.previous_last_seq,
                    })
                }
                _ => self.problems.push(Problem::MissingSegment {
                    file: file.to_owned(),
                    previous,
                    from: expected,
                    to: seq - 1,
                }),
            }
        } else if prev != head.hash {
            self.problems.push(Problem::SegmentReplaced {
                file: file.to_owned(),
            });
        }
    }

    /// What the whole log came to.
    pub fn finish(mut self) -> Report {
        self.segments.extend(self.current.take());
        if let Some((file, first_seq)) = &self.first {
            if first_seq.saturating_sub(1) > self.removed_through {
                self.problems.insert(
                    0,
                    Problem::MissingStart {
                        file: file.clone(),
                        first_seq: *first_seq,
                    },
                );
            }
        }
        let head = self.head.unwrap_or_else(Head::genesis);
        if let Some(anchor) = &self.anchor {
            match self.anchored {
                Some(hash) if hash != anchor.hash => self
                    .problems
                    .push(Problem::AnchorMismatch { seq: anchor.seq }),
                Some(_) => {}
                None if anchor.seq > head.seq => self.problems.push(Problem::Truncated {
                    anchored: anchor.seq,
                    last: head.seq,
                }),
                None if anchor.seq != 0 => self
                    .problems
                    .push(Problem::AnchorMismatch { seq: anchor.seq }),
                None => {}
            }
        }
        let mut unclosed: Vec<Open> = self
            .open
            .into_iter()
            .map(|(seq, line)| Open { line, seq })
            .collect();
        unclosed.sort_unstable_by_key(|o| o.seq);
        Report {
            records: self.records,
            head,
            anchor: self.anchor,
            problems: self.problems,
            segments: self.segments,
            unclosed,
        }
    }
}
