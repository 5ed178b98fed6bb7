//! `audit backfill`: puts into the log store every record of a host's log that the store lacks,
//! from the host's files, so a shipper that missed a segment loses nothing.
//!
//! A shipper follows the active file by name; one that looks only after two rotations never
//! reads the segment in between, and `audit verify --clickhouse` reports those records missing
//! (`seq_gap`). Backfill reads the host's series (segments, compressed or not, then the active
//! file), asks the store which records of that chain it holds (their `seq` and the SHA-256 of
//! each line), and inserts exactly the missing lines, unchanged, in chain order, as the rows a
//! shipper sends. A second run inserts nothing.
//!
//! It never ships a broken chain as good: the series is verified whole (against its anchor)
//! before anything is inserted, and a series that does not verify is refused. It reads the
//! files twice, so memory holds one batch and the list of missing `seq` ranges, whatever the
//! files' size: the first pass verifies and compares with the store (a page of it at a time),
//! planning the inserts as batches, each with the SHA-256 of its body;
//! the second pass sends a batch only if it reads back byte for byte as planned (a log that
//! rotated or changed in between stops it, and a rerun does the rest). A row the store holds
//! for a `seq` whose line differs from the file is left alone and reported: that is evidence
//! for the auditor, not something to paper over.

use std::io::{self, Write};
use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tank_ebpf_common::chain::{self, Hash, Line, StreamVerifier};
use tank_ebpf_common::ocsf::LogName;

use crate::clickhouse::{self, Store};

/// Rows in one insert, at most.
const BATCH_ROWS: u64 = 10_000;
/// Bytes of rows in one insert, about (a batch ends with the row that reaches it).
const BATCH_BYTES: usize = 4 << 20;
/// Sequence numbers listed per list in the report (all are counted).
const LISTED: usize = 20;

/// The chain in the store that a host's log is shipped as.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// The shipper's `host`.
    pub host: String,
    /// Kernel or proxy log.
    pub log: LogName,
    /// The shipper's `name` of the log ('' by default).
    pub name: String,
}

/// Why nothing (or not everything) was inserted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the series cannot be read.
    #[error("cannot read {what}: {source}")]
    Read {
        /// The log as given.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The series does not verify: it is not shipped.
    #[error(
        "{log} does not verify ({problems} problem(s), the first: {first}): nothing inserted; \
         run `tank-loader audit verify {log}`"
    )]
    Broken {
        /// The log as given.
        log: String,
        /// How many problems.
        problems: usize,
        /// The first, in words.
        first: String,
    },
    /// The records say they belong to another log than `--log`.
    #[error(
        "{log}: record seq {seq} has metadata.log_name {found}, not \"{wanted}\" (--log): \
         nothing inserted"
    )]
    WrongLog {
        /// The log as given.
        log: String,
        /// The record.
        seq: u64,
        /// Its `metadata.log_name`, as JSON.
        found: String,
        /// `--log`.
        wanted: &'static str,
    },
    /// The store cannot be read.
    #[error("{0}: nothing inserted")]
    Store(#[source] clickhouse::Error),
    /// The store refused an insert, or went away during one.
    #[error(
        "{source}: inserted {inserted} of {missing} missing records before it, each as \
         verified; run backfill again"
    )]
    Insert {
        /// Records inserted before.
        inserted: u64,
        /// Records missing.
        missing: u64,
        /// The cause.
        #[source]
        source: clickhouse::Error,
    },
    /// The second reading of the files is not what the first verified.
    #[error(
        "{log} changed while backfill read it (rotated?): inserted {inserted} of {missing} \
         missing records, each as verified; run backfill again"
    )]
    Changed {
        /// The log as given.
        log: String,
        /// Records inserted before.
        inserted: u64,
        /// Records missing.
        missing: u64,
    },
}

/// What a backfill did.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// The chain in the store.
    #[serde(flatten)]
    pub target: Target,
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Records in the files (the series verified intact).
    pub records: u64,
    /// Their first `seq` (0 when there are none).
    pub first_seq: u64,
    /// Their last `seq`.
    pub last_seq: u64,
    /// Records of the files the store already held, line for line.
    pub present: u64,
    /// Records inserted now.
    pub inserted: u64,
    /// The `seq` ranges inserted (the first [`LISTED`]).
    pub inserted_ranges: Vec<(u64, u64)>,
    /// Records whose `seq` the store holds with another line: left as they are.
    pub differing: u64,
    /// Their `seq` (the first [`LISTED`]).
    pub differing_seqs: Vec<u64>,
}

/// One planned insert: the rows of consecutive missing records.
#[derive(Debug, PartialEq, Eq)]
struct Batch {
    last_seq: u64,
    rows: u64,
    digest: [u8; 32],
}

/// A batch being filled: its JSONEachRow body and a running digest of it.
#[derive(Default)]
struct Filling {
    body: Vec<u8>,
    digest: Sha256,
    rows: u64,
    bytes: usize,
    /// Keep the body (the second pass sends it) or only its digest (the first pass).
    keep: bool,
}

impl Filling {
    fn new(keep: bool) -> Self {
        Self {
            keep,
            ..Self::default()
        }
    }

    /// Adds the row of `line`.
    fn push(&mut self, target: &Target, line: &[u8]) {
        #[derive(Serialize)]
        struct Row<'a> {
            host: &'a str,
            log: &'static str,
            name: &'a str,
            line: &'a str,
        }
        // A line the verifier accepted is a JSON object, so UTF-8.
        let line = std::str::from_utf8(line).expect("a verified record is UTF-8");
        let row = Row {
            host: &target.host,
            log: target.log.as_str(),
            name: &target.name,
            line,
        };
        let mut bytes = serde_json::to_vec(&row).expect("a row serializes");
        bytes.push(b'\n');
        self.digest.update(&bytes);
        self.rows += 1;
        self.bytes += bytes.len();
        if self.keep {
            self.body.extend_from_slice(&bytes);
        }
    }

    /// The batch it is, ending at `last_seq`.
    fn finish(self, last_seq: u64) -> Batch {
        Batch {
            last_seq,
            rows: self.rows,
            digest: self.digest.finalize().into(),
        }
    }
}

/// `audit backfill`: inserts into `store` the records of the log `paths` names that the
/// store's chain `target` lacks, and writes what it did to `out` (JSON with `json`). Returns
/// the exit status: 0 the store holds every record of the files; 1 it also holds rows that
/// differ from the files (left alone, listed); 2 nothing or not everything could be done (one
/// line on `err`).
pub fn command(
    store: &Store,
    target: &Target,
    paths: &[PathBuf],
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<u8> {
    let outcome = match backfill(store, target, paths) {
        Ok(o) => o,
        Err(e) => {
            writeln!(err, "tank-loader: backfill: {e}")?;
            return Ok(2);
        }
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &outcome)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render(store, &outcome))?;
    }
    Ok(if outcome.differing == 0 { 0 } else { 1 })
}

fn render(store: &Store, o: &Outcome) -> String {
    let mut label = format!(
        "backfill host={} log={}",
        o.target.host,
        o.target.log.as_str()
    );
    if !o.target.name.is_empty() {
        label += &format!(" name={}", o.target.name);
    }
    let ranges = |n: u64, listed: &[(u64, u64)]| {
        let mut text: Vec<String> = listed
            .iter()
            .map(|(a, b)| match a == b {
                true => a.to_string(),
                false => format!("{a}..={b}"),
            })
            .collect();
        if listed.len() == LISTED && n > 0 {
            text.push("...".to_owned());
        }
        text.join(", ")
    };
    let mut out = format!(
        "{label}: {} records in {} file(s), seq {}..={}, intact; {store} held {}, inserted {}",
        o.records,
        o.files.len(),
        o.first_seq,
        o.last_seq,
        o.present,
        o.inserted
    );
    if o.inserted > 0 {
        out += &format!(" (seq {})", ranges(o.inserted, &o.inserted_ranges));
    }
    out += "\n";
    if o.differing > 0 {
        let seqs: Vec<String> = o.differing_seqs.iter().map(u64::to_string).collect();
        out +=
            &format!(
            "{label}: {} record(s) in the store differ from the files (seq {}{}): left as they \
             are; run `tank-loader audit verify --clickhouse URL --host {}`\n",
            o.differing,
            seqs.join(", "),
            if o.differing as usize > seqs.len() { ", ..." } else { "" },
            o.target.host
        );
    }
    out
}

/// Backfills `target` in `store` from the log `paths` names ([`command`] without the output).
pub fn backfill(store: &Store, target: &Target, paths: &[PathBuf]) -> Result<Outcome, Error> {
    let what = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let read = |source| Error::Read {
        what: what.clone(),
        source,
    };

    // Pass 1: verify the whole series, compare it with the store and plan the inserts.
    let series = chain::series(paths).map_err(read)?;
    let mut verifier = StreamVerifier::new(chain::read_anchor(&series).map_err(read)?);
    let mut held = None;
    let mut plan = Vec::new();
    let mut filling = Filling::new(false);
    let mut o = Outcome {
        target: target.clone(),
        files: series.files.clone(),
        records: 0,
        first_seq: 0,
        last_seq: 0,
        present: 0,
        inserted: 0,
        inserted_ranges: Vec::new(),
        differing: 0,
        differing_seqs: Vec::new(),
    };
    let mut missing = Ranges::default();
    for line in chain::lines(&series) {
        let bytes = match line.map_err(read)? {
            Line::File(path) => {
                verifier.file(&path);
                continue;
            }
            Line::Partial => {
                verifier.partial();
                continue;
            }
            Line::Complete(bytes) => bytes,
        };
        let Some(record) = verifier.line(&bytes) else {
            continue;
        };
        let found = &record.value["metadata"]["log_name"];
        if found.as_str() != Some(target.log.as_str()) {
            return Err(Error::WrongLog {
                log: what,
                seq: record.seq,
                found: found.to_string(),
                wanted: target.log.as_str(),
            });
        }
        if o.records == 0 {
            o.first_seq = record.seq;
        }
        o.records += 1;
        o.last_seq = record.seq;
        let held = held.get_or_insert_with(|| {
            store
                .held(&target.host, target.log, &target.name, record.seq)
                .peekable()
        });
        // The store's copies of this seq (an error ends the loop too, and is returned).
        let mut copies = Vec::new();
        let up_to_this =
            |r: &Result<(u64, Hash), _>| r.as_ref().map_or(true, |(s, _)| *s <= record.seq);
        while let Some(row) = held.next_if(up_to_this) {
            let (seq, hash) = row.map_err(Error::Store)?;
            if seq == record.seq {
                copies.push(hash);
            }
        }
        if copies.is_empty() {
            missing.add(record.seq);
            filling.push(target, &bytes);
            if filling.rows >= BATCH_ROWS || filling.bytes >= BATCH_BYTES {
                plan.push(std::mem::replace(&mut filling, Filling::new(false)).finish(record.seq));
            }
        } else if copies.contains(&Hash::of(&bytes)) {
            o.present += 1;
        } else {
            o.differing += 1;
            if o.differing_seqs.len() < LISTED {
                o.differing_seqs.push(record.seq);
            }
        }
    }
    if let Some(&(_, last)) = missing.0.last().filter(|_| filling.rows > 0) {
        plan.push(filling.finish(last));
    }
    let report = verifier.finish();
    if let Some(p) = report.problems.first() {
        return Err(Error::Broken {
            log: what,
            problems: report.problems.len(),
            first: report.describe(p),
        });
    }
    o.inserted_ranges = missing.0.iter().take(LISTED).copied().collect();
    let to_insert: u64 = plan.iter().map(|b| b.rows).sum();
    if plan.is_empty() {
        return Ok(o);
    }

    // Pass 2: read the missing lines again and send each batch that is as planned.
    let changed = |inserted| Error::Changed {
        log: what.clone(),
        inserted,
        missing: to_insert,
    };
    let series = chain::series(paths).map_err(read)?;
    // Here the verifier only parses: each batch's digest is what says the lines are those
    // verified (a rotation since is picked up by the new listing of the series).
    let mut verifier = StreamVerifier::new(None);
    let mut batches = plan.iter();
    let mut batch = batches.next();
    let mut ranges = missing.0.iter().peekable();
    let mut filling = Filling::new(true);
    for line in chain::lines(&series) {
        let Some(want) = batch else { break };
        let Line::Complete(bytes) = line.map_err(read)? else {
            continue;
        };
        let Some(record) = verifier.line(&bytes) else {
            return Err(changed(o.inserted));
        };
        // Only the missing records: skip the ranges behind, then is it in the next one?
        while ranges.next_if(|&&(_, last)| last < record.seq).is_some() {}
        if ranges.peek().is_none_or(|&&(first, _)| first > record.seq) {
            continue;
        }
        filling.push(target, &bytes);
        if record.seq < want.last_seq {
            continue;
        }
        let mut done = std::mem::replace(&mut filling, Filling::new(true));
        let body = std::mem::take(&mut done.body);
        if done.finish(record.seq) != *want {
            return Err(changed(o.inserted));
        }
        store.insert(&body).map_err(|source| Error::Insert {
            inserted: o.inserted,
            missing: to_insert,
            source,
        })?;
        o.inserted += want.rows;
        batch = batches.next();
    }
    if batch.is_some() {
        return Err(changed(o.inserted));
    }
    Ok(o)
}

/// Sorted, disjoint `seq` ranges, added to in increasing order.
#[derive(Debug, Default)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn add(&mut self, seq: u64) {
        match self.0.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => self.0.push((seq, seq)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            host: "agent-1".into(),
            log: LogName::Kernel,
            name: String::new(),
        }
    }

    #[test]
    fn missing_seqs_become_ranges() {
        let mut r = Ranges::default();
        for seq in [3, 4, 5, 9, 11, 12] {
            r.add(seq);
        }
        assert_eq!(r.0, vec![(3, 5), (9, 9), (11, 12)]);
    }

    #[test]
    fn a_batch_planned_from_its_digest_is_the_batch_sent() {
        let lines: [&[u8]; 2] = [
            br#"{"a":"tab\t \"q\" \u00e9 \\"}"#,
            "{\"b\":\"é🦀\"}".as_bytes(),
        ];
        let (mut planned, mut sent) = (Filling::new(false), Filling::new(true));
        for line in lines {
            planned.push(&target(), line);
            sent.push(&target(), line);
        }
        assert!(planned.body.is_empty(), "the first pass keeps no rows");
        assert_eq!(planned.bytes, sent.body.len());
        // The rows are what a shipper sends: the line unchanged in `line`.
        let rows: Vec<serde_json::Value> = sent
            .body
            .split(|b| *b == b'\n')
            .filter(|r| !r.is_empty())
            .map(|r| serde_json::from_slice(r).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["line"].as_str().unwrap().as_bytes(), lines[0]);
        assert_eq!(
            (&rows[1]["host"], &rows[1]["log"], &rows[1]["name"]),
            (&"agent-1".into(), &"kernel".into(), &"".into())
        );
        assert_eq!(rows[1]["line"].as_str().unwrap().as_bytes(), lines[1]);
        let body = sent.body.clone();
        assert_eq!(planned.finish(7), sent.finish(7));
        // Another line in the batch is another batch.
        let mut other = Filling::new(true);
        other.push(&target(), lines[0]);
        other.push(&target(), b"{\"b\":\"e\"}");
        assert_ne!(other.body, body);
    }

    #[test]
    fn the_report_says_what_was_inserted_and_what_differs() {
        let store = Store::new("http://127.0.0.1:8123".parse().unwrap(), "tank.audit").unwrap();
        let o = Outcome {
            target: target(),
            files: vec!["a".into(), "b".into()],
            records: 30,
            first_seq: 1,
            last_seq: 30,
            present: 18,
            inserted: 11,
            inserted_ranges: vec![(11, 20), (25, 25)],
            differing: 1,
            differing_seqs: vec![7],
        };
        assert_eq!(
            render(&store, &o),
            "backfill host=agent-1 log=kernel: 30 records in 2 file(s), seq 1..=30, intact; \
             tank.audit at http://127.0.0.1:8123 held 18, inserted 11 (seq 11..=20, 25)\n\
             backfill host=agent-1 log=kernel: 1 record(s) in the store differ from the files \
             (seq 7): left as they are; run `tank-loader audit verify --clickhouse URL --host \
             agent-1`\n"
        );
    }
}
