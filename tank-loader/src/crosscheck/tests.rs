//! The cross-check's tests: logs written as real chained lines (in memory, or by the real
//! writer in a temporary directory), fed as sources, checked as the command checks them.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{json, Value};
use tank_ebpf_common::allow::ipv4_mapped;
use tank_ebpf_common::chain::{ChainWriter, Hash, Line, Link};
use tank_ebpf_common::event::{hook, reason, verdict, Event};
use tank_ebpf_common::ocsf::kernel::{Formatter, LifecycleRecord};
use tank_ebpf_common::ocsf::proxy::{
    Connection, ConnectionRecord, HttpRequest, Phase, Request, RequestDetails, RequestRecord,
    Traffic, Url,
};
use tank_ebpf_common::ocsf::{lifecycle, protocol, Endpoint, LogName};

use super::*;

const AGENT: [u8; 4] = [10, 0, 0, 5];
const T0: i64 = 1_800_000_000_000;

/// `values` as the lines of an intact chain: each gets its `seq` and the hash of the line
/// before, as the writer does, and a closing record names the `seq` of its opening record
/// (the one before it of the same client port).
fn chained(values: Vec<Value>) -> Vec<Vec<u8>> {
    let mut prev = Hash::GENESIS;
    let mut opened = std::collections::HashMap::new();
    (1u64..)
        .zip(values)
        .map(|(seq, mut v)| {
            v["metadata"]["sequence"] = json!(seq);
            v["unmapped"]["prev"] = json!(prev.to_string());
            let port = v["src_endpoint"]["port"].clone().to_string();
            if v["unmapped"].get("opens").is_some() {
                opened.insert(port, seq);
            } else if v["unmapped"].get("closes").is_some() {
                v["unmapped"]["closes"] = json!(opened.remove(&port).unwrap_or(0));
            }
            let line = serde_json::to_vec(&v).unwrap();
            prev = Hash::of(&line);
            line
        })
        .collect()
}

/// A source of `lines`, as a log store would give them.
fn lines_source(kind: LogName, label: &str, lines: Vec<Vec<u8>>) -> Source {
    Source {
        label: label.to_owned(),
        kind,
        anchor: None,
        starts_at: None,
        lines: Box::new(lines.into_iter().map(|l| Ok(Line::Complete(l)))),
    }
}

fn source(kind: LogName, label: &str, values: Vec<Value>) -> Source {
    lines_source(kind, label, chained(values))
}

fn opts() -> Options {
    Options::default()
}

fn fleet(kernel: Vec<(&str, Vec<Value>)>, proxy: Vec<(&str, Vec<Value>)>, opts: &Options) -> Fleet {
    let sources = kernel
        .into_iter()
        .map(|(l, v)| source(LogName::Kernel, l, v))
        .chain(proxy.into_iter().map(|(l, v)| source(LogName::Proxy, l, v)))
        .collect();
    check(sources, opts).unwrap()
}

/// The one-host, one-proxy check.
fn check_logs(kernel: Vec<Value>, proxy: Vec<Value>) -> Fleet {
    fleet(vec![("k.jsonl", kernel)], vec![("p.jsonl", proxy)], &opts())
}

/// `v` with the fields of `patch` replaced, recursively.
fn with(mut v: Value, patch: Value) -> Value {
    match (&mut v, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, p) in b {
                let old = a.remove(&k).unwrap_or(Value::Null);
                a.insert(k, with(old, p));
            }
        }
        (a, b) => *a = b,
    }
    v
}

/// The kernel log's record of `e` at `dt` ms after T0, as the drain writes it (without the
/// chain's fields, which a test log adds).
fn kernel(e: &Event, dt: i64) -> Value {
    let mut line = Vec::new();
    let link = Link {
        seq: 1,
        prev: &Hash::GENESIS,
    };
    Formatter::new("agent", "0").write(&mut line, link, e, (T0 + dt) * 1_000_000, 0);
    let mut v: Value = serde_json::from_slice(&line).unwrap();
    v["metadata"].as_object_mut().unwrap().remove("sequence");
    v["unmapped"].as_object_mut().unwrap().remove("prev");
    v
}

/// `curl`'s allowed TCP connect (at `hook`) to the proxy.
fn event(hook: u8, cookie: u64) -> Event {
    Event {
        ktime_ns: 1,
        cookie,
        pid: 42,
        tgid: 42,
        dst_addr: ipv4_mapped([10, 0, 0, 1]),
        dst_port: 3128,
        family: 2,
        hook,
        verdict: verdict::ALLOW,
        reason: reason::PROXY,
        ..Event::EXAMPLE
    }
}

/// `curl`'s allowed TCP connect to the proxy, `dt` ms after T0.
fn attempt(cookie: u64, dt: i64) -> Value {
    kernel(&event(hook::CONNECT4, cookie), dt)
}

/// Its `established` record, from AGENT:`port`.
fn established(cookie: u64, dt: i64, port: u16) -> Value {
    let mut e = event(hook::ESTABLISHED, cookie);
    (e.src_addr, e.src_port) = (ipv4_mapped(AGENT), port);
    kernel(&e, dt)
}

/// Both kernel records of one connection to the proxy from AGENT:`port`.
fn connection(cookie: u64, dt: i64, port: u16) -> Vec<Value> {
    vec![attempt(cookie, dt), established(cookie, dt + 1, port)]
}

fn denied(dt: i64, comm: &str, hook: u8, dst: (&str, u16), proto: u16) -> Value {
    let mut e = event(hook, 0);
    e.comm = [0; 16];
    e.comm[..comm.len()].copy_from_slice(comm.as_bytes());
    e.dst_addr = match dst.0.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    (e.dst_port, e.protocol, e.verdict) = (dst.1, proto, verdict::DENY);
    e.reason = if dst.1 == 0 {
        reason::RAW_SOCKET
    } else {
        reason::NOT_LISTED
    };
    kernel(&e, dt)
}

/// The proxy's record of a connection from AGENT:`port` accepted `dt` ms after T0.
fn proxied(dt: i64, port: u16) -> Value {
    proxied_as(dt, port, Phase::Whole)
}

fn proxied_as(dt: i64, port: u16, phase: Phase) -> Value {
    let c = Connection {
        duration_ms: 50,
        ..Connection::tunnel(
            T0 + dt,
            SocketAddr::from((AGENT, port)),
            "10.0.0.1:3128".parse().unwrap(),
            "example.com",
            "allowed_domains:web",
            phase,
        )
    };
    serde_json::to_value(ConnectionRecord::new(c, "proxy", "0")).unwrap()
}

/// An inspected tunnel's records as the proxy writes them: its opening record, request
/// records for `recorded` of its requests, and its closing record saying it served
/// `requests`.
fn inspected_tunnel(dt: i64, port: u16, uid: &str, requests: u64, recorded: u64) -> Vec<Value> {
    let tunnel = |phase, unmapped| {
        let mut t = with(proxied_as(dt, port, phase), json!({ "unmapped": unmapped }));
        t["metadata"]["uid"] = json!(uid);
        t["unmapped"]["tunnel"] = json!("inspected");
        t
    };
    let opening = tunnel(Phase::Opening, json!({"opens": true}));
    let closing = tunnel(Phase::Closing, json!({"closes": 1, "requests": requests}));
    let request = |n: u64| {
        let r = Request {
            allowed: true,
            start_ms: T0 + dt + n as i64,
            duration_ms: 1,
            client: SocketAddr::from((AGENT, port)),
            target: Endpoint::default(),
            http: HttpRequest {
                http_method: "GET".into(),
                url: Url {
                    url_string: format!("https://example.com/{n}"),
                },
                version: "HTTP/2".into(),
            },
            status: Some(200),
            traffic: Traffic::default(),
            tunnel_uid: uid.into(),
            details: RequestDetails {
                rule: "allowed_domains:web".into(),
                credential: None,
                error: None,
                budget: None,
                url_bytes: None,
            },
        };
        serde_json::to_value(RequestRecord::new(r, "proxy", "0")).unwrap()
    };
    let mut out = vec![opening];
    out.extend((0..recorded).map(request));
    out.push(closing);
    out
}

#[test]
fn requests_of_inspected_tunnels_are_counted_per_tunnel() {
    let kernel = [connection(1, 0, 40001), connection(2, 9, 40002)].concat();
    let proxy = [
        inspected_tunnel(20, 40001, "t1", 3, 3),
        inspected_tunnel(20, 40002, "t2", 2, 2),
    ]
    .concat();
    let c = check_logs(kernel.clone(), proxy);
    assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
    assert_eq!(
        [
            c.proxies[0].inspected.tunnels,
            c.proxies[0].inspected.requests,
            c.summary.matched
        ],
        [2, 5, 2]
    );
    assert!(render(&c).contains(
        "\ninspected: 5 requests in 2 tunnels (0 miscounted, 0 requests naming no tunnel)\n"
    ));
    // A request record lost, and requests naming a tunnel with no record.
    let mut proxy = [
        inspected_tunnel(20, 40001, "t1", 3, 2),
        inspected_tunnel(20, 40002, "t2", 2, 2),
    ]
    .concat();
    proxy.extend(
        inspected_tunnel(30, 40003, "gone", 1, 1)
            .into_iter()
            .skip(1)
            .take(1),
    );
    let c = check_logs(kernel, proxy);
    assert_eq!(c.verdict, Verdict::Discrepancies);
    let miscounted = &c.proxies[0].inspected.miscounted;
    assert_eq!(miscounted.count, 1);
    assert_eq!(
        (miscounted.listed[0].says, miscounted.listed[0].found),
        (3, 2)
    );
    assert_eq!(c.proxies[0].inspected.orphaned.get("gone"), Some(&1));
    let text = render(&c);
    assert!(
        text.contains("tunnel t1 says 3 requests, 2 request records name it"),
        "{text}"
    );
    // A tunnel still open when the proxy died: it never wrote its count, and its request
    // records are its own, not orphans.
    let mut proxy = inspected_tunnel(20, 40001, "t1", 3, 2);
    proxy.pop();
    let c = check_logs(connection(1, 0, 40001), proxy);
    assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
    assert_eq!(
        [
            c.proxies[0].inspected.tunnels,
            c.proxies[0].inspected.requests
        ],
        [1, 2]
    );
    assert!(
        c.proxies[0].inspected.orphaned.is_empty() && c.proxies[0].inspected.miscounted.is_empty()
    );
}

/// A second agent host: its records name `agent-2` and its address is 10.0.0.6.
const AGENT2: [u8; 4] = [10, 0, 0, 6];

fn on_agent2(values: Vec<Value>) -> Vec<Value> {
    values
        .into_iter()
        .map(|mut v| {
            v["device"]["hostname"] = json!("agent-2");
            if v["src_endpoint"].get("ip").is_some() {
                v["src_endpoint"]["ip"] = json!("10.0.0.6");
            }
            v
        })
        .collect()
}

fn start_record(host: &str) -> Value {
    let start = LifecycleRecord::new(host, "0", lifecycle::START, "up".into(), json!({}));
    serde_json::to_value(start).unwrap()
}

#[test]
fn every_connection_in_both_logs_is_consistent() {
    let kernel = [
        vec![start_record("agent")],
        connection(1, 0, 40001),
        connection(2, 9, 40002),
    ]
    .concat();
    let c = check_logs(kernel, vec![proxied(20, 40001), proxied(20, 40002)]);
    assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
    let s = &c.summary;
    assert_eq!(
        [s.matched, s.proxy_records, s.kernel_proxy_connections],
        [2; 3]
    );
    assert_eq!(
        (c.hosts[0].host.as_str(), c.hosts[0].host_from),
        ("agent", HostFrom::StartRecord)
    );
    let text = render(&c);
    let summary = "\nmatched: 2 of 2 proxy records (100.0%), 2 of 2 kernel connections to";
    assert!(text.contains(summary), "{text}");
    assert!(text.ends_with("\nverdict: CONSISTENT\n"), "{text}");
}

#[test]
fn each_proxy_record_is_matched_to_the_host_it_came_from() {
    // Two hosts, each with connections through both proxies, the same client ports on both.
    let k1 = [
        vec![start_record("agent")],
        connection(1, 0, 40001),
        connection(2, 10, 40002),
    ]
    .concat();
    let k2 = [
        vec![start_record("agent-2")],
        on_agent2(connection(1, 3, 40001)),
        on_agent2(connection(2, 12, 40002)),
    ]
    .concat();
    let p1 = vec![
        proxied(5, 40001),
        on_agent2(vec![proxied(6, 40002)]).remove(0),
    ];
    let p2 = vec![
        on_agent2(vec![proxied(4, 40001)]).remove(0),
        proxied(12, 40002),
    ];
    let c = fleet(
        vec![("k1", k1), ("k2", k2)],
        vec![("p1", p1), ("p2", p2)],
        &opts(),
    );
    assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
    assert_eq!(c.summary.matched, 4);
    for (h, name, ip) in [
        (&c.hosts[0], "agent", AGENT),
        (&c.hosts[1], "agent-2", AGENT2),
    ] {
        assert_eq!(h.host, name);
        assert_eq!(h.addresses, [IpAddr::from(ip)]);
        assert_eq!((h.matched, h.kernel_proxy_connections), (2, 2));
    }
    assert_eq!([c.proxies[0].matched, c.proxies[1].matched], [2, 2]);
    let text = render(&c);
    assert!(
        text.contains("\nfleet: 2 hosts (0 with findings), 2 proxy logs, 0 logs not intact\n"),
        "{text}"
    );
    assert!(text.contains("\nhost agent-2 (named by its start record; kernel log k2; addresses 10.0.0.6): consistent, matched 2 of 2"), "{text}");
    // One proxy's record of agent-2 gone: agent-2's finding, nobody else's.
    let c = fleet(
        vec![("k1", k1_again()), ("k2", k2_again())],
        vec![
            ("p1", vec![proxied(5, 40001)]),
            ("p2", vec![proxied(12, 40002)]),
        ],
        &opts(),
    );
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert_eq!(c.hosts[0].verdict, Verdict::Consistent);
    assert_eq!(c.hosts[1].kernel_unmatched.count, 2);
    assert_eq!(c.summary.hosts_with_findings, 1);
}

fn k1_again() -> Vec<Value> {
    [connection(1, 0, 40001), connection(2, 10, 40002)].concat()
}

fn k2_again() -> Vec<Value> {
    on_agent2([connection(1, 3, 40001), connection(2, 12, 40002)].concat())
}

#[test]
fn a_proxy_record_no_kernel_log_accounts_for_is_unattributed() {
    let stranger = with(
        proxied(0, 50000),
        json!({"src_endpoint": {"ip": "10.0.0.9"}}),
    );
    let c = fleet(
        vec![("k1", k1_again()), ("k2", k2_again())],
        vec![
            ("p1", vec![proxied(0, 40001), stranger]),
            ("p2", vec![proxied(10, 40002)]),
        ],
        &opts(),
    );
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert_eq!(c.unattributed.count, 1);
    let u = &c.unattributed.listed[0].record;
    assert_eq!(
        (u.log.as_str(), u.client.to_string()),
        ("p1", "10.0.0.9:50000".into())
    );
    assert_eq!((u.line, u.destination.as_str()), (2, "example.com:443"));
    assert_eq!(
        [c.proxies[0].unattributed, c.proxies[1].unattributed],
        [1, 0]
    );
    // agent-2's records in no proxy log: its findings, while agent's are clean.
    assert_eq!(c.hosts[1].kernel_unmatched.count, 2);
    assert_eq!(c.hosts[0].verdict, Verdict::Consistent);
    let text = render(&c);
    assert!(
        text.contains("(unattributed): 1\n  p1  line 2 seq 2  "),
        "{text}"
    );
    // A record from a host's own address with no kernel record is that host's finding.
    let injected = with(
        proxied(30, 50000),
        json!({"src_endpoint": {"ip": "10.0.0.6"}}),
    );
    let c = fleet(
        vec![("k1", k1_again()), ("k2", k2_again())],
        vec![("p1", vec![proxied(0, 40001), proxied(10, 40002), injected])],
        &opts(),
    );
    assert!(c.unattributed.is_empty());
    let agent2 = &c.hosts[1];
    assert_eq!(agent2.proxy_unmatched.count, 1);
    assert_eq!(
        agent2.proxy_unmatched.listed[0].client.to_string(),
        "10.0.0.6:50000"
    );
}

#[test]
fn client_narrows_the_check_to_some_hosts() {
    let client = |ip: &str| Options {
        clients: vec![ip.parse().unwrap()],
        ..opts()
    };
    let logs = || {
        (
            vec![("k1", k1_again()), ("k2", k2_again())],
            // agent's proxy records only; agent-2's are missing.
            vec![("p1", vec![proxied(0, 40001), proxied(10, 40002)])],
        )
    };
    let (k, p) = logs();
    let c = fleet(k, p, &client("10.0.0.5"));
    assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
    assert_eq!(c.hosts.len(), 1);
    assert_eq!(c.hosts[0].host, "agent");
    assert_eq!(c.left_out, ["k2"]);
    let (k, p) = logs();
    let c = fleet(k, p, &client("10.0.0.6"));
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert_eq!((c.hosts.len(), c.hosts[0].host.as_str()), (1, "agent-2"));
    assert_eq!(
        c.summary.proxy_records, 0,
        "agent's proxy records are left out"
    );
    assert_eq!(c.summary.kernel_unmatched, 2);
    assert!(c.unattributed.is_empty());
    // --client in the form the proxy sees, through --nat.
    let (k, p) = logs();
    let nat = Options {
        nat: vec!["10.0.0.5=203.0.113.5".parse().unwrap()],
        ..client("203.0.113.5")
    };
    let p = p
        .into_iter()
        .map(|(l, v)| {
            let v = v
                .into_iter()
                .map(|r| with(r, json!({"src_endpoint": {"ip": "203.0.113.5"}})))
                .collect();
            (l, v)
        })
        .collect();
    let c = fleet(k, p, &nat);
    assert_eq!((c.hosts.len(), c.summary.matched), (1, 2), "{}", render(&c));
}

#[test]
fn clock_skew_between_hosts_is_absorbed_by_the_window() {
    // agent-2's clock runs 1 s fast: its kernel records are stamped 1 s after the proxy's.
    let skewed = |dt: i64| -> Vec<Value> {
        on_agent2(
            [
                connection(1, dt + 1000, 40001),
                connection(2, dt + 1010, 40002),
            ]
            .concat(),
        )
    };
    let proxy = || {
        let mut p = vec![proxied(0, 40001), proxied(10, 40002)];
        p.extend(on_agent2(vec![proxied(0, 40001), proxied(10, 40002)]));
        p.sort_by_key(|v| v["time"].as_i64());
        p
    };
    let c = fleet(
        vec![("k1", k1_again()), ("k2", skewed(0))],
        vec![("p1", proxy())],
        &opts(),
    );
    assert_eq!(
        (c.verdict, c.summary.matched),
        (Verdict::Consistent, 4),
        "{}",
        render(&c)
    );
    // A window narrower than the skew pairs nothing of agent-2's.
    let narrow = Options {
        window_ms: 500,
        ..opts()
    };
    let c = fleet(
        vec![("k1", k1_again()), ("k2", skewed(0))],
        vec![("p1", proxy())],
        &narrow,
    );
    assert_eq!(c.summary.matched, 2);
    assert_eq!(
        (
            c.hosts[1].kernel_unmatched.count,
            c.hosts[1].proxy_unmatched.count
        ),
        (2, 2)
    );
}

#[test]
fn a_host_log_in_several_segments_is_read_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernel.jsonl");
    let opts = tank_ebpf_common::chain::Options {
        rotation: tank_ebpf_common::chain::Rotation {
            max_bytes: Some(2000),
            ..Default::default()
        },
        ..Default::default()
    };
    let (mut w, _) = ChainWriter::open_with(&path, opts).unwrap();
    let mut proxy = Vec::new();
    let segment = LifecycleRecord::new("agent", "0", lifecycle::OTHER, "segment".into(), json!({}));
    for i in 0..20u16 {
        for v in connection(u64::from(i), i64::from(i) * 100, 40000 + i) {
            if w.rotation_due() {
                w.rotate(&segment).unwrap();
            }
            w.append(&v).unwrap();
        }
        proxy.push(proxied(i64::from(i) * 100 + 5, 40000 + i));
    }
    drop(w);
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with("kernel.jsonl.0")
        })
        .count();
    assert!(segments >= 3, "{segments} segments");
    let run = |given: Vec<PathBuf>, proxy: Vec<Value>| {
        let sources = vec![
            Source::files(LogName::Kernel, &given).unwrap(),
            source(LogName::Proxy, "p", proxy),
        ];
        check(sources, &Options::default()).unwrap()
    };
    for given in [vec![path.clone()], vec![dir.path().to_owned()]] {
        let c = run(given, proxy.clone());
        assert_eq!(c.verdict, Verdict::Consistent, "{}", render(&c));
        assert_eq!(
            (c.summary.matched, c.hosts[0].log.segments),
            (20, segments + 1)
        );
        assert_eq!(c.hosts[0].host_from, HostFrom::FirstRecord);
    }
    // A segment taken away: the host's chain says which, and its connections are missed.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("kernel.jsonl.0")
        })
        .collect();
    files.sort();
    std::fs::remove_file(&files[1]).unwrap();
    let c = run(vec![path.clone()], proxy);
    assert_eq!(c.verdict, Verdict::Tampered);
    assert!(
        matches!(
            c.hosts[0].log.problems[..],
            [Problem::MissingSegment { .. }]
        ),
        "{:?}",
        c.hosts[0].log.problems
    );
    assert!(c.hosts[0].proxy_unmatched.count > 0);
}

#[test]
fn the_window_holds_a_bounded_number_of_records_however_long_the_logs() {
    // 20,000 connections at 10 per second (33 minutes), none in the proxy log: each must
    // leave the window as a finding once the stream is window + late past it, so the
    // window never holds more than (window + late) * rate of them.
    let run = |n: u64| {
        let kernel: Vec<Value> = (0..n)
            .flat_map(|i| connection(i, i as i64 * 100, 1024 + (i % 60000) as u16))
            .collect();
        let proxy: Vec<Value> = (0..n)
            .map(|i| proxied(i as i64 * 100 + 3, 1024 + (i % 60000) as u16))
            .filter(|_| false)
            .collect();
        let opts = Options {
            max_listed: 10,
            ..opts()
        };
        fleet(vec![("k", kernel)], vec![("p", proxy)], &opts)
    };
    let (short, long) = (run(2_000), run(20_000));
    let k = (DEFAULT_WINDOW_MS + DEFAULT_LATE_MS) / 100 + 1;
    for (c, n) in [(&short, 2_000), (&long, 20_000)] {
        assert_eq!(c.hosts[0].kernel_unmatched.count, n);
        assert_eq!(
            c.hosts[0].kernel_unmatched.listed.len(),
            10,
            "the first 10 listed"
        );
        assert!(
            c.peak_window <= k,
            "held {} at once, bound {k}",
            c.peak_window
        );
    }
    assert_eq!(
        short.peak_window, long.peak_window,
        "the window does not grow with the log"
    );
    assert!(render(&long).contains("20000, the first 10 listed (--max-listed for more)"));
}

#[test]
fn a_record_edited_in_one_host_log_is_found_for_that_host() {
    let mut k2 = chained(k2_again());
    // The first connection's established record now claims another port.
    let edited = String::from_utf8(k2[1].clone())
        .unwrap()
        .replace("40001", "40009");
    k2[1] = edited.into_bytes();
    let sources = vec![
        source(LogName::Kernel, "k1", k1_again()),
        lines_source(LogName::Kernel, "k2", k2),
        source(
            LogName::Proxy,
            "p1",
            [
                vec![proxied(0, 40001), proxied(10, 40002)],
                on_agent2(vec![proxied(3, 40001), proxied(12, 40002)]),
            ]
            .concat(),
        ),
    ];
    let c = check(sources, &opts()).unwrap();
    assert_eq!(c.verdict, Verdict::Tampered);
    assert_eq!(c.hosts[0].verdict, Verdict::Consistent);
    let h = &c.hosts[1];
    assert_eq!(h.verdict, Verdict::Tampered);
    assert_eq!(h.log.problems, [Problem::HashMismatch { line: 3 }]);
    assert_eq!(c.summary.tampered_logs, 1);
    // Matching still runs on what the damaged log claims.
    assert_eq!((h.kernel_unmatched.count, h.proxy_unmatched.count), (1, 1));
}

#[test]
fn a_tunnel_is_matched_on_its_opening_record_not_twice() {
    let opening = proxied_as(0, 40001, Phase::Opening);
    let opening = with(opening, json!({"unmapped": {"opens": true}}));
    let closing = proxied_as(0, 40001, Phase::Closing);
    let closing = with(closing, json!({"unmapped": {"closes": 1}}));
    let c = check_logs(connection(1, 0, 40001), vec![opening.clone(), closing]);
    assert_eq!((c.summary.matched, c.summary.proxy_records), (1, 1));
    assert_eq!(c.verdict, Verdict::Consistent);
    // Opened and never closed (the proxy died mid-tunnel): matched all the same.
    let c = check_logs(connection(1, 0, 40001), vec![opening]);
    assert_eq!((c.summary.matched, c.verdict), (1, Verdict::Consistent));
}

#[test]
fn a_proxy_record_with_no_kernel_record_is_a_discrepancy() {
    let c = check_logs(
        connection(1, 0, 40001),
        vec![proxied(0, 40001), proxied(0, 50000)],
    );
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert!(c.hosts[0].kernel_unmatched.listed.is_empty());
    assert_eq!(c.hosts[0].proxy_unmatched.count, 1);
    let u = &c.hosts[0].proxy_unmatched.listed[0];
    assert_eq!((u.line, u.client.to_string()), (2, "10.0.0.5:50000".into()));
    assert_eq!(u.destination, "example.com:443");
    assert_eq!(u.rule, "allowed_domains:web");
}

#[test]
fn a_kernel_connection_with_no_proxy_record_is_a_discrepancy() {
    let kernel = [connection(1, 0, 40001), connection(2, 10, 40002)].concat();
    let c = check_logs(kernel, vec![proxied(0, 40001)]);
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert_eq!(c.hosts[0].kernel_unmatched.listed.len(), 1);
    let u = &c.hosts[0].kernel_unmatched.listed[0];
    assert_eq!((u.line, u.cookie, u.pid), (4, 2, 42));
    assert_eq!(u.process, "curl");
    let item = "cookie 2  10.0.0.5:40002 -> 10.0.0.1:3128  pid 42 curl\n";
    assert!(render(&c).contains(item), "{}", render(&c));
}

#[test]
fn an_established_record_without_its_attempt_is_a_discrepancy() {
    let listed = json!({"unmapped": {"reason": "listed_endpoint"}});
    let kernel = vec![
        established(1, 0, 40001),
        // Informational only: a connect that never completed, and a direct connection.
        with(attempt(2, 0), json!({"unmapped": {"hook": "connect6"}})),
        with(attempt(3, 0), listed.clone()),
        with(established(3, 0, 40100), listed),
    ];
    let c = check_logs(kernel, vec![proxied(0, 40001)]);
    assert_eq!((c.summary.matched, c.verdict), (1, Verdict::Discrepancies));
    assert_eq!(c.hosts[0].established_without_attempt.listed.len(), 1);
    assert_eq!(c.hosts[0].established_without_attempt.listed[0].cookie, 1);
    assert_eq!(c.hosts[0].allowed_never_connected, 1);
    assert_eq!(c.hosts[0].direct_listed_connections, 1);
}

#[test]
fn a_kernel_record_outside_the_window_does_not_match() {
    // The established record is at 1 ms.
    let run = |opts: &Options| {
        let kernel = vec![("k", connection(1, 0, 40001))];
        fleet(kernel, vec![("p", vec![proxied(5002, 40001)])], opts)
    };
    let c = run(&opts());
    assert_eq!(c.summary.matched, 0);
    let h = &c.hosts[0];
    assert_eq!((h.proxy_unmatched.count, h.kernel_unmatched.count), (1, 1));
    let wider = Options {
        window_ms: 5001,
        ..opts()
    };
    assert_eq!(run(&wider).summary.matched, 1);
}

#[test]
fn nat_maps_kernel_addresses_to_what_the_proxy_saw() {
    let patch = json!({"src_endpoint": {"ip": "203.0.113.5"}, "proxy": {"ip": "198.51.100.1"}});
    let run = |opts: &Options| {
        let proxy = vec![("p", vec![with(proxied(0, 40001), patch.clone())])];
        fleet(vec![("k", connection(1, 0, 40001))], proxy, opts)
    };
    assert_eq!(run(&opts()).summary.matched, 0);
    let nat = ["10.0.0.5=203.0.113.5", "10.0.0.1 = 198.51.100.1"];
    let nat = nat.iter().map(|n| n.parse().unwrap()).collect();
    let c = run(&Options { nat, ..opts() });
    assert_eq!(
        c.hosts[0].addresses,
        ["203.0.113.5".parse::<IpAddr>().unwrap()]
    );
    assert_eq!((c.summary.matched, c.verdict), (1, Verdict::Consistent));
    let with_port = "10.0.0.5:1=203.0.113.5".parse::<Nat>();
    assert!(with_port.is_err(), "ports are never translated");
}

#[test]
fn ipv4_mapped_addresses_compare_as_ipv4() {
    let dst = json!({"ip": "::ffff:10.0.0.1", "port": 3128});
    let v6 = json!({"unmapped": {"hook": "connect6"}, "dst_endpoint": dst});
    let src = json!({"src_endpoint": {"ip": "::ffff:10.0.0.5"}, "dst_endpoint": dst});
    let kernel = vec![with(attempt(1, 0), v6), with(established(1, 0, 40001), src)];
    let c = check_logs(kernel, vec![proxied(0, 40001)]);
    assert_eq!((c.summary.matched, c.verdict), (1, Verdict::Consistent));
}

#[test]
fn the_nearest_in_time_wins_when_a_client_port_is_reused() {
    let kernel = [connection(1, 0, 40001), connection(2, 3000, 40001)].concat();
    // The later proxy record comes first; each still gets the connection nearest to it.
    let proxy = vec![proxied(3010, 40001), proxied(2000, 40001)];
    let c = check_logs(kernel.clone(), proxy);
    assert_eq!((c.summary.matched, c.verdict), (2, Verdict::Consistent));
    let c = check_logs(kernel, vec![proxied(2000, 40001)]);
    assert_eq!(c.hosts[0].kernel_unmatched.listed.len(), 1);
    assert_eq!(c.hosts[0].kernel_unmatched.listed[0].cookie, 1);
}

#[test]
fn denied_attempts_group_by_destination_and_process() {
    let dns = ("8.8.8.8", 53);
    let kernel = vec![
        denied(5, "node", hook::SENDMSG4, dns, protocol::UDP),
        denied(0, "ping", hook::SOCK_CREATE, ("0.0.0.0", 0), 255),
        denied(0, "node", hook::SENDMSG4, dns, protocol::UDP),
        denied(1, "curl", hook::CONNECT4, ("1.1.1.1", 443), protocol::TCP),
        denied(9, "python3", hook::SENDMSG4, dns, protocol::UDP),
        denied(3, "ping", hook::LSM_SOCKET_CREATE, ("::", 0), 255),
    ];
    let c = check_logs(kernel, vec![]);
    assert_eq!(c.verdict, Verdict::Consistent, "denials are no discrepancy");
    let got: Vec<_> = c.hosts[0]
        .denied
        .iter()
        .map(|g| {
            let dst = g.destination.map_or("-".to_owned(), |d| d.to_string());
            let times = (g.first_time - T0, g.last_time - T0);
            (dst, g.process.as_str(), g.count, times)
        })
        .collect();
    let want = [
        ("-".to_owned(), "ping", 2, (0, 3)),
        ("8.8.8.8:53".to_owned(), "node", 2, (0, 5)),
        ("1.1.1.1:443".to_owned(), "curl", 1, (1, 1)),
        ("8.8.8.8:53".to_owned(), "python3", 1, (9, 9)),
    ];
    assert_eq!(got, want);
    let text = render(&c);
    for row in [
        "\n  COUNT  DESTINATION  PROTO  PROCESS  REASON      FIRST  ",
        "\n      2  -            255    ping     raw_socket  2027-01-15T08:00:00.000Z  ",
        "\n      2  8.8.8.8:53   udp    node     not_listed  2027-01-15T08:00:00.000Z  ",
    ] {
        assert!(text.contains(row), "{row:?} in {text}");
    }
}

#[test]
fn a_broken_chain_is_tampered_even_with_discrepancies() {
    let mut kernel = chained(connection(1, 0, 40001));
    kernel[0] = String::from_utf8(kernel[0].clone())
        .unwrap()
        .replace("curl", "curk")
        .into_bytes();
    let sources = vec![
        lines_source(LogName::Kernel, "k", kernel),
        source(LogName::Proxy, "p", vec![]),
    ];
    let c = check(sources, &opts()).unwrap();
    assert_eq!(c.verdict, Verdict::Tampered);
    assert_eq!(c.hosts[0].log.problems, [Problem::HashMismatch { line: 2 }]);
    assert_eq!(
        c.hosts[0].kernel_unmatched.listed.len(),
        1,
        "matching runs on a damaged log"
    );
    // A proxy record in the kernel log is reported, not ignored.
    let c = check_logs(vec![proxied(0, 1)], vec![]);
    assert_eq!(c.verdict, Verdict::Discrepancies);
    assert_eq!(c.hosts[0].log.unreadable.listed.len(), 1);
}

#[test]
fn logs_read_from_files_and_a_deleted_line_is_tampered() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, values: Vec<Value>| {
        let path = dir.path().join(name);
        let (mut w, _) = ChainWriter::open(&path).unwrap();
        for v in values {
            w.append(&v).unwrap();
        }
        w.sync().unwrap();
        path
    };
    let kernel = [connection(1, 0, 40001), connection(2, 10, 40002)].concat();
    let kernel = write("k.jsonl", kernel);
    let proxy = write("p.jsonl", vec![proxied(0, 40001), proxied(10, 40002)]);
    let read = |k: &PathBuf, p: &PathBuf| {
        let sources = vec![
            Source::files(LogName::Kernel, std::slice::from_ref(k)).unwrap(),
            Source::files(LogName::Proxy, std::slice::from_ref(p)).unwrap(),
        ];
        check(sources, &opts()).unwrap()
    };
    let c = read(&kernel, &proxy);
    assert_eq!((c.summary.matched, c.verdict), (2, Verdict::Consistent));
    let text = render(&c);
    let (k, p) = (kernel.display(), proxy.display());
    let header =
        format!("cross-check of kernel log {k} against proxy log {p} (window 5000 ms, no NAT)\n");
    assert!(text.starts_with(&header), "{text}");
    assert!(text.contains("\nproxy log: intact, 2 records\n"), "{text}");
    assert!(text.contains("\nkernel log: intact, 4 records\n"), "{text}");

    // Someone deletes the proxy record of the second connection.
    let text = std::fs::read_to_string(&proxy).unwrap();
    std::fs::write(&proxy, text.split_inclusive('\n').next().unwrap()).unwrap();
    let c = read(&kernel, &proxy);
    assert_eq!(c.verdict, Verdict::Tampered);
    assert_eq!(c.hosts[0].kernel_unmatched.listed.len(), 1);
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["verdict"], "tampered");
    assert_eq!(
        json["proxies"][0]["log"]["problems"][0]["problem"],
        "truncated"
    );
    assert_eq!(json["hosts"][0]["kernel_unmatched"]["count"], 1);
    assert!(render(&c).ends_with("\nverdict: TAMPERED\n"));
    let absent = dir.path().join("absent.jsonl");
    assert!(Source::files(LogName::Kernel, &[absent]).is_err());
}
