//! What the two logs hold over time, aggregated into a bounded picture for the cross-check's
//! report: per host, counts of attempts and connections in at most [`MAX_BUCKETS`] time
//! buckets, and the proxy's requests by the rule that decided them.
//!
//! Bounded whatever the logs' size: a week of records becomes the same few hundred numbers,
//! so the HTML report stays quick to open and the JSON report stays readable.

use std::collections::BTreeMap;

use serde::Serialize;

/// Most buckets in a timeline.
pub const MAX_BUCKETS: usize = 120;

/// Bucket widths to choose from, ms: the smallest that fits the span in [`MAX_BUCKETS`], or
/// past the last one [`wider`]'s.
const WIDTHS_MS: [i64; 17] = [
    1_000,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
    604_800_000,
    2_592_000_000,
];

/// A width past both tables: ten times `w`, from 30 days on. Only a log whose times are
/// garbage (edited, or a clock gone wrong) gets here; the widest needed for any two `i64`
/// times is 2.6e18 ms, so a span of them still fits a few buckets and memory stays bounded.
fn wider(w: i64) -> i64 {
    w.max(WIDTHS_MS[WIDTHS_MS.len() - 1] / 10)
        .saturating_mul(10)
}

/// What one record counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Kernel: an attempt the gate allowed.
    AttemptAllowed,
    /// Kernel: an attempt the gate denied.
    AttemptDenied,
    /// Kernel: an established TCP connection.
    Connection,
    /// Proxy: a request or tunnel the proxy allowed.
    ProxyAllowed,
    /// Proxy: one it refused.
    ProxyDenied,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AttemptAllowed => "attempts allowed",
            Kind::AttemptDenied => "attempts denied",
            Kind::Connection => "connections established",
            Kind::ProxyAllowed => "proxy requests allowed",
            Kind::ProxyDenied => "proxy requests refused",
        }
    }
}

/// The aggregate, as the report shows it.
#[derive(Debug, Default, Serialize)]
pub struct Activity {
    /// Start of the first bucket, ms since the epoch (0 when the logs hold no record).
    pub start_ms: i64,
    /// Width of each bucket, ms.
    pub bucket_ms: i64,
    /// One timeline per host and log.
    pub hosts: Vec<HostTimeline>,
    /// Proxy records by rule, most frequent first.
    pub proxy_rules: Vec<RuleCount>,
}

/// The records of one host in one log, over time.
#[derive(Debug, Serialize)]
pub struct HostTimeline {
    /// `kernel` or `proxy`.
    pub log: &'static str,
    /// `device.hostname` of its records.
    pub host: String,
    /// One series per kind of record this host has.
    pub series: Vec<Series>,
}

/// Counts per bucket of one kind of record.
#[derive(Debug, Serialize)]
pub struct Series {
    /// What is counted.
    pub kind: Kind,
    /// Its label.
    pub name: &'static str,
    /// Per bucket.
    pub counts: Vec<u64>,
    /// Their sum.
    pub total: u64,
}

/// Proxy records decided by one rule.
#[derive(Debug, Serialize)]
pub struct RuleCount {
    /// The rule (`unmapped.rule`).
    pub rule: String,
    /// Allowed.
    pub allowed: u64,
    /// Refused.
    pub denied: u64,
}

/// Bucket widths records are counted in while they stream by, ms: each divides the next,
/// and every width of [`WIDTHS_MS`] at least as wide as one of them is a multiple of it, so
/// the counts re-bucket exactly into whatever width the whole span needs at the end. Past a
/// day, [`wider`]'s (30 days, then ten times each), which the widths past the table share.
const BASE_MS: [i64; 10] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 1_800_000, 3_600_000, 10_800_000, 86_400_000,
];

/// Most base buckets the span may cover before the base widens: a timeline holds at most this
/// many counts (plus one) for a span of up to 600 days.
const MAX_BASE_BUCKETS: i64 = 600;

/// The kinds, for indexing.
const KINDS: usize = 5;

/// One timeline's counts of one kind, per base bucket from `first` (a bucket index).
#[derive(Default)]
struct Counts {
    first: i64,
    counts: Vec<u64>,
}

impl Counts {
    fn add(&mut self, b: i64) {
        if self.counts.is_empty() {
            // All the room it can need, at once: the picture's memory is then the same from
            // its first record on (not reached after some 600 base buckets of records, a
            // warm-up that made peak memory look like it grew with the logs).
            self.counts.reserve_exact(MAX_BASE_BUCKETS as usize + 2);
            self.first = b;
        } else if b < self.first {
            let more = (self.first - b) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, more));
            self.first = b;
        }
        let i = (b - self.first) as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }

    /// The same counts in buckets `to` wide instead of `from` (a multiple of it).
    fn widen(&mut self, from: i64, to: i64) {
        let Some(last) = self.counts.len().checked_sub(1) else {
            return;
        };
        // In i128: a bucket index times its width may lie past i64 for garbage times.
        let (from, to) = (i128::from(from), i128::from(to));
        let at = |j: usize| (i128::from(self.first) + j as i128) * from;
        let first = at(0).div_euclid(to);
        let mut out = vec![0; (at(last).div_euclid(to) - first) as usize + 1];
        for (j, n) in self.counts.iter().enumerate() {
            out[(at(j).div_euclid(to) - first) as usize] += n;
        }
        // Into the same allocation: it keeps the room reserved for a whole span.
        self.counts.clear();
        self.counts.extend_from_slice(&out);
        // A bucket index of a wider width is smaller, so it fits the i64 the narrower one did.
        self.first = first as i64;
    }
}

/// Counts records as they stream by, then buckets them in [`Builder::finish`]. Memory is at
/// most [`MAX_BASE_BUCKETS`] counts per timeline and kind, whatever the number of records.
#[derive(Default)]
pub struct Builder {
    hosts: Vec<(&'static str, String)>,
    /// Per timeline and kind (`timeline * KINDS + kind`).
    counts: Vec<Counts>,
    /// The base width counts are kept in, ms (0 before the first record: `BASE_MS[0]`).
    base_ms: i64,
    span: Option<(i64, i64)>,
    rules: BTreeMap<String, (u64, u64)>,
}

impl Builder {
    /// A new timeline for one log of `host` (`host` may be named later, [`Builder::rename`]);
    /// returns its index for [`Builder::add`].
    pub fn timeline(&mut self, log: &'static str, host: &str) -> usize {
        self.hosts.push((log, host.to_owned()));
        self.counts
            .resize_with(self.hosts.len() * KINDS, Counts::default);
        self.hosts.len() - 1
    }

    /// Names the host of timeline `i`.
    pub fn rename(&mut self, i: usize, host: &str) {
        host.clone_into(&mut self.hosts[i].1);
    }

    /// Counts a record of timeline `i` at `time_ms`.
    pub fn add(&mut self, i: usize, kind: Kind, time_ms: i64) {
        let (min, max) = self.span.get_or_insert((time_ms, time_ms));
        (*min, *max) = ((*min).min(time_ms), (*max).max(time_ms));
        // abs_diff: the span of two arbitrary times does not fit an i64.
        let from = self.base_ms.max(BASE_MS[0]);
        let mut to = from;
        while max.abs_diff(*min) / to as u64 > MAX_BASE_BUCKETS as u64 {
            to = BASE_MS
                .iter()
                .copied()
                .find(|w| *w > to)
                .unwrap_or_else(|| wider(to));
        }
        if to != from {
            for counts in &mut self.counts {
                counts.widen(from, to);
            }
        }
        self.base_ms = to;
        self.counts[i * KINDS + kind as usize].add(time_ms.div_euclid(to));
    }

    /// Counts a proxy record by its rule.
    pub fn rule(&mut self, rule: &str, allowed: bool) {
        if !self.rules.contains_key(rule) {
            self.rules.insert(rule.to_owned(), (0, 0));
        }
        let (a, d) = self.rules.get_mut(rule).expect("inserted");
        *if allowed { a } else { d } += 1;
    }

    /// The bounded aggregate.
    pub fn finish(self) -> Activity {
        let mut proxy_rules: Vec<RuleCount> = self
            .rules
            .into_iter()
            .map(|(rule, (allowed, denied))| RuleCount {
                rule,
                allowed,
                denied,
            })
            .collect();
        proxy_rules.sort_by_key(|r| std::cmp::Reverse(r.allowed + r.denied));
        let Some((min, max)) = self.span else {
            return Activity {
                proxy_rules,
                ..Activity::default()
            };
        };
        let base = self.base_ms;
        let fits_span = |w: i64| max.abs_diff(min) / (w as u64) < MAX_BUCKETS as u64;
        let mut fits = WIDTHS_MS
            .iter()
            .copied()
            .find(|w| fits_span(*w))
            .unwrap_or(WIDTHS_MS[WIDTHS_MS.len() - 1]);
        while !fits_span(fits) {
            fits = wider(fits);
        }
        // The base only widens when the span needs more than MAX_BUCKETS of the width before.
        let bucket_ms = fits.max(base);
        // Saturating: only times near the ends of i64 (garbage) come near it.
        let start_ms = min.div_euclid(bucket_ms).saturating_mul(bucket_ms);
        let n = ((max.abs_diff(start_ms) / bucket_ms as u64) as usize + 1).min(MAX_BUCKETS);
        const ALL: [Kind; KINDS] = [
            Kind::AttemptAllowed,
            Kind::AttemptDenied,
            Kind::Connection,
            Kind::ProxyAllowed,
            Kind::ProxyDenied,
        ];
        let series = |c: &Counts| {
            let mut out = vec![0; n];
            for (j, count) in c.counts.iter().enumerate() {
                let t = (c.first + j as i64).saturating_mul(base);
                out[((t.abs_diff(start_ms) / bucket_ms as u64) as usize).min(n - 1)] += count;
            }
            out
        };
        let hosts = self
            .hosts
            .into_iter()
            .enumerate()
            .map(|(i, (log, host))| HostTimeline {
                log,
                host,
                series: ALL
                    .iter()
                    .filter(|kind| !self.counts[i * KINDS + **kind as usize].counts.is_empty())
                    .map(|kind| {
                        let counts = series(&self.counts[i * KINDS + *kind as usize]);
                        Series {
                            kind: *kind,
                            name: kind.name(),
                            total: counts.iter().sum(),
                            counts,
                        }
                    })
                    .collect(),
            })
            .collect();
        Activity {
            start_ms,
            bucket_ms,
            hosts,
            proxy_rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_week_of_records_fits_in_bounded_buckets_and_keeps_every_count() {
        let mut b = Builder::default();
        let (agent, proxy) = (b.timeline("kernel", "agent"), b.timeline("proxy", "proxy"));
        let week = 7 * 86_400_000;
        let t0 = 1_800_000_000_000;
        for i in 0..10_000i64 {
            b.add(agent, Kind::AttemptDenied, t0 + i * (week / 10_000));
            b.add(proxy, Kind::ProxyAllowed, t0 + i * (week / 10_000));
            b.rule(
                if i % 3 == 0 {
                    "default-deny"
                } else {
                    "allowed_domains:web"
                },
                i % 3 != 0,
            );
        }
        b.add(agent, Kind::Connection, t0 + week);
        // Counted in bounded memory: at most MAX_BASE_BUCKETS + 1 counts per timeline and kind.
        assert!(b
            .counts
            .iter()
            .all(|c| c.counts.len() as i64 <= MAX_BASE_BUCKETS + 1));
        let a = b.finish();
        assert_eq!(a.bucket_ms, 7_200_000, "two-hour buckets for a week");
        assert!(a.start_ms <= t0 && a.start_ms % a.bucket_ms == 0);
        assert_eq!(a.hosts.len(), 2);
        let agent = &a.hosts[0];
        assert_eq!((agent.log, agent.host.as_str()), ("kernel", "agent"));
        let names: Vec<_> = agent.series.iter().map(|s| s.name).collect();
        assert_eq!(names, ["attempts denied", "connections established"]);
        for s in &agent.series {
            assert!(s.counts.len() <= MAX_BUCKETS);
            assert_eq!(s.counts.iter().sum::<u64>(), s.total);
        }
        assert_eq!(agent.series[0].total, 10_000);
        assert_eq!(a.proxy_rules[0].rule, "allowed_domains:web");
        assert_eq!(
            (a.proxy_rules[1].allowed, a.proxy_rules[1].denied),
            (0, 3334)
        );
    }

    #[test]
    fn garbage_times_still_give_a_bounded_picture() {
        // An edited log (or a clock gone wrong) may hold any i64 as a time.
        let mut b = Builder::default();
        let agent = b.timeline("kernel", "agent");
        let times = [
            1_800_000_000_000,
            i64::MAX,
            0,
            i64::MIN,
            -1,
            1_800_000_000_001,
        ];
        for t in times {
            b.add(agent, Kind::AttemptDenied, t);
        }
        assert!(b
            .counts
            .iter()
            .all(|c| c.counts.len() as i64 <= MAX_BASE_BUCKETS + 1));
        let a = b.finish();
        let s = &a.hosts[0].series[0];
        assert!(s.counts.len() <= MAX_BUCKETS);
        assert_eq!(s.total, times.len() as u64, "every record counted");
    }

    #[test]
    fn no_records_no_buckets() {
        let a = Builder::default().finish();
        assert!(a.hosts.is_empty() && a.bucket_ms == 0);
    }
}
