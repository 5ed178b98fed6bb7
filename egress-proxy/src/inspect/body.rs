//! Bodies passing through an inspected exchange: counted (for the request record), masked
//! (a credential's secret never reaches the agent), and the exchange's record written when
//! the response body ends or is dropped, whichever comes first.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::credentials::StreamMask;

/// Errors of a body in either direction.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy builds.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A whole body from bytes.
pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body passed through: bytes counted, a secret masked, `on_end` run once at the end.
pub struct Tap {
    inner: ProxyBody,
    count: Arc<AtomicU64>,
    mask: Option<StreamMask>,
    held_back: bool,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Tap {
    /// Taps `inner`, adding the data bytes to `count`.
    pub fn new(inner: ProxyBody, count: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            count,
            mask: None,
            held_back: false,
            on_end: None,
        }
    }

    /// Masks every occurrence of a secret (same length, so framing is unchanged).
    pub fn masking(mut self, mask: Option<StreamMask>) -> Self {
        self.mask = mask;
        self
    }

    /// Runs `f` once when the body ends or is dropped.
    pub fn on_end(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_end = Some(Box::new(f));
        self
    }

    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.end();
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.held_back {
            // The stream ended; what the mask kept back goes out, then the end.
            this.held_back = false;
            if let Some(tail) = this.mask.take().map(|mut m| m.finish()) {
                if !tail.is_empty() {
                    this.count.fetch_add(tail.len() as u64, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                }
            }
            this.end();
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let data = match this.mask.as_mut() {
                        Some(m) => Bytes::from(m.feed(&data)),
                        None => data,
                    };
                    this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(trailers) => Poll::Ready(Some(Ok(trailers))),
            },
            Poll::Ready(None) if this.mask.is_some() => {
                this.held_back = true;
                Pin::new(this).poll_frame(cx)
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.end();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.held_back && self.mask.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
