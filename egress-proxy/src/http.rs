//! Parsing of proxy request heads (`CONNECT host:port` and absolute-form `http://` requests),
//! the head forwarded to an origin, and the framing of request bodies.
//!
//! The parser is strict where leniency would let a request mean two things: one
//! `Content-Length` or `Transfer-Encoding: chunked`, never both; no user information in
//! URLs; the target's authority overrides the `Host` header, which is rewritten to match;
//! the path is put in normal form ([`crate::path`]) and forwarded in that form.

use crate::path::{self, PathError};
use crate::target::{parse_authority, Target, TargetError};

/// Headers accepted in one request head.
pub const MAX_HEADERS: usize = 128;

/// What a parsed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port`: a tunnel.
    Connect {
        /// Where to.
        target: Target,
    },
    /// An absolute-form `http://` request to forward.
    Http {
        /// The method, as sent (tokens are case-sensitive; rules compare uppercase).
        method: String,
        /// Where to.
        target: Target,
        /// The path (normal form) and query sent to the origin.
        path: path::Normal,
        /// The request URL for the audit log (`http://host:port/path`).
        url: String,
        /// The head to send to the origin.
        head: Vec<u8>,
        /// How the request body is delimited.
        body: BodyKind,
    },
}

impl Request {
    /// The target.
    pub fn target(&self) -> &Target {
        match self {
            Request::Connect { target } | Request::Http { target, .. } => target,
        }
    }
    /// The method (`CONNECT` for tunnels).
    pub fn method(&self) -> &str {
        match self {
            Request::Connect { .. } => "CONNECT",
            Request::Http { method, .. } => method,
        }
    }
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Why a head was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x syntax.
    #[error("malformed request: {0}")]
    Syntax(&'static str),
    /// More than [`MAX_HEADERS`] headers.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// Well-formed, but not something a forward proxy serves.
    #[error("unsupported request: {0}")]
    Unsupported(&'static str),
    /// The target is malformed.
    #[error("invalid target: {0}")]
    Target(#[from] TargetError),
    /// The path cannot be put in normal form.
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    /// Ambiguous body framing.
    #[error("ambiguous body framing: {0}")]
    Framing(&'static str),
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read more.
/// On success also returns the length of the head (body bytes may follow it in `buf`).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Syntax(syntax_name(e))),
    };
    let method = req.method.ok_or(HeadError::Syntax("no method"))?;
    let uri = req.path.ok_or(HeadError::Syntax("no request target"))?;
    if req.version != Some(1) && req.version != Some(0) {
        return Err(HeadError::Unsupported("HTTP version"));
    }
    if method == "CONNECT" {
        let target = parse_authority(uri, None)?;
        return Ok(Some((Request::Connect { target }, len)));
    }
    let rest =
        strip_prefix_ci(uri, "http://").ok_or(if strip_prefix_ci(uri, "https://").is_some() {
            HeadError::Unsupported("https:// URLs must be tunnelled with CONNECT")
        } else if uri.starts_with('/') {
            HeadError::Unsupported(
                "origin-form request: this is a forward proxy, send an absolute URL or CONNECT",
            )
        } else {
            HeadError::Unsupported("only http:// URLs and CONNECT are served")
        })?;
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let target = parse_authority(authority, Some(80))?;
    let tail = tail.split('#').next().unwrap_or("");
    let path = path::normalise(&match tail {
        "" => "/".to_owned(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_owned(),
    })?;
    let origin_form = path.to_string();

    // Body framing and the head for the origin.
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut connection_tokens: Vec<String> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection")
            || h.name.eq_ignore_ascii_case("proxy-connection")
        {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::Syntax("non-ASCII Connection header"))?;
            connection_tokens.extend(
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    let mut head = Vec::with_capacity(len + 64);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(origin_form.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    // The authority as the origin expects it: no port when it is the default.
    let host_header = if target.port == 80 {
        target.host.to_string()
    } else {
        target.to_string()
    };
    let url = format!("http://{host_header}{origin_form}");
    head.extend_from_slice(host_header.as_bytes());
    head.extend_from_slice(b"\r\n");
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "content-length" {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::Framing("invalid Content-Length"))?
                .trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Framing("invalid Content-Length"));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| HeadError::Framing("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(HeadError::Framing("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name == "transfer-encoding" {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::Framing("invalid Transfer-Encoding"))?;
            if chunked || !v.trim().eq_ignore_ascii_case("chunked") {
                return Err(HeadError::Framing(
                    "only a single `Transfer-Encoding: chunked` is supported",
                ));
            }
            chunked = true;
        }
        let hop_by_hop = matches!(
            name.as_str(),
            "host"
                | "connection"
                | "proxy-connection"
                | "keep-alive"
                | "proxy-authorization"
                | "proxy-authenticate"
                | "te"
                | "trailer"
                | "upgrade"
        ) || connection_tokens
            .iter()
            .any(|t| *t == name && t != "transfer-encoding" && t != "content-length");
        if hop_by_hop {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let body = match (content_length, chunked) {
        (Some(_), true) => {
            return Err(HeadError::Framing(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(0), false) | (None, false) => BodyKind::None,
        (Some(n), false) => BodyKind::Length(n),
        (None, true) => BodyKind::Chunked,
    };
    Ok(Some((
        Request::Http {
            method: method.to_owned(),
            target,
            path,
            url,
            head,
            body,
        },
        len,
    )))
}

/// Accumulates a request head as it arrives and parses it once: when its first line is in
/// (so garbage is refused early) and when its end is. The search for the end resumes where
/// it stopped, so a head trickled in small pieces costs time linear in its length.
#[derive(Debug, Default)]
pub struct HeadReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of the head.
    searched: usize,
    first_line_checked: bool,
    scanned: u64,
}

impl HeadReader {
    /// Adds the next bytes. `Ok(Some((request, rest)))` once the head is complete, with the
    /// bytes that followed it.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<(Request, Vec<u8>)>, HeadError> {
        self.buf.extend_from_slice(bytes);
        // An end (`\n\n` or `\n\r\n`) may straddle the previous push: back up two bytes.
        let from = self.searched.saturating_sub(2);
        self.scanned += (self.buf.len() - from) as u64;
        let end = self.buf[from..]
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .find_map(|(i, _)| {
                let at = from + i;
                match self.buf.get(at + 1..) {
                    Some([b'\n', ..]) => Some(at + 2),
                    Some([b'\r', b'\n', ..]) => Some(at + 3),
                    _ => None,
                }
            });
        let first_push = self.searched == 0;
        self.searched = self.buf.len();
        // Early parses: on the first bytes (a TLS ClientHello sent to the proxy port), and
        // once the first line is in. Twice at most, so still linear.
        let line_done = !self.first_line_checked && self.buf[from..].contains(&b'\n');
        if end.is_none() && (first_push || line_done) {
            self.first_line_checked |= line_done;
            self.scanned += self.buf.len() as u64;
            parse_request(&self.buf)?;
        }
        let Some(end) = end else {
            return Ok(None);
        };
        self.scanned += end as u64;
        match parse_request(&self.buf[..end])? {
            Some((req, len)) => Ok(Some((req, self.buf.split_off(len)))),
            None => Err(HeadError::Syntax("incomplete head")),
        }
    }

    /// Bytes held so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has arrived.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes examined so far, counting each parse and search: the parsing cost.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
    .then(|| &s[prefix.len()..])
}

fn syntax_name(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid method token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// Finds the end of a chunked body in a stream of bytes, without buffering it.
#[derive(Clone, Debug, Default)]
pub struct ChunkedScanner {
    state: ChunkState,
    line_bytes: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeDigits(u64),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body that does not follow RFC 9112.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

/// Longest chunk-size line or trailer line accepted.
const MAX_CHUNK_LINE: usize = 8 * 1024;

impl ChunkedScanner {
    /// Feeds the next bytes of the body. `Ok(Some(n))`: the body ends after `buf[..n]`;
    /// `Ok(None)`: all of `buf` is body and more is to come.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<usize>, ChunkError> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            if let Data(n) = self.state {
                let take = n.min((buf.len() - i) as u64);
                i += take as usize;
                self.state = if take == n { DataCr } else { Data(n - take) };
                continue;
            }
            let b = buf[i];
            i += 1;
            self.line_bytes += 1;
            if self.line_bytes > MAX_CHUNK_LINE {
                return Err(ChunkError);
            }
            self.state = match (self.state, b) {
                (Size, b) => SizeDigits(hex(b).ok_or(ChunkError)?),
                (SizeDigits(v), b) if hex(b).is_some() => {
                    if v >> 60 != 0 {
                        return Err(ChunkError);
                    }
                    SizeDigits(v << 4 | hex(b).unwrap_or(0))
                }
                (SizeDigits(v), b';' | b' ' | b'\t') => Ext(v),
                (SizeDigits(v) | Ext(v), b'\r') => SizeLf(v),
                (Ext(v), b) if b == b'\t' || (b' '..=b'~').contains(&b) => Ext(v),
                (SizeLf(0), b'\n') => {
                    self.line_bytes = 0;
                    TrailerStart
                }
                (SizeLf(v), b'\n') => {
                    self.line_bytes = 0;
                    Data(v)
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.line_bytes = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b) if b != b'\r' && b != b'\n' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => {
                    self.line_bytes = 0;
                    TrailerStart
                }
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok(Some(i));
                }
                _ => return Err(ChunkError),
            };
        }
        Ok(None)
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// A short response the proxy itself sends (refusals, errors, the CONNECT answer).
pub fn response(status: u16, reason: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    if status != 200 || !body.is_empty() {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Host;

    fn parse(s: &str) -> Result<Option<(Request, usize)>, HeadError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn connect() {
        let req = "CONNECT Origin.Test:8443 HTTP/1.1\r\nHost: origin.test:8443\r\n\r\nTLS";
        let (r, n) = parse(req).unwrap().unwrap();
        assert_eq!(n, req.len() - 3);
        assert_eq!(r.method(), "CONNECT");
        assert_eq!(r.target().to_string(), "origin.test:8443");
        assert_eq!(
            parse("CONNECT origin.test:8443 HTTP/1.1\r\nHost: x").unwrap(),
            None
        );
        assert!(matches!(
            parse("CONNECT origin.test HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target(TargetError::MissingPort))
        ));
        assert!(matches!(
            parse("CONNECT 127.1:80 HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target(_))
        ));
        assert!(matches!(
            parse("CONNECT a b HTTP/1.1\r\n\r\n"),
            Err(HeadError::Syntax(_))
        ));
        assert!(matches!(
            parse("CONNECT a:1 HTTP/2.0\r\n\r\n"),
            Err(HeadError::Syntax(_))
        ));
    }

    #[test]
    fn absolute_form_is_rewritten() {
        let req = "GET http://Files.Test/pub/a?b=c#frag HTTP/1.1\r\nHost: evil.test\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n";
        let (r, _) = parse(req).unwrap().unwrap();
        let Request::Http {
            method,
            target,
            path,
            url,
            head,
            body,
        } = r
        else {
            panic!()
        };
        assert_eq!(method, "GET");
        assert_eq!(target.host, Host::Name("files.test".into()));
        assert_eq!(target.port, 80);
        assert_eq!(path.to_string(), "/pub/a?b=c");
        assert_eq!(url, "http://files.test/pub/a?b=c");
        assert_eq!(body, BodyKind::None);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /pub/a?b=c HTTP/1.1\r\nHost: files.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let (r, _) = parse("POST http://a.test:8080?x HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        let Request::Http {
            path, head, body, ..
        } = r
        else {
            panic!()
        };
        assert_eq!(path.to_string(), "/?x");
        assert_eq!(body, BodyKind::Length(5));
        assert!(String::from_utf8(head)
            .unwrap()
            .starts_with("POST /?x HTTP/1.1\r\nHost: a.test:8080\r\nContent-Length: 5\r\n"));
    }

    #[test]
    fn refused_forms() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(HeadError::Unsupported(_))
        ));
        assert!(matches!(
            parse("GET https://a.test/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Unsupported(_))
        ));
        assert!(matches!(
            parse("GET ftp://a.test/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Unsupported(_))
        ));
        assert!(matches!(
            parse("GET http://u:p@a.test/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target(TargetError::UserInfo))
        ));
        assert!(matches!(
            parse("POST http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Framing(_))
        ));
        assert!(matches!(
            parse("POST http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::Framing(_))
        ));
        assert!(matches!(
            parse("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::Framing(_))
        ));
        assert!(matches!(
            parse("POST http://a.test/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::Framing(_))
        ));
        let many = format!(
            "GET http://a.test/ HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse(&many), Err(HeadError::TooManyHeaders));
    }

    #[test]
    fn a_trickled_head_is_parsed_in_linear_time() {
        let pad = "x".repeat(1 << 20);
        let head = format!("CONNECT a.test:443 HTTP/1.1\r\nX-Pad: {pad}\r\n\r\nEARLY");
        let mut r = HeadReader::default();
        let mut done = None;
        for piece in head.as_bytes().chunks(100) {
            if let Some(x) = r.push(piece).unwrap() {
                done = Some(x);
            }
        }
        let (req, rest) = done.expect("the head completes");
        assert_eq!(req.method(), "CONNECT");
        assert_eq!(rest, b"EARLY");
        // Each byte is searched about once (plus two per push), and the head parsed once
        // complete plus twice early at most: linear. Re-parsing on every push, as before,
        // examined about len²/200 bytes (5.5e9 here).
        assert!(
            r.scanned() <= 3 * head.len() as u64,
            "{} bytes examined for a {}-byte head",
            r.scanned(),
            head.len()
        );
        // Sent at once, or split at the end marker, it is the same.
        for split in [head.len() - 6, head.len() - 7, head.len() - 8] {
            let mut r = HeadReader::default();
            assert!(r.push(&head.as_bytes()[..split]).unwrap().is_none());
            assert!(r.push(&head.as_bytes()[split..]).unwrap().is_some());
        }
        let mut r = HeadReader::default();
        assert!(r
            .push(b"GET http://a.test/ HTTP/1.1\nHost: a\n\n")
            .unwrap()
            .is_some());
        // Garbage is refused when its first line is in, not when the size cap is hit.
        let mut r = HeadReader::default();
        assert!(r.push(b"\x16\x03\x01 garbage").is_err());
        let mut r = HeadReader::default();
        assert!(r.push(b"GET http://a.test/ HT").unwrap().is_none());
        assert!(r.push(b"TP/1.1 garbage\r\n").is_err());
    }

    #[test]
    fn chunked_scanner() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut s = ChunkedScanner::default();
        assert_eq!(s.feed(body), Ok(Some(body.len() - 4)));
        assert!(s.is_done());
        let mut s = ChunkedScanner::default();
        for (i, b) in body.iter().enumerate() {
            let r = s.feed(std::slice::from_ref(b)).unwrap();
            if i == body.len() - 5 {
                assert_eq!(r, Some(1));
                break;
            }
            assert_eq!(r, None, "at {i}");
        }
        assert_eq!(ChunkedScanner::default().feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(ChunkedScanner::default().feed(b"x\r\n"), Err(ChunkError));
        assert_eq!(ChunkedScanner::default().feed(b"1\r\nab"), Err(ChunkError));
        assert_eq!(
            ChunkedScanner::default().feed(b"11111111111111111\r\n"),
            Err(ChunkError)
        );
    }
}
