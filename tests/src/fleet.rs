//! A small fleet on one machine: two agent hosts and two proxy hosts, the two-host topology
//! grown, for the log store tests.
//!
//! ```text
//!  agent-1 10.201.1.2 ─┐                    ┌─ proxy-1 10.201.3.2:3128
//!  agent-2 10.201.2.2 ─┤  "lan" (routes)    ├─ proxy-2 10.201.4.2:3128
//!                      └────────┬───────────┘
//!                         10.200.2.2 "internet": HTTPS origin (origin.test)
//! ```
//!
//! Every host is a network namespace of its own and names itself (a UTS namespace of its own
//! for the loader and the proxy), so each log's records say which host wrote them. Each agent
//! host runs tank-loader on its own cgroup with both proxies listed; each proxy serves both
//! agent hosts. Every address lives only inside namespaces this fixture created, and
//! everything is torn down on drop, also when a test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::topology::{
    agent_command, own_hostname, run_proxy, start_origin, wire, Netns, ORIGIN_NAME, PROXY_PORT,
};
use crate::{workspace_bin, Loader, TestCgroups};

/// The agent hosts' names and addresses.
pub const AGENTS: [(&str, &str); 2] = [("agent-1", "10.201.1.2"), ("agent-2", "10.201.2.2")];
/// The proxy hosts' names and addresses.
pub const PROXIES: [(&str, &str); 2] = [("proxy-1", "10.201.3.2"), ("proxy-2", "10.201.4.2")];
/// The origin's address (as in the two-host topology, so its origin serves here too).
const ORIGIN_IP: &str = crate::topology::ORIGIN_IP;

/// One agent host.
pub struct Agent {
    // Drop order is field order: the loader first, then its cgroups and namespace.
    /// tank-loader, enforcing on this host's agent cgroup.
    pub loader: Loader,
    /// The agent's cgroup tree.
    pub cgroups: TestCgroups,
    /// The host.
    pub host: Netns,
    /// Its name.
    pub name: &'static str,
    /// Its address.
    pub ip: &'static str,
}

/// One proxy host.
pub struct Proxy {
    child: Option<Child>,
    /// The host.
    pub host: Netns,
    /// Its name.
    pub name: &'static str,
    /// Its address.
    pub ip: &'static str,
    /// Its audit log.
    pub log: PathBuf,
    /// Its stderr.
    pub stderr: PathBuf,
}

impl Proxy {
    /// `http://IP:PORT`, as clients take it.
    pub fn url(&self) -> String {
        format!("http://{}:{PROXY_PORT}", self.ip)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The fleet, running.
pub struct Fleet {
    /// The agent hosts.
    pub agents: Vec<Agent>,
    /// The proxy hosts.
    pub proxies: Vec<Proxy>,
    origin: Option<Child>,
    _lan: Netns,
    _internet: Netns,
    /// World-readable directory of the CA, the origin's files and the proxies' files.
    pub dir: tempfile::TempDir,
    /// PEM of the throwaway CA that signed the origin's certificate.
    pub ca_pem: PathBuf,
}

impl Fleet {
    /// Builds the namespaces and starts the origin, both proxies and both loaders; `audit`
    /// is appended to agent-2's loader config (e.g. an `[audit]` table that rotates often).
    pub fn start(agent2_extra: &str) -> Self {
        crate::require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let (lan, internet) = (Netns::new(), Netns::new());
        lan.sysctl("net/ipv4/ip_forward", "1");
        wire(&lan, "inet0", &internet, "eth0");
        lan.ip(&["addr", "add", "10.200.2.1/24", "dev", "inet0"]);
        internet.ip(&["addr", "add", &format!("{ORIGIN_IP}/24"), "dev", "eth0"]);
        internet.ip(&["route", "add", "default", "via", "10.200.2.1"]);
        // Each host on a /24 of its own, the lan's end .1 its gateway.
        let attach = |host: &Netns, ip: &str, port: &str| {
            let gateway = format!("{}.1", ip.rsplit_once('.').unwrap().0);
            wire(&lan, port, host, "eth0");
            lan.ip(&["addr", "add", &format!("{gateway}/24"), "dev", port]);
            host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            host.ip(&["route", "add", "default", "via", &gateway]);
        };

        let ca_pem = dir.path().join("ca.pem");
        let origin = start_origin(&internet, dir.path(), &ca_pem);

        let proxies = PROXIES
            .iter()
            .enumerate()
            .map(|(i, &(name, ip))| {
                let host = Netns::new();
                attach(&host, ip, &format!("p{i}"));
                start_proxy(host, name, ip, &dir.path().join(name))
            })
            .collect::<Vec<_>>();
        let listed = PROXIES
            .iter()
            .map(|(_, ip)| format!("\"{ip}:{PROXY_PORT}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let agents = AGENTS
            .iter()
            .enumerate()
            .map(|(i, &(name, ip))| {
                let host = Netns::new();
                attach(&host, ip, &format!("a{i}"));
                let cgroups = TestCgroups::new();
                let extra = if i == 1 { agent2_extra } else { "" };
                let mut loader =
                    Loader::configure(&cgroups, &format!("proxies = [{listed}]\n{extra}"));
                loader.set_netns(&host.path);
                loader.set_hostname(name);
                loader.restart();
                Agent {
                    loader,
                    cgroups,
                    host,
                    name,
                    ip,
                }
            })
            .collect();
        Self {
            agents,
            proxies,
            origin: Some(origin),
            _lan: lan,
            _internet: internet,
            dir,
            ca_pem,
        }
    }

    /// `curl https://origin.test/hello.txt` as the agent of `agent`, through `proxy`: its exit
    /// code and output.
    pub fn curl(&self, agent: usize, proxy: usize) -> (i32, String) {
        let a = &self.agents[agent];
        let home = self.dir.path().join(format!("home-{}", a.name));
        let cmd = agent_command(&a.host, &a.cgroups.agent, &home, &self.ca_pem, "curl");
        self.fetch_hello(cmd, proxy)
    }

    /// The same request from `agent`'s host but outside its agent cgroup (as root): traffic
    /// the proxy serves that the agent host's kernel log never sees.
    pub fn curl_outside_the_agent(&self, agent: usize, proxy: usize) -> (i32, String) {
        let mut cmd = self.agents[agent].host.command("curl");
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CURL_CA_BUNDLE", &self.ca_pem);
        self.fetch_hello(cmd, proxy)
    }

    /// Runs `curl` (as `cmd`) for the origin's hello.txt through `proxy`.
    fn fetch_hello(&self, mut cmd: Command, proxy: usize) -> (i32, String) {
        cmd.args(["-sS", "--max-time", "10", "--proxy"])
            .arg(self.proxies[proxy].url())
            .arg(format!("https://{ORIGIN_NAME}/hello.txt"));
        run(&mut cmd)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.proxies {
                eprintln!(
                    "--- {} stderr ---\n{}",
                    p.name,
                    std::fs::read_to_string(&p.stderr).unwrap_or_default()
                );
            }
            for a in &self.agents {
                eprintln!("--- {} tank-loader stderr ---\n{}", a.name, a.loader.logs());
            }
        }
        if let Some(mut origin) = self.origin.take() {
            let _ = origin.kill();
            let _ = origin.wait();
        }
    }
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run the client");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// egress-proxy on `host` as `name`, serving both agent hosts, allowing only the origin.
fn start_proxy(host: Netns, name: &'static str, ip: &'static str, dir: &std::path::Path) -> Proxy {
    std::fs::create_dir(dir).unwrap();
    let log = dir.join("audit.jsonl");
    let config = dir.join("proxy.toml");
    let networks = AGENTS
        .iter()
        .map(|(_, ip)| format!("\"{ip}/32\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &config,
        format!(
            r#"listen = ["{ip}:{PROXY_PORT}"]
client_networks = [{networks}]
audit_log = "{}"
system_resolver = false
# The "internet" is a private namespace here, so the rule must allow private addresses.
allowed_domains = [{{ domain = "{ORIGIN_NAME}", ports = [443], allow_private = true }}]
[hosts]
"{ORIGIN_NAME}" = "{ORIGIN_IP}"
"#,
            log.display()
        ),
    )
    .unwrap();
    let mut cmd = host.command(workspace_bin("egress-proxy"));
    own_hostname(&mut cmd, name);
    let (child, stderr) = run_proxy(cmd, &config, dir);
    Proxy {
        child: Some(child),
        host,
        name,
        ip,
        log,
        stderr,
    }
}
