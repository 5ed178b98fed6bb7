//! The loader's configuration file (TOML) and its validation.
//!
//! Every mistake is reported as `FILE:LINE:COL: message`, pointing at the offending value, and
//! nothing is applied from a file that does not validate: a policy that does not parse must
//! never widen what the agent can reach. Unknown keys are errors, so a typo cannot silently
//! drop a restriction.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tank_ebpf_common::allow;
use toml::Spanned;

/// Where `run`, `status`, `trace` and `detach` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/tank/loader.toml";

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The agent's cgroup, as a path inside the cgroup2 hierarchy (e.g. `/tank/agent`).
    pub cgroup: PathBuf,
    /// Enforcement mode.
    pub mode: Mode,
    /// bpffs directory holding tank's pinned maps and links.
    pub pin_dir: PathBuf,
    /// The append-only kernel audit log (JSONL, hash-chained).
    pub audit_log: PathBuf,
    /// Its reserve and rotation (`[audit]`).
    pub audit: tank_ebpf_common::chain::Options,
    /// Ring buffer size in bytes.
    pub ring_buffer_bytes: u32,
    /// Every endpoint the agent may reach directly: the proxies first, then listed endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Whether the agent may create MPTCP sockets (refused at sock_create unless true).
    pub allow_mptcp: bool,
    /// Whether the BPF LSM layer is used, and whether its absence stops the loader.
    pub lsm: LsmMode,
    /// The nftables baseline.
    pub nft: NftConfig,
    /// Where `run` serves Prometheus metrics (`metrics_listen`); `None` when off.
    pub metrics_listen: Option<SocketAddr>,
}

/// `lsm`: the BPF LSM `socket_create` layer (families other than AF_UNIX, AF_INET, AF_INET6,
/// AF_NETLINK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LsmMode {
    /// Use it where the kernel loads it; where it does not, warn on every start and in `status`.
    Auto,
    /// Refuse to start without it (fail closed).
    Required,
    /// Do not load it (and remove one a previous run pinned).
    Off,
}

impl LsmMode {
    /// The value as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            LsmMode::Auto => "auto",
            LsmMode::Required => "required",
            LsmMode::Off => "off",
        }
    }
}

/// `[nft]`: the nftables baseline that rejects the agent's packets to anything not allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftConfig {
    /// Install the table (`enabled`, default true).
    pub enabled: bool,
    /// Name of tank's table in the `inet` family (`table`, default `tank`).
    pub table: String,
    /// Host UIDs of the agent's users, as inclusive ranges (`uid_range = "100000-165535"`, or a
    /// list such as `["2000", "524288-589823"]`): the agent user itself and the subordinate UIDs
    /// rootless Podman maps the container's users to. Packets of sockets owned by these users
    /// are the agent's too, wherever the socket was created.
    pub uid_ranges: Vec<(u32, u32)>,
}

/// Enforcement mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny everything not allowlisted.
    Enforce,
    /// Record everything, deny nothing (for rolling a policy out).
    Audit,
}

/// Transport protocol of an allowed endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// One destination the agent may reach without the proxy in between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// Transport.
    pub protocol: Protocol,
    /// Whether this is an egress proxy (recorded as the reason an attempt was allowed).
    pub is_proxy: bool,
}

impl Endpoint {
    /// The allow-map key and value for this endpoint.
    pub fn allow_entry(&self) -> (allow::AllowKey, u8) {
        let addr = match self.addr.ip() {
            IpAddr::V4(v4) => allow::ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let kind = if self.is_proxy {
            allow::kind::PROXY
        } else {
            allow::kind::ENDPOINT
        };
        (
            allow::AllowKey::new(addr, self.addr.port(), self.protocol.number()),
            kind,
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cgroup: Spanned<String>,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default = "default_pin_dir")]
    pin_dir: Spanned<String>,
    #[serde(default = "default_audit_log")]
    audit_log: Spanned<String>,
    #[serde(default = "default_ring")]
    ring_buffer_bytes: Spanned<u64>,
    #[serde(default)]
    proxies: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<RawEndpoint>,
    #[serde(default)]
    allow_mptcp: bool,
    #[serde(default = "default_lsm")]
    lsm: LsmMode,
    #[serde(default)]
    nft: Option<RawNft>,
    #[serde(default)]
    audit: Option<Spanned<tank_ebpf_common::chain::Settings>>,
    metrics_listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNft {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_table")]
    table: Spanned<String>,
    uid_range: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    endpoint: Spanned<String>,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    // Operators annotate why an exception exists; kept out of the kernel, read by humans.
    #[serde(default, rename = "comment")]
    _comment: Option<String>,
}

fn default_mode() -> Mode {
    Mode::Enforce
}
fn default_pin_dir() -> Spanned<String> {
    Spanned::new(0..0, "/sys/fs/bpf/tank".to_owned())
}
fn default_audit_log() -> Spanned<String> {
    Spanned::new(0..0, "/var/log/tank/kernel-audit.jsonl".to_owned())
}
fn default_ring() -> Spanned<u64> {
    Spanned::new(0..0, u64::from(tank_ebpf_common::event::DEFAULT_RING_BYTES))
}
fn default_protocol() -> Protocol {
    Protocol::Tcp
}
fn default_lsm() -> LsmMode {
    LsmMode::Auto
}
fn default_true() -> bool {
    true
}
fn default_table() -> Spanned<String> {
    Spanned::new(0..0, "tank".to_owned())
}

/// A configuration that failed to load, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let at = |span: Range<usize>, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            at(e.span().unwrap_or(0..0), message)
        })?;

        let cgroup = raw.cgroup.get_ref();
        let cgroup_path = Path::new(cgroup);
        if !cgroup.starts_with('/')
            || cgroup_path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(at(raw.cgroup.span(), format!("cgroup `{cgroup}` must be an absolute path inside the cgroup2 hierarchy, without `..` (e.g. \"/tank/agent\")")));
        }
        if cgroup_path.components().count() < 2 {
            return Err(at(
                raw.cgroup.span(),
                "cgroup must not be the root cgroup: that would cut the whole host off the network"
                    .to_owned(),
            ));
        }
        for (name, value) in [("pin_dir", &raw.pin_dir), ("audit_log", &raw.audit_log)] {
            if !value.get_ref().starts_with('/') {
                return Err(at(value.span(), format!("{name} must be an absolute path")));
            }
        }
        let ring = *raw.ring_buffer_bytes.get_ref();
        if !ring.is_power_of_two() || !(4096..=1 << 30).contains(&ring) {
            return Err(at(
                raw.ring_buffer_bytes.span(),
                format!(
                    "ring_buffer_bytes {ring} must be a power of two between 4096 and 1073741824"
                ),
            ));
        }

        let mut endpoints = Vec::new();
        let mut seen = HashSet::new();
        let proxies = raw.proxies.iter().map(|p| (p, Protocol::Tcp, true));
        let listed = raw.allow.iter().map(|a| (&a.endpoint, a.protocol, false));
        for (value, protocol, is_proxy) in proxies.chain(listed) {
            let text = value.get_ref();
            let addr: SocketAddr = text.parse().map_err(|_| {
                at(value.span(), format!("`{text}` is not an address:port (IPv6 as \"[2001:db8::1]:3128\"); names are not accepted, the kernel matches addresses"))
            })?;
            let ip = addr.ip();
            if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
                return Err(at(value.span(), format!("`{text}` cannot be an allowed endpoint (unspecified address, multicast or port 0)")));
            }
            if !seen.insert((ip_key(ip), addr.port(), protocol)) {
                return Err(at(
                    value.span(),
                    format!("`{text}` ({protocol:?}) is listed twice"),
                ));
            }
            endpoints.push(Endpoint {
                addr,
                protocol,
                is_proxy,
            });
        }
        if endpoints.len() > allow::MAX_ENTRIES as usize {
            return Err(at(
                0..0,
                format!(
                    "{} allowed endpoints exceed the kernel map's {} entries",
                    endpoints.len(),
                    allow::MAX_ENTRIES
                ),
            ));
        }

        if let Some(bad) = cgroup
            .chars()
            .find(|c| matches!(c, '"' | '\\') || c.is_control())
        {
            // The nft baseline quotes the path; such a character could not be written there.
            return Err(at(
                raw.cgroup.span(),
                format!("cgroup path contains {bad:?}, which tank does not accept"),
            ));
        }

        let raw_nft = raw.nft.unwrap_or_else(|| RawNft {
            enabled: true,
            table: default_table(),
            uid_range: None,
        });
        let table = raw_nft.table.get_ref();
        let valid_name = table.len() <= 64
            && table.starts_with(|c: char| c.is_ascii_alphabetic())
            && table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(at(raw_nft.table.span(), format!("nft table name `{table}` must start with a letter and hold only letters, digits, `_` and `-` (at most 64)")));
        }
        let uid_ranges = match &raw_nft.uid_range {
            None => Vec::new(),
            Some(value) => parse_uid_ranges(value.get_ref()).ok_or_else(|| {
                at(value.span(), format!("uid_range {} must be \"FIRST-LAST\" with FIRST <= LAST, a single UID, or a list of those (e.g. [\"2000\", \"524288-589823\"])", value.get_ref()))
            })?,
        };

        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(value) if value.get_ref() == "off" => None,
            Some(value) => match value.get_ref().parse::<SocketAddr>() {
                // The metrics describe what the agent attempts; they stay on the host unless an
                // operator puts an authenticating proxy in front.
                Ok(addr) if addr.ip().is_loopback() => Some(addr),
                _ => return Err(at(value.span(), format!("metrics_listen `{}` must be a loopback address:port (e.g. \"127.0.0.1:9465\") or \"off\"", value.get_ref()))),
            },
        };

        let audit = match &raw.audit {
            None => tank_ebpf_common::chain::Settings::default().options(),
            Some(a) => a.get_ref().options(),
        }
        .map_err(|e| {
            let span = raw.audit.as_ref().map_or(0..0, |a| a.span());
            at(span, format!("[audit]: {e}"))
        })?;

        Ok(Config {
            cgroup: cgroup_path.to_owned(),
            mode: raw.mode,
            pin_dir: PathBuf::from(raw.pin_dir.into_inner()),
            audit_log: PathBuf::from(raw.audit_log.into_inner()),
            audit,
            ring_buffer_bytes: ring as u32,
            endpoints,
            allow_mptcp: raw.allow_mptcp,
            lsm: raw.lsm,
            nft: NftConfig {
                enabled: raw_nft.enabled,
                table: raw_nft.table.into_inner(),
                uid_ranges,
            },
            metrics_listen,
        })
    }
}

/// `"FIRST-LAST"`, `"UID"`, or a non-empty list of those.
fn parse_uid_ranges(value: &toml::Value) -> Option<Vec<(u32, u32)>> {
    let one = |text: &str| -> Option<(u32, u32)> {
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
        (first <= last).then_some((first, last))
    };
    match value {
        toml::Value::String(text) => Some(vec![one(text)?]),
        toml::Value::Array(items) if !items.is_empty() => {
            items.iter().map(|item| one(item.as_str()?)).collect()
        }
        _ => None,
    }
}

/// IPv4 and its IPv4-mapped IPv6 form are the same destination to the kernel gate.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
cgroup = "/tank/agent"
mode = "audit"
pin_dir = "/sys/fs/bpf/t1"
audit_log = "/var/log/t.jsonl"
ring_buffer_bytes = 8192
proxies = ["192.0.2.10:3128", "[2001:db8::10]:3128"]
[[allow]]
endpoint = "192.0.2.53:53"
protocol = "udp"
comment = "resolver"
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Audit);
        assert_eq!(c.ring_buffer_bytes, 8192);
        assert_eq!(c.endpoints.len(), 3);
        assert!(c.endpoints[0].is_proxy && !c.endpoints[2].is_proxy);
        assert_eq!(c.endpoints[2].protocol, Protocol::Udp);
    }

    #[test]
    fn defaults_enforce_and_deny_all() {
        let c = Config::parse("cgroup = \"/a/b\"\n", "t.toml").unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert!(c.endpoints.is_empty());
        assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/tank"));
    }

    #[test]
    fn errors_point_at_the_value() {
        assert_eq!(
            err("cgroup = \"/a\"\nproxies = [\"10.0.0.1:3128\", \"proxy.example:3128\"]\n"),
            "t.toml:2:29: `proxy.example:3128` is not an address:port (IPv6 as \"[2001:db8::1]:3128\"); names are not accepted, the kernel matches addresses"
        );
        assert!(err("cgroup = \"/a\"\nmode = \"off\"\n")
            .starts_with("t.toml:2:8: unknown variant `off`"));
        assert!(
            err("cgroup = \"/a\"\nprxies = []\n").starts_with("t.toml:2:1: unknown field `prxies`")
        );
        assert!(
            err("cgroup = \"/\"\n").starts_with("t.toml:1:10: cgroup must not be the root cgroup")
        );
        assert!(err("cgroup = \"a/../b\"\n")
            .starts_with("t.toml:1:10: cgroup `a/../b` must be an absolute path"));
        assert!(err("cgroup = \"/a\"\nring_buffer_bytes = 5000\n")
            .starts_with("t.toml:2:21: ring_buffer_bytes 5000"));
        assert!(err("proxies = []\n").contains("missing field `cgroup`"));
    }

    #[test]
    fn defense_layers_default_on_and_parse() {
        let c = Config::parse("cgroup = \"/a/b\"\n", "t.toml").unwrap();
        assert_eq!((c.lsm, c.allow_mptcp), (LsmMode::Auto, false));
        assert_eq!(
            c.nft,
            NftConfig {
                enabled: true,
                table: "tank".into(),
                uid_ranges: Vec::new()
            }
        );
        let c = Config::parse(
            "cgroup = \"/a/b\"\nlsm = \"required\"\nallow_mptcp = true\n[nft]\ntable = \"tank-x_1\"\nuid_range = \"100000-165535\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!((c.lsm, c.allow_mptcp), (LsmMode::Required, true));
        assert_eq!(
            c.nft,
            NftConfig {
                enabled: true,
                table: "tank-x_1".into(),
                uid_ranges: vec![(100_000, 165_535)]
            }
        );
        assert!(
            !Config::parse("cgroup = \"/a/b\"\n[nft]\nenabled = false\n", "t")
                .unwrap()
                .nft
                .enabled
        );
    }

    #[test]
    fn defense_layer_errors_point_at_the_value() {
        assert!(err("cgroup = \"/a\"\nlsm = \"maybe\"\n")
            .starts_with("t.toml:2:7: unknown variant `maybe`"));
        assert!(err("cgroup = \"/a\"\n[nft]\ntable = \"1tank\"\n")
            .starts_with("t.toml:3:9: nft table name `1tank`"));
        assert!(err("cgroup = \"/a\"\n[nft]\ntable = \"t;flush\"\n")
            .starts_with("t.toml:3:9: nft table name"));
        assert!(err("cgroup = \"/a\"\n[nft]\nuid_range = \"5-1\"\n")
            .starts_with("t.toml:3:13: uid_range \"5-1\""));
        assert!(
            err("cgroup = \"/a\"\n[nft]\nuid_range = [\"2000\", \"x\"]\n")
                .starts_with("t.toml:3:13: uid_range [\"2000\", \"x\"]")
        );
        assert!(err("cgroup = \"/a\"\n[nft]\nuid_range = []\n")
            .starts_with("t.toml:3:13: uid_range []"));
        let c = Config::parse(
            "cgroup = \"/a\"\n[nft]\nuid_range = [\"2000\", \"524288-589823\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.nft.uid_ranges, vec![(2000, 2000), (524_288, 589_823)]);
        assert!(err("cgroup = \"/a\"\n[nft]\ntabel = \"x\"\n")
            .starts_with("t.toml:3:1: unknown field `tabel`"));
        assert!(err("cgroup = \"/a/\\\"x\"\n").starts_with("t.toml:1:10: cgroup path contains"));
    }

    #[test]
    fn metrics_are_off_unless_set_and_only_on_loopback() {
        let parse = |extra: &str| Config::parse(&format!("cgroup = \"/a\"\n{extra}"), "t.toml");
        assert_eq!(parse("").unwrap().metrics_listen, None);
        assert_eq!(
            parse("metrics_listen = \"off\"\n").unwrap().metrics_listen,
            None
        );
        assert_eq!(
            parse("metrics_listen = \"[::1]:9465\"\n")
                .unwrap()
                .metrics_listen,
            Some("[::1]:9465".parse().unwrap())
        );
        for bad in ["0.0.0.0:9465", "192.0.2.1:9465", "localhost:9465", "9465"] {
            let e = err(&format!("cgroup = \"/a\"\nmetrics_listen = \"{bad}\"\n"));
            assert!(e.starts_with("t.toml:2:18: metrics_listen"), "{bad}: {e}");
        }
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_endpoint() {
        let e = err("cgroup = \"/a\"\nproxies = [\"10.0.0.1:3128\", \"[::ffff:10.0.0.1]:3128\"]\n");
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn unusable_endpoints_are_refused() {
        for bad in ["0.0.0.0:80", "224.0.0.1:80", "10.0.0.1:0", "[::]:443"] {
            let e = err(&format!("cgroup = \"/a\"\nproxies = [\"{bad}\"]\n"));
            assert!(e.contains("cannot be an allowed endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn allow_entries_map_ipv4_into_ipv6() {
        let c = Config::parse("cgroup = \"/a\"\nproxies = [\"192.0.2.1:3128\"]\n", "t").unwrap();
        let (key, kind) = c.endpoints[0].allow_entry();
        assert_eq!(key.addr, allow::ipv4_mapped([192, 0, 2, 1]));
        assert_eq!(
            (key.port, key.protocol, kind),
            (3128, 6, allow::kind::PROXY)
        );
    }
}
