//! What is known of one request inside an inspected tunnel while it runs, and its OCSF
//! HTTP Activity (4002) record, linked to the tunnel's record by `metadata.correlation_uid`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::Request;

use super::Tunnel;
use tank_ebpf_common::ocsf::proxy::{
    HttpRequest, Request as Facts, RequestDetails, RequestRecord, Traffic, Url,
};
use tank_ebpf_common::ocsf::Endpoint;

use crate::audit::{now_ms, Held};
use crate::policy::{Refusal, Rule};

/// One request's facts; [`RequestFacts::finish`] queues its record.
#[derive(Debug)]
pub struct RequestFacts {
    start_ms: u64,
    started: Instant,
    method: String,
    url: String,
    version: &'static str,
    redact_query: bool,
    rule: String,
    allowed: bool,
    /// The response status sent to the agent.
    pub status: Option<u16>,
    /// Origin → agent body bytes.
    pub bytes_in: Arc<AtomicU64>,
    /// Agent → origin body bytes.
    pub bytes_out: Arc<AtomicU64>,
    /// What went wrong.
    pub error: Option<String>,
    /// The `[[credentials]]` entry injected, by name.
    pub credential: Option<String>,
    /// Log space held for the record, taken before the request is forwarded.
    pub held: Option<Held>,
}

impl RequestFacts {
    /// The facts of `req`, received now in `tunnel`.
    pub fn start<B>(tunnel: &Tunnel, req: &Request<B>) -> Self {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let url = if tunnel.target.port == 443 {
            format!("https://{}{path}", tunnel.target.host)
        } else {
            format!("https://{}{path}", tunnel.target)
        };
        Self {
            start_ms: now_ms(),
            started: Instant::now(),
            method: req.method().as_str().to_owned(),
            url,
            version: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            redact_query: tunnel.rule.redact_query,
            rule: tunnel.rule.id.clone(),
            allowed: false,
            status: None,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            error: None,
            credential: None,
            held: None,
        }
    }

    /// Left behind where the facts moved on to the response body.
    pub fn placeholder() -> Self {
        Self {
            start_ms: 0,
            started: Instant::now(),
            method: String::new(),
            url: String::new(),
            version: "",
            redact_query: true,
            rule: String::new(),
            allowed: false,
            status: None,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            error: None,
            credential: None,
            held: None,
        }
    }

    /// `METHOD URL` for log lines (query redacted as in the record).
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.record_url())
    }

    fn record_url(&self) -> &str {
        if self.redact_query {
            self.url.split('?').next().unwrap_or_default()
        } else {
            &self.url
        }
    }

    /// The request was allowed by `rule`.
    pub fn decided_by(&mut self, rule: &Rule) {
        self.allowed = true;
        self.rule = rule.id.clone();
        self.redact_query |= rule.redact_query;
    }

    /// The request was refused.
    pub fn refused(&mut self, refusal: &Refusal) {
        self.allowed = false;
        self.rule = refusal.by().to_owned();
        self.error = Some(refusal.detail.clone());
    }

    /// Queues the record (from any context: the write waits in its own task).
    pub fn finish(self, tunnel: &Tunnel) {
        let url = self.record_url().to_owned();
        let facts = Facts {
            allowed: self.allowed,
            start_ms: self.start_ms as i64,
            duration_ms: self.started.elapsed().as_millis() as i64,
            client: tunnel.client,
            target: Endpoint {
                hostname: Some(tunnel.target.host.to_plain_string()),
                ip: Some(tunnel.origin_addr.ip().to_canonical()),
                port: Some(tunnel.origin_addr.port()),
                name: None,
            },
            http: HttpRequest {
                http_method: self.method,
                url: Url { url_string: url },
                version: self.version.to_owned(),
            },
            status: self.status,
            traffic: Traffic {
                bytes_in: self.bytes_in.load(Ordering::Relaxed),
                bytes_out: self.bytes_out.load(Ordering::Relaxed),
            },
            tunnel_uid: tunnel.uid.clone(),
            details: RequestDetails {
                rule: self.rule,
                credential: self.credential,
                error: self.error,
                url_bytes: None,
            },
        };
        let record = RequestRecord::new(facts, &tunnel.hostname, env!("CARGO_PKG_VERSION"));
        let audit = tunnel.audit.clone();
        let held = self.held;
        tokio::spawn(async move { audit.record_request(record, held).await });
    }
}
