//! The proxy log's records: one Network Activity record per client connection.

use serde::{Deserialize, Serialize};

use super::{
    class, protocol, Action, ConnectionInfo, Device, Disposition, Endpoint, LogName, Metadata,
    Outcome, Product, DIRECTION_OUTBOUND,
};

/// The product name of the proxy log's writer.
pub const PRODUCT: &str = "egress-proxy";

/// One client connection: a CONNECT tunnel, a plain-HTTP request, or a connection that never
/// sent a parsable request. Written when the connection ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Producer, schema version, `log_name` `proxy`.
    pub metadata: Metadata,
    /// [`class::NETWORK_ACTIVITY`].
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// Open (allowed) or Refuse (refused): [`Outcome`].
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
    /// Record time (= `end_time`), ms since the epoch.
    pub time: i64,
    /// The same, RFC 3339.
    pub time_dt: String,
    /// When the connection was accepted, ms.
    pub start_time: i64,
    /// When it ended, ms.
    pub end_time: i64,
    /// end - start, ms.
    pub duration: i64,
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
    /// Bytes each way.
    pub traffic: Traffic,
    /// The URL of a plain-HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Url>,
    /// The proxy's own fields.
    pub unmapped: ProxyDetails,
}

/// What the proxy knows of a connection when it ends: [`ConnectionRecord::new`] makes the
/// record from it.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Allowed or refused.
    pub allowed: bool,
    /// Accepted at, ms since the epoch.
    pub start_ms: i64,
    /// Lasted, ms.
    pub duration_ms: i64,
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
        let end = c.start_ms + c.duration_ms;
        Self {
            metadata: Metadata::new(Product::tank(PRODUCT, version), LogName::Proxy),
            class_uid: class::NETWORK_ACTIVITY,
            category_uid: class::category(class::NETWORK_ACTIVITY),
            activity_id: outcome.activity_id,
            type_uid: class::type_uid(class::NETWORK_ACTIVITY, outcome.activity_id),
            severity_id: outcome.severity_id,
            action: outcome.action,
            action_id: outcome.action_id,
            disposition: outcome.disposition,
            disposition_id: outcome.disposition_id,
            time: end,
            time_dt: super::rfc3339(end.saturating_mul(1_000_000)),
            start_time: c.start_ms,
            end_time: end,
            duration: c.duration_ms,
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
            traffic: c.traffic,
            url: c.url,
            unmapped: c.details,
        }
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
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
