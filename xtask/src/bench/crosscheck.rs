//! `cargo xtask bench crosscheck`: `tank-loader audit cross-check` over a synthetic fleet, on
//! one core. No root needed.
//!
//! `tank-loader/examples/fleet_logs.rs` writes the fleet with the real chain writer (1,000
//! agent hosts, 2 proxies; see its docs for the interleaving, clock skew and the
//! discrepancies it plants) at three sizes, [`FLEETS`]: 1M records (250 s of the fleet's
//! time: past the matching window's fill, 65 s, but not past every one-off growth of the
//! first ten minutes; see docs/benchmarks.md), 3M (750 s) and 10M (2,500 s). Each round
//! runs the release cross-check once on each size (the order rotating), pinned to one CPU
//! with `taskset`, and takes: records/s (every line of every log, by wall time and by the
//! CPU time the process used) and its peak resident memory (`ru_maxrss` from `wait4`: the
//! process's VmHWM when it exited). Every run's report must find exactly what was planted,
//! or the bench fails: a fast wrong answer is no figure. Goals: >= 1,000,000 records/s, and
//! peak memory that does not grow with the record count (each size's against the
//! smallest's; 3M and 10M are both past those first minutes).
//!
//! Beside it, each round times two floors of the work per line over the small fleet, on the
//! same CPU (`tank-loader/examples/line_floors.rs`, release): SHA-256 of every line (the
//! cross-check verifies every chain as it reads, each line hashed once), and that plus
//! serde_json reading every line while keeping nothing (`IgnoredAny`: the least a serde_json
//! reader does, whatever fields it then takes). Their rates are ceilings no cross-check of
//! these records, verifying them as it reads, can pass on this core.
//!
//! The logs take about 1 KB a record: the bench checks the free space first and scales the
//! largest fleet down (and says so in its report) when the disk is short, and removes them
//! after.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::proxy::{build_release_of, loadavg, round, spread};
use super::uptime;

const HOSTS: u64 = 1000;
const PROXIES: u64 = 2;
/// The fleets, by name and records.
const FLEETS: [(&str, u64); 3] = [
    ("small", 1_000_000),
    ("medium", 3_000_000),
    ("large", 10_000_000),
];
const ROUNDS: usize = 3;
/// Disk per record written, with room to spare (measured: about 940 bytes).
const BYTES_PER_RECORD: u64 = 1100;

/// Runs the benchmark; returns its figures.
pub fn run() -> Result<Value> {
    let load_start = loadavg();
    let uptime_start = uptime();
    let generator = build_release_of("tank-loader", &["--example", "fleet_logs"], "fleet_logs")?;
    let loader = build_release_of("tank-loader", &["--bin", "tank-loader"], "tank-loader")?;
    let floors = build_release_of("tank-loader", &["--example", "line_floors"], "line_floors")?;
    let dir = tempfile::Builder::new()
        .prefix("tank-bench-crosscheck")
        .tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into()))?;
    let free = free_bytes(dir.path())?;
    // All three fleets stay on disk for the interleaved rounds; keep a quarter of the disk free.
    let room = (free / 4 * 3) / BYTES_PER_RECORD;
    let [(_, small), (_, medium), (_, wanted)] = FLEETS;
    let large = wanted.min(room.saturating_sub(small + medium));
    if large < 2 * medium {
        bail!(
            "{} free in {}: too little for the fleets (about {} GB)",
            free / 1_000_000_000,
            dir.path().display(),
            (small + medium + wanted) * BYTES_PER_RECORD / 1_000_000_000
        );
    }
    if large < wanted {
        eprintln!(
            "bench: only {} GB free: the large fleet is scaled down to {large} records",
            free / 1_000_000_000
        );
    }
    let cpu = last_cpu();
    let mut fleets = Vec::new();
    for (name, records) in [FLEETS[0], FLEETS[1], ("large", large)] {
        let out = dir.path().join(name);
        eprintln!(
            "bench: writing the {name} fleet ({records} records, {HOSTS} hosts, {PROXIES} proxies)"
        );
        let started = Instant::now();
        let made = Command::new(&generator)
            .arg(&out)
            .args([records.to_string(), HOSTS.to_string(), PROXIES.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("run fleet_logs")?;
        if !made.status.success() {
            bail!("fleet_logs failed");
        }
        let fleet: Value = serde_json::from_slice(&made.stdout).context("fleet_logs' summary")?;
        eprintln!("bench: written in {:.0} s", started.elapsed().as_secs_f64());
        fleets.push((name, fleet));
    }
    let mut samples: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); fleets.len()];
    let (mut hash_rates, mut read_rates, mut mean_line) = (Vec::new(), Vec::new(), 0.0);
    for r in 0..ROUNDS {
        let (hash, read, line_bytes) = ceilings(&floors, &fleets[0].1, cpu)?;
        mean_line = line_bytes;
        eprintln!(
            "bench: round {}: SHA-256 of every line alone {hash:.0} records/s, with serde_json reading it {read:.0}",
            r + 1
        );
        hash_rates.push(hash);
        read_rates.push(read);
        // Each size first, middle and last once over the rounds.
        let order = (0..fleets.len()).map(|k| (k + r) % fleets.len());
        for i in order {
            let (name, fleet) = &fleets[i];
            let s = cross_check(&loader, fleet, cpu, &dir.path().join("report.json"))?;
            eprintln!(
                "bench: round {} {name}: {:.0} records/s (wall), {:.0} records/s (cpu), peak {:.1} MiB",
                r + 1,
                s.0,
                s.1,
                s.2
            );
            samples[i].push(s);
        }
    }
    let mut result = json!({
        "machine": {
            "load_start": load_start,
            "load_end": loadavg(),
            "uptime_start": uptime_start,
            "uptime_end": uptime(),
            "cpu": cpu,
        },
        "hosts": HOSTS,
        "proxies": PROXIES,
        "rounds": ROUNDS,
        "goal_records_per_s": 1_000_000,
        "scaled_down": large < wanted,
        "sha256_alone_records_per_s": spread(&hash_rates),
        "sha256_and_json_read_records_per_s": spread(&read_rates),
        "small_fleet_mean_line_bytes": round(mean_line, 0),
    });
    for ((name, fleet), s) in fleets.iter().zip(&samples) {
        let bytes: u64 = fleet["bytes"].as_u64().unwrap_or(0);
        result[*name] = json!({
            "records": fleet["records"],
            "log_bytes": bytes,
            "records_per_s_wall": spread(&s.iter().map(|x| x.0).collect::<Vec<_>>()),
            "records_per_s_cpu": spread(&s.iter().map(|x| x.1).collect::<Vec<_>>()),
            "peak_rss_mib": spread(&s.iter().map(|x| x.2).collect::<Vec<_>>()),
        });
    }
    let peak = |i: usize| {
        let mut v: Vec<f64> = samples[i].iter().map(|x| x.2).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, (name, _)) in fleets.iter().enumerate().skip(1) {
        result[format!("peak_rss_{name}_over_small")] = json!(round(peak(i) / peak(0), 3));
    }
    print_table(&result);
    Ok(result)
}

/// One cross-check of `fleet` on `cpu`: (records/s by wall time, records/s by CPU time, peak
/// RSS MiB), after checking that its report finds exactly what was planted.
fn cross_check(loader: &Path, fleet: &Value, cpu: usize, report: &Path) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()])
        .arg(loader)
        .args(["audit", "cross-check", "--json"]);
    for (flag, logs) in [("--kernel", "kernel_logs"), ("--proxy", "proxy_logs")] {
        for log in fleet[logs].as_array().context("log list")? {
            cmd.arg(flag).arg(log.as_str().context("a path")?);
        }
    }
    let out = std::fs::File::create(report)?;
    let started = Instant::now();
    let child = cmd
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .context("run taskset tank-loader audit cross-check")?;
    let (status, usage) = wait4(child.id())?;
    let wall = started.elapsed().as_secs_f64();
    // Exit 1: discrepancies, which the fleet has by design.
    if status != 1 {
        bail!("audit cross-check exited {status}, not 1 (discrepancies)");
    }
    let r: Value = serde_json::from_slice(&std::fs::read(report)?).context("the report")?;
    let s = &r["summary"];
    let planted = &fleet["planted"];
    for (found, want) in [
        (&s["kernel_unmatched"], &planted["kernel_unmatched"]),
        (&s["proxy_unmatched"], &planted["proxy_unmatched"]),
        (&s["unattributed"], &planted["unattributed"]),
        (&s["tampered_logs"], &json!(0)),
        (&s["hosts"], &json!(HOSTS)),
    ] {
        if found != want {
            bail!("the cross-check found {s} where the fleet planted {planted}");
        }
    }
    let records = fleet["records"].as_f64().context("records")?;
    let cpu_secs = usage.0;
    Ok((records / wall, records / cpu_secs, usage.1 as f64 / 1024.0))
}

/// The per-line floors over `fleet`'s logs on `cpu` (`line_floors`, release): records/s of
/// SHA-256 alone, and of SHA-256 plus serde_json reading each line into nothing; and the
/// lines' mean size.
fn ceilings(floors: &Path, fleet: &Value, cpu: usize) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()]).arg(floors);
    for logs in ["kernel_logs", "proxy_logs"] {
        for log in fleet[logs].as_array().context("log list")? {
            cmd.arg(log.as_str().context("a path")?);
        }
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("run taskset line_floors")?;
    if !out.status.success() {
        bail!("line_floors failed");
    }
    let f: Value = serde_json::from_slice(&out.stdout).context("line_floors' output")?;
    let records = fleet["records"].as_u64().context("records")?;
    if f["lines"].as_u64().unwrap_or(0) < records {
        bail!(
            "line_floors read {} lines of the fleet's {records} records",
            f["lines"]
        );
    }
    let rate = |k: &str| f[k].as_f64().with_context(|| format!("line_floors' {k}"));
    Ok((
        rate("sha256_records_per_s")?,
        rate("sha256_and_read_records_per_s")?,
        rate("mean_line_bytes")?,
    ))
}

/// Waits for `pid`: its exit code, and (user + system CPU seconds, peak RSS KiB).
fn wait4(pid: u32) -> Result<(i32, (f64, i64))> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both out-pointers are valid.
    let got = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if got != pid as i32 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((
        code,
        (secs(usage.ru_utime) + secs(usage.ru_stime), usage.ru_maxrss),
    ))
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs fills the struct for a NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(s.f_bavail * s.f_frsize)
}

/// The highest-numbered CPU this process may run on.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

fn print_table(r: &Value) {
    println!();
    println!(
        "audit cross-check, {} hosts, {} proxies, one core, {} rounds (load {} -> {})",
        r["hosts"], r["proxies"], r["rounds"], r["machine"]["load_start"], r["machine"]["load_end"]
    );
    println!(
        "{:<8} {:>12} {:>28} {:>28} {:>22}",
        "fleet", "records", "records/s wall (goal 1M)", "records/s cpu", "peak RSS MiB"
    );
    let cell = |v: &Value| format!("{} [{}-{}]", v["median"], v["min"], v["max"]);
    for (name, _) in FLEETS {
        let f = &r[name];
        println!(
            "{name:<8} {:>12} {:>28} {:>28} {:>22}",
            f["records"],
            cell(&f["records_per_s_wall"]),
            cell(&f["records_per_s_cpu"]),
            cell(&f["peak_rss_mib"])
        );
    }
    println!(
        "peak RSS medium/small: {}, large/small: {} (goal: not growing with the records, ~1.0)",
        r["peak_rss_medium_over_small"], r["peak_rss_large_over_small"]
    );
    println!(
        "ceilings, small fleet, records/s: SHA-256 of every line alone {}; with serde_json reading each {}",
        cell(&r["sha256_alone_records_per_s"]),
        cell(&r["sha256_and_json_read_records_per_s"])
    );
}
