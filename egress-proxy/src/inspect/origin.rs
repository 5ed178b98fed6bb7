//! The proxy's own TLS connection to the origin of an inspected tunnel: verified against
//! the system roots plus `upstream_ca` for exactly the CONNECT host, HTTP/2 or HTTP/1.1 as
//! the origin chooses by ALPN (independently of what the agent chose), and reopened to the
//! same checked address when the origin closes it. A WebSocket upgrade gets a connection
//! of its own, HTTP/1.1 only, which the upgraded stream then takes over.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, pki_types};

use super::body::ProxyBody;

/// The client TLS configuration towards origins: system roots plus `upstream_ca`.
pub fn client_config(upstream_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = upstream_ca {
        use pki_types::pem::PemObject;
        let certs = pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("upstream_ca `{}`: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("upstream_ca `{}`: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "upstream_ca `{}` holds no PEM certificate",
                path.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("upstream_ca `{}`: {e}", path.display()))?;
        }
    } else if added == 0 {
        return Err("no system root certificates found and no upstream_ca given: no origin could be verified".into());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `config` offering HTTP/1.1 only: the origin side of a WebSocket upgrade.
pub fn h1_only(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Opens TLS to the origin over `tcp` (already dialled to a checked address), verifying
/// its certificate for `host`. The error is one line naming what failed.
pub async fn tls(
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    let name = pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(format!(
            "TLS handshake with the origin timed out after {timeout:?}"
        )),
        Ok(Err(e)) => Err(format!(
            "origin certificate not accepted for {host}: {}",
            tls_reason(&e)
        )),
        Ok(Ok(s)) => Ok(s),
    }
}

fn tls_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("{c:?}").to_lowercase().replace('_', " ")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// The origin side of one inspected tunnel.
pub struct Origin {
    addr: SocketAddr,
    host: String,
    config: Arc<rustls::ClientConfig>,
    h1_config: Arc<rustls::ClientConfig>,
    timeout: Duration,
    sender: tokio::sync::Mutex<Option<Sender>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Whether the origin speaks HTTP/2 (what it chose on the first connection).
    pub h2: bool,
}

impl Drop for Origin {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Origin {
    /// Takes over the first, verified connection.
    pub async fn new(
        first: TlsStream<TcpStream>,
        addr: SocketAddr,
        host: &str,
        config: Arc<rustls::ClientConfig>,
        h1_config: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Origin, String> {
        let h2 = first.get_ref().1.alpn_protocol() == Some(b"h2");
        let origin = Origin {
            addr,
            host: host.to_owned(),
            config,
            h1_config,
            timeout,
            sender: tokio::sync::Mutex::new(None),
            tasks: std::sync::Mutex::new(Vec::new()),
            h2,
        };
        let sender = origin.handshake(first).await?;
        *origin.sender.lock().await = Some(sender);
        Ok(origin)
    }

    async fn handshake(&self, tls: TlsStream<TcpStream>) -> Result<Sender, String> {
        let io = TokioIo::new(tls);
        let err = |e: hyper::Error| format!("HTTP handshake with the origin: {e}");
        let (sender, task) = if self.h2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(err)?;
            (
                Sender::H2(s),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        } else {
            let (s, conn) = http1::handshake(io).await.map_err(err)?;
            (
                Sender::H1(s),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Ok(sender)
    }

    /// A new TLS connection to the same checked address, verified again.
    async fn dial(
        &self,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<TlsStream<TcpStream>, String> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("reconnecting to {} timed out", self.addr))?
            .map_err(|e| format!("cannot reconnect to {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        tls(config, &self.host, tcp, self.timeout).await
    }

    async fn reopen(&self) -> Result<Sender, String> {
        let tls = self.dial(&self.config).await?;
        if (tls.get_ref().1.alpn_protocol() == Some(b"h2")) != self.h2 {
            return Err("the origin changed its HTTP version between connections".into());
        }
        self.handshake(tls).await
    }

    /// Sends a WebSocket upgrade request (origin form, `Connection`/`Upgrade` set) on a new
    /// HTTP/1.1 connection of its own; after a `101` the response's upgrade is the stream.
    pub async fn upgrade(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let tls = self.dial(&self.h1_config).await?;
        let err = |e: hyper::Error| format!("origin: {e}");
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls)).await.map_err(err)?;
        let task = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
        sender.send_request(req).await.map_err(err)
    }

    /// Sends one request (its URI already in the form the origin's HTTP version wants).
    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let mut slot = self.sender.lock().await;
        let usable = match slot.as_mut() {
            Some(Sender::H1(s)) => !s.is_closed() && s.ready().await.is_ok(),
            Some(Sender::H2(s)) => !s.is_closed(),
            None => false,
        };
        if !usable {
            *slot = Some(self.reopen().await?);
        }
        let err = |e: hyper::Error| format!("origin: {e}");
        match slot.as_mut().expect("set above") {
            Sender::H2(s) => {
                let mut s = s.clone();
                drop(slot);
                s.send_request(req).await.map_err(err)
            }
            Sender::H1(s) => {
                // Queued on the connection now; the next request waits in `ready` until
                // this exchange is over.
                let response = s.send_request(req);
                drop(slot);
                response.await.map_err(err)
            }
        }
    }
}
