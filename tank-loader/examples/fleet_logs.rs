//! `cargo xtask bench crosscheck`'s synthetic fleet: the kernel logs of many agent hosts and
//! the logs of a few proxies, written by the real chain writer (so every chain verifies) in
//! the records' own formats (the drain's kernel formatter, the proxy's connection records).
//!
//! `fleet_logs DIR RECORDS HOSTS PROXIES` writes `DIR/kernel-<n>/kernel.jsonl` (rotated into
//! 1 MiB segments) and `DIR/proxy-<n>/proxy.jsonl`, about RECORDS records in all, and prints
//! one JSON object: the counts written and the discrepancies planted, which the bench holds
//! the cross-check's report against.
//!
//! The fleet: each host makes about one connection a second, to either proxy (chosen at
//! random), from ports it cycles through; its clock is off by a fixed amount in
//! [-1 s, +1 s]. Each connection is four records: the kernel's allowed `connect4` and its
//! `established` 1 ms later on the host, the proxy's opening record 0-5 ms later on the
//! proxy host and its closing record when the tunnel ends (0.05-30 s later, so a proxy log
//! interleaves opens and closes out of start order, as a real one does). Eight hosts
//! in 1,000 also have a denied DNS attempt on one connection in ten. Planted, deterministic: one connection in 50,000
//! has no proxy record, one in 50,000 no kernel `established`, and one in 100,000 proxy
//! records comes from an address no host has.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::json;
use tank_ebpf_common::allow::ipv4_mapped;
use tank_ebpf_common::chain::{ChainWriter, Options, Rotation};
use tank_ebpf_common::event::{hook, reason, verdict, Event};
use tank_ebpf_common::ocsf::kernel::{Formatter, LifecycleRecord};
use tank_ebpf_common::ocsf::lifecycle;
use tank_ebpf_common::ocsf::proxy::{Connection, ConnectionRecord, Phase, Traffic};

const SEGMENT_BYTES: u64 = 1 << 20;

/// A small fast deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Host {
    writer: ChainWriter,
    name: String,
    formatter: Formatter,
    ip: [u8; 4],
    skew_ms: i64,
    port: u16,
    cookie: u64,
}

struct Proxy {
    writer: ChainWriter,
    name: String,
    listener: SocketAddr,
    /// Tunnels open: (close time, opening seq, the connection).
    open: BinaryHeap<Reverse<(i64, u64, u64)>>,
    conns: std::collections::HashMap<u64, Connection>,
    next: u64,
}

fn open(path: &Path, rotate: bool) -> ChainWriter {
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("create the log dir");
    let opts = Options {
        rotation: Rotation {
            max_bytes: rotate.then_some(SEGMENT_BYTES),
            ..Rotation::default()
        },
        ..Options::default()
    };
    ChainWriter::open_with(path, opts).expect("open the log").0
}

fn connection(start_ms: i64, client: SocketAddr, listener: SocketAddr, phase: Phase) -> Connection {
    Connection::tunnel(
        start_ms,
        client,
        listener,
        "api.example.com",
        "allowed_domains:api",
        phase,
    )
}

impl Proxy {
    /// Writes the opening record of a tunnel from `client` accepted at `accept`, and plans
    /// its end.
    fn open_tunnel(&mut self, rng: &mut Rng, accept: i64, client: SocketAddr) -> u64 {
        let c = connection(accept, client, self.listener, Phase::Opening);
        let record = ConnectionRecord::new(c.clone(), &self.name, "0");
        let opened = self
            .writer
            .append_opening(&record, 0)
            .expect("append an opening record");
        let end = accept + 50 + rng.below(30_000) as i64;
        self.next += 1;
        self.conns.insert(self.next, c);
        self.open.push(Reverse((end, opened, self.next)));
        1
    }

    /// Writes the closing records of tunnels that ended by `now_ms`.
    fn close_until(&mut self, now_ms: i64) -> u64 {
        let mut written = 0;
        while let Some(&Reverse((end, opened, id))) = self.open.peek() {
            if end > now_ms {
                break;
            }
            self.open.pop();
            let mut c = self.conns.remove(&id).expect("open tunnel");
            (c.phase, c.duration_ms) = (Phase::Closing, end - c.start_ms);
            c.traffic = Traffic {
                bytes_in: 4096,
                bytes_out: 512,
            };
            let record = ConnectionRecord::new(c, &self.name, "0");
            self.writer
                .append_closing(&record, opened, 0)
                .expect("append a closing record");
            written += 1;
        }
        written
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, records, hosts, proxies] = &args[..] else {
        eprintln!("usage: fleet_logs DIR RECORDS HOSTS PROXIES");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let records: u64 = records.parse().expect("RECORDS");
    let (n_hosts, n_proxies): (u64, u64) = (
        hosts.parse().expect("HOSTS"),
        proxies.parse().expect("PROXIES"),
    );
    let mut rng = Rng(0x7a4b_2026);
    // The fleet's records begin now, after the start records the writers stamp with now.
    let t0_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
        + 1000;
    let mut hosts: Vec<Host> = (0..n_hosts)
        .map(|i| {
            let name = format!("agent-{i:04}");
            let mut writer = open(&dir.join(format!("kernel-{i:04}/kernel.jsonl")), true);
            let start =
                LifecycleRecord::new(&name, "0", lifecycle::START, "started".into(), json!({}));
            writer.append(&start).expect("append the start record");
            Host {
                writer,
                formatter: Formatter::new(&name, "0"),
                name,
                ip: [10, 1 + (i / 250) as u8, (i % 250) as u8, 10],
                skew_ms: rng.below(2001) as i64 - 1000,
                port: 32768 + rng.below(20000) as u16,
                cookie: i << 40,
            }
        })
        .collect();
    let mut proxies: Vec<Proxy> = (0..n_proxies)
        .map(|i| Proxy {
            writer: open(&dir.join(format!("proxy-{i}/proxy.jsonl")), false),
            name: format!("proxy-{i}"),
            listener: SocketAddr::from(([10, 0, 0, 1 + i as u8], 3128)),
            open: BinaryHeap::new(),
            conns: std::collections::HashMap::new(),
            next: 0,
        })
        .collect();
    let (mut kernel_records, mut proxy_records) = (n_hosts, 0u64);
    let (mut no_proxy_record, mut no_kernel_record, mut unattributed, mut denied) = (0, 0, 0, 0);
    let mut n = 0u64;
    // The fleet's connections in time order: one a second per host on average.
    let step_us = 1_000_000 / n_hosts.max(1);
    let mut now_us = 0u64;
    while kernel_records + proxy_records < records {
        now_us += rng.below(2 * step_us + 1);
        let t = t0_ms + (now_us / 1000) as i64;
        let h = &mut hosts[rng.below(n_hosts) as usize];
        let p = rng.below(n_proxies) as usize;
        n += 1;
        h.cookie += 1;
        h.port = if h.port >= 60999 { 32768 } else { h.port + 1 };
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(h.ip)), h.port);
        let listener = proxies[p].listener;
        let IpAddr::V4(proxy_ip) = listener.ip() else {
            unreachable!("the proxies are IPv4")
        };
        let mut e = Event {
            cookie: h.cookie,
            pid: 4242,
            tgid: 4242,
            comm: *b"node\0\0\0\0\0\0\0\0\0\0\0\0",
            dst_addr: ipv4_mapped(proxy_ip.octets()),
            dst_port: 3128,
            family: 2,
            hook: hook::CONNECT4,
            verdict: verdict::ALLOW,
            reason: reason::PROXY,
            ..Event::EXAMPLE
        };
        let host_ms = t + h.skew_ms;
        let fmt = &h.formatter;
        h.writer
            .append_with(|link, out| fmt.write(out, link, &e, host_ms * 1_000_000, n))
            .expect("append an attempt");
        kernel_records += 1;
        if n % 50_000 == 25_000 {
            no_kernel_record += 1;
        } else {
            (e.hook, e.src_addr, e.src_port) = (hook::ESTABLISHED, ipv4_mapped(h.ip), h.port);
            h.writer
                .append_with(|link, out| fmt.write(out, link, &e, (host_ms + 1) * 1_000_000, n))
                .expect("append an established record");
            kernel_records += 1;
        }
        if h.ip[2] % 200 == 7 && n.is_multiple_of(10) {
            let d = Event {
                cookie: h.cookie + (1 << 39),
                dst_addr: ipv4_mapped([203, 0, 113, 9]),
                dst_port: 53,
                family: 2,
                sock_type: 2,
                protocol: 17,
                hook: hook::SENDMSG4,
                verdict: verdict::DENY,
                reason: reason::NOT_LISTED,
                ..e
            };
            h.writer
                .append_with(|link, out| fmt.write(out, link, &d, host_ms * 1_000_000, n))
                .expect("append a denied attempt");
            kernel_records += 1;
            denied += 1;
        }
        h.writer.flush().expect("flush a kernel log");
        if h.writer.rotation_due() {
            let segment = LifecycleRecord::new(
                &h.name,
                "0",
                lifecycle::OTHER,
                "new audit log segment".into(),
                json!({"event": "segment"}),
            );
            h.writer.rotate(&segment).expect("rotate a kernel log");
            kernel_records += 1;
        }
        let accept = t + rng.below(6) as i64;
        for proxy in &mut proxies {
            proxy_records += proxy.close_until(accept);
        }
        if n % 100_000 == 50_000 {
            // A connection from outside every agent host, at the same proxy.
            unattributed += 1;
            let stranger = SocketAddr::from(([10, 255, 0, 1], h.port));
            proxy_records += proxies[p].open_tunnel(&mut rng, accept, stranger);
        }
        if n.is_multiple_of(50_000) {
            no_proxy_record += 1;
            continue;
        }
        proxy_records += proxies[p].open_tunnel(&mut rng, accept, client);
    }
    for proxy in &mut proxies {
        proxy_records += proxy.close_until(i64::MAX);
        proxy.writer.sync().expect("sync a proxy log");
    }
    for h in &mut hosts {
        h.writer.sync().expect("sync a kernel log");
    }
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("read the fleet's directory")
        .flat_map(|d| {
            std::fs::read_dir(d.expect("a log directory").path()).expect("a log directory")
        })
        .map(|f| f.expect("a log file").metadata().expect("its size").len())
        .sum();
    println!(
        "{}",
        json!({
            "bytes": bytes,
            "connections": n,
            "kernel_records": kernel_records,
            "proxy_records": proxy_records,
            "records": kernel_records + proxy_records,
            "denied_attempts": denied,
            "planted": {
                "kernel_unmatched": no_proxy_record,
                "proxy_unmatched": no_kernel_record,
                "unattributed": unattributed,
            },
            "kernel_logs": (0..n_hosts).map(|i| dir.join(format!("kernel-{i:04}/kernel.jsonl"))).collect::<Vec<_>>(),
            "proxy_logs": (0..n_proxies).map(|i| dir.join(format!("proxy-{i}/proxy.jsonl"))).collect::<Vec<_>>(),
        })
    );
}
