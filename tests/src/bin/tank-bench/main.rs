//! `tank-bench`: the kernel benchmarks behind `cargo xtask bench kernel` (root only).
//!
//! Every ratio is measured side by side in one run: rounds of the baseline and of the guarded
//! case alternate (in a rotating order, so neither always runs first), so drift on the machine
//! hits both alike. Each round yields its own ratio; the figure reported is the median of the
//! per-round ratios with their spread (quartiles, min, max), next to an A/A control (unconfined
//! against unconfined, from a second ungated cgroup) that shows how far two identical cases
//! drift apart on this machine. A ratio inside the control's spread cannot be told from 1.
//!
//! On a machine with two or more CPUs the workers run on the last CPU and everything else
//! (the loaders that drain the ring buffer, this process' listener) on the others, so the
//! loader's work competes with the measured system calls only through the kernel, as it would
//! on a host where the agent does not saturate every core. The load average before and after
//! is recorded with the figures.
//!
//! Workers are this same binary re-executed inside a cgroup (`tank-bench worker ...`), so the
//! code path measured is a real process making real system calls under the real gate.
//!
//! Usage: tank-bench OUT.json [--scrape-metrics]

mod ceilings;
mod null_gate;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tank_integration_tests::prometheus::{free_port, http_get};
use tank_integration_tests::{bpf_fd, counter, Loader, TestCgroups};

/// Interleaved rounds of the connect-latency cases (odd, for a plain median).
const LATENCY_ROUNDS: usize = 31;
/// About a second of connects: a round this long spans several of the loader's 250 ms ticks
/// (drain and sync on the other CPU), so whether one falls inside it hardly moves its p50.
const CONNECTS_PER_ROUND: usize = 20_000;
/// Interleaved rounds of the throughput cases.
const THROUGHPUT_ROUNDS: usize = 15;
const THROUGHPUT_SECS: f64 = 0.5;
/// Denied attempts per flood worker: two workers make 1,000,000 events, which the bench's
/// 128 MiB ring buffer holds (about 1.19 million of 112 bytes) while the drain is stopped.
const FLOOD_PER_WORKER: u64 = 500_000;
/// The guarded cases' ring buffer: 128 MiB.
const RING_BYTES: u64 = 128 << 20;
const COLD_STARTS: usize = 5;
const MAP_ENTRIES: usize = 10_000;
const DRAIN_ROUNDS: usize = 3;
/// Rounds of the per-program cost phase (kernel BPF statistics on), apart from the ratios.
const STATS_ROUNDS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        worker(&args[1..]);
        return;
    }
    let out = args
        .first()
        .expect("usage: tank-bench OUT.json [--scrape-metrics]");
    let scrape = args.iter().any(|a| a == "--scrape-metrics");
    let figures = bench(scrape);
    std::fs::write(out, serde_json::to_vec_pretty(&figures).unwrap()).expect("write results");
    print_table(&figures);
}

fn bench(scrape: bool) -> Value {
    let load_before = load_average();
    let placement = Placement::new();
    placement.pin_self();
    let listener = Listener::start();
    let proxy = format!("proxies = [\"{}\"]", listener.addr);
    let gate1 = TestCgroups::new();
    let metrics: Option<SocketAddr> =
        scrape.then(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let metrics_listen = metrics.map_or(String::new(), |a| format!("metrics_listen = \"{a}\"\n"));
    let gate1_loader = Loader::start(
        &gate1,
        &format!("{proxy}\n{metrics_listen}ring_buffer_bytes = {RING_BYTES}"),
    );
    let gate10k = TestCgroups::new();
    // The same ring as gate1, so the two differ only in the allow map: with the default
    // 1 MiB ring a round of 20,000 connects (two events each) fills it faster than the loader
    // wakes, and the gate then refuses, as it must (nothing allowed goes unrecorded).
    let gate10k_loader = Loader::start(
        &gate10k,
        &format!(
            "{proxy}\nring_buffer_bytes = {RING_BYTES}\n{}",
            many_entries(MAP_ENTRIES)
        ),
    );
    for loader in [&gate1_loader, &gate10k_loader] {
        placement.pin_loader(loader.pid());
    }
    // Two ungated cgroups: the baseline, and a second one for the A/A control.
    let (base, base_b) = (&gate1.sibling, &gate10k.sibling);
    // The same hooks with programs that do nothing: what any gate on them costs.
    let null = TestCgroups::new();
    let _null_gate = null_gate::NullGate::attach(&null.agent);

    // connect()+close latency: unconfined vs allowed-and-recorded vs 10k-entry allow map vs
    // null hooks.
    let args = [
        "connect".to_owned(),
        listener.addr.to_string(),
        CONNECTS_PER_ROUND.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p50 = |cgroup: &Path| {
        run_worker(&placement, cgroup, &args)["p50_ns"]
            .as_f64()
            .unwrap()
    };
    let latency = interleaved(
        LATENCY_ROUNDS,
        &[
            base.as_path(),
            base_b,
            &gate1.agent,
            &gate10k.agent,
            &null.agent,
        ],
        p50,
    );
    eprintln!(
        "bench: connect+close p50 ratio, gate / unconfined: {}; control: {}",
        ratio_spread(&latency[2], &latency[0]),
        ratio_spread(&latency[1], &latency[0])
    );

    // Bulk throughput of one allowed connection vs unconfined.
    let send = [
        "send".to_owned(),
        listener.addr.to_string(),
        THROUGHPUT_SECS.to_string(),
    ];
    let send: Vec<&str> = send.iter().map(String::as_str).collect();
    let rate = |cgroup: &Path| {
        run_worker(&placement, cgroup, &send)["bytes_per_s"]
            .as_f64()
            .unwrap()
    };
    let throughput = interleaved(
        THROUGHPUT_ROUNDS,
        &[base.as_path(), base_b, &gate1.agent],
        rate,
    );
    eprintln!(
        "bench: throughput ratio, gate / unconfined: {}; control: {}",
        ratio_spread(&throughput[2], &throughput[0]),
        ratio_spread(&throughput[1], &throughput[0])
    );

    // Where the gate's time goes: each program's own run time, from the kernel's BPF
    // statistics, over connect rounds and a bulk send in the gated cgroup alone. Apart from
    // the rounds above, because the statistics add two clock reads to every program run.
    let programs = {
        let stats = BpfStats::enable();
        let before = stats.read(&gate1_loader.pin_dir);
        for _ in 0..STATS_ROUNDS {
            run_worker(&placement, &gate1.agent, &args);
        }
        let connect = stats.read(&gate1_loader.pin_dir);
        run_worker(&placement, &gate1.agent, &send);
        let bulk = stats.read(&gate1_loader.pin_dir);
        let connects = (STATS_ROUNDS * CONNECTS_PER_ROUND) as f64;
        program_costs(&before, &connect, &bulk, connects)
    };

    // Cold start: a fresh loader (nothing pinned) until it reports enforcement in place.
    // Before the flood: the drain below leaves about 1 GB of rotated log segments to compress
    // in the background, on the CPU these loaders start on (the quiet run of 2026-12-01,
    // started after it, saw 166 ms falling to 106 ms over five starts).
    let cold_cg = TestCgroups::new();
    let mut cold = Vec::new();
    for _ in 0..COLD_STARTS {
        let t = Instant::now();
        let loader = Loader::start(&cold_cg, &proxy);
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        drop(loader);
    }

    // The disk's durable write bandwidth where the log is, before the flood leaves its
    // segments to compress in the background.
    let log_dir = gate1_loader
        .audit_log
        .parent()
        .expect("audit log directory");
    let disk = ceilings::disk_bytes_per_s(log_dir);

    // Denied attempts flood an unlisted port on loopback with the drain stopped, then the
    // drain is timed from a full ring (`denied_flood`): no ring to hide a slow drain.
    let denied_target = listener.other_addr.to_string();
    let flood = denied_flood(&gate1_loader, &gate1, &denied_target, None);
    let (record_bytes, hash) = ceilings::records(&gate1_loader.audit_log);
    // With --scrape-metrics: the same, in rounds alternating between unscraped and scraped
    // every second during the drain, so the scrape's cost is seen against the drain's spread.
    let scraped = metrics.map(|addr| {
        let (mut plain, mut scraped, mut scrapes) = (Vec::new(), Vec::new(), 0);
        for _ in 0..DRAIN_ROUNDS {
            plain.push(denied_flood(&gate1_loader, &gate1, &denied_target, None).drain_rate());
            let f = denied_flood(&gate1_loader, &gate1, &denied_target, Some(addr));
            scraped.push(f.drain_rate());
            scrapes += f.scrapes;
        }
        json!({ "unscraped": spread(&mut plain), "scraped_every_1s": spread(&mut scraped), "scrapes": scrapes })
    });

    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    json!({
        "machine": {
            "cpus": placement.cpus,
            "kernel": kernel_release(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "workers_on_cpu": placement.worker_cpu,
        },
        "connect_close_p50_ns": {
            "unconfined": median(&latency[0]),
            "unconfined_control": median(&latency[1]),
            "gate_allowed_recorded": median(&latency[2]),
            "gate_10k_entries": median(&latency[3]),
            "null_hooks": median(&latency[4]),
        },
        "connect_ratio_control_vs_unconfined": ratio_spread(&latency[1], &latency[0]),
        "connect_ratio_gate_vs_unconfined": ratio_spread(&latency[2], &latency[0]),
        "connect_ratio_10k_vs_1_entry": ratio_spread(&latency[3], &latency[2]),
        "connect_ratio_null_hooks_vs_unconfined": ratio_spread(&latency[4], &latency[0]),
        "connect_ratio_gate_vs_null_hooks": ratio_spread(&latency[2], &latency[4]),
        "throughput_bytes_per_s": {
            "unconfined": median(&throughput[0]),
            "unconfined_control": median(&throughput[1]),
            "gate_allowed": median(&throughput[2]),
        },
        "throughput_ratio_control_vs_unconfined": ratio_spread(&throughput[1], &throughput[0]),
        "throughput_ratio_gate_vs_unconfined": ratio_spread(&throughput[2], &throughput[0]),
        "denied_flood": {
            "attempts": flood.attempts, "eperm": flood.eperm, "seconds": flood.worker_secs,
            "attempts_per_s": flood.attempts as f64 / flood.worker_secs,
            "recorded_in_kernel": flood.recorded, "unrecorded_counted": flood.unrecorded,
            "unaccounted": flood.attempts as i64 - flood.recorded as i64 - flood.unrecorded as i64,
            "written_to_audit_log": flood.logged,
            "drain_seconds": flood.drain_secs,
            "drain_events_per_s": flood.drain_rate(),
        },
        "drain_ceilings": ceilings::figures(record_bytes, disk, hash, flood.drain_rate()),
        "drain_events_per_s_scraped": scraped,
        "programs": programs,
        "cold_start_ms": { "median": med(&mut cold.clone()), "all": cold },
        "latency_rounds": LATENCY_ROUNDS, "connects_per_round": CONNECTS_PER_ROUND,
        "program_stats_connects": STATS_ROUNDS * CONNECTS_PER_ROUND,
        "throughput_rounds": THROUGHPUT_ROUNDS, "throughput_secs_per_round": THROUGHPUT_SECS,
    })
}

/// `rounds` rounds of `measure` over every case, the order rotating by one each round so no
/// case always goes first or last. Returns the samples per case, by round.
fn interleaved(
    rounds: usize,
    cases: &[&Path],
    mut measure: impl FnMut(&Path) -> f64,
) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            let case = (round + k) % cases.len();
            samples[case].push(measure(cases[case]));
        }
    }
    samples
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A ratio measured round by round, from the per-round ratios `a[i] / b[i]` (the same round
/// of both cases): their median, quartiles, min and max, and a 95% confidence interval of the
/// median (distribution-free: the order statistics at ranks n/2 ± 0.98·√n), which says
/// whether a goal such as 1.03x is told apart from the figure or lies inside its uncertainty.
fn ratio_spread(a: &[f64], b: &[f64]) -> Value {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    r.sort_by(f64::total_cmp);
    let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
    let n = r.len() as f64;
    let k = ((n - 1.96 * n.sqrt()) / 2.0).floor().max(0.0) as usize;
    json!({
        "median_ci95": [r[k], r[r.len() - 1 - k]],
        "median": at(0.5),
        "p25": at(0.25),
        "p75": at(0.75),
        "min": r[0],
        "max": r[r.len() - 1],
    })
}

/// Which CPUs the workers and everything else run on.
struct Placement {
    /// The workers' CPU, when there are two or more.
    worker_cpu: Option<usize>,
    cpus: usize,
}

impl Placement {
    fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            worker_cpu: (cpus >= 2).then(|| cpus - 1),
            cpus,
        }
    }

    /// No pinning (the flood measures both cores' worth of attempts).
    fn unpinned() -> Self {
        Self {
            worker_cpu: None,
            cpus: 1,
        }
    }

    /// Every CPU but the workers'.
    fn others(&self) -> Option<Vec<usize>> {
        let worker = self.worker_cpu?;
        Some((0..self.cpus).filter(|&c| c != worker).collect())
    }

    fn pin_self(&self) {
        if let Some(cpus) = self.others() {
            set_affinity(0, &cpus);
        }
    }

    /// Every thread of the loader process `pid`.
    fn pin_loader(&self, pid: u32) {
        let Some(cpus) = self.others() else { return };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("loader threads");
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
                set_affinity(tid, &cpus);
            }
        }
    }
}

fn set_affinity(tid: i32, cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).expect("cpu index");
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .unwrap_or_else(|e| panic!("sched_setaffinity {tid}: {e}"));
}

/// `/proc/loadavg`'s three load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One denied flood and how the drain kept up with it.
struct Flood {
    attempts: u64,
    eperm: u64,
    worker_secs: f64,
    recorded: u64,
    unrecorded: u64,
    logged: u64,
    drain_secs: f64,
    /// Metrics requests answered during the drain.
    scrapes: u64,
}

impl Flood {
    fn drain_rate(&self) -> f64 {
        self.logged as f64 / self.drain_secs
    }
}

/// The drain's sustained rate from a full ring: the loader is stopped (SIGSTOP) while two
/// workers (one per core, so the flood has both) each make [`FLOOD_PER_WORKER`] denied attempts
/// at `target` from the agent cgroup, their events waiting in the ring; then it continues
/// alone and is timed until every recorded event is durable in the chained log (anchor moved).
/// The drain has one core (the loader is single-threaded) and nothing competing; with `scrape`,
/// a scraper fetches its metrics every second meanwhile.
fn denied_flood(
    loader: &Loader,
    cg: &TestCgroups,
    target: &str,
    scrape: Option<SocketAddr>,
) -> Flood {
    let pid = nix::unistd::Pid::from_raw(loader.pid() as i32);
    let before = loader.status();
    let durable_before = durable_records(&loader.audit_log);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            spawn_worker(
                &Placement::unpinned(),
                &cg.agent,
                &["flood", target, &FLOOD_PER_WORKER.to_string()],
            )
        })
        .collect();
    let results: Vec<Value> = workers.into_iter().map(finish_worker).collect();
    let flood_elapsed = start.elapsed().as_secs_f64();
    let attempts: u64 = results
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap())
        .sum();
    let eperm: u64 = results.iter().map(|r| r["eperm"].as_u64().unwrap()).sum();
    let worker_secs = results
        .iter()
        .map(|r| r["elapsed_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    // `status` reads the kernel's counters, not the stopped loader.
    let after = loader.status();
    let delta = |name| counter(&after, name) - counter(&before, name);
    let (recorded, unrecorded) = (delta("denied"), delta("unrecorded_denied"));
    // Started before the loader continues: its first request is answered as the drain begins.
    let scraper = scrape.map(Scraper::start);
    let drain_start = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let mut logged = durable_records(&loader.audit_log);
    while logged - durable_before < recorded && drain_start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
        logged = durable_records(&loader.audit_log);
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let scrapes = scraper.map_or(0, Scraper::stop);
    eprintln!("bench: flood {flood_elapsed:.2}s (drain stopped), drain {drain_secs:.3}s");
    Flood {
        attempts,
        eperm,
        worker_secs,
        recorded,
        unrecorded,
        logged: logged - durable_before,
        drain_secs,
        scrapes,
    }
}

/// Median and range of `v`.
fn spread(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    json!({ "median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1], "all": v })
}

/// A Prometheus-like scraper: `GET /metrics` every second on a thread until stopped.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Scraper {
    fn start(addr: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = http_get(addr, "/metrics").expect("scrape the loader");
                assert!(
                    code == 200 && body.contains("tank_attempts_total"),
                    "scrape: {code}"
                );
                n += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            n
        });
        Self { stop, thread }
    }

    /// Stops it; returns the scrapes made.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("scraper")
    }
}

/// The kernel's BPF run-time statistics, on while this lives (`BPF_ENABLE_STATS`: the
/// kernel turns them off again when the descriptor closes, also if the bench dies).
struct BpfStats {
    _enabled: std::os::fd::OwnedFd,
}

/// One program's counters: (runs, run time in ns).
type ProgramCounters = std::collections::BTreeMap<String, (u64, u64)>;

impl BpfStats {
    fn enable() -> Self {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // The `enable_stats` member of `union bpf_attr`, padded as the kernel reads it.
        let mut attr = [BPF_STATS_RUN_TIME, 0, 0, 0];
        Self {
            _enabled: bpf_fd(BPF_ENABLE_STATS, &mut attr, "BPF_ENABLE_STATS"),
        }
    }

    /// Runs and run time of each program the loader pinned a link of under `pin_dir`, by the
    /// link's name (bpftool reads them).
    fn read(&self, pin_dir: &Path) -> ProgramCounters {
        let bpftool = |args: &[&str]| -> Value {
            let out = Command::new("bpftool")
                .arg("-j")
                .args(args)
                .output()
                .expect("run bpftool");
            assert!(out.status.success(), "bpftool {args:?} failed");
            serde_json::from_slice(&out.stdout).expect("bpftool JSON")
        };
        let mut counters = ProgramCounters::new();
        for link in std::fs::read_dir(pin_dir.join("links"))
            .expect("link pins")
            .flatten()
        {
            let name = link.file_name().to_string_lossy().into_owned();
            let path = link.path();
            let link = bpftool(&["link", "show", "pinned", path.to_str().unwrap()]);
            let id = link["prog_id"].as_u64().expect("prog_id").to_string();
            let prog = bpftool(&["prog", "show", "id", &id]);
            let n = |k: &str| prog[k].as_u64().unwrap_or(0);
            counters.insert(name, (n("run_cnt"), n("run_time_ns")));
        }
        counters
    }
}

/// Per program: runs and ns per connect()+close over `connects` (from `before` to `connect`),
/// runs and ns per run over the bulk send (from `connect` to `bulk`).
fn program_costs(
    before: &ProgramCounters,
    connect: &ProgramCounters,
    bulk: &ProgramCounters,
    connects: f64,
) -> Value {
    let delta = |a: &ProgramCounters, b: &ProgramCounters, name: &str| {
        let (r0, t0) = a.get(name).copied().unwrap_or_default();
        let (r1, t1) = b.get(name).copied().unwrap_or_default();
        (r1.saturating_sub(r0) as f64, t1.saturating_sub(t0) as f64)
    };
    let per_run = |(runs, ns): (f64, f64)| if runs > 0.0 { ns / runs } else { 0.0 };
    let rows: serde_json::Map<String, Value> = connect
        .keys()
        .map(|name| {
            let c = delta(before, connect, name);
            let b = delta(connect, bulk, name);
            let row = json!({
                "connect_runs_per_connect": c.0 / connects,
                "connect_ns_per_connect": c.1 / connects,
                "connect_ns_per_run": per_run(c),
                "bulk_runs": b.0,
                "bulk_ns_per_run": per_run(b),
                "bulk_ns_total": b.1,
            });
            (name.clone(), row)
        })
        .collect();
    Value::Object(rows)
}

fn print_table(f: &Value) {
    // A row without a goal ("-") is a figure to read, not to pass: no verdict.
    let row = |name: &str, value: String, goal: &str, ok: bool| {
        let verdict = match (goal, ok) {
            ("-", _) => "",
            (_, true) => "met",
            (_, false) => "NOT MET",
        };
        println!("{name:<44} {value:>54}   {goal:<10} {verdict}");
    };
    println!(
        "{:<44} {:>54}   {:<10}",
        "kernel benchmark", "measured", "goal"
    );
    let spread = |key: &str| {
        let s = &f[key];
        let v = |k: &str| s[k].as_f64().unwrap();
        let ci = |i: usize| s["median_ci95"][i].as_f64().unwrap();
        (
            v("median"),
            format!(
                "{:.3}x [{:.3} {:.3}] ({:.3}-{:.3}) ci {:.3}-{:.3}",
                v("median"),
                v("p25"),
                v("p75"),
                v("min"),
                v("max"),
                ci(0),
                ci(1)
            ),
        )
    };
    println!(
        "ratios: median of per-round ratios [quartiles] (min-max) ci: the median's 95% interval"
    );
    let (r, text) = spread("connect_ratio_gate_vs_unconfined");
    row(
        "connect+close p50, gate / unconfined",
        text,
        "<= 1.03x",
        r <= 1.03,
    );
    let (_, text) = spread("connect_ratio_control_vs_unconfined");
    row("  control: unconfined / unconfined", text, "-", true);
    let (_, text) = spread("connect_ratio_null_hooks_vs_unconfined");
    row("  floor: null programs on the same hooks", text, "-", true);
    let (_, text) = spread("connect_ratio_gate_vs_null_hooks");
    row("  tank's programs' work: gate / null", text, "-", true);
    let (t, text) = spread("throughput_ratio_gate_vs_unconfined");
    let control = &f["throughput_ratio_control_vs_unconfined"];
    // Unchanged within the spread: no further below 1 than the A/A control's own spread.
    let floor = 1.0 - (control["p75"].as_f64().unwrap() - control["p25"].as_f64().unwrap());
    row(
        "bulk TCP throughput, gate / unconfined",
        text,
        &format!(">= {floor:.3}x"),
        t >= floor,
    );
    let (_, text) = spread("throughput_ratio_control_vs_unconfined");
    row("  control: unconfined / unconfined", text, "-", true);
    println!(
        "load average before / after: {} / {}",
        f["machine"]["load_average_before"].as_str().unwrap_or(""),
        f["machine"]["load_average_after"].as_str().unwrap_or("")
    );
    let d = &f["denied_flood"];
    let rate = d["attempts_per_s"].as_f64().unwrap();
    let unaccounted = d["unaccounted"].as_i64().unwrap();
    row(
        "denied attempts/s recorded (2 workers)",
        format!("{rate:.0}"),
        ">= 500000",
        rate >= 500_000.0 && unaccounted == 0,
    );
    row(
        "  unaccounted attempts",
        unaccounted.to_string(),
        "0",
        unaccounted == 0,
    );
    row(
        "  unrecorded (counted) attempts",
        d["unrecorded_counted"].to_string(),
        "-",
        true,
    );
    let drain = d["drain_events_per_s"].as_f64().unwrap();
    row(
        "  drain, ring buffer -> durable chained log, events/s",
        format!("{drain:.0}"),
        ">= 1000000",
        drain >= 1_000_000.0,
    );
    let c = &f["drain_ceilings"];
    let c = |k: &str| c[k].as_f64().unwrap();
    row(
        "    MB/s written durably, bytes per record",
        format!(
            "{:.0} MB/s, {:.0} B",
            c("drain_bytes_per_s") / 1e6,
            c("record_bytes")
        ),
        "-",
        true,
    );
    row(
        "    ceiling: the disk's durable writes",
        format!(
            "{:.0} MB/s = {:.0}/s",
            c("disk_bytes_per_s") / 1e6,
            c("disk_events_per_s")
        ),
        "-",
        true,
    );
    row(
        "    ceiling: SHA-256 of each line, one core",
        format!(
            "{:.0} MB/s = {:.0}/s",
            c("sha256_bytes_per_s") / 1e6,
            c("sha256_events_per_s")
        ),
        "-",
        true,
    );
    if let Some(s) = f["drain_events_per_s_scraped"].as_object() {
        let (plain, scraped) = (&s["unscraped"], &s["scraped_every_1s"]);
        let median = |v: &Value| v["median"].as_f64().unwrap();
        // Met when the scraped median stays inside the range of the unscraped rounds (or above).
        row(
            "  drain events/s scraped every 1 s, median",
            format!("{:.0}", median(scraped)),
            "within spread",
            median(scraped) >= plain["min"].as_f64().unwrap(),
        );
        row(
            "  drain events/s unscraped, median (min-max)",
            format!(
                "{:.0} ({:.0}-{:.0})",
                median(plain),
                plain["min"].as_f64().unwrap(),
                plain["max"].as_f64().unwrap()
            ),
            "-",
            true,
        );
    }
    let c = f["cold_start_ms"]["median"].as_f64().unwrap();
    row(
        "loader cold start to enforcing, median ms",
        format!("{c:.1}"),
        "<= 200 ms",
        c <= 200.0,
    );
    let (_, text) = spread("connect_ratio_10k_vs_1_entry");
    row("connect p50, 10k allow entries / 1 entry", text, "-", true);
    if let Some(programs) = f["programs"].as_object() {
        println!(
            "per program, kernel BPF statistics ({} connect()+close, then one bulk send):",
            f["program_stats_connects"]
        );
        println!(
            "  {:<22} {:>14} {:>14} {:>12} {:>12} {:>12}",
            "program", "runs/connect", "ns/connect", "ns/run", "bulk runs", "bulk ns/run"
        );
        let (mut total, v) = (0.0, |p: &Value, k: &str| p[k].as_f64().unwrap_or(0.0));
        for (name, p) in programs {
            total += v(p, "connect_ns_per_connect");
            println!(
                "  {name:<22} {:>14.2} {:>14.0} {:>12.0} {:>12.0} {:>12.0}",
                v(p, "connect_runs_per_connect"),
                v(p, "connect_ns_per_connect"),
                v(p, "connect_ns_per_run"),
                v(p, "bulk_runs"),
                v(p, "bulk_ns_per_run"),
            );
        }
        let p50 = f["connect_close_p50_ns"]["unconfined"]
            .as_f64()
            .unwrap_or(0.0);
        println!(
            "  {:<22} {:>14} {:>14.0}   ({:.1}% of the unconfined p50, {p50:.0} ns)",
            "all programs",
            "",
            total,
            100.0 * total / p50.max(1.0)
        );
    }
}

/// A loopback listener that accepts and drains, plus an address nothing listens on.
struct Listener {
    addr: SocketAddr,
    other_addr: SocketAddr,
    _other: TcpListener,
}

impl Listener {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // std listens with a backlog of 128: at 20k connects/s a short stall of the accepting
        // thread overflowed it, and each dropped SYN cost its connect a 1 s retransmit
        // (about one in 270). Listening again on a listening socket sets the new backlog.
        // SAFETY: listen on a live, bound descriptor.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0);
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = vec![0u8; 1 << 16];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        Self {
            addr,
            other_addr: other.local_addr().unwrap(),
            _other: other,
        }
    }
}

/// `[[allow]]` entries in 198.18.0.0/15 (the benchmarking range): map entries only, never
/// contacted.
fn many_entries(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[allow]]\nendpoint = \"198.18.{}.{}:443\"\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect()
}

fn spawn_worker(placement: &Placement, cgroup: &Path, args: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    if let Some(cpu) = placement.worker_cpu {
        cmd.env("TANK_BENCH_CPU", cpu.to_string());
    }
    cmd.arg("worker")
        .arg(cgroup)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

fn finish_worker(child: std::process::Child) -> Value {
    let out = child.wait_with_output().expect("worker");
    assert!(out.status.success(), "worker failed");
    serde_json::from_slice(&out.stdout).expect("worker output")
}

fn run_worker(placement: &Placement, cgroup: &Path, args: &[&str]) -> Value {
    finish_worker(spawn_worker(placement, cgroup, args))
}

/// Records made durable so far: the `seq` of the log's anchor (no need to read the log).
fn durable_records(log: &Path) -> u64 {
    std::fs::read(tank_ebpf_common::chain::anchor_path(log))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|h| h["seq"].as_u64())
        .unwrap_or(0)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Inside the cgroup: `worker CGROUP_DIR connect|send|flood ADDR ARG`.
fn worker(args: &[String]) {
    std::fs::write(
        Path::new(&args[0]).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("join cgroup");
    if let Some(cpu) = std::env::var("TANK_BENCH_CPU")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        set_affinity(0, &[cpu]);
    }
    let addr: SocketAddr = args[2].parse().expect("address");
    let result = match args[1].as_str() {
        "connect" => {
            let n: usize = args[3].parse().unwrap();
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let stream = TcpStream::connect(addr).expect("allowed connect");
                reset_on_close(&stream);
                drop(stream);
                samples.push(t.elapsed().as_nanos() as f64);
            }
            samples.sort_by(f64::total_cmp);
            json!({ "p50_ns": samples[n / 2], "mean_ns": samples.iter().sum::<f64>() / n as f64 })
        }
        "send" => {
            let secs: f64 = args[3].parse().unwrap();
            let mut stream = TcpStream::connect(addr).expect("allowed connect");
            let buf = vec![0x5au8; 1 << 16];
            let (start, mut sent) = (Instant::now(), 0u64);
            while start.elapsed().as_secs_f64() < secs {
                stream.write_all(&buf).unwrap();
                sent += buf.len() as u64;
            }
            json!({ "bytes_per_s": sent as f64 / start.elapsed().as_secs_f64() })
        }
        "flood" => {
            let n: u64 = args[3].parse().unwrap();
            let (attempts, eperm, elapsed) = flood(addr, n);
            json!({ "attempts": attempts, "eperm": eperm, "elapsed_s": elapsed })
        }
        other => panic!("unknown worker {other}"),
    };
    println!("{result}");
}

/// `n` connect() calls on one socket to a denied destination: EPERM leaves the socket unused,
/// so each call is one trip through the gate and nothing else.
fn flood(addr: SocketAddr, n: u64) -> (u64, u64, f64) {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 target expected")
    };
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let (start, mut eperm) = (Instant::now(), 0);
        for _ in 0..n {
            let rc = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            if rc != 0 && *libc::__errno_location() == libc::EPERM {
                eperm += 1;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        libc::close(fd);
        (n, eperm, elapsed)
    }
}

/// SO_LINGER 0: close with RST, so thousands of connects leave no TIME_WAIT behind.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a live descriptor with a correctly sized option.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}
