//! One line of a log as the cross-check reads it, in one parse: the chain's fields for the
//! verifier and the few fields matching needs, borrowed from the line. The full typed records
//! (`ocsf::kernel`, `ocsf::proxy`) stay the home of the format; this is the cross-check's
//! projection of them, so a line is parsed once however many questions are asked of it.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use tank_ebpf_common::chain::{ChainFields, Hash, SegmentLink};
use tank_ebpf_common::ocsf::kernel::{Hook, Reason};
use tank_ebpf_common::ocsf::{class, lifecycle, Action, LogName};

/// The fields of a record the cross-check reads (absent ones are `None` or empty).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Fields<'a> {
    pub class_uid: Option<u32>,
    pub activity_id: Option<u8>,
    /// Record time, ms: the merge orders every log by it.
    pub time: Option<i64>,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub count: Option<u64>,
    pub action: Option<Action>,
    #[serde(borrow)]
    pub metadata: Metadata<'a>,
    #[serde(borrow)]
    pub device: Device<'a>,
    #[serde(borrow)]
    pub actor: Actor<'a>,
    #[serde(borrow)]
    pub src_endpoint: Endpoint<'a>,
    #[serde(borrow)]
    pub dst_endpoint: Endpoint<'a>,
    #[serde(borrow)]
    pub proxy: Endpoint<'a>,
    pub connection_info: ConnectionInfo,
    #[serde(borrow)]
    pub unmapped: Unmapped<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Metadata<'a> {
    pub sequence: Option<u64>,
    pub log_name: Option<LogName>,
    #[serde(borrow)]
    pub uid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub correlation_uid: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Device<'a> {
    #[serde(borrow)]
    pub hostname: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Actor<'a> {
    #[serde(borrow)]
    pub process: Process<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Process<'a> {
    pub pid: u32,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Endpoint<'a> {
    #[serde(borrow)]
    pub hostname: Option<Cow<'a, str>>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl Endpoint<'_> {
    /// Address and port, IPv4-mapped IPv6 as IPv4.
    pub fn addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip?.to_canonical(), self.port?))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ConnectionInfo {
    pub protocol_num: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Unmapped<'a> {
    #[serde(borrow)]
    pub prev: Option<Cow<'a, str>>,
    pub segment: Option<SegmentLink>,
    pub opens: Option<bool>,
    pub closes: Option<u64>,
    pub hook: Option<Hook>,
    pub reason: Option<Reason>,
    pub cookie: Option<u64>,
    #[serde(borrow)]
    pub unrecorded: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub rule: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub tunnel: Option<Cow<'a, str>>,
    pub requests: Option<u64>,
}

impl<'a> Fields<'a> {
    /// The line's fields, or why it is not a JSON object of this shape.
    pub fn parse(line: &'a [u8]) -> serde_json::Result<Self> {
        // One UTF-8 check of the whole line: parsing from `str` skips it per string.
        let text = std::str::from_utf8(line).map_err(serde::de::Error::custom)?;
        serde_json::from_str(text)
    }

    /// The chain's fields, for the verifier (`None`: not a chained record).
    pub fn chain(&mut self) -> Option<ChainFields> {
        Some(ChainFields {
            seq: self.metadata.sequence?,
            prev: self.unmapped.prev.as_deref()?.parse::<Hash>().ok()?,
            segment: self.unmapped.segment.take(),
            opens: self.unmapped.opens == Some(true),
            closes: self.unmapped.closes,
        })
    }

    /// What kind of record this is, as the cross-check sorts them.
    pub fn kind(&self) -> Kind {
        match (self.class_uid, self.metadata.log_name) {
            (Some(class::NETWORK_ACTIVITY), Some(LogName::Kernel)) => {
                if self.unmapped.unrecorded.is_some() {
                    Kind::Unrecorded
                } else {
                    Kind::Kernel
                }
            }
            (Some(class::NETWORK_ACTIVITY), Some(LogName::Proxy)) => Kind::Proxy,
            (Some(class::HTTP_ACTIVITY), Some(LogName::Proxy)) => Kind::Request,
            (Some(class::APPLICATION_LIFECYCLE), Some(log)) => Kind::Lifecycle {
                log,
                start: self.activity_id == Some(lifecycle::START),
            },
            _ => Kind::Unknown,
        }
    }
}

/// The kinds of record tank writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A kernel attempt or established connection.
    Kernel,
    /// A kernel record of attempts it could not record.
    Unrecorded,
    /// A proxy connection record.
    Proxy,
    /// A request inside an inspected tunnel.
    Request,
    /// A writer's own record (a start, a new segment, an outage).
    Lifecycle { log: LogName, start: bool },
    /// None of tank's.
    Unknown,
}
