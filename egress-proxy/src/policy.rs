//! The policy: which clients may use the proxy and which targets they may reach.
//!
//! Decisions run in a fixed order, each step refusing with a stable [`Reason`]:
//! 1. the client address must be in `client_networks` (judged at accept);
//! 2. a matching `denied_domains` rule refuses (denials win over allowances). Paths are
//!    judged in normal form ([`crate::path`]). A tunnel cannot be judged by what it
//!    carries, so a CONNECT to a host with request-level denials (`path_prefixes`, or
//!    `methods` other than `CONNECT`) is refused unless the host is inspected
//!    ([`Policy::inspecting`]);
//! 3. some `allowed_domains` rule must match the host, then the port, then the method, then
//!    the path: the first step that leaves no rule names the refusal (`default-deny`,
//!    `port-not-allowed`, ...). Of the rules left, the most specific host pattern decides
//!    (an exact name over a wildcard, a longer suffix or network prefix over a shorter),
//!    file order breaking ties; its `allow_private` is the one that counts;
//! 4. after resolution, each address must be connectable under the deciding rule
//!    (see [`crate::addr`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::addr::{classify, AddrClass};
use crate::path::Normal;
use crate::target::{Host, Target};

/// Why a request was refused. The strings are stable: they appear in the
/// `X-Tank-Refused-By` header, the audit log and the metrics, and are never renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The client's address is not in `client_networks`.
    ClientNetwork,
    /// A `denied_domains` rule matched (the rule is named separately).
    DeniedDomain,
    /// No `allowed_domains` rule matches the host.
    DefaultDeny,
    /// The target is an IP literal and no rule names that address.
    IpLiteral,
    /// A rule matches the host but none allows the port.
    PortNotAllowed,
    /// A rule matches host and port but none allows the method.
    MethodNotAllowed,
    /// A rule matches host, port and method but none allows the path.
    PathNotAllowed,
    /// Every resolved address is private and the rule does not allow private addresses.
    PrivateAddress,
    /// Every resolved address is never connectable (metadata, unspecified, multicast...).
    ForbiddenAddress,
    /// The request could not be parsed, or names a malformed target.
    BadRequest,
    /// The request head exceeded `max_header_bytes`.
    HeaderTooLarge,
    /// The request head did not arrive within `header_read_timeout_secs`.
    HeaderTimeout,
    /// The client already has `max_connections_per_client` connections.
    ClientConnectionLimit,
    /// The proxy already has `max_connections` connections.
    ConnectionLimit,
    /// The audit log cannot be written; nothing is let through unrecorded.
    AuditUnavailable,
    /// A tunnel's ClientHello names no server, another server than the CONNECT host, or
    /// hides it (ECH).
    SniMismatch,
    /// A tunnel to a TLS port did not start with a TLS ClientHello (and its rule is not
    /// `opaque`).
    NotTls,
    /// A request inside an inspected tunnel names another host than the tunnel's.
    HostMismatch,
    /// A request carries its own value in a header a `[[credentials]]` entry sets.
    CredentialMismatch,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Reason; 19] = [
        Reason::ClientNetwork,
        Reason::DeniedDomain,
        Reason::DefaultDeny,
        Reason::IpLiteral,
        Reason::PortNotAllowed,
        Reason::MethodNotAllowed,
        Reason::PathNotAllowed,
        Reason::PrivateAddress,
        Reason::ForbiddenAddress,
        Reason::BadRequest,
        Reason::HeaderTooLarge,
        Reason::HeaderTimeout,
        Reason::ClientConnectionLimit,
        Reason::ConnectionLimit,
        Reason::AuditUnavailable,
        Reason::SniMismatch,
        Reason::NotTls,
        Reason::HostMismatch,
        Reason::CredentialMismatch,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ClientNetwork => "client-network",
            Reason::DeniedDomain => "denied-domain",
            Reason::DefaultDeny => "default-deny",
            Reason::IpLiteral => "ip-literal",
            Reason::PortNotAllowed => "port-not-allowed",
            Reason::MethodNotAllowed => "method-not-allowed",
            Reason::PathNotAllowed => "path-not-allowed",
            Reason::PrivateAddress => "private-address",
            Reason::ForbiddenAddress => "forbidden-address",
            Reason::BadRequest => "bad-request",
            Reason::HeaderTooLarge => "header-too-large",
            Reason::HeaderTimeout => "header-timeout",
            Reason::ClientConnectionLimit => "client-connection-limit",
            Reason::ConnectionLimit => "connection-limit",
            Reason::AuditUnavailable => "audit-unavailable",
            Reason::SniMismatch => "sni-mismatch",
            Reason::NotTls => "not-tls",
            Reason::HostMismatch => "host-mismatch",
            Reason::CredentialMismatch => "credential-mismatch",
        }
    }

    /// The HTTP status a refusal for this reason answers with.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Reason::BadRequest => (400, "Bad Request"),
            Reason::HeaderTimeout => (408, "Request Timeout"),
            Reason::HeaderTooLarge => (431, "Request Header Fields Too Large"),
            Reason::ClientConnectionLimit => (429, "Too Many Requests"),
            Reason::ConnectionLimit | Reason::AuditUnavailable => (503, "Service Unavailable"),
            _ => (403, "Forbidden"),
        }
    }
}

/// A refusal: the reason, the rule that decided if one did, and a human explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason.
    pub reason: Reason,
    /// `denied_domains:<name>` when a deny rule decided.
    pub rule: Option<String>,
    /// One sentence for the response body and the log.
    pub detail: String,
}

impl Refusal {
    /// A refusal not decided by a named rule.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            rule: None,
            detail: detail.into(),
        }
    }

    /// What refused: the rule's id, or the reason.
    pub fn by(&self) -> &str {
        self.rule.as_deref().unwrap_or(self.reason.as_str())
    }
}

/// What a rule's host pattern matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Exactly this canonical name.
    Exact(String),
    /// Any name strictly below this canonical suffix (`*.example.com` matches
    /// `api.example.com`, not `example.com`).
    Subdomains(String),
    /// IP-literal targets inside this network.
    Net(IpNet),
}

impl Pattern {
    /// Whether `host` matches the pattern.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Pattern::Exact(n), Host::Name(h)) => n == h,
            (Pattern::Subdomains(s), Host::Name(h)) => {
                h.len() > s.len() + 1
                    && h.ends_with(s.as_str())
                    && h.as_bytes()[h.len() - s.len() - 1] == b'.'
            }
            (Pattern::Net(net), Host::Ip(ip)) => net.contains(&canonical_ip(*ip)),
            _ => false,
        }
    }

    /// How narrowly the pattern names hosts: larger is more specific.
    fn specificity(&self) -> (u8, usize) {
        match self {
            Pattern::Exact(_) => (2, 0),
            Pattern::Subdomains(s) => (1, s.len()),
            Pattern::Net(n) => (0, usize::from(n.prefix_len())),
        }
    }

    /// Whether every host this pattern matches, `other` matches too.
    pub fn covered_by(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Exact(a), Pattern::Subdomains(_)) => other.matches(&Host::Name(a.clone())),
            (Pattern::Subdomains(a), Pattern::Subdomains(b)) => {
                a == b || other.matches(&Host::Name(a.clone()))
            }
            (Pattern::Net(a), Pattern::Net(b)) => b.contains(a),
            _ => false,
        }
    }
}

/// Ports a rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Any port.
    Any,
    /// These ports.
    List(Vec<u16>),
}

/// One entry of `allowed_domains` or `denied_domains`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `allowed_domains:<name>` or `denied_domains:<name>`.
    pub id: String,
    /// Hosts matched.
    pub pattern: Pattern,
    /// Ports matched.
    pub ports: Ports,
    /// Methods matched (uppercase; `CONNECT` for tunnels); `None` = any.
    pub methods: Option<Vec<String>>,
    /// Path prefixes (normal form, see [`crate::path`]) matched for plain HTTP; `None` =
    /// any. An allowing rule with prefixes never matches a CONNECT tunnel, whose paths the
    /// proxy cannot see.
    pub path_prefixes: Option<Vec<String>>,
    /// May connect to private addresses (see [`crate::addr`]).
    pub allow_private: bool,
    /// Tunnels under this rule are inspected: TLS is terminated with a leaf from the CA and
    /// each request inside is judged on its own (see [`crate::inspect`]). The tunnel itself
    /// is admitted on host and port; methods and paths apply to the requests inside.
    pub inspect: bool,
    /// Tunnels under this rule may carry anything (SSH over 443...): no ClientHello check.
    pub opaque: bool,
    /// Request records of inspected tunnels leave out the query string.
    pub redact_query: bool,
}

impl Rule {
    fn port_ok(&self, port: u16) -> bool {
        match &self.ports {
            Ports::Any => true,
            Ports::List(l) => l.contains(&port),
        }
    }
    fn method_ok(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == method))
    }
    fn path_ok(&self, path: Option<&Normal>, deny: bool) -> bool {
        match (&self.path_prefixes, path) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(prefixes), Some(p)) if deny => prefixes.iter().any(|x| p.denied_by(x)),
            (Some(prefixes), Some(p)) => prefixes.iter().any(|x| p.allowed_by(x)),
        }
    }
    fn matches(&self, t: &Target, method: &str, path: Option<&Normal>, deny: bool) -> bool {
        self.pattern.matches(&t.host)
            && self.port_ok(t.port)
            && (self.admits_tunnel(method) || self.method_ok(method) && self.path_ok(path, deny))
    }
    /// An inspected rule admits the CONNECT itself; its methods and paths judge the
    /// requests inside.
    fn admits_tunnel(&self, method: &str) -> bool {
        self.inspect && method == "CONNECT"
    }

    /// Whether the rule judges what travels inside a connection (paths, or methods other
    /// than `CONNECT`), which an opaque tunnel hides.
    pub fn is_request_level(&self) -> bool {
        self.path_prefixes.is_some()
            || self
                .methods
                .as_ref()
                .is_some_and(|m| m.iter().any(|x| x != "CONNECT"))
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Limits on connections; reloadable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// Time allowed for the whole request head to arrive.
    pub header_read_timeout: Duration,
    /// A tunnel or request with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for resolution plus the TCP connect to the origin.
    pub connect_timeout: Duration,
    /// Connections open at once, all clients.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_client: usize,
    /// On SIGTERM, how long open tunnels may run before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            max_connections: 8192,
            max_connections_per_client: 2048,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// How names missing from `[hosts]` are resolved (`[resolver]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Nameservers asked; `None` = those of `/etc/resolv.conf`.
    pub nameservers: Option<Vec<std::net::SocketAddr>>,
    /// Time one lookup may take.
    pub lookup_timeout: Duration,
    /// Lookups in flight at once; more wait for a slot (within `connect_timeout`).
    pub max_lookups: usize,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            nameservers: None,
            lookup_timeout: Duration::from_secs(5),
            max_lookups: 1024,
        }
    }
}

/// The reloadable part of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `allowed_domains`, in file order.
    pub allowed: Vec<Rule>,
    /// `denied_domains`, in file order.
    pub denied: Vec<Rule>,
    /// Networks whose hosts may use the proxy.
    pub client_networks: Vec<IpNet>,
    /// Static name → addresses table, consulted before the system resolver.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Whether names missing from `hosts` go to DNS (the proxy's own stub resolver).
    pub system_resolver: bool,
    /// How DNS is asked.
    pub resolver: ResolverSettings,
    /// Limits.
    pub limits: Limits,
    /// Ports whose tunnels must open with a TLS ClientHello naming the CONNECT host
    /// (unless the rule is `opaque`).
    pub tls_ports: Vec<u16>,
    /// The CA and origin trust of inspected tunnels; `None` when no rule inspects.
    pub inspection: Option<Arc<crate::inspect::Inspection>>,
    /// `[[credentials]]`, in file order.
    pub credentials: Vec<Arc<crate::credentials::Credential>>,
}

impl Policy {
    /// The rule that makes a tunnel to `target` inspected, if any: an allowed `inspect`
    /// rule for its host and port wins over every opaque one, so nothing a rule says to
    /// inspect passes uninspected.
    pub fn inspecting(&self, target: &Target) -> Option<&Rule> {
        self.allowed
            .iter()
            .find(|r| r.inspect && r.pattern.matches(&target.host) && r.port_ok(target.port))
    }

    /// Whether `client` may use the proxy.
    pub fn client_allowed(&self, client: IpAddr) -> bool {
        let client = canonical_ip(client);
        self.client_networks.iter().any(|n| n.contains(&client))
    }

    /// Decides a request for `target` with `method` (`CONNECT` for tunnels) and, for plain
    /// HTTP (or a request inside an inspected tunnel), its normalised `path`. Returns the
    /// allowing rule.
    pub fn decide(
        &self,
        target: &Target,
        method: &str,
        path: Option<&Normal>,
    ) -> Result<&Rule, Refusal> {
        if let Some(rule) = self
            .denied
            .iter()
            .find(|r| r.matches(target, method, path, true))
        {
            return Err(Refusal {
                reason: Reason::DeniedDomain,
                rule: Some(rule.id.clone()),
                detail: format!("{target} is denied by {}", rule.id),
            });
        }
        // A tunnel hides its requests: a denial about them cannot be checked inside it.
        let unjudgeable = match path {
            None => self.denied.iter().find(|r| {
                r.is_request_level() && r.pattern.matches(&target.host) && r.port_ok(target.port)
            }),
            Some(_) => None,
        };
        let rule = self.allowing(target, method, path)?;
        if let Some(denial) = unjudgeable {
            if self.inspecting(target).is_none() {
                return Err(Refusal {
                    reason: Reason::DeniedDomain,
                    rule: Some(denial.id.clone()),
                    detail: format!(
                        "{target} has request-level denials ({}) that a tunnel would hide; only an inspected host can be tunnelled to",
                        denial.id
                    ),
                });
            }
        }
        Ok(rule)
    }

    /// The allowing rule, or the first step that left none.
    fn allowing(
        &self,
        target: &Target,
        method: &str,
        path: Option<&Normal>,
    ) -> Result<&Rule, Refusal> {
        let hosts: Vec<&Rule> = self
            .allowed
            .iter()
            .filter(|r| r.pattern.matches(&target.host))
            .collect();
        if hosts.is_empty() {
            return Err(match target.host {
                Host::Ip(_) => Refusal::new(
                    Reason::IpLiteral,
                    format!("{target} is an IP literal and no rule in allowed_domains names it"),
                ),
                Host::Name(_) => Refusal::new(
                    Reason::DefaultDeny,
                    format!("no rule in allowed_domains matches {}", target.host),
                ),
            });
        }
        let ports: Vec<&Rule> = hosts
            .into_iter()
            .filter(|r| r.port_ok(target.port))
            .collect();
        if ports.is_empty() {
            return Err(Refusal::new(
                Reason::PortNotAllowed,
                format!(
                    "port {} of {} is not allowed by any rule",
                    target.port, target.host
                ),
            ));
        }
        let methods: Vec<&Rule> = ports
            .into_iter()
            .filter(|r| r.admits_tunnel(method) || r.method_ok(method))
            .collect();
        if methods.is_empty() {
            return Err(Refusal::new(
                Reason::MethodNotAllowed,
                format!("method {method} to {target} is not allowed by any rule"),
            ));
        }
        // The most specific host pattern decides; `max_by_key` keeps the last of equals, so
        // the list is reversed to let file order break ties.
        methods
            .into_iter()
            .filter(|r| r.admits_tunnel(method) || r.path_ok(path, false))
            .rev()
            .max_by_key(|r| r.pattern.specificity())
            .ok_or_else(|| {
                Refusal::new(
                    Reason::PathNotAllowed,
                    match path {
                        Some(p) => {
                            format!("path {} on {target} is not allowed by any rule", p.path())
                        }
                        None => format!(
                            "the rules for {target} allow only plain-HTTP paths, not tunnels"
                        ),
                    },
                )
            })
    }

    /// Keeps the addresses `rule` may connect to. When none is left, the refusal says why.
    pub fn connectable(
        &self,
        rule: &Rule,
        addrs: &[IpAddr],
        local: &[IpAddr],
    ) -> Result<Vec<IpAddr>, Refusal> {
        let mut ok = Vec::new();
        let mut worst: Option<(Reason, String)> = None;
        for &ip in addrs {
            let ip = canonical_ip(ip);
            let class = match classify(ip) {
                AddrClass::Public if local.contains(&ip) => AddrClass::Private("local-interface"),
                c => c,
            };
            match class {
                AddrClass::Public => ok.push(ip),
                AddrClass::Private(_) if rule.allow_private => ok.push(ip),
                AddrClass::Private(kind) => {
                    if worst.is_none() {
                        worst = Some((Reason::PrivateAddress, format!("{ip} is {kind}")));
                    }
                }
                AddrClass::Forbidden(kind) => {
                    worst = Some((Reason::ForbiddenAddress, format!("{ip} is {kind}")));
                }
            }
        }
        if ok.is_empty() {
            let (reason, what) = worst.unwrap_or((Reason::PrivateAddress, "no address".to_owned()));
            let hint = if reason == Reason::PrivateAddress {
                " and the rule lacks allow_private"
            } else {
                ""
            };
            return Err(Refusal::new(reason, format!("{what}{hint}")));
        }
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::parse_authority;

    fn rule(id: &str, pattern: Pattern, ports: Ports) -> Rule {
        Rule {
            id: id.to_owned(),
            pattern,
            ports,
            methods: None,
            path_prefixes: None,
            allow_private: false,
            inspect: false,
            opaque: false,
            redact_query: false,
        }
    }

    fn policy() -> Policy {
        let mut pypi = rule(
            "allowed_domains:pypi",
            Pattern::Exact("pypi.org".into()),
            Ports::List(vec![80]),
        );
        pypi.methods = Some(vec!["GET".into(), "HEAD".into()]);
        pypi.path_prefixes = Some(vec!["/simple/".into()]);
        Policy {
            allowed: vec![
                rule(
                    "allowed_domains:gh",
                    Pattern::Subdomains("github.com".into()),
                    Ports::List(vec![443]),
                ),
                rule(
                    "allowed_domains:gh-apex",
                    Pattern::Exact("github.com".into()),
                    Ports::List(vec![443]),
                ),
                rule(
                    "allowed_domains:net",
                    Pattern::Net("192.0.2.0/24".parse().unwrap()),
                    Ports::Any,
                ),
                pypi,
            ],
            denied: vec![rule(
                "denied_domains:gist",
                Pattern::Exact("gist.github.com".into()),
                Ports::Any,
            )],
            client_networks: vec!["10.0.0.0/8".parse().unwrap()],
            hosts: HashMap::new(),
            system_resolver: false,
            resolver: ResolverSettings::default(),
            limits: Limits::default(),
            tls_ports: vec![443],
            inspection: None,
            credentials: Vec::new(),
        }
    }

    fn decide(p: &Policy, auth: &str, method: &str, path: Option<&str>) -> Result<String, Reason> {
        let t = parse_authority(auth, None).unwrap();
        let path = path.map(|p| crate::path::normalise(p).unwrap());
        p.decide(&t, method, path.as_ref())
            .map(|r| r.id.clone())
            .map_err(|e| e.reason)
    }

    #[test]
    fn decisions() {
        let p = policy();
        assert_eq!(
            decide(&p, "api.github.com:443", "CONNECT", None).unwrap(),
            "allowed_domains:gh"
        );
        assert_eq!(
            decide(&p, "github.com:443", "CONNECT", None).unwrap(),
            "allowed_domains:gh-apex"
        );
        assert_eq!(
            decide(&p, "gist.github.com:443", "CONNECT", None),
            Err(Reason::DeniedDomain)
        );
        assert_eq!(
            decide(&p, "evilgithub.com:443", "CONNECT", None),
            Err(Reason::DefaultDeny)
        );
        assert_eq!(
            decide(&p, "api.github.com:22", "CONNECT", None),
            Err(Reason::PortNotAllowed)
        );
        assert_eq!(
            decide(&p, "8.8.8.8:443", "CONNECT", None),
            Err(Reason::IpLiteral)
        );
        assert_eq!(
            decide(&p, "192.0.2.7:1234", "CONNECT", None).unwrap(),
            "allowed_domains:net"
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/simple/x/")).unwrap(),
            "allowed_domains:pypi"
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "POST", Some("/simple/x/")),
            Err(Reason::MethodNotAllowed)
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/admin")),
            Err(Reason::PathNotAllowed)
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/simple/../admin")),
            Err(Reason::PathNotAllowed)
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/simple/%2E%2e/admin")),
            Err(Reason::PathNotAllowed)
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/simple%2F..%2Fadmin")),
            Err(Reason::PathNotAllowed)
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "GET", Some("/admin/../simple/x")).unwrap(),
            "allowed_domains:pypi"
        );
        assert_eq!(
            decide(&p, "pypi.org:80", "CONNECT", None),
            Err(Reason::MethodNotAllowed)
        );
    }

    #[test]
    fn the_most_specific_rule_decides() {
        let mut p = policy();
        let wide = rule(
            "allowed_domains:*.test",
            Pattern::Subdomains("test".into()),
            Ports::Any,
        );
        let mut lp = rule(
            "allowed_domains:loop.test",
            Pattern::Exact("loop.test".into()),
            Ports::Any,
        );
        lp.allow_private = true;
        let mut sub = rule(
            "allowed_domains:*.lab.test",
            Pattern::Subdomains("lab.test".into()),
            Ports::Any,
        );
        sub.allow_private = true;
        p.allowed = vec![wide, lp, sub];
        assert_eq!(
            decide(&p, "loop.test:1", "CONNECT", None).unwrap(),
            "allowed_domains:loop.test"
        );
        assert_eq!(
            decide(&p, "a.lab.test:1", "CONNECT", None).unwrap(),
            "allowed_domains:*.lab.test"
        );
        assert_eq!(
            decide(&p, "other.test:1", "CONNECT", None).unwrap(),
            "allowed_domains:*.test"
        );
    }

    #[test]
    fn a_tunnel_cannot_pass_request_level_denials() {
        let mut p = policy();
        let mut posts = rule(
            "denied_domains:posts",
            Pattern::Exact("api.github.com".into()),
            Ports::Any,
        );
        posts.methods = Some(vec!["POST".into()]);
        p.denied.push(posts);
        assert_eq!(
            decide(&p, "api.github.com:443", "CONNECT", None),
            Err(Reason::DeniedDomain)
        );
        assert_eq!(
            decide(&p, "www.github.com:443", "CONNECT", None).unwrap(),
            "allowed_domains:gh"
        );
        let mut tunnels = rule(
            "denied_domains:tunnels",
            Pattern::Exact("www.github.com".into()),
            Ports::Any,
        );
        tunnels.methods = Some(vec!["CONNECT".into()]);
        assert!(!tunnels.is_request_level());
    }

    #[test]
    fn clients() {
        let p = policy();
        assert!(p.client_allowed("10.1.2.3".parse().unwrap()));
        assert!(p.client_allowed("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!p.client_allowed("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn addresses() {
        let p = policy();
        let mut r = rule("x", Pattern::Exact("a".into()), Ports::Any);
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            p.connectable(&r, &ips(&["127.0.0.1"]), &[])
                .unwrap_err()
                .reason,
            Reason::PrivateAddress
        );
        assert_eq!(
            p.connectable(&r, &ips(&["10.0.0.1", "8.8.8.8"]), &[])
                .unwrap(),
            ips(&["8.8.8.8"])
        );
        assert_eq!(
            p.connectable(&r, &ips(&["8.8.8.8"]), &ips(&["8.8.8.8"]))
                .unwrap_err()
                .reason,
            Reason::PrivateAddress
        );
        r.allow_private = true;
        assert_eq!(
            p.connectable(&r, &ips(&["127.0.0.1"]), &[]).unwrap(),
            ips(&["127.0.0.1"])
        );
        assert_eq!(
            p.connectable(&r, &ips(&["169.254.169.254", "0.0.0.0"]), &[])
                .unwrap_err()
                .reason,
            Reason::ForbiddenAddress
        );
    }
}
