//! The kernel audit log's records, shaped after OCSF so a SIEM takes them as they are.
//!
//! Connection attempts are OCSF Network Activity (class 4001); the loader's own start and the
//! removal of enforcement are Application Lifecycle (class 6002). Both go through the same hash
//! chain (`tank_ebpf_common::chain`). docs/audit-format.md documents every field.

use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use tank_ebpf_common::event::{hook, reason, verdict, Event};
use tank_ebpf_common::settings::mode;
use time::OffsetDateTime;

/// OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.1.0";
/// OCSF Network Activity.
pub const NETWORK_ACTIVITY: u32 = 4001;
/// OCSF Application Lifecycle.
pub const APPLICATION_LIFECYCLE: u32 = 6002;

/// One judged connection attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// 4001.
    pub class_uid: u32,
    /// 4 (Network Activity category).
    pub category_uid: u32,
    /// 1 Open (allowed), 5 Refuse (denied).
    pub activity_id: u32,
    /// class_uid * 100 + activity_id.
    pub type_uid: u32,
    /// Wall-clock time of the attempt, ms since the epoch.
    pub time: i64,
    /// The same, RFC 3339 with nanoseconds.
    pub time_dt: String,
    /// 1 Informational (allowed), 3 Medium (denied).
    pub severity_id: u32,
    /// "Allowed" or "Denied".
    pub action: String,
    /// 1 Allowed, 2 Denied.
    pub action_id: u32,
    /// "Allowed" or "Blocked".
    pub disposition: String,
    /// 1 Allowed, 2 Blocked.
    pub disposition_id: u32,
    /// Producer.
    pub metadata: Metadata,
    /// The agent host.
    pub device: Device,
    /// The process that made the attempt.
    pub actor: Actor,
    /// Local address and port, once the kernel has chosen them (TCP, after connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<NetEndpoint>,
    /// Destination.
    pub dst_endpoint: NetEndpoint,
    /// Transport.
    pub connection_info: ConnectionInfo,
    /// tank's own fields.
    pub unmapped: KernelDetails,
}

/// OCSF metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The producing program.
    pub product: Product,
    /// OCSF schema version.
    pub version: String,
    /// "kernel" for this log.
    pub log_name: String,
}

/// OCSF product.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// "tank-loader".
    pub name: String,
    /// "tank".
    pub vendor_name: String,
    /// The loader's version.
    pub version: String,
}

/// OCSF device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Host name of the agent host.
    pub hostname: String,
}

/// OCSF actor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// The process.
    pub process: Process,
}

/// OCSF process.
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

/// OCSF user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Numeric uid, as a string (OCSF's type).
    pub uid: String,
}

/// OCSF network endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetEndpoint {
    /// Address (IPv4 destinations written as IPv4 even when reached through a mapped address).
    pub ip: String,
    /// Port.
    pub port: u16,
}

/// OCSF connection info.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// IP protocol number.
    pub protocol_num: u16,
    /// "tcp", "udp" or the number.
    pub protocol_name: String,
    /// 4 or 6: the IP version of the destination.
    pub protocol_ver_id: u32,
    /// 2 Outbound.
    pub direction_id: u32,
}

/// tank's kernel fields with no OCSF home.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelDetails {
    /// connect4, connect6, sendmsg4 or sendmsg6.
    pub hook: String,
    /// Why (stable names, see tank_ebpf_common::event::reason).
    pub reason: String,
    /// "enforce" or "audit".
    pub mode: String,
    /// Socket cookie.
    pub cookie: u64,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// Real group id.
    pub gid: u32,
    /// Socket family: 2 AF_INET, 10 AF_INET6.
    pub family: u16,
    /// Socket type: 1 stream, 2 datagram, ...
    pub sock_type: u16,
    /// Kernel monotonic timestamp, ns.
    pub ktime_ns: u64,
}

/// Converts kernel monotonic nanoseconds into wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    /// Samples the offset between CLOCK_REALTIME and CLOCK_MONOTONIC now.
    pub fn now() -> Self {
        let mono =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
        let real =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).expect("CLOCK_REALTIME");
        let ns = |t: nix::sys::time::TimeSpec| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        };
        Self {
            offset_ns: ns(real) - ns(mono),
        }
    }

    /// Wall-clock time of a `bpf_ktime_get_ns()` value.
    pub fn wall(&self, ktime_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ktime_ns) + self.offset_ns)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// Shared fields of every record this loader writes.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Agent host name.
    pub hostname: String,
}

impl Origin {
    fn metadata(&self) -> Metadata {
        Metadata {
            product: Product {
                name: "tank-loader".into(),
                vendor_name: "tank".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            version: OCSF_VERSION.into(),
            log_name: "kernel".into(),
        }
    }

    /// The record of one kernel event.
    pub fn network_record(&self, event: &Event, clock: &Clock) -> NetworkRecord {
        let when = clock.wall(event.ktime_ns);
        let allowed = event.verdict == verdict::ALLOW;
        let (dst_ip, version) = display_ip(event.dst_addr);
        let activity_id = if allowed { 1 } else { 5 };
        NetworkRecord {
            class_uid: NETWORK_ACTIVITY,
            category_uid: 4,
            activity_id,
            type_uid: NETWORK_ACTIVITY * 100 + activity_id,
            time: (when.unix_timestamp_nanos() / 1_000_000) as i64,
            time_dt: rfc3339(when),
            severity_id: if allowed { 1 } else { 3 },
            action: if allowed { "Allowed" } else { "Denied" }.into(),
            action_id: if allowed { 1 } else { 2 },
            disposition: if allowed { "Allowed" } else { "Blocked" }.into(),
            disposition_id: if allowed { 1 } else { 2 },
            metadata: self.metadata(),
            device: Device {
                hostname: self.hostname.clone(),
            },
            actor: Actor {
                process: Process {
                    pid: event.tgid,
                    tid: event.pid,
                    name: comm(&event.comm),
                    user: User {
                        uid: event.uid.to_string(),
                    },
                },
            },
            src_endpoint: (event.src_port != 0).then(|| NetEndpoint {
                ip: display_ip(event.src_addr).0,
                port: event.src_port,
            }),
            dst_endpoint: NetEndpoint {
                ip: dst_ip,
                port: event.dst_port,
            },
            connection_info: ConnectionInfo {
                protocol_num: event.protocol,
                protocol_name: match event.protocol {
                    6 => "tcp".into(),
                    17 => "udp".into(),
                    n => n.to_string(),
                },
                protocol_ver_id: version,
                // OCSF: 1 inbound (someone connected into the agent), 2 outbound.
                direction_id: if matches!(event.hook, hook::ACCEPTED | hook::INBOUND) {
                    1
                } else {
                    2
                },
            },
            unmapped: KernelDetails {
                hook: hook::name(event.hook).into(),
                reason: reason::name(event.reason).into(),
                mode: if u32::from(event.mode) == mode::AUDIT {
                    "audit"
                } else {
                    "enforce"
                }
                .into(),
                cookie: event.cookie,
                cgroup_id: event.cgroup_id,
                gid: event.gid,
                family: event.family,
                sock_type: event.sock_type,
                ktime_ns: event.ktime_ns,
            },
        }
    }

    /// An OCSF Application Lifecycle record (activity 2 Remove, 3 Start) about enforcement.
    pub fn lifecycle_record(
        &self,
        activity_id: u32,
        message: String,
        details: serde_json::Value,
    ) -> serde_json::Value {
        let now = OffsetDateTime::now_utc();
        serde_json::json!({
            "class_uid": APPLICATION_LIFECYCLE,
            "category_uid": 6,
            "activity_id": activity_id,
            "type_uid": APPLICATION_LIFECYCLE * 100 + activity_id,
            "time": (now.unix_timestamp_nanos() / 1_000_000) as i64,
            "time_dt": rfc3339(now),
            "severity_id": if activity_id == 2 { 4 } else { 1 },
            "message": message,
            "app": { "name": "tank-loader", "vendor_name": "tank", "version": env!("CARGO_PKG_VERSION") },
            "metadata": self.metadata(),
            "device": { "hostname": self.hostname },
            "unmapped": details,
        })
    }
}

/// OCSF Application Lifecycle activity: Start.
pub const ACTIVITY_START: u32 = 3;
/// OCSF Application Lifecycle activity: Remove.
pub const ACTIVITY_REMOVE: u32 = 2;

/// IPv4-mapped addresses are shown as IPv4 (version 4); everything else as IPv6.
fn display_ip(addr: [u8; 16]) -> (String, u32) {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => (IpAddr::V4(v4).to_string(), 4),
        None => (v6.to_string(), 6),
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tank_ebpf_common::allow::ipv4_mapped;

    fn event() -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            ktime_ns: 1_000,
            cookie: 77,
            cgroup_id: 9,
            pid: 101,
            tgid: 100,
            uid: 1000,
            gid: 1000,
            comm,
            dst_addr: ipv4_mapped([192, 0, 2, 1]),
            src_addr: [0; 16],
            dst_port: 443,
            src_port: 0,
            family: 10,
            sock_type: 1,
            protocol: 6,
            hook: hook::CONNECT6,
            verdict: verdict::DENY,
            reason: reason::NOT_LISTED,
            mode: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn a_denied_mapped_connect_reads_as_ipv4_refusal() {
        let r = Origin {
            hostname: "h".into(),
        }
        .network_record(
            &event(),
            &Clock {
                offset_ns: 1_700_000_000_000_000_000,
            },
        );
        assert_eq!(
            (
                r.activity_id,
                r.type_uid,
                r.action.as_str(),
                r.disposition_id
            ),
            (5, 400105, "Denied", 2)
        );
        assert_eq!(
            (r.dst_endpoint.ip.as_str(), r.dst_endpoint.port),
            ("192.0.2.1", 443)
        );
        assert_eq!(r.connection_info.protocol_ver_id, 4);
        assert_eq!(
            (
                r.actor.process.pid,
                r.actor.process.tid,
                r.actor.process.name.as_str()
            ),
            (100, 101, "curl")
        );
        assert_eq!(
            (r.unmapped.hook.as_str(), r.unmapped.reason.as_str()),
            ("connect6", "not_listed")
        );
        assert_eq!(r.time, 1_700_000_000_000);
        assert!(r.src_endpoint.is_none());
        let back: NetworkRecord =
            serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn ipv6_destinations_stay_ipv6() {
        let mut e = event();
        e.dst_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let r = Origin {
            hostname: "h".into(),
        }
        .network_record(&e, &Clock::now());
        assert_eq!(
            (
                r.dst_endpoint.ip.as_str(),
                r.connection_info.protocol_ver_id
            ),
            ("2001:db8::1", 6)
        );
    }
}
