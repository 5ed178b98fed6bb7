//! The fleet's log store, with the real parts: clickhouse-server and syslog-ng run as the test's
//! own processes from temporary configs, with the table and the shipper block the repository
//! ships (image/fleet/), and `tank-loader audit verify --clickhouse` / `audit cross-check
//! --clickhouse` read the records back. Root: the fleet test builds network namespaces and
//! loads the gate.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use tank_ebpf_common::chain::{ChainWriter, Options, Rotation};
use tank_ebpf_common::event::hook;
use tank_ebpf_common::ocsf::kernel::LifecycleRecord;
use tank_ebpf_common::ocsf::lifecycle;
use tank_integration_tests::store::{ClickHouse, Shipped, Shipper};
use tank_integration_tests::{network_records, require_root, workspace_bin};

const T0: i64 = 1_800_000_000_000;

/// A kernel-looking record at `T0 + i` s with text that needs escaping on the way.
fn record(i: i64) -> Value {
    json!({
        "class_uid": 6002,
        "time": T0 + i * 1000,
        "metadata": { "log_name": "kernel" },
        "message": format!("record {i}: quote \" backslash \\ tab \t é \u{1F980} /"),
    })
}

/// Writes 30 records into a log at `path` that rotates every 10 (compressed segments), syncing
/// as it goes, so a shipper tailing it sees the renames. Rotations are a second apart: a
/// shipper follows the log's name, and one that looks only after two rotations never sees the
/// segment between them (docs/operations.md, "Fleet": the store then reports the gap).
fn write_log(path: &Path) {
    let opts = Options {
        rotation: Rotation {
            compress: true,
            ..Rotation::default()
        },
        ..Options::default()
    };
    let (mut w, _) = ChainWriter::open_with(path, opts).expect("open the log");
    for i in 1..=30 {
        if i % 10 == 1 && i > 1 {
            w.rotate(&record(i)).expect("rotate");
        } else {
            w.append(&record(i)).expect("append");
        }
        if i % 5 == 0 {
            w.sync().expect("sync");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    w.sync().expect("sync");
}

fn loader(args: &[&str]) -> Output {
    Command::new(workspace_bin("tank-loader"))
        .args(args)
        .output()
        .expect("run tank-loader")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify_json(args: &[&str]) -> (i32, Value) {
    let out = loader(&[&["audit", "verify", "--json"], args].concat());
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("audit verify --json: {e}: {}", text(&out)));
    (out.status.code().unwrap_or(-1), value)
}

/// The chain of `host` in a `verify --clickhouse --json` answer.
fn chain<'a>(v: &'a Value, host: &str) -> &'a Value {
    v["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["host"] == host)
        .unwrap_or_else(|| panic!("no chain of {host} in {v:#}"))
}

#[test]
fn the_store_verifies_like_the_files_and_finds_a_record_deleted_or_edited_for_its_host() {
    require_root();
    let mut store = ClickHouse::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a/kernel.jsonl"),
        dir.path().join("b/kernel.jsonl"),
    );
    for log in [&a, &b] {
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(log, "").unwrap();
    }
    let shipped = |path: &Path, host: &str| Shipped {
        path: path.to_owned(),
        log: "kernel",
        host: host.to_owned(),
    };
    let _shipper = Shipper::start(&store, &[shipped(&a, "host-a"), shipped(&b, "host-b")]);
    // Written while the shipper tails them: it follows each rotation to the new active file.
    write_log(&a);
    write_log(&b);
    store.wait_seqs("host-a", "kernel", 30);
    store.wait_seqs("host-b", "kernel", 30);
    let segments = std::fs::read_dir(a.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".zst")
        })
        .count();
    assert_eq!(segments, 2, "the log rotated into compressed segments");

    // The same verdict, record count and head as the files they came from.
    let url = store.url();
    let (code, v) = verify_json(&["--clickhouse", &url]);
    assert_eq!(code, 0, "{v:#}");
    for (host, file) in [("host-a", &a), ("host-b", &b)] {
        let (file_code, f) = verify_json(&[file.to_str().unwrap()]);
        assert_eq!(file_code, 0, "{f:#}");
        let c = chain(&v, host);
        assert_eq!(c["report"]["records"], 30, "{c:#}");
        assert_eq!(
            c["report"]["head"], f["head"],
            "{host}: same head as the files"
        );
        assert_eq!(c["report"]["problems"], json!([]));
    }
    let out = loader(&["audit", "verify", "--clickhouse", &url]);
    assert!(
        text(&out).contains("clickhouse host=host-a log=kernel: intact: 30 records, last seq 30"),
        "{}",
        text(&out)
    );

    // The store goes away while host-a writes on: the shipper holds the records and delivers
    // them once it is back (it retries, never drops).
    store.stop();
    let (mut w, _) = ChainWriter::open(&a).expect("reopen host-a's log");
    for i in 31..=35 {
        w.append(&record(i)).expect("append");
    }
    w.sync().expect("sync");
    drop(w);
    std::thread::sleep(std::time::Duration::from_secs(2));
    store.restart();
    store.wait_seqs("host-a", "kernel", 35);

    // A batch the shipper sent twice is no problem: identical rows are read once. (The
    // shipper itself sends a segment twice when it reads it both before and after the
    // rename, image/fleet/syslog-ng-tank.conf.)
    let rows = store.rows("host-b", "kernel");
    store.query(
        "INSERT INTO tank.audit (host, log, name, line) \
         SELECT host, log, name, line FROM tank.audit WHERE host = 'host-b' AND seq <= 3",
    );
    assert!(store.rows("host-b", "kernel") >= rows + 3);
    assert_eq!(verify_json(&["--clickhouse", &url]).0, 0);

    // Someone deletes a record of host-a in the store, and edits one of host-b (a mutation
    // cannot rewrite `line`, a key's source: deleted and inserted changed).
    store.mutate("ALTER TABLE tank.audit DELETE WHERE host = 'host-a' AND seq = 12");
    let edited = store.query(
        "SELECT line FROM tank.audit WHERE host = 'host-b' AND seq = 20 LIMIT 1 \
         FORMAT TabSeparatedRaw",
    );
    store.mutate("ALTER TABLE tank.audit DELETE WHERE host = 'host-b' AND seq = 20");
    let forged = edited.trim_end().replace("record 20", "record 2O");
    let row = json!({ "host": "host-b", "log": "kernel", "line": forged });
    store.query(&format!("INSERT INTO tank.audit FORMAT JSONEachRow {row}"));
    let (code, v) = verify_json(&["--clickhouse", &url]);
    assert_eq!(code, 1, "{v:#}");
    let problems = |host| chain(&v, host)["report"]["problems"].clone();
    assert_eq!(
        problems("host-a"),
        json!([
            { "problem": "seq_gap", "line": 12, "expected": 12, "found": 13 },
            { "problem": "hash_mismatch", "line": 12 },
        ]),
        "{v:#}"
    );
    assert_eq!(
        problems("host-b"),
        json!([{ "problem": "hash_mismatch", "line": 21 }]),
        "the record after the edited one no longer chains: {v:#}"
    );
    // The files on the hosts still verify: the store's copy is what changed.
    assert_eq!(
        loader(&["audit", "verify", a.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );

    // One host at a time; a host with no records is a finding, not a pass.
    let (code, v) = verify_json(&["--clickhouse", &url, "--host", "host-a"]);
    assert_eq!(
        (code, v["chains"].as_array().unwrap().len()),
        (1, 1),
        "{v:#}"
    );
    let out = loader(&["audit", "verify", "--clickhouse", &url, "--host", "host-c"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("clickhouse host=host-c: NOT verified: no records in the store"));

    // A time range: each chain from its first record in the range to its last, every record in
    // between checked, the start before it not. host-b's edit (seq 20) is outside 5..=15.
    let (since, until) = ((T0 + 5_000).to_string(), (T0 + 15_000).to_string());
    let (code, v) = verify_json(&["--clickhouse", &url, "--since", &since, "--until", &until]);
    assert_eq!(code, 1, "{v:#}");
    let b = chain(&v, "host-b");
    assert_eq!(
        (b["first_seq"].clone(), b["last_seq"].clone()),
        (json!(5), json!(15))
    );
    assert_eq!(b["report"]["problems"], json!([]), "{v:#}");
    assert_eq!(
        chain(&v, "host-a")["report"]["problems"][0]["problem"],
        "seq_gap"
    );

    // What cannot be read is exit 2 with one line.
    let out = loader(&["audit", "verify", "--clickhouse", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

/// `audit cross-check --json` with `args`: its exit code and report.
fn cross_check(args: &[String]) -> (i32, Value) {
    let out = Command::new(workspace_bin("tank-loader"))
        .args(["audit", "cross-check", "--json"])
        .args(args)
        .output()
        .expect("run tank-loader");
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("cross-check --json: {e}: {}", text(&out)));
    (out.status.code().unwrap_or(-1), value)
}

/// The entry of `list` (`hosts` or `proxies`) for host `name`.
fn host<'a>(report: &'a Value, list: &str, name: &str) -> &'a Value {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == name)
        .unwrap_or_else(|| panic!("no {list} entry for {name} in {report:#}"))
}

/// Per host and proxy: verdict and counts, without where each log was read from.
fn verdicts(report: &Value) -> Vec<(String, Value, Value, Value)> {
    ["hosts", "proxies"]
        .iter()
        .flat_map(|list| report[list].as_array().unwrap().iter())
        .map(|h| {
            let unmatched = h
                .get("proxy_unmatched")
                .map_or(json!(null), |u| u["count"].clone());
            (
                h["host"].as_str().unwrap().to_owned(),
                h["verdict"].clone(),
                h["matched"].clone(),
                unmatched,
            )
        })
        .collect()
}

#[test]
fn a_fleet_shipped_to_the_store_cross_checks_like_its_files_and_each_finding_names_its_host() {
    use tank_integration_tests::fleet::Fleet;
    require_root();
    let store = ClickHouse::start();
    // agent-2's log rotates every few records, so it has segments to replace.
    let fleet = Fleet::start("[audit]\nrotate_bytes = 6000\n");
    // One shipper per host, as each host runs its own.
    let mut shippers = Vec::new();
    for a in &fleet.agents {
        let log = Shipped {
            path: a.loader.audit_log.clone(),
            log: "kernel",
            host: a.name.to_owned(),
        };
        shippers.push(Shipper::start(&store, &[log]));
    }
    for p in &fleet.proxies {
        let log = Shipped {
            path: p.log.clone(),
            log: "proxy",
            host: p.name.to_owned(),
        };
        shippers.push(Shipper::start(&store, &[log]));
    }

    // Real clients from both agent hosts through both proxies. Spaced out: agent-2's log
    // rotates meanwhile, and a shipper follows one rotation at a time.
    // Round 1 ends well before `second_round` and round 2 begins well after it.
    let mut second_round = 0;
    for round in 0..2 {
        if round == 1 {
            std::thread::sleep(std::time::Duration::from_millis(700));
            second_round = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            std::thread::sleep(std::time::Duration::from_millis(700));
        }
        for agent in 0..2 {
            for proxy in 0..2 {
                let (code, out) = fleet.curl(agent, proxy);
                assert_eq!(
                    code, 0,
                    "round {round}, agent {agent} via proxy {proxy}: {out}"
                );
                assert!(out.contains("hello from the origin"), "{out}");
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
    }
    let records = |path: &Path| tank_ebpf_common::chain::read(path).unwrap().1.len() as u64;
    let shipped = |fleet: &Fleet| {
        for a in &fleet.agents {
            store.wait_seqs(a.name, "kernel", records(&a.loader.audit_log));
        }
        for p in &fleet.proxies {
            // Connection records: an opening and a closing record per relayed connection.
            store.wait_seqs(p.name, "proxy", records(&p.log));
        }
    };
    // Every connection in both logs before anything is compared: 4 per agent host (2 rounds,
    // 2 proxies) as `established` records, 4 per proxy as opening and closing records.
    let established = |a: &tank_integration_tests::fleet::Agent| {
        network_records(&a.loader.audit_log)
            .iter()
            .filter(|r| r.unmapped.hook.0 == hook::ESTABLISHED)
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fleet.proxies.iter().any(|p| records(&p.log) < 8)
        || fleet.agents.iter().any(|a| established(a) < 4)
    {
        assert!(std::time::Instant::now() < deadline, "logs incomplete");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    shipped(&fleet);
    let segments = |a: &tank_integration_tests::fleet::Agent| {
        let dir = a.loader.audit_log.parent().unwrap().to_owned();
        let mut zst: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "zst"))
            .collect();
        zst.sort();
        zst
    };
    assert!(
        !segments(&fleet.agents[1]).is_empty(),
        "agent-2's log rotated"
    );

    let files = || {
        let mut args = Vec::new();
        for a in &fleet.agents {
            args.push("--kernel".to_owned());
            args.push(a.loader.audit_log.display().to_string());
        }
        for p in &fleet.proxies {
            args.push("--proxy".to_owned());
            args.push(p.log.display().to_string());
        }
        args
    };
    let from_store = || vec!["--clickhouse".to_owned(), store.url()];
    let (code, f) = cross_check(&files());
    assert_eq!((code, &f["verdict"]), (0, &json!("consistent")), "{f:#}");
    let (code, s) = cross_check(&from_store());
    assert_eq!((code, &s["verdict"]), (0, &json!("consistent")), "{s:#}");
    assert_eq!(
        s["summary"], f["summary"],
        "the store's report is the files' report"
    );
    assert_eq!(verdicts(&s), verdicts(&f));
    assert_eq!(s["summary"]["matched"], 8, "{s:#}");
    // The human report names each chain as the store holds it.
    let out = loader(&["audit", "cross-check", "--clickhouse", &store.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for chain in ["host=agent-1 log=kernel", "host=proxy-2 log=proxy"] {
        assert!(
            text(&out).contains(&format!("clickhouse {chain}")),
            "{}",
            text(&out)
        );
    }
    // A time range: every chain from its first record in round 2 on, so each starts mid-chain
    // on purpose; round 2's four connections per side match, nothing is missing.
    let mut ranged = from_store();
    ranged.extend(["--since".to_owned(), second_round.to_string()]);
    let (code, r) = cross_check(&ranged);
    assert_eq!((code, &r["verdict"]), (0, &json!("consistent")), "{r:#}");
    assert_eq!(r["summary"]["matched"], 4, "{r:#}");
    assert_eq!(s["summary"]["hosts"], 2);
    assert_eq!(s["summary"]["proxies"], 2);
    // Backfill reads the real writers' logs (agent-2's in compressed segments): each verifies,
    // and every record the shipper delivered is in the store byte for byte (same SHA-256).
    let logs = fleet
        .agents
        .iter()
        .map(|a| (a.name, "kernel", &a.loader.audit_log))
        .chain(fleet.proxies.iter().map(|p| (p.name, "proxy", &p.log)));
    for (name, kind, log) in logs {
        let held = store.seqs(name, kind);
        let (code, b, err) = backfill(&store, name, kind, &["--json", log.to_str().unwrap()]);
        assert_eq!(
            (code, &b["differing"]),
            (0, &json!(0)),
            "{name}: {err}{b:#}"
        );
        assert!(
            held > 0 && b["present"].as_u64().unwrap() >= held,
            "{name}: {b:#}"
        );
    }

    // 1. Traffic at proxy-1 from agent-1's host but outside its agent cgroup: the proxy
    // records it, agent-1's kernel log never saw it. Found for agent-1, from the store and
    // from the files alike.
    let (code, out) = fleet.curl_outside_the_agent(0, 0);
    assert_eq!(code, 0, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while records(&fleet.proxies[0].log) < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy-1 did not record it"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    shipped(&fleet);
    for report in [cross_check(&files()), cross_check(&from_store())] {
        let (code, r) = report;
        assert_eq!((code, &r["verdict"]), (1, &json!("discrepancies")), "{r:#}");
        let a1 = host(&r, "hosts", "agent-1");
        assert_eq!(a1["verdict"], "discrepancies", "{r:#}");
        assert_eq!(a1["proxy_unmatched"]["count"], 1, "{r:#}");
        let client = a1["proxy_unmatched"]["listed"][0]["client"]
            .as_str()
            .unwrap();
        assert!(client.starts_with("10.201.1.2:"), "{client}");
        assert_eq!(
            host(&r, "hosts", "agent-2")["verdict"],
            "consistent",
            "{r:#}"
        );
    }

    // 2. Someone deletes a record of proxy-2 in the store: proxy-2's chain in the store is
    // broken, its files are not.
    store.mutate("ALTER TABLE tank.audit DELETE WHERE host = 'proxy-2' AND seq = 3");
    let (code, s) = cross_check(&from_store());
    assert_eq!((code, &s["verdict"]), (3, &json!("tampered")), "{s:#}");
    let p2 = host(&s, "proxies", "proxy-2");
    assert_eq!(p2["verdict"], "tampered", "{s:#}");
    assert_eq!(p2["log"]["problems"][0]["problem"], "seq_gap", "{s:#}");
    assert_eq!(host(&s, "proxies", "proxy-1")["log"]["intact"], true);
    for a in ["agent-1", "agent-2"] {
        assert_eq!(host(&s, "hosts", a)["log"]["intact"], true, "{a}: {s:#}");
    }
    let (_, f) = cross_check(&files());
    assert_eq!(
        host(&f, "proxies", "proxy-2")["verdict"],
        "consistent",
        "{f:#}"
    );

    // 3. Someone replaces a segment on agent-2 (one record changed, recompressed): the files
    // say agent-2's chain is broken; the store keeps what was shipped before.
    let segment = segments(&fleet.agents[1])[0].clone();
    let original = zstd::decode_all(File::open(&segment).unwrap()).unwrap();
    let forged =
        String::from_utf8(original)
            .unwrap()
            .replacen("\"established\"", "\"connect4\"", 1);
    std::fs::write(&segment, zstd::encode_all(forged.as_bytes(), 3).unwrap()).unwrap();
    let (code, f) = cross_check(&files());
    assert_eq!((code, &f["verdict"]), (3, &json!("tampered")), "{f:#}");
    let a2 = host(&f, "hosts", "agent-2");
    assert_eq!(a2["verdict"], "tampered", "{f:#}");
    assert_eq!(host(&f, "hosts", "agent-1")["log"]["intact"], true, "{f:#}");
    let (_, s) = cross_check(&from_store());
    assert_eq!(host(&s, "hosts", "agent-2")["log"]["intact"], true, "{s:#}");

    drop(shippers);
}

/// A kernel log of `host` as the loader writes one (a start record naming the host, then
/// records, a lifecycle record opening each segment), rotating every few records.
struct HostLog {
    writer: ChainWriter,
    host: &'static str,
}

impl HostLog {
    fn open(path: &Path, host: &'static str, compress: bool) -> Self {
        let opts = Options {
            rotation: Rotation {
                max_bytes: Some(1500),
                compress,
                ..Rotation::default()
            },
            ..Options::default()
        };
        let (mut writer, _) = ChainWriter::open_with(path, opts).expect("open the log");
        let start = LifecycleRecord::new(host, "0", lifecycle::START, "started".into(), json!({}));
        writer.append(&start).expect("append");
        Self { writer, host }
    }

    /// Appends `records`, rotating when the rule says so, as the drain does; then syncs.
    fn write(&mut self, records: std::ops::RangeInclusive<i64>) {
        let segment = LifecycleRecord::new(
            self.host,
            "0",
            lifecycle::OTHER,
            "new audit log segment".into(),
            json!({ "event": "segment" }),
        );
        for i in records {
            if self.writer.rotation_due() {
                self.writer.rotate(&segment).expect("rotate");
            }
            self.writer.append(&record(i)).expect("append");
        }
        self.writer.sync().expect("sync");
    }
}

/// A host's kernel log shipped by syslog-ng into a store of the test's own, then written on
/// across several rotations while the shipper is stopped (segments compressed or not).
struct Outage {
    // Drop order is field order: the writer first, the directory last.
    log: HostLog,
    shipper: Shipper,
    store: ClickHouse,
    path: std::path::PathBuf,
    dir: tempfile::TempDir,
    name: &'static str,
}

impl Outage {
    fn of(name: &'static str, compress: bool) -> Self {
        let store = ClickHouse::start();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel-audit.jsonl");
        std::fs::write(&path, "").unwrap();
        let shipped = Shipped {
            path: path.clone(),
            log: "kernel",
            host: name.to_owned(),
        };
        let mut shipper = Shipper::start(&store, &[shipped]);
        let mut log = HostLog::open(&path, name, compress);
        log.write(1..=3);
        store.wait_seqs(name, "kernel", 4);
        shipper.stop();
        log.write(4..=40);
        Self {
            log,
            shipper,
            store,
            path,
            dir,
            name,
        }
    }
}

/// The rotated segments of the log in `dir`: `(uncompressed, compressed)`.
fn segments_in(dir: &Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".jsonl.0"))
        .collect();
    let compressed = names.iter().filter(|n| n.ends_with(".zst")).count();
    (names.len() - compressed, compressed)
}

/// `audit backfill --json` of `log` as `host`'s kernel log: its exit code, report and stderr.
fn backfill(store: &ClickHouse, host: &str, log: &str, args: &[&str]) -> (i32, Value, String) {
    let url = store.url();
    let out = loader(
        &[
            &["audit", "backfill", "--clickhouse", &url, "--host", host][..],
            &["--log", log],
            args,
        ]
        .concat(),
    );
    let value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), value, stderr)
}

#[test]
fn segments_a_stopped_shipper_never_read_are_backfilled_exactly_once_from_the_hosts_files() {
    require_root();
    // Segments compressed, which the shipper never reads.
    let mut o = Outage::of("host-gap", true);
    drop(o.log); // finishes compressing
    let (store, name, path, dir) = (&o.store, o.name, &o.path, o.dir.path());
    let (uncompressed, compressed) = segments_in(dir);
    assert!(compressed >= 2, "the log rotated at least twice");
    assert_eq!(uncompressed, 0, "every segment compressed");
    o.shipper.restart();
    let file = path.to_str().unwrap();
    let (code, f) = verify_json(&[file]);
    assert_eq!(code, 0, "{f:#}");
    let (records, last) = (
        f["records"].as_u64().unwrap(),
        f["head"]["seq"].as_u64().unwrap(),
    );
    store.wait_last_seq(name, "kernel", last);

    // The store misses what the segments in between hold, and says so for that host.
    let held = store.seqs(name, "kernel");
    assert!(held < records, "the store holds {held} of {records}");
    let url = store.url();
    let (code, v) = verify_json(&["--clickhouse", &url, "--host", name]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        chain(&v, name)["report"]["problems"][0]["problem"],
        "seq_gap",
        "{v:#}"
    );

    // Backfill inserts exactly the missing lines.
    let rows_before = store.rows(name, "kernel");
    let (code, b, err) = backfill(store, name, "kernel", &["--json", file]);
    assert_eq!(code, 0, "{err}{b:#}");
    assert_eq!(b["records"], records, "{b:#}");
    assert_eq!(b["present"], held, "{b:#}");
    assert_eq!(b["inserted"], records - held, "{b:#}");
    assert_eq!(b["differing"], 0, "{b:#}");
    assert_eq!(store.rows(name, "kernel"), rows_before + records - held);
    assert_eq!(store.seqs(name, "kernel"), records);

    // The store's chain is now the files' chain: intact, same records and head, and the
    // cross-check from the store says what it says from the files.
    let (code, v) = verify_json(&["--clickhouse", &url]);
    assert_eq!(code, 0, "{v:#}");
    let c = chain(&v, name);
    assert_eq!(c["report"]["records"], records, "{c:#}");
    assert_eq!(c["report"]["head"], f["head"], "{c:#}");
    // The cross-check wants a proxy log too: one a proxy host never shipped, backfilled whole.
    let proxy_log = dir.join("proxy").join("audit.jsonl");
    std::fs::create_dir(proxy_log.parent().unwrap()).unwrap();
    let (mut p, _) = ChainWriter::open(&proxy_log).expect("open the proxy log");
    let start = LifecycleRecord::of(
        tank_ebpf_common::ocsf::proxy::PRODUCT,
        tank_ebpf_common::ocsf::LogName::Proxy,
        "proxy-gap",
        "0",
        lifecycle::START,
        "started".into(),
        json!({}),
    );
    p.append(&start).expect("append");
    p.sync().expect("sync");
    drop(p);
    let proxy_file = proxy_log.to_str().unwrap();
    let (code, b, err) = backfill(store, "proxy-gap", "proxy", &["--json", proxy_file]);
    assert_eq!((code, &b["inserted"]), (0, &json!(1)), "{err}{b:#}");
    let (file_code, files) = cross_check(&[
        "--kernel".to_owned(),
        file.to_owned(),
        "--proxy".to_owned(),
        proxy_file.to_owned(),
    ]);
    let (store_code, stored) = cross_check(&["--clickhouse".to_owned(), url.clone()]);
    assert_eq!(file_code, store_code, "{files:#}\n{stored:#}");
    assert_ne!(store_code, 3, "{stored:#}");
    assert_eq!(stored["summary"], files["summary"]);
    assert_eq!(verdicts(&stored), verdicts(&files));
    assert_eq!(host(&stored, "hosts", name)["log"]["records"], records);

    // A second run inserts nothing.
    let rows = store.rows(name, "kernel");
    let (code, b, err) = backfill(store, name, "kernel", &["--json", file]);
    assert_eq!(code, 0, "{err}{b:#}");
    assert_eq!(
        (b["inserted"].clone(), b["present"].clone()),
        (json!(0), json!(records))
    );
    let out = loader(&[
        "audit",
        "backfill",
        "--clickhouse",
        &url,
        "--host",
        name,
        "--log",
        "kernel",
        file,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "backfill host={name} log=kernel: {records} records in "
        )) && text(&out).contains(&format!("held {records}, inserted 0")),
        "{}",
        text(&out)
    );
    assert_eq!(store.rows(name, "kernel"), rows, "nothing inserted");

    // A record the store holds with another line is evidence: reported, not overwritten.
    let seq = 7;
    let line = store.query(&format!(
        "SELECT line FROM tank.audit WHERE host = '{name}' AND seq = {seq} LIMIT 1 \
         FORMAT TabSeparatedRaw"
    ));
    store.mutate(&format!(
        "ALTER TABLE tank.audit DELETE WHERE host = '{name}' AND seq = {seq}"
    ));
    let forged = line.trim_end().replacen("\"time\":", "\"time\": ", 1);
    assert_ne!(forged, line.trim_end());
    let row = json!({ "host": name, "log": "kernel", "line": forged });
    store.query(&format!("INSERT INTO tank.audit FORMAT JSONEachRow {row}"));
    let rows = store.rows(name, "kernel");
    let (code, b, err) = backfill(store, name, "kernel", &["--json", file]);
    assert_eq!(code, 1, "{err}{b:#}");
    assert_eq!(
        (&b["differing"], &b["differing_seqs"], &b["inserted"]),
        (&json!(1), &json!([seq]), &json!(0)),
        "{b:#}"
    );
    assert_eq!(store.rows(name, "kernel"), rows, "nothing inserted");

    // Refused, with one line and nothing inserted: a copy of the log with a record edited
    // (it does not verify), the log named as the other kind, a store that cannot be reached.
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
    }
    let active = copy.path().join("kernel-audit.jsonl");
    let edited = std::fs::read_to_string(&active)
        .unwrap()
        .replacen("record ", "recorb ", 1);
    std::fs::write(&active, edited).unwrap();
    let refused = |args: &[&str], log: &str, says: &str| {
        let (code, _, err) = backfill(store, "host-copy", log, args);
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
    };
    let copied = active.to_str().unwrap();
    refused(&[copied], "kernel", "does not verify");
    refused(&[copied], "kernel", "tank-loader audit verify");
    refused(&[file], "proxy", "metadata.log_name");
    assert_eq!(store.rows("host-copy", "kernel"), 0);
    let out = loader(&[
        "audit",
        "backfill",
        "--clickhouse",
        "http://127.0.0.1:1",
        "--host",
        name,
        "--log",
        "kernel",
        file,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn uncompressed_segments_a_stopped_shipper_missed_are_shipped_when_it_starts_again() {
    require_root();
    // `compress = false`: segments stay as rotated; the segments between are read when the
    // shipper is back, and the store holds the whole chain without a backfill.
    let mut o = Outage::of("host-plain", false);
    let (store, name, path, dir) = (&o.store, o.name, &o.path, o.dir.path());
    let (uncompressed, compressed) = segments_in(dir);
    assert!(
        uncompressed >= 2 && compressed == 0,
        "{uncompressed} segments"
    );
    o.shipper.restart();
    let file = path.to_str().unwrap();
    let (code, f) = verify_json(&[file]);
    assert_eq!(code, 0, "{f:#}");
    store.wait_seqs(name, "kernel", f["records"].as_u64().unwrap());
    let url = store.url();
    let (code, v) = verify_json(&["--clickhouse", &url]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(chain(&v, name)["report"]["records"], f["records"], "{v:#}");
    assert_eq!(chain(&v, name)["report"]["head"], f["head"], "{v:#}");

    // Shipping on across rotations: every record arrives; a segment read by both sources is
    // there twice, which the reader takes once.
    for round in 0..4 {
        o.log.write(41 + round * 10..=50 + round * 10);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    drop(o.log);
    let (code, f) = verify_json(&[file]);
    assert_eq!(code, 0, "{f:#}");
    let records = f["records"].as_u64().unwrap();
    store.wait_seqs(name, "kernel", records);
    let (code, v) = verify_json(&["--clickhouse", &url]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(chain(&v, name)["report"]["records"], records, "{v:#}");
    assert_eq!(chain(&v, name)["report"]["head"], f["head"], "{v:#}");
    let (code, b, err) = backfill(store, name, "kernel", &["--json", file]);
    assert_eq!((code, &b["inserted"]), (0, &json!(0)), "{err}{b:#}");
    // What reading segments costs: the rows once the shipper has sent all it will (no new
    // row for 2 s), against the records.
    let mut rows = (store.rows(name, "kernel"), std::time::Instant::now());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rows.1.elapsed() < std::time::Duration::from_secs(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the shipper never settled"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = store.rows(name, "kernel");
        if now != rows.0 {
            rows = (now, std::time::Instant::now());
        }
    }
    eprintln!(
        "{records} records in {} segments and the active file: {} rows in the store",
        segments_in(dir).0,
        rows.0
    );
}
