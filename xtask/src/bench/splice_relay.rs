//! The bench's limit row: a bare splice relay, in its own process, with no policy and no
//! log. It answers `CONNECT ip:port` with `200` and moves bytes each way with `splice(2)`
//! through a 1 MiB pipe, as egress-proxy does, on blocking threads. Whatever throughput it
//! reaches on this machine is what any relay of one extra loopback hop can reach, so the
//! proxy's throughput is judged against it rather than against direct TCP.
//!
//! Run by the bench as `cargo xtask splice-relay --listen ADDR` (a hidden subcommand).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;

/// Options of the hidden `cargo xtask splice-relay`.
#[derive(clap::Args)]
pub struct Options {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

/// Serves tunnels until killed.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let listener = TcpListener::bind(opts.listen)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            let _ = tunnel(stream);
        });
    }
    Ok(())
}

fn tunnel(mut client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut buf)?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let target: SocketAddr = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "CONNECT ip:port expected"))?;
    let mut origin = TcpStream::connect(target)?;
    origin.set_nodelay(true)?;
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    origin.write_all(&head[end..])?;
    let (c, o) = (client.try_clone()?, origin.try_clone()?);
    let up = thread::spawn(move || pump(&c, &o));
    let _ = pump(&origin, &client);
    let _ = up.join();
    Ok(())
}

/// Moves bytes from `from` to `to` through a pipe until `from` closes, then half-closes `to`.
fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own; best effort, as egress-proxy does.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    loop {
        let n = splice(from.as_raw_fd(), w.as_raw_fd(), 1 << 20)?;
        if n == 0 {
            let _ = to.shutdown(Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= splice(r.as_raw_fd(), to.as_raw_fd(), left)?;
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain system call on descriptors the caller owns; null offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
