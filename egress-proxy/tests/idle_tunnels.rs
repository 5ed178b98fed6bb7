//! Many idle tunnels from many client addresses hold only their sockets (issue 13, the fleet
//! proxy; the 100,000-tunnel figures are `cargo xtask bench idle`): every tunnel below
//! `max_connections` is served, the one past it refused, and once their bytes have moved
//! the proxy holds no pipe for them, judged from its own descriptor table
//! (`/proc/PID/fd`), not from timing.

mod common;
use common::*;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use egress_proxy::relay::POOLED_PIPES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TUNNELS: usize = 2000;
/// Fewest tunnels the test judges by (where the open-files limit allows no more).
const MIN_TUNNELS: usize = 500;
/// Descriptors the proxy keeps in reserve, and a margin.
const RESERVE: u64 = 400;
/// Client source addresses (127.1.j.1), as agent hosts behind one proxy.
const ADDRS: usize = 16;
/// Descriptors the proxy needs for TUNNELS (seven each at most, plus its reserve), asked for.
const NOFILE: u64 = 16 * 1024;

/// The proxy's descriptors: (sockets, pipes).
fn descriptors(pid: u32) -> (usize, usize) {
    let (mut sockets, mut pipes) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed while listing
        };
        let target = target.to_string_lossy();
        if target.starts_with("socket:") {
            sockets += 1;
        } else if target.starts_with("pipe:") {
            pipes += 1;
        }
    }
    (sockets, pipes)
}

/// How many tunnels this machine's open-files limit leaves room for, up to [`TUNNELS`]: the
/// limit is raised to [`NOFILE`] where it can be (raising the hard limit needs
/// CAP_SYS_RESOURCE), else the test runs at the scale the hard limit allows (the proxy needs
/// seven descriptors a connection plus its reserve), and refuses to run below
/// [`MIN_TUNNELS`], saying why.
fn tunnels_allowed() -> usize {
    raise_nofile();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < NOFILE {
            let raised = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let n = (lim.rlim_cur.saturating_sub(RESERVE) / 7) as usize;
    assert!(
        n >= MIN_TUNNELS,
        "this test needs RLIMIT_NOFILE >= {} for {MIN_TUNNELS} tunnels; the hard limit is {} (raising it needs root with CAP_SYS_RESOURCE)",
        MIN_TUNNELS as u64 * 7 + RESERVE,
        lim.rlim_max
    );
    n.min(TUNNELS)
}

/// A tunnel from `src` that has carried `msg` there and back (so both its directions had a
/// pipe once); the error is the answer's status line.
async fn tunnel(
    proxy: SocketAddr,
    src: Ipv4Addr,
    authority: &str,
    msg: &[u8],
) -> Result<tokio::net::TcpStream, String> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src.into(), 0)).unwrap();
    let mut s = sock.connect(proxy).await.map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    if &head != b"HTTP/1.1 200 Connection established\r\n\r\n" {
        return Err(String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned());
    }
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
    assert_eq!(back, msg, "the tunnel echoed wrong bytes");
    Ok(s)
}

#[test]
fn idle_tunnels_below_max_connections_are_served_and_hold_no_pipes() {
    let tunnels = tunnels_allowed();
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start(
        dir.path(),
        &format!("allowed_domains = [{{ domain = \"echo.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"echo.test\" = \"127.0.0.1\"\n[limits]\nmax_connections = {tunnels}\nmax_connections_per_client = {}\nidle_timeout_secs = 600\n", tunnels / ADDRS + 10),
    );
    assert!(
        !proxy.log_text().contains("lowered"),
        "the proxy lowered max_connections:\n{}",
        proxy.log_text()
    );
    let (base_sockets, _) = descriptors(proxy.pid);
    let addr = proxy.addr;
    let auth = format!("echo.test:{p}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut streams, refused) = rt.block_on(async {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
        let mut tasks = Vec::with_capacity(tunnels);
        for i in 0..tunnels {
            let (limit, auth) = (limit.clone(), auth.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let src = Ipv4Addr::new(127, 1, (i % ADDRS) as u8, 1);
                let msg = vec![(i % 251) as u8; 4096];
                tunnel(addr, src, &auth, &msg).await
            }));
        }
        let (mut streams, mut refused) = (Vec::new(), Vec::new());
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("tunnel setup timed out")
                .unwrap()
            {
                Ok(s) => streams.push(s),
                Err(why) => refused.push(why),
            }
        }
        (streams, refused)
    });
    assert!(
        refused.is_empty(),
        "{} of {tunnels} tunnels below max_connections were not served, e.g. {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(proxy.metric("egress_proxy_active_tunnels"), tunnels as f64);

    // Idle now: two sockets each, and no pipe beyond the relay's pool of empty ones (with a
    // pipe per direction kept for the tunnel's life this would be 4 x TUNNELS).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (sockets, pipes) = loop {
        let (sockets, pipes) = descriptors(proxy.pid);
        if pipes <= 2 * POOLED_PIPES || Instant::now() > deadline {
            break (sockets, pipes);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        pipes <= 2 * POOLED_PIPES,
        "{pipes} pipe descriptors held for {tunnels} idle tunnels (at most {} allowed: the pool)",
        2 * POOLED_PIPES
    );
    // Two sockets per tunnel; a few more may be admin connections in flight.
    let extra = sockets - base_sockets;
    assert!(
        (2 * tunnels..2 * tunnels + 4).contains(&extra),
        "{extra} more sockets for {tunnels} tunnels"
    );

    // At max_connections the next connection is refused, and says why.
    let (_s, head) = connect_tunnel(addr, &auth);
    assert!(
        head.starts_with("HTTP/1.1 503"),
        "past max_connections: {head}"
    );
    assert_eq!(
        header(&head, "X-Tank-Refused-By"),
        Some("connection-limit"),
        "{head}"
    );

    // An idle tunnel takes a pipe again when bytes come: every tenth one still relays.
    rt.block_on(async {
        for (i, s) in streams.iter_mut().enumerate().step_by(10) {
            let msg = vec![(i % 7) as u8; 64 * 1024];
            let (mut r, mut w) = s.split();
            let (wr, rd) = tokio::join!(w.write_all(&msg), async {
                let mut back = vec![0u8; msg.len()];
                r.read_exact(&mut back).await.map(|_| back)
            });
            wr.unwrap();
            assert_eq!(rd.unwrap(), msg, "tunnel {i} after idling");
        }
    });
    drop(streams);
    drop(proxy);
}
