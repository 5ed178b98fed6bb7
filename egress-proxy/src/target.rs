//! Targets: the `host:port` a client asks for, canonicalised before any rule sees it.
//!
//! A name is compared with the rules only in one spelling: lowercase, without a trailing dot,
//! IDNA-mapped to its ASCII (punycode) form, every label letters, digits and inner hyphens.
//! Anything that a resolver could read as a number (`127.1`, `0x7f.0.0.1`, `2130706433`) but
//! that is not a plain dotted-quad is refused, so a rule about names can never be met by an
//! address in disguise.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// The host part of a target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A canonical DNS name (lowercase ASCII, no trailing dot).
    Name(String),
    /// An IP literal (`192.0.2.1` or `[2001:db8::1]` in the request).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

impl Host {
    /// The host as it goes into an audit record: the name, or the address without brackets.
    pub fn to_plain_string(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

/// A canonical `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host.
    pub host: Host,
    /// The port (never 0).
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a host or authority was refused as malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Nothing where a host should be.
    #[error("empty host")]
    EmptyHost,
    /// `host` with no `:port` where a port is required (CONNECT).
    #[error("missing port")]
    MissingPort,
    /// A port that is not a decimal number from 1 to 65535.
    #[error("invalid port `{0}`")]
    BadPort(String),
    /// A bracketed IPv6 literal that does not parse, or carries a zone.
    #[error("invalid IPv6 literal `{0}`")]
    BadIpv6(String),
    /// A name that IDNA/DNS rules refuse.
    #[error("invalid host name `{0}`")]
    BadName(String),
    /// A numeric host that is not a plain dotted-quad (`127.1`, `0x7f000001`).
    #[error("ambiguous numeric host `{0}` (only dotted-quad IPv4 literals are accepted)")]
    AmbiguousNumeric(String),
    /// `user@host`.
    #[error("user information in the authority is not accepted")]
    UserInfo,
}

/// Canonicalises a host name or IPv4 literal (no brackets, no port).
pub fn canonical_host(raw: &str) -> Result<Host, TargetError> {
    if raw.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if raw.contains('@') {
        return Err(TargetError::UserInfo);
    }
    // One trailing dot is the root; the name means the same without it.
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() || trimmed.ends_with('.') {
        return Err(TargetError::BadName(raw.to_owned()));
    }
    let ascii = Uts46::new()
        .to_ascii(
            trimmed.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::CheckFirstLast,
            DnsLength::Verify,
        )
        .map_err(|_| TargetError::BadName(raw.to_owned()))?
        .into_owned();
    // Belt and braces after IDNA: only LDH labels of 1..=63 bytes reach the rules.
    for label in ascii.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(TargetError::BadName(raw.to_owned()));
        }
    }
    // The WHATWG URL rule: a host whose last label is a number is an IPv4 address, so a
    // resolver may read it as one. Accept only the one unambiguous spelling.
    let last = ascii.rsplit('.').next().unwrap_or("");
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || (last.len() > 2
            && last.starts_with("0x")
            && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return match ascii.parse::<Ipv4Addr>() {
            Ok(ip) if ip.to_string() == ascii => Ok(Host::Ip(IpAddr::V4(ip))),
            _ => Err(TargetError::AmbiguousNumeric(raw.to_owned())),
        };
    }
    Ok(Host::Name(ascii))
}

fn parse_port(raw: &str) -> Result<u16, TargetError> {
    if raw.is_empty() || raw.len() > 5 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort(raw.to_owned()));
    }
    match raw.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(TargetError::BadPort(raw.to_owned())),
    }
}

/// Parses an authority (`host:port`, `[v6]:port`, or without port when `default_port` is
/// given) into a canonical [`Target`].
pub fn parse_authority(raw: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
    if raw.contains('@') {
        return Err(TargetError::UserInfo);
    }
    if let Some(rest) = raw.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| TargetError::BadIpv6(raw.to_owned()))?;
        if inner.contains('%') {
            return Err(TargetError::BadIpv6(raw.to_owned()));
        }
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| TargetError::BadIpv6(raw.to_owned()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port.ok_or(TargetError::MissingPort)?,
            None => return Err(TargetError::BadIpv6(raw.to_owned())),
        };
        return Ok(Target {
            host: Host::Ip(IpAddr::V6(ip)),
            port,
        });
    }
    let (host, port) = match raw.rsplit_once(':') {
        Some((h, p)) => (h, parse_port(p)?),
        None => (raw, default_port.ok_or(TargetError::MissingPort)?),
    };
    if host.contains(':') {
        // An unbracketed IPv6 address, or garbage.
        return Err(TargetError::BadName(host.to_owned()));
    }
    Ok(Target {
        host: canonical_host(host)?,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(s.to_owned())
    }

    #[test]
    fn names_are_canonicalised() {
        assert_eq!(canonical_host("Example.COM").unwrap(), name("example.com"));
        assert_eq!(canonical_host("example.com.").unwrap(), name("example.com"));
        assert_eq!(
            canonical_host("bücher.example").unwrap(),
            name("xn--bcher-kva.example")
        );
        assert_eq!(
            canonical_host("xn--bcher-kva.example").unwrap(),
            name("xn--bcher-kva.example")
        );
        // Full-width dots and letters map to their ASCII forms.
        assert_eq!(
            canonical_host("ＥＸＡＭＰＬＥ。com").unwrap(),
            name("example.com")
        );
        assert_eq!(
            canonical_host("r1---sn-abc.googlevideo.com").unwrap(),
            name("r1---sn-abc.googlevideo.com")
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            ".",
            "a..b",
            "example.com..",
            "-a.com",
            "a-.com",
            "exa mple.com",
            "a_b.com",
            "a/b",
            "a\\b",
            "a%2eb",
            "\u{0}x.com",
            "ex\u{200b}ample..com",
        ] {
            assert!(canonical_host(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(canonical_host(&long).is_err());
        let too_long = vec!["a".repeat(60); 5].join(".");
        assert!(canonical_host(&too_long).is_err());
    }

    #[test]
    fn numbers_in_disguise_are_refused() {
        assert_eq!(
            canonical_host("127.0.0.1").unwrap(),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        for bad in [
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.0.0.01",
            "1.2.3.4.5",
            "example.123",
            "a.0x10",
        ] {
            assert!(
                matches!(canonical_host(bad), Err(TargetError::AmbiguousNumeric(_))),
                "{bad:?}: {:?}",
                canonical_host(bad)
            );
        }
        // A number inside a name is fine.
        assert_eq!(canonical_host("123.example").unwrap(), name("123.example"));
    }

    #[test]
    fn authorities_parse() {
        let t = parse_authority("Origin.Test:8443", None).unwrap();
        assert_eq!(
            t,
            Target {
                host: name("origin.test"),
                port: 8443
            }
        );
        assert_eq!(t.to_string(), "origin.test:8443");
        let t = parse_authority("[::1]:443", None).unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(t.to_string(), "[::1]:443");
        assert_eq!(parse_authority("example.com", Some(80)).unwrap().port, 80);
        assert_eq!(parse_authority("[2001:db8::1]", Some(80)).unwrap().port, 80);
        for bad in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "example.com:8o",
            "::1:443",
            "[::1]443",
            "[fe80::1%eth0]:443",
            "[::1:443",
            "user@example.com:443",
            "[1.2.3.4]:443",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad:?} accepted");
        }
    }
}
