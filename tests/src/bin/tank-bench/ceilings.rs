//! What bounds the drain on this machine, measured in the same run as the drain itself: the
//! durable write bandwidth of the filesystem the audit log is on, and SHA-256 over the log's
//! own lines on one core (the chain hashes every line once). Each, divided by the bytes of a
//! drained record, is a rate in events/s no drain of these records can pass here, however it
//! is written.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tank_ebpf_common::chain::{lines, series, Hash, Line, Series};

/// The drain's pattern: it syncs once per batch of up to 65,536 events (~64 MiB of denied
/// records), from a buffered writer.
const WRITE_BYTES: usize = 1 << 20;
const SYNC_EVERY: usize = 64 << 20;
/// Bytes the disk figure writes: about what one drain round writes.
const DISK_BYTES: usize = 1 << 30;
/// Hashing repeats over the sample for at least this long.
const HASH_SECS: f64 = 1.0;

/// Durable write bandwidth in `dir`, bytes/s: [`DISK_BYTES`] written in 1 MiB writes with an
/// `fdatasync` every 64 MiB and at the end, to a file removed afterwards.
pub fn disk_bytes_per_s(dir: &Path) -> f64 {
    let mut file = tempfile::tempfile_in(dir).expect("scratch file beside the audit log");
    // Not zeros: nothing on the way (a filesystem, a virtual disk) may compress it away.
    let chunk: Vec<u8> = (0..WRITE_BYTES).map(|i| (i * 131 % 251) as u8).collect();
    let start = Instant::now();
    for written in (WRITE_BYTES..=DISK_BYTES).step_by(WRITE_BYTES) {
        file.write_all(&chunk).expect("write scratch file");
        if written % SYNC_EVERY == 0 {
            file.sync_data().expect("fdatasync scratch file");
        }
    }
    file.sync_data().expect("fdatasync scratch file");
    DISK_BYTES as f64 / start.elapsed().as_secs_f64()
}

/// The drained records' mean size and SHA-256's rate over them on this core, from the newest
/// rotated segment of `log` (64 MiB of the drained records).
pub fn records(log: &Path) -> (f64, f64) {
    let lines = newest_segment(log);
    assert!(
        lines.len() > 1000,
        "too few drained records beside {}",
        log.display()
    );
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let (mut hashed, start) = (0usize, Instant::now());
    while start.elapsed() < Duration::from_secs_f64(HASH_SECS) {
        for line in &lines {
            std::hint::black_box(Hash::of(line));
        }
        hashed += bytes;
    }
    (
        bytes as f64 / lines.len() as f64,
        hashed as f64 / start.elapsed().as_secs_f64(),
    )
}

/// The lines of the newest rotated segment of `log` (the chain's own reader, which
/// decompresses a `.zst`). Its background compression may remove the plain file between
/// listing and reading: then listed again (bounded).
fn newest_segment(log: &Path) -> Vec<Vec<u8>> {
    for _ in 0..5 {
        let listed = series(&[log.to_path_buf()]).expect("list the log's segments");
        let Some(newest) = listed.files.iter().rev().nth(1) else {
            panic!("the drain rotated no segment beside {}", log.display());
        };
        let segment = Series {
            files: vec![newest.clone()],
            anchor: None,
        };
        let Ok(read) = lines(&segment).collect::<std::io::Result<Vec<Line>>>() else {
            continue;
        };
        return read
            .into_iter()
            .filter_map(|l| match l {
                Line::Complete(line) => Some(line),
                Line::File(_) => None,
                Line::Partial => panic!("a partial line in {}", newest.display()),
            })
            .collect();
    }
    panic!("the newest segment beside {} kept vanishing", log.display());
}

/// The figures, with each bandwidth as events/s of `record_bytes` records.
pub fn figures(record_bytes: f64, disk: f64, hash: f64, drain_events_per_s: f64) -> Value {
    json!({
        "record_bytes": record_bytes,
        "drain_bytes_per_s": drain_events_per_s * record_bytes,
        "disk_bytes_per_s": disk,
        "disk_events_per_s": disk / record_bytes,
        "sha256_bytes_per_s": hash,
        "sha256_events_per_s": hash / record_bytes,
    })
}
