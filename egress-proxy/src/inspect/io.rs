//! The agent side of a tunnel as the TLS layer sees it: bytes the proxy already read past
//! the CONNECT head come first, and every byte each way is counted for the tunnel's record.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes moved on the agent connection.
#[derive(Debug, Default)]
pub struct Counts {
    /// Agent → proxy.
    pub from_agent: AtomicU64,
    /// Proxy → agent.
    pub to_agent: AtomicU64,
}

/// `early` bytes, then the stream; counting both ways.
pub struct AgentIo<S> {
    early: Vec<u8>,
    at: usize,
    inner: S,
    counts: Arc<Counts>,
}

impl<S> AgentIo<S> {
    /// Wraps `inner`, which is read after `early`.
    pub fn new(early: Vec<u8>, inner: S, counts: Arc<Counts>) -> Self {
        counts
            .from_agent
            .fetch_add(early.len() as u64, Ordering::Relaxed);
        Self {
            early,
            at: 0,
            inner,
            counts,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AgentIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.early.len() {
            let n = (this.early.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.early[this.at..this.at + n]);
            this.at += n;
            if this.at == this.early.len() {
                this.early = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.counts
            .from_agent
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AgentIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counts.to_agent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
