//! Shared harness of the integration tests: the real `egress-proxy` binary on loopback,
//! local origins (TLS with a throwaway CA, plain HTTP, echo), and guards that remove every
//! temp dir and kill every process they started, also when a test fails.
//!
//! Traffic goes only to 127.0.0.1 and ::1; test names such as `origin.test` reach loopback
//! through the proxy's `[hosts]` table, and `system_resolver = false` keeps the proxy from
//! asking any DNS server.
#![allow(dead_code)] // each test file uses part of the harness

pub mod https;
pub mod tls;
pub mod websocket;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// Panics with an install hint if `tool` is not on PATH (tests never skip silently).
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("this test needs `{tool}`, which is not on PATH: install it with `apt-get install -y {debian_package}` (cargo xtask setup does)");
}

/// A temp dir removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("egress-proxy-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Polls `f` every 20 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running proxy binary. Dropping it kills the process.
pub struct Proxy {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub log: PathBuf,
    pub addr: SocketAddr,
    pub addr6: SocketAddr,
    pub admin: SocketAddr,
    pub pid: u32,
}

/// The config lines every test proxy starts with; `body` follows them.
pub fn config_text(dir: &Path, body: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nadmin_listen = \"127.0.0.1:0\"\nclient_networks = [\"127.0.0.0/8\", \"::1\"]\naudit_log = \"{}\"\nsystem_resolver = false\n{body}",
        dir.join("audit.jsonl").display()
    )
}

impl Proxy {
    /// Starts the proxy with [`config_text`]`(dir, body)` and waits until it listens.
    pub fn start(dir: &Path, body: &str) -> Proxy {
        Self::start_raw(dir, &config_text(dir, body))
    }

    /// Starts the proxy with exactly `config` as its config file.
    pub fn start_raw(dir: &Path, config: &str) -> Proxy {
        Self::start_limited(dir, config, None)
    }

    /// Starts the proxy with `config`, its open-files limit (soft and hard) set to `nofile`.
    pub fn start_limited(dir: &Path, config: &str, nofile: Option<u64>) -> Proxy {
        let config_path = dir.join("proxy.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("proxy.log");
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(BIN);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit(2) runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn egress-proxy");
        let mut proxy = Proxy {
            child: Some(child),
            dir: dir.to_owned(),
            config: config_path,
            audit: dir.join("audit.jsonl"),
            log,
            addr: "0.0.0.0:0".parse().unwrap(),
            addr6: "[::]:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            pid: 0,
        };
        let bound: serde_json::Value =
            wait_for(Duration::from_secs(10), "the proxy's ready file", || {
                if let Some(status) = proxy.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "egress-proxy exited with {status} before listening:\n{}",
                        proxy.log_text()
                    );
                }
                std::fs::read(&ready)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            });
        proxy.addr = bound["listen"][0].as_str().unwrap().parse().unwrap();
        proxy.addr6 = bound["listen"][1].as_str().unwrap().parse().unwrap();
        proxy.admin = bound["admin"].as_str().unwrap().parse().unwrap();
        proxy.pid = bound["pid"].as_u64().unwrap() as u32;
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig)
            .expect("signal the proxy");
    }

    /// Rewrites the config file and sends SIGHUP; waits until the reload is logged.
    pub fn reload_with(&self, config: &str) {
        let before = self.log_text().matches("reload").count();
        std::fs::write(&self.config, config).unwrap();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        wait_for(Duration::from_secs(10), "the reload to be logged", || {
            (self.log_text().matches("reload").count() > before).then_some(())
        });
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = wait_for(limit, "the proxy to exit", || child.try_wait().unwrap());
        self.child = None;
        status
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    /// GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of one metric line (`name{labels}`) on /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    /// The record of every finished connection and inspected request in the audit log so far
    /// ([`read_records`]; records are synced within one batch).
    pub fn records(&self) -> Vec<serde_json::Value> {
        read_records(&self.audit)
    }

    /// Waits until the audit log holds `n` of [`Proxy::records`], then returns them.
    pub fn wait_records(&self, n: usize) -> Vec<serde_json::Value> {
        wait_for(
            Duration::from_secs(10),
            &format!("{n} audit records"),
            || {
                let r = self.records();
                (r.len() >= n).then_some(r)
            },
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- egress-proxy log ---\n{}", self.log_text());
        }
    }
}

/// The one record whose JSON pointers hold the wanted strings. Records are written when a
/// connection ends, in whatever order connections end, so tests find them by content.
pub fn record_where(records: &[serde_json::Value], want: &[(&str, &str)]) -> serde_json::Value {
    let found: Vec<_> = records
        .iter()
        .filter(|r| {
            want.iter()
                .all(|(at, v)| r.pointer(at).and_then(|x| x.as_str()) == Some(*v))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one record with {want:?}, got {}: {records:#?}",
        found.len()
    );
    found[0].clone()
}

/// The record of each finished connection (the one record of a refused or failed connection,
/// the closing record of a tunnel) and of each request inside an inspected tunnel. Opening
/// records and the proxy's own records about its log are left out.
pub fn read_records(path: &Path) -> Vec<serde_json::Value> {
    read_chain(path)
        .into_iter()
        .filter(|r| {
            (r["class_uid"] == 4001 || r["class_uid"] == 4002)
                && r["unmapped"].get("opens").is_none()
        })
        .collect()
}

/// Every complete record of the log at `path`, as written.
pub fn read_chain(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Sends a raw request to the proxy and returns everything it answers until it closes.
pub fn raw_request(proxy: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a CONNECT tunnel and returns the stream and the proxy's answer head.
pub fn connect_tunnel(proxy: SocketAddr, authority: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    // A refusal has a body; read it too so callers can assert on it.
    if !head.starts_with("HTTP/1.1 200") {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        head.push_str(&rest);
    }
    (s, head)
}

/// A header value from a response head.
pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Origins on loopback, served by their own runtime; dropped = stopped.
pub struct Origin {
    runtime: Option<tokio::runtime::Runtime>,
    pub port: u16,
    /// Requests (or connections, for echo) served.
    pub served: Arc<AtomicUsize>,
    /// Raw request heads received, for plain-HTTP origins.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// PEM of the CA that signed a TLS origin's certificate.
    pub ca_pem: Option<PathBuf>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.push(byte[0]);
    }
    Some(buf)
}

/// Answers an HTTP request: a body of `size` bytes at `/bytes/<size>`, else a greeting.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    served: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    let Some(head) = read_head(&mut s).await else {
        return;
    };
    let text = String::from_utf8_lossy(&head).into_owned();
    // Read a Content-Length body, if any, and echo its size.
    let len: usize = header(&text, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if s.read_exact(&mut body).await.is_err() {
        return;
    }
    let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
    served.fetch_add(1, Ordering::SeqCst);
    requests.lock().unwrap().push(text.clone());
    let reply = match path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) => vec![b'x'; n],
        None => format!("hello from the origin: {path} body={len}\n").into_bytes(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(&reply).await;
    let _ = s.shutdown().await;
}

impl Origin {
    /// A TLS origin for `names`, with a throwaway CA whose PEM is written to `dir/ca.pem`.
    pub fn tls(dir: &Path, names: &[&str]) -> Origin {
        let cert = tls::OriginCert::new(dir.join("ca.pem"), names, tls::CertKind::Good);
        let ca_pem = cert.ca_pem.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config(&[]));
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (served.clone(), requests.clone());
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, s, r) = (acceptor.clone(), s.clone(), r.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        answer(tls, s, r).await;
                    }
                });
            }
        });
        Origin {
            runtime: Some(rt),
            port,
            served,
            requests,
            ca_pem: Some(ca_pem),
        }
    }

    /// A plain-HTTP origin.
    pub fn http() -> Origin {
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (served.clone(), requests.clone());
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(answer(tcp, s.clone(), r.clone()));
            }
        });
        Origin {
            runtime: Some(rt),
            port,
            served,
            requests,
            ca_pem: None,
        }
    }

    /// A TCP echo origin (counts connections).
    pub fn echo() -> Origin {
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(AtomicUsize::new(0));
        let s = served.clone();
        rt.spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Origin {
            runtime: Some(rt),
            port,
            served,
            requests: Arc::new(Mutex::new(Vec::new())),
            ca_pem: None,
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// Runs curl (with no config file and no proxy from the environment) and returns
/// (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let curl = require_tool("curl", "curl");
    let out = Command::new(curl)
        .arg("-q")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP connection from a chosen loopback source address.
pub fn bind_connect(src: &str, dst: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let s = sock.connect(dst).await.unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    })
}

/// Raises this test process's soft open-files limit to its hard limit (tests that hold
/// many connections).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}
