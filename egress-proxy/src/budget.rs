//! Exfiltration budgets: how much a client host may move through one allowed rule.
//!
//! An allowlist says where an agent may go, not how much it may send there. A rule's
//! `budget` (or `[default_budget]` for rules without one) sets ceilings per client host:
//! bytes out (client to origin), bytes in, and requests (new tunnels, plain-HTTP requests,
//! requests inside inspected tunnels), each over a rolling window, and `tunnel_secs`, how
//! long one tunnel may stay open.
//!
//! Counting follows what really moves: the relay charges each chunk it writes and never
//! reads more than the room left ([`Charge::room`]), so one tunnel stops exactly at its
//! ceiling and tunnels of one client running at once overshoot it by at most one read each.
//! A request that finds a ceiling reached is refused `429` (`X-Tank-Refused-By:
//! budget:<rule>:<kind>`); a tunnel that reaches one while it runs is cut. Both are
//! recorded with the ceiling and the figure that reached it ([`BudgetNote`]), and so is the
//! connection during which a client passes [`ALERT_PERCENT`] of a ceiling (with a warning
//! log line).
//!
//! A rolling window is [`BUCKETS`] buckets of window/[`BUCKETS`] plus the current one: use
//! is forgotten between one window and one window plus a bucket after it happened, never
//! sooner. The hot path is a few relaxed atomics per chunk; a bucket boundary takes a mutex.
//!
//! Use survives a reload (it is kept per rule id here, outside the policy) and a restart: a
//! small state file beside the audit log (`<audit_log>.budgets`), replaced atomically every
//! second while use changes, and at shutdown. Why a file rather than a count derived from
//! the log at start: a tunnel's bytes reach the log only when it closes, so a tunnel open
//! across a crash would vanish from a derived count, and reading a rotated log at start
//! grows with its age; the file loses at most a second of counting in a crash and loads at
//! once. A state file that cannot be read stops the start (budgets never reset silently).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tank_ebpf_common::ocsf::proxy::{BudgetNote, BudgetState};
use tracing::warn;

use crate::audit::now_ms;
use crate::policy::{canonical_ip, Policy, Reason, Refusal, Rule};

/// Buckets of a rolling window (besides the current one).
pub const BUCKETS: u64 = 16;
/// The share of a ceiling past which a client's use is recorded and logged as a warning.
pub const ALERT_PERCENT: u64 = 80;
/// Longest rolling window.
pub const MAX_WINDOW_SECS: u64 = 31 * 86_400;

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Client → origin bytes.
    BytesOut,
    /// Origin → client bytes.
    BytesIn,
    /// New tunnels and requests.
    Requests,
    /// Seconds one tunnel stays open.
    TunnelSecs,
}

impl Kind {
    /// The kinds counted over a rolling window, in state order.
    pub const WINDOWED: [Kind; 3] = [Kind::BytesOut, Kind::BytesIn, Kind::Requests];

    /// The stable name, as in the config and `X-Tank-Refused-By`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BytesOut => "bytes_out",
            Kind::BytesIn => "bytes_in",
            Kind::Requests => "requests",
            Kind::TunnelSecs => "tunnel_secs",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::BytesOut => 0,
            Kind::BytesIn => 1,
            Kind::Requests | Kind::TunnelSecs => 2,
        }
    }
}

/// A ceiling over a rolling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceiling {
    /// Bytes or requests per window.
    pub limit: u64,
    /// The window, seconds.
    pub window_secs: u64,
}

/// A rule's budget; every ceiling optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Client → origin bytes per window.
    pub bytes_out: Option<Ceiling>,
    /// Origin → client bytes per window.
    pub bytes_in: Option<Ceiling>,
    /// Tunnels and requests per window.
    pub requests: Option<Ceiling>,
    /// Seconds one tunnel may stay open.
    pub tunnel_secs: Option<u64>,
}

impl Budget {
    /// The ceiling of a windowed kind.
    pub fn ceiling(&self, kind: Kind) -> Option<Ceiling> {
        match kind {
            Kind::BytesOut => self.bytes_out,
            Kind::BytesIn => self.bytes_in,
            Kind::Requests => self.requests,
            Kind::TunnelSecs => None,
        }
    }

    /// No ceiling at all (`budget = {}` opts a rule out of `[default_budget]`).
    pub fn is_empty(&self) -> bool {
        *self == Budget::default()
    }
}

const BYTE_UNITS: [(&str, u64); 9] = [
    ("b", 1),
    ("kb", 1000),
    ("kib", 1 << 10),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
    ("tb", 1_000_000_000_000),
    ("tib", 1 << 40),
];

/// Parses `"20 MiB/h"`, `"64 KiB/2s"` (bytes) or `"600/min"` (requests).
pub fn parse_ceiling(text: &str, bytes: bool) -> Result<Ceiling, String> {
    let example = if bytes { "\"20 MiB/h\"" } else { "\"600/min\"" };
    let (amount, window) = text
        .split_once('/')
        .ok_or_else(|| format!("`{text}` needs a window after `/`, e.g. {example}"))?;
    let amount = amount.trim();
    let digits_end = amount
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(amount.len());
    let (number, unit) = amount.split_at(digits_end);
    let number: f64 = number.parse().map_err(|_| {
        format!("`{text}`: `{amount}` does not start with a number, e.g. {example}")
    })?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale = if bytes {
        if unit.is_empty() {
            1
        } else {
            BYTE_UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    format!("`{text}`: `{unit}` is not a byte unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)")
                })?
        }
    } else if unit.is_empty() {
        1
    } else {
        return Err(format!(
            "`{text}`: requests are counted without a unit, e.g. {example}"
        ));
    };
    let limit = number * scale as f64;
    if !(1.0..=(u64::MAX / 2) as f64).contains(&limit) || (!bytes && number.fract() != 0.0) {
        return Err(format!(
            "`{text}`: the ceiling must be a whole {} from 1",
            if bytes { "number of bytes" } else { "number" }
        ));
    }
    let window = window.trim();
    let count_end = window
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(window.len());
    let (count, unit) = window.split_at(count_end);
    let count: u64 = if count.is_empty() {
        1
    } else {
        count
            .parse()
            .map_err(|_| format!("`{text}`: bad window `{window}`"))?
    };
    let secs = match unit.trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        other => {
            return Err(format!(
                "`{text}`: `{other}` is not a window unit (s, min, h or d, e.g. {example})"
            ))
        }
    };
    let window_secs = count.saturating_mul(secs);
    if !(1..=MAX_WINDOW_SECS).contains(&window_secs) {
        return Err(format!(
            "`{text}`: the window must be from 1 second to 31 days"
        ));
    }
    Ok(Ceiling {
        limit: limit as u64,
        window_secs,
    })
}

/// A ceiling as the config writes it: `"20 MiB/h"`, `"600/min"`.
pub fn format_ceiling(c: Ceiling, bytes: bool) -> String {
    let amount = if bytes {
        match [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .iter()
            .find(|(s, _)| c.limit % s == 0)
        {
            Some((s, u)) => format!("{} {u}", c.limit / s),
            None => format!("{} B", c.limit),
        }
    } else {
        c.limit.to_string()
    };
    let (n, unit) = [(86_400, "d"), (3600, "h"), (60, "min"), (1, "s")]
        .iter()
        .find(|(s, _)| c.window_secs % s == 0)
        .map_or((c.window_secs, "s"), |(s, u)| (c.window_secs / s, *u));
    if n == 1 {
        format!("{amount}/{unit}")
    } else {
        format!("{amount}/{n}{unit}")
    }
}

// ---- counting -----------------------------------------------------------------------------

/// One kind's use over a rolling window. The current bucket and the sum of the earlier ones
/// are atomics (the hot path); moving to a new bucket takes the mutex.
#[derive(Debug, Default)]
struct Meter {
    /// Bucket length, ms; 0 until configured.
    bucket_ms: AtomicU64,
    /// The current bucket's number (time / bucket length).
    slot: AtomicU64,
    current: AtomicU64,
    earlier: AtomicU64,
    /// Earlier buckets still in the window: (number, count).
    ring: Mutex<Vec<(u64, u64)>>,
}

impl Meter {
    /// Sets the window; a changed one (reload) keeps all use so far, in the current bucket.
    fn configure(&self, window_secs: u64, now: u64) {
        let want = (window_secs * 1000 / BUCKETS).max(1);
        if self.bucket_ms.load(Ordering::Relaxed) == want {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if self.bucket_ms.load(Ordering::Relaxed) == want {
            return;
        }
        let total = self.current.load(Ordering::Relaxed) + self.earlier.load(Ordering::Relaxed);
        ring.clear();
        self.slot.store(now / want, Ordering::Relaxed);
        self.current.store(total, Ordering::Relaxed);
        self.earlier.store(0, Ordering::Relaxed);
        self.bucket_ms.store(want, Ordering::Relaxed);
    }

    fn roll(&self, now: u64) {
        let b = self.bucket_ms.load(Ordering::Relaxed);
        if b != 0 && now / b > self.slot.load(Ordering::Relaxed) {
            self.rotate(now);
        }
    }

    #[cold]
    fn rotate(&self, now: u64) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let slot = now / self.bucket_ms.load(Ordering::Relaxed).max(1);
        let old = self.slot.load(Ordering::Relaxed);
        if slot <= old {
            return;
        }
        // Adds racing with the swap land in the new bucket: counted longer, never less.
        let c = self.current.swap(0, Ordering::Relaxed);
        if c > 0 {
            ring.push((old, c));
        }
        self.slot.store(slot, Ordering::Relaxed);
        ring.retain(|(s, _)| s + BUCKETS >= slot);
        self.earlier
            .store(ring.iter().map(|(_, c)| c).sum(), Ordering::Relaxed);
    }

    fn used(&self, now: u64) -> u64 {
        self.roll(now);
        self.current.load(Ordering::Relaxed) + self.earlier.load(Ordering::Relaxed)
    }

    fn add(&self, n: u64, now: u64) -> u64 {
        self.roll(now);
        self.current.fetch_add(n, Ordering::Relaxed) + n + self.earlier.load(Ordering::Relaxed)
    }

    /// Milliseconds until at least `need` of the use has left the window.
    fn freed_in(&self, need: u64, now: u64) -> u64 {
        let b = self.bucket_ms.load(Ordering::Relaxed).max(1);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = 0;
        let buckets = ring.iter().copied().chain([(
            self.slot.load(Ordering::Relaxed),
            self.current.load(Ordering::Relaxed),
        )]);
        for (s, c) in buckets {
            freed += c;
            if freed >= need {
                return ((s + BUCKETS + 1) * b).saturating_sub(now);
            }
        }
        (BUCKETS + 1) * b
    }

    fn state(&self) -> MeterState {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut buckets = ring.clone();
        let c = self.current.load(Ordering::Relaxed);
        if c > 0 {
            buckets.push((self.slot.load(Ordering::Relaxed), c));
        }
        MeterState {
            bucket_ms: self.bucket_ms.load(Ordering::Relaxed),
            buckets,
        }
    }

    fn restore(s: &MeterState) -> Meter {
        let m = Meter::default();
        if let Some((&(slot, current), earlier)) = s.buckets.split_last() {
            m.slot.store(slot, Ordering::Relaxed);
            m.current.store(current, Ordering::Relaxed);
            m.earlier
                .store(earlier.iter().map(|(_, c)| c).sum(), Ordering::Relaxed);
            *m.ring.lock().unwrap_or_else(|e| e.into_inner()) = earlier.to_vec();
        }
        m.bucket_ms.store(s.bucket_ms, Ordering::Relaxed);
        m
    }
}

/// One client's use of one rule's budget.
#[derive(Debug, Default)]
struct Usage {
    meters: [Meter; 3],
    /// Past the alert share, per windowed kind (so the warning is given once per crossing).
    warned: [AtomicBool; 3],
}

/// Every client's use of every rule's budget; lives as long as the process, across reloads.
#[derive(Debug)]
pub struct Budgets {
    table: Mutex<HashMap<(String, IpAddr), Arc<Usage>>>,
    path: PathBuf,
    saved: Mutex<Vec<u8>>,
    /// Warnings given, refusals, tunnels cut.
    events: [AtomicU64; 3],
}

/// A budget state file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot load the budget state `{path}` (remove it to start with every budget unused): {why}"
)]
pub struct StateError {
    path: PathBuf,
    why: String,
}

#[derive(Serialize, Deserialize)]
struct State {
    version: u32,
    usage: Vec<UsageState>,
}

#[derive(Serialize, Deserialize)]
struct UsageState {
    rule: String,
    client: IpAddr,
    bytes_out: MeterState,
    bytes_in: MeterState,
    requests: MeterState,
}

#[derive(Clone, Serialize, Deserialize)]
struct MeterState {
    bucket_ms: u64,
    buckets: Vec<(u64, u64)>,
}

impl Budgets {
    /// The state file of the proxy whose audit log is `audit_log`.
    pub fn state_path(audit_log: &Path) -> PathBuf {
        let mut name = audit_log.as_os_str().to_owned();
        name.push(".budgets");
        PathBuf::from(name)
    }

    /// Loads the use recorded at `path` (none if the file does not exist).
    pub fn open(path: PathBuf) -> Result<Budgets, StateError> {
        let fail = |why: String| StateError {
            path: path.clone(),
            why,
        };
        let mut table = HashMap::new();
        let saved = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))?;
                if state.version != 1 {
                    return Err(fail(format!("unknown version {}", state.version)));
                }
                for u in state.usage {
                    let usage = Usage {
                        meters: [
                            Meter::restore(&u.bytes_out),
                            Meter::restore(&u.bytes_in),
                            Meter::restore(&u.requests),
                        ],
                        warned: Default::default(),
                    };
                    table.insert((u.rule, u.client), Arc::new(usage));
                }
                bytes
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(Budgets {
            table: Mutex::new(table),
            path,
            saved: Mutex::new(saved),
            events: Default::default(),
        })
    }

    /// What a connection from `client` allowed by `rule` is charged to, if the rule has a
    /// budget under `policy`.
    pub fn charge(
        self: &Arc<Self>,
        policy: &Policy,
        rule: &Rule,
        client: IpAddr,
    ) -> Option<Arc<Charge>> {
        let budget = policy.budget_of(rule)?.clone();
        let client = canonical_ip(client);
        let usage = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((rule.id.clone(), client))
            .or_default()
            .clone();
        let now = now_ms();
        for kind in Kind::WINDOWED {
            if let Some(c) = budget.ceiling(kind) {
                usage.meters[kind.index()].configure(c.window_secs, now);
            }
        }
        Some(Arc::new(Charge {
            budgets: self.clone(),
            rule: rule.id.clone(),
            client,
            budget,
            usage,
            note: Mutex::new(None),
            cut: AtomicBool::new(false),
        }))
    }

    /// Writes the state file if use changed since the last write (atomically: a temporary
    /// file, synced, renamed over it). Use that left every window is dropped.
    pub fn save(&self) -> io::Result<()> {
        let now = now_ms();
        let usage = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.retain(|_, u| {
                Arc::strong_count(u) > 1 || u.meters.iter().any(|m| m.used(now) > 0)
            });
            let mut usage: Vec<UsageState> = table
                .iter()
                .map(|((rule, client), u)| UsageState {
                    rule: rule.clone(),
                    client: *client,
                    bytes_out: u.meters[0].state(),
                    bytes_in: u.meters[1].state(),
                    requests: u.meters[2].state(),
                })
                .collect();
            usage.sort_by(|a, b| (&a.rule, a.client).cmp(&(&b.rule, b.client)));
            usage
        };
        let bytes = serde_json::to_vec(&State { version: 1, usage })?;
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if *saved == bytes {
            return Ok(());
        }
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        *saved = bytes;
        Ok(())
    }

    /// The `/metrics` families of budgets: use, room and ceiling per rule, client and kind
    /// under `policy`, and the warnings, refusals and cuts so far.
    pub fn render(&self, policy: &Policy, o: &mut String) {
        let now = now_ms();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = table.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let mut families = [
            (
                "egress_proxy_budget_used",
                "Use in the rolling window per rule, client and kind (bytes or requests).",
                String::new(),
            ),
            (
                "egress_proxy_budget_remaining",
                "What the client may still use in the window.",
                String::new(),
            ),
            (
                "egress_proxy_budget_limit",
                "The ceiling per window.",
                String::new(),
            ),
        ];
        for ((rule_id, client), usage) in rows {
            let Some(budget) = policy
                .allowed
                .iter()
                .find(|r| r.id == *rule_id)
                .and_then(|r| policy.budget_of(r))
            else {
                continue;
            };
            for kind in Kind::WINDOWED {
                let Some(c) = budget.ceiling(kind) else {
                    continue;
                };
                let used = usage.meters[kind.index()].used(now);
                let labels = format!(
                    "{{rule=\"{}\",client=\"{client}\",kind=\"{}\"}}",
                    escape(rule_id),
                    kind.as_str()
                );
                for (i, v) in [used, c.limit.saturating_sub(used), c.limit]
                    .into_iter()
                    .enumerate()
                {
                    let _ = writeln!(families[i].2, "{}{labels} {v}", families[i].0);
                }
            }
        }
        for (name, help, lines) in &families {
            let _ = write!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{lines}");
        }
        let name = "egress_proxy_budget_events_total";
        let _ = writeln!(o, "# HELP {name} Budget warnings (a client past {ALERT_PERCENT}% of a ceiling), refusals (429) and tunnels cut.\n# TYPE {name} counter");
        for (i, event) in ["warning", "refused", "cut"].iter().enumerate() {
            let _ = writeln!(
                o,
                "{name}{{event=\"{event}\"}} {}",
                self.events[i].load(Ordering::Relaxed)
            );
        }
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A ceiling a request found reached: its record note and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// For the record.
    pub note: BudgetNote,
    /// Seconds until enough use has left the window (`Retry-After`).
    pub retry_after_secs: u64,
}

/// What one connection (or inspected request) is charged to: its rule's use by its client,
/// the ceilings in force when it started, and the budget it ran into, for its record.
#[derive(Debug)]
pub struct Charge {
    budgets: Arc<Budgets>,
    rule: String,
    client: IpAddr,
    budget: Budget,
    usage: Arc<Usage>,
    note: Mutex<Option<BudgetNote>>,
    cut: AtomicBool,
}

impl Charge {
    /// Counts one request, or refuses it when a ceiling is reached already or would be by
    /// the `out` bytes the request is known to send (a plain-HTTP head and body).
    pub fn admit(&self, out: u64) -> Result<(), Refusal> {
        let now = now_ms();
        for kind in Kind::WINDOWED {
            let Some(c) = self.budget.ceiling(kind) else {
                continue;
            };
            let meter = &self.usage.meters[kind.index()];
            let used = meter.used(now);
            // A byte ceiling is reached when not one more byte may pass.
            let would = used
                + if kind == Kind::BytesOut {
                    out.max(1)
                } else {
                    1
                };
            if would > c.limit {
                let need = would - c.limit;
                let retry = meter.freed_in(need, now).div_ceil(1000).max(1);
                self.budgets.events[1].fetch_add(1, Ordering::Relaxed);
                let note = self.noted(
                    kind,
                    BudgetState::Exceeded,
                    c.limit,
                    Some(c.window_secs),
                    used,
                );
                return Err(Refusal {
                    reason: Reason::Budget,
                    rule: Some(format!("budget:{}:{}", self.rule, kind.as_str())),
                    detail: format!(
                        "{} of {} allows {} per {} s and this client has used {used}{}; retry in {retry} s",
                        kind.as_str(),
                        self.rule,
                        c.limit,
                        c.window_secs,
                        if out > 0 && kind == Kind::BytesOut {
                            format!(" (this request would send {out} more)")
                        } else {
                            String::new()
                        }
                    ),
                    budget: Some(Box::new(Exhausted {
                        note,
                        retry_after_secs: retry,
                    })),
                });
            }
        }
        if self.budget.requests.is_some() {
            self.moved(Kind::Requests, 1);
        }
        Ok(())
    }

    /// Bytes of `kind` that may still move (`u64::MAX` without a ceiling).
    pub fn room(&self, kind: Kind) -> u64 {
        match self.budget.ceiling(kind) {
            None => u64::MAX,
            Some(c) => c
                .limit
                .saturating_sub(self.usage.meters[kind.index()].used(now_ms())),
        }
    }

    /// How much of `want` the next read may take: no more than the room left; none left is
    /// the cut. Every relay (tunnels, inspected bodies, WebSockets) asks this before it reads,
    /// which is what stops it at the ceiling rather than one buffer past it.
    pub fn take(&self, kind: Kind, want: usize) -> io::Result<usize> {
        match self.room(kind) {
            0 => Err(self.cut_error(kind)),
            room => Ok(want.min(usize::try_from(room).unwrap_or(usize::MAX))),
        }
    }

    /// Counts `n` of `kind` moved; past the alert share, a warning (once per crossing).
    pub fn moved(&self, kind: Kind, n: u64) {
        let Some(c) = self.budget.ceiling(kind) else {
            return;
        };
        let used = self.usage.meters[kind.index()].add(n, now_ms());
        let warned = &self.usage.warned[kind.index()];
        let past = used.saturating_mul(100) >= c.limit.saturating_mul(ALERT_PERCENT);
        if past && !warned.load(Ordering::Relaxed) && !warned.swap(true, Ordering::Relaxed) {
            self.budgets.events[0].fetch_add(1, Ordering::Relaxed);
            warn!(client = %self.client, rule = %self.rule, kind = kind.as_str(), used, limit = c.limit, window_secs = c.window_secs, "budget: client passed {ALERT_PERCENT}% of its ceiling");
            self.noted(
                kind,
                BudgetState::Warning,
                c.limit,
                Some(c.window_secs),
                used,
            );
        } else if !past && warned.load(Ordering::Relaxed) {
            warned.store(false, Ordering::Relaxed);
        }
    }

    /// Marks the connection cut by `kind` (reached while relaying); returns the error text.
    pub fn cut(&self, kind: Kind, used: u64) -> String {
        let (limit, window) = match self.budget.ceiling(kind) {
            Some(c) => (c.limit, Some(c.window_secs)),
            None => (self.budget.tunnel_secs.unwrap_or(0), None),
        };
        if !self.cut.swap(true, Ordering::Relaxed) {
            self.budgets.events[2].fetch_add(1, Ordering::Relaxed);
        }
        self.noted(kind, BudgetState::Exceeded, limit, window, used);
        let per = window.map_or("per tunnel".to_owned(), |w| format!("per {w} s"));
        warn!(client = %self.client, rule = %self.rule, kind = kind.as_str(), used, limit, "budget reached: cutting the tunnel");
        format!(
            "cut by budget:{}:{}: {limit} {per} reached ({used} used)",
            self.rule,
            kind.as_str()
        )
    }

    /// The error of a relay cut for `kind` reaching its ceiling.
    pub fn cut_error(&self, kind: Kind) -> io::Error {
        let used = self
            .budget
            .ceiling(kind)
            .map_or(0, |_| self.usage.meters[kind.index()].used(now_ms()));
        io::Error::other(self.cut(kind, used))
    }

    /// Whether a ceiling cut the connection.
    pub fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    /// The refusal of a request whose body was cut at a ceiling.
    pub fn cut_refusal(&self) -> Option<Refusal> {
        let note = self.note().filter(|_| self.was_cut())?;
        Some(Refusal {
            reason: Reason::Budget,
            rule: Some(format!("budget:{}:{}", self.rule, note.kind)),
            detail: format!(
                "the request body reached {} of {} ({} per {} s)",
                note.kind,
                self.rule,
                note.limit,
                note.window_secs.unwrap_or(0)
            ),
            budget: Some(Box::new(Exhausted {
                retry_after_secs: note.window_secs.unwrap_or(1),
                note,
            })),
        })
    }

    /// How long one tunnel may stay open.
    pub fn tunnel_limit(&self) -> Option<Duration> {
        self.budget.tunnel_secs.map(Duration::from_secs)
    }

    /// The budget the connection ran into, for its record (an exceeded one over a warning).
    pub fn note(&self) -> Option<BudgetNote> {
        self.note.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn noted(
        &self,
        kind: Kind,
        state: BudgetState,
        limit: u64,
        window_secs: Option<u64>,
        used: u64,
    ) -> BudgetNote {
        let note = BudgetNote {
            rule: self.rule.clone(),
            kind: kind.as_str().to_owned(),
            state,
            limit,
            window_secs,
            used,
        };
        let mut slot = self.note.lock().unwrap_or_else(|e| e.into_inner());
        if slot
            .as_ref()
            .is_none_or(|n| n.state == BudgetState::Warning)
        {
            *slot = Some(note.clone());
        }
        note
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_parse_and_print_back() {
        for (text, bytes, limit, window) in [
            ("20 MiB/h", true, 20 << 20, 3600),
            ("64 KiB/2s", true, 64 << 10, 2),
            ("1.5 GB/d", true, 1_500_000_000, 86_400),
            ("600/min", false, 600, 60),
            ("10/30s", false, 10, 30),
            ("4096/h", true, 4096, 3600),
        ] {
            let c = parse_ceiling(text, bytes).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((c.limit, c.window_secs), (limit, window), "{text}");
            let again = parse_ceiling(&format_ceiling(c, bytes), bytes).unwrap();
            assert_eq!(again, c, "{text} -> {}", format_ceiling(c, bytes));
        }
        assert_eq!(
            format_ceiling(parse_ceiling("20 MiB/h", true).unwrap(), true),
            "20 MiB/h"
        );
        assert_eq!(
            format_ceiling(parse_ceiling("600/min", false).unwrap(), false),
            "600/min"
        );
        for (text, bytes, says) in [
            ("20 MiB", true, "needs a window"),
            ("20 MiB/hr2", true, "not a window unit"),
            ("20 XB/h", true, "not a byte unit"),
            ("10 KiB/min", false, "without a unit"),
            ("0/min", false, "from 1"),
            ("1.5/min", false, "whole"),
            ("lots/min", false, "does not start with a number"),
            ("1/40d", false, "31 days"),
        ] {
            let e = parse_ceiling(text, bytes).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn a_meter_forgets_use_after_its_window_and_not_before() {
        let m = Meter::default();
        m.configure(16, 0); // 1 s buckets
        assert_eq!(m.add(100, 500), 100);
        assert_eq!(m.add(50, 3_200), 150);
        // Counted until the window and one bucket have passed since its bucket.
        assert_eq!(m.used(16_900), 150);
        assert_eq!(m.used(17_000), 50);
        assert_eq!(m.used(20_000), 0);
        // A restored meter goes on where it stopped.
        m.add(7, 20_100);
        let r = Meter::restore(&m.state());
        assert_eq!(r.used(20_200), 7);
        assert_eq!(r.add(1, 21_000), 8);
        // A changed window keeps what was used.
        r.configure(60, 21_000);
        assert_eq!(r.used(21_001), 8);
    }

    #[test]
    fn retry_after_names_when_enough_has_left_the_window() {
        let m = Meter::default();
        m.configure(16, 0);
        m.add(10, 1_000);
        m.add(10, 5_000);
        // The first 10 leave at (1 + 17) s.
        assert_eq!(m.freed_in(5, 6_000), 12_000);
        assert_eq!(m.freed_in(15, 6_000), 16_000);
    }
}
