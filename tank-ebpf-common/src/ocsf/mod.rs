//! The audit record: what tank hands an auditor, in OCSF, declared once for both logs.
//!
//! Both chained logs (the kernel log written by `tank-loader`, the proxy log written by
//! `egress-proxy`) hold OCSF [`VERSION`] events. This module is their one home: the OCSF
//! constants, the shared objects of the envelope ([`Metadata`], [`Product`], [`Device`],
//! [`Endpoint`], [`ConnectionInfo`]), the mapping of tank's allowed/denied decision onto
//! OCSF's activity, action, disposition and severity ([`Outcome`]), and one type per record
//! kind. Writers build these types (the kernel drain formats the same fields directly, see
//! [`kernel::write`]); readers (`trace`, `audit cross-check`, tests) get them back through
//! [`parse`] and match typed fields and constants, never strings.
//!
//! Every field a record holds is either an OCSF attribute of its class (with the profiles in
//! [`PROFILES`]) or lives under `unmapped`: tank's own details and the chain's `prev`. The
//! chain's sequence number is OCSF's `metadata.sequence`. Each writer's tests validate every
//! kind it writes against the official OCSF JSON Schema (docs/audit-format.md).
//!
//! # Adding a record kind
//! 1. Give it a type here (or in [`kernel`]/[`proxy`]), using the envelope objects and, for a
//!    decision, [`Outcome`]; its own fields go in an `unmapped` struct.
//! 2. Give it a variant in [`Kind`] and a rule in [`parse`] (by `class_uid`, `metadata.log_name`
//!    and, if two kinds share a class, a field of `unmapped`).
//! 3. Add a sample of every variant of it to the writer's OCSF validation test
//!    (tank-loader/tests/kernel_ocsf.rs or egress-proxy/tests/proxy_ocsf.rs) and its fields to
//!    docs/audit-format.md.
//!
//! Why OCSF 1.1.0: it is the version SIEM pipelines take most widely (AWS Security Lake's
//! custom sources among them), and every class tank writes (Network Activity, HTTP Activity,
//! Application Lifecycle) has in it the attributes tank needs.

pub mod kernel;
pub mod proxy;
#[cfg(feature = "ocsf-validate")]
pub mod validate;

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The OCSF schema version of every record.
pub const VERSION: &str = "1.1.0";

/// The OCSF profiles the records use: `host` (`device`, `actor`), `security_control`
/// (`action`, `disposition`) and `datetime` (`time_dt`). Written in `metadata.profiles`.
pub const PROFILES: [&str; 3] = ["host", "security_control", "datetime"];

/// tank, as OCSF's `product.vendor_name`.
pub const VENDOR: &str = "tank";

/// OCSF event classes tank writes.
pub mod class {
    /// Network Activity: connection attempts, established connections, proxied connections.
    pub const NETWORK_ACTIVITY: u32 = 4001;
    /// HTTP Activity.
    pub const HTTP_ACTIVITY: u32 = 4002;
    /// Application Lifecycle: the loader's start and the removal of enforcement.
    pub const APPLICATION_LIFECYCLE: u32 = 6002;

    /// The category of a class (its thousands).
    pub const fn category(class: u32) -> u32 {
        class / 1000
    }

    /// OCSF `type_uid`: class * 100 + activity.
    pub const fn type_uid(class: u32, activity_id: u8) -> u32 {
        class * 100 + activity_id as u32
    }
}

/// Network Activity (4001) activities.
pub mod network_activity {
    /// A connection opened (or was allowed to).
    pub const OPEN: u8 = 1;
    /// A connection closed.
    pub const CLOSE: u8 = 2;
    /// A connection refused.
    pub const REFUSE: u8 = 5;
}

/// Application Lifecycle (6002) activities.
pub mod lifecycle {
    /// Enforcement removed (`tank-loader detach`).
    pub const REMOVE: u8 = 2;
    /// The loader started and enforcement is in place.
    pub const START: u8 = 3;
    /// About the audit log itself (`unmapped.event`): `audit_outage` (it could not be
    /// written for a while), `segment` (a new segment began), `reopened` (continued in a new
    /// file after logrotate moved it).
    pub const OTHER: u8 = 99;
}

/// OCSF `severity_id` values tank uses.
pub mod severity {
    /// Informational.
    pub const INFORMATIONAL: u8 = 1;
    /// Medium.
    pub const MEDIUM: u8 = 3;
    /// High.
    pub const HIGH: u8 = 4;
}

/// OCSF `device.type_id`: tank runs on servers (the agent appliance, the proxy host).
pub const DEVICE_TYPE_SERVER: u8 = 1;

/// OCSF `connection_info.direction_id`: inbound (a connection someone opened into the agent).
pub const DIRECTION_INBOUND: u8 = 1;
/// OCSF `connection_info.direction_id`: outbound.
pub const DIRECTION_OUTBOUND: u8 = 2;

/// IP protocol numbers the readers compare against.
pub mod protocol {
    /// TCP.
    pub const TCP: u16 = 6;
    /// UDP.
    pub const UDP: u16 = 17;

    /// OCSF `protocol_name`: `tcp`, `udp`, or `None` for the number alone.
    pub fn name(num: u16) -> Option<&'static str> {
        match num {
            TCP => Some("tcp"),
            UDP => Some("udp"),
            _ => None,
        }
    }
}

/// OCSF `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// `action_id` 1.
    Allowed,
    /// `action_id` 2.
    Denied,
}

impl Action {
    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allowed => "Allowed",
            Action::Denied => "Denied",
        }
    }
}

/// OCSF `disposition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Disposition {
    /// `disposition_id` 1.
    Allowed,
    /// `disposition_id` 2.
    Blocked,
}

impl Disposition {
    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Allowed => "Allowed",
            Disposition::Blocked => "Blocked",
        }
    }
}

/// How an allowed or denied decision reads in OCSF: the one mapping, for every record with a
/// decision (kernel attempts, proxied connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Network Activity: Open (allowed) or Refuse (denied).
    pub activity_id: u8,
    /// `Allowed` / `Denied`.
    pub action: Action,
    /// 1 / 2.
    pub action_id: u8,
    /// `Allowed` / `Blocked`.
    pub disposition: Disposition,
    /// 1 / 2.
    pub disposition_id: u8,
    /// Informational (allowed) / Medium (denied).
    pub severity_id: u8,
}

impl Outcome {
    /// An allowed attempt.
    pub const ALLOWED: Outcome = Outcome {
        activity_id: network_activity::OPEN,
        action: Action::Allowed,
        action_id: 1,
        disposition: Disposition::Allowed,
        disposition_id: 1,
        severity_id: severity::INFORMATIONAL,
    };
    /// A denied attempt.
    pub const DENIED: Outcome = Outcome {
        activity_id: network_activity::REFUSE,
        action: Action::Denied,
        action_id: 2,
        disposition: Disposition::Blocked,
        disposition_id: 2,
        severity_id: severity::MEDIUM,
    };

    /// [`Self::ALLOWED`] or [`Self::DENIED`].
    pub const fn of(allowed: bool) -> Outcome {
        if allowed {
            Self::ALLOWED
        } else {
            Self::DENIED
        }
    }
}

/// Which log a record belongs to (`metadata.log_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogName {
    /// tank-loader's kernel log.
    Kernel,
    /// egress-proxy's log.
    Proxy,
}

impl LogName {
    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            LogName::Kernel => "kernel",
            LogName::Proxy => "proxy",
        }
    }
}

/// OCSF `metadata`. The chain adds `sequence` (the record's `seq`) when it appends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`VERSION`].
    pub version: String,
    /// [`PROFILES`].
    pub profiles: Vec<String>,
    /// The writing program.
    pub product: Product,
    /// Which log.
    pub log_name: LogName,
    /// This record's id, where other records refer to it (an inspected tunnel's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The `uid` of the record this one belongs to (a request's tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_uid: Option<String>,
}

impl Metadata {
    /// The metadata of a record written by `product` into `log`.
    pub fn new(product: Product, log: LogName) -> Self {
        Self {
            version: VERSION.to_owned(),
            profiles: PROFILES.iter().map(|p| (*p).to_owned()).collect(),
            product,
            log_name: log,
            uid: None,
            correlation_uid: None,
        }
    }
}

/// OCSF `product` (also Application Lifecycle's `app`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// `tank-loader` or `egress-proxy`.
    pub name: String,
    /// [`VENDOR`].
    pub vendor_name: String,
    /// The program's version.
    pub version: String,
}

impl Product {
    /// tank's program `name` at `version`.
    pub fn tank(name: &str, version: &str) -> Self {
        Self {
            name: name.to_owned(),
            vendor_name: VENDOR.to_owned(),
            version: version.to_owned(),
        }
    }
}

/// OCSF `device`: the host that wrote the record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its host name.
    pub hostname: String,
    /// [`DEVICE_TYPE_SERVER`].
    pub type_id: u8,
}

impl Device {
    /// The server `hostname`.
    pub fn server(hostname: &str) -> Self {
        Self {
            hostname: hostname.to_owned(),
            type_id: DEVICE_TYPE_SERVER,
        }
    }
}

/// OCSF `network_endpoint` (and `network_proxy`): what is known of one end of a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name, where one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// OCSF's short name of the endpoint: `unknown` where nothing else is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Address (IPv4-mapped IPv6 written as IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Endpoint {
    /// An endpoint nothing is known of (OCSF needs some field: `name` `unknown`).
    pub fn unknown() -> Self {
        Self {
            name: Some("unknown".to_owned()),
            ..Self::default()
        }
    }

    /// Address and port, when both are known (IPv4-mapped IPv6 as IPv4).
    pub fn addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip?.to_canonical(), self.port?))
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self {
            hostname: None,
            name: None,
            ip: Some(a.ip().to_canonical()),
            port: Some(a.port()),
        }
    }
}

/// OCSF `network_connection_info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// IP protocol number (see [`protocol`]).
    pub protocol_num: u16,
    /// `tcp`, `udp`, or the number.
    pub protocol_name: String,
    /// 4 or 6, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_ver_id: Option<u8>,
    /// [`DIRECTION_OUTBOUND`], or [`DIRECTION_INBOUND`] for connections into the agent.
    pub direction_id: u8,
}

/// A record read back from either log, by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A kernel judgement (`metadata.log_name` `kernel`, Network Activity).
    Kernel(kernel::NetworkRecord),
    /// Attempts the kernel could not record (`kernel`, Network Activity with
    /// `unmapped.unrecorded`).
    Unrecorded(kernel::UnrecordedRecord),
    /// A loader lifecycle record (`kernel`, Application Lifecycle).
    Lifecycle(kernel::LifecycleRecord),
    /// A proxied connection (`proxy`, Network Activity).
    Proxy(Box<proxy::ConnectionRecord>),
    /// A request inside an inspected tunnel (`proxy`, HTTP Activity).
    Request(Box<proxy::RequestRecord>),
}

/// Why a record could not be read as one of tank's kinds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// `class_uid` or `metadata.log_name` missing or not one tank writes.
    #[error("not a tank record kind (class_uid {class_uid:?}, metadata.log_name {log_name:?})")]
    UnknownKind {
        /// What `class_uid` held.
        class_uid: Option<u64>,
        /// What `metadata.log_name` held.
        log_name: Option<String>,
    },
    /// The kind is known but a field is missing or of the wrong type.
    #[error("{0}")]
    Fields(String),
}

/// Reads one record (a whole chained line, parsed) as its kind.
pub fn parse(value: &serde_json::Value) -> Result<Kind, ParseError> {
    let class_uid = value.get("class_uid").and_then(|c| c.as_u64());
    let log_name = value.pointer("/metadata/log_name").and_then(|n| n.as_str());
    let fields = |e: serde_json::Error| ParseError::Fields(e.to_string());
    const NETWORK: Option<u64> = Some(class::NETWORK_ACTIVITY as u64);
    const LIFECYCLE: Option<u64> = Some(class::APPLICATION_LIFECYCLE as u64);
    let unrecorded = value.pointer("/unmapped/unrecorded").is_some();
    const HTTP: Option<u64> = Some(class::HTTP_ACTIVITY as u64);
    match (class_uid, log_name) {
        (NETWORK, Some("kernel")) if unrecorded => kernel::UnrecordedRecord::deserialize(value)
            .map(Kind::Unrecorded)
            .map_err(fields),
        (NETWORK, Some("kernel")) => kernel::NetworkRecord::deserialize(value)
            .map(Kind::Kernel)
            .map_err(fields),
        (LIFECYCLE, Some("kernel" | "proxy")) => kernel::LifecycleRecord::deserialize(value)
            .map(Kind::Lifecycle)
            .map_err(fields),
        (NETWORK, Some("proxy")) => proxy::ConnectionRecord::deserialize(value)
            .map(|r| Kind::Proxy(Box::new(r)))
            .map_err(fields),
        (HTTP, Some("proxy")) => proxy::RequestRecord::deserialize(value)
            .map(|r| Kind::Request(Box::new(r)))
            .map_err(fields),
        _ => Err(ParseError::UnknownKind {
            class_uid,
            log_name: log_name.map(str::to_owned),
        }),
    }
}

/// ns since the Unix epoch as OCSF `time` (ms).
pub fn unix_ms(unix_ns: i64) -> i64 {
    unix_ns.div_euclid(1_000_000)
}

/// The records of the chained log at `path`, typed, for tools that learn from a log (`policy
/// suggest`): a log that does not verify is an error naming `verifier` (the command that
/// shows the problems), never read, since what it says may have been edited. Lines that are
/// not one of tank's kinds are left out.
pub fn read_verified(path: &std::path::Path, verifier: &str) -> std::io::Result<Vec<Kind>> {
    let (report, records) = crate::chain::read(path)?;
    if !report.is_intact() {
        return Err(std::io::Error::other(format!(
            "`{}` does not verify ({} problem{}; see `{verifier}`): no policy is learnt from records that may have been edited",
            path.display(),
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        )));
    }
    Ok(records
        .iter()
        .filter_map(|r| parse(&r.value).ok())
        .collect())
}

/// Parses a time a command line names (`--since`, `--until`): RFC 3339 in UTC
/// (`2026-12-01T10:00:00Z`) or milliseconds since the epoch; ms since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        format!("`{s}` is not a time: write 2026-12-01T10:00:00Z or milliseconds since the epoch")
    };
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, clock) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (clock, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let c: Vec<i64> = clock
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3
        || c.len() != 3
        || !(1..=12).contains(&d[1])
        || !(1..=31).contains(&d[2])
        || c[0] > 23
        || c[1] > 59
        || c[2] > 60
    {
        return Err(bad());
    }
    let ms: i64 = format!("{frac:0<3}")[..3].parse().map_err(|_| bad())?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + c[0]) * 60 + c[1]) * 60_000 + c[2] * 1000 + ms)
}

/// `unix_ms` as RFC 3339 to the second (`2026-12-01T10:00:00Z`), for comments and reports.
pub fn rfc3339_secs(unix_ms: i64) -> String {
    let t = rfc3339(unix_ms.saturating_mul(1_000_000));
    match t.find('.') {
        Some(i) => format!("{}Z", &t[..i]),
        None => t,
    }
}

/// ns since the Unix epoch as OCSF `time_dt`: RFC 3339 in UTC with nanoseconds.
pub fn rfc3339(unix_ns: i64) -> String {
    let mut out = Vec::with_capacity(30);
    write_rfc3339(&mut out, unix_ns);
    String::from_utf8(out).expect("ASCII")
}

/// Appends [`rfc3339`] of `unix_ns` to `out` (no allocation).
pub fn write_rfc3339(out: &mut Vec<u8>, unix_ns: i64) {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    push_digits(out, year.clamp(0, 9999) as u64, 4);
    let parts = [
        (b'-', month, 2),
        (b'-', day, 2),
        (b'T', sod / 3600, 2),
        (b':', sod / 60 % 60, 2),
        (b':', sod % 60, 2),
        (b'.', nanos, 9),
    ];
    for (sep, n, width) in parts {
        out.push(sep);
        push_digits(out, u64::from(n), width);
    }
    out.push(b'Z');
}

/// Appends `n` as exactly `width` decimal digits (zero padded, high digits cut).
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_times_parse_and_print() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("2026-12-01T10:00:00.5Z"), Ok(1_796_119_200_500));
        assert_eq!(parse_time("1796119200500"), Ok(1_796_119_200_500));
        assert_eq!(rfc3339_secs(1_796_119_200_500), "2026-12-01T10:00:00Z");
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_800_000_000_123_456_789),
            "2027-01-15T08:00:00.123456789Z"
        );
        // A leap day, and the day after the end of February in a century year.
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339(4_107_542_400_000_000_000),
            "2100-03-01T00:00:00.000000000Z"
        );
        assert_eq!(unix_ms(1_800_000_000_123_456_789), 1_800_000_000_123);
    }

    #[test]
    fn the_decision_maps_once() {
        let (a, d) = (Outcome::of(true), Outcome::of(false));
        assert_eq!(
            (a.activity_id, a.action_id, a.disposition_id, a.severity_id),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (d.activity_id, d.action_id, d.disposition_id, d.severity_id),
            (5, 2, 2, 3)
        );
        assert_eq!(
            class::type_uid(class::NETWORK_ACTIVITY, d.activity_id),
            400105
        );
        assert_eq!(class::category(class::APPLICATION_LIFECYCLE), 6);
    }
}
