//! The appliance boots for real: image/'s units, drop-ins, sysusers, tmpfiles and configs
//! under a real systemd as PID 1, in `systemd-nspawn`, checked from outside the container.
//!
//! The Fedora bootc image cannot be built here, but everything it installs for the agent host
//! can be installed into a minimal Debian root (made once with `mmdebstrap` from the machine's
//! own Debian mirror and cached under /var/cache/tank-tests, keyed by what goes into it). Each
//! run boots that root read-only below a fresh overlay, so the cache is never changed and a
//! run leaves nothing in it.
//!
//! What the container gets is what a real agent host gives the loader: its own network
//! namespace with a veth to a far side (where listeners play the proxy and "somewhere else"), a
//! bpffs of its own at /sys/fs/bpf, the capabilities tank-loader.service asks for on top of
//! nspawn's defaults (no `--capability=all`), and nspawn's own system-call filter plus bpf(2),
//! which that filter lacks and the unit allows. Its cgroups live below a uniquely named cgroup
//! in each hierarchy of the host.
//!
//! Checked from outside, in order, on one boot: tank-loader.service is active through READY=1
//! before user@2000.service starts; the stand-in reaches the proxy and not elsewhere (judged by
//! the far side), both recorded in /var/log/tank; the chain anchors in the journal match the
//! log; `systemd-analyze security` gives the exposure docs/operations.md states; kill -9 of the
//! loader while an attacker in the agent's cgroup keeps trying: restarted, nothing arrives, the
//! agent keeps running; the manager stopped and started (a new cgroup) is guarded before the
//! stand-in runs again; each layer alone keeps the agent in; a broken loader.toml keeps the
//! manager from starting at all until it is fixed.
//!
//! Paths: the image's files are installed unchanged at the image's paths. No rewrite is needed:
//! a bookworm root is merged-/usr (checked), so the Fedora paths `/usr/lib/systemd/system`,
//! `/usr/lib/sysusers.d`, `/usr/lib/tmpfiles.d`, `/usr/bin/mountpoint` and `/usr/sbin/nologin`
//! name the same files as Debian's `/lib/...`, `/bin/...` and `/sbin/...`; `/var/home`, which
//! Debian lacks, is created by the image's own tmpfiles.d entry.
//!
//! Not the appliance: Debian's Podman is 4.3 and Quadlet came in 4.4, so the agent Quadlet is
//! replaced by a stand-in user service at the same place in the tree (a service of the agent
//! user's manager, started by its default.target, reading /etc/tank/agent.env) that tries the
//! proxy and somewhere else. First boot is played by installing the two files cloud-init's
//! example writes (image/cloud-init/user-data.yaml) with the far side's address for the proxy.
//! The agent user lingers through the image's tmpfiles.d entry, so logind starts its manager
//! at boot as on the appliance.
//!
//! Root only; needs `mmdebstrap`, `systemd-nspawn` (Debian `systemd-container`), `nsenter`,
//! `ip`; `cargo xtask setup` installs them. The first run downloads the root (30 s on a quiet
//! machine, 3 min under load); later runs take about 20-35 s.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tank_ebpf_common::{chain, ocsf};
use tank_integration_tests::appliance::{cloud_init_file, parse_ini, read, values, AGENT_UID};
use tank_integration_tests::topology::{self, Netns};
use tank_integration_tests::{
    in_netns, kill_all_in, network_records, probe_with, require_root, unique, workspace_bin,
    NetworkRecord, ProbeOpts,
};

/// What goes into the cached root besides Debian's essential set, and why.
const PACKAGES: &[(&str, &str)] = &[
    ("systemd", "PID 1, journald, logind, tmpfiles, sysusers"),
    ("systemd-sysv", "/sbin/init, which nspawn -b boots"),
    (
        "dbus",
        "logind, which starts lingering users' managers, needs the system bus",
    ),
    (
        "libpam-systemd",
        "the systemd-user PAM stack user@.service runs",
    ),
    (
        "nftables",
        "nft, which tank-loader runs for its baseline table",
    ),
];

const CACHE: &str = "/var/cache/tank-tests";

/// The agent host's address on its veth, and the far side's two: the proxy and elsewhere.
const AGENT_ADDR: &str = "10.201.0.2";
const PROXY_IP: &str = "10.201.0.1";
const PROXY: &str = "10.201.0.1:3128";
const ELSEWHERE_IP: &str = "10.201.0.9";
const ELSEWHERE: &str = "10.201.0.9:443";
/// The proxy address in the cloud-init example, replaced by [`PROXY_IP`] at "first boot".
const EXAMPLE_PROXY_IP: &str = "192.0.2.10";

const LOADER: &str = "tank-loader.service";
const AUDIT_LOG: &str = "var/log/tank/kernel-audit.jsonl";

/// The stand-in for image/quadlet/tank-agent.container (see the module doc), as a user unit.
fn standin_unit() -> String {
    format!(
        "# Stand-in for the agent Quadlet: Debian's Podman 4.3 has no Quadlet (it came in 4.4).
[Unit]
Description=tank agent stand-in (tests/tests/boot.rs)
ConditionUser={AGENT_UID}

[Service]
EnvironmentFile=/etc/tank/agent.env
Environment=TANK_STANDIN_ELSEWHERE={ELSEWHERE}
ExecStart=/usr/local/bin/tank-agent-standin

[Install]
WantedBy=default.target
"
    )
}

/// One connection through the proxy named by HTTPS_PROXY, one elsewhere; each marks its
/// payload so the far side can tell them apart. Then it stays up, as an agent would.
const STANDIN_SCRIPT: &str = r#"#!/bin/bash
attempt() {
    if timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "M:standin-%s\n" "$0" >&3' \
        "$1" "${2%:*}" "${2##*:}"; then
        echo "standin: $1 ($2) connected"
    else
        echo "standin: $1 ($2) refused"
    fi
}
proxy=${HTTPS_PROXY#http://}
attempt proxy "${proxy%/}"
attempt elsewhere "$TANK_STANDIN_ELSEWHERE"
exec sleep infinity
"#;

#[test]
fn the_appliance_boots_guards_the_agent_across_crashes_and_restarts_and_fails_closed() {
    require_root();
    let started = Instant::now();
    let root = debian_root();
    eprintln!("boot test: root ready in {:.1?}", started.elapsed());
    let host = step("boot", || Appliance::boot(&root));

    let first_cgroup = step("ordering", || {
        host.the_loader_is_ready_before_the_agents_manager()
    });
    step("stand-in", || {
        host.the_stand_in_reaches_the_proxy_and_nothing_else(1)
    });
    step("anchors", || host.chain_anchors_reach_the_journal());
    step("metrics", || {
        host.the_metrics_are_served_inside_the_sandbox()
    });
    step("security", || {
        host.the_security_exposure_is_what_the_docs_say()
    });
    step("kill -9", || {
        host.a_crashed_loader_is_restarted_without_a_gap()
    });
    step("manager restart", || {
        host.a_restarted_manager_is_guarded_in_its_new_cgroup(first_cgroup)
    });
    step("each layer alone", || {
        host.each_layer_alone_keeps_the_agent_in()
    });
    step("broken config", || {
        host.a_broken_config_keeps_the_agents_manager_down()
    });
    step("anchors", || host.chain_anchors_reach_the_journal());
    eprintln!("boot test: done in {:.1?}", started.elapsed());
}

/// Runs one step of the test, saying how long it took.
fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    eprintln!("boot test: {name}: {:.1?}", started.elapsed());
    out
}

// ---- the cached root -----------------------------------------------------------------------

/// The cached Debian root for this machine's release and mirror, built if absent. A build in
/// progress lives in a temporary directory and is renamed into place only once complete, under
/// a lock, so a concurrent or interrupted run is never mistaken for a finished cache.
fn debian_root() -> PathBuf {
    let codename = os_release("VERSION_CODENAME");
    let sources = debian_sources(&codename);
    let packages: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    let key = format!(
        "mmdebstrap --variant=apt --include={} {codename}\n{}\n",
        packages.join(","),
        sources.join("\n")
    );
    let name = format!(
        "debian-{codename}-{}",
        &chain::Hash::of(key.as_bytes()).to_string()[..16]
    );
    let cache = Path::new(CACHE);
    let dir = cache.join(&name);
    if dir.is_dir() {
        return dir;
    }
    std::fs::create_dir_all(cache).unwrap_or_else(|e| panic!("cannot create {CACHE}: {e}"));
    let lock = File::create(cache.join(format!(".{name}.lock"))).expect("cache lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) },
        0,
        "lock the root cache"
    );
    if dir.is_dir() {
        return dir; // built by another run while we waited
    }
    // We hold the lock: any partial build of this key is an interrupted run's.
    for entry in std::fs::read_dir(cache).expect("read the cache").flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!(".{name}.tmp-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let tmp = cache.join(format!(".{name}.tmp-{}", std::process::id()));
    eprintln!(
        "boot test: building the Debian root {} (once per package list)",
        dir.display()
    );
    let out = Command::new("timeout")
        .args(["600", "mmdebstrap", "--variant=apt", "--quiet"])
        .arg(format!("--include={}", packages.join(",")))
        .arg(&codename)
        .arg(&tmp)
        .args(&sources)
        .output()
        .expect("run mmdebstrap (Debian package mmdebstrap; `cargo xtask setup` installs it)");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!(
            "mmdebstrap {codename} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(cache.join(format!("{name}.txt")), &key).expect("record the root's key");
    std::fs::rename(&tmp, &dir).expect("move the finished root into the cache");
    dir
}

fn os_release(key: &str) -> String {
    let text = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {key} in /etc/os-release: the boot test needs a Debian host"))
}

/// The machine's own Debian sources for `codename` (and its -updates, -security suites), as
/// one-line entries for mmdebstrap, from /etc/apt/sources.list and sources.list.d (both formats).
fn debian_sources(codename: &str) -> Vec<String> {
    let ours = |suite: &str| suite == codename || suite.starts_with(&format!("{codename}-"));
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut out = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if file.extension().is_some_and(|e| e == "sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_owned())
                    })
                };
                let types = field("Types").unwrap_or_default();
                if !types.split_whitespace().any(|t| t == "deb")
                    || field("Enabled").is_some_and(|e| e == "no")
                {
                    continue;
                }
                let components = field("Components").unwrap_or_default();
                for uri in field("URIs").unwrap_or_default().split_whitespace() {
                    for suite in field("Suites").unwrap_or_default().split_whitespace() {
                        if ours(suite) {
                            out.push(format!("deb {uri} {suite} {components}"));
                        }
                    }
                }
            }
        } else if file.extension().is_some_and(|e| e == "list") || file.ends_with("sources.list") {
            for line in text.lines().map(str::trim) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() != Some(&"deb") {
                    continue;
                }
                // Skip `[options]`, which may span words.
                let rest: Vec<&str> = if words.get(1).is_some_and(|w| w.starts_with('[')) {
                    let end = words.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                    words[end + 1..].to_vec()
                } else {
                    words[1..].to_vec()
                };
                if rest.len() >= 3 && ours(rest[1]) {
                    out.push(format!("deb {}", rest.join(" ")));
                }
            }
        }
    }
    assert!(
        !out.is_empty(),
        "no Debian {codename} source in /etc/apt/sources.list*: the boot test builds its root from the machine's own mirror"
    );
    out
}

// ---- the far side --------------------------------------------------------------------------

/// A TCP listener on the far side: the judge of what got out. Each accepted connection is
/// recorded as the first line it sent (empty if none).
struct FarListener {
    arrivals: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FarListener {
    fn start(far: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = in_netns(&far.path, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} on the far side: {e}"));
        listener.set_nonblocking(true).unwrap();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            stream.set_nonblocking(false).unwrap();
                            stream
                                .set_read_timeout(Some(Duration::from_millis(500)))
                                .unwrap();
                            let mut buf = [0u8; 256];
                            let n = stream.read(&mut buf).unwrap_or(0);
                            let line = String::from_utf8_lossy(&buf[..n]);
                            arrivals
                                .lock()
                                .unwrap()
                                .push(format!("{peer} {}", line.trim()));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            arrivals,
            stop,
            thread: Some(thread),
        }
    }

    fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().unwrap().clone()
    }

    fn count(&self, marker: &str) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| a.ends_with(marker))
            .count()
    }
}

impl Drop for FarListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- the container -------------------------------------------------------------------------

/// A booted container: nspawn, its private mounts (overlay root and bpffs, in a mount
/// namespace of nspawn's own, so they vanish with it) and its cgroups. Dropping it powers the
/// container off (SIGKILL after a bounded wait) and removes every cgroup it left; when the test
/// is failing, it first prints the container's journal.
struct Container {
    name: String,
    nspawn: Option<Child>,
    pid1: u32,
    /// The container's cgroup root in each host hierarchy (unified first).
    cgroups: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Container {
    /// The container's view of `path` (absolute inside the container), from the host.
    fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    /// Host directory of the cgroup at `path` inside the container (unified hierarchy).
    fn cgroup(&self, path: &str) -> PathBuf {
        self.cgroups[0]
            .join("payload")
            .join(path.trim_start_matches('/'))
    }

    /// Runs a command inside the container (all its namespaces), bounded by `timeout` seconds.
    fn run(&self, secs: u32, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args([
                "--target",
                &self.pid1.to_string(),
                "--all",
                "--root",
                "--wd",
                "--",
            ])
            .args(["timeout", &secs.to_string()])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin")
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter (util-linux)")
    }

    /// [`Self::run`], which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(60, args);
        assert!(
            out.status.success(),
            "{args:?} in the container failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show UNIT` properties.
    fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
        let mut args = vec!["systemctl", "show", unit];
        for p in props {
            args.extend(["-p", p]);
        }
        self.ok(&args)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.show(unit, &[prop]).remove(prop).unwrap_or_default()
    }

    fn monotonic(&self, unit: &str, prop: &str) -> u64 {
        self.prop(unit, prop).parse().unwrap_or(0)
    }

    /// The journal of `unit`, message text only.
    fn journal(&self, unit: &str) -> String {
        self.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// Waits (bounded) until `done` holds, panicking with `what` and the last `state` if not.
    fn wait(
        &self,
        what: &str,
        secs: u64,
        mut done: impl FnMut() -> bool,
        state: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; {}",
                state()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) for the connection record of host process `pid` in the log at `log`.
    fn wait_for_record(&self, log: &Path, pid: u32) -> NetworkRecord {
        let mut found = None;
        self.wait(
            &format!("the record of pid {pid}"),
            10,
            || {
                found = network_records(log)
                    .into_iter()
                    .find(|r| r.actor.process.pid == pid);
                found.is_some()
            },
            || "not in the audit log".into(),
        );
        found.unwrap()
    }

    fn dump(&self) {
        let console =
            std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        eprintln!("--- nspawn console (last 60 lines) ---");
        for line in console
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("{line}");
        }
        if self.pid1 == 0 {
            return;
        }
        for args in [
            &["systemctl", "--failed", "--no-pager"][..],
            &[
                "systemctl",
                "status",
                "--no-pager",
                "-n",
                "0",
                LOADER,
                "user@2000.service",
            ],
            &[
                "journalctl",
                "-b",
                "--no-pager",
                "-o",
                "short-monotonic",
                "-n",
                "400",
            ],
        ] {
            let out = self.run(20, args);
            eprintln!(
                "--- {} ---\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        if let Some(mut nspawn) = self.nspawn.take() {
            // SIGTERM: nspawn asks the container's systemd to power off.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(nspawn.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nspawn.kill();
            let _ = nspawn.wait();
        }
        for root in &self.cgroups {
            remove_cgroup_tree(root);
        }
        let _ =
            std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
    }
}

/// Kills what is left in the cgroup tree at `dir` and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    kill_all_in(dir);
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("boot test: cannot remove cgroup {}: {e}", dir.display());
    }
}

/// The mount point of the named `systemd` cgroup v1 hierarchy on a hybrid host, if any.
fn systemd_v1_hierarchy() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        let mount_point = left.split(' ').nth(4)?;
        (right.next()? == "cgroup" && right.nth(1)?.split(',').any(|o| o == "name=systemd"))
            .then(|| PathBuf::from(mount_point))
    })
}

/// The agent host: the booted container, its network and the far side's listeners. Field order
/// is drop order: the container goes first, the namespaces last.
struct Appliance {
    container: Container,
    proxy: FarListener,
    elsewhere: FarListener,
    agent_ns: Netns,
    _far_ns: Netns,
}

impl Appliance {
    fn boot(root: &Path) -> Self {
        for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
            assert_eq!(
                std::fs::read_link(root.join(link)).ok(),
                Some(PathBuf::from(target)),
                "the root is not merged-/usr, so the image's /usr paths would need rewriting"
            );
        }
        let agent_ns = Netns::new();
        let far_ns = Netns::new();
        topology::wire(&agent_ns, "eth0", &far_ns, "far0");
        agent_ns.ip(&["addr", "add", &format!("{AGENT_ADDR}/24"), "dev", "eth0"]);
        far_ns.ip(&["addr", "add", &format!("{PROXY_IP}/24"), "dev", "far0"]);
        far_ns.ip(&["addr", "add", &format!("{ELSEWHERE_IP}/24"), "dev", "far0"]);
        let proxy = FarListener::start(&far_ns, PROXY);
        let elsewhere = FarListener::start(&far_ns, ELSEWHERE);

        let dir = tempfile::Builder::new()
            .prefix("tank-boot")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let upper = dir.path().join("upper");
        install_appliance(root, &upper);
        let container = boot_container(root, dir, &agent_ns);
        Self {
            container,
            proxy,
            elsewhere,
            agent_ns,
            _far_ns: far_ns,
        }
    }

    fn records(&self) -> Vec<NetworkRecord> {
        network_records(&self.container.path(AUDIT_LOG))
    }

    /// The stand-in's connect records to `ip:port` with verdict `action`.
    fn stand_in_records(&self, dst: &str, action: &str) -> Vec<NetworkRecord> {
        self.records()
            .into_iter()
            .filter(|r| {
                r.actor.process.user.uid == AGENT_UID.to_string()
                    && r.actor.process.name == "bash"
                    && r.dst_endpoint.addr().map(|a| a.to_string()).as_deref() == Some(dst)
                    && r.action.as_str() == action
                    && r.unmapped.hook.as_str() == "connect4"
            })
            .collect()
    }

    fn state(&self) -> String {
        let c = &self.container;
        format!(
            "{LOADER}: {:?}; user@2000.service: {:?}; proxy saw {:?}; elsewhere saw {:?}",
            c.show(LOADER, &["ActiveState", "SubState", "NRestarts"]),
            c.show("user@2000.service", &["ActiveState", "SubState"]),
            self.proxy.arrivals(),
            self.elsewhere.arrivals()
        )
    }

    /// tank-loader.service went active (READY=1 with its `enforcing` status) before the agent
    /// user's manager began to start. Returns the manager's cgroup id.
    fn the_loader_is_ready_before_the_agents_manager(&self) -> u64 {
        let c = &self.container;
        c.wait(
            "user@2000.service active",
            60,
            || c.prop("user@2000.service", "ActiveState") == "active",
            || self.state(),
        );
        let loader = c.show(
            LOADER,
            &[
                "Type",
                "ActiveState",
                "StatusText",
                "ActiveEnterTimestampMonotonic",
                "StartLimitIntervalUSec",
            ],
        );
        assert_eq!(loader["Type"], "notify");
        assert_eq!(loader["ActiveState"], "active", "{}", self.state());
        assert_eq!(
            loader["StatusText"], "enforcing",
            "READY=1 came with another status"
        );
        let ready: u64 = loader["ActiveEnterTimestampMonotonic"].parse().unwrap();
        let manager = c.monotonic("user@2000.service", "InactiveExitTimestampMonotonic");
        assert!(
            ready > 0 && ready <= manager,
            "tank-loader ready at {ready} µs, the agent's manager started at {manager} µs"
        );
        // The unit says a crash-looping loader is never given up on (see its Restart= comment).
        assert_eq!(
            loader["StartLimitIntervalUSec"], "0",
            "tank-loader.service has a start-rate limit"
        );
        // systemd took over the cgroup the loader guards (it creates it first if missing),
        // rather than replacing it.
        let cgroup = c.cgroup("/user.slice/user-2000.slice/user@2000.service");
        let id = std::fs::metadata(&cgroup)
            .unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()))
            .ino();
        let guarded = self.container_lifecycle_starts().last().copied();
        assert_eq!(
            guarded,
            Some(id),
            "the loader's last start record names another cgroup than the manager's"
        );
        id
    }

    /// The stand-in's connection to the proxy arrives (its `n`-th), the one elsewhere does not,
    /// and the kernel audit log inside records both under the agent's UID.
    fn the_stand_in_reaches_the_proxy_and_nothing_else(&self, n: usize) {
        let c = &self.container;
        c.wait(
            "the stand-in's connection through the proxy",
            30,
            || {
                self.proxy.count("M:standin-proxy") >= n
                    && self.stand_in_records(ELSEWHERE, "Denied").len() >= n
            },
            || self.state(),
        );
        assert_eq!(
            self.proxy.count("M:standin-proxy"),
            n,
            "{:?}",
            self.proxy.arrivals()
        );
        assert!(
            self.elsewhere.arrivals().is_empty(),
            "got out: {:?}",
            self.elsewhere.arrivals()
        );
        // One attempt each per run of the stand-in, each recorded once.
        let allowed = self.stand_in_records(PROXY, "Allowed");
        assert_eq!(
            allowed.len(),
            n,
            "Allowed records to the proxy: {allowed:?}"
        );
        let denied = self.stand_in_records(ELSEWHERE, "Denied");
        assert_eq!(denied.len(), n, "Denied records elsewhere: {denied:?}");
        let agent =
            c.cgroup("/user.slice/user-2000.slice/user@2000.service/app.slice/tank-agent.service");
        let agent_id = std::fs::metadata(&agent)
            .unwrap_or_else(|e| panic!("{}: {e}", agent.display()))
            .ino();
        let last = denied.last().unwrap();
        assert_eq!(
            last.unmapped.cgroup_id, agent_id,
            "the refusal was not the stand-in's: {last:?}"
        );
    }

    /// The appliance's `metrics_listen` is served from inside the unit's sandbox, with the
    /// layers read by the CAP_NET_ADMIN helper.
    fn the_metrics_are_served_inside_the_sandbox(&self) {
        let journal = self.container.journal(LOADER);
        assert!(
            journal.contains("metrics at http://127.0.0.1:9465/metrics"),
            "{journal}"
        );
        let scrape = "exec 3<>/dev/tcp/127.0.0.1/9465 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.container.ok(&["bash", "-c", scrape]);
            if text.contains("tank_layer_in_force{layer=\"gate\"} 1") {
                assert!(
                    text.contains("tank_layer_in_force{layer=\"nft\"} 1"),
                    "{text}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no layer reading in 20 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every `audit anchor` the loader logged names a record of the log by its seq and hash.
    fn chain_anchors_reach_the_journal(&self) {
        let journal = self.container.journal(LOADER);
        assert!(
            !journal.contains('\x1b'),
            "terminal escape codes in the loader's journal:\n{journal}"
        );
        let anchors: Vec<(u64, String)> = journal
            .lines()
            .filter(|l| l.contains("audit anchor"))
            .map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{name}=")))
                        .unwrap_or_else(|| panic!("no {name}= in `{l}`"))
                        .to_owned()
                };
                (field("seq").parse().unwrap(), field("hash"))
            })
            .collect();
        assert!(
            !anchors.is_empty(),
            "no `audit anchor` line in the loader's journal:\n{journal}"
        );
        let path = self.container.path(AUDIT_LOG);
        let text = std::fs::read(&path).expect("the audit log");
        let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
        let (_, records) = chain::read(&path).expect("read the audit log");
        let hashes: HashMap<u64, String> = records
            .iter()
            .map(|r| (r.seq, chain::Hash::of(lines[r.line - 1]).to_string()))
            .collect();
        for (seq, hash) in anchors {
            assert_eq!(
                hashes.get(&seq),
                Some(&hash),
                "journal anchor seq={seq} does not match the log"
            );
        }
    }

    /// `systemd-analyze security` in the booted container gives the exposure docs/operations.md
    /// states.
    fn the_security_exposure_is_what_the_docs_say(&self) {
        let out = self
            .container
            .ok(&["systemd-analyze", "security", "--no-pager", LOADER]);
        eprintln!("{out}");
        // What the boot warned about, for the record (a container lacks a few host powers).
        let warnings = self.container.ok(&[
            "journalctl",
            "-b",
            "-p",
            "warning",
            "--no-pager",
            "-o",
            "cat",
        ]);
        eprintln!("--- boot warnings ---\n{warnings}");
        let score = out
            .lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {LOADER}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no overall exposure in:\n{out}"))
            .to_owned();
        let docs = read("docs/operations.md");
        assert!(
            docs.contains(&format!("exposure level **{score}**")),
            "docs/operations.md must state tank-loader.service's exposure level **{score}** (systemd-analyze security in the boot test)"
        );
    }

    /// kill -9 of the loader: systemd restarts it, and an attacker in the agent's cgroup
    /// hammering a forbidden address across the whole restart gets nothing through.
    fn a_crashed_loader_is_restarted_without_a_gap(&self) {
        let c = &self.container;
        let before = c.show(LOADER, &["MainPID", "NRestarts"]);
        let main_pid: u32 = before["MainPID"].parse().unwrap();
        let agent =
            c.cgroup("/user.slice/user-2000.slice/user@2000.service/app.slice/tank-agent.service");
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let attacker = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            let netns = self.agent_ns.path.clone();
            std::thread::spawn(move || {
                let (mut ok, mut refused) = (0u64, 0u64);
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let opts = ProbeOpts {
                        uid: Some(AGENT_UID),
                        netns: Some(&netns),
                        seccomp: false,
                    };
                    let (_, out) = probe_with(&agent, &opts, &["flood", ELSEWHERE, "5"]);
                    for part in out.split_whitespace() {
                        match part.split_once('=') {
                            Some(("ok", n)) => ok += n.parse::<u64>().unwrap(),
                            Some((_, n)) => refused += n.parse::<u64>().unwrap(),
                            None => {}
                        }
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                    // Often enough to land in every moment of the restart, seldom enough to
                    // keep the audit log small.
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, refused)
            })
        };
        c.wait(
            "the attacker loop running",
            20,
            || rounds.load(Ordering::Relaxed) >= 3,
            || "no round".into(),
        );
        let host_pid = host_pid(c.pid1, main_pid).expect("the loader's host pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(host_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the loader");
        let killed_at = rounds.load(Ordering::Relaxed);
        c.wait(
            "tank-loader restarted by systemd after kill -9",
            30,
            || {
                let now = c.show(LOADER, &["MainPID", "NRestarts", "ActiveState"]);
                now["ActiveState"] == "active"
                    && now["MainPID"] != before["MainPID"]
                    && now["NRestarts"] != before["NRestarts"]
            },
            || self.state(),
        );
        let restarted_at = rounds.load(Ordering::Relaxed);
        c.wait(
            "attacker rounds after the restart",
            20,
            || rounds.load(Ordering::Relaxed) >= restarted_at + 3,
            || "stuck".into(),
        );
        stop.store(true, Ordering::Relaxed);
        let (ok, refused) = attacker
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        eprintln!(
            "boot test: attacker made {refused} refused attempts in {} rounds ({} while the loader was down or starting)",
            rounds.load(Ordering::Relaxed),
            restarted_at - killed_at
        );
        assert_eq!(
            ok, 0,
            "the attacker's connect() succeeded {ok} times across the restart"
        );
        assert!(
            self.elsewhere.arrivals().is_empty(),
            "got out across the restart: {:?}",
            self.elsewhere.arrivals()
        );
        assert!(
            restarted_at > killed_at,
            "no attack round ran while the loader was restarting"
        );
    }

    /// Stopping the agent's manager removes its cgroup; starting it again makes a new one, which
    /// the loader (pulled in again first) guards before the stand-in runs.
    fn a_restarted_manager_is_guarded_in_its_new_cgroup(&self, old_cgroup: u64) {
        let c = &self.container;
        self.stop_manager();
        c.ok(&["systemctl", "start", "user@2000.service"]);
        let new_cgroup = self.the_loader_is_ready_before_the_agents_manager();
        assert_ne!(
            new_cgroup, old_cgroup,
            "systemd reused the manager's cgroup; the test proves nothing"
        );
        self.the_stand_in_reaches_the_proxy_and_nothing_else(2);
    }

    /// Stops the agent's manager; the loader stops with it (BindsTo=).
    fn stop_manager(&self) {
        let c = &self.container;
        c.ok(&["systemctl", "stop", "user@2000.service"]);
        c.wait(
            "tank-loader stopped with the manager (BindsTo=)",
            30,
            || c.prop(LOADER, "ActiveState") == "inactive",
            || self.state(),
        );
    }

    /// The cgroup ids of the loader's start records, in order.
    fn container_lifecycle_starts(&self) -> Vec<u64> {
        let (_, records) =
            chain::read(&self.container.path(AUDIT_LOG)).expect("read the audit log");
        records
            .iter()
            .filter(|r| {
                r.value["class_uid"] == serde_json::json!(ocsf::class::APPLICATION_LIFECYCLE)
            })
            .filter_map(|r| r.value["unmapped"]["cgroup_id"].as_u64())
            .collect()
    }

    /// Each layer alone, under the real unit: the BPF gate with the nftables baseline off, and
    /// the baseline with the gate in audit mode (it records but refuses nothing). Either way
    /// the agent reaches the proxy and nothing arrives elsewhere. The loader is restarted on
    /// each config, the agent keeps running.
    fn each_layer_alone_keeps_the_agent_in(&self) {
        let c = &self.container;
        let config = c.path("/etc/tank/loader.toml");
        let enforcing = std::fs::read_to_string(&config).unwrap();
        for (layer, from, to, action, reason) in [
            (
                "gate alone",
                "[nft]\n",
                "[nft]\nenabled = false\n",
                "Denied",
                "not_listed",
            ),
            (
                "nft alone",
                "mode = \"enforce\"",
                "mode = \"audit\"",
                "Allowed",
                "audit_not_listed",
            ),
        ] {
            assert!(enforcing.contains(from), "{enforcing}");
            std::fs::write(&config, enforcing.replace(from, to)).unwrap();
            self.restart_loader(layer);
            let proxied = self.proxy.arrivals().len();
            assert_eq!(
                self.agent_probe(PROXY).1,
                "ok",
                "{layer}: the proxy is unreachable"
            );
            let (pid, outcome) = self.agent_probe(ELSEWHERE);
            assert_ne!(outcome, "ok", "{layer}: connect() elsewhere succeeded");
            // The listener records a connection once it has read what came (none here).
            c.wait(
                &format!("{layer}: the probe's connection at the proxy"),
                5,
                || self.proxy.arrivals().len() > proxied,
                || format!("{:?}", self.proxy.arrivals()),
            );
            assert!(
                self.elsewhere.arrivals().is_empty(),
                "{layer}: got out: {:?}",
                self.elsewhere.arrivals()
            );
            let record = c.wait_for_record(&self.container.path(AUDIT_LOG), pid);
            assert_eq!(
                (record.action.as_str(), record.unmapped.reason.as_str()),
                (action, reason),
                "{layer}"
            );
        }
        std::fs::write(&config, enforcing).unwrap();
        self.restart_loader("both layers");
    }

    /// `systemctl restart tank-loader`: active again, the agent's manager untouched.
    fn restart_loader(&self, why: &str) {
        let c = &self.container;
        let manager = c.prop("user@2000.service", "ExecMainPID");
        c.ok(&["systemctl", "restart", LOADER]);
        assert_eq!(
            c.prop(LOADER, "ActiveState"),
            "active",
            "{why}: {}",
            self.state()
        );
        assert_eq!(
            c.prop("user@2000.service", "ExecMainPID"),
            manager,
            "{why}: the agent's manager restarted with the loader"
        );
    }

    /// One `tank-probe tcp ADDR` as the agent: in the stand-in's cgroup, the agent host's
    /// network namespace, UID 2000. Its pid and outcome.
    fn agent_probe(&self, addr: &str) -> (u32, String) {
        let agent = self
            .container
            .cgroup("/user.slice/user-2000.slice/user@2000.service/app.slice/tank-agent.service");
        let opts = ProbeOpts {
            uid: Some(AGENT_UID),
            netns: Some(&self.agent_ns.path),
            seccomp: false,
        };
        probe_with(&agent, &opts, &["tcp", addr])
    }

    /// A loader.toml that does not validate: the loader refuses with one line naming the
    /// file and is retried (never given up on); the agent's manager waits for it and does not
    /// start at all. Once the file is fixed, the loader comes up and the manager after it.
    fn a_broken_config_keeps_the_agents_manager_down(&self) {
        let c = &self.container;
        self.stop_manager();
        let config = c.path("/etc/tank/loader.toml");
        let good = std::fs::read_to_string(&config).unwrap();
        let proxy_line = format!("proxies = [\"{PROXY}\"]");
        assert!(good.contains(&proxy_line), "{good}");
        // A plausible operator mistake: the proxy without its port.
        std::fs::write(
            &config,
            good.replace(&proxy_line, &format!("proxies = [\"{PROXY_IP}\"]")),
        )
        .unwrap();
        let main_started = c.monotonic("user@2000.service", "ExecMainStartTimestampMonotonic");
        let restarts: u32 = c.prop(LOADER, "NRestarts").parse().unwrap();
        let proxied = self.proxy.count("M:standin-proxy");
        // --no-block: the start job waits for the loader's, which does not end while the
        // loader is being retried.
        c.ok(&["systemctl", "--no-block", "start", "user@2000.service"]);
        c.wait(
            "the loader failing on the broken config, twice",
            20,
            || c.prop(LOADER, "NRestarts").parse::<u32>().unwrap() >= restarts + 2,
            || self.state(),
        );
        let manager = c.show(
            "user@2000.service",
            &["ActiveState", "ExecMainStartTimestampMonotonic"],
        );
        assert_ne!(manager["ActiveState"], "active", "{}", self.state());
        assert_eq!(
            manager["ExecMainStartTimestampMonotonic"],
            main_started.to_string(),
            "the agent's user manager (systemd --user) ran with a broken loader.toml"
        );
        assert_eq!(
            self.proxy.count("M:standin-proxy"),
            proxied,
            "the agent ran"
        );
        let journal = c.journal(LOADER);
        assert!(
            journal
                .lines()
                .any(|l| l.starts_with("tank-loader: /etc/tank/loader.toml:") && l.contains(&format!("`{PROXY_IP}`"))),
            "no one-line error naming the config and the bad value in the loader's journal:\n{journal}"
        );
        assert!(
            c.ok(&["systemctl", "list-jobs", "--no-legend"])
                .contains("user@2000.service"),
            "the manager's start job is gone"
        );

        std::fs::write(&config, good).unwrap();
        c.wait(
            "the agent's manager once the config is fixed",
            30,
            || c.prop("user@2000.service", "ActiveState") == "active",
            || self.state(),
        );
        self.the_stand_in_reaches_the_proxy_and_nothing_else(proxied + 1);
    }
}

/// Host pid of the process that is `ns_pid` in the pid namespace of `pid1`.
fn host_pid(pid1: u32, ns_pid: u32) -> Option<u32> {
    let ns = std::fs::read_link(format!("/proc/{pid1}/ns/pid")).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()? != ns {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?;
        (inner.parse::<u32>().ok()? == ns_pid).then_some(pid)
    })
}

/// Writes `contents` at `path` (absolute, inside the root) under `upper`.
fn install(upper: &Path, path: &str, contents: &[u8], mode: u32) {
    let dest = upper.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, contents).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn symlink(upper: &Path, link: &str, target: &str) {
    let dest = upper.join(link.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, &dest).unwrap();
}

/// The agent host's part of image/Containerfile, as files in the overlay's upper layer: the
/// same sources at the same paths. Then what cloud-init's example writes at first boot, with
/// the far side's proxy address, and the stand-in for the Quadlet.
fn install_appliance(root: &Path, upper: &Path) {
    let loader = std::fs::read(workspace_bin("tank-loader")).expect("the built tank-loader");
    install(upper, "/usr/bin/tank-loader", &loader, 0o755);
    for (src, dest, mode) in [
        (
            "image/systemd/tank-loader.service",
            "/usr/lib/systemd/system/tank-loader.service",
            0o644,
        ),
        (
            "image/systemd/user@2000.service.d/50-tank.conf",
            "/usr/lib/systemd/system/user@2000.service.d/50-tank.conf",
            0o644,
        ),
        (
            "image/sysusers.d/tank-agent.conf",
            "/usr/lib/sysusers.d/tank-agent.conf",
            0o644,
        ),
        (
            "image/tmpfiles.d/tank-agent.conf",
            "/usr/lib/tmpfiles.d/tank-agent.conf",
            0o644,
        ),
        ("image/config/loader.toml", "/etc/tank/loader.toml", 0o644),
        ("image/config/agent.env", "/etc/tank/agent.env", 0o644),
        (
            "image/seccomp/tank-agent.json",
            "/usr/share/tank/seccomp/tank-agent.json",
            0o644,
        ),
        (
            "image/agent/AGENT_INSTRUCTIONS.md",
            "/usr/share/tank/agent/AGENT_INSTRUCTIONS.md",
            0o644,
        ),
    ] {
        install(upper, dest, read(src).as_bytes(), mode);
    }
    // RUN ... >> /etc/subuid, >> /etc/subgid; systemctl enable tank-loader.service
    for file in ["etc/subuid", "etc/subgid"] {
        let mut text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        text += "agent:524288:65536\n";
        install(upper, file, text.as_bytes(), 0o644);
    }
    let wanted_by = values(
        &parse_ini(&read("image/systemd/tank-loader.service")),
        "Install",
        "WantedBy",
    )
    .join(" ");
    for target in wanted_by.split_whitespace() {
        symlink(
            upper,
            &format!("/etc/systemd/system/{target}.wants/{LOADER}"),
            "/usr/lib/systemd/system/tank-loader.service",
        );
    }
    // First boot (cloud-init write_files), with the far side as the proxy.
    for file in ["/etc/tank/loader.toml", "/etc/tank/agent.env"] {
        let text = cloud_init_file(file);
        assert!(
            text.contains(EXAMPLE_PROXY_IP),
            "the cloud-init example's {file} names no proxy"
        );
        install(
            upper,
            file,
            text.replace(EXAMPLE_PROXY_IP, PROXY_IP).as_bytes(),
            0o644,
        );
    }
    install(
        upper,
        "/etc/systemd/user/tank-agent.service",
        standin_unit().as_bytes(),
        0o644,
    );
    symlink(
        upper,
        "/etc/systemd/user/default.target.wants/tank-agent.service",
        "/etc/systemd/user/tank-agent.service",
    );
    install(
        upper,
        "/usr/local/bin/tank-agent-standin",
        STANDIN_SCRIPT.as_bytes(),
        0o755,
    );
}

/// Boots the root under nspawn, with `dir/upper` as the overlay's upper layer, in `netns`.
fn boot_container(root: &Path, dir: tempfile::TempDir, netns: &Netns) -> Container {
    let name = unique("tank-boot");
    let (work, merged, bpffs) = (
        dir.path().join("work"),
        dir.path().join("root"),
        dir.path().join("bpffs"),
    );
    for d in [&work, &merged, &bpffs] {
        std::fs::create_dir(d).unwrap();
    }
    let mut hierarchies = vec![tank_loader::cgroup::cgroup2_mount().expect("cgroup2 mount")];
    hierarchies.extend(systemd_v1_hierarchy());
    let cgroups: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(&name)).collect();
    let mut procs = Vec::new();
    for cg in &cgroups {
        std::fs::create_dir(cg).unwrap_or_else(|e| panic!("create cgroup {}: {e}", cg.display()));
        procs.push(
            File::options()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .unwrap(),
        );
    }
    let mut container = Container {
        name: name.clone(),
        nspawn: None,
        pid1: 0,
        cgroups,
        dir,
    };

    let cstr = |s: &str| CString::new(s).unwrap();
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        root.display(),
        container.dir.path().join("upper").display(),
        work.display()
    );
    let mounts = [
        (
            cstr("overlay"),
            cstr(merged.to_str().unwrap()),
            cstr("overlay"),
            cstr(&overlay),
        ),
        (
            cstr("bpf"),
            cstr(bpffs.to_str().unwrap()),
            cstr("bpf"),
            cstr("mode=0700"),
        ),
    ];
    let caps = values(
        &parse_ini(&read("image/systemd/tank-loader.service")),
        "Service",
        "CapabilityBoundingSet",
    )
    .join(" ")
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(",");
    let console = File::create(container.dir.path().join("console.log")).unwrap();
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args(["--boot", "--register=no", "--keep-unit"])
        .arg(format!("--directory={}", merged.display()))
        .arg(format!("--machine={name}"))
        .arg(format!("--network-namespace-path={}", netns.path.display()))
        .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
        .arg(format!("--capability={caps}"))
        .arg("--system-call-filter=bpf")
        .args(["--resolv-conf=off", "--timezone=off", "--link-journal=no"])
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console);
    // SAFETY: only write(2), unshare(2) and mount(2) run between fork and exec, on descriptors
    // and strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            // Into the container's own cgroups first: nspawn puts the container below its own.
            for f in &procs {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
            }
            // The overlay root and the bpffs exist only in this mount namespace: they go when
            // nspawn and the container do, whatever happens to the test.
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            for (src, target, fstype, data) in &mounts {
                if libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    data.as_ptr().cast(),
                ) != 0
                {
                    return fail();
                }
            }
            Ok(())
        });
    }
    let nspawn = cmd
        .spawn()
        .expect("run systemd-nspawn (Debian systemd-container; `cargo xtask setup` installs it)");
    let nspawn_pid = nspawn.id();
    container.nspawn = Some(nspawn);
    let deadline = Instant::now() + Duration::from_secs(30);
    container.pid1 = loop {
        if let Some(pid) = find_pid1(nspawn_pid) {
            break pid;
        }
        if let Some(Some(status)) = container.nspawn.as_mut().map(|c| c.try_wait().unwrap()) {
            panic!("systemd-nspawn exited ({status}) before the container's PID 1 appeared");
        }
        assert!(
            Instant::now() < deadline,
            "no PID 1 in the container within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Until PID 1 listens on its private socket, systemctl answers "offline".
    let mut state = String::new();
    container.wait(
        "the container's boot",
        90,
        || {
            let out = container.run(90, &["systemctl", "is-system-running", "--wait"]);
            state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            state != "offline" && !state.is_empty()
        },
        || "systemd never answered".into(),
    );
    assert_eq!(state, "running", "the container did not boot cleanly");
    container
}

/// The descendant of `nspawn` that is PID 1 of a new pid namespace.
fn find_pid1(nspawn: u32) -> Option<u32> {
    let mut todo = vec![nspawn];
    while let Some(pid) = todo.pop() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let nspid: Vec<&str> = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .collect();
        if nspid.len() > 1 && nspid.last() == Some(&"1") {
            return Some(pid);
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    None
}
