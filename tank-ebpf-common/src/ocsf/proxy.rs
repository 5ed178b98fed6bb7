//! The proxy log's records: a Network Activity record per client connection, two for a
//! connection that relays (an opening record written before the `200` or the first forwarded
//! byte, and a closing record linked to it by the chain's `unmapped.closes`), one HTTP
//! Activity record per request inside an inspected tunnel, linked to its tunnel's records by
//! `metadata.correlation_uid` = the tunnel's `metadata.uid`, and the proxy's own lifecycle
//! records about its log ([`super::kernel::LifecycleRecord`], `log_name` `proxy`).

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
    /// The record's `metadata.uid` (inspected tunnels: their requests refer to it).
    pub uid: Option<String>,
    /// The proxy's fields.
    pub details: ProxyDetails,
}

impl Connection {
    /// An allowed CONNECT tunnel from `client` through the proxy's `local` end to
    /// `host`:443 under `rule`, at `start_ms`, in `phase`, no bytes moved yet. For tests and
    /// for tools that write sample logs; change what matters with
    /// `Connection { duration_ms, ..Connection::tunnel(..) }`.
    pub fn tunnel(
        start_ms: i64,
        client: std::net::SocketAddr,
        local: std::net::SocketAddr,
        host: &str,
        rule: &str,
        phase: Phase,
    ) -> Self {
        Connection {
            allowed: true,
            start_ms,
            duration_ms: 0,
            phase,
            client,
            local,
            target: Endpoint {
                hostname: Some(host.to_owned()),
                port: Some(443),
                ..Endpoint::default()
            },
            traffic: Traffic::default(),
            url: None,
            uid: None,
            details: ProxyDetails {
                kind: RequestKind::Connect,
                rule: rule.to_owned(),
                http_method: None,
                error: None,
                url_bytes: None,
                tunnel: None,
                sni: None,
                alpn: Vec::new(),
                requests: None,
                budget: None,
            },
        }
    }
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
        let mut metadata = Metadata::new(Product::tank(PRODUCT, version), LogName::Proxy);
        metadata.uid = c.uid;
        Self {
            metadata,
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
    /// Tunnels: `inspected` (requests judged and recorded one by one) or `opaque`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelKind>,
    /// The server name of the tunnel's TLS ClientHello, when one was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The ALPN protocols the ClientHello offered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Requests served inside an inspected tunnel (each has its own [`RequestRecord`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// A budget this connection passed the alert share of, or crossed (refused or cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Box<BudgetNote>>,
}

/// A budget a connection or request ran into: which ceiling, and the figure that reached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetNote {
    /// The rule whose budget it is (`allowed_domains:<name>`).
    pub rule: String,
    /// What is counted: `bytes_out`, `bytes_in`, `requests` or `tunnel_secs`.
    pub kind: String,
    /// [`BudgetState`].
    pub state: BudgetState,
    /// The ceiling.
    pub limit: u64,
    /// Its rolling window, seconds; absent for `tunnel_secs` (a ceiling per tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
    /// The client's use in the window when the state was reached (for a refusal, what the
    /// request would have made it; for a cut, what had moved).
    pub used: u64,
}

/// How far a budget was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetState {
    /// The client passed the alert share (80%) of the ceiling.
    Warning,
    /// The ceiling was reached: a request refused (`429`) or a tunnel cut.
    Exceeded,
}

/// How a tunnel was relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelKind {
    /// TLS terminated; every request judged and recorded.
    Inspected,
    /// Bytes relayed as they are.
    Opaque,
}

/// HTTP Activity (4002) activities, by method.
pub mod http_activity {
    /// The OCSF activity of an HTTP `method`: 1 Connect, 2 Delete, 3 Get, 4 Head, 5 Options,
    /// 6 Post, 7 Put, 8 Trace, 99 Other.
    pub fn of(method: &str) -> u8 {
        match method.to_ascii_uppercase().as_str() {
            "CONNECT" => 1,
            "DELETE" => 2,
            "GET" => 3,
            "HEAD" => 4,
            "OPTIONS" => 5,
            "POST" => 6,
            "PUT" => 7,
            "TRACE" => 8,
            _ => 99,
        }
    }
}

/// One request inside an inspected tunnel. Written when its response ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// `correlation_uid` = the tunnel record's `uid`.
    pub metadata: Metadata,
    /// [`class::HTTP_ACTIVITY`].
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// By method: [`http_activity::of`].
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
    /// When the request arrived, ms.
    pub start_time: i64,
    /// When its response ended, ms.
    pub end_time: i64,
    /// end - start, ms.
    pub duration: i64,
    /// The proxy host.
    pub device: Device,
    /// The agent host.
    pub src_endpoint: Endpoint,
    /// The origin: the tunnel's host and the address it is connected to.
    pub dst_endpoint: Endpoint,
    /// The request.
    pub http_request: HttpRequest,
    /// The response the agent got, when one was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_response: Option<HttpResponse>,
    /// Body bytes each way.
    pub traffic: Traffic,
    /// The proxy's own fields.
    pub unmapped: RequestDetails,
}

/// OCSF `http_request`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// The method, as sent.
    pub http_method: String,
    /// `https://host[:port]/path[?query]`, the query left out where the rule redacts it.
    pub url: Url,
    /// `HTTP/1.1` or `HTTP/2`, towards the agent.
    pub version: String,
}

/// OCSF `http_response`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// The status code.
    pub code: u16,
}

/// The proxy's fields with no OCSF attribute in HTTP Activity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDetails {
    /// The deciding rule, or the refusal reason.
    pub rule: String,
    /// The `[[credentials]]` entry the proxy set, by name (never its secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// What went wrong, if anything (cut after [`MAX_TEXT`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A budget this request passed the alert share of, or crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Box<BudgetNote>>,
    /// The length of a URL cut to [`MAX_URL`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_bytes: Option<usize>,
}

/// What the proxy knows of a request when its response ends: [`RequestRecord::new`] makes
/// the record from it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Allowed (forwarded) or refused inside the tunnel.
    pub allowed: bool,
    /// Arrived at, ms since the epoch.
    pub start_ms: i64,
    /// Until the response ended, ms.
    pub duration_ms: i64,
    /// The agent host.
    pub client: std::net::SocketAddr,
    /// The origin.
    pub target: Endpoint,
    /// The request.
    pub http: HttpRequest,
    /// The status the agent got.
    pub status: Option<u16>,
    /// Body bytes each way.
    pub traffic: Traffic,
    /// The tunnel record's `metadata.uid`.
    pub tunnel_uid: String,
    /// The proxy's fields.
    pub details: RequestDetails,
}

impl RequestRecord {
    /// The record of `r`, written by proxy `version` on `hostname`; its URL and error are
    /// bounded like a connection record's.
    pub fn new(mut r: Request, hostname: &str, version: &str) -> Self {
        let outcome = Outcome::of(r.allowed);
        let (url, url_bytes) = Url::bounded(&r.http.url.url_string);
        r.http.url = url;
        r.details.url_bytes = url_bytes;
        r.details.error = r.details.error.map(|e| bounded(e, MAX_TEXT));
        let activity_id = http_activity::of(&r.http.http_method);
        let end = r.start_ms + r.duration_ms;
        let mut metadata = Metadata::new(Product::tank(PRODUCT, version), LogName::Proxy);
        metadata.correlation_uid = Some(r.tunnel_uid);
        Self {
            metadata,
            class_uid: class::HTTP_ACTIVITY,
            category_uid: class::category(class::HTTP_ACTIVITY),
            activity_id,
            type_uid: class::type_uid(class::HTTP_ACTIVITY, activity_id),
            severity_id: outcome.severity_id,
            action: outcome.action,
            action_id: outcome.action_id,
            disposition: outcome.disposition,
            disposition_id: outcome.disposition_id,
            time: end,
            time_dt: super::rfc3339(end.saturating_mul(1_000_000)),
            start_time: r.start_ms,
            end_time: end,
            duration: r.duration_ms,
            device: Device::server(hostname),
            src_endpoint: r.client.into(),
            dst_endpoint: r.target,
            http_request: r.http,
            http_response: r.status.map(|code| HttpResponse { code }),
            traffic: r.traffic,
            unmapped: r.details,
        }
    }

    /// True for an allowed request.
    pub fn allowed(&self) -> bool {
        self.action == Action::Allowed
    }
}
