//! Two hosts on one machine: the audited path end to end, for the demo and the tests.
//!
//! Three network namespaces joined by veth pairs stand in for three machines:
//!
//! ```text
//!  agent host 10.200.1.2 ── 10.200.1.1 proxy host 10.200.2.1 ── 10.200.2.2 "internet"
//!  agent cgroup, tank-loader,     egress-proxy on :3128,            HTTPS origin on :443
//!  nft baseline                   forwards IP (so the agent         (origin.test, throwaway CA)
//!                                 *could* go direct without tank)
//! ```
//!
//! The proxy host routes between the two others on purpose: a direct connection from the agent
//! to the origin is possible at the IP level, so when it fails, tank refused it. Every address
//! lives only inside namespaces this fixture created; nothing reaches the machine's own network.
//! Everything is torn down on drop, also when a test panics.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ip, nft_section, require_root, unique, workspace_bin, Loader, TestCgroups};
use tank_ebpf_common::event::hook;

/// The agent host's address, as the proxy sees it.
pub const AGENT_IP: &str = "10.200.1.2";
/// The proxy host's address on the agent side.
pub const PROXY_IP: &str = "10.200.1.1";
/// The proxy's port.
pub const PROXY_PORT: u16 = 3128;
/// The proxy host's address on the internet side.
pub const UPLINK_IP: &str = "10.200.2.1";
/// The origin's address.
pub const ORIGIN_IP: &str = "10.200.2.2";
/// The name the proxy resolves to the origin (from its `[hosts]` table: no DNS anywhere).
pub const ORIGIN_NAME: &str = "origin.test";
/// A name the proxy's policy does not allow; it resolves to the origin too, so only the policy
/// stands between the agent and it.
pub const FORBIDDEN_NAME: &str = "paste.test";
/// A GitHub-like API on the origin, inspected by the proxy: one repository allowed
/// (`/repos/owner/repo/`), and a credential the agent never holds set on its requests.
pub const API_NAME: &str = "api.origin.test";
/// The secret the proxy sets on requests to [`API_NAME`] (`Authorization: Bearer ...`).
pub const API_SECRET: &str = "forge-token-the-agent-never-sees";
/// The uid the agent runs as.
pub const AGENT_UID: u32 = 65534;

/// A network namespace of its own, deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
    /// `/run/netns/<name>`.
    pub path: PathBuf,
}

impl Netns {
    /// Creates an empty namespace with loopback up.
    // Not `Default`: creating a namespace is a side effect, not a default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        require_root();
        let name = unique("tank-it");
        ip(&["netns", "add", &name]);
        let ns = Self {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip ARGS` inside the namespace, panicking with its error if it fails.
    pub fn ip(&self, args: &[&str]) {
        ip(&[&["-n", &self.name][..], args].concat());
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` as `net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{}={value}", key.replace('/', ".")))
            .output()
            .expect("run sysctl (package procps)");
        assert!(
            out.status.success(),
            "sysctl {key} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that runs inside this namespace (entered between fork and exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter_netns(&mut cmd, &self.path);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Makes `cmd` enter the network namespace at `path` before it execs.
pub fn enter_netns(cmd: &mut Command, path: &Path) {
    let ns: OwnedFd = File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .into();
    // SAFETY: only setns(2) runs between fork and exec; the descriptor lives in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The three hosts, the loader on the agent host, the proxy and the origin, all running.
pub struct TwoHosts {
    // Drop order is field order: processes first, then cgroups, namespaces and files.
    /// tank-loader on the agent host (kernel gate and nft baseline), enforcing.
    pub loader: Loader,
    proxy: Option<Child>,
    origin: Option<Child>,
    /// The agent's cgroup tree.
    pub cgroups: TestCgroups,
    /// The agent host.
    pub agent: Netns,
    /// The proxy host.
    pub proxy_host: Netns,
    /// The "internet": the origin's host.
    pub internet: Netns,
    /// World-readable directory holding the CA, the origin's files and the proxy's files.
    pub dir: tempfile::TempDir,
    /// The proxy's audit log.
    pub proxy_log: PathBuf,
    /// The proxy's stderr.
    pub proxy_stderr: PathBuf,
    /// PEM of the throwaway CA that signed the origin's certificate.
    pub ca_pem: PathBuf,
    /// What the agent trusts: the origin's CA and the proxy's inspection CA.
    pub trust_pem: PathBuf,
    /// The origin's log of the `Authorization` headers it received on `/repos/`.
    pub origin_received: PathBuf,
}

impl TwoHosts {
    /// Builds the topology and starts everything; returns once each part is ready.
    pub fn start() -> Self {
        let (nft, _) = nft_section("");
        Self::start_with(&nft)
    }

    /// [`Self::start`] with the loader in audit mode and its nft layer off: the dry run a
    /// site starts with, which refuses nothing and records everything.
    pub fn start_in_audit_mode() -> Self {
        Self::start_with("mode = \"audit\"\n")
    }

    /// Starts everything; `loader` is appended to the loader's config after its `proxies`.
    fn start_with(loader_extra: &str) -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        // The agent runs as an unprivileged uid and must read the CA and write its clones.
        chmod(dir.path(), 0o755);
        let (agent, proxy_host, internet) = (Netns::new(), Netns::new(), Netns::new());
        wire(&agent, "eth0", &proxy_host, "agent0");
        wire(&proxy_host, "inet0", &internet, "eth0");
        agent.ip(&["addr", "add", &format!("{AGENT_IP}/24"), "dev", "eth0"]);
        agent.ip(&["route", "add", "default", "via", PROXY_IP]);
        proxy_host.ip(&["addr", "add", &format!("{PROXY_IP}/24"), "dev", "agent0"]);
        proxy_host.ip(&["addr", "add", &format!("{UPLINK_IP}/24"), "dev", "inet0"]);
        proxy_host.sysctl("net/ipv4/ip_forward", "1");
        internet.ip(&["addr", "add", &format!("{ORIGIN_IP}/24"), "dev", "eth0"]);
        internet.ip(&["route", "add", "default", "via", UPLINK_IP]);

        let ca_pem = dir.path().join("ca.pem");
        let origin = start_origin(&internet, dir.path(), &ca_pem);
        let (proxy, proxy_log, proxy_stderr) = start_proxy(&proxy_host, dir.path(), &ca_pem);
        let trust_pem = dir.path().join("trust.pem");
        let bundle = std::fs::read_to_string(&ca_pem).unwrap()
            + &std::fs::read_to_string(dir.path().join("proxy-ca/ca.pem")).unwrap();
        std::fs::write(&trust_pem, bundle).unwrap();

        let cgroups = TestCgroups::new();
        let mut loader = Loader::configure(
            &cgroups,
            &format!("proxies = [\"{PROXY_IP}:{PROXY_PORT}\"]\n{loader_extra}"),
        );
        loader.set_netns(&agent.path);
        loader.restart();
        Self {
            loader,
            proxy: Some(proxy),
            origin: Some(origin),
            cgroups,
            agent,
            proxy_host,
            internet,
            proxy_log,
            proxy_stderr,
            ca_pem,
            trust_pem,
            origin_received: dir.path().join("origin-received.log"),
            dir,
        }
    }

    /// The proxy URL, as the agent's clients take it.
    pub fn proxy_url(&self) -> String {
        format!("http://{PROXY_IP}:{PROXY_PORT}")
    }

    /// A command that runs as the agent: in the agent cgroup, on the agent host, as
    /// [`AGENT_UID`], with a clean environment and `HOME` in the fixture's directory.
    pub fn agent_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        agent_command(
            &self.agent,
            &self.cgroups.agent,
            &self.dir.path().join("home"),
            &self.trust_pem,
            program,
        )
    }

    /// `curl URL` as the agent, through the proxy (the agent's environment trusts only the
    /// throwaway CA).
    pub fn proxied_curl(&self, url: &str) -> Command {
        let mut cmd = self.agent_command("curl");
        cmd.args(["-sS", "--max-time", "10", "--proxy", &self.proxy_url(), url]);
        cmd
    }

    /// `git clone URL DEST` as the agent, through the proxy.
    pub fn proxied_git_clone(&self, url: &str, dest: &Path) -> Command {
        let mut cmd = self.agent_command("git");
        cmd.args(["-c", &format!("http.proxy={}", self.proxy_url())])
            .args(["clone", "-q", url])
            .arg(dest);
        cmd
    }

    /// [`Self::proxied_curl`], run: its exit code and what it printed.
    pub fn curl_via_proxy(&self, url: &str) -> (i32, String) {
        self.run_agent(&mut self.proxied_curl(url))
    }

    /// `tank-loader audit cross-check` of this topology's kernel and proxy logs (add `--json`
    /// for the machine form).
    pub fn cross_check(&self) -> Command {
        let mut cmd = Command::new(workspace_bin("tank-loader"));
        cmd.args(["audit", "cross-check", "--kernel"])
            .arg(&self.loader.audit_log)
            .arg("--proxy")
            .arg(&self.proxy_log);
        cmd
    }

    /// Runs an agent command to completion: its exit code and its stdout then stderr.
    pub fn run_agent(&self, cmd: &mut Command) -> (i32, String) {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run the agent's command");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Waits (bounded) until the proxy's audit log has at least `n` finished connections, and
    /// returns how many it has. A finished connection has one record at its end: the closing
    /// record of a relayed connection (its opening record is not counted), or the one record
    /// of a refused one.
    pub fn wait_proxy_records(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Connection records only: requests inside inspected tunnels have their own.
            let have = std::fs::read_to_string(&self.proxy_log)
                .map(|t| {
                    t.lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .filter(|r| r["class_uid"] == 4001 && r["unmapped"].get("opens").is_none())
                        .count()
                })
                .unwrap_or(0);
            if have >= n || Instant::now() > deadline {
                return have;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the kernel audit log holds `n` established connections.
    pub fn wait_established(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::network_records(&self.loader.audit_log)
            .iter()
            .filter(|r| r.unmapped.hook.0 == hook::ESTABLISHED)
            .count()
            < n
        {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} established records in the kernel log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the proxy (SIGTERM: it syncs its log) so its log is complete.
    pub fn stop_proxy(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- egress-proxy stderr ---\n{}",
                std::fs::read_to_string(&self.proxy_stderr).unwrap_or_default()
            );
            eprintln!("--- tank-loader stderr ---\n{}", self.loader.logs());
        }
        for child in [self.proxy.take(), self.origin.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A command that runs as an agent: in the cgroup at `cgroup`, on the host `host`, as
/// [`AGENT_UID`], with a clean environment, `HOME` at `home` (created) and only `trust_pem`
/// trusted.
pub fn agent_command(
    host: &Netns,
    cgroup: &Path,
    home: &Path,
    trust_pem: &Path,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = host.command(program);
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("open the agent cgroup");
    let _ = std::fs::create_dir(home);
    std::os::unix::fs::chown(home, Some(AGENT_UID), Some(AGENT_UID)).expect("chown home");
    // A clean environment, as a container's would be: nothing of the test runner's
    // (proxy variables, CA bundles) leaks in. The throwaway CA and the proxy's inspection
    // CA are the only ones trusted, as the appliance configures the agent (image/).
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("SSL_CERT_FILE", trust_pem)
        .env("CURL_CA_BUNDLE", trust_pem)
        .env("GIT_SSL_CAINFO", trust_pem)
        .current_dir(home);
    // SAFETY: only write(2), setgroups(2), setgid(2) and setuid(2) run between fork and
    // exec, on a descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(AGENT_UID) != 0
                || libc::setuid(AGENT_UID) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Makes `cmd` run in a UTS namespace of its own named `hostname`, so the records it writes
/// name that host (`device.hostname`), as on a machine of its own.
pub fn own_hostname(cmd: &mut Command, hostname: &str) {
    let name = hostname.as_bytes().to_vec();
    // SAFETY: only unshare(2) and sethostname(2) run between fork and exec, on a buffer
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUTS) != 0
                || libc::sethostname(name.as_ptr().cast(), name.len()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A veth pair with one end in each namespace, both up.
pub fn wire(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The HTTPS origin: Python's static file server behind TLS, serving `hello.txt` and a git
/// repository (dumb HTTP protocol), with a certificate for [`ORIGIN_NAME`] and
/// [`FORBIDDEN_NAME`] from a throwaway CA written to `ca_pem`.
pub(crate) fn start_origin(internet: &Netns, dir: &Path, ca_pem: &Path) -> Child {
    let www = dir.join("www");
    std::fs::create_dir(&www).expect("origin directory");
    std::fs::write(www.join("hello.txt"), "hello from the origin\n").unwrap();
    make_repo(&www.join("tools.git"));

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tank test CA (throwaway)");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![
        ORIGIN_NAME.into(),
        FORBIDDEN_NAME.into(),
        API_NAME.into(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &ca, &ca_key)
    .unwrap();
    std::fs::write(ca_pem, ca.pem()).unwrap();
    let (cert, key) = (dir.join("origin.pem"), dir.join("origin.key"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();

    let mut child = internet
        .command("python3")
        .args(["-c", ORIGIN_PY])
        .arg(&www)
        .arg(&cert)
        .arg(&key)
        .args([ORIGIN_IP, "443"])
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("origin.log")).unwrap())
        .spawn()
        .expect("start the origin (python3)");
    wait_listening(internet, &mut child, ORIGIN_IP, 443, "origin");
    child
}

/// TLS-wrapped `http.server`, serving a directory, and `/repos/...` as a small API that
/// logs the `Authorization` it received to `origin-received.log` beside the directory.
/// Quiet: errors go to stderr only.
const ORIGIN_PY: &str = r#"
import functools, http.server, json, os, ssl, sys
root, cert, key, addr, port = sys.argv[1:6]
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        if not self.path.startswith("/repos/"):
            return super().do_GET()
        with open(os.path.join(os.path.dirname(root), "origin-received.log"), "a") as f:
            f.write("%s Authorization: %s\n" % (self.path, self.headers.get("Authorization")))
        body = json.dumps({"full_name": self.path[len("/repos/"):]}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
handler = functools.partial(Quiet, directory=root)
server = http.server.ThreadingHTTPServer((addr, int(port)), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A bare repository with one commit, prepared for git's dumb HTTP protocol.
fn make_repo(bare: &Path) {
    let work = bare.with_extension("work");
    let git = |args: &[&str], cwd: &Path| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=tank",
                "-c",
                "user.email=tank@test",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir(&work).unwrap();
    git(&["init", "-q"], &work);
    std::fs::write(work.join("README"), "a repository the agent may clone\n").unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-qm", "first"], &work);
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        bare.parent().unwrap(),
    );
    git(&["update-server-info"], bare);
    std::fs::remove_dir_all(&work).unwrap();
}

/// egress-proxy on the proxy host: only [`ORIGIN_NAME`]:443 allowed, and [`API_NAME`]:443
/// inspected (one repository, a credential set by the proxy) with a CA made by `ca init`.
fn start_proxy(host: &Netns, dir: &Path, origin_ca: &Path) -> (Child, PathBuf, PathBuf) {
    let log = dir.join("proxy-audit.jsonl");
    let config = dir.join("proxy.toml");
    let ca_dir = dir.join("proxy-ca");
    let out = Command::new(workspace_bin("egress-proxy"))
        .args(["ca", "init"])
        .arg(&ca_dir)
        .args(["--domain", API_NAME])
        .output()
        .expect("run egress-proxy ca init");
    assert!(
        out.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = dir.join("forge-token");
    std::fs::write(&secret, format!("{API_SECRET}\n")).unwrap();
    chmod(&secret, 0o600);
    std::fs::write(
        &config,
        format!(
            r#"listen = ["{PROXY_IP}:{PROXY_PORT}"]
admin_listen = "127.0.0.1:9464"
client_networks = ["{AGENT_IP}/32"]
audit_log = "{}"
system_resolver = false
# The "internet" is a private namespace here, so the rule must allow private addresses.
allowed_domains = [
  {{ domain = "{ORIGIN_NAME}", ports = [443], allow_private = true }},
  {{ domain = "{API_NAME}", inspect = true, allow_private = true, name = "forge api", path_prefixes = ["/repos/owner/repo/"] }},
]
[hosts]
"{ORIGIN_NAME}" = "{ORIGIN_IP}"
"{FORBIDDEN_NAME}" = "{ORIGIN_IP}"
"{API_NAME}" = "{ORIGIN_IP}"
[inspection]
ca_dir = "{ca}"
upstream_ca = "{origin_ca}"
[[credentials]]
name = "forge"
host = "{API_NAME}"
header = "Authorization"
value = "Bearer {{secret}}"
secret_file = "{secret}"
"#,
            log.display(),
            ca = ca_dir.display(),
            origin_ca = origin_ca.display(),
            secret = secret.display(),
        ),
    )
    .unwrap();
    let (child, stderr) = run_proxy(host.command(workspace_bin("egress-proxy")), &config, dir);
    (child, log, stderr)
}

/// Runs `egress-proxy run --config CONFIG` as `cmd` (a command in the proxy host's namespace),
/// its stderr in `dir/proxy.stderr`, and returns once it said it is ready.
pub(crate) fn run_proxy(mut cmd: Command, config: &Path, dir: &Path) -> (Child, PathBuf) {
    let stderr = dir.join("proxy.stderr");
    let ready = dir.join("proxy.ready");
    let mut child = cmd
        .args(["run", "--config"])
        .arg(config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("start egress-proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "egress-proxy ({}) exited ({status}): {}",
                config.display(),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "egress-proxy ({}) not ready in 10 s",
            config.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, stderr)
}

/// Waits (bounded) until something listens on `addr:port` inside `ns`.
pub(crate) fn wait_listening(ns: &Netns, child: &mut Child, addr: &str, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target: std::net::SocketAddr = format!("{addr}:{port}").parse().unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the {what} exited ({status}) before listening");
        }
        let up = crate::in_netns(&ns.path, || {
            std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
        });
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {what} did not listen in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
