//! 1,000 concurrent tunnels through one proxy, with bounded memory: the proxy's resident
//! set is measured (VmHWM, the peak) while all of them are open and relaying.

mod common;
use common::*;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TUNNELS: usize = 1000;
/// Peak resident memory the proxy may grow by with all tunnels open: 24 KiB per
/// tunnel (about 3x the 7 KiB measured: task, head buffer, audit queue); a user-space copy
/// buffer per direction (2 x 64 KiB) or a leak per tunnel would blow through it.
const GROWTH_LIMIT_KIB: u64 = 24 * 1024;

fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= 4 * TUNNELS as u64,
        "RLIMIT_NOFILE hard limit {} is too low for this test",
        lim.rlim_max
    );
}

#[test]
fn a_thousand_concurrent_tunnels_with_bounded_memory() {
    raise_nofile();
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let proxy = Proxy::start(
        dir.path(),
        &format!("allowed_domains = [{{ domain = \"echo.test\", ports = [{p}], allow_private = true }}]\n[hosts]\n\"echo.test\" = \"127.0.0.1\"\n"),
    );
    let addr = proxy.addr;
    // Warm up (runtime threads, first allocations), then take the baseline.
    let (s, _) = connect_tunnel(addr, &format!("echo.test:{p}"));
    drop(s);
    proxy.wait_records(1);
    let baseline = status_kib(proxy.pid, "VmRSS:");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let streams = rt.block_on(async move {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
        let mut tasks = Vec::with_capacity(TUNNELS);
        for i in 0..TUNNELS {
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("CONNECT echo.test:{p} HTTP/1.1\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut head = [0u8; 39];
                s.read_exact(&mut head).await.unwrap();
                assert_eq!(
                    &head, b"HTTP/1.1 200 Connection established\r\n\r\n",
                    "tunnel {i}"
                );
                let msg = vec![(i % 251) as u8; 1024];
                s.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; 1024];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg, "tunnel {i} echoed wrong bytes");
                s
            }));
        }
        let mut streams = Vec::with_capacity(TUNNELS);
        for t in tasks {
            streams.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .expect("tunnel setup timed out")
                    .unwrap(),
            );
        }
        streams
    });
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(proxy.metric("egress_proxy_active_tunnels"), TUNNELS as f64);
    assert_eq!(origin.served(), TUNNELS + 1);

    // All open at once: relay a second round on every tunnel concurrently.
    let streams = rt.block_on(async move {
        let mut tasks = Vec::with_capacity(TUNNELS);
        for mut s in streams {
            tasks.push(tokio::spawn(async move {
                let msg = vec![7u8; 16 * 1024];
                let (mut r, mut w) = s.split();
                let (wr, rd) = tokio::join!(w.write_all(&msg), async {
                    let mut back = vec![0u8; msg.len()];
                    r.read_exact(&mut back).await.map(|_| back)
                });
                wr.unwrap();
                assert_eq!(rd.unwrap(), msg);
                s
            }));
        }
        let mut out = Vec::with_capacity(TUNNELS);
        for t in tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .expect("relay timed out")
                    .unwrap(),
            );
        }
        out
    });
    let peak = status_kib(proxy.pid, "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    eprintln!("proxy RSS: baseline {baseline} KiB, peak {peak} KiB with {TUNNELS} tunnels (growth {growth} KiB, {} KiB/tunnel)", growth / TUNNELS as u64);
    assert!(
        growth < GROWTH_LIMIT_KIB,
        "proxy grew by {growth} KiB for {TUNNELS} tunnels (limit {GROWTH_LIMIT_KIB} KiB)"
    );

    drop(streams);
    wait_for(Duration::from_secs(30), "all tunnels to close", || {
        (proxy.metric("egress_proxy_active_tunnels") == 0.0).then_some(())
    });
    let records = proxy.wait_records(TUNNELS + 1);
    assert!(records
        .iter()
        .all(|r| r["action"] == "Allowed" && r["unmapped"]["error"].is_null()));
    assert_eq!(
        records
            .iter()
            .map(|r| r["traffic"]["bytes_out"].as_u64().unwrap())
            .sum::<u64>(),
        TUNNELS as u64 * (1024 + 16 * 1024)
    );
    rt.shutdown_timeout(Duration::from_secs(5));
}
