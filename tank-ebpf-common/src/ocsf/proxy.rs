//! The proxy log's records: a Network Activity record per client connection, two for a
//! connection that relays (an opening record written before the `200` or the first forwarded
//! byte, and a closing record linked to it by the chain's `unmapped.closes`), and the proxy's
//! own lifecycle records about its log ([`super::kernel::LifecycleRecord`], `log_name` `proxy`).

use serde::{Deserialize, Serialize};

use super::{
    class, protocol, Action, ConnectionInfo, Device, Disposition, Endpoint, LogName, Metadata,
    Outcome, Product, DIRECTION_OUTBOUND,
};

/// The product name of the proxy log's writer.
pub const PRODUCT: &str = "egress-proxy";

/// One client connection: a CONNECT tunnel, a plain-HTTP request, or a connection that never
/// sent a parsable request: its opening, its closing, or the whole of a connection refused or
/// failed before relaying ([`Phase`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Producer, schema version, `log_name` `proxy`.
    pub metadata: Metadata,
    /// [`class::NETWORK_ACTIVITY`].
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// Open (allowed: an opening record, or a connection recorded whole), Close (a closing
    /// record) or Refuse (refused): [`Outcome`], [`Phase`].
    pub activity_id: u8,
    /// class_uid * 100 + activity_id.
    pub type_uid: u32,
    /// [`Outcome`].
    pub severity_id: u8,
    /// [`Outcome`].
    pub action: Action,
    /// [`Outcome`].
    pub action_id: u8,
    /// [`Outcome`].
    pub disposition: Disposition,
    /// [`Outcome`].
    pub disposition_id: u8,
    /// Record time (`end_time`; `start_time` in an opening record), ms since the epoch.
    pub time: i64,
    /// The same, RFC 3339.
    pub time_dt: String,
    /// When the connection was accepted, ms.
    pub start_time: i64,
    /// When it ended, ms; absent from an opening record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    /// end - start, ms; absent from an opening record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
    /// The proxy host.
    pub device: Device,
    /// The client (the agent host) as the proxy saw it.
    pub src_endpoint: Endpoint,
    /// The proxy's own end of the client connection (OCSF's `proxy`).
    pub proxy: Endpoint,
    /// The target: `hostname` and `port` as requested, `ip` the address connected to.
    pub dst_endpoint: Endpoint,
    /// TCP, outbound.
    pub connection_info: ConnectionInfo,
    /// Bytes each way; absent from an opening record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
    /// The URL of a plain-HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Url>,
    /// The proxy's own fields.
    pub unmapped: ProxyDetails,
}

/// Which record of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Refused, or failed before relaying: one record at the end.
    Whole,
    /// Allowed and about to relay: written before the `200` or the first forwarded byte.
    Opening,
    /// The end of a connection that had an opening record.
    Closing,
}

/// Bytes of a URL kept in a record; the rest is cut (ending in `…`) and its length noted in
/// `unmapped.url_bytes`, so a client cannot grow the log fast with long refused requests.
pub const MAX_URL: usize = 1024;
/// Bytes of an error text kept in a record.
pub const MAX_TEXT: usize = 512;

/// `s` cut to at most `max` bytes on a character boundary, ending in `…` when cut.
pub fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// What the proxy knows of a connection when it ends: [`ConnectionRecord::new`] makes the
/// record from it.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Allowed or refused.
    pub allowed: bool,
    /// Accepted at, ms since the epoch.
    pub start_ms: i64,
    /// Lasted, ms (ignored in an opening record).
    pub duration_ms: i64,
    /// Which record.
    pub phase: Phase,
    /// The client.
    pub client: std::net::SocketAddr,
    /// The proxy's end.
    pub local: std::net::SocketAddr,
    /// The target.
    pub target: Endpoint,
    /// Bytes each way.
    pub traffic: Traffic,
    /// Plain-HTTP URL.
    pub url: Option<Url>,
    /// The proxy's fields.
    pub details: ProxyDetails,
}

impl ConnectionRecord {
    /// True for an allowed connection.
    pub fn allowed(&self) -> bool {
        self.action == Action::Allowed
    }

    /// The record of `c`, written by proxy `version` on `hostname`.
    pub fn new(c: Connection, hostname: &str, version: &str) -> Self {
        let outcome = Outcome::of(c.allowed);
        let activity_id = match c.phase {
            Phase::Closing if c.allowed => super::network_activity::CLOSE,
            _ => outcome.activity_id,
        };
        let end = (c.phase != Phase::Opening).then_some(c.start_ms + c.duration_ms);
        let time = end.unwrap_or(c.start_ms);
        let mut details = c.details;
        details.error = details.error.map(|e| bounded(e, MAX_TEXT));
        Self {
            metadata: Metadata::new(Product::tank(PRODUCT, version), LogName::Proxy),
            class_uid: class::NETWORK_ACTIVITY,
            category_uid: class::category(class::NETWORK_ACTIVITY),
            activity_id,
            type_uid: class::type_uid(class::NETWORK_ACTIVITY, activity_id),
            severity_id: outcome.severity_id,
            action: outcome.action,
            action_id: outcome.action_id,
            disposition: outcome.disposition,
            disposition_id: outcome.disposition_id,
            time,
            time_dt: super::rfc3339(time.saturating_mul(1_000_000)),
            start_time: c.start_ms,
            end_time: end,
            duration: end.map(|_| c.duration_ms),
            device: Device::server(hostname),
            src_endpoint: c.client.into(),
            proxy: c.local.into(),
            dst_endpoint: c.target,
            connection_info: ConnectionInfo {
                protocol_num: protocol::TCP,
                protocol_name: "tcp".to_owned(),
                protocol_ver_id: Some(if c.client.is_ipv4() { 4 } else { 6 }),
                direction_id: DIRECTION_OUTBOUND,
            },
            traffic: end.map(|_| c.traffic),
            url: c.url,
            unmapped: details,
        }
    }
}

impl Url {
    /// The URL as recorded, cut to [`MAX_URL`] bytes; with its full length when cut.
    pub fn bounded(url: &str) -> (Self, Option<usize>) {
        let cut = (url.len() > MAX_URL).then_some(url.len());
        (
            Self {
                url_string: bounded(url.to_owned(), MAX_URL),
            },
            cut,
        )
    }
}

/// OCSF `network_traffic`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Origin to client.
    pub bytes_in: u64,
    /// Client to origin (the forwarded request head included).
    pub bytes_out: u64,
}

/// OCSF `url`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Url {
    /// `http://host[:port]/path?query`.
    pub url_string: String,
}

/// What kind of request a connection carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// A CONNECT tunnel.
    Connect,
    /// A plain-HTTP request.
    Http,
    /// No parsable request.
    Invalid,
}

/// The proxy's fields with no OCSF attribute in Network Activity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyDetails {
    /// The kind of request.
    pub kind: RequestKind,
    /// The rule that decided (`allowed_domains:<name>`, `denied_domains:<name>`), or the
    /// refusal reason when no rule did (`default-deny`, `private-address`, ...).
    pub rule: String,
    /// The method of a plain-HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_method: Option<String>,
    /// What went wrong, if anything (cut after [`MAX_TEXT`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The length of a URL cut to [`MAX_URL`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_bytes: Option<usize>,
}
