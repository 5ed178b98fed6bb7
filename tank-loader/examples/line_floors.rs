//! `cargo xtask bench crosscheck`'s floors: the least work per line any cross-check that
//! verifies the chains as it reads must do, timed over the logs it is given.
//!
//! `line_floors LOG...` reads each log's series (rotated segments, then the active file)
//! with the chain's own reader, whole, before the clock starts, and times two passes over
//! its lines: the chain's hash of each line (`Hash::of`, SHA-256: each line is hashed once to
//! verify the chain), and serde_json reading each line into nothing (`IgnoredAny`: the least a
//! serde_json reader does, whatever fields it then keeps). It prints one JSON object: the
//! lines, their mean size, and the records/s of the hash alone and of both together.

use std::path::PathBuf;
use std::time::Instant;

use serde::de::IgnoredAny;
use serde_json::json;
use tank_ebpf_common::chain::{self, series, Hash, Line};

fn main() {
    let logs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    assert!(!logs.is_empty(), "usage: line_floors LOG...");
    let (mut lines, mut bytes_read, mut hash_secs, mut read_secs) = (0u64, 0usize, 0.0, 0.0);
    for log in &logs {
        let listed = series(std::slice::from_ref(log))
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", log.display()));
        let each: Vec<Vec<u8>> = chain::lines(&listed)
            .filter_map(|l| match l {
                Ok(Line::Complete(line)) => Some(line),
                Ok(Line::File(_)) => None,
                Ok(Line::Partial) => panic!("a partial line in {}", log.display()),
                Err(e) => panic!("cannot read {}: {e}", log.display()),
            })
            .collect();
        lines += each.len() as u64;
        bytes_read += each.iter().map(|l| l.len() + 1).sum::<usize>();
        let started = Instant::now();
        for line in &each {
            std::hint::black_box(Hash::of(line));
        }
        hash_secs += started.elapsed().as_secs_f64();
        let started = Instant::now();
        for line in &each {
            serde_json::from_slice::<IgnoredAny>(line)
                .unwrap_or_else(|e| panic!("a line of {} is not JSON: {e}", log.display()));
        }
        read_secs += started.elapsed().as_secs_f64();
    }
    let n = lines as f64;
    println!(
        "{}",
        json!({
            "lines": lines,
            "mean_line_bytes": bytes_read as f64 / n,
            "sha256_records_per_s": n / hash_secs,
            "sha256_and_read_records_per_s": n / (hash_secs + read_secs),
        })
    );
}
