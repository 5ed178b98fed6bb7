//! The fleet's log store for the tests: a ClickHouse server and syslog-ng shippers, each a
//! process of the test's own, from a temporary config (its own data directory, loopback ports
//! picked free), stopped and removed on drop, also when a test panics. No system service is
//! touched: the packages' units are never started.
//!
//! The table is image/fleet/clickhouse.sql and the shippers run image/fleet/syslog-ng-tank.conf,
//! the files the repository ships: the tests check what operators install.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::prometheus::free_port;

/// The repository's root (the tests crate sits in `tests/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_owned()
}

/// Starts of a server whose port was taken before it bound it (free when picked, then taken
/// by another test's server or an outgoing connection's ephemeral port).
const PORT_TRIES: usize = 5;

/// Stops `child` (SIGTERM, then SIGKILL after `grace`) and reaps it.
fn stop(child: &mut Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `clickhouse-server` with tank's table loaded.
pub struct ClickHouse {
    child: Option<Child>,
    /// Its config, data and log.
    pub dir: tempfile::TempDir,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
}

impl ClickHouse {
    /// Starts a server from a temporary config and loads image/fleet/clickhouse.sql; returns
    /// once the table answers.
    // Not `Default`: starting a server is a side effect, not a default value.
    #[allow(clippy::new_without_default)]
    pub fn start() -> Self {
        for _ in 1..PORT_TRIES {
            match Self::try_start() {
                Ok(server) => return server,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        Self::try_start().unwrap_or_else(|log| panic!("{log}"))
    }

    /// One start on freshly picked ports; on failure, what the server said.
    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, tcp_port) = (free_port(), free_port());
        let data = dir.path().join("data");
        let users = dir.path().join("users.xml");
        std::fs::write(
            &users,
            "<?xml version=\"1.0\"?>\n<yandex>\n  <profiles><default></default></profiles>\n  \
             <users><default><password></password><networks><ip>127.0.0.1</ip></networks>\
             <profile>default</profile><quota>default</quota></default></users>\n  \
             <quotas><default></default></quotas>\n</yandex>\n",
        )
        .unwrap();
        let config = dir.path().join("config.xml");
        std::fs::write(
            &config,
            format!(
                "<?xml version=\"1.0\"?>\n<yandex>\n  <logger><level>warning</level><console>1</console></logger>\n  \
                 <listen_host>127.0.0.1</listen_host>\n  <http_port>{port}</http_port>\n  <tcp_port>{tcp_port}</tcp_port>\n  \
                 <path>{d}/</path>\n  <tmp_path>{d}/tmp/</tmp_path>\n  <user_files_path>{d}/user_files/</user_files_path>\n  \
                 <format_schema_path>{d}/format_schemas/</format_schema_path>\n  <users_config>{u}</users_config>\n  \
                 <default_profile>default</default_profile>\n  <default_database>default</default_database>\n  \
                 <mark_cache_size>268435456</mark_cache_size>\n  <timezone>UTC</timezone>\n</yandex>\n",
                d = data.display(),
                u = users.display(),
            ),
        )
        .unwrap();
        let child = spawn(dir.path());
        let mut server = Self {
            child: Some(child),
            dir,
            port,
        };
        server.wait_ready()?;
        let sql = std::fs::read_to_string(repo().join("image/fleet/clickhouse.sql")).unwrap();
        for statement in sql.split(";\n").filter(|s| !s.trim().is_empty()) {
            server.query(statement);
        }
        Ok(server)
    }

    /// Stops the server (an outage of the store); [`Self::restart`] brings it back with its
    /// data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(30));
        }
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "clickhouse-server already running");
        self.child = Some(spawn(self.dir.path()));
        self.wait_ready().unwrap_or_else(|log| panic!("{log}"));
    }

    /// Waits (bounded) until the server answers; if it exits or stays silent, what it logged.
    fn wait_ready(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        let logged = || std::fs::read_to_string(&log).unwrap_or_default();
        while self.try_query("SELECT 1").is_err() {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("clickhouse-server exited ({status}): {}", logged()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "clickhouse-server did not answer in 30 s: {}",
                    logged()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT`, as `--clickhouse` and the shippers take it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs `sql` (with curl, a real client) and returns the answer; panics on an error.
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("ClickHouse query {sql:?}: {e}"))
    }

    /// Runs `sql`: the answer, or what went wrong.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "30",
                "--fail-with-body",
                "--data-binary",
                "@-",
            ])
            .arg(format!("{}/?wait_end_of_query=1", self.url()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(sql.as_bytes())?;
                c.wait_with_output()
            })
            .map_err(|e| format!("run curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Rows of `host`'s `log` (`kernel` or `proxy`) in tank's table.
    pub fn rows(&self, host: &str, log: &str) -> u64 {
        self.of_chain(host, log, "count()")
    }

    /// Distinct `seq` of `host`'s `log` in tank's table: its records, each copy counted once.
    pub fn seqs(&self, host: &str, log: &str) -> u64 {
        self.of_chain(host, log, "uniqExact(seq)")
    }

    /// The greatest `seq` of `host`'s `log` in tank's table (0 for none).
    pub fn last_seq(&self, host: &str, log: &str) -> u64 {
        self.of_chain(host, log, "max(seq)")
    }

    /// `aggregate` (a number) over the rows of `host`'s `log`.
    fn of_chain(&self, host: &str, log: &str, aggregate: &str) -> u64 {
        self.query(&format!(
            "SELECT {aggregate} FROM tank.audit WHERE host = '{host}' AND log = '{log}'"
        ))
        .trim()
        .parse()
        .expect("a number")
    }

    /// Waits (bounded) until `host`'s `log` has at least `n` distinct records.
    pub fn wait_seqs(&self, host: &str, log: &str, n: u64) {
        self.wait_for(host, log, "distinct seq", n, Self::seqs);
    }

    /// Waits (bounded) until `host`'s `log` has a record of `seq` or later.
    pub fn wait_last_seq(&self, host: &str, log: &str, seq: u64) {
        self.wait_for(host, log, "as last seq", seq, Self::last_seq);
    }

    fn wait_for(
        &self,
        host: &str,
        log: &str,
        what: &str,
        n: u64,
        have: fn(&Self, &str, &str) -> u64,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let have = have(self, host, log);
            if have >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the store has {have} of {n} {what} of {host}'s {log} log after 20 s: seq {}",
                self.query(&format!(
                    "SELECT groupArray(seq) FROM tank.audit WHERE host = '{host}' AND log = '{log}'"
                ))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a mutation (`ALTER TABLE ... DELETE/UPDATE`) and waits until it is done, as
    /// ClickHouse applies mutations in the background.
    pub fn mutate(&self, sql: &str) {
        self.query(sql);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .query("SELECT count() FROM system.mutations WHERE is_done = 0")
            .trim()
            != "0"
        {
            assert!(
                Instant::now() < deadline,
                "mutation {sql:?} not done in 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `clickhouse-server` on the config in `dir`, its output appended to `dir/server.log`.
fn spawn(dir: &Path) -> Child {
    let log = dir.join("server.log");
    let output = || {
        File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap()
    };
    Command::new("clickhouse-server")
        .arg(format!(
            "--config-file={}",
            dir.join("config.xml").display()
        ))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(output())
        .stderr(output())
        .spawn()
        .expect("start clickhouse-server (package clickhouse-server: cargo xtask setup)")
}

/// One log a shipper tails: its path, its kind and the host it is shipped as.
#[derive(Clone, Debug)]
pub struct Shipped {
    /// The active file.
    pub path: PathBuf,
    /// `kernel` or `proxy`.
    pub log: &'static str,
    /// The host label in the store.
    pub host: String,
}

/// A running syslog-ng shipping some logs into a [`ClickHouse`] with the repository's block.
pub struct Shipper {
    child: Option<Child>,
    /// Its config, persist file, control socket and output.
    pub dir: tempfile::TempDir,
}

impl Shipper {
    /// Starts syslog-ng (foreground, its own persist file, pid file and control socket) with a
    /// config that includes image/fleet/syslog-ng-tank.conf and names each of `logs`.
    pub fn start(store: &ClickHouse, logs: &[Shipped]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = format!(
            "@version: 3.38\noptions {{ stats_freq(0); }};\n@include \"{}\"\n",
            repo().join("image/fleet/syslog-ng-tank.conf").display()
        );
        for l in logs {
            config += &format!(
                "tank_audit_log(dir(\"{}\") file(\"{}\") log(\"{}\") host(\"{}\") url(\"{}\"));\n",
                l.path.parent().expect("a log in a directory").display(),
                l.path.file_name().expect("a log file").to_string_lossy(),
                l.log,
                l.host,
                store.url()
            );
        }
        std::fs::write(dir.path().join("syslog-ng.conf"), config).unwrap();
        let mut shipper = Self { child: None, dir };
        shipper.restart();
        shipper
    }

    /// Stops syslog-ng (a shipper down, or blocked); [`Self::restart`] starts it again with
    /// its persist file, where it left off.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(10));
        }
    }

    /// Starts the stopped shipper again.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "syslog-ng already running");
        let dir = self.dir.path();
        let out = dir.join("syslog-ng.out");
        let output = || {
            File::options()
                .create(true)
                .append(true)
                .open(&out)
                .unwrap()
        };
        let mut child = Command::new("syslog-ng")
            .args(["-F", "--no-caps", "-f"])
            .arg(dir.join("syslog-ng.conf"))
            .arg("-R")
            .arg(dir.join("persist"))
            .arg("-p")
            .arg(dir.join("pid"))
            .arg("-c")
            .arg(dir.join("ctl"))
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect(
                "start syslog-ng (packages syslog-ng-core, syslog-ng-mod-http: cargo xtask setup)",
            );
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "syslog-ng exited ({status}): {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        self.child = Some(child);
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop();
    }
}
