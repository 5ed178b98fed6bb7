//! `cargo xtask bench proxy`: egress-proxy side by side with squid, tinyproxy and a bare
//! splice relay.
//!
//! Everything runs on loopback on this machine, in one run: local origins (a byte source,
//! an echo server, an accept-and-close server) in this process; each relay started from a
//! config in a temp dir on a port of its own, all running at once. Every figure is measured
//! in rounds that visit the targets in turn (rotated each round, so the machine's drifting
//! load falls on all of them alike), and is reported as the median over rounds with its
//! spread (min–max); each ratio is taken within a round, then summarised the same way:
//! - CONNECT tunnel throughput (origin → client, one stream), as a ratio of direct loopback
//!   TCP and of the bare splice relay (the limit of one extra hop on this machine, see
//!   [`super::splice_relay`]);
//! - new tunnels per second (CONNECT, `200`, close) from several client threads, as a ratio
//!   of squid's;
//! - p50/p99 latency of a small request: a 64-byte request and answer over a new tunnel
//!   (connect, CONNECT, request) and over an established one, beside direct TCP;
//! - the cost of budgets: the same egress-proxy binary with a budget on every rule (every
//!   ceiling set, none ever reached: `egress-proxy-budgets`) beside it without
//!   (`egress-proxy`), throughput and new tunnels/s as ratios within each round; then
//!   [`BUDGET_PAIRS`] more back-to-back pairs of the two alone (order alternating), each
//!   also measuring the proxy's CPU time per MiB and per tunnel (summed over its threads
//!   from `/proc/PID/task/*/schedstat`): the wall-clock ratio moves with whatever else the
//!   machine runs, the CPU cost of the same work much less.
//!
//! `TANK_BENCH_BASELINE_PROXY=/path/to/egress-proxy` adds that binary as one more row
//! (`egress-proxy-baseline`), for before/after comparisons in one run. The load average is
//! recorded at start and end. squid and tinyproxy are installed with `apt-get install -y`
//! when absent. Peers log every request as egress-proxy does (egress-proxy's log is chained
//! and fsynced; theirs are not). Release build; bounded durations (about two minutes).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::{cmd, setup};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// Rounds per figure; each round visits every target once.
const ROUNDS: usize = 5;
/// Back-to-back pairs of budgets on / off after the rounds.
const BUDGET_PAIRS: usize = 12;
/// Throughput: measured window per sample, after a warm-up.
const THROUGHPUT_WINDOW: Duration = Duration::from_millis(1000);
const THROUGHPUT_WARMUP: Duration = Duration::from_millis(200);
/// New tunnels per second: window per sample and client threads.
const RATE_WINDOW: Duration = Duration::from_millis(1000);
const RATE_CLIENTS: usize = 4;
/// Latency samples per mode and round (after a tenth as many warm-up rounds), and a time cap.
const LATENCY_SAMPLES: usize = 400;
const LATENCY_CAP: Duration = Duration::from_secs(2);
const CHUNK: usize = 256 * 1024;

/// One thing measured: direct TCP or a relay.
struct Target {
    name: &'static str,
    proxy: Option<SocketAddr>,
    version: String,
    figures: Map<String, Value>,
}

/// Runs the benchmark, prints a table and returns the figures.
pub fn run() -> Result<Value> {
    let started = Instant::now();
    let load_start = loadavg();
    let bin = build_proxy()?;
    ensure_installed(&[("squid", "squid"), ("tinyproxy", "tinyproxy")])?;
    let dir = scratch_dir("tank-bench-proxy")?;
    let origins = Origins::start()?;

    let mut peers = vec![
        (Peer::SpliceRelay, None),
        (Peer::EgressProxy, Some(bin.clone())),
        (Peer::EgressProxyBudgets, Some(bin.clone())),
        (Peer::Squid, None),
        (Peer::Tinyproxy, None),
    ];
    if let Some(baseline) = std::env::var_os("TANK_BENCH_BASELINE_PROXY") {
        peers.push((Peer::Baseline, Some(PathBuf::from(baseline))));
    }
    let mut running = Vec::new();
    let mut targets = vec![Target {
        name: "direct",
        proxy: None,
        version: String::new(),
        figures: Map::new(),
    }];
    for (kind, bin) in peers {
        eprintln!("bench: starting {}", kind.name());
        let r = start_peer(kind, bin.as_deref(), dir.path(), &origins)?;
        targets.push(Target {
            name: kind.name(),
            proxy: Some(r.addr),
            version: r.version.clone(),
            figures: Map::new(),
        });
        running.push(r);
    }

    // Each figure: ROUNDS rounds, every target once per round, the order rotated.
    let mut samples: Vec<Map<String, Value>> = vec![Map::new(); targets.len()];
    let mut push = |i: usize, key: &str, v: f64| {
        samples[i]
            .entry(key)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("array")
            .push(json!(v));
    };
    for round in 0..ROUNDS {
        eprintln!("bench: round {}/{ROUNDS}", round + 1);
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            push(
                i,
                "throughput_mib_s",
                throughput(t.proxy, origins.source)? / MIB,
            );
        }
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            if let Some(p) = targets[i].proxy {
                let rate = tunnel_rate(p, origins.closer)?;
                push(i, "new_tunnels_per_s", rate.per_s);
                push(i, "new_tunnel_errors", rate.errors as f64);
            }
        }
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let p = targets[i].proxy;
            let new = latency(p, origins.echo, true)?;
            let open = latency(p, origins.echo, false)?;
            push(i, "new_tunnel_request_p50_us", new.p50 as f64);
            push(i, "new_tunnel_request_p99_us", new.p99 as f64);
            push(i, "tunnel_request_p50_us", open.p50 as f64);
            push(i, "tunnel_request_p99_us", open.p99 as f64);
        }
    }
    // `running` follows `targets` past its first row (direct).
    let proxy_named = |name: &str| {
        let i = targets.iter().position(|t| t.name == name).expect("target");
        &running[i - 1]
    };
    let budget_cost = budget_pairs(
        [
            proxy_named("egress-proxy"),
            proxy_named("egress-proxy-budgets"),
        ],
        origins.source,
        origins.closer,
    )?;
    drop(running);

    // Ratios within each round, against direct, the bare relay and squid.
    let series = |i: usize, key: &str| -> Vec<f64> {
        samples[i]
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let index = |name: &str| targets.iter().position(|t| t.name == name).expect("target");
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let (direct, bare, squid) = (index("direct"), index("splice-relay"), index("squid"));
    let (ours, budgets) = (index("egress-proxy"), index("egress-proxy-budgets"));
    for i in 0..targets.len() {
        let mut f = Map::new();
        for (key, values) in &samples[i] {
            let v: Vec<f64> = values
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            f.insert(key.clone(), spread(&v));
        }
        let tput = series(i, "throughput_mib_s");
        f.insert(
            "throughput_ratio_to_direct".into(),
            spread(&ratio(&tput, &series(direct, "throughput_mib_s"))),
        );
        f.insert(
            "throughput_ratio_to_splice_relay".into(),
            spread(&ratio(&tput, &series(bare, "throughput_mib_s"))),
        );
        if targets[i].proxy.is_some() {
            f.insert(
                "new_tunnels_ratio_to_squid".into(),
                spread(&ratio(
                    &series(i, "new_tunnels_per_s"),
                    &series(squid, "new_tunnels_per_s"),
                )),
            );
        }
        if i == budgets {
            f.insert(
                "throughput_ratio_to_budgets_off".into(),
                spread(&ratio(&tput, &series(ours, "throughput_mib_s"))),
            );
            f.insert(
                "new_tunnels_ratio_to_budgets_off".into(),
                spread(&ratio(
                    &series(i, "new_tunnels_per_s"),
                    &series(ours, "new_tunnels_per_s"),
                )),
            );
        }
        targets[i].figures = f;
    }

    let fig = |name: &str, key: &str| {
        targets
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.figures.get(key))
            .and_then(|v| v["median"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let ours = |k: &str| fig("egress-proxy", k);
    let goals = json!({
        "throughput_ratio_to_splice_relay_ge_0_90": ours("throughput_ratio_to_splice_relay") >= 0.90,
        "throughput_above_squid_and_tinyproxy": ours("throughput_mib_s") > fig("squid", "throughput_mib_s")
            && ours("throughput_mib_s") > fig("tinyproxy", "throughput_mib_s"),
        "new_tunnels_ge_2x_squid": ours("new_tunnels_ratio_to_squid") >= 2.0,
        "new_tunnels_ge_1_5x_tinyproxy": ours("new_tunnels_per_s") >= 1.5 * fig("tinyproxy", "new_tunnels_per_s"),
        "budgets_throughput_within_5pct": fig("egress-proxy-budgets", "throughput_ratio_to_budgets_off") >= 0.95,
        "budgets_new_tunnels_within_5pct": fig("egress-proxy-budgets", "new_tunnels_ratio_to_budgets_off") >= 0.95,
        "budgets_pairs_throughput_within_5pct": budget_cost["throughput_ratio"]["median"].as_f64() >= Some(0.95),
        "budgets_pairs_new_tunnels_within_5pct": budget_cost["new_tunnels_ratio"]["median"].as_f64() >= Some(0.95),
        "budgets_pairs_cpu_per_mib_within_5pct": budget_cost["cpu_per_mib_ratio"]["median"].as_f64().is_some_and(|r| r <= 1.05),
        "budgets_pairs_cpu_per_tunnel_within_5pct": budget_cost["cpu_per_tunnel_ratio"]["median"].as_f64().is_some_and(|r| r <= 1.05),
    });
    let result = json!({
        "machine": {
            "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        },
        "targets": targets.iter().map(|t| json!({
            "target": t.name,
            "version": t.version,
            "figures": t.figures,
        })).collect::<Vec<_>>(),
        "goals": goals,
        "budget_cost": budget_cost,
        "settings": {
            "rounds": ROUNDS,
            "budget_pairs": BUDGET_PAIRS,
            "throughput_window_ms": THROUGHPUT_WINDOW.as_millis() as u64,
            "rate_window_ms": RATE_WINDOW.as_millis() as u64,
            "rate_clients": RATE_CLIENTS,
            "latency_samples_per_round": LATENCY_SAMPLES,
            "request_bytes": 64,
        },
        "elapsed_s": round(started.elapsed().as_secs_f64(), 1),
    });
    print_table(&result);
    Ok(result)
}

const MIB: f64 = 1024.0 * 1024.0;

pub(super) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Median, quartiles, min and max of a series of per-round values.
pub(super) fn spread(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let digits = if s[s.len() / 2].abs() >= 100.0 { 0 } else { 3 };
    let at = |q: f64| round(s[((s.len() - 1) as f64 * q).round() as usize], digits);
    json!({
        "median": round(s[s.len() / 2], digits),
        "q1": at(0.25),
        "q3": at(0.75),
        "min": round(s[0], digits),
        "max": round(s[s.len() - 1], digits),
    })
}

/// The 1-, 5- and 15-minute load averages.
pub(super) fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(v)
}

fn print_table(r: &Value) {
    let m = &r["machine"];
    println!();
    println!(
        "egress-proxy benchmark (loopback, {} CPUs, release build, {} rounds; load {} at start, {} at end)",
        m["cpus"], r["settings"]["rounds"], m["loadavg_start"], m["loadavg_end"]
    );
    println!("each cell: median [min–max] over rounds; ratios are taken within each round");
    let cell = |f: &Value, k: &str| match &f[k] {
        Value::Null => String::new(),
        v => format!("{} [{}–{}]", v["median"], v["min"], v["max"]),
    };
    println!(
        "{:<22} {:>24} {:>22} {:>22} {:>24} {:>22} {:>22} {:>22}",
        "target",
        "tput MiB/s",
        "x direct",
        "x splice relay",
        "tunnels/s",
        "x squid",
        "new req p99 us",
        "open req p99 us"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let f = &t["figures"];
        println!(
            "{:<22} {:>24} {:>22} {:>22} {:>24} {:>22} {:>22} {:>22}",
            t["target"].as_str().unwrap_or("?"),
            cell(f, "throughput_mib_s"),
            cell(f, "throughput_ratio_to_direct"),
            cell(f, "throughput_ratio_to_splice_relay"),
            cell(f, "new_tunnels_per_s"),
            cell(f, "new_tunnels_ratio_to_squid"),
            cell(f, "new_tunnel_request_p99_us"),
            cell(f, "tunnel_request_p99_us"),
        );
    }
    if let Some(t) = r["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["target"] == "egress-proxy-budgets")
    {
        let f = &t["figures"];
        println!(
            "budgets on every rule / off: throughput x {}, new tunnels/s x {}",
            cell(f, "throughput_ratio_to_budgets_off"),
            cell(f, "new_tunnels_ratio_to_budgets_off")
        );
    }
    let b = &r["budget_cost"];
    let q = |k: &str| {
        let v = &b[k];
        format!(
            "{} [{} {}] ({}–{})",
            v["median"], v["q1"], v["q3"], v["min"], v["max"]
        )
    };
    println!(
        "budgets on / off, {} back-to-back pairs (median [quartiles] (min–max)):",
        r["settings"]["budget_pairs"]
    );
    println!(
        "  throughput x {}; proxy CPU per MiB x {}",
        q("throughput_ratio"),
        q("cpu_per_mib_ratio")
    );
    println!(
        "  new tunnels/s x {}; proxy CPU per tunnel x {}",
        q("new_tunnels_ratio"),
        q("cpu_per_tunnel_ratio")
    );
    println!("goals: {}", r["goals"]);
}

// ---- building and installing ------------------------------------------------------------

/// Builds egress-proxy in release mode and returns the binary's path.
pub(super) fn build_proxy() -> Result<PathBuf> {
    build_release(&["--bin", "egress-proxy"], "egress-proxy")
}

/// Builds `target` of egress-proxy (`args` select it) in release mode; returns its path.
pub(super) fn build_release(args: &[&str], target: &str) -> Result<PathBuf> {
    build_release_of("egress-proxy", args, target)
}

/// Builds `target` of `package` in release mode (`args` say which: `--bin`, `--example`);
/// returns its executable.
pub(super) fn build_release_of(package: &str, args: &[&str], target: &str) -> Result<PathBuf> {
    eprintln!(
        "bench: cargo build --release -p {package} {}",
        args.join(" ")
    );
    let out = cmd::cargo(
        &[
            &["build", "--release", "-p", package][..],
            args,
            &["--message-format=json-render-diagnostics"],
        ]
        .concat(),
    )
    .stderr(Stdio::inherit())
    .output()
    .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("building {target} failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == target {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo did not report the {target} executable")
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(tool).is_file())
}

fn ensure_installed(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {} from Debian", missing.join(" "));
    setup::apt_install(&missing)
}

/// A scratch directory removed when dropped; world-writable, since squid drops to the `proxy`
/// user and must write its logs here.
pub(super) fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

// ---- origins ------------------------------------------------------------------------------

/// Local origins on 127.0.0.1, stopped when dropped.
struct Origins {
    /// Writes bytes until the client goes away.
    source: SocketAddr,
    /// Echoes.
    echo: SocketAddr,
    /// Accepts and closes at once (new-tunnel rate).
    closer: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Origins {
    fn start() -> Result<Origins> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut serve = |handler: fn(TcpStream)| -> Result<SocketAddr> {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(s) = s {
                        handler(s);
                    }
                }
            }));
            Ok(addr)
        };
        let source = serve(|s| {
            thread::spawn(move || {
                let buf = vec![0x5au8; CHUNK];
                let mut s = s;
                while s.write_all(&buf).is_ok() {}
            });
        })?;
        let echo = serve(|s| {
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        })?;
        let closer = serve(drop)?;
        Ok(Origins {
            source,
            echo,
            closer,
            stop,
            threads,
        })
    }
}

impl Drop for Origins {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for a in [self.source, self.echo, self.closer] {
            let _ = TcpStream::connect(a); // wakes the accept loop, which sees the flag
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---- peers --------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Peer {
    /// The limit: a bare splice relay, no policy, no log (`cargo xtask splice-relay`).
    SpliceRelay,
    EgressProxy,
    /// The same binary with a budget on every rule, no ceiling ever reached.
    EgressProxyBudgets,
    /// Another egress-proxy binary (`TANK_BENCH_BASELINE_PROXY`), run the same way.
    Baseline,
    Squid,
    Tinyproxy,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::SpliceRelay => "splice-relay",
            Peer::EgressProxy => "egress-proxy",
            Peer::EgressProxyBudgets => "egress-proxy-budgets",
            Peer::Baseline => "egress-proxy-baseline",
            Peer::Squid => "squid",
            Peer::Tinyproxy => "tinyproxy",
        }
    }
}

/// A running proxy; killed (and reaped) when dropped.
pub(super) struct Running {
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    pub(super) version: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) fn version_of(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default()
}

fn start_peer(kind: Peer, bin: Option<&Path>, dir: &Path, origins: &Origins) -> Result<Running> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let sub = dir.join(kind.name());
    std::fs::create_dir_all(&sub)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777))?;
    let log = std::fs::File::create(sub.join("stderr.log"))?;
    let (mut cmd, version) = match kind {
        Peer::SpliceRelay => {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["splice-relay", "--listen", &addr.to_string()]);
            (c, "xtask splice-relay".to_owned())
        }
        Peer::EgressProxy | Peer::EgressProxyBudgets | Peer::Baseline => {
            let bin = bin.context("no egress-proxy binary")?;
            let ports: Vec<String> = [origins.source, origins.echo, origins.closer]
                .iter()
                .map(|a| a.port().to_string())
                .collect();
            // Every ceiling counted, none reached in a run (tens of GB, thousands of tunnels).
            let budget = match kind {
                Peer::EgressProxyBudgets => ", budget = { bytes_out = \"1 TiB/h\", bytes_in = \"1 TiB/h\", requests = \"100000000/min\", tunnel_secs = 86400 }",
                _ => "",
            };
            let config = format!(
                "listen = [\"{addr}\"]\nadmin_listen = \"off\"\nclient_networks = [\"127.0.0.0/8\"]\naudit_log = \"{}\"\nsystem_resolver = false\nallowed_domains = [{{ domain = \"127.0.0.1\", ports = [{}], allow_private = true{budget} }}]\n",
                sub.join("audit.jsonl").display(),
                ports.join(", ")
            );
            let path = sub.join("egress-proxy.toml");
            std::fs::write(&path, config)?;
            let mut c = Command::new(bin);
            c.args(["run", "--config"])
                .arg(&path)
                .env("RUST_LOG", "warn");
            (
                c,
                version_of(bin.to_str().unwrap_or("egress-proxy"), "--version"),
            )
        }
        Peer::Squid => {
            let config = format!(
                "http_port {addr}\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log stdio:{d}/access.log\ncache deny all\ncache_mem 8 MB\ncoredump_dir {d}\nacl bench src 127.0.0.0/8\nhttp_access allow bench\nhttp_access deny all\nshutdown_lifetime 0 seconds\nmax_filedescriptors 16384\nvia off\nforwarded_for delete\n",
                d = sub.display()
            );
            let path = sub.join("squid.conf");
            std::fs::write(&path, config)?;
            let mut c = Command::new("squid");
            c.args(["-N", "-f"]).arg(&path);
            (c, version_of("squid", "-v"))
        }
        Peer::Tinyproxy => {
            let config = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 2048\nAllow 127.0.0.1\nLogFile \"{d}/tinyproxy.log\"\nLogLevel Connect\nPidFile \"{d}/tinyproxy.pid\"\nDisableViaHeader Yes\n",
                d = sub.display()
            );
            let path = sub.join("tinyproxy.conf");
            std::fs::write(&path, config)?;
            let mut c = Command::new("tinyproxy");
            c.args(["-d", "-c"]).arg(&path);
            (c, version_of("tinyproxy", "-v"))
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", kind.name()))?;
    let mut running = Running {
        child,
        addr,
        version,
    };
    // Ready when a CONNECT through it reaches the echo origin.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            let log = std::fs::read_to_string(sub.join("stderr.log")).unwrap_or_default();
            bail!("{} exited with {status} at start:\n{log}", kind.name());
        }
        if let Ok((mut s, _)) = open_tunnel(addr, origins.echo) {
            if s.write_all(b"ping").is_ok() {
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).is_ok() && &b == b"ping" {
                    break;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not come up on {addr}", kind.name());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(running)
}

// ---- measurements ---------------------------------------------------------------------------

/// Opens a CONNECT tunnel to `target` through `proxy`; returns the stream once `200` arrived.
fn open_tunnel(proxy: SocketAddr, target: SocketAddr) -> Result<(TcpStream, usize)> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    // Read in chunks, as a real client does; bytes past the head are tunnel data (only the
    // byte source sends any before being asked), returned as a count.
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut b)?;
        if n == 0 || head.len() > 8192 {
            bail!("proxy closed during the CONNECT answer");
        }
        head.extend_from_slice(&b[..n]);
    };
    if !(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")) {
        bail!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or_default()
        );
    }
    Ok((s, head.len() - end))
}

fn connect(proxy: Option<SocketAddr>, target: SocketAddr) -> Result<TcpStream> {
    match proxy {
        Some(p) => open_tunnel(p, target).map(|(s, _)| s),
        None => {
            let s = TcpStream::connect(target)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        }
    }
}

/// Bytes per second read from the source origin over one stream.
fn throughput(proxy: Option<SocketAddr>, source: SocketAddr) -> Result<f64> {
    let mut s = connect(proxy, source)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    while start.elapsed() < THROUGHPUT_WARMUP {
        if s.read(&mut buf)? == 0 {
            bail!("source closed early");
        }
    }
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < THROUGHPUT_WINDOW {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("source closed early");
        }
        bytes += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Both);
    Ok(bytes as f64 / secs)
}

struct Rate {
    per_s: f64,
    errors: u64,
    /// Tunnels opened in the window.
    count: u64,
}

fn linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on our socket. A reset on close keeps
    // tens of thousands of client ports out of TIME_WAIT during the run.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// New tunnels per second: CONNECT, wait for `200`, close; several client threads.
fn tunnel_rate(proxy: SocketAddr, closer: SocketAddr) -> Result<Rate> {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..RATE_CLIENTS)
        .map(|_| {
            let (ok, errors) = (ok.clone(), errors.clone());
            thread::spawn(move || {
                while start.elapsed() < RATE_WINDOW {
                    match open_tunnel(proxy, closer) {
                        Ok((s, _)) => {
                            linger_zero(&s);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Rate {
        per_s: ok.load(Ordering::Relaxed) as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
        count: ok.load(Ordering::Relaxed),
    })
}

struct Percentiles {
    p50: u64,
    p99: u64,
}

/// Latency of a 64-byte request answered by the echo origin: over a new connection (or
/// tunnel) each time when `fresh`, else over one open connection.
fn latency(proxy: Option<SocketAddr>, echo: SocketAddr, fresh: bool) -> Result<Percentiles> {
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    let mut open = if fresh {
        None
    } else {
        Some(connect(proxy, echo)?)
    };
    let cap = Instant::now();
    let warmup = LATENCY_SAMPLES / 10;
    let mut round = 0;
    while samples.len() < LATENCY_SAMPLES && cap.elapsed() < LATENCY_CAP {
        round += 1;
        let t = Instant::now();
        match &mut open {
            Some(s) => {
                s.write_all(&msg)?;
                s.read_exact(&mut back)?;
            }
            None => {
                let mut s = connect(proxy, echo)?;
                s.write_all(&msg)?;
                s.read_exact(&mut back)?;
                linger_zero(&s);
            }
        }
        if round > warmup {
            samples.push(t.elapsed().as_micros() as u64);
        }
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok(Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    })
}

/// CPU time `pid` has run, all threads, ns (`/proc/PID/task/*/schedstat`, first field).
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// [`BUDGET_PAIRS`] back-to-back pairs of `[off, on]`, the order alternating: throughput and
/// new tunnels/s with the proxy's CPU per MiB and per tunnel, each as a ratio on / off
/// within its pair.
fn budget_pairs(pair: [&Running; 2], source: SocketAddr, closer: SocketAddr) -> Result<Value> {
    let mut ratios: [Vec<f64>; 4] = Default::default();
    for k in 0..BUDGET_PAIRS {
        eprintln!("bench: budgets pair {}/{BUDGET_PAIRS}", k + 1);
        // [off, on] of: MiB/s, CPU ns per MiB, tunnels/s, CPU ns per tunnel.
        let mut m = [[0f64; 4]; 2];
        for j in 0..2 {
            let i = (j + k) % 2;
            let (addr, pid) = (pair[i].addr, pair[i].child.id());
            let cpu = cpu_ns(pid)?;
            let start = Instant::now();
            let bytes_per_s = throughput(Some(addr), source)?;
            // The window's bytes; the warm-up's CPU is spent at the same rate.
            let mib = bytes_per_s * start.elapsed().as_secs_f64() / MIB;
            m[i][0] = bytes_per_s / MIB;
            m[i][1] = (cpu_ns(pid)? - cpu) as f64 / mib;
            let cpu = cpu_ns(pid)?;
            let rate = tunnel_rate(addr, closer)?;
            m[i][2] = rate.per_s;
            m[i][3] = (cpu_ns(pid)? - cpu) as f64 / rate.count.max(1) as f64;
        }
        for (f, r) in ratios.iter_mut().enumerate() {
            r.push(m[1][f] / m[0][f]);
        }
    }
    let [tput, cpu_mib, rate, cpu_tunnel] = ratios.map(|r| spread(&r));
    Ok(json!({
        "throughput_ratio": tput,
        "cpu_per_mib_ratio": cpu_mib,
        "new_tunnels_ratio": rate,
        "cpu_per_tunnel_ratio": cpu_tunnel,
    }))
}
