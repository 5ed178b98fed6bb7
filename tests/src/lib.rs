//! Fixtures for tank's root integration tests: unique cgroups, a real loader process, and
//! probes run inside the guarded cgroup.
//!
//! Every fixture removes what it created when dropped, also when a test panics: processes are
//! killed, cgroups removed, pins detached. Tests panic with a message rather than skip: a root
//! test that cannot get what it needs must fail loudly in CI.

pub mod appliance;
pub mod browser;
pub mod fleet;
pub mod prometheus;
pub mod reroute;
pub mod seccomp;
pub mod store;
pub mod topology;

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tank_ebpf_common::chain;
pub use tank_ebpf_common::ocsf::kernel::NetworkRecord;
use tank_ebpf_common::ocsf::{self, Kind};

/// Panics unless the tests run as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tank's integration tests need root (cgroup v2, BPF, nftables, network namespaces): run `cargo xtask test` as root"
    );
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a binary of this workspace built with the same profile as the running executable
/// (a test in `target/<profile>/deps/` or a binary in `target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile directory");
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; `cargo xtask test` builds every binary first",
        bin.display()
    );
    bin
}

/// A uniquely named cgroup tree for one test: `/<name>/agent` (guarded) and `/<name>/sibling`.
pub struct TestCgroups {
    /// The parent directory.
    pub root: PathBuf,
    /// Path of the agent cgroup inside the hierarchy (for the loader's config).
    pub agent_path: String,
    /// The agent cgroup's directory.
    pub agent: PathBuf,
    /// A sibling cgroup, not guarded.
    pub sibling: PathBuf,
}

impl TestCgroups {
    /// Creates the tree under the cgroup2 mount.
    // Not `Default`: creating cgroups is a side effect, not a default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        require_root();
        let name = unique("tank-it");
        let root = tank_loader::cgroup::cgroup2_mount()
            .expect("cgroup2 mount")
            .join(&name);
        let agent = root.join("agent");
        let sibling = root.join("sibling");
        for dir in [&root, &agent, &sibling] {
            std::fs::create_dir(dir)
                .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        }
        Self {
            agent_path: format!("/{name}/agent"),
            root,
            agent,
            sibling,
        }
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for dir in [&self.agent, &self.sibling] {
            kill_all_in(dir);
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Kills every process in the cgroup at `dir` and waits (bounded) until it is empty.
pub fn kill_all_in(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            return;
        }
        for pid in procs.lines().filter_map(|p| p.parse().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `tank-loader run`, its config and its files, in a temporary directory.
pub struct Loader {
    child: Option<Child>,
    bin: PathBuf,
    /// Temporary directory holding config, log and notify socket.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The audit log.
    pub audit_log: PathBuf,
    /// The bpffs pin directory.
    pub pin_dir: PathBuf,
    /// The loader's stderr (its logs), appended to by every start.
    pub log: PathBuf,
    /// The nftables table the config names (unique per loader unless the test names one).
    pub nft_table: Option<String>,
    /// Extra environment for the loader process.
    env: Vec<(String, String)>,
    /// Network namespace the loader and its CLI run in (the agent host's), if not ours.
    netns: Option<PathBuf>,
    /// Host name of a UTS namespace of their own, if not ours.
    hostname: Option<String>,
}

impl Loader {
    /// Writes a config (`extra` is appended TOML: mode, proxies, allow, ring size) and starts
    /// the loader, returning once it told us (sd_notify) that enforcement is in place.
    ///
    /// Unless `extra` has an `[nft]` section (see [`nft_section`]), the nftables layer is off,
    /// so a test of the BPF gate sees the gate alone (audit mode then refuses nothing). The
    /// table a config names is removed on drop, also when the loader could not remove it.
    pub fn start(cgroups: &TestCgroups, extra: &str) -> Self {
        let mut loader = Self::configure(cgroups, extra);
        loader.restart();
        loader
    }

    /// Writes the config like [`Loader::start`] without starting anything.
    pub fn configure(cgroups: &TestCgroups, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("tank-it"));
        let audit_log = dir.path().join("kernel-audit.jsonl");
        let config = dir.path().join("loader.toml");
        let mut text = format!(
            "cgroup = \"{}\"\npin_dir = \"{}\"\naudit_log = \"{}\"\n{extra}\n",
            cgroups.agent_path,
            pin_dir.display(),
            audit_log.display()
        );
        if !extra.contains("[nft]") {
            text += &format!(
                "[nft]\nenabled = false\ntable = \"{}\"\n",
                unique("tank-it")
            );
        }
        let nft_table = tank_loader::config::Config::parse(&text, "test")
            .ok()
            .map(|c| c.nft.table);
        std::fs::write(&config, text).expect("write config");
        let bin = workspace_bin("tank-loader");
        let log = dir.path().join("loader.log");
        Self {
            child: None,
            bin,
            dir,
            config,
            audit_log,
            pin_dir,
            log,
            nft_table,
            env: Vec::new(),
            netns: None,
            hostname: None,
        }
    }

    /// Sets an environment variable for the next starts.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Runs the loader and its CLI inside the network namespace at `path` from now on (its
    /// nftables baseline lives there).
    pub fn set_netns(&mut self, path: &Path) {
        self.netns = Some(path.to_owned());
    }

    /// Runs the loader and its CLI under the host name `name` from now on (a UTS namespace
    /// of their own), so its records name that host.
    pub fn set_hostname(&mut self, name: &str) {
        self.hostname = Some(name.to_owned());
    }

    /// `tank-loader` as a command, in the loader's network namespace.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        if let Some(ns) = &self.netns {
            topology::enter_netns(&mut cmd, ns);
        }
        if let Some(name) = &self.hostname {
            topology::own_hostname(&mut cmd, name);
        }
        cmd
    }

    /// Starts (again) the loader on the same config and waits until it is ready.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// Starts the loader and waits (bounded) until it is ready or has exited. On failure,
    /// returns what it wrote to stderr (its one-line error and logs).
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "loader already running");
        let socket_path = self.dir.path().join("notify.sock");
        let _ = std::fs::remove_file(&socket_path);
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len()) as usize;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("loader log");
        let mut child = self
            .command()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &socket_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn tank-loader");
        let this_run = |log: &Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .get(log_start..)
                .unwrap_or_default()
                .to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 256];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    assert!(
                        buf[..n].starts_with(b"READY=1"),
                        "unexpected notify message"
                    );
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    panic!("notify socket: {e}")
                }
                Err(_) => {}
            }
            if let Some(status) = child.try_wait().expect("poll tank-loader") {
                return Err(format!(
                    "tank-loader exited ({status}) before it was ready: {}",
                    this_run(&self.log)
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "tank-loader did not become ready in 20 s: {}",
                    this_run(&self.log)
                ));
            }
        }
    }

    /// Everything the loader wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The loader's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 tank-loader");
            child.wait().expect("reap tank-loader");
        }
    }

    /// SIGTERM and wait: the loader drains what is pending and exits 0.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let status = child.wait().expect("wait for tank-loader");
            assert!(
                status.success(),
                "tank-loader exited with {status} on SIGTERM"
            );
        }
    }

    /// Runs `tank-loader ARGS... --config <ours>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run tank-loader")
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Waits (bounded) for the connection record of process `pid` and returns it.
    pub fn record_of(&self, pid: u32) -> NetworkRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = network_records(&self.audit_log);
            if let Some(r) = records.iter().find(|r| r.actor.process.pid == pid) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no record of pid {pid} in {records:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) for a connection record matching `wanted` and returns it.
    pub fn wait_record(&self, wanted: impl Fn(&NetworkRecord) -> bool) -> NetworkRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = network_records(&self.audit_log);
            if let Some(r) = records.iter().find(|r| wanted(r)) {
                return r.clone();
            }
            assert!(Instant::now() < deadline, "no such record in {records:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the audit log has at least `n` connection records, then returns
    /// them all, after checking the log's hash chain is intact.
    pub fn records(&self, n: usize) -> Vec<NetworkRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = network_records(&self.audit_log);
            if records.len() >= n || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.kill9();
        let _ = self.cli(&["detach"]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(table) = &self.nft_table {
            let _ = tank_loader::nft::remove(table);
        }
    }
}

/// An `[nft]` config section that turns the nftables layer on with a table no other test uses
/// (`extra` holds more keys of the section, e.g. `uid_range = "..."`); returns it and the name.
pub fn nft_section(extra: &str) -> (String, String) {
    let table = unique("tank-it");
    (
        format!("\n[nft]\nenabled = true\ntable = \"{table}\"\n{extra}\n"),
        table,
    )
}

/// The connection records of a verified kernel audit log (panics if the chain is broken).
///
/// A loader may be appending while this reads: a read that catches a batch half-written
/// (the file grows a page at a time, so its last line is not yet whole) is taken again, for a
/// bounded while. A partial last line that stays, and any other problem, panics.
pub fn network_records(log: &Path) -> Vec<NetworkRecord> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (report, records) = loop {
        let Ok((report, records)) = chain::read(log) else {
            return Vec::new();
        };
        let mid_write = matches!(
            report.problems.as_slice(),
            [chain::Problem::PartialLastLine { .. }]
        );
        if !mid_write || Instant::now() >= deadline {
            break (report, records);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        report.is_intact(),
        "audit log {} does not verify: {:?}",
        log.display(),
        report.problems
    );
    records
        .into_iter()
        .filter_map(|r| match ocsf::parse(&r.value) {
            Ok(Kind::Kernel(k)) => Some(k),
            Ok(_) => None,
            Err(e) => panic!("line {} of {}: {e}", r.line, log.display()),
        })
        .collect()
}

/// Runs `tank-probe` inside the cgroup at `cgroup` (as `uid` if given) and returns its pid
/// and answer.
pub fn probe(cgroup: &Path, uid: Option<u32>, args: &[&str]) -> (u32, String) {
    probe_with(
        cgroup,
        &ProbeOpts {
            uid,
            ..ProbeOpts::default()
        },
        args,
    )
}

/// Where and how a probe runs, besides its cgroup.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeOpts<'a> {
    /// Drop to this user (and group) after joining the cgroup.
    pub uid: Option<u32>,
    /// Enter this network namespace (a [`TestNetns`]) first.
    pub netns: Option<&'a Path>,
    /// Apply the agent container's seccomp profile right before the attempt.
    pub seccomp: bool,
}

/// `tank-probe` with its options, to run in the background (see `serve`).
pub fn probe_command(cgroup: &Path, opts: &ProbeOpts<'_>) -> Command {
    let mut cmd = Command::new(workspace_bin("tank-probe"));
    cmd.arg("--cgroup").arg(cgroup);
    if let Some(netns) = opts.netns {
        cmd.arg("--netns").arg(netns);
    }
    if let Some(uid) = opts.uid {
        cmd.args(["--uid", &uid.to_string()]);
    }
    if opts.seccomp {
        cmd.arg("--seccomp");
    }
    cmd
}

/// [`probe`] with every option.
pub fn probe_with(cgroup: &Path, opts: &ProbeOpts<'_>, args: &[&str]) -> (u32, String) {
    let child = probe_command(cgroup, opts)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tank-probe");
    let pid = child.id();
    let out = child.wait_with_output().expect("tank-probe");
    assert!(
        out.status.success(),
        "tank-probe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Counters from `status --json`, by name.
pub fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing from status: {status}"))
}

/// A network namespace of its own for one test, with an interface `tank0` holding
/// documentation and link-local addresses (192.0.2.1/24, 2001:db8::1/64, fe80::1/64) and ping
/// sockets open to every group. Traffic to those addresses never leaves the namespace.
pub struct TestNetns {
    netns: topology::Netns,
    /// `/run/netns/<name>`, for setns.
    pub path: PathBuf,
}

impl TestNetns {
    /// Creates it (with `ip`), panicking with the command's error if it cannot.
    // Not `Default`: creating a namespace is a side effect, not a default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let netns = topology::Netns::new();
        for args in [
            // A veth pair with both ends inside: the dummy driver is not on every kernel.
            &[
                "link", "add", "tank0", "type", "veth", "peer", "name", "tank1",
            ][..],
            &["link", "set", "tank0", "up"],
            &["link", "set", "tank1", "up"],
            &["addr", "add", "192.0.2.1/24", "dev", "tank0"],
            &["addr", "add", "2001:db8::1/64", "dev", "tank0", "nodad"],
            &["addr", "add", "fe80::1/64", "dev", "tank0", "nodad"],
        ] {
            netns.ip(args);
        }
        let ns = Self {
            path: netns.path.clone(),
            netns,
        };
        // ping_group_range is per namespace; opening it here lets the sock_create hook, not
        // the sysctl, be what refuses a ping socket.
        ns.netns.sysctl("net/ipv4/ping_group_range", "0 2147483647");
        ns
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates stay there.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path, f)
    }

    /// Interface index of `tank0`, for link-local scope ids.
    pub fn ifindex(&self) -> u32 {
        self.in_netns(|| nix::net::if_::if_nametoindex("tank0").expect("tank0 exists"))
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(path).expect("open the network namespace");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the network namespace");
                f()
            })
            .join()
            .expect("netns thread")
    })
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (package iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A packet capture on one interface inside a network namespace: the far side's view. It keeps
/// the IP destination of every frame arriving there (not sent from there) whose bytes contain
/// the marker, so a test sees where the agent's marked packets really went.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<IpAddr>>,
}

impl Capture {
    /// Starts capturing on `ifname` in the namespace at `netns`; returns once the socket is bound.
    pub fn start(netns: &Path, ifname: &str, marker: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (netns, ifname, marker) = (
            netns.to_owned(),
            ifname.to_owned(),
            marker.as_bytes().to_owned(),
        );
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("open the network namespace");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the network namespace");
            let sock = packet_socket(&ifname);
            ready_tx.send(()).unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: an all-zero sockaddr_ll is valid; recvfrom fills it.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buf and from outlive the call; their lengths are passed.
                let n = unsafe {
                    libc::recvfrom(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let frame = &buf[..n as usize];
                if !frame.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    continue;
                }
                if let Some(dst) = ip_destination(frame) {
                    seen.push(dst);
                }
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture ready");
        Self { stop, thread }
    }

    /// Waits for frames still in flight, stops, and returns the destinations seen.
    pub fn finish(self) -> Vec<IpAddr> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

/// An AF_PACKET socket (network-layer frames) bound to `ifname`, with a short receive timeout
/// so the capture loop can notice its stop flag.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket(2).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ifindex = nix::net::if_::if_nametoindex(ifname).unwrap_or_else(|e| panic!("{ifname}: {e}"));
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll outlives the call.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of_val(&sll) as u32,
        )
    };
    assert!(
        rc == 0,
        "bind AF_PACKET to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: timeout outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of_val(&timeout) as u32,
        )
    };
    sock
}

/// The destination address of an IPv4 or IPv6 packet.
fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?)),
        6 => Some(IpAddr::from(
            <[u8; 16]>::try_from(packet.get(24..40)?).ok()?,
        )),
        _ => None,
    }
}

/// The `bpf(2)` command `cmd` with the attribute `attr` (a zero-padded `union bpf_attr`, as
/// u32 words), for the commands aya has no public call for: the descriptor it returns, or a
/// panic naming `what`.
pub fn bpf_fd(cmd: libc::c_long, attr: &mut [u32], what: &str) -> OwnedFd {
    // SAFETY: `attr` is valid for its length, which is the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor the kernel just returned, owned from here on.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}
