//! The TOML configuration, validated into a [`Config`] with line-precise errors.
//!
//! Every error names `FILE:LINE:COL` on one line; validation collects all problems of a
//! file rather than stopping at the first. Rules that can never apply load, with a warning
//! in the same form ([`Config::warnings`]). See docs/proxy.md for every key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use tank_ebpf_common::chain;

use crate::ca;
use crate::credentials::{Credential, Secret};
use crate::inspect::Inspection;
use crate::path::normalise_prefix;
use crate::policy::{Limits, Pattern, Policy, Ports, ResolverSettings, Rule};
use crate::target::{canonical_host, Host};

/// Default port of an `allowed_domains` entry that names none.
pub const DEFAULT_PORT: u16 = 443;
/// Default admin (metrics) listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9464";

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Proxy listeners.
    pub listen: Vec<SocketAddr>,
    /// Admin listener (`/metrics`, `/healthz`), if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// The chained audit log.
    pub audit_log: PathBuf,
    /// How the audit log keeps space in reserve and rotates (`[audit]`).
    pub audit: chain::Options,
    /// Everything a reload may change.
    pub policy: Policy,
    /// Rules that can never apply, or apply otherwise than written, one
    /// `FILE:LINE:COL: warning: ...` line each; `check`, `run` and reload print them.
    pub warnings: Vec<String>,
}

/// One problem in a configuration file, at a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

/// A configuration that failed to load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file has problems.
    #[error("{}", render(.path, .diagnostics))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order.
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(path: &Path, diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(|d| format!("{}:{}:{}: {}", path.display(), d.line, d.col, d.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path).map_err(|diagnostics| ConfigError::Invalid {
        path: path.to_owned(),
        diagnostics,
    })
}

/// Validates configuration `text`; relative paths in it are relative to `path`'s directory.
pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<Diagnostic>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
        // toml's message spans lines ("invalid array\nexpected `]`"): one line, joined.
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        vec![Diagnostic { line, col, message }]
    })?;
    let mut v = Validator {
        text,
        diags: Vec::new(),
        warnings: Vec::new(),
    };
    let mut config = v.config(raw, path);
    if v.diags.is_empty() {
        v.warnings.sort_by_key(|d| (d.line, d.col));
        config.warnings = v
            .warnings
            .iter()
            .map(|d| {
                format!(
                    "{}:{}:{}: warning: {}",
                    path.display(),
                    d.line,
                    d.col,
                    d.message
                )
            })
            .collect();
        Ok(config)
    } else {
        v.diags.sort_by_key(|d| (d.line, d.col));
        Err(v.diags)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary_compat(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

// ---- the file as written ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Spanned<Vec<Spanned<String>>>,
    admin_listen: Option<Spanned<String>>,
    client_networks: Spanned<Vec<Spanned<String>>>,
    audit_log: Spanned<String>,
    #[serde(default)]
    allowed_domains: Vec<Spanned<RuleSpec>>,
    #[serde(default)]
    denied_domains: Vec<Spanned<RuleSpec>>,
    #[serde(default)]
    system_resolver: Option<bool>,
    #[serde(default)]
    hosts: BTreeMap<Spanned<String>, Spanned<Addrs>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    resolver: RawResolver,
    #[serde(default)]
    audit: Option<Spanned<chain::Settings>>,
    tls_ports: Option<Spanned<Vec<Spanned<i64>>>>,
    inspection: Option<Spanned<RawInspection>>,
    #[serde(default)]
    credentials: Vec<Spanned<RawCredential>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInspection {
    ca_dir: Spanned<String>,
    upstream_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: Spanned<String>,
    host: Spanned<String>,
    path_prefix: Option<Spanned<String>>,
    header: Spanned<String>,
    value: Spanned<String>,
    secret_file: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    lookup_timeout_secs: Option<Spanned<f64>>,
    max_concurrent_lookups: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<Spanned<i64>>,
    header_read_timeout_secs: Option<Spanned<f64>>,
    idle_timeout_secs: Option<Spanned<f64>>,
    connect_timeout_secs: Option<Spanned<f64>>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_client: Option<Spanned<i64>>,
    shutdown_grace_secs: Option<Spanned<f64>>,
}

/// An `allowed_domains`/`denied_domains` entry: a string, or a table.
enum RuleSpec {
    Short(String),
    Full(Box<RuleTable>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    domain: Spanned<String>,
    ports: Option<Spanned<PortsSpec>>,
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    path_prefixes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    allow_private: Option<Spanned<bool>>,
    name: Option<Spanned<String>>,
    inspect: Option<Spanned<bool>>,
    opaque: Option<Spanned<bool>>,
    redact_query: Option<Spanned<bool>>,
}

impl<'de> Deserialize<'de> for RuleSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RuleSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a domain string (\"example.com\", \"*.example.com:8443\") or a table with `domain`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RuleSpec, E> {
                Ok(RuleSpec::Short(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RuleSpec, A::Error> {
                RuleTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| RuleSpec::Full(Box::new(t)))
            }
        }
        d.deserialize_any(V)
    }
}

enum PortsSpec {
    Any,
    List(Vec<i64>),
}

impl<'de> Deserialize<'de> for PortsSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortsSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of ports, or \"*\" for any port")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortsSpec, E> {
                if v == "*" {
                    Ok(PortsSpec::Any)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PortsSpec, A::Error> {
                let mut out = Vec::new();
                while let Some(p) = seq.next_element::<i64>()? {
                    out.push(p);
                }
                Ok(PortsSpec::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[hosts]` value: one address or a list.
struct Addrs(Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for Addrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Addrs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address or a list of addresses")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Addrs, E> {
                // A bare string has no span of its own here; the caller reports at the value.
                Ok(Addrs(vec![Spanned::new(0..0, v.to_owned())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Addrs, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<Spanned<String>>()? {
                    out.push(a);
                }
                Ok(Addrs(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- validation -------------------------------------------------------------------------

struct Validator<'a> {
    text: &'a str,
    diags: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = line_col(self.text, span.start);
        Diagnostic {
            line,
            col,
            message: message.into(),
        }
    }

    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.at(span, message);
        self.diags.push(d);
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.at(span, message);
        self.warnings.push(d);
    }

    /// Warns about rules that can never apply as written, or refuse more than they say.
    fn warn_rules(&mut self, allowed: &[(Rule, Range<usize>)], denied: &[(Rule, Range<usize>)]) {
        for (d, span) in denied {
            let inspected = allowed
                .iter()
                .any(|(a, _)| a.inspect && d.pattern.covered_by(&a.pattern));
            if d.is_request_level() && !inspected {
                self.warn(
                    span.clone(),
                    format!("{} judges requests (paths or methods): tunnels (HTTPS) to the hosts it names are refused, since their requests cannot be seen", d.id),
                );
            }
        }
        for (rule, span) in allowed {
            if let Some((d, _)) = denied.iter().find(|(d, _)| {
                d.methods.is_none()
                    && d.path_prefixes.is_none()
                    && rule.pattern.covered_by(&d.pattern)
                    && match (&d.ports, &rule.ports) {
                        (Ports::Any, _) => true,
                        (Ports::List(dp), Ports::List(rp)) => rp.iter().all(|p| dp.contains(p)),
                        (Ports::List(_), Ports::Any) => false,
                    }
            }) {
                self.warn(
                    span.clone(),
                    format!(
                        "{} never applies: {} denies every host and port it names",
                        rule.id, d.id
                    ),
                );
            } else if rule.path_prefixes.is_some()
                && !rule.inspect
                && matches!(&rule.ports, Ports::List(l) if l.iter().all(|&p| p == 443))
            {
                self.warn(
                    span.clone(),
                    format!("{} allows only plain-HTTP paths, yet names only port 443: HTTPS tunnels to it are refused (a tunnel's paths cannot be seen)", rule.id),
                );
            }
        }
    }

    fn config(&mut self, raw: RawConfig, path: &Path) -> Config {
        let mut listen = Vec::new();
        if raw.listen.get_ref().is_empty() {
            self.err(
                raw.listen.span(),
                "`listen` needs at least one address, e.g. [\"0.0.0.0:3128\", \"[::]:3128\"]",
            );
        }
        for a in raw.listen.get_ref() {
            match a.get_ref().parse::<SocketAddr>() {
                Ok(sa) if sa.port() != 0 && listen.contains(&sa) => {
                    self.err(a.span(), format!("`{sa}` is listed twice"))
                }
                Ok(sa) => listen.push(sa),
                Err(_) => self.err(
                    a.span(),
                    format!(
                        "`{}` is not an address:port (IPv6 in brackets: \"[::]:3128\")",
                        a.get_ref()
                    ),
                ),
            }
        }
        let admin_listen = match &raw.admin_listen {
            None => Some(DEFAULT_ADMIN.parse().expect("valid default")),
            Some(s) if s.get_ref() == "off" => None,
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(sa) if sa.port() != 0 && listen.contains(&sa) => {
                    self.err(
                        s.span(),
                        "`admin_listen` must differ from the proxy listeners",
                    );
                    None
                }
                Ok(sa) => Some(sa),
                Err(_) => {
                    self.err(
                        s.span(),
                        format!("`{}` is not an address:port, or \"off\"", s.get_ref()),
                    );
                    None
                }
            },
        };
        let mut client_networks = Vec::new();
        if raw.client_networks.get_ref().is_empty() {
            self.err(
                raw.client_networks.span(),
                "`client_networks` is empty: no agent host could use the proxy",
            );
        }
        for n in raw.client_networks.get_ref() {
            match parse_net(n.get_ref()) {
                Ok(net) => client_networks.push(net),
                Err(m) => self.err(n.span(), m),
            }
        }
        let audit_log = if raw.audit_log.get_ref().is_empty() {
            self.err(raw.audit_log.span(), "`audit_log` is empty");
            PathBuf::new()
        } else {
            let p = PathBuf::from(raw.audit_log.get_ref());
            if p.is_absolute() {
                p
            } else {
                path.parent().unwrap_or(Path::new(".")).join(p)
            }
        };
        let allowed: Vec<(Rule, Range<usize>)> = raw
            .allowed_domains
            .iter()
            .filter_map(|r| Some((self.rule(r, true)?, r.span())))
            .collect();
        let denied: Vec<(Rule, Range<usize>)> = raw
            .denied_domains
            .iter()
            .filter_map(|r| Some((self.rule(r, false)?, r.span())))
            .collect();
        self.warn_rules(&allowed, &denied);
        let allowed: Vec<Rule> = allowed.into_iter().map(|(r, _)| r).collect();
        let denied = denied.into_iter().map(|(r, _)| r).collect();
        let mut hosts = HashMap::new();
        for (name, addrs) in &raw.hosts {
            match canonical_host(name.get_ref()) {
                Ok(Host::Name(n)) => {
                    let mut ips = Vec::new();
                    if addrs.get_ref().0.is_empty() {
                        self.err(addrs.span(), format!("hosts entry `{n}` has no address"));
                    }
                    for a in &addrs.get_ref().0 {
                        let span = if a.span() == (0..0) {
                            addrs.span()
                        } else {
                            a.span()
                        };
                        match a.get_ref().parse::<IpAddr>() {
                            Ok(ip) => ips.push(ip),
                            Err(_) => {
                                self.err(span, format!("`{}` is not an IP address", a.get_ref()))
                            }
                        }
                    }
                    if hosts.insert(n.clone(), ips).is_some() {
                        self.err(name.span(), format!("hosts entry `{n}` is listed twice (names are compared canonicalised)"));
                    }
                }
                Ok(Host::Ip(_)) => {
                    self.err(name.span(), "a hosts entry must be a name, not an address")
                }
                Err(e) => self.err(name.span(), format!("hosts entry: {e}")),
            }
        }
        let limits = self.limits(&raw.limits);
        let audit = self.audit(&raw.audit);
        let resolver = self.resolver(&raw.resolver);
        let tls_ports = self.tls_ports(raw.tls_ports.as_ref());
        let inspection = self.inspection(
            raw.inspection.as_ref(),
            &raw.allowed_domains,
            &allowed,
            path,
        );
        let credentials = self.credentials(&raw.credentials, &allowed, path);
        Config {
            listen,
            admin_listen,
            audit_log,
            audit,
            policy: Policy {
                allowed,
                denied,
                client_networks,
                hosts,
                system_resolver: raw.system_resolver.unwrap_or(true),
                resolver,
                limits,
                tls_ports,
                inspection,
                credentials,
            },
            warnings: Vec::new(),
        }
    }

    fn resolver(&mut self, raw: &RawResolver) -> ResolverSettings {
        let d = ResolverSettings::default();
        let nameservers = raw.nameservers.as_ref().map(|list| {
            if list.get_ref().is_empty() {
                self.err(
                    list.span(),
                    "`nameservers` is empty; leave it out to use /etc/resolv.conf",
                );
            }
            list.get_ref()
                .iter()
                .filter_map(|a| {
                    let s = a.get_ref();
                    let parsed = s
                        .parse::<SocketAddr>()
                        .ok()
                        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
                    if parsed.is_none() {
                        self.err(a.span(), format!("`{s}` is not an address or address:port"));
                    }
                    parsed
                })
                .collect()
        });
        let lookup_timeout = match &raw.lookup_timeout_secs {
            None => d.lookup_timeout,
            Some(s) if (0.1..=60.0).contains(s.get_ref()) => Duration::from_secs_f64(*s.get_ref()),
            Some(s) => {
                self.err(
                    s.span(),
                    "`lookup_timeout_secs` must be from 0.1 to 60 seconds",
                );
                d.lookup_timeout
            }
        };
        let max_lookups = match &raw.max_concurrent_lookups {
            None => d.max_lookups,
            Some(s) if (1..=65536).contains(s.get_ref()) => *s.get_ref() as usize,
            Some(s) => {
                self.err(s.span(), "`max_concurrent_lookups` must be from 1 to 65536");
                d.max_lookups
            }
        };
        ResolverSettings {
            nameservers,
            lookup_timeout,
            max_lookups,
        }
    }

    fn audit(&mut self, raw: &Option<Spanned<chain::Settings>>) -> chain::Options {
        let Some(raw) = raw else {
            return chain::Settings::default()
                .options()
                .expect("defaults are valid");
        };
        raw.get_ref().options().unwrap_or_else(|e| {
            self.err(raw.span(), format!("[audit]: {e}"));
            chain::Options::default()
        })
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let d = Limits::default();
        let mut int =
            |v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64, default: usize| match v {
                None => default,
                Some(s) if (min..=max).contains(s.get_ref()) => *s.get_ref() as usize,
                Some(s) => {
                    self.err(s.span(), format!("`{key}` must be from {min} to {max}"));
                    default
                }
            };
        let max_header_bytes = int(
            &raw.max_header_bytes,
            "max_header_bytes",
            1024,
            1 << 20,
            d.max_header_bytes,
        );
        let max_connections = int(
            &raw.max_connections,
            "max_connections",
            1,
            1 << 20,
            d.max_connections,
        );
        let max_connections_per_client = int(
            &raw.max_connections_per_client,
            "max_connections_per_client",
            1,
            1 << 20,
            d.max_connections_per_client,
        );
        let mut secs =
            |v: &Option<Spanned<f64>>, key: &str, min: f64, max: f64, default: Duration| match v {
                None => default,
                Some(s) if (min..=max).contains(s.get_ref()) => {
                    Duration::from_secs_f64(*s.get_ref())
                }
                Some(s) => {
                    self.err(
                        s.span(),
                        format!("`{key}` must be from {min} to {max} seconds"),
                    );
                    default
                }
            };
        Limits {
            max_header_bytes,
            header_read_timeout: secs(
                &raw.header_read_timeout_secs,
                "header_read_timeout_secs",
                0.1,
                3600.0,
                d.header_read_timeout,
            ),
            idle_timeout: secs(
                &raw.idle_timeout_secs,
                "idle_timeout_secs",
                0.1,
                7.0 * 86400.0,
                d.idle_timeout,
            ),
            connect_timeout: secs(
                &raw.connect_timeout_secs,
                "connect_timeout_secs",
                0.1,
                600.0,
                d.connect_timeout,
            ),
            max_connections,
            max_connections_per_client,
            shutdown_grace: secs(
                &raw.shutdown_grace_secs,
                "shutdown_grace_secs",
                0.0,
                3600.0,
                d.shutdown_grace,
            ),
        }
    }

    fn rule(&mut self, spec: &Spanned<RuleSpec>, allow: bool) -> Option<Rule> {
        let list = if allow {
            "allowed_domains"
        } else {
            "denied_domains"
        };
        let default_ports = if allow {
            Ports::List(vec![DEFAULT_PORT])
        } else {
            Ports::Any
        };
        match spec.get_ref() {
            RuleSpec::Short(s) => {
                let (pattern, ports) = match parse_short(s) {
                    Ok(x) => x,
                    Err(m) => {
                        self.err(spec.span(), format!("{list}: {m}"));
                        return None;
                    }
                };
                let ports = ports.unwrap_or(default_ports);
                let id = format!("{list}:{}", default_name(&pattern, &ports, allow));
                Some(Rule {
                    id,
                    pattern,
                    ports,
                    methods: None,
                    path_prefixes: None,
                    allow_private: false,
                    inspect: false,
                    opaque: false,
                    redact_query: false,
                })
            }
            RuleSpec::Full(t) => {
                let before = self.diags.len();
                let pattern = match parse_pattern(t.domain.get_ref()) {
                    Ok(p) => Some(p),
                    Err(m) => {
                        self.err(t.domain.span(), format!("{list}: {m}"));
                        None
                    }
                };
                let ports = match t.ports.as_ref().map(|p| (p.span(), p.get_ref())) {
                    None => default_ports,
                    Some((_, PortsSpec::Any)) => Ports::Any,
                    Some((span, PortsSpec::List(l))) => {
                        if l.is_empty() {
                            self.err(span.clone(), "`ports` is empty; use \"*\" for any port");
                        }
                        if let Some(bad) = l.iter().find(|p| !(1..=65535).contains(*p)) {
                            self.err(span, format!("port {bad} is not from 1 to 65535"));
                        }
                        Ports::List(l.iter().map(|&p| p as u16).collect())
                    }
                };
                let methods = t.methods.as_ref().map(|m| {
                    if m.get_ref().is_empty() {
                        self.err(m.span(), "`methods` is empty: the rule would match nothing");
                    }
                    m.get_ref()
                        .iter()
                        .filter_map(|x| {
                            let up = x.get_ref().to_ascii_uppercase();
                            if !up.is_empty()
                                && up
                                    .bytes()
                                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
                            {
                                Some(up)
                            } else {
                                self.err(
                                    x.span(),
                                    format!("`{}` is not an HTTP method", x.get_ref()),
                                );
                                None
                            }
                        })
                        .collect::<Vec<_>>()
                });
                let path_prefixes = t.path_prefixes.as_ref().map(|m| {
                    if m.get_ref().is_empty() {
                        self.err(m.span(), "`path_prefixes` is empty: the rule would match nothing");
                    }
                    m.get_ref()
                        .iter()
                        .filter_map(|x| {
                            let p = x.get_ref();
                            let normal = (p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()))
                                .then(|| normalise_prefix(p).ok())
                                .flatten();
                            match normal {
                                Some(n) if &n != p => {
                                    self.warn(x.span(), format!("path prefix `{p}` is compared in normal form, as `{n}` (see docs/proxy.md)"));
                                    Some(n)
                                }
                                Some(n) => Some(n),
                                None => {
                                    self.err(x.span(), format!("path prefix `{p}` must start with `/` and hold no spaces, control characters, `?`, backslashes or malformed escapes"));
                                    None
                                }
                            }
                        })
                        .collect::<Vec<_>>()
                });
                let flag = |f: &Option<Spanned<bool>>| f.as_ref().is_some_and(|f| *f.get_ref());
                let (inspect, opaque, redact_query) =
                    (flag(&t.inspect), flag(&t.opaque), flag(&t.redact_query));
                if let Some(f) = t
                    .inspect
                    .as_ref()
                    .or(t.opaque.as_ref())
                    .or(t.redact_query.as_ref())
                {
                    if !allow && (inspect || opaque || redact_query) {
                        self.err(f.span(), "`inspect`, `opaque` and `redact_query` belong in allowed_domains rules");
                    }
                }
                if let (true, true, Some(o)) = (inspect, opaque, &t.opaque) {
                    self.err(o.span(), "a rule cannot be both `inspect` and `opaque`");
                }
                if let (true, Some(i)) = (inspect, &t.inspect) {
                    if matches!(pattern, Some(Pattern::Net(_))) {
                        self.err(i.span(), "`inspect` needs a domain: the CA mints certificates for names, never for addresses");
                    }
                }
                if let (Some(m), Some(p)) = (&methods, &t.path_prefixes) {
                    if m.iter().all(|x| x == "CONNECT") && !inspect {
                        self.err(p.span(), "`path_prefixes` never match CONNECT tunnels (the proxy cannot see their paths)");
                    }
                }
                let allow_private = match &t.allow_private {
                    Some(a) if !allow && *a.get_ref() => {
                        self.err(a.span(), "`allow_private` has no meaning in denied_domains");
                        false
                    }
                    Some(a) => *a.get_ref(),
                    None => false,
                };
                let name = match &t.name {
                    Some(n)
                        if n.get_ref().is_empty()
                            || n.get_ref().len() > 128
                            || !n
                                .get_ref()
                                .bytes()
                                .all(|b| b.is_ascii_graphic() || b == b' ') =>
                    {
                        self.err(
                            n.span(),
                            "`name` must be 1 to 128 printable ASCII characters",
                        );
                        None
                    }
                    Some(n) => Some(n.get_ref().clone()),
                    None => None,
                };
                if self.diags.len() != before {
                    return None;
                }
                let pattern = pattern?;
                let name = name.unwrap_or_else(|| default_name(&pattern, &ports, allow));
                Some(Rule {
                    id: format!("{list}:{name}"),
                    pattern,
                    ports,
                    methods,
                    path_prefixes,
                    allow_private,
                    inspect,
                    opaque,
                    redact_query,
                })
            }
        }
    }
}

// ---- inspection, credentials, TLS ports ----------------------------------------------------

/// A path in the config, relative to the config file's directory.
fn beside(config: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl Validator<'_> {
    fn tls_ports(&mut self, raw: Option<&Spanned<Vec<Spanned<i64>>>>) -> Vec<u16> {
        let Some(raw) = raw else {
            return vec![DEFAULT_PORT];
        };
        let mut out = Vec::new();
        for p in raw.get_ref() {
            match u16::try_from(*p.get_ref()) {
                Ok(n) if n != 0 => out.push(n),
                _ => self.err(
                    p.span(),
                    format!("port {} is not from 1 to 65535", p.get_ref()),
                ),
            }
        }
        out
    }

    /// Loads the CA and origin trust, and checks every `inspect` rule can be served: a CA
    /// is configured and its name constraints cover the rule's domain.
    fn inspection(
        &mut self,
        raw: Option<&Spanned<RawInspection>>,
        specs: &[Spanned<RuleSpec>],
        allowed: &[Rule],
        config: &Path,
    ) -> Option<Arc<Inspection>> {
        let inspect_spans: Vec<Range<usize>> = specs
            .iter()
            .filter_map(|s| match s.get_ref() {
                RuleSpec::Full(t) => t
                    .inspect
                    .as_ref()
                    .filter(|i| *i.get_ref())
                    .map(|i| i.span()),
                RuleSpec::Short(_) => None,
            })
            .collect();
        let Some(raw) = raw else {
            for span in inspect_spans {
                self.err(span, "`inspect = true` needs a CA: add [inspection] ca_dir = \"...\" (make one with `egress-proxy ca init DIR --domain ...`)");
            }
            return None;
        };
        let raw = raw.get_ref();
        let dir = beside(config, raw.ca_dir.get_ref());
        let upstream = raw
            .upstream_ca
            .as_ref()
            .map(|u| beside(config, u.get_ref()));
        let loaded = Inspection::load(
            &dir.join(ca::CERT_FILE),
            &dir.join(ca::KEY_FILE),
            upstream.as_deref(),
        );
        let inspection = match loaded {
            Ok(i) => i,
            Err(e) => {
                let span = match (&raw.upstream_ca, e.starts_with("upstream_ca")) {
                    (Some(u), true) => u.span(),
                    _ => raw.ca_dir.span(),
                };
                self.err(span, format!("[inspection]: {e}"));
                return None;
            }
        };
        let inspecting: Vec<&Rule> = allowed.iter().filter(|r| r.inspect).collect();
        if inspecting.len() != inspect_spans.len() {
            return Some(Arc::new(inspection)); // a rule already failed; its own line says why
        }
        for (rule, span) in inspecting.into_iter().zip(inspect_spans) {
            let name = match &rule.pattern {
                Pattern::Exact(n) | Pattern::Subdomains(n) => n,
                Pattern::Net(_) => continue,
            };
            if !inspection.ca.permits(name) {
                self.err(
                    span,
                    format!(
                        "the CA in `{}` may not mint for `{name}` (its name constraints permit {}): make a CA that covers it",
                        dir.display(),
                        inspection.ca.permitted().join(", ")
                    ),
                );
            }
        }
        Some(Arc::new(inspection))
    }

    fn credentials(
        &mut self,
        raw: &[Spanned<RawCredential>],
        allowed: &[Rule],
        config: &Path,
    ) -> Vec<Arc<Credential>> {
        let mut out: Vec<Arc<Credential>> = Vec::new();
        for c in raw {
            let c = c.get_ref();
            let before = self.diags.len();
            let name = c.name.get_ref();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.err(
                    c.name.span(),
                    "credential `name` must be 1 to 64 letters, digits, `-` or `_`",
                );
            } else if out.iter().any(|o| o.name == *name) {
                self.err(
                    c.name.span(),
                    format!("credential `{name}` is defined twice"),
                );
            }
            let host = match canonical_host(c.host.get_ref()) {
                Ok(Host::Name(h)) => {
                    let inspected = allowed
                        .iter()
                        .any(|r| r.inspect && r.pattern.matches(&Host::Name(h.clone())));
                    if !inspected {
                        self.err(c.host.span(), format!("credential for `{h}`, which no `inspect = true` rule covers: it could never be injected"));
                    }
                    h
                }
                _ => {
                    self.err(c.host.span(), "credential `host` must be a domain name");
                    String::new()
                }
            };
            if let Some(p) = &c.path_prefix {
                if !p.get_ref().starts_with('/') {
                    self.err(p.span(), "`path_prefix` must start with `/`");
                }
            }
            let header = match http::HeaderName::from_bytes(c.header.get_ref().as_bytes()) {
                Ok(h)
                    if !matches!(
                        h.as_str(),
                        "host" | "connection" | "content-length" | "transfer-encoding"
                    ) =>
                {
                    Some(h)
                }
                _ => {
                    self.err(
                        c.header.span(),
                        format!(
                            "`{}` is not a header a credential can set",
                            c.header.get_ref()
                        ),
                    );
                    None
                }
            };
            let template = c.value.get_ref();
            if template.matches("{secret}").count() != 1
                || http::HeaderValue::from_str(&template.replace("{secret}", "x")).is_err()
            {
                self.err(c.value.span(), "`value` must hold `{secret}` exactly once, in a valid header value (e.g. \"Bearer {secret}\")");
            }
            let secret_file = beside(config, c.secret_file.get_ref());
            let secret = match Secret::read(&secret_file) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.err(c.secret_file.span(), format!("credential `{name}`: {e}"));
                    None
                }
            };
            if self.diags.len() != before {
                continue;
            }
            let (Some(header), Some(secret)) = (header, secret) else {
                continue;
            };
            out.push(Arc::new(Credential {
                name: name.clone(),
                host,
                path_prefix: c.path_prefix.as_ref().map(|p| p.get_ref().clone()),
                header,
                template: template.clone(),
                secret_file,
                secret,
            }));
        }
        out
    }
}

fn default_name(p: &Pattern, ports: &Ports, allow: bool) -> String {
    let host = match p {
        Pattern::Exact(n) => n.clone(),
        Pattern::Subdomains(s) => format!("*.{s}"),
        Pattern::Net(n) if n.prefix_len() == n.max_prefix_len() => match n.addr() {
            IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        },
        Pattern::Net(n) => n.to_string(),
    };
    let is_default = match ports {
        Ports::Any => !allow,
        Ports::List(l) => allow && l == &[DEFAULT_PORT],
    };
    match ports {
        _ if is_default => host,
        Ports::Any => format!("{host}:*"),
        Ports::List(l) => format!(
            "{host}:{}",
            l.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
        ),
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has host bits set; did you mean `{}`?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses a rule's host part: `name`, `*.suffix`, an IP address or a CIDR network.
fn parse_pattern(s: &str) -> Result<Pattern, String> {
    if s == "*" {
        return Err("`*` alone would match every host; list the domains instead".to_owned());
    }
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    if unbracketed.contains('/')
        || unbracketed.contains(':')
        || unbracketed.parse::<IpAddr>().is_ok()
    {
        return parse_net(unbracketed).map(Pattern::Net);
    }
    if let Some(suffix) = s.strip_prefix("*.") {
        return match canonical_host(suffix) {
            Ok(Host::Name(n)) => Ok(Pattern::Subdomains(n)),
            Ok(Host::Ip(_)) => Err(format!(
                "`{s}`: a wildcard needs a domain suffix, not an address"
            )),
            Err(e) => Err(format!("`{s}`: {e}")),
        };
    }
    if s.contains('*') {
        return Err(format!(
            "`{s}`: a wildcard is only allowed as a whole first label (`*.example.com`)"
        ));
    }
    match canonical_host(s) {
        Ok(Host::Name(n)) => Ok(Pattern::Exact(n)),
        Ok(Host::Ip(ip)) => Ok(Pattern::Net(IpNet::from(ip))),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

/// Parses the string form of a rule: pattern, optionally `:port`, `:p1,p2` or `:*`.
fn parse_short(s: &str) -> Result<(Pattern, Option<Ports>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, "")) => (inner, None),
            Some((inner, after)) => match after.strip_prefix(':') {
                Some(p) => (inner, Some(p)),
                None => return Err(format!("`{s}`: expected `:port` after `]`")),
            },
            None => return Err(format!("`{s}`: missing `]`")),
        }
    } else if s.matches(':').count() > 1 {
        (s, None) // bare IPv6 address or network
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let pattern = parse_pattern(host)?;
    let ports = match port {
        None => None,
        Some("*") => Some(Ports::Any),
        Some(list) => {
            let mut out = Vec::new();
            for p in list.split(',') {
                match p.parse::<u16>() {
                    Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => out.push(n),
                    _ => return Err(format!("`{s}`: `{p}` is not a port from 1 to 65535")),
                }
            }
            Some(Ports::List(out))
        }
    };
    Ok((pattern, ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = [\"127.0.0.1:3128\", \"[::1]:3128\"]\nclient_networks = [\"10.0.0.0/8\"]\naudit_log = \"/var/log/a.jsonl\"\n";

    fn ok(extra: &str) -> Config {
        parse(&format!("{BASE}{extra}"), Path::new("/etc/p.toml"))
            .unwrap_or_else(|d| panic!("{d:?}"))
    }

    fn errs(text: &str) -> Vec<(usize, usize, String)> {
        parse(text, Path::new("/etc/p.toml"))
            .unwrap_err()
            .into_iter()
            .map(|d| (d.line, d.col, d.message))
            .collect()
    }

    #[test]
    fn a_full_config_parses() {
        let c = ok(r#"allowed_domains = [
  "GitHub.com",
  "*.githubusercontent.com",
  "pypi.org:80,443",
  "192.0.2.10:*",
  "[2001:db8::1]:8443",
  { domain = "origin.test", ports = [8443], allow_private = true, name = "test origin" },
  { domain = "files.test", ports = [80], methods = ["get", "HEAD"], path_prefixes = ["/pub/"] },
]
denied_domains = ["gist.github.com", { domain = "*.evil.test", ports = [443] }]
system_resolver = false

[hosts]
"Origin.Test" = "127.0.0.1"
"files.test" = ["127.0.0.1", "::1"]

[limits]
max_header_bytes = 8192
idle_timeout_secs = 2.5
"#);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.admin_listen, Some(DEFAULT_ADMIN.parse().unwrap()));
        let ids: Vec<_> = c.policy.allowed.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "allowed_domains:github.com",
                "allowed_domains:*.githubusercontent.com",
                "allowed_domains:pypi.org:80,443",
                "allowed_domains:192.0.2.10:*",
                "allowed_domains:[2001:db8::1]:8443",
                "allowed_domains:test origin",
                "allowed_domains:files.test:80",
            ]
        );
        assert_eq!(
            c.policy.allowed[6].methods,
            Some(vec!["GET".to_owned(), "HEAD".to_owned()])
        );
        assert!(c.policy.allowed[5].allow_private);
        assert_eq!(c.policy.denied[0].ports, Ports::Any);
        assert_eq!(c.policy.denied[1].id, "denied_domains:*.evil.test:443");
        assert_eq!(
            c.policy.hosts["origin.test"],
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.policy.hosts["files.test"].len(), 2);
        assert!(!c.policy.system_resolver);
        assert_eq!(c.policy.limits.max_header_bytes, 8192);
        assert_eq!(c.policy.limits.idle_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn audit_table_sets_reserve_and_rotation_and_rejects_nonsense() {
        let d = ok("").audit;
        assert_eq!(d.reserve_bytes, 64 << 10);
        assert_eq!(d.rotation.max_bytes, Some(64 << 20));
        assert_eq!(d.rotation.max_age, Some(Duration::from_secs(86_400)));
        assert!(d.rotation.compress && d.rotation.keep_segments.is_none());
        let c = ok("[audit]\nrotate_bytes = 0\nrotate_age_secs = 0\nkeep_segments = 3\nkeep_days = 1.5\ncompress = false\n").audit;
        assert_eq!(c.rotation.max_bytes, None);
        assert_eq!(c.rotation.max_age, None);
        assert_eq!(c.rotation.keep_segments, Some(3));
        assert_eq!(c.rotation.keep_age, Some(Duration::from_secs(129_600)));
        assert!(!c.rotation.compress);
        let e = errs(&format!("{BASE}[audit]\nkeep_segments = 0\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].2.contains("keep_segments"), "{e:?}");
        let e = errs(&format!("{BASE}[audit]\nreserve_bytes = 10\n"));
        assert!(e[0].2.contains("reserve_bytes"), "{e:?}");
        let e = errs(&format!("{BASE}[audit]\nrotate_size = 1\n"));
        assert!(e[0].2.contains("rotate_size"), "{e:?}");
    }

    #[test]
    fn relative_audit_log_is_beside_the_config() {
        let c = parse(
            "listen = [\"127.0.0.1:0\"]\nclient_networks = [\"127.0.0.1\"]\naudit_log = \"audit.jsonl\"\nadmin_listen = \"off\"\n",
            Path::new("/etc/tank/p.toml"),
        )
        .unwrap();
        assert_eq!(c.audit_log, PathBuf::from("/etc/tank/audit.jsonl"));
        assert_eq!(c.admin_listen, None);
    }

    #[test]
    fn errors_are_line_precise() {
        let text = format!("{BASE}allowed_domains = [\n  \"ok.test\",\n  \"bad domain.test\",\n  \"*\",\n  \"a.*.test\",\n  \"x.test:0\",\n]\n");
        let e = errs(&text);
        assert_eq!(e.len(), 4, "{e:?}");
        assert_eq!((e[0].0, e[0].1), (6, 3));
        assert!(e[0].2.contains("bad domain.test"), "{e:?}");
        assert_eq!((e[1].0, e[1].1), (7, 3));
        assert_eq!((e[2].0, e[2].1), (8, 3));
        assert_eq!((e[3].0, e[3].1), (9, 3));
    }

    #[test]
    fn syntax_and_unknown_keys_are_line_precise() {
        let e = errs(&format!("{BASE}allowedDomains = [\"x.test\"]\n"));
        assert_eq!(e[0].0, 4, "{e:?}");
        assert!(e[0].2.contains("allowedDomains"), "{e:?}");
        let e = errs(&format!("{BASE}\n\nallowed_domains = [\"x.test\"\n"));
        assert!(e[0].0 >= 6, "{e:?}");
        let e = errs(&format!(
            "{BASE}allowed_domains = [{{ domain = \"x.test\", port = 1 }}]\n"
        ));
        assert_eq!(e[0].0, 4, "{e:?}");
        assert!(e[0].2.contains("port"), "{e:?}");
        let e = errs("listen = [\"127.0.0.1:1\"]\naudit_log = \"x\"\n");
        assert!(e[0].2.contains("client_networks"), "{e:?}");
    }

    #[test]
    fn values_are_checked() {
        let e = errs(&format!(
            "{BASE}denied_domains = [{{ domain = \"x.test\", allow_private = true }}]\n[hosts]\n\"a.test\" = \"not-an-ip\"\n\"1.2.3.4\" = \"1.2.3.4\"\n[limits]\nmax_header_bytes = 10\n"
        ));
        let lines: Vec<usize> = e.iter().map(|x| x.0).collect();
        assert_eq!(lines, [4, 6, 7, 9], "{e:?}");
        let e = errs(
            "listen = [\"127.0.0.1\"]\nclient_networks = [\"10.0.0.1/8\"]\naudit_log = \"\"\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[1].2.contains("10.0.0.0/8"), "{e:?}");
    }

    #[test]
    fn rules_that_never_apply_as_written_are_warned_about() {
        let c = ok(r#"allowed_domains = [
  "gist.github.com",
  { domain = "api.test", path_prefixes = ["/v1/"] },
  { domain = "files.test", ports = [80], path_prefixes = ["//pub/./x/"] },
  "fine.test",
]
denied_domains = ["*.github.com", { domain = "files.test", path_prefixes = ["/private/"] }]
"#);
        let w = c.warnings;
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].starts_with("/etc/p.toml:5:3: warning: allowed_domains:gist.github.com never applies: denied_domains:*.github.com"), "{w:?}");
        assert!(w[1].starts_with("/etc/p.toml:6:3: warning: allowed_domains:api.test allows only plain-HTTP paths, yet names only port 443"), "{w:?}");
        assert!(
            w[2].contains("`//pub/./x/` is compared in normal form, as `/pub/x/`"),
            "{w:?}"
        );
        assert!(
            w[3].starts_with(
                "/etc/p.toml:10:35: warning: denied_domains:files.test judges requests"
            ),
            "{w:?}"
        );
        assert_eq!(
            c.policy.allowed[2].path_prefixes,
            Some(vec!["/pub/x/".to_owned()])
        );
        assert!(ok("allowed_domains = [\"a.test\"]\n").warnings.is_empty());
    }

    #[test]
    fn a_syntax_error_is_one_line() {
        let e = errs(&format!("{BASE}allowed_domains = [\"x.test\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(!e[0].2.contains('\n'), "{e:?}");
        assert!(e[0].2.contains("expected"), "{e:?}");
    }

    #[test]
    fn short_forms() {
        assert_eq!(
            parse_short("a.test").unwrap(),
            (Pattern::Exact("a.test".into()), None)
        );
        assert_eq!(
            parse_short("*.a.test:*").unwrap(),
            (Pattern::Subdomains("a.test".into()), Some(Ports::Any))
        );
        assert_eq!(
            parse_short("10.0.0.0/8").unwrap().0,
            Pattern::Net("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            parse_short("fd00::/8").unwrap().0,
            Pattern::Net("fd00::/8".parse().unwrap())
        );
        assert_eq!(
            parse_short("[::1]:80").unwrap(),
            (
                Pattern::Net("::1/128".parse().unwrap()),
                Some(Ports::List(vec![80]))
            )
        );
        assert!(parse_short("a.test:http").is_err());
        assert!(parse_short("127.1").is_err());
    }
}
