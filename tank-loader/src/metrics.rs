//! `tank-loader run`'s Prometheus metrics, served on `metrics_listen` (loopback only).
//!
//! A scrape never waits for the drain and the drain never waits for a scrape. Each source is
//! read where it already is:
//! - the drain's own counts ([`DrainStats`]): atomics it bumps with a plain load and store (it
//!   is their only writer, so no locked instruction), read with relaxed loads;
//! - the kernel's per-CPU counters (unrecorded attempts), through the map's descriptor;
//! - the ring buffer's producer and consumer positions, from read-only mappings of its pages;
//! - the layers in force and nft's refused-packet counter, which need CAP_NET_ADMIN that the
//!   loader no longer has: a helper process (`tank-loader watch-layers`, started before the
//!   loader drops its capabilities) keeps only that capability, reads `status` every few
//!   seconds and writes one JSON line per reading to a pipe. It reads nothing from the loader.
//!
//! Every metric family is declared once, in [`FAMILIES`]; the exposition, docs/operations.md
//! and the Grafana dashboard's test all take their names from there.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use tank_ebpf_common::counters;
use tank_ebpf_common::event::{hook, reason, verdict, Event};

use crate::config::Config;
use crate::status;

/// One metric family: its name, type and help text.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// The metric name, stable once released.
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family { name, kind, help }
}

/// Every family the loader exports, in exposition order.
pub const FAMILIES: [Family; 14] = [
    family("tank_attempts_total", "counter", "Connection and socket attempts of the agent cgroup written to the audit log, by hook, verdict and reason."),
    family("tank_established_connections_total", "counter", "Established TCP connections of the agent cgroup written to the audit log, by the reason their connect was allowed."),
    family("tank_unrecorded_total", "counter", "Attempts the kernel could not record (ring buffer full), by kind: denied (refused for want of a record), allowed (audit mode only), established (4-tuple lost)."),
    family("tank_ring_buffer_used_bytes", "gauge", "Bytes in the kernel ring buffer not yet read by the drain."),
    family("tank_ring_buffer_written_bytes_total", "counter", "Bytes the kernel has written into the ring buffer since it was created (events with their 8-byte headers)."),
    family("tank_ring_buffer_size_bytes", "gauge", "Size of the kernel ring buffer."),
    family("tank_drain_lag_seconds", "gauge", "For the drain's last batch: time from the kernel stamping its oldest event to the batch being durable in the audit log."),
    family("tank_audit_records_written_total", "counter", "Network records the drain appended to the audit log since this loader started."),
    family("tank_audit_chain_head_sequence", "gauge", "Sequence number of the last durable record in the audit log (the chain's head)."),
    family("tank_nft_refused_packets_total", "counter", "Packets of the agent refused by the nftables baseline (its `refused` counter)."),
    family("tank_layer_in_force", "gauge", "1 when the defence layer is in force, 0 when not, as last checked (layer: gate, sock_create, lsm, nft)."),
    family("tank_layer_check_timestamp_seconds", "gauge", "When the layers were last checked (Unix time); 0 before the first check."),
    family("tank_loader_start_time_seconds", "gauge", "When this loader process started (Unix time)."),
    family("tank_metrics_scrapes_total", "counter", "HTTP requests this endpoint answered, this one included."),
];

/// How often the helper re-reads the layers.
pub const LAYER_CHECK_INTERVAL: Duration = Duration::from_secs(5);

// Drain counts are indexed by (hook, verdict, reason); codes outside these bounds share the
// last slot, shown with `other` labels, so an unknown code is counted, never dropped.
const HOOKS: usize = 8;
const VERDICTS: usize = 3;
const REASONS: usize = 16;
const SLOTS: usize = HOOKS * VERDICTS * REASONS + 1;

/// What the drain counts as it goes. Written only by the drain; read by scrapes.
pub struct DrainStats {
    events: [AtomicU64; SLOTS],
    records: AtomicU64,
    head_seq: AtomicU64,
    lag_ns: AtomicU64,
}

impl DrainStats {
    /// Counts starting from a log whose head is `head_seq`.
    pub fn new(head_seq: u64) -> Self {
        Self {
            events: std::array::from_fn(|_| AtomicU64::new(0)),
            records: AtomicU64::new(0),
            head_seq: AtomicU64::new(head_seq),
            lag_ns: AtomicU64::new(0),
        }
    }

    /// Counts one drained event.
    #[inline]
    pub fn event(&self, e: &Event) {
        let (h, v, r) = (e.hook as usize, e.verdict as usize, e.reason as usize);
        let slot = if h < HOOKS && v < VERDICTS && r < REASONS {
            (h * VERDICTS + v) * REASONS + r
        } else {
            SLOTS - 1
        };
        bump(&self.events[slot], 1);
    }

    /// Records a durable batch: `records` network records appended, the chain's head now
    /// `head_seq`, and the kernel time of the batch's oldest event (none for a batch of
    /// unrecorded-counter records alone, which leaves the lag as it was).
    pub fn batch(&self, records: u64, head_seq: u64, oldest_ktime_ns: Option<u64>) {
        bump(&self.records, records);
        self.head_seq.store(head_seq, Relaxed);
        if let Some(oldest) = oldest_ktime_ns {
            self.lag_ns
                .store(monotonic_ns().saturating_sub(oldest), Relaxed);
        }
    }
}

/// Adds to a counter that has one writer: a load and a store, no locked read-modify-write.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed) + n, Relaxed);
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The ring buffer's positions, from read-only mappings of its consumer and producer pages.
pub struct RingPositions {
    consumer: *const AtomicU64,
    producer: *const AtomicU64,
    page: usize,
    size: u32,
}

// SAFETY: the pointers are to kernel-shared pages mapped for the life of the value, read only
// through atomics.
unsafe impl Send for RingPositions {}
unsafe impl Sync for RingPositions {}

impl RingPositions {
    /// Maps the position pages of the ring buffer behind `fd`, of `size` bytes.
    pub fn map(fd: &OwnedFd, size: u32) -> anyhow::Result<Self> {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?
            .context("no page size")? as usize;
        // The kernel's layout: the consumer position at the start of page 0, the producer
        // position at the start of page 1 (the data pages follow).
        let map = |offset: usize| {
            // SAFETY: a fresh shared read-only mapping; the kernel allows it on both pages.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
                    .context("cannot map the ring buffer's position pages")
            } else {
                Ok(p.cast::<AtomicU64>().cast_const())
            }
        };
        Ok(Self {
            consumer: map(0)?,
            producer: map(page)?,
            page,
            size,
        })
    }

    /// The consumer and producer positions: bytes read by the drain and written by the kernel
    /// since the ring buffer was created.
    pub fn positions(&self) -> (u64, u64) {
        // SAFETY: both pointers stay mapped until drop; the kernel updates them atomically.
        unsafe {
            (
                (*self.consumer).load(Relaxed),
                (*self.producer).load(Relaxed),
            )
        }
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        for p in [self.consumer, self.producer] {
            // SAFETY: mapped in `map` with this length.
            unsafe { libc::munmap(p.cast_mut().cast(), self.page) };
        }
    }
}

/// One reading of the layers, as the helper writes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LayerReading {
    /// Unix time of the reading.
    pub checked_at: f64,
    /// Each layer (`status::Status::layers_in_force`) and whether it is in force.
    pub layers: Vec<(String, bool)>,
    /// nft's refused counter, when the table could be read.
    pub nft_refused_packets: Option<u64>,
}

impl LayerReading {
    /// Reads the layers of `cfg` now (needs CAP_NET_ADMIN).
    pub fn now(cfg: &Config) -> Self {
        let s = status::collect(cfg);
        Self {
            checked_at: unix_seconds(SystemTime::now()),
            layers: s
                .layers_in_force()
                .iter()
                .map(|(name, on)| ((*name).to_owned(), *on))
                .collect(),
            nft_refused_packets: s.layers.nft.table.as_ref().map(|t| t.refused_packets),
        }
    }
}

/// `tank-loader watch-layers`: writes a [`LayerReading`] of `cfg` to stdout every `interval`
/// until stdout is closed (the loader is gone). Keeps only CAP_NET_ADMIN.
pub fn watch_layers(cfg: &Config, interval: Duration) -> anyhow::Result<()> {
    crate::privileges::keep_only_net_admin()?;
    let mut out = std::io::stdout().lock();
    loop {
        let line = serde_json::to_string(&LayerReading::now(cfg))?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// What a scrape reads besides the layer helper.
pub struct Sources {
    /// The drain's counts.
    pub drain: Arc<DrainStats>,
    /// The kernel's counters.
    pub counters: PerCpuArray<MapData, u64>,
    /// The ring buffer's positions.
    pub ring: RingPositions,
    /// When the loader started.
    pub started: SystemTime,
}

/// The endpoint between binding and serving: its socket is bound and its layer helper runs.
/// Made before the loader drops its capabilities, started after (threads created before the
/// drop would keep them: capabilities belong to threads).
pub struct Prepared {
    listener: TcpListener,
    helper: Child,
}

/// Binds `addr` and starts the layer helper, `/proc/self/exe watch-layers --config FILE`, with
/// the loader's capabilities (it keeps only CAP_NET_ADMIN).
pub fn prepare(addr: SocketAddr, config_path: &std::path::Path) -> anyhow::Result<Prepared> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?;
    let helper = Command::new("/proc/self/exe")
        .arg("watch-layers")
        .arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the layer helper (tank-loader watch-layers)")?;
    Ok(Prepared { listener, helper })
}

/// A serving endpoint; dropping it stops the layer helper (the serving thread ends with the
/// process).
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    helper: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

impl Prepared {
    /// Serves `/metrics` from `sources` and the helper's readings, each on a thread of its own.
    pub fn start(mut self, sources: Sources) -> anyhow::Result<Running> {
        let stdout = self.helper.stdout.take().expect("piped");
        let layers = Arc::new(Mutex::new(LayerReading::default()));
        let sink = layers.clone();
        std::thread::Builder::new()
            .name("layer-watch".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    match serde_json::from_str(&line) {
                        Ok(reading) => *sink.lock().expect("layer reading") = reading,
                        Err(e) => tracing::warn!(error = %e, "unreadable line from the layer helper"),
                    }
                }
                tracing::warn!("the layer helper stopped: tank_layer_in_force keeps its last reading and tank_layer_check_timestamp_seconds stops moving");
            })?;
        let addr = self.listener.local_addr()?;
        let listener = self.listener;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let mut scrapes = 0;
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    scrapes += 1;
                    if let Err(e) = answer(stream, &sources, &layers, scrapes) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                }
            })?;
        Ok(Running {
            addr,
            helper: self.helper,
        })
    }
}

/// Answers one HTTP/1.x request: `GET /metrics`, anything else 404. One request per
/// connection, bounded in time, so a stuck client cannot hold the endpoint.
fn answer(
    mut stream: TcpStream,
    sources: &Sources,
    layers: &Mutex<LayerReading>,
    scrapes: u64,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if line.starts_with("GET ") && path.split('?').next() == Some("/metrics") {
        ("200 OK", render(&read(sources, layers, scrapes)))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A consistent-enough copy of every value, taken for one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Drain counts per (hook, verdict, reason) slot.
    pub events: Vec<u64>,
    /// Records appended by the drain.
    pub records: u64,
    /// The chain's head sequence.
    pub head_seq: u64,
    /// The last batch's lag, ns.
    pub lag_ns: u64,
    /// Kernel counters, indexed as in [`counters`]; `None` when unreadable.
    pub counters: Option<[u64; counters::COUNT as usize]>,
    /// Ring buffer bytes read by the drain and written by the kernel.
    pub ring_positions: (u64, u64),
    /// Ring buffer size.
    pub ring_size: u32,
    /// Latest layer reading.
    pub layers: LayerReading,
    /// Loader start, Unix seconds.
    pub started: f64,
    /// Scrapes served.
    pub scrapes: u64,
}

fn read(s: &Sources, layers: &Mutex<LayerReading>, scrapes: u64) -> Snapshot {
    Snapshot {
        events: s.drain.events.iter().map(|c| c.load(Relaxed)).collect(),
        records: s.drain.records.load(Relaxed),
        head_seq: s.drain.head_seq.load(Relaxed),
        lag_ns: s.drain.lag_ns.load(Relaxed),
        counters: crate::gate::sum_counters(&s.counters).ok(),
        ring_positions: s.ring.positions(),
        ring_size: s.ring.size,
        layers: layers.lock().expect("layer reading").clone(),
        started: unix_seconds(s.started),
        scrapes,
    }
}

/// The text exposition format (version 0.0.4) of `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::with_capacity(8192);
    for f in FAMILIES {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            f.name, f.help, f.name, f.kind
        );
        let mut sample = |labels: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(out, "{}{labels} {value}", f.name);
        };
        match f.name {
            "tank_attempts_total" | "tank_established_connections_total" => {
                let established = f.name == "tank_established_connections_total";
                for (slot, n) in snap.events.iter().enumerate() {
                    let (h, v, r) = slot_codes(slot);
                    let is_established = h == Some(hook::ESTABLISHED);
                    // Only slots that moved: the label space is large and mostly empty.
                    if *n == 0 || is_established != established {
                        continue;
                    }
                    let name = |c: Option<u8>, f: fn(u8) -> &'static str| c.map_or("other", f);
                    let reason = name(r, reason::name);
                    if established {
                        sample(&format!("{{reason=\"{reason}\"}}"), n);
                    } else {
                        let labels = format!(
                            "{{hook=\"{}\",verdict=\"{}\",reason=\"{reason}\"}}",
                            name(h, hook::name),
                            name(v, verdict_label)
                        );
                        sample(&labels, n);
                    }
                }
            }
            "tank_unrecorded_total" => {
                let kinds = [
                    ("denied", counters::UNRECORDED_DENIED),
                    ("allowed", counters::UNRECORDED_ALLOWED),
                    ("established", counters::UNRECORDED_ESTABLISHED),
                ];
                if let Some(c) = &snap.counters {
                    for (kind, slot) in kinds {
                        sample(&format!("{{kind=\"{kind}\"}}"), &c[slot as usize]);
                    }
                }
            }
            "tank_ring_buffer_used_bytes" => {
                let (consumed, produced) = snap.ring_positions;
                sample("", &produced.saturating_sub(consumed));
            }
            "tank_ring_buffer_written_bytes_total" => sample("", &snap.ring_positions.1),
            "tank_ring_buffer_size_bytes" => sample("", &snap.ring_size),
            "tank_drain_lag_seconds" => sample("", &(snap.lag_ns as f64 / 1e9)),
            "tank_audit_records_written_total" => sample("", &snap.records),
            "tank_audit_chain_head_sequence" => sample("", &snap.head_seq),
            "tank_nft_refused_packets_total" => {
                if let Some(n) = snap.layers.nft_refused_packets {
                    sample("", &n);
                }
            }
            "tank_layer_in_force" => {
                for (layer, on) in &snap.layers.layers {
                    sample(&format!("{{layer=\"{layer}\"}}"), &u8::from(*on));
                }
            }
            "tank_layer_check_timestamp_seconds" => sample("", &snap.layers.checked_at),
            "tank_loader_start_time_seconds" => sample("", &snap.started),
            "tank_metrics_scrapes_total" => sample("", &snap.scrapes),
            other => unreachable!("family {other} has no samples"),
        }
    }
    out
}

/// The `verdict` label of a verdict code.
fn verdict_label(code: u8) -> &'static str {
    match code {
        verdict::ALLOW => "allow",
        verdict::DENY => "deny",
        _ => "unknown",
    }
}

/// The codes of a drain slot; `None` for the shared slot of out-of-range codes.
fn slot_codes(slot: usize) -> (Option<u8>, Option<u8>, Option<u8>) {
    if slot == SLOTS - 1 {
        return (None, None, None);
    }
    let (hv, r) = (slot / REASONS, slot % REASONS);
    (
        Some((hv / VERDICTS) as u8),
        Some((hv % VERDICTS) as u8),
        Some(r as u8),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(h: u8, v: u8, r: u8) -> Event {
        // SAFETY: Event is plain data valid for every bit pattern.
        let mut e: Event = unsafe { std::mem::zeroed() };
        (e.hook, e.verdict, e.reason) = (h, v, r);
        e
    }

    #[test]
    fn drain_counts_come_out_labelled_and_every_family_is_declared() {
        let stats = DrainStats::new(7);
        stats.event(&event(hook::CONNECT4, verdict::DENY, reason::NOT_LISTED));
        stats.event(&event(hook::CONNECT4, verdict::DENY, reason::NOT_LISTED));
        stats.event(&event(hook::ESTABLISHED, verdict::ALLOW, reason::PROXY));
        stats.event(&event(200, 9, 99));
        stats.batch(4, 11, Some(0));
        let snap = Snapshot {
            events: stats.events.iter().map(|c| c.load(Relaxed)).collect(),
            records: stats.records.load(Relaxed),
            head_seq: stats.head_seq.load(Relaxed),
            counters: Some([5, 6, 1, 0, 2]),
            layers: LayerReading {
                checked_at: 1.5,
                layers: vec![("gate".into(), true), ("nft".into(), false)],
                nft_refused_packets: Some(3),
            },
            ..Snapshot::default()
        };
        let text = render(&snap);
        for line in [
            "tank_attempts_total{hook=\"connect4\",verdict=\"deny\",reason=\"not_listed\"} 2",
            "tank_attempts_total{hook=\"other\",verdict=\"other\",reason=\"other\"} 1",
            "tank_established_connections_total{reason=\"proxy\"} 1",
            "tank_unrecorded_total{kind=\"denied\"} 1",
            "tank_unrecorded_total{kind=\"established\"} 2",
            "tank_audit_records_written_total 4",
            "tank_audit_chain_head_sequence 11",
            "tank_nft_refused_packets_total 3",
            "tank_layer_in_force{layer=\"gate\"} 1",
            "tank_layer_in_force{layer=\"nft\"} 0",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing from\n{text}"
            );
        }
        assert!(!text.contains("hook=\"established\""), "{text}");
        for f in FAMILIES {
            assert!(text.contains(&format!("# TYPE {} {}\n", f.name, f.kind)));
            assert!(f.name.starts_with("tank_"));
            assert_eq!(
                f.kind == "counter",
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
    }

    #[test]
    fn every_family_is_documented_in_operations_md() {
        let doc = include_str!("../../docs/operations.md");
        for f in FAMILIES {
            assert!(
                doc.contains(&format!("| `{}` | {} |", f.name, f.kind)),
                "{} missing from docs/operations.md",
                f.name
            );
        }
    }

    #[test]
    fn every_slot_maps_back_to_its_codes() {
        for (h, v, r) in [(0, 0, 0), (7, 2, 15), (1, 2, 3)] {
            let stats = DrainStats::new(0);
            stats.event(&event(h, v, r));
            let slot = stats
                .events
                .iter()
                .position(|c| c.load(Relaxed) == 1)
                .unwrap();
            assert_eq!(slot_codes(slot), (Some(h), Some(v), Some(r)));
        }
    }
}
