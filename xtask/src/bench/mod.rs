//! `cargo xtask bench [kernel|proxy|inspect|idle|crosscheck|all]`: benchmarks, each ratio
//! measured side by side in one run. Results go to `target/bench/<suite>.json` and a table on
//! stdout.

mod crosscheck;
mod idle;
mod inspect;
mod proxy;
pub mod splice_relay;

use crate::{cmd, setup};

/// Which suite to run.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// The kernel gate (root): connect latency, throughput, denied-attempt rate, cold start.
    Kernel,
    /// egress-proxy against squid, tinyproxy and a bare splice relay, then inspecting
    /// against mitmproxy and squid's ssl_bump, then 100,000 idle tunnels held (root).
    Proxy,
    /// Only the inspection figures of `proxy`.
    Inspect,
    /// Only the fleet-load figures of `proxy` (root): 100,000 idle tunnels held, memory per
    /// tunnel, refusals, new tunnels/s while held.
    Idle,
    /// `tank-loader audit cross-check` over a synthetic fleet of 1,000 hosts and 2 proxies
    /// (1M, 3M and 10M records): records/s on one core and peak memory. No root needed.
    Crosscheck,
    /// Kernel, proxy (idle tunnels included) and inspect (crosscheck apart: it writes about
    /// 13 GB of logs).
    All,
}

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// Suite to run.
    #[arg(value_enum, default_value = "all")]
    suite: Suite,
    /// Kernel suite: also measure the audit-log drain while the loader's /metrics is scraped
    /// every second, in rounds alternating with unscraped ones.
    #[arg(long)]
    scrape_metrics: bool,
}

/// Runs the chosen suites.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let out = cmd::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    if matches!(opts.suite, Suite::Kernel | Suite::All) {
        setup::prepare(
            "the kernel benchmark loads eBPF programs and creates cgroups",
            &[
                "--release",
                "-p",
                "tank-loader",
                "-p",
                "tank-integration-tests",
                "--bins",
            ],
        )?;
        cmd::run(
            std::process::Command::new(cmd::root().join("target/release/tank-bench"))
                .arg(out.join("kernel.json"))
                .args(opts.scrape_metrics.then_some("--scrape-metrics")),
        )?;
    }
    if matches!(opts.suite, Suite::Proxy | Suite::All) {
        let figures = proxy::run()?;
        std::fs::write(out.join("proxy.json"), serde_json::to_vec_pretty(&figures)?)?;
    }
    if matches!(opts.suite, Suite::Proxy | Suite::Inspect | Suite::All) {
        let figures = inspect::run(&proxy::build_proxy()?)?;
        std::fs::write(
            out.join("proxy-inspect.json"),
            serde_json::to_vec_pretty(&figures)?,
        )?;
    }
    if matches!(opts.suite, Suite::Proxy | Suite::Idle | Suite::All) {
        let figures = idle::run()?;
        std::fs::write(
            out.join("proxy-idle.json"),
            serde_json::to_vec_pretty(&figures)?,
        )?;
    }
    if matches!(opts.suite, Suite::Crosscheck) {
        let figures = crosscheck::run()?;
        std::fs::write(
            out.join("crosscheck.json"),
            serde_json::to_vec_pretty(&figures)?,
        )?;
    }
    Ok(())
}

/// `uptime`'s line, recorded with the figures (the load they were measured under).
fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
