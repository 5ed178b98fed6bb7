//! `tank-bench`: the kernel benchmarks behind `cargo xtask bench kernel` (root only).
//!
//! Every ratio is measured side by side in one run: rounds of the baseline and of the guarded
//! case alternate, so drift on the machine hits both alike. Workers are this same binary
//! re-executed inside a cgroup (`tank-bench worker ...`), so the code path measured is a real
//! process making real system calls under the real gate.
//!
//! Usage: tank-bench OUT.json

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tank_integration_tests::{counter, Loader, TestCgroups};

const ROUNDS: usize = 5;
const CONNECTS_PER_ROUND: usize = 5_000;
const THROUGHPUT_SECS: f64 = 1.0;
/// Denied attempts per flood worker: two workers make 1,000,000 events, which the bench's
/// 128 MiB ring buffer holds (about 1.19 million of 112 bytes) while the drain is stopped.
const FLOOD_PER_WORKER: u64 = 500_000;
const COLD_STARTS: usize = 5;
const MAP_ENTRIES: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        worker(&args[1..]);
        return;
    }
    let out = args.first().expect("usage: tank-bench OUT.json");
    let figures = bench();
    std::fs::write(out, serde_json::to_vec_pretty(&figures).unwrap()).expect("write results");
    print_table(&figures);
}

fn bench() -> Value {
    let listener = Listener::start();
    let proxy = format!("proxies = [\"{}\"]", listener.addr);
    let gate1 = TestCgroups::new();
    let gate1_loader = Loader::start(&gate1, &format!("{proxy}\nring_buffer_bytes = 134217728"));
    let gate10k = TestCgroups::new();
    let _gate10k_loader =
        Loader::start(&gate10k, &format!("{proxy}\n{}", many_entries(MAP_ENTRIES)));
    let base = &gate1.sibling;

    // connect()+close latency: unconfined vs allowed-and-recorded vs 10k-entry allow map.
    let (mut lat_base, mut lat_gate, mut lat_10k) = (Vec::new(), Vec::new(), Vec::new());
    let args = [
        "connect".to_owned(),
        listener.addr.to_string(),
        CONNECTS_PER_ROUND.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p50 = |cgroup: &Path| run_worker(cgroup, &args)["p50_ns"].as_f64().unwrap();
    // Interleaved, so drift in the machine's speed lands on all three alike.
    for _ in 0..ROUNDS {
        lat_base.push(p50(base));
        lat_gate.push(p50(&gate1.agent));
        lat_10k.push(p50(&gate10k.agent));
    }

    eprintln!("bench: connect latency done");
    // Bulk throughput of one allowed connection vs unconfined.
    let (mut tp_base, mut tp_gate) = (Vec::new(), Vec::new());
    let send = [
        "send".to_owned(),
        listener.addr.to_string(),
        THROUGHPUT_SECS.to_string(),
    ];
    let send: Vec<&str> = send.iter().map(String::as_str).collect();
    let rate = |cgroup: &Path| run_worker(cgroup, &send)["bytes_per_s"].as_f64().unwrap();
    for _ in 0..ROUNDS {
        tp_base.push(rate(base));
        tp_gate.push(rate(&gate1.agent));
    }

    // Denied attempts: two workers (one per core) flood an unlisted port on loopback while the
    // loader is stopped (SIGSTOP), so the flood has both cores and its events wait in the ring.
    // Then the loader continues alone and the drain's sustained rate is timed from a full ring
    // to the last record durable in the chained log (anchor moved): no ring to hide a slow
    // drain, which has one core (the loader is single-threaded) and nothing competing.
    let denied_target = listener.other_addr.to_string();
    let loader_pid = nix::unistd::Pid::from_raw(gate1_loader.pid() as i32);
    let before = gate1_loader.status();
    let durable_before = durable_records(&gate1_loader.audit_log);
    nix::sys::signal::kill(loader_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            spawn_worker(
                &gate1.agent,
                &["flood", &denied_target, &FLOOD_PER_WORKER.to_string()],
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
    let after = gate1_loader.status();
    let delta = |name| counter(&after, name) - counter(&before, name);
    let (recorded, unrecorded) = (delta("denied"), delta("unrecorded_denied"));
    let drain_start = Instant::now();
    nix::sys::signal::kill(loader_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let mut logged = durable_records(&gate1_loader.audit_log);
    while logged - durable_before < recorded && drain_start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
        logged = durable_records(&gate1_loader.audit_log);
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    eprintln!("bench: flood {flood_elapsed:.2}s (drain stopped), drain {drain_secs:.3}s");

    // Cold start: a fresh loader (nothing pinned) until it reports enforcement in place.
    let cold_cg = TestCgroups::new();
    let mut cold = Vec::new();
    for _ in 0..COLD_STARTS {
        let t = Instant::now();
        let loader = Loader::start(&cold_cg, &proxy);
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        drop(loader);
    }

    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lb, lg, l10) = (med(&mut lat_base), med(&mut lat_gate), med(&mut lat_10k));
    let (tb, tg) = (med(&mut tp_base), med(&mut tp_gate));
    json!({
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel_release() },
        "connect_close_p50_ns": { "unconfined": lb, "gate_allowed_recorded": lg, "gate_10k_entries": l10 },
        "connect_ratio_gate_vs_unconfined": lg / lb,
        "connect_ratio_10k_vs_1_entry": l10 / lg,
        "throughput_bytes_per_s": { "unconfined": tb, "gate_allowed": tg },
        "throughput_ratio_gate_vs_unconfined": tg / tb,
        "denied_flood": {
            "attempts": attempts, "eperm": eperm, "seconds": worker_secs,
            "attempts_per_s": attempts as f64 / worker_secs,
            "recorded_in_kernel": recorded, "unrecorded_counted": unrecorded,
            "unaccounted": attempts as i64 - recorded as i64 - unrecorded as i64,
            "written_to_audit_log": logged - durable_before,
            "drain_seconds": drain_secs,
            "drain_events_per_s": (logged - durable_before) as f64 / drain_secs,
        },
        "cold_start_ms": { "median": med(&mut cold.clone()), "all": cold },
        "rounds": ROUNDS, "connects_per_round": CONNECTS_PER_ROUND,
    })
}

fn print_table(f: &Value) {
    let row = |name: &str, value: String, goal: &str, ok: bool| {
        println!(
            "{name:<48} {value:>16}   {goal:<14} {}",
            if ok { "met" } else { "NOT MET" }
        );
    };
    println!(
        "{:<48} {:>16}   {:<14}",
        "kernel benchmark", "measured", "goal"
    );
    let r = f["connect_ratio_gate_vs_unconfined"].as_f64().unwrap();
    row(
        "connect+close p50, gate / unconfined",
        format!("{r:.3}x"),
        "<= 1.03x",
        r <= 1.03,
    );
    let t = f["throughput_ratio_gate_vs_unconfined"].as_f64().unwrap();
    row(
        "bulk TCP throughput, gate / unconfined",
        format!("{t:.3}x"),
        ">= 0.99x",
        t >= 0.99,
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
    let c = f["cold_start_ms"]["median"].as_f64().unwrap();
    row(
        "loader cold start to enforcing, median ms",
        format!("{c:.1}"),
        "<= 200 ms",
        c <= 200.0,
    );
    let m = f["connect_ratio_10k_vs_1_entry"].as_f64().unwrap();
    row(
        "connect p50, 10k allow entries / 1 entry",
        format!("{m:.3}x"),
        "-",
        true,
    );
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

fn spawn_worker(cgroup: &Path, args: &[&str]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .arg("worker")
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

fn run_worker(cgroup: &Path, args: &[&str]) -> Value {
    finish_worker(spawn_worker(cgroup, args))
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
