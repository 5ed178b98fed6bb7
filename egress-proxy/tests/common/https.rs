//! An HTTPS origin on loopback for the inspection tests: hyper serving HTTP/1.1 and/or
//! HTTP/2 (by ALPN) with a certificate from its own throwaway CA, recording every request it
//! receives. It answers like a small GitHub: `/repos/...` with JSON, `/echo` with the
//! request's headers (in the body and in `x-echo-*` response headers), `/redirect?to=URL`
//! with a 302, `/bytes/N` with N bytes, and, given a directory D: the git repositories
//! under `D/git` over smart HTTP at `/git/` (git's own `git http-backend`, run as CGI) and
//! the files under `D/files` at `/files/` (package indexes: `index.html` for a path ending
//! in `/`).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub use super::tls::CertKind;
use super::tls::OriginCert;

/// One request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct HttpsOrigin {
    runtime: Option<tokio::runtime::Runtime>,
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The CA to give the proxy as `upstream_ca`.
    pub ca_pem: PathBuf,
}

impl Drop for HttpsOrigin {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl HttpsOrigin {
    pub fn start(
        dir: &Path,
        names: &[&str],
        alpn: &[&str],
        kind: CertKind,
        files: Option<PathBuf>,
    ) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let cert = OriginCert::new(
            dir.join(format!(
                "origin-ca-{}.pem",
                NEXT.fetch_add(1, Ordering::Relaxed)
            )),
            names,
            kind,
        );
        let ca_pem = cert.ca_pem.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config(alpn));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let files = files.map(Arc::new);
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, s, files) = (acceptor.clone(), s.clone(), files.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        answer(req, s.clone(), files.clone(), port)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsOrigin {
            runtime: Some(rt),
            port,
            seen,
            ca_pem,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer(
    req: hyper::Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    files: Option<Arc<PathBuf>>,
    port: u16,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let version = format!("{:?}", parts.version);
    seen.lock().unwrap().push(Seen {
        method: parts.method.as_str().to_owned(),
        path: path.clone(),
        version: version.clone(),
        headers: headers.clone(),
        body_len: body.len(),
    });
    let mut response = hyper::Response::builder().status(200);
    let plain = path.split('?').next().unwrap_or("/").to_owned();
    let body: Vec<u8> = if plain.starts_with("/echo") {
        for (k, v) in &headers {
            response = response.header(format!("x-echo-{k}"), v.as_str());
        }
        response = response.header("content-type", "application/json");
        serde_json::to_vec(&serde_json::json!({ "headers": headers, "path": path })).unwrap()
    } else if let Some(to) = path.strip_prefix("/redirect?to=") {
        response = response.status(302).header("location", to);
        Vec::new()
    } else if let Some(n) = plain
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        vec![b'x'; n]
    } else if plain.starts_with("/repos/") {
        response = response.header("content-type", "application/json");
        serde_json::to_vec(
            &serde_json::json!({ "full_name": plain.trim_start_matches("/repos/"), "port": port }),
        )
        .unwrap()
    } else if let (Some(rel), Some(dir)) = (plain.strip_prefix("/git/"), &files) {
        let query = path.split_once('?').map_or("", |(_, q)| q);
        let (status, cgi_headers, out) =
            git_http_backend(&dir.join("git"), &parts, rel, query, body.to_vec()).await;
        response = response.status(status);
        for (k, v) in cgi_headers {
            response = response.header(k, v);
        }
        out
    } else if let (Some(rel), Some(dir)) = (plain.strip_prefix("/files/"), &files) {
        let file = match rel {
            r if r.is_empty() || r.ends_with('/') => format!("{r}index.html"),
            r => r.to_owned(),
        };
        match std::fs::read(dir.join("files").join(&file)) {
            Ok(data) if !file.contains("..") => {
                let kind = match file.rsplit_once('.').map(|(_, e)| e) {
                    Some("html") => "text/html",
                    Some("json") => "application/json",
                    _ => "application/octet-stream",
                };
                response = response.header("content-type", kind);
                data
            }
            _ => {
                response = response.status(404);
                b"not found\n".to_vec()
            }
        }
    } else {
        format!(
            "hello {} {path} {version} body={}\n",
            parts.method,
            body.len()
        )
        .into_bytes()
    };
    Ok(response.body(Full::new(Bytes::from(body))).unwrap())
}

/// Runs `git http-backend` (CGI) for one request to `/git/REL`: returns the status, the
/// headers it printed and the body.
async fn git_http_backend(
    root: &Path,
    parts: &http::request::Parts,
    rel: &str,
    query: &str,
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut cmd = std::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root)
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{rel}"))
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd.spawn().expect("git http-backend");
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let out = child.wait_with_output().expect("git http-backend output");
        let _ = writer.join();
        out.stdout
    })
    .await
    .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return (500, Vec::new(), out);
    };
    let mut status = 200;
    let mut headers = Vec::new();
    for line in String::from_utf8_lossy(&out[..at]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_owned();
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
        } else {
            headers.push((k.to_owned(), v));
        }
    }
    (status, headers, out[at + sep..].to_vec())
}

/// A response as a test client got it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub version: http::Version,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// An HTTPS client inside one CONNECT tunnel through the proxy, trusting `ca_pem`.
pub struct TunnelClient {
    sender: Sender,
    authority: String,
    /// The ALPN protocol the proxy chose towards this client.
    pub alpn: Option<Vec<u8>>,
}

impl TunnelClient {
    /// CONNECT `authority` through `proxy`, then TLS with `sni`, offering `alpn`.
    pub async fn open(
        proxy: std::net::SocketAddr,
        authority: &str,
        sni: &str,
        ca_pem: &Path,
        alpn: &[&str],
    ) -> Result<TunnelClient, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(proxy)
            .await
            .map_err(|e| e.to_string())?;
        tcp.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tcp.read_to_end(&mut rest),
            )
            .await;
            return Err(format!("{head}{}", String::from_utf8_lossy(&rest)));
        }
        let config = super::tls::client_config(ca_pem, alpn);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(sni.to_owned().try_into().unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS through the tunnel: {e}"))?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Ok(TunnelClient {
            sender,
            authority: authority.trim_end_matches(":443").to_owned(),
            alpn,
        })
    }

    /// One request on the tunnel's connection; `host` overrides the Host/:authority.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        host: Option<&str>,
    ) -> Result<Got, String> {
        let authority = host.unwrap_or(&self.authority).to_owned();
        let mut b = hyper::Request::builder().method(method);
        b = match &self.sender {
            Sender::H2(_) => b.uri(format!("https://{authority}{path}")),
            Sender::H1(_) => b.uri(path).header("host", authority),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Sender::H2(s) => s.send_request(req).await,
        }
        .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            version: parts.version,
        })
    }
}

/// Makes an inspection CA in `dir/name` with the real CLI (`egress-proxy ca init`).
pub fn make_ca(dir: &Path, name: &str, domains: &[&str]) -> PathBuf {
    let ca = dir.join(name);
    let mut cmd = std::process::Command::new(super::BIN);
    cmd.args(["ca", "init"]).arg(&ca);
    for d in domains {
        cmd.args(["--domain", d]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ca
}
