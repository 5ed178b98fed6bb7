//! Relaying bytes between client and origin.
//!
//! Tunnels move data with `splice(2)` through a pipe per direction: the payload goes from
//! one socket's receive queue to the other's send queue without being copied through user
//! space, which is what lets a tunnel run near loopback speed. A direction holds its pipe
//! only while it has bytes to move; empty pipes go back to a small pool, so an idle tunnel
//! holds its two sockets and nothing else in the kernel. If a pipe cannot be had the relay
//! falls back to read/write through a buffer.
//!
//! Both directions run in one task; a tunnel ends when both sides have closed (half-close is
//! passed on), on an error, after `idle_timeout` with no bytes either way, on shutdown, or
//! when it reaches a ceiling of its rule's budget ([`crate::budget`]): each read asks for no
//! more than the room left, so a tunnel stops at the ceiling, not one buffer past it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::budget::{Charge, Kind};
use crate::http::{BodyKind, ChunkedScanner};
use crate::metrics::Metrics;

/// Bytes moved per splice call at most.
const CHUNK: usize = 1 << 20;
/// Capacity asked for each relay pipe.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Buffer of the read/write fallback and of request-body forwarding.
const BUF: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed (or, for a forwarded request, the origin finished its response).
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// The proxy is shutting down and the grace period ran out.
    Shutdown,
    /// A ceiling of the rule's budget was reached (the text says which).
    Budget(String),
    /// A socket error, or a malformed request body.
    Error(io::Error),
}

impl End {
    /// The error text for the audit record, if the relay did not end cleanly.
    pub fn error(&self) -> Option<String> {
        match self {
            End::Closed => None,
            End::Idle => Some("idle timeout".to_owned()),
            End::Shutdown => Some("cut at shutdown".to_owned()),
            End::Budget(why) => Some(why.clone()),
            End::Error(e) => Some(e.to_string()),
        }
    }
}

/// Bytes relayed and how the relay ended.
#[derive(Debug)]
pub struct Outcome {
    /// Origin → client.
    pub bytes_in: u64,
    /// Client → origin.
    pub bytes_out: u64,
    /// Why it ended.
    pub end: End,
}

/// What flows from client to origin.
#[derive(Clone, Copy, Debug)]
pub enum Upstream {
    /// A tunnel: everything, until the client closes.
    Tunnel,
    /// A forwarded request: exactly its body, then nothing (a pipelined second request
    /// never reaches the origin unchecked).
    Body(BodyKind),
}

/// Empty relay pipes kept for reuse, at most. A direction holds a pipe only while it has
/// bytes to move and gives it back when its source runs dry, so an idle tunnel holds none
/// (two descriptors, not six, and no pipe in the kernel) and a busy one takes a pipe from
/// here instead of making one (two system calls and a kernel allocation) at every burst.
pub const POOLED_PIPES: usize = 32;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// An empty pipe: one from the pool, else a new one.
    fn take() -> io::Result<Pipe> {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Gives an empty pipe back (closed when the pool is full). Only an empty pipe is
    /// shared: every byte spliced into it was spliced out before it is given back.
    fn give(self) {
        debug_assert_eq!(self.queued(), 0, "a pipe given back still holds bytes");
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let surplus = if pool.len() < POOLED_PIPES {
            pool.push(self);
            None
        } else {
            Some(self)
        };
        drop(pool);
        drop(surplus);
    }

    /// Bytes waiting in the pipe (checked in debug builds only).
    fn queued(&self) -> libc::c_int {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe we own, into a valid c_int.
        unsafe { libc::ioctl(self.r.as_raw_fd(), libc::FIONREAD, &mut n) };
        n
    }

    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer system calls per byte (measured: +15% throughput over the
        // default 64 KiB); best effort (pipe-max-size, pipe-user-pages-soft). Pages are
        // allocated only while data is in flight.
        // SAFETY: F_SETPIPE_SZ on a pipe we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { r, w })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain system call on descriptors owned by the caller; null offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn shutdown_write(s: &TcpStream) {
    // SAFETY: shutdown(2) on a socket the caller owns; failure (already closed) is harmless.
    unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
}

/// The last time bytes moved, as nanoseconds after a base instant (atomics keep the
/// connection future `Send`).
struct Activity {
    base: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

struct Side<'a> {
    count: &'a AtomicU64,
    total: &'a crate::metrics::Counter,
    activity: &'a Activity,
    budget: Option<(&'a Charge, Kind)>,
}

impl Side<'_> {
    fn moved(&self, n: usize) {
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        self.total.add(n as u64);
        self.activity.touch();
        if let Some((charge, kind)) = self.budget {
            charge.moved(kind, n as u64);
        }
    }

    /// How much of `want` the next read may take: all of it without a budget, else no
    /// more than the room left; none left is the cut.
    fn room(&self, want: usize) -> io::Result<usize> {
        match self.budget {
            None => Ok(want),
            Some((charge, kind)) => charge.take(kind, want),
        }
    }
}

/// Moves everything from `from` to `to` until `from` closes, then half-closes `to`.
///
/// A pipe is taken when bytes are ready and given back whenever `from` runs dry (the pipe
/// is empty then), so a direction waiting for data, or one that never carries any, holds
/// no pipe.
async fn pump(from: &TcpStream, to: &TcpStream, side: Side<'_>) -> io::Result<()> {
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        let want = side.room(CHUNK)?;
        let p = match pipe {
            Some(ref p) => p,
            None => match Pipe::take() {
                Ok(p) => pipe.insert(p),
                Err(_) => return copy(from, to, side).await,
            },
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), p.w.as_raw_fd(), want)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(dry) = pipe.take() {
                    dry.give();
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            if let Some(done) = pipe.take() {
                done.give();
            }
            shutdown_write(to);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(p.r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    side.moved(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// [`pump`] through a buffer, for when no pipe can be had (descriptors exhausted).
async fn copy(from: &TcpStream, to: &TcpStream, side: Side<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        from.readable().await?;
        let want = side.room(BUF)?;
        let n = read(from, &mut buf[..want]).await?;
        if n == 0 {
            shutdown_write(to);
            return Ok(());
        }
        write_all(to, &buf[..n]).await?;
        side.moved(n);
    }
}

async fn read(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `buf` to a shared stream.
pub async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards exactly one request body (`early` holds bytes already read after the head).
async fn body(
    from: &TcpStream,
    to: &TcpStream,
    kind: BodyKind,
    early: &[u8],
    side: Side<'_>,
) -> io::Result<()> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed chunked request body");
    let mut buf = vec![0u8; BUF];
    match kind {
        BodyKind::None => Ok(()),
        BodyKind::Length(mut left) => {
            let first = (left.min(early.len() as u64)) as usize;
            write_all(to, &early[..first]).await?;
            side.moved(first);
            left -= first as u64;
            while left > 0 {
                let want = side.room(left.min(BUF as u64) as usize)?;
                let n = read(from, &mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed mid-body",
                    ));
                }
                write_all(to, &buf[..n]).await?;
                side.moved(n);
                left -= n as u64;
            }
            Ok(())
        }
        BodyKind::Chunked => {
            let mut scanner = ChunkedScanner::default();
            if !early.is_empty() {
                let n = scanner
                    .feed(early)
                    .map_err(|_| malformed())?
                    .unwrap_or(early.len());
                write_all(to, &early[..n]).await?;
                side.moved(n);
            }
            while !scanner.is_done() {
                let want = side.room(BUF)?;
                let n = read(from, &mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed mid-body",
                    ));
                }
                let take = scanner
                    .feed(&buf[..n])
                    .map_err(|_| malformed())?
                    .unwrap_or(n);
                write_all(to, &buf[..take]).await?;
                side.moved(take);
            }
            Ok(())
        }
    }
}

/// Relays between `client` and `origin` until the exchange ends. `early` holds client
/// bytes already read past the request head. `charge` is the rule's budget, if it has one.
#[allow(clippy::too_many_arguments)] // the one entry point of a relay; each says what it is
pub async fn relay(
    client: &TcpStream,
    origin: &TcpStream,
    upstream: Upstream,
    early: &[u8],
    idle: Duration,
    cancel: &CancellationToken,
    metrics: &Metrics,
    charge: Option<&Charge>,
) -> Outcome {
    let (bytes_in, bytes_out) = (AtomicU64::new(0), AtomicU64::new(0));
    let activity = Activity {
        base: Instant::now(),
        last: AtomicU64::new(0),
    };
    let out_side = || Side {
        count: &bytes_out,
        total: &metrics.bytes_out,
        activity: &activity,
        budget: charge.map(|c| (c, Kind::BytesOut)),
    };
    let in_side = Side {
        count: &bytes_in,
        total: &metrics.bytes_in,
        activity: &activity,
        budget: charge.map(|c| (c, Kind::BytesIn)),
    };
    let up = async {
        match upstream {
            Upstream::Tunnel => {
                if !early.is_empty() {
                    if out_side().room(early.len())? < early.len() {
                        let c = charge.expect("only a budget limits the room");
                        return Err(c.cut_error(Kind::BytesOut));
                    }
                    write_all(origin, early).await?;
                    out_side().moved(early.len());
                }
                pump(client, origin, out_side()).await
            }
            Upstream::Body(kind) => body(client, origin, kind, early, out_side()).await,
        }
    };
    let down = pump(origin, client, in_side);
    let watchdog = async {
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    // `tunnel_secs`: how long one tunnel may stay open.
    let tunnel_limit = charge
        .and_then(Charge::tunnel_limit)
        .filter(|_| matches!(upstream, Upstream::Tunnel));
    let lifetime = async {
        match tunnel_limit {
            Some(limit) => tokio::time::sleep_until(activity.base + limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(up, down, watchdog, lifetime);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => break ended(e, charge),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => break ended(e, charge),
            },
            () = &mut watchdog => break End::Idle,
            () = cancel.cancelled() => break End::Shutdown,
            () = &mut lifetime => {
                let c = charge.expect("a tunnel limit comes from a charge");
                let secs = activity.base.elapsed().as_secs();
                break End::Budget(c.cut(Kind::TunnelSecs, secs));
            }
        }
        // A tunnel ends when both sides have closed; a forwarded request when the origin
        // has sent its whole response (it was asked to close the connection after it).
        if down_done && (up_done || matches!(upstream, Upstream::Body(_))) {
            break End::Closed;
        }
    };
    Outcome {
        bytes_in: bytes_in.load(Ordering::Relaxed),
        bytes_out: bytes_out.load(Ordering::Relaxed),
        end,
    }
}

/// The end of a relay that failed with `e`: a budget cut if the charge says so.
fn ended(e: io::Error, charge: Option<&Charge>) -> End {
    match charge {
        Some(c) if c.was_cut() => End::Budget(e.to_string()),
        _ => End::Error(e),
    }
}

/// Reads and discards what a refused client still sends, briefly, so that closing the
/// socket does not reset the connection before the client has read the refusal.
pub async fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut total = 0;
    while total < 256 * 1024 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}
