//! The TLS ClientHello at the start of an opaque tunnel, read before anything is relayed:
//! its server name (SNI) must be the CONNECT host, and the SNI and offered ALPN protocols go
//! into the tunnel's record.
//!
//! ECH (Encrypted Client Hello): the name in the clear is then only the "outer" one, and the
//! real destination is encrypted. A tunnel whose ClientHello carries the
//! `encrypted_client_hello` extension is refused (`sni-mismatch`) unless its rule is
//! `opaque`: the proxy will not vouch for a name it cannot read. (Browsers send a GREASE ECH
//! extension by default; agents' HTTP clients - curl, Python, Node, git - do not.)

use crate::policy::{Reason, Refusal};

/// What a ClientHello said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The `server_name` extension's host name.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in order.
    pub alpn: Vec<String>,
    /// Whether the `encrypted_client_hello` extension is present.
    pub ech: bool,
}

/// The outcome of parsing the first bytes of a tunnel.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TLS handshake record has begun but the ClientHello is not complete yet.
    Incomplete,
    /// The bytes are not a TLS handshake.
    NotTls,
    /// A TLS record that is not a well-formed ClientHello.
    Malformed(&'static str),
    /// A whole ClientHello.
    Hello(Hello),
}

/// ClientHellos larger than this are refused (post-quantum key shares make them ~2 KiB).
pub const MAX_HELLO: usize = 64 * 1024;

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;

/// Parses the ClientHello at the start of `buf` (it may span several TLS records).
pub fn parse(buf: &[u8]) -> Parsed {
    // Gather the handshake message from consecutive handshake records.
    let mut msg = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return if buf.get(at).is_some_and(|&b| b != HANDSHAKE)
                || (at == 0 && buf.len() >= 2 && buf[1] != 3)
            {
                Parsed::NotTls
            } else {
                Parsed::Incomplete
            };
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return if at == 0 {
                Parsed::NotTls
            } else {
                Parsed::Malformed("a non-handshake record inside the ClientHello")
            };
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 256 {
            return Parsed::Malformed("bad TLS record length");
        }
        let Some(body) = buf.get(at + 5..at + 5 + len) else {
            return Parsed::Incomplete;
        };
        msg.extend_from_slice(body);
        at += 5 + len;
        if msg.len() >= 4 {
            if msg[0] != CLIENT_HELLO {
                return Parsed::Malformed("the first handshake message is not a ClientHello");
            }
            let want = 4 + u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
            if want > MAX_HELLO {
                return Parsed::Malformed("ClientHello too large");
            }
            if msg.len() >= want {
                return match hello(&msg[4..want]) {
                    Some(h) => Parsed::Hello(h),
                    None => Parsed::Malformed("truncated ClientHello fields"),
                };
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn hello(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut out = Hello::default();
    if r.0.is_empty() {
        return Some(out); // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()? as u16;
        let mut data = Reader(exts.vec16()?);
        match kind {
            EXT_SERVER_NAME => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        out.sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    out.alpn
                        .push(String::from_utf8_lossy(list.vec8()?).into_owned());
                }
            }
            EXT_ECH => out.ech = true,
            _ => {}
        }
    }
    Some(out)
}

/// Reads the tunnel's first bytes (after `early`, bytes already read past the CONNECT head)
/// until a whole ClientHello is there, and checks it names `host`. Returns what it said and
/// every byte read, to be relayed first; or the refusal. `None` for `host` (an IP-literal
/// target) requires that no name is sent.
pub async fn check(
    stream: &mut tokio::net::TcpStream,
    mut buf: Vec<u8>,
    host: Option<&str>,
    timeout: std::time::Duration,
) -> Result<(Hello, Vec<u8>), (Option<Hello>, Refusal)> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let hello = loop {
        match parse(&buf) {
            Parsed::Hello(h) => break h,
            Parsed::NotTls => {
                return Err((None, Refusal::new(Reason::NotTls, "the tunnel is to a TLS port (tls_ports) but did not start with a TLS ClientHello; a rule with `opaque = true` allows that")))
            }
            Parsed::Malformed(why) => {
                return Err((None, Refusal::new(Reason::NotTls, format!("malformed TLS ClientHello: {why}"))))
            }
            Parsed::Incomplete => {}
        }
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => {
                return Err((
                    None,
                    Refusal::new(
                        Reason::NotTls,
                        "no TLS ClientHello within header_read_timeout_secs",
                    ),
                ))
            }
            Ok(Err(e)) => {
                return Err((
                    None,
                    Refusal::new(Reason::NotTls, format!("reading the ClientHello: {e}")),
                ))
            }
            Ok(Ok(0)) => {
                return Err((
                    None,
                    Refusal::new(
                        Reason::NotTls,
                        "the agent closed the tunnel before a ClientHello",
                    ),
                ))
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    };
    let refuse = |detail: String| {
        Err((
            Some(hello.clone()),
            Refusal::new(Reason::SniMismatch, detail),
        ))
    };
    if hello.ech {
        return refuse("the ClientHello carries encrypted_client_hello: the real server name is hidden (a rule with `opaque = true` allows that)".into());
    }
    match (host, hello.sni.as_deref()) {
        (Some(h), Some(sni)) if sni == h => {}
        (Some(h), Some(sni)) => {
            return refuse(format!(
                "the ClientHello names `{sni}`, the tunnel is to {h}"
            ))
        }
        (Some(h), None) => {
            return refuse(format!(
                "the ClientHello names no server (SNI); the tunnel is to {h}"
            ))
        }
        (None, None) => {}
        (None, Some(sni)) => {
            return refuse(format!(
                "the ClientHello names `{sni}`, the tunnel is to an address"
            ))
        }
    }
    Ok((hello, buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::rustls;

    /// A real ClientHello, as rustls sends it.
    fn rustls_hello(name: &str, alpn: &[&str]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_real_client_hello_gives_its_name_and_protocols() {
        let bytes = rustls_hello("Git.Example.test", &["h2", "http/1.1"]);
        let want = Hello {
            sni: Some("git.example.test".into()),
            alpn: vec!["h2".into(), "http/1.1".into()],
            ech: false,
        };
        assert_eq!(parse(&bytes), Parsed::Hello(want.clone()));
        for cut in 0..bytes.len() {
            let p = parse(&bytes[..cut]);
            assert_eq!(p, Parsed::Incomplete, "cut at {cut}");
        }
        // Split across two records, as a client may.
        let body = &bytes[5..];
        let mut two = vec![0x16, 3, 1, 0, 10];
        two.extend_from_slice(&body[..10]);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&((body.len() - 10) as u16).to_be_bytes());
        two.extend_from_slice(&body[10..]);
        assert_eq!(parse(&two), Parsed::Hello(want));
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.6\r\n"), Parsed::NotTls);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Parsed::NotTls);
        assert_eq!(parse(b"\x16\x01garbage"), Parsed::NotTls);
        assert_eq!(parse(b"\x16"), Parsed::Incomplete);
        assert!(matches!(
            parse(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Parsed::Malformed(_)
        ));
    }
}
