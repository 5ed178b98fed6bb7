//! `cargo xtask bench proxy`, inspection figures: egress-proxy inspecting (`inspect = true`)
//! side by side with mitmproxy (PyPI, installed into `target/bench-python` when absent) and
//! squid's `ssl_bump` (Debian `squid-openssl`, installed when the `squid` on PATH lacks
//! OpenSSL), and direct TLS to the origin.
//!
//! Same origin, same client, same machine: the origin and the client are one binary
//! (`egress-proxy/examples/inspect_bench.rs`, rustls and hyper on both ends), the origin an
//! HTTPS server for `localhost` on loopback answering 64 bytes over HTTP/1.1 (`localhost`,
//! resolved from /etc/hosts by every peer: no DNS query leaves the machine). Each proxy runs
//! from a temp config on a loopback port of its own and trusts the origin's CA; the client
//! trusts each proxy's CA. Every figure is measured in rounds that visit the targets in
//! turn (rotated each round), reported as median [min–max] over rounds, ratios taken
//! within a round:
//! - requests/s on one open inspected tunnel (sequential keep-alive GETs), vs mitmproxy and
//!   squid-bump;
//! - new inspected tunnels/s (CONNECT, both handshakes, one GET, close; leaf cached; TLS
//!   resumption off), vs squid-bump;
//! - p50/p99 added per request on an open tunnel, against direct TLS to the origin;
//! - resident memory per idle inspected tunnel (the proxy and its children, over
//!   [`IDLE_TUNNELS`] tunnels left open after one request each), measured once per proxy
//!   before the rounds: afterwards freed heap would be reused and hide the cost.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::proxy::{build_release, free_port, loadavg, scratch_dir, spread, version_of, Running};
use super::uptime;
use crate::{cmd, setup};

const ROUNDS: usize = 5;
/// Seconds per requests/s and per new-tunnels/s sample.
const WINDOW_SECS: u64 = 2;
const TUNNEL_CLIENTS: u64 = 4;
const IDLE_TUNNELS: u64 = 200;
/// mitmproxy from PyPI, at the version measured.
const MITMPROXY: &str = "11.0.2";

struct Target {
    name: &'static str,
    /// `host:port` of the proxy, or `direct`.
    proxy: String,
    /// The CA the client trusts for this target.
    ca: PathBuf,
    pid: Option<u32>,
    version: String,
    samples: Map<String, Value>,
}

impl Target {
    fn push(&mut self, key: &str, v: f64) {
        self.samples
            .entry(key)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("array")
            .push(json!(v));
    }
    fn series(&self, key: &str) -> Vec<f64> {
        self.samples
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    }
}

/// Runs the inspection figures with `proxy_bin` (a release egress-proxy).
pub fn run(proxy_bin: &Path) -> Result<Value> {
    let load_start = loadavg();
    let uptime_start = uptime();
    let driver = build_release(&["--example", "inspect_bench"], "inspect_bench")?;
    let squid = ensure_squid_openssl()?;
    let mitm = ensure_mitmproxy()?;
    let dir = scratch_dir("tank-bench-inspect")?;
    let d = dir.path();

    let origin = Running {
        child: Command::new(&driver)
            .arg("origin")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the bench origin")?,
        addr: "127.0.0.1:0".parse()?,
        version: String::new(),
    };
    let port: u16 = wait_file(&d.join("origin.port"))?.trim().parse()?;
    let origin_ca = d.join("origin-ca.pem");

    let mut targets = vec![Target {
        name: "direct",
        proxy: "direct".into(),
        ca: origin_ca.clone(),
        pid: None,
        version: String::new(),
        samples: Map::new(),
    }];
    let mut running = vec![origin];
    for (name, start) in [
        ("egress-proxy", start_egress_proxy as StartFn),
        ("squid-bump", start_squid),
        ("mitmproxy", start_mitmproxy),
    ] {
        eprintln!("bench: starting {name}");
        let sub = d.join(name);
        std::fs::create_dir_all(&sub)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777))?;
        let tools = Tools {
            egress_proxy: proxy_bin,
            squid: &squid,
            mitm: &mitm,
        };
        let (r, ca) = start(&tools, &sub, port, &origin_ca)?;
        wait_listening(r.addr)?;
        targets.push(Target {
            name,
            proxy: r.addr.to_string(),
            ca,
            pid: Some(r.child.id()),
            version: r.version.clone(),
            samples: Map::new(),
        });
        running.push(r);
    }
    // Each proxy answers one whole exchange before the rounds begin.
    for t in &targets {
        client(&driver, "requests", t, port, &["1"])
            .with_context(|| format!("{} does not serve an inspected request", t.name))?;
    }

    // Idle memory once per proxy, before any load: later the heap a proxy freed would be
    // reused by new tunnels and hide their cost.
    for t in targets.iter_mut() {
        let Some(pid) = t.pid else { continue };
        let args = [IDLE_TUNNELS.to_string(), pid.to_string()];
        let v = client(&driver, "idle", t, port, &[&args[0], &args[1]])?;
        t.push(
            "idle_tunnel_kib",
            v["bytes_per_tunnel"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        );
    }
    for r in 0..ROUNDS {
        eprintln!("bench: inspection round {}/{ROUNDS}", r + 1);
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(k + r) % n];
            let v = client(&driver, "requests", t, port, &[&WINDOW_SECS.to_string()])?;
            t.push("requests_per_s", v["rps"].as_f64().unwrap_or(f64::NAN));
            t.push("request_p50_us", v["p50_us"].as_f64().unwrap_or(f64::NAN));
            t.push("request_p99_us", v["p99_us"].as_f64().unwrap_or(f64::NAN));
        }
        for k in 0..n {
            let t = &mut targets[(k + r) % n];
            if t.pid.is_none() {
                continue;
            }
            let args = [WINDOW_SECS.to_string(), TUNNEL_CLIENTS.to_string()];
            let v = client(&driver, "tunnels", t, port, &[&args[0], &args[1]])?;
            t.push("new_tunnels_per_s", v["per_s"].as_f64().unwrap_or(f64::NAN));
            t.push(
                "new_tunnel_errors",
                v["errors"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    drop(running);

    let get = |name: &str| targets.iter().find(|t| t.name == name).expect("target");
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let minus =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
    let (ours, squid_t, mitm_t, direct) = (
        get("egress-proxy"),
        get("squid-bump"),
        get("mitmproxy"),
        get("direct"),
    );
    let mut out_targets = Vec::new();
    for t in &targets {
        let mut f = Map::new();
        for key in t.samples.keys() {
            f.insert(key.clone(), spread(&t.series(key)));
        }
        if t.pid.is_some() {
            for p in ["50", "99"] {
                let key = format!("request_p{p}_us");
                f.insert(
                    format!("added_p{p}_us"),
                    spread(&minus(&t.series(&key), &direct.series(&key))),
                );
            }
        }
        out_targets.push(json!({ "target": t.name, "version": t.version, "figures": f }));
    }
    let rps = |t: &Target| t.series("requests_per_s");
    let tunnels = |t: &Target| t.series("new_tunnels_per_s");
    let comparisons = json!({
        "requests_ratio_to_mitmproxy": spread(&ratio(&rps(ours), &rps(mitm_t))),
        "requests_ratio_to_squid_bump": spread(&ratio(&rps(ours), &rps(squid_t))),
        "new_tunnels_ratio_to_squid_bump": spread(&ratio(&tunnels(ours), &tunnels(squid_t))),
        "added_p50_us": spread(&minus(&ours.series("request_p50_us"), &direct.series("request_p50_us"))),
        "added_p99_us": spread(&minus(&ours.series("request_p99_us"), &direct.series("request_p99_us"))),
        "idle_tunnel_kib": spread(&ours.series("idle_tunnel_kib")),
    });
    let median = |k: &str| comparisons[k]["median"].as_f64().unwrap_or(f64::NAN);
    let goals = json!({
        "requests_ge_10x_mitmproxy": median("requests_ratio_to_mitmproxy") >= 10.0,
        "requests_ge_2x_squid_bump": median("requests_ratio_to_squid_bump") >= 2.0,
        "new_tunnels_ge_2x_squid_bump": median("new_tunnels_ratio_to_squid_bump") >= 2.0,
        "added_p50_le_100_us": median("added_p50_us") <= 100.0,
        "idle_tunnel_le_64_kib": median("idle_tunnel_kib") <= 64.0,
    });
    let result = json!({
        "machine": {
            "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "uptime_start": uptime_start,
            "uptime_end": uptime(),
        },
        "settings": {
            "rounds": ROUNDS,
            "window_secs": WINDOW_SECS,
            "tunnel_clients": TUNNEL_CLIENTS,
            "idle_tunnels": IDLE_TUNNELS,
            "response_bytes": 64,
        },
        "targets": out_targets,
        "egress_proxy_vs_peers": comparisons,
        "goals": goals,
    });
    print_table(&result);
    Ok(result)
}

type StartFn = fn(&Tools, &Path, u16, &Path) -> Result<(Running, PathBuf)>;

struct Tools<'a> {
    egress_proxy: &'a Path,
    squid: &'a Path,
    mitm: &'a Path,
}

/// Starts `cmd` with its stderr in `sub/stderr.log`; the caller sets the address.
fn spawn(mut cmd: Command, sub: &Path, version: String) -> Result<Running> {
    let log = std::fs::File::create(sub.join("stderr.log"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    Ok(Running {
        child,
        addr: "127.0.0.1:0".parse()?,
        version,
    })
}

fn start_egress_proxy(
    t: &Tools,
    sub: &Path,
    port: u16,
    origin_ca: &Path,
) -> Result<(Running, PathBuf)> {
    let ca = sub.join("ca");
    cmd::run(
        Command::new(t.egress_proxy)
            .args(["ca", "init"])
            .arg(&ca)
            .args(["--domain", "localhost"]),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = format!(
        "listen = [\"{addr}\"]\nadmin_listen = \"off\"\nclient_networks = [\"127.0.0.0/8\"]\naudit_log = \"{}\"\nsystem_resolver = false\nallowed_domains = [{{ domain = \"localhost\", ports = [{port}], inspect = true, allow_private = true }}]\n[hosts]\n\"localhost\" = \"127.0.0.1\"\n[inspection]\nca_dir = \"{}\"\nupstream_ca = \"{}\"\n",
        sub.join("audit.jsonl").display(),
        ca.display(),
        origin_ca.display()
    );
    let path = sub.join("egress-proxy.toml");
    std::fs::write(&path, config)?;
    let mut c = Command::new(t.egress_proxy);
    c.args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn");
    let version = version_of(
        t.egress_proxy.to_str().unwrap_or("egress-proxy"),
        "--version",
    );
    let mut r = spawn(c, sub, version)?;
    r.addr = addr;
    Ok((r, ca.join("ca.pem")))
}

fn start_squid(t: &Tools, sub: &Path, _port: u16, origin_ca: &Path) -> Result<(Running, PathBuf)> {
    let (cert, key) = (sub.join("squid-ca.pem"), sub.join("squid-ca.key"));
    cmd::run(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=tank bench squid CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()),
    )?;
    let db = sub.join("ssl_db");
    cmd::run(
        Command::new("/usr/lib/squid/security_file_certgen")
            .arg("-c")
            .arg("-s")
            .arg(&db)
            .args(["-M", "16MB"])
            .stdout(Stdio::null()),
    )?;
    // squid drops to the `proxy` user: its files must be readable and writable by it.
    cmd::run(Command::new("chmod").args(["-R", "a+rwX"]).arg(sub))?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = format!(
        "http_port {addr} ssl-bump tls-cert={cert} tls-key={key} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB\n\
         sslcrtd_program /usr/lib/squid/security_file_certgen -s {db} -M 16MB\n\
         sslcrtd_children 4 startup=1 idle=1\n\
         acl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\n\
         tls_outgoing_options cafile={origin_ca}\nsslproxy_cert_error deny all\n\
         dns_nameservers 127.0.0.1\npinger_enable off\n\
         pid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log stdio:{d}/access.log\n\
         cache deny all\ncache_mem 8 MB\ncoredump_dir {d}\n\
         acl bench src 127.0.0.0/8\nhttp_access allow bench\nhttp_access deny all\n\
         shutdown_lifetime 0 seconds\nmax_filedescriptors 16384\nvia off\nforwarded_for delete\n",
        cert = cert.display(),
        key = key.display(),
        db = db.display(),
        origin_ca = origin_ca.display(),
        d = sub.display()
    );
    let path = sub.join("squid.conf");
    std::fs::write(&path, config)?;
    let mut c = Command::new(t.squid);
    c.args(["-N", "-f"]).arg(&path);
    let mut r = spawn(
        c,
        sub,
        version_of(t.squid.to_str().unwrap_or("squid"), "-v"),
    )?;
    r.addr = addr;
    Ok((r, cert))
}

fn start_mitmproxy(
    t: &Tools,
    sub: &Path,
    _port: u16,
    origin_ca: &Path,
) -> Result<(Running, PathBuf)> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let confdir = sub.join("conf");
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "from mitmproxy.tools.main import mitmdump; mitmdump()",
    ])
    .args(["--mode", "regular", "--listen-host", "127.0.0.1"])
    .args(["--listen-port", &addr.port().to_string()])
    .arg("--set")
    .arg(format!("confdir={}", confdir.display()))
    .arg("--set")
    .arg(format!(
        "ssl_verify_upstream_trusted_ca={}",
        origin_ca.display()
    ))
    .args(["--set", "termlog_verbosity=warn", "--set", "flow_detail=0"])
    .env("PYTHONPATH", t.mitm);
    let version = format!("mitmproxy {MITMPROXY}");
    let mut r = spawn(c, sub, version)?;
    r.addr = addr;
    let ca = confdir.join("mitmproxy-ca-cert.pem");
    wait_file(&ca)?;
    Ok((r, ca))
}

/// Runs one measurement of the driver against `t`; its JSON answer.
fn client(driver: &Path, mode: &str, t: &Target, port: u16, args: &[&str]) -> Result<Value> {
    let out = Command::new(driver)
        .arg(mode)
        .arg(&t.proxy)
        .arg(&t.ca)
        .arg(port.to_string())
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .context("cannot run the bench client")?;
    if !out.status.success() {
        bail!(
            "{mode} through {} failed: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("the bench client printed no JSON")
}

fn wait_file(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return Ok(text);
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear", path.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The `squid` on PATH if it was built with OpenSSL (ssl_bump), else installs
/// `squid-openssl` (which replaces Debian's GnuTLS `squid`, same binary path).
fn ensure_squid_openssl() -> Result<PathBuf> {
    let has_openssl = || {
        version_of("squid", "-v").contains("openssl")
            || Command::new("squid")
                .arg("-v")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--with-openssl"))
    };
    if !has_openssl() {
        eprintln!("bench: installing squid-openssl from Debian (ssl_bump)");
        setup::apt_install(&["squid-openssl"])?;
        if !has_openssl() {
            bail!("squid-openssl installed but `squid -v` shows no OpenSSL");
        }
    }
    Ok(PathBuf::from("squid"))
}

/// `target/bench-python` with mitmproxy [`MITMPROXY`] in it, installed from PyPI when absent.
fn ensure_mitmproxy() -> Result<PathBuf> {
    let dir = cmd::root().join("target/bench-python");
    setup::pip_packages(&dir, &[("mitmproxy", MITMPROXY)], false)?;
    Ok(dir)
}

fn print_table(r: &Value) {
    let m = &r["machine"];
    println!();
    println!(
        "inspection benchmark (loopback, {} CPUs, release build, {} rounds; {} at start, {} at end)",
        m["cpus"], r["settings"]["rounds"], m["uptime_start"], m["uptime_end"]
    );
    println!("each cell: median [min–max] over rounds; ratios and added latency are taken within each round");
    let cell = |f: &Value, k: &str| match &f[k] {
        Value::Null => String::new(),
        v => format!("{} [{}–{}]", v["median"], v["min"], v["max"]),
    };
    println!(
        "{:<14} {:>24} {:>20} {:>20} {:>20} {:>20} {:>22}",
        "target",
        "req/s one tunnel",
        "added p50 us",
        "added p99 us",
        "tunnels/s",
        "idle KiB/tunnel",
        "errors"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let f = &t["figures"];
        println!(
            "{:<14} {:>24} {:>20} {:>20} {:>20} {:>20} {:>22}",
            t["target"].as_str().unwrap_or("?"),
            cell(f, "requests_per_s"),
            cell(f, "added_p50_us"),
            cell(f, "added_p99_us"),
            cell(f, "new_tunnels_per_s"),
            cell(f, "idle_tunnel_kib"),
            cell(f, "new_tunnel_errors"),
        );
    }
    println!("egress-proxy vs peers: {}", r["egress_proxy_vs_peers"]);
    println!("goals: {}", r["goals"]);
}
