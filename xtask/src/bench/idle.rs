//! `cargo xtask bench idle` (also part of `bench proxy`): one egress-proxy at fleet load,
//! [`TUNNELS`] concurrent idle CONNECT tunnels from 256 client addresses.
//!
//! The whole run happens in a network namespace of its own, made with `unshare(2)` for the
//! driver (`egress-proxy/examples/idle_bench.rs`) and gone when it exits: its sysctls (local
//! port range, accept backlogs) and its loopback are the bench's to set, and nothing it opens
//! is visible outside. The driver starts the proxy there with an open-files limit of
//! `fs.nr_open`, measures the kernel's cost of the client and origin sockets alone (the same
//! connections opened directly), then in [`ROUNDS`] rounds: new tunnels/s with none held, the
//! tunnels opened (each carrying a 4-byte exchange both ways, then idle), the proxy's memory
//! and descriptors and the kernel's slab memory while they are held, new tunnels/s while they
//! are held, everything closed. Figures are the median [min–max] over rounds; the held/none
//! rate ratio is taken within each round.
//!
//! Goals (issue 13): 100,000 tunnels held; <= 16 KiB of proxy memory per idle tunnel,
//! counted as the proxy's resident memory plus the kernel slab memory its side of a tunnel
//! pins (tunnels' slab growth less that of the same connections made directly); no refused
//! or failed connection below `max_connections`. Where the open-files limit cannot be raised
//! (no CAP_SYS_RESOURCE), the proxy lowers `max_connections` to what it allows, the driver
//! holds that many instead, and the report says so: the 100,000 goal is then not met.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::proxy::{build_proxy, build_release, loadavg, scratch_dir, spread};

/// Tunnels held at once.
const TUNNELS: usize = 100_000;
/// Rounds (each opens and closes all of them).
const ROUNDS: usize = 3;
/// The goal: proxy memory per idle tunnel.
const GOAL_KIB: f64 = 16.0;

/// Runs the benchmark, prints a table and returns the figures.
pub fn run() -> Result<Value> {
    let load_start = loadavg();
    let proxy = build_proxy()?;
    let driver = build_release(&["--example", "idle_bench"], "idle_bench")?;
    let dir = scratch_dir("tank-bench-idle")?;
    eprintln!("bench: {TUNNELS} idle tunnels, {ROUNDS} rounds, in a network namespace of its own");
    let mut cmd = Command::new(driver);
    cmd.arg(&proxy)
        .arg(dir.path())
        .arg(TUNNELS.to_string())
        .arg(ROUNDS.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: only unshare(2) runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .context("cannot start the idle bench in a network namespace of its own (it needs root)")?;
    if !out.status.success() {
        bail!("the idle bench failed ({})", out.status);
    }
    let raw: Value =
        serde_json::from_slice(&out.stdout).context("the idle bench printed no JSON")?;

    let rounds = raw["rounds"].as_array().cloned().unwrap_or_default();
    let series =
        |key: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[key].as_f64()).collect() };
    let within = |a: &str, b: &str, f: fn(f64, f64) -> f64| -> Vec<f64> {
        series(a)
            .iter()
            .zip(series(b))
            .map(|(x, y)| f(*x, y))
            .collect()
    };
    let mut figures = serde_json::Map::new();
    for key in [
        "proxy_rss_kib_per_tunnel",
        "kernel_proxy_slab_kib_per_tunnel",
        "kernel_slab_kib_per_tunnel",
        "proxy_fds_per_tunnel",
        "proxy_pipe_fds",
        "refused_or_failed",
        "fill_per_s",
        "new_tunnels_per_s_none_held",
        "new_tunnels_per_s_held",
        "rate_errors_none_held",
        "rate_errors_held",
    ] {
        figures.insert(key.into(), spread(&series(key)));
    }
    // Proxy memory: its resident set plus the kernel memory its side of a tunnel pins.
    figures.insert(
        "proxy_memory_kib_per_tunnel".into(),
        spread(&within(
            "proxy_rss_kib_per_tunnel",
            "kernel_proxy_slab_kib_per_tunnel",
            |a, b| a + b,
        )),
    );
    figures.insert(
        "new_tunnels_ratio_held_to_none".into(),
        spread(&within(
            "new_tunnels_per_s_held",
            "new_tunnels_per_s_none_held",
            |a, b| a / b,
        )),
    );
    let median = |key: &str| figures[key]["median"].as_f64().unwrap_or(f64::NAN);
    let refused: f64 = series("refused_or_failed").iter().sum();
    let reached = raw["tunnels"].as_u64().unwrap_or(0) as usize;
    let goals = json!({
        "tunnels_held_100000": reached >= TUNNELS,
        "proxy_memory_le_16_kib_per_idle_tunnel": median("proxy_memory_kib_per_tunnel") <= GOAL_KIB,
        "no_refusal_below_max_connections": refused == 0.0,
    });
    let result = json!({
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        },
        "settings": {
            "tunnels_requested": TUNNELS,
            "tunnels": raw["tunnels"],
            "nofile": raw["nofile"],
            "nofile_note": raw["nofile_note"],
            "rounds": ROUNDS,
            "client_addrs": raw["client_addrs"],
            "origin_ports": raw["origin_ports"],
            "max_connections": raw["max_connections"],
        },
        "proxy_base": raw["proxy_base"],
        "direct_kernel_slab_kib_per_connection": raw["direct_kernel_slab_kib_per_connection"],
        "figures": figures,
        "rounds": rounds,
        "proxy_warnings": raw["proxy_warnings"],
        "goals": goals,
    });
    print_table(&result);
    Ok(result)
}

fn print_table(r: &Value) {
    let f = &r["figures"];
    let cell = |k: &str| {
        let v = &f[k];
        format!("{} [{}–{}]", v["median"], v["min"], v["max"])
    };
    let s = &r["settings"];
    println!();
    println!(
        "egress-proxy, {} idle tunnels held from {} client addresses ({} rounds; load {} at start, {} at end)",
        s["tunnels"], s["client_addrs"], s["rounds"], r["machine"]["loadavg_start"], r["machine"]["loadavg_end"]
    );
    if let Some(note) = s["nofile_note"].as_str() {
        println!("not {}: {note}", s["tunnels_requested"]);
    }
    println!("each cell: median [min–max] over rounds");
    for (label, key) in [
        (
            "proxy memory KiB per idle tunnel",
            "proxy_memory_kib_per_tunnel",
        ),
        ("  of which resident (VmRSS)", "proxy_rss_kib_per_tunnel"),
        (
            "  of which kernel slab, the proxy's side",
            "kernel_proxy_slab_kib_per_tunnel",
        ),
        (
            "kernel slab KiB per tunnel, all four sockets",
            "kernel_slab_kib_per_tunnel",
        ),
        ("proxy descriptors per idle tunnel", "proxy_fds_per_tunnel"),
        ("proxy pipe descriptors while held", "proxy_pipe_fds"),
        ("refused or failed opens per round", "refused_or_failed"),
        ("tunnels opened/s while filling", "fill_per_s"),
        ("new tunnels/s, none held", "new_tunnels_per_s_none_held"),
        ("new tunnels/s, all held", "new_tunnels_per_s_held"),
        (
            "  held / none, within each round",
            "new_tunnels_ratio_held_to_none",
        ),
    ] {
        println!("{label:<46} {}", cell(key));
    }
    println!("goals: {}", r["goals"]);
}
