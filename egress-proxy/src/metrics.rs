//! Prometheus text-format metrics, served at `/metrics` on the admin listener.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::policy::Reason;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every metric the proxy keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Allowed tunnels.
    pub allowed_connect: Counter,
    /// Allowed plain-HTTP requests.
    pub allowed_http: Counter,
    /// Refusals, indexed like [`Reason::ALL`].
    pub refused: [Counter; Reason::ALL.len()],
    /// Allowed requests whose origin could not be resolved or connected.
    pub upstream_errors: Counter,
    /// Client connections open.
    pub active_connections: Gauge,
    /// Tunnels and forwarded requests relaying bytes.
    pub active_tunnels: Gauge,
    /// Origin → client bytes.
    pub bytes_in: Counter,
    /// Client → origin bytes.
    pub bytes_out: Counter,
    /// Tunnels closed by `idle_timeout_secs`.
    pub idle_timeouts: Counter,
    /// Successful reloads.
    pub reloads_ok: Counter,
    /// Rejected reloads (the old policy stayed).
    pub reloads_rejected: Counter,
    /// Audit records written.
    pub audit_records: Counter,
    /// Audit append/sync failures.
    pub audit_errors: Counter,
    /// 1 while the audit log is writable.
    pub audit_healthy: Gauge,
}

impl Metrics {
    /// Counts a refusal.
    pub fn refused(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.refused[i].inc();
        }
    }

    /// Renders the text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let denied: u64 = self.refused.iter().map(Counter::get).sum();
        head(
            &mut o,
            "egress_proxy_requests_total",
            "counter",
            "Requests and tunnels by decision.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_requests_total{{decision=\"allowed\",kind=\"connect\"}} {}",
            self.allowed_connect.get()
        );
        let _ = writeln!(
            o,
            "egress_proxy_requests_total{{decision=\"allowed\",kind=\"http\"}} {}",
            self.allowed_http.get()
        );
        let _ = writeln!(
            o,
            "egress_proxy_requests_total{{decision=\"denied\",kind=\"any\"}} {denied}"
        );
        head(
            &mut o,
            "egress_proxy_refusals_total",
            "counter",
            "Refusals by reason.",
        );
        for (i, r) in Reason::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "egress_proxy_refusals_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.refused[i].get()
            );
        }
        head(
            &mut o,
            "egress_proxy_upstream_errors_total",
            "counter",
            "Allowed requests whose origin could not be resolved or reached.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_upstream_errors_total {}",
            self.upstream_errors.get()
        );
        head(
            &mut o,
            "egress_proxy_active_connections",
            "gauge",
            "Client connections open.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_active_connections {}",
            self.active_connections.get()
        );
        head(
            &mut o,
            "egress_proxy_active_tunnels",
            "gauge",
            "Tunnels and forwarded requests relaying bytes.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_active_tunnels {}",
            self.active_tunnels.get()
        );
        head(
            &mut o,
            "egress_proxy_bytes_total",
            "counter",
            "Bytes relayed: in = origin to client, out = client to origin.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_bytes_total{{direction=\"in\"}} {}",
            self.bytes_in.get()
        );
        let _ = writeln!(
            o,
            "egress_proxy_bytes_total{{direction=\"out\"}} {}",
            self.bytes_out.get()
        );
        head(
            &mut o,
            "egress_proxy_idle_timeouts_total",
            "counter",
            "Tunnels closed for idleness.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_idle_timeouts_total {}",
            self.idle_timeouts.get()
        );
        head(
            &mut o,
            "egress_proxy_reloads_total",
            "counter",
            "Policy reloads (SIGHUP) by result.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.get()
        );
        let _ = writeln!(
            o,
            "egress_proxy_reloads_total{{result=\"rejected\"}} {}",
            self.reloads_rejected.get()
        );
        head(
            &mut o,
            "egress_proxy_audit_records_total",
            "counter",
            "Audit records appended.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_audit_records_total {}",
            self.audit_records.get()
        );
        head(
            &mut o,
            "egress_proxy_audit_errors_total",
            "counter",
            "Audit append or sync failures.",
        );
        let _ = writeln!(
            o,
            "egress_proxy_audit_errors_total {}",
            self.audit_errors.get()
        );
        head(
            &mut o,
            "egress_proxy_audit_healthy",
            "gauge",
            "1 while the audit log is writable; 0 means new requests are refused.",
        );
        let _ = writeln!(o, "egress_proxy_audit_healthy {}", self.audit_healthy.get());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::default();
        m.allowed_connect.inc();
        m.refused(Reason::DefaultDeny);
        m.refused(Reason::DefaultDeny);
        m.bytes_in.add(10);
        let text = m.render();
        assert!(
            text.contains("egress_proxy_requests_total{decision=\"allowed\",kind=\"connect\"} 1\n")
        );
        assert!(text.contains("egress_proxy_requests_total{decision=\"denied\",kind=\"any\"} 2\n"));
        assert!(text.contains("egress_proxy_refusals_total{reason=\"default-deny\"} 2\n"));
        assert!(text.contains("egress_proxy_bytes_total{direction=\"in\"} 10\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("egress_proxy_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
