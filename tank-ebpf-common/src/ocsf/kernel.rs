//! The kernel log's records: one Network Activity record per kernel event, and the loader's
//! Application Lifecycle records.
//!
//! The drain writes Network Activity records at ring-buffer speed, so [`Formatter`] writes
//! their JSON straight into the chain's line buffer: no intermediate value, no allocation per
//! record. [`NetworkRecord`] is the same record as a type, for readers; a test holds the two
//! together field by field, so a field renamed on one side fails `cargo test`.

use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    class, protocol, ConnectionInfo, Device, Endpoint, LogName, Metadata, Outcome, Product,
    DEVICE_TYPE_SERVER, DIRECTION_INBOUND, DIRECTION_OUTBOUND, PROFILES, VERSION,
};
use crate::chain::Link;
use crate::counters;
use crate::event::{hook, reason, verdict, Event};
use crate::settings::mode;

/// The product name of the kernel log's writer.
pub const PRODUCT: &str = "tank-loader";

/// One kernel event: an attempt judged (connect, sendmsg, socket creation) or an established
/// TCP connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Producer, schema version, `log_name` `kernel`.
    pub metadata: Metadata,
    /// [`class::NETWORK_ACTIVITY`].
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// Open (allowed) or Refuse (denied): [`Outcome`].
    pub activity_id: u8,
    /// class_uid * 100 + activity_id.
    pub type_uid: u32,
    /// [`Outcome`].
    pub severity_id: u8,
    /// [`Outcome`].
    pub action: super::Action,
    /// [`Outcome`].
    pub action_id: u8,
    /// [`Outcome`].
    pub disposition: super::Disposition,
    /// [`Outcome`].
    pub disposition_id: u8,
    /// Wall-clock time of the event, ms since the epoch.
    pub time: i64,
    /// The same, RFC 3339 with nanoseconds.
    pub time_dt: String,
    /// The agent host.
    pub device: Device,
    /// The process that made the attempt.
    pub actor: Actor,
    /// The agent host, with the local address and port once the kernel has chosen them.
    pub src_endpoint: Endpoint,
    /// The destination.
    pub dst_endpoint: Endpoint,
    /// Transport.
    pub connection_info: ConnectionInfo,
    /// tank's kernel fields.
    pub unmapped: KernelDetails,
}

impl NetworkRecord {
    /// True for an allowed attempt (or established connection).
    pub fn allowed(&self) -> bool {
        self.action == super::Action::Allowed
    }
}

/// OCSF `actor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// The process.
    pub process: Process,
}

/// OCSF `process`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Process {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Task name (comm).
    pub name: String,
    /// Real user.
    pub user: User,
}

/// OCSF `user`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Numeric uid, as a string (OCSF's type).
    pub uid: String,
}

/// The kernel's fields with no OCSF attribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelDetails {
    /// Which program judged (names from [`crate::event::hook`]).
    pub hook: Hook,
    /// Why (names from [`crate::event::reason`]).
    pub reason: Reason,
    /// Mode in force.
    pub mode: Mode,
    /// Socket cookie: ties the records of one socket together.
    pub cookie: u64,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// Real group id.
    pub gid: u32,
    /// Socket family: 2 AF_INET, 10 AF_INET6, ...
    pub family: u16,
    /// Socket type: 1 stream, 2 datagram, 3 raw, ...
    pub sock_type: u16,
    /// Kernel monotonic timestamp, ns.
    pub ktime_ns: u64,
    /// Position in the kernel's ring buffer just after this event: a restarted loader skips
    /// what the log already holds by it, so each event is written once.
    pub ring_pos: u64,
}

/// A hook code, written by its stable name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hook(pub u8);

/// A reason code, written by its stable name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason(pub u8);

macro_rules! by_name {
    ($ty:ident, $module:ident, $what:literal) => {
        impl $ty {
            /// The stable name.
            pub fn as_str(self) -> &'static str {
                $module::name(self.0)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $module::code(&name).map($ty).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", $what, " `{}`"), name))
                })
            }
        }
    };
}
by_name!(Hook, hook, "hook");
by_name!(Reason, reason, "reason");

/// The mode in force when the kernel judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Everything is allowed and recorded.
    Audit,
}

impl Mode {
    /// The mode of an event's `mode` byte.
    pub fn of(code: u8) -> Self {
        if u32::from(code) == mode::AUDIT {
            Mode::Audit
        } else {
            Mode::Enforce
        }
    }

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// An Application Lifecycle record about enforcement (the loader's start, `detach`) or about
/// a log itself (an outage, a new segment: [`super::lifecycle::OTHER`], in either log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    /// Producer, schema version, `log_name` `kernel` (or `proxy` for the proxy's own).
    pub metadata: Metadata,
    /// [`class::APPLICATION_LIFECYCLE`].
    pub class_uid: u32,
    /// 6.
    pub category_uid: u32,
    /// [`super::lifecycle`]: Start or Remove.
    pub activity_id: u8,
    /// class_uid * 100 + activity_id.
    pub type_uid: u32,
    /// Informational (start) or High (enforcement removed).
    pub severity_id: u8,
    /// Wall-clock time, ms since the epoch.
    pub time: i64,
    /// The same, RFC 3339 with nanoseconds.
    pub time_dt: String,
    /// What happened, in a sentence.
    pub message: String,
    /// The loader.
    pub app: Product,
    /// The agent host.
    pub device: Device,
    /// What the loader did, an object (docs/audit-format.md lists the fields of each
    /// activity).
    pub unmapped: serde_json::Value,
}

impl LifecycleRecord {
    /// A lifecycle record of `activity_id` now, by the loader `version` on `hostname`.
    pub fn new(
        hostname: &str,
        version: &str,
        activity_id: u8,
        message: String,
        unmapped: serde_json::Value,
    ) -> Self {
        Self::of(
            PRODUCT,
            LogName::Kernel,
            hostname,
            version,
            activity_id,
            message,
            unmapped,
        )
    }

    /// A lifecycle record now, by `product` (at `version`, on `hostname`) in `log`.
    pub fn of(
        product: &str,
        log: LogName,
        hostname: &str,
        version: &str,
        activity_id: u8,
        message: String,
        unmapped: serde_json::Value,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let product = Product::tank(product, version);
        Self {
            metadata: Metadata::new(product.clone(), log),
            class_uid: class::APPLICATION_LIFECYCLE,
            category_uid: class::category(class::APPLICATION_LIFECYCLE),
            activity_id,
            type_uid: class::type_uid(class::APPLICATION_LIFECYCLE, activity_id),
            severity_id: if activity_id == super::lifecycle::REMOVE {
                super::severity::HIGH
            } else {
                super::severity::INFORMATIONAL
            },
            time: super::unix_ms(now),
            time_dt: super::rfc3339(now),
            message,
            app: product,
            device: Device::server(hostname),
            unmapped,
        }
    }
}

/// Attempts the kernel judged but could not record (its ring buffer was full), counted per
/// kind over an interval: a Network Activity record with OCSF's `count`, `start_time` and
/// `end_time`. The drain writes one as soon as a counter moves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnrecordedRecord {
    /// Producer, schema version, `log_name` `kernel`.
    pub metadata: Metadata,
    /// [`class::NETWORK_ACTIVITY`].
    pub class_uid: u32,
    /// 4.
    pub category_uid: u32,
    /// Refuse (denied attempts) or Open (audit mode's allowed attempts, established
    /// connections): [`Outcome`].
    pub activity_id: u8,
    /// class_uid * 100 + activity_id.
    pub type_uid: u32,
    /// [`Outcome`].
    pub severity_id: u8,
    /// [`Outcome`].
    pub action: super::Action,
    /// [`Outcome`].
    pub action_id: u8,
    /// [`Outcome`].
    pub disposition: super::Disposition,
    /// [`Outcome`].
    pub disposition_id: u8,
    /// When the drain saw the counter move, ms since the epoch (= `end_time`).
    pub time: i64,
    /// The same, RFC 3339.
    pub time_dt: String,
    /// How many attempts of this kind went unrecorded in the interval.
    pub count: u64,
    /// The previous look at the counter, ms; absent when this loader has not looked before
    /// (the attempts then happened since the previous loader's last look).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<i64>,
    /// This look, ms.
    pub end_time: i64,
    /// What happened, in a sentence.
    pub message: String,
    /// The agent host.
    pub device: Device,
    /// The agent host.
    pub src_endpoint: Endpoint,
    /// Unknown: the kernel kept no record of the destinations (`name` `unknown`).
    pub dst_endpoint: Endpoint,
    /// Which counter moved and where things stand.
    pub unmapped: UnrecordedDetails,
}

/// The counters behind an [`UnrecordedRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnrecordedDetails {
    /// The counter that moved (`unrecorded_denied`, `unrecorded_allowed`,
    /// `unrecorded_established`: [`crate::counters::NAMES`]).
    pub unrecorded: Counter,
    /// Every unrecorded counter's total so far, by name, summed over CPUs: what the log has
    /// now accounted for.
    pub totals: UnrecordedTotals,
    /// The ring buffer position the drain had read to.
    pub ring_pos: u64,
}

/// The kernel's unrecorded counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnrecordedTotals {
    /// `counters::UNRECORDED_DENIED`.
    pub unrecorded_denied: u64,
    /// `counters::UNRECORDED_ALLOWED`.
    pub unrecorded_allowed: u64,
    /// `counters::UNRECORDED_ESTABLISHED`.
    pub unrecorded_established: u64,
}

impl UnrecordedTotals {
    /// Each counter with its slot.
    pub fn by_slot(&self) -> [(u32, u64); 3] {
        [
            (counters::UNRECORDED_DENIED, self.unrecorded_denied),
            (counters::UNRECORDED_ALLOWED, self.unrecorded_allowed),
            (
                counters::UNRECORDED_ESTABLISHED,
                self.unrecorded_established,
            ),
        ]
    }
}

/// A counter slot, written by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Counter(pub u32);

impl Counter {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        counters::NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("unknown")
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Counter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let slot = counters::NAMES.iter().position(|n| *n == name);
        slot.map(|s| Counter(s as u32))
            .ok_or_else(|| serde::de::Error::custom(format!("unknown counter `{name}`")))
    }
}

impl UnrecordedRecord {
    /// True for attempts that went ahead (audit mode, established connections).
    pub fn allowed(&self) -> bool {
        self.action == super::Action::Allowed
    }

    /// The record of `count` more attempts behind `counter` between `since_ms` (if known) and
    /// `unix_ns`,
    /// by loader `version` on `hostname`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hostname: &str,
        version: &str,
        counter: u32,
        count: u64,
        since_ms: Option<i64>,
        unix_ns: i64,
        totals: UnrecordedTotals,
        ring_pos: u64,
    ) -> Self {
        let outcome = Outcome::of(counter != counters::UNRECORDED_DENIED);
        let what = match counter {
            counters::UNRECORDED_DENIED => "attempts denied",
            counters::UNRECORDED_ALLOWED => "attempts allowed (audit mode)",
            _ => "established connections",
        };
        let now = super::unix_ms(unix_ns);
        Self {
            metadata: Metadata::new(Product::tank(PRODUCT, version), LogName::Kernel),
            class_uid: class::NETWORK_ACTIVITY,
            category_uid: class::category(class::NETWORK_ACTIVITY),
            activity_id: outcome.activity_id,
            type_uid: class::type_uid(class::NETWORK_ACTIVITY, outcome.activity_id),
            severity_id: super::severity::HIGH,
            action: outcome.action,
            action_id: outcome.action_id,
            disposition: outcome.disposition,
            disposition_id: outcome.disposition_id,
            time: now,
            time_dt: super::rfc3339(unix_ns),
            count,
            start_time: since_ms,
            end_time: now,
            message: format!("{count} {what} with no record: the kernel's ring buffer was full"),
            device: Device::server(hostname),
            src_endpoint: Endpoint {
                hostname: Some(hostname.to_owned()),
                ..Endpoint::default()
            },
            dst_endpoint: Endpoint::unknown(),
            unmapped: UnrecordedDetails {
                unrecorded: Counter(counter),
                totals,
                ring_pos,
            },
        }
    }
}

/// Writes kernel events as chained Network Activity lines, allocation-free.
///
/// What is the same in every record (metadata, device, the agent host as source) is rendered
/// once, at construction.
#[derive(Clone, Debug)]
pub struct Formatter {
    /// `"version":...,"log_name":"kernel"},"class_uid":4001,"category_uid":4,`
    metadata_tail: Vec<u8>,
    /// `,"device":{...},"actor":{"process":{"pid":`
    device: Vec<u8>,
    /// `"src_endpoint":{"hostname":"..."`
    src_host: Vec<u8>,
}

impl Formatter {
    /// A formatter for records of loader `version` on the agent host `hostname`.
    pub fn new(hostname: &str, version: &str) -> Self {
        let mut metadata_tail = Vec::new();
        write!(metadata_tail, r#","version":"{VERSION}","profiles":["#).unwrap();
        for (i, p) in PROFILES.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(metadata_tail, r#"{sep}"{p}""#).unwrap();
        }
        metadata_tail.extend_from_slice(br#"],"product":{"name":""#);
        metadata_tail.extend_from_slice(PRODUCT.as_bytes());
        metadata_tail.extend_from_slice(br#"","vendor_name":""#);
        metadata_tail.extend_from_slice(super::VENDOR.as_bytes());
        metadata_tail.extend_from_slice(br#"","version":"#);
        write_str(&mut metadata_tail, version.as_bytes());
        write!(
            metadata_tail,
            r#"}},"log_name":"kernel"}},"class_uid":{},"category_uid":{},"#,
            class::NETWORK_ACTIVITY,
            class::category(class::NETWORK_ACTIVITY)
        )
        .unwrap();
        let mut device = Vec::new();
        device.extend_from_slice(br#","device":{"hostname":"#);
        write_str(&mut device, hostname.as_bytes());
        write!(
            device,
            r#","type_id":{DEVICE_TYPE_SERVER}}},"actor":{{"process":{{"pid":"#
        )
        .unwrap();
        let mut src_host = Vec::new();
        src_host.extend_from_slice(br#","src_endpoint":{"hostname":"#);
        write_str(&mut src_host, hostname.as_bytes());
        Self {
            metadata_tail,
            device,
            src_host,
        }
    }

    /// Appends the record of `event`, read from the ring buffer up to `ring_pos`, at
    /// wall-clock `unix_ns`, chained by `link`, to `out` (without a newline).
    pub fn write(
        &self,
        out: &mut Vec<u8>,
        link: Link<'_>,
        event: &Event,
        unix_ns: i64,
        ring_pos: u64,
    ) {
        let outcome = Outcome::of(event.verdict == verdict::ALLOW);
        out.extend_from_slice(br#"{"metadata":{"sequence":"#);
        push_u64(out, link.seq);
        out.extend_from_slice(&self.metadata_tail);
        let activity = outcome.activity_id;
        out.extend_from_slice(br#""activity_id":"#);
        push_u64(out, activity.into());
        out.extend_from_slice(br#","type_uid":"#);
        push_u64(
            out,
            class::type_uid(class::NETWORK_ACTIVITY, activity).into(),
        );
        out.extend_from_slice(br#","severity_id":"#);
        push_u64(out, outcome.severity_id.into());
        out.extend_from_slice(br#","action":""#);
        out.extend_from_slice(outcome.action.as_str().as_bytes());
        out.extend_from_slice(br#"","action_id":"#);
        push_u64(out, outcome.action_id.into());
        out.extend_from_slice(br#","disposition":""#);
        out.extend_from_slice(outcome.disposition.as_str().as_bytes());
        out.extend_from_slice(br#"","disposition_id":"#);
        push_u64(out, outcome.disposition_id.into());
        out.extend_from_slice(br#","time":"#);
        push_i64(out, super::unix_ms(unix_ns));
        out.extend_from_slice(br#","time_dt":""#);
        super::write_rfc3339(out, unix_ns);
        out.push(b'"');
        out.extend_from_slice(&self.device);
        push_u64(out, event.tgid.into());
        out.extend_from_slice(br#","tid":"#);
        push_u64(out, event.pid.into());
        out.extend_from_slice(br#","name":"#);
        let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(16);
        write_str(out, &event.comm[..comm_len]);
        out.extend_from_slice(br#","user":{"uid":""#);
        push_u64(out, event.uid.into());
        out.extend_from_slice(br#""}}}"#);
        out.extend_from_slice(&self.src_host);
        if event.src_port != 0 {
            out.extend_from_slice(br#","ip":""#);
            write_ip(out, event.src_addr);
            out.extend_from_slice(br#"","port":"#);
            push_u64(out, event.src_port.into());
        }
        out.extend_from_slice(br#"},"dst_endpoint":{"ip":""#);
        let version = write_ip(out, event.dst_addr);
        out.extend_from_slice(br#"","port":"#);
        push_u64(out, event.dst_port.into());
        out.extend_from_slice(br#"},"connection_info":{"protocol_num":"#);
        push_u64(out, event.protocol.into());
        out.extend_from_slice(br#","protocol_name":""#);
        match protocol::name(event.protocol) {
            Some(name) => out.extend_from_slice(name.as_bytes()),
            None => push_u64(out, event.protocol.into()),
        }
        out.extend_from_slice(br#"","protocol_ver_id":"#);
        push_u64(out, version.into());
        out.extend_from_slice(br#","direction_id":"#);
        let direction = if matches!(event.hook, hook::ACCEPTED | hook::INBOUND) {
            DIRECTION_INBOUND
        } else {
            DIRECTION_OUTBOUND
        };
        push_u64(out, direction.into());
        out.extend_from_slice(br#"},"unmapped":{"prev":""#);
        out.extend_from_slice(&link.prev.hex());
        out.extend_from_slice(br#"","hook":""#);
        out.extend_from_slice(hook::name(event.hook).as_bytes());
        out.extend_from_slice(br#"","reason":""#);
        out.extend_from_slice(reason::name(event.reason).as_bytes());
        out.extend_from_slice(br#"","mode":""#);
        out.extend_from_slice(Mode::of(event.mode).as_str().as_bytes());
        out.extend_from_slice(br#"","cookie":"#);
        push_u64(out, event.cookie);
        out.extend_from_slice(br#","cgroup_id":"#);
        push_u64(out, event.cgroup_id);
        out.extend_from_slice(br#","gid":"#);
        push_u64(out, event.gid.into());
        out.extend_from_slice(br#","family":"#);
        push_u64(out, event.family.into());
        out.extend_from_slice(br#","sock_type":"#);
        push_u64(out, event.sock_type.into());
        out.extend_from_slice(br#","ktime_ns":"#);
        push_u64(out, event.ktime_ns);
        out.extend_from_slice(br#","ring_pos":"#);
        push_u64(out, ring_pos);
        out.extend_from_slice(b"}}");
    }
}

/// Appends `ip` (IPv4-mapped as IPv4); returns the IP version written.
fn write_ip(out: &mut Vec<u8>, addr: [u8; 16]) -> u8 {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, octet.into());
            }
            4
        }
        None => {
            // Display of an address writes into the Vec without allocating.
            write!(out, "{}", IpAddr::V6(v6)).expect("write to Vec");
            6
        }
    }
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// Appends `bytes` as a JSON string: quotes, backslashes and control characters escaped,
/// bytes that are not UTF-8 replaced by U+FFFD (a task name is any 15 bytes).
fn write_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for chunk in bytes.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0..=0x1f => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Hash;

    fn line(event: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        let prev = Hash::GENESIS;
        let link = Link {
            seq: 7,
            prev: &prev,
        };
        Formatter::new("h\"ost", "0.1.0").write(
            &mut out,
            link,
            event,
            1_800_000_000_000_000_001,
            4096,
        );
        serde_json::from_slice(&out).expect("the formatter writes JSON")
    }

    /// The formatted line, read as a [`NetworkRecord`] and written back by serde, is the same
    /// JSON: every field the formatter writes is a field of the type and the other way round.
    fn round_trip(event: &Event) -> NetworkRecord {
        let mut written = line(event);
        let record = NetworkRecord::deserialize(&written).expect("reads as NetworkRecord");
        // The chain's fields belong to the chain, not to the record type.
        assert_eq!(written["metadata"]["sequence"], 7);
        written["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("sequence");
        written["unmapped"].as_object_mut().unwrap().remove("prev");
        assert_eq!(serde_json::to_value(&record).unwrap(), written);
        record
    }

    #[test]
    fn a_denied_mapped_connect_reads_as_an_ipv4_refusal() {
        let r = round_trip(&Event::EXAMPLE);
        assert_eq!(
            (r.activity_id, r.type_uid, r.action, r.disposition_id),
            (5, 400105, super::super::Action::Denied, 2)
        );
        assert_eq!(r.dst_endpoint.addr().unwrap().to_string(), "192.0.2.1:443");
        assert_eq!(r.connection_info.protocol_ver_id, Some(4));
        assert_eq!(
            (
                r.actor.process.pid,
                r.actor.process.tid,
                r.actor.process.name.as_str()
            ),
            (100, 101, "curl")
        );
        assert_eq!(
            (r.unmapped.hook, r.unmapped.reason),
            (Hook(hook::CONNECT6), Reason(reason::NOT_LISTED))
        );
        assert_eq!(
            (r.time, r.time_dt.as_str()),
            (1_800_000_000_000, "2027-01-15T08:00:00.000000001Z")
        );
        assert_eq!(r.src_endpoint.hostname.as_deref(), Some("h\"ost"));
        assert_eq!(r.src_endpoint.addr(), None);
        assert_eq!(r.device.type_id, DEVICE_TYPE_SERVER);
    }

    #[test]
    fn every_hook_reason_and_verdict_round_trips() {
        for &(h, _) in hook::NAMES {
            for &(why, _) in reason::NAMES {
                for v in [verdict::ALLOW, verdict::DENY] {
                    let mut e = Event::EXAMPLE;
                    (e.hook, e.reason, e.verdict, e.mode) = (h, why, v, mode::AUDIT as u8);
                    let r = round_trip(&e);
                    assert_eq!((r.unmapped.hook.0, r.unmapped.reason.0), (h, why));
                    assert_eq!(r.allowed(), v == verdict::ALLOW);
                    assert_eq!(r.unmapped.mode, Mode::Audit);
                }
            }
        }
    }

    #[test]
    fn ipv6_local_ends_odd_names_and_other_protocols_round_trip() {
        let mut e = Event::EXAMPLE;
        e.dst_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        e.src_addr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        (e.src_port, e.protocol) = (40000, 132);
        e.comm = *b"a\"b\\c\x01\xff\xfeend\0\0\0\0\0";
        let r = round_trip(&e);
        assert_eq!(
            r.dst_endpoint.addr().unwrap().to_string(),
            "[2001:db8::1]:443"
        );
        assert_eq!(
            r.src_endpoint.addr().unwrap().to_string(),
            "[2001:db8::2]:40000"
        );
        assert_eq!(r.connection_info.protocol_name, "132");
        assert_eq!(r.actor.process.name, "a\"b\\c\u{1}\u{fffd}\u{fffd}end");
    }

    #[test]
    fn unknown_names_do_not_read() {
        let mut v = line(&Event::EXAMPLE);
        v["unmapped"]["hook"] = "connect9".into();
        let e = NetworkRecord::deserialize(&v).unwrap_err().to_string();
        assert!(e.contains("unknown hook `connect9`"), "{e}");
    }
}
