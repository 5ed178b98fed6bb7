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

/// Bucket widths to choose from, ms: the smallest that fits the span in [`MAX_BUCKETS`].
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
/// and every width of [`WIDTHS_MS`] from 5 min on is a multiple of the last, so the counts
/// re-bucket exactly into whatever width the whole span needs at the end.
const BASE_MS: [i64; 6] = [1_000, 5_000, 10_000, 30_000, 60_000, 300_000];

/// Most base buckets a span may cover before the base widens (then 5 min buckets stay, one
/// per 5 min of span: a month is 8,640 of them per series).
const MAX_BASE_BUCKETS: i64 = 600;

/// Counts records as they stream by, then buckets them in [`Builder::finish`]. Memory is a
/// few hundred counts per timeline and kind, whatever the number of records.
#[derive(Default)]
pub struct Builder {
    hosts: Vec<(&'static str, String)>,
    /// Per (timeline, kind): count per base bucket (`time div base`).
    counts: BTreeMap<(u32, Kind), std::collections::HashMap<i64, u64>>,
    base: usize,
    span: Option<(i64, i64)>,
    rules: BTreeMap<String, (u64, u64)>,
}

impl Builder {
    /// A new timeline for one log of `host` (`host` may be named later, [`Builder::rename`]);
    /// returns its index for [`Builder::add`].
    pub fn timeline(&mut self, log: &'static str, host: &str) -> usize {
        self.hosts.push((log, host.to_owned()));
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
        while (*max - *min) / BASE_MS[self.base] > MAX_BASE_BUCKETS && self.base + 1 < BASE_MS.len()
        {
            let (from, to) = (BASE_MS[self.base], BASE_MS[self.base + 1]);
            for counts in self.counts.values_mut() {
                let old = std::mem::take(counts);
                for (b, n) in old {
                    *counts.entry((b * from).div_euclid(to)).or_default() += n;
                }
            }
            self.base += 1;
        }
        let b = time_ms.div_euclid(BASE_MS[self.base]);
        *self
            .counts
            .entry((i as u32, kind))
            .or_default()
            .entry(b)
            .or_default() += 1;
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
        let base = BASE_MS[self.base];
        let fits = *WIDTHS_MS
            .iter()
            .find(|w| (max - min) / **w < MAX_BUCKETS as i64)
            .unwrap_or(&WIDTHS_MS[WIDTHS_MS.len() - 1]);
        // The base only widens when the span needs more than MAX_BUCKETS of the width before.
        let bucket_ms = fits.max(base);
        let start_ms = min - min.rem_euclid(bucket_ms);
        let n = (((max - start_ms) / bucket_ms) as usize + 1).min(MAX_BUCKETS);
        let mut series: BTreeMap<(u32, Kind), Vec<u64>> = BTreeMap::new();
        for (key, counts) in self.counts {
            let out = series.entry(key).or_insert_with(|| vec![0; n]);
            for (b, c) in counts {
                let i = (((b * base - start_ms) / bucket_ms) as usize).min(n - 1);
                out[i] += c;
            }
        }
        let hosts = self
            .hosts
            .into_iter()
            .enumerate()
            .map(|(i, (log, host))| HostTimeline {
                log,
                host,
                series: series
                    .range((i as u32, Kind::AttemptAllowed)..=(i as u32, Kind::ProxyDenied))
                    .map(|((_, kind), counts)| Series {
                        kind: *kind,
                        name: kind.name(),
                        total: counts.iter().sum(),
                        counts: counts.clone(),
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
    fn no_records_no_buckets() {
        let a = Builder::default().finish();
        assert!(a.hosts.is_empty() && a.bucket_ms == 0);
    }
}
