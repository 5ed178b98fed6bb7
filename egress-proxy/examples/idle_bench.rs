//! The clients and origins of `cargo xtask bench idle` (xtask/src/bench/idle.rs starts this
//! in a network namespace of its own and summarises what it prints): one egress-proxy holding
//! many idle CONNECT tunnels from many client addresses.
//!
//! `idle_bench PROXY_BIN DIR TUNNELS ROUNDS` sets the namespace up (loopback up, the local
//! port range widened, the accept backlogs raised: sysctls of this namespace only, refused
//! outside one), raises its open-files limit to `fs.nr_open` (the proxy inherits it; where
//! the hard limit cannot be raised, TUNNELS is cut to what the proxy's `max_connections`
//! then allows, and the output says why), starts hold origins on several loopback ports, a
//! closing origin and the proxy, and then:
//! - opens TUNNELS direct connections (client to origin, a 4-byte exchange each) and reads
//!   the kernel's slab memory before and after: what the client's and origin's sockets cost,
//!   subtracted from the tunnels' figure to leave the proxy's own kernel share;
//! - per round: new tunnels/s with none held; TUNNELS tunnels from 256 client addresses
//!   (127.1.j.1), each `CONNECT`, `200`, a 4-byte exchange through it (so both directions
//!   carried data once), then idle; the proxy's resident memory, descriptors and pipes and
//!   the kernel's slab memory once all are held; new tunnels/s while they are held; every
//!   refused or failed open counted by cause; all closed (reset) and drained again.
//!
//! Prints one JSON object. Everything lives in the namespace and goes with it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Hold origins, each on its own port: the proxy dials every tunnel from 127.0.0.1, and one
/// destination port gives it at most one local port range of connections.
const ORIGIN_PORTS: usize = 8;
/// Client source addresses, 127.1.j.1: an agent host each.
const CLIENT_ADDRS: usize = 256;
/// Opens in flight at once while filling.
const OPENERS: usize = 256;
/// New tunnels/s: client loops and window.
const RATE_CLIENTS: usize = 4;
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// One open (connect, `CONNECT`, `200`, exchange) gives up after this.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause after the last open before reading memory: the last records written, tasks parked.
const SETTLE: Duration = Duration::from_secs(2);
/// Connections kept free below `max_connections` while the tunnels are held: the rate
/// clients' (no more than [`RATE_CLIENTS`] at once) and any still closing.
const HEADROOM: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bin, dir, tunnels, rounds] = &args[..] else {
        panic!("usage: idle_bench PROXY_BIN DIR TUNNELS ROUNDS");
    };
    let tunnels: usize = tunnels.parse().expect("TUNNELS: a number");
    let rounds: usize = rounds.parse().expect("ROUNDS: a number");
    prepare_namespace();
    let nofile = raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(bench(
        Path::new(bin),
        Path::new(dir),
        tunnels,
        rounds,
        nofile,
    ));
    println!("{out}");
}

/// Loopback up and this namespace's limits raised; refuses to touch the host's.
fn prepare_namespace() {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read netns");
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    assert_ne!(
        ns("self"),
        ns(&parent.to_string()),
        "idle_bench must run in a network namespace of its own (cargo xtask bench idle starts it in one)"
    );
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(ok.success(), "ip link set lo up failed");
    for (key, value) in [
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/core/somaxconn", "65535"),
        ("net/ipv4/tcp_max_syn_backlog", "65535"),
    ] {
        std::fs::write(format!("/proc/sys/{key}"), value)
            .unwrap_or_else(|e| panic!("cannot set {key} in the bench namespace: {e}"));
    }
}

/// Raises this process's open-files limit (the proxy inherits it) to `fs.nr_open`, or where
/// the hard limit cannot be raised (no CAP_SYS_RESOURCE) the soft limit to the hard one;
/// returns the limit and, when it is short of `nr_open`, why.
fn raise_nofile() -> (u64, Option<String>) {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("read fs.nr_open")
        .trim()
        .parse()
        .expect("fs.nr_open");
    let mut lim = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            return (nr_open, None);
        }
        let why = std::io::Error::last_os_error();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        let note = format!(
            "RLIMIT_NOFILE hard limit {} could not be raised to fs.nr_open {nr_open} ({why}; raising it needs CAP_SYS_RESOURCE)",
            lim.rlim_max
        );
        (lim.rlim_max, Some(note))
    }
}

async fn bench(
    bin: &Path,
    dir: &Path,
    requested: usize,
    rounds: usize,
    (nofile, nofile_note): (u64, Option<String>),
) -> Value {
    let origins = Arc::new(Origins::start().await);
    let (proxy, max_connections) = ProxyProcess::start(bin, dir, &origins, requested + HEADROOM);
    // As many as max_connections leaves room for beside the rate clients: all requested
    // unless the proxy lowered it to its descriptor cap.
    let tunnels = requested.min(max_connections - HEADROOM);
    if tunnels < requested {
        eprintln!(
            "idle_bench: the proxy serves at most {max_connections} connections here; holding {tunnels}, not {requested}"
        );
    }
    let plan = |via: Option<SocketAddr>| Plan {
        proxy: via,
        origins: origins.clone(),
    };

    // Warm up (runtime threads, allocator arenas, the audit writer), then the baselines.
    let warm = plan(Some(proxy.addr)).open_many(tunnels.min(2000)).await;
    assert!(
        warm.failures.is_empty(),
        "warm-up failed: {:?}",
        warm.failures
    );
    close(warm.streams);
    let base = proxy.drained(None).await;

    // The client's and origin's sockets alone: the same opens, no proxy between.
    let before = Snapshot::take(proxy.pid);
    let direct = plan(None).open_many(tunnels).await;
    assert!(
        direct.failures.is_empty(),
        "direct connections failed: {:?}",
        direct.failures
    );
    tokio::time::sleep(SETTLE).await;
    let after = Snapshot::take(proxy.pid);
    let direct_slab = after.slab_bytes as f64 - before.slab_bytes as f64;
    let direct_slab_kib = after.slab_kib as f64 - before.slab_kib as f64;
    close(direct.streams);
    proxy.drained(Some(&base)).await;

    let mut out = Vec::new();
    for round in 0..rounds {
        eprintln!("idle_bench: round {}/{rounds}", round + 1);
        let rate_none = rate(proxy.addr, origins.closer).await;
        let before = Snapshot::take(proxy.pid);
        let started = Instant::now();
        let held = plan(Some(proxy.addr)).open_many(tunnels).await;
        let fill_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let at = Snapshot::take(proxy.pid);
        let rate_held = rate(proxy.addr, origins.closer).await;
        let n = held.streams.len().max(1) as f64;
        let slab = at.slab_bytes as f64 - before.slab_bytes as f64;
        out.push(json!({
            "opened": held.streams.len(),
            "refused_or_failed": held.failures.values().sum::<u64>(),
            "failures": held.failures,
            "fill_secs": fill_secs,
            "fill_per_s": n / fill_secs,
            "proxy_rss_kib": at.rss_kib,
            "proxy_rss_kib_per_tunnel": (at.rss_kib as f64 - base.rss_kib as f64) / n,
            "proxy_fds_per_tunnel": (at.fds as f64 - base.fds as f64) / n,
            "proxy_pipe_fds": at.pipes,
            "kernel_slab_object_bytes_per_tunnel": slab / n,
            "kernel_proxy_slab_object_bytes_per_tunnel": (slab - direct_slab) / n,
            "kernel_slab_kib_per_tunnel": (at.slab_kib as f64 - before.slab_kib as f64) / n,
            "kernel_proxy_slab_kib_per_tunnel": (at.slab_kib as f64 - before.slab_kib as f64 - direct_slab_kib) / n,
            "new_tunnels_per_s_none_held": rate_none.0,
            "new_tunnels_per_s_held": rate_held.0,
            "rate_errors_none_held": rate_none.1,
            "rate_errors_held": rate_held.1,
        }));
        close(held.streams);
        proxy.drained(Some(&base)).await;
    }
    let log = proxy.stop();
    json!({
        "tunnels_requested": requested,
        "tunnels": tunnels,
        "nofile": nofile,
        "nofile_note": nofile_note,
        "client_addrs": CLIENT_ADDRS,
        "origin_ports": ORIGIN_PORTS,
        "max_connections": max_connections,
        "proxy_base": { "rss_kib": base.rss_kib, "fds": base.fds, "pipe_fds": base.pipes },
        "direct_kernel_slab_kib_per_connection": direct_slab_kib / tunnels as f64,
        "direct_kernel_slab_object_bytes_per_connection": direct_slab / tunnels as f64,
        "rounds": out,
        "proxy_warnings": log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20).collect::<Vec<_>>(),
    })
}

// ---- origins ----------------------------------------------------------------------------

struct Origins {
    /// Echo a 4-byte exchange, then hold the connection until the peer goes.
    hold: Vec<SocketAddr>,
    /// Hold the connection until the peer closes, then reset (the new-tunnel rate).
    closer: SocketAddr,
}

impl Origins {
    async fn start() -> Origins {
        let mut hold = Vec::new();
        for _ in 0..ORIGIN_PORTS {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            hold.push(l.local_addr().unwrap());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let mut b = [0u8; 4];
                        if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                            while let Ok(1..) = s.read(&mut b).await {}
                        }
                    });
                }
            });
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closer = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    while let Ok(1..) = s.read(&mut b).await {}
                    reset_on_close(&s);
                });
            }
        });
        Origins { hold, closer }
    }
}

// ---- clients ----------------------------------------------------------------------------

/// Where opens go: through the proxy, or (`None`) straight to the origins.
struct Plan {
    proxy: Option<SocketAddr>,
    origins: Arc<Origins>,
}

struct Opened {
    streams: Vec<TcpStream>,
    failures: BTreeMap<String, u64>,
}

impl Plan {
    /// Opens `n` connections, [`OPENERS`] at a time, the i-th from client address
    /// `i % CLIENT_ADDRS` to hold origin `i % ORIGIN_PORTS`, each with one exchange.
    async fn open_many(self, n: usize) -> Opened {
        let plan = Arc::new(self);
        let next = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let mut workers = Vec::new();
        for _ in 0..OPENERS {
            let (plan, next, failures) = (plan.clone(), next.clone(), failures.clone());
            workers.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return mine;
                    }
                    let src = Ipv4Addr::new(127, 1, (i % CLIENT_ADDRS) as u8, 1);
                    let origin = plan.origins.hold[i % ORIGIN_PORTS];
                    let attempt =
                        tokio::time::timeout(OPEN_TIMEOUT, open(plan.proxy, src, origin, true))
                            .await
                            .unwrap_or_else(|_| Err("timed out".into()));
                    match attempt {
                        Ok(s) => mine.push(s),
                        Err(why) => {
                            *failures.lock().unwrap().entry(why).or_insert(0) += 1;
                        }
                    }
                }
            }));
        }
        let mut streams = Vec::with_capacity(n);
        for w in workers {
            streams.extend(w.await.unwrap());
        }
        let failures = std::mem::take(&mut *failures.lock().unwrap());
        Opened { streams, failures }
    }
}

/// One connection from `src` to `target`, through `proxy` (`CONNECT`, `200`) or direct;
/// with `exchange`, 4 bytes there and back. The error names the cause (status line or
/// socket error), for counting.
async fn open(
    proxy: Option<SocketAddr>,
    src: Ipv4Addr,
    target: SocketAddr,
    exchange: bool,
) -> Result<TcpStream, String> {
    let e = |e: std::io::Error| e.kind().to_string();
    let sock = TcpSocket::new_v4().map_err(e)?;
    // The port is then chosen at connect, per destination, not reserved per source address.
    set_option(
        &sock,
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1 as libc::c_int,
    );
    sock.bind(SocketAddr::new(src.into(), 0)).map_err(e)?;
    let mut s = sock.connect(proxy.unwrap_or(target)).await.map_err(e)?;
    s.set_nodelay(true).map_err(e)?;
    if proxy.is_some() {
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .map_err(e)?;
        let mut head = Vec::with_capacity(128);
        let mut b = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).await.map_err(e)?;
            if n == 0 || head.len() > 8192 {
                return Err("closed during the CONNECT answer".into());
            }
            head.extend_from_slice(&b[..n]);
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            let line = String::from_utf8_lossy(&head);
            return Err(line.lines().next().unwrap_or_default().to_owned());
        }
    }
    if exchange {
        s.write_all(b"ping").await.map_err(e)?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.map_err(e)?;
    }
    Ok(s)
}

/// A reset on close: no TIME_WAIT left behind by hundreds of thousands of connections.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(s, libc::SOL_SOCKET, libc::SO_LINGER, linger);
}

/// setsockopt(2) of a plain value on a socket we own; best effort (a bench client).
fn set_option<T>(s: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: T) {
    // SAFETY: `value` lives across the call and its size is passed with it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
}

fn close(streams: Vec<TcpStream>) {
    for s in streams {
        reset_on_close(&s);
    }
}

/// New tunnels per second for [`RATE_WINDOW`]: [`RATE_CLIENTS`] loops of connect,
/// `CONNECT` the closing origin, `200`, reset. Returns the rate and the failures.
async fn rate(proxy: SocketAddr, closer: SocketAddr) -> (f64, u64) {
    let start = Instant::now();
    let mut loops = Vec::new();
    for k in 0..RATE_CLIENTS {
        loops.push(tokio::spawn(async move {
            let src = Ipv4Addr::new(127, 3, 0, k as u8 + 1);
            let (mut ok, mut failed) = (0u64, 0u64);
            while start.elapsed() < RATE_WINDOW {
                match tokio::time::timeout(OPEN_TIMEOUT, open(Some(proxy), src, closer, false))
                    .await
                {
                    Ok(Ok(s)) => {
                        reset_on_close(&s);
                        ok += 1;
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for l in loops {
        let (o, f) = l.await.unwrap();
        (ok, failed) = (ok + o, failed + f);
    }
    (ok as f64 / start.elapsed().as_secs_f64(), failed)
}

// ---- the proxy and what it holds ---------------------------------------------------------

struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    pid: u32,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts the proxy asking for `max_connections`; returns it with the `max_connections`
    /// in force (lower where the open-files limit leaves room for fewer, as its log says).
    fn start(
        bin: &Path,
        dir: &Path,
        origins: &Origins,
        max_connections: usize,
    ) -> (ProxyProcess, usize) {
        let ports: Vec<String> = origins
            .hold
            .iter()
            .chain([&origins.closer])
            .map(|a| a.port().to_string())
            .collect();
        // Tunnels outlive the run (idle_timeout_secs); the per-client cap stays the default.
        let config = format!(
            "listen = [\"127.0.0.1:0\"]\nadmin_listen = \"off\"\nclient_networks = [\"127.0.0.0/8\"]\naudit_log = \"{}\"\nsystem_resolver = false\nallowed_domains = [{{ domain = \"127.0.0.1\", ports = [{}], allow_private = true }}]\n[limits]\nmax_connections = {max_connections}\nidle_timeout_secs = 3600\n",
            dir.join("audit.jsonl").display(),
            ports.join(", ")
        );
        let path = dir.join("egress-proxy.toml");
        std::fs::write(&path, config).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = dir.join("proxy.log");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start egress-proxy");
        // Owned from here on, so a failure below still stops it.
        let mut proxy = ProxyProcess {
            pid: child.id(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let bound: Value = loop {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                panic!(
                    "egress-proxy exited with {status}:\n{}",
                    std::fs::read_to_string(&proxy.log).unwrap_or_default()
                );
            }
            if let Some(v) = std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            assert!(Instant::now() < deadline, "egress-proxy did not come up");
            std::thread::sleep(Duration::from_millis(50));
        };
        proxy.addr = bound["listen"][0].as_str().unwrap().parse().unwrap();
        let text = std::fs::read_to_string(&proxy.log).unwrap_or_default();
        let in_force = match text.split_once("lowered to ") {
            Some((_, rest)) => rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unreadable line about max_connections:\n{text}")),
            None => max_connections,
        };
        (proxy, in_force)
    }

    /// Waits (at most 2 minutes) until the proxy holds no more descriptors than `base` (or,
    /// without one, until its count stops falling), and the namespace's TCP sockets are
    /// gone; returns the snapshot then.
    async fn drained(&self, base: Option<&Snapshot>) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = Snapshot::take(self.pid);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = Snapshot::take(self.pid);
            let settled = match base {
                // Slack for the pipes the relay keeps pooled.
                Some(b) => now.fds <= b.fds + 256,
                None => now.fds == last.fds,
            };
            if settled && now.tcp_inuse < 2 * ORIGIN_PORTS + 16 {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy still holds {} descriptors ({} TCP sockets in the namespace) 2 min after every tunnel was closed",
                now.fds,
                now.tcp_inuse
            );
            last = now;
        }
    }

    /// Stops the proxy and returns its log.
    fn stop(self) -> String {
        let log = self.log.clone();
        drop(self);
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    /// SIGTERM, then SIGKILL after 10 s; also when the bench fails half-way.
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy's memory and descriptors and the kernel's slab memory at one moment.
struct Snapshot {
    rss_kib: u64,
    fds: usize,
    pipes: usize,
    /// Bytes of the slab objects in use, all caches (`/proc/slabinfo`).
    slab_bytes: u64,
    /// `Slab:` of /proc/meminfo (whole pages, all caches).
    slab_kib: u64,
    /// TCP sockets of this namespace (`/proc/net/sockstat`).
    tcp_inuse: usize,
}

impl Snapshot {
    fn take(pid: u32) -> Snapshot {
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {key}"))
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
        let (mut fds, mut pipes) = (0, 0);
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            fds += 1;
            if std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
            {
                pipes += 1;
            }
        }
        Snapshot {
            rss_kib: field(&status, "VmRSS:"),
            fds,
            pipes,
            slab_bytes: slab_bytes(),
            slab_kib: field(&meminfo, "Slab:"),
            tcp_inuse: field(&sockstat, "TCP: inuse") as usize,
        }
    }
}

/// Sum over `/proc/slabinfo` of objects in use times object size.
fn slab_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/slabinfo").expect("read /proc/slabinfo (root)");
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(1)?.parse::<u64>().ok()? * f.get(3)?.parse::<u64>().ok()?)
        })
        .sum()
}
