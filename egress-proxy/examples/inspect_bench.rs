//! The origin and the client of `cargo xtask bench proxy`'s inspection figures
//! (xtask/src/bench/inspect.rs starts the proxies and runs this): one binary so every proxy
//! is measured with the same TLS stack (rustls, hyper) on both ends.
//!
//! - `origin DIR`: an HTTPS origin for `localhost` on 127.0.0.1 and ::1 (same port),
//!   HTTP/1.1, answering every request with 64 bytes; writes `DIR/origin-ca.pem` and
//!   `DIR/origin.port`, then serves until killed.
//! - `requests PROXY CA PORT SECS`: one tunnel (or `direct`), sequential keep-alive GETs for
//!   SECS; prints `{"rps", "p50_us", "p99_us"}`.
//! - `tunnels PROXY CA PORT SECS CLIENTS`: CLIENTS loops of new tunnel, TLS, one GET, close;
//!   prints `{"per_s", "errors"}`.
//! - `idle PROXY CA PORT N PID`: opens N tunnels with one GET each and leaves them idle;
//!   prints `{"bytes_per_tunnel"}`, the growth of PID's resident memory (with its children)
//!   over them.
//!
//! PROXY is `host:port` of an HTTP proxy, or `direct`; CA is the PEM the client trusts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

#[path = "../tests/common/tls.rs"]
#[allow(dead_code)] // the tests' helper; this driver uses part of it
mod tls;

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let num = |i: usize| -> u64 { arg(i).parse().expect("a number") };
    let out = match arg(0) {
        "origin" => rt.block_on(origin(Path::new(arg(1)))),
        "requests" => rt.block_on(requests(&Client::new(arg(1), arg(2), arg(3)), num(4))),
        "tunnels" => rt.block_on(tunnels(
            Arc::new(Client::new(arg(1), arg(2), arg(3))),
            num(4),
            num(5),
        )),
        "idle" => rt.block_on(idle(
            &Client::new(arg(1), arg(2), arg(3)),
            num(4),
            num(5) as u32,
        )),
        other => panic!("unknown mode `{other}`: origin, requests, tunnels or idle"),
    };
    println!("{out}");
}

async fn origin(dir: &Path) -> serde_json::Value {
    let cert = tls::OriginCert::new(
        dir.join("origin-ca.pem"),
        &["localhost"],
        tls::CertKind::Good,
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config(&["http/1.1"]));
    // The same port on both loopback addresses: `localhost` may resolve to either.
    let (v4, v6) = loop {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            break (v4, v6);
        }
    };
    let port = v4.local_addr().unwrap().port();
    std::fs::write(dir.join("origin.port"), port.to_string()).unwrap();
    for listener in [v4, v6] {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(&[b'x'; 64]),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    }
    std::future::pending::<()>().await;
    unreachable!()
}

struct Client {
    proxy: Option<SocketAddr>,
    port: u16,
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    fn new(proxy: &str, ca: &str, port: &str) -> Client {
        let mut config = tls::client_config(Path::new(ca), &["http/1.1"]);
        // Every new tunnel is a full handshake, as for a new agent connection.
        config.resumption = rustls::client::Resumption::disabled();
        Client {
            proxy: (proxy != "direct").then(|| proxy.parse().expect("proxy address")),
            port: port.parse().expect("origin port"),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// A tunnel (or a direct connection), TLS, and an HTTP/1.1 connection on it.
    async fn open(&self) -> Result<Sender, String> {
        let e = |e: std::io::Error| e.to_string();
        let mut tcp = match self.proxy {
            Some(p) => TcpStream::connect(p).await.map_err(e)?,
            None => TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(e)?,
        };
        tcp.set_nodelay(true).map_err(e)?;
        if self.proxy.is_some() {
            let target = format!("localhost:{}", self.port);
            tcp.write_all(
                format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
            )
            .await
            .map_err(e)?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tcp.read(&mut byte).await.map_err(e)? == 0 {
                    return Err("the proxy closed during CONNECT".into());
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                return Err(String::from_utf8_lossy(&head).into_owned());
            }
        }
        let tls = self
            .tls
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .map_err(e)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

async fn get(sender: &mut Sender, port: u16) -> Result<(), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get("/")
        .header("host", format!("localhost:{port}"))
        .body(Empty::new())
        .unwrap();
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("status {}", res.status()));
    }
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    if body.to_bytes().len() != 64 {
        return Err("short body".into());
    }
    Ok(())
}

async fn requests(c: &Client, secs: u64) -> serde_json::Value {
    let mut s = c.open().await.expect("open a tunnel");
    for _ in 0..50 {
        get(&mut s, c.port).await.expect("warm-up request");
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        get(&mut s, c.port).await.expect("request");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let rps = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    serde_json::json!({ "rps": rps, "p50_us": pct(0.50), "p99_us": pct(0.99) })
}

async fn tunnels(c: Arc<Client>, secs: u64, clients: u64) -> serde_json::Value {
    // One first tunnel so the proxy's leaf for the host is made and cached.
    let mut s = c.open().await.expect("open a tunnel");
    get(&mut s, c.port).await.expect("first request");
    drop(s);
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, done, errors) = (c.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let ok = match c.open().await {
                        Ok(mut s) => get(&mut s, c.port).await.is_ok(),
                        Err(_) => false,
                    };
                    if ok { &done } else { &errors }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let per_s = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    serde_json::json!({ "per_s": per_s, "errors": errors.load(Ordering::Relaxed) })
}

/// Resident memory of `pid` and its descendants, bytes.
fn rss_tree(pid: u32) -> u64 {
    let mut total = 0;
    let mut pids = vec![pid];
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    while let Some(p) = pids.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        pids.extend(procs.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
    }
    total
}

async fn idle(c: &Client, n: u64, pid: u32) -> serde_json::Value {
    let mut warm = Vec::new();
    for _ in 0..20 {
        let mut s = c.open().await.expect("open a tunnel");
        get(&mut s, c.port).await.expect("request");
        warm.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_tree(pid);
    let mut open = Vec::new();
    for _ in 0..n {
        let mut s = c.open().await.expect("open a tunnel");
        get(&mut s, c.port).await.expect("request");
        open.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_tree(pid);
    drop((warm, open));
    serde_json::json!({ "bytes_per_tunnel": after.saturating_sub(before) as f64 / n as f64 })
}
