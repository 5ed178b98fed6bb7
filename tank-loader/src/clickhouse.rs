//! Audit records read back from ClickHouse, the fleet's log store, for `audit verify
//! --clickhouse` and `audit cross-check --clickhouse`, and written into it for `audit
//! backfill` (crate::backfill).
//!
//! A shipper on every host inserts each record's exact line into one table
//! (image/fleet/clickhouse.sql); the server derives the typed columns (`seq`, `time_ms`, ...)
//! from the line. Here each chain (one host's kernel or proxy log) is read back in chain order
//! (`ORDER BY seq`), page by page, and its lines go to the same verifier and cross-check as the
//! lines of a file, so the store gives the same verdicts as the files it was shipped from.
//!
//! The client is a small blocking HTTP/1.1 one over `std::net` (a query per page, `POST`, the
//! answer in `TabSeparated`; an insert is its rows after the `INSERT`, in the shipper's
//! JSONEachRow): plain HTTP only, as ClickHouse's HTTP interface listens by
//! default. docs/operations.md ("Fleet") says how to reach a store over TLS.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;
use tank_ebpf_common::chain::{self, Hash, Line, Report};
use tank_ebpf_common::ocsf::LogName;

use crate::crosscheck::Source;

/// The table image/fleet/clickhouse.sql creates.
pub const DEFAULT_TABLE: &str = "tank.audit";

/// Rows asked for at once, split between the chains read side by side (a cross-check reads
/// every chain at once): about this many rows are held in memory, whatever the store's size.
const PAGE_BUDGET: usize = 200_000;
/// The fewest rows a page asks for.
const PAGE_MIN: usize = 256;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the store is: `http://[USER[:PASSWORD]@]HOST:PORT[/]`, as `--clickhouse` takes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    /// `HOST:PORT` (`[v6]:PORT`).
    authority: String,
    user: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some(user) => write!(f, "http://{user}@{}", self.authority),
            None => write!(f, "http://{}", self.authority),
        }
    }
}

impl std::str::FromStr for Url {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            if s.starts_with("https://") {
                "https is not supported: reach the store over plain HTTP (a local TLS tunnel, docs/operations.md \"Fleet\")".to_owned()
            } else {
                "expected http://[USER[:PASSWORD]@]HOST:PORT".to_owned()
            }
        })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(
                "expected http://[USER[:PASSWORD]@]HOST:PORT with no path or query (the table is --table)"
                    .to_owned(),
            );
        }
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!(
                "`{authority}`: expected HOST:PORT (ClickHouse's HTTP port, 8123 by default)"
            ));
        }
        let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
            None => (None, None),
        };
        Ok(Self {
            authority: authority.to_owned(),
            user,
            password,
        })
    }
}

/// Failure to read from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached or the connection broke.
    #[error("ClickHouse at {url}: {source}")]
    Io {
        /// The store.
        url: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server answered with an error (its first line).
    #[error("ClickHouse at {url} refused the query: {message}")]
    Query {
        /// The store.
        url: String,
        /// What it said.
        message: String,
    },
    /// The answer is not what the query asks for.
    #[error("ClickHouse at {url}: unexpected answer: {what}")]
    Answer {
        /// The store.
        url: String,
        /// What is wrong with it.
        what: String,
    },
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Which records to read: the whole store, or some hosts and a time range.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these hosts (the shipper's `host` column); all when empty.
    pub hosts: Vec<String>,
    /// Records from this time on (ms since the epoch).
    pub since: Option<i64>,
    /// Records up to this time.
    pub until: Option<i64>,
}

/// One chain in the store: one host's log of one kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Chain {
    /// The shipper's `host`.
    pub host: String,
    /// Kernel or proxy log.
    pub log: LogName,
    /// The shipper's `name` of the log ('' for the host's one log of that kind).
    pub name: String,
    /// Rows in the range.
    pub rows: u64,
    /// The first `seq` read. Without a time range it is the chain's start; with one, the
    /// first record at or after `since`, and what came before it is not checked.
    pub first_seq: u64,
    /// The last `seq` read.
    pub last_seq: u64,
    /// A time range cut the chain: it starts at `first_seq` on purpose.
    pub ranged: bool,
}

impl Chain {
    /// How reports name it: `clickhouse host=agent-1 log=kernel` (`name=` when it has one).
    pub fn label(&self) -> String {
        let mut label = format!("clickhouse host={} log={}", self.host, self.log.as_str());
        if !self.name.is_empty() {
            label += &format!(" name={}", self.name);
        }
        if self.ranged {
            label += &format!(" seq={}..={}", self.first_seq, self.last_seq);
        }
        label
    }
}

/// A ClickHouse server and the table tank's records are in.
#[derive(Clone, Debug)]
pub struct Store {
    url: Url,
    table: String,
}

impl std::fmt::Display for Store {
    /// `tank.audit at http://logs:8123` (never the password).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.table, self.url)
    }
}

impl Store {
    /// The store at `url`, table `table` (`DATABASE.TABLE` or `TABLE`).
    pub fn new(url: Url, table: &str) -> Result<Self, String> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !s.as_bytes()[0].is_ascii_digit()
        };
        if !table.split('.').all(ident) || table.split('.').count() > 2 {
            return Err(format!(
                "table `{table}`: expected DATABASE.TABLE of letters, digits and `_`"
            ));
        }
        Ok(Self {
            url,
            table: table.to_owned(),
        })
    }

    /// The chains `filter` selects, ordered by host, log and name.
    pub fn chains(&self, filter: &Filter) -> Result<Vec<Chain>, Error> {
        let mut clauses = Vec::new();
        if !filter.hosts.is_empty() {
            let hosts: Vec<String> = filter.hosts.iter().map(|h| quote(h)).collect();
            clauses.push(format!("host IN ({})", hosts.join(", ")));
        }
        if let Some(since) = filter.since {
            clauses.push(format!("time_ms >= {since}"));
        }
        if let Some(until) = filter.until {
            clauses.push(format!("time_ms <= {until}"));
        }
        let wher = match clauses.is_empty() {
            true => String::new(),
            false => format!(" WHERE {}", clauses.join(" AND ")),
        };
        let body = self.query(
            format!(
                "SELECT host, log, name, count(), min(seq), max(seq) FROM {}{wher} \
                 GROUP BY host, log, name ORDER BY host, log, name FORMAT TabSeparated",
                self.table
            )
            .as_bytes(),
        )?;
        let ranged = filter.since.is_some() || filter.until.is_some();
        let mut chains = Vec::new();
        for row in body.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
            let fields: Vec<Vec<u8>> = row.split(|b| *b == b'\t').map(unescape).collect();
            if fields.len() != 6 {
                return Err(self.answer(format!("a chain row {:?}", String::from_utf8_lossy(row))));
            }
            let text = |i: usize| String::from_utf8_lossy(&fields[i]).into_owned();
            let number = |i: usize| text(i).parse::<u64>().ok();
            let log = match fields.get(1).map(Vec::as_slice) {
                Some(b"kernel") => LogName::Kernel,
                Some(b"proxy") => LogName::Proxy,
                _ => return Err(self.answer(format!("a chain row {:?}", text(0)))),
            };
            let (Some(rows), Some(first_seq), Some(last_seq)) = (number(3), number(4), number(5))
            else {
                return Err(self.answer(format!("a chain row {:?}", String::from_utf8_lossy(row))));
            };
            chains.push(Chain {
                host: text(0),
                log,
                name: text(2),
                rows,
                first_seq,
                last_seq,
                ranged,
            });
        }
        Ok(chains)
    }

    /// The lines of `chain` in chain order (`seq`, then the line for rows of one `seq`), read a
    /// page at a time of `page` rows; rows identical to the one before (a batch the shipper
    /// sent twice) are given once.
    pub fn lines(&self, chain: &Chain, page: usize) -> Lines {
        let mut wher = chain_where(&chain.host, chain.log, &chain.name);
        if chain.ranged {
            wher += &format!(" AND seq <= {}", chain.last_seq);
        }
        let from = if chain.ranged { chain.first_seq } else { 0 };
        Lines {
            rows: Rows::new(self.clone(), wher, "line", from, page),
            last: None,
        }
    }

    /// The records the store holds of one chain (`host`, `log`, `name`) from `seq` on, as
    /// `(seq, SHA-256 of the line)` in `seq` order, a row per copy: what `audit backfill`
    /// compares a host's files with, without reading every line back.
    pub fn held(
        &self,
        host: &str,
        log: LogName,
        name: &str,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, Hash), Error>> {
        let store = self.clone();
        Rows::new(
            self.clone(),
            chain_where(host, log, name),
            "lower(hex(SHA256(line)))",
            from,
            Self::page_for(1),
        )
        .map(move |row| {
            let (seq, hash) = row?;
            let hash = std::str::from_utf8(&hash)
                .ok()
                .and_then(|h| h.parse::<Hash>().ok())
                .ok_or_else(|| {
                    store.answer(format!("a hash {:?}", String::from_utf8_lossy(&hash)))
                })?;
            Ok((seq, hash))
        })
    }

    /// Inserts `rows` (JSONEachRow: one `{"host", "log", "name", "line"}` object a line, as a
    /// shipper sends them) into the table, as one insert.
    pub fn insert(&self, rows: &[u8]) -> Result<(), Error> {
        let mut body = format!(
            "INSERT INTO {} (host, log, name, line) FORMAT JSONEachRow\n",
            self.table
        )
        .into_bytes();
        body.extend_from_slice(rows);
        self.query(&body).map(drop)
    }

    /// The page size for reading `chains` chains side by side.
    fn page_for(chains: usize) -> usize {
        (PAGE_BUDGET / chains.max(1)).clamp(PAGE_MIN, 65_536)
    }

    /// The chains `filter` selects as cross-check sources, read side by side page by page.
    /// The store keeps no anchor: a cut end of a chain shows only against the host's anchor
    /// (docs/operations.md, "Fleet").
    pub fn sources(&self, filter: &Filter) -> Result<Vec<Source>, Error> {
        let chains = self.chains(filter)?;
        let page = Self::page_for(chains.len());
        Ok(chains
            .into_iter()
            .map(|chain| Source {
                label: chain.label(),
                kind: chain.log,
                anchor: None,
                starts_at: chain.ranged.then_some(chain.first_seq),
                lines: Box::new(self.lines(&chain, page).map(|l| l.map(Line::Complete))),
            })
            .collect())
    }

    /// Verifies every chain `filter` selects, one after the other, with the verifier the files
    /// go through. A chain cut by the time range starts where the range does, so the start it
    /// lacks is no problem; anything missing inside the range is.
    pub fn verify(&self, filter: &Filter) -> Result<Vec<Verified>, Error> {
        let mut out = Vec::new();
        for chain in self.chains(filter)? {
            let mut v = chain::StreamVerifier::new(None)
                .starting_at(chain.ranged.then_some(chain.first_seq));
            for line in self.lines(&chain, Self::page_for(1)) {
                v.line(&line.map_err(|e| Error::Io {
                    url: self.url.to_string(),
                    source: e,
                })?);
            }
            out.push(Verified {
                report: v.finish(),
                chain,
            });
        }
        Ok(out)
    }

    fn answer(&self, what: String) -> Error {
        Error::Answer {
            url: self.url.to_string(),
            what,
        }
    }

    /// Runs `sql` (a query, or an insert with its data after it) and returns the body of the
    /// answer.
    fn query(&self, sql: &[u8]) -> Result<Vec<u8>, Error> {
        let io = |source| Error::Io {
            url: self.url.to_string(),
            source,
        };
        let (status, body) = self.post(sql).map_err(io)?;
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            let message = text.lines().next().unwrap_or_default().trim().to_owned();
            return Err(Error::Query {
                url: self.url.to_string(),
                message: format!("HTTP {status}: {message}"),
            });
        }
        Ok(body)
    }

    fn post(&self, sql: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let addrs: Vec<_> = self.url.authority.to_socket_addrs()?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut stream = stream.ok_or(last)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        // wait_end_of_query: the server answers only once the query is done, so an error is an
        // HTTP status, never text appended to rows already sent.
        let mut head = format!(
            "POST /?wait_end_of_query=1 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: text/plain; charset=UTF-8\r\nContent-Length: {}\r\n",
            self.url.authority,
            sql.len()
        );
        if let Some(user) = &self.url.user {
            head += &format!("X-ClickHouse-User: {user}\r\n");
        }
        if let Some(password) = &self.url.password {
            head += &format!("X-ClickHouse-Key: {password}\r\n");
        }
        head += "\r\n";
        stream.write_all(head.as_bytes())?;
        stream.write_all(sql)?;
        stream.flush()?;
        read_response(BufReader::new(stream))
    }
}

/// One chain as verified from the store.
#[derive(Debug, Serialize)]
pub struct Verified {
    /// The chain.
    #[serde(flatten)]
    pub chain: Chain,
    /// What verifying it found, as `audit verify` on its files reports it.
    pub report: Report,
}

/// `audit verify --clickhouse`: verifies the chains `filter` selects, writes one report per
/// chain to `out` (JSON: an array), and returns the exit status of `audit verify`: 0 every chain
/// intact, 1 a problem found or a host of `filter.hosts` with no records, 2 the store cannot be
/// read (one line on `err`).
pub fn verify_command(
    store: &Store,
    filter: &Filter,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<u8> {
    let verified = match store.verify(filter) {
        Ok(v) => v,
        Err(e) => {
            writeln!(err, "tank-loader: {e}")?;
            return Ok(2);
        }
    };
    let absent: Vec<&String> = filter
        .hosts
        .iter()
        .filter(|h| !verified.iter().any(|v| &v.chain.host == *h))
        .collect();
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            chains: &'a [Verified],
            hosts_without_records: &'a [&'a String],
        }
        let value = Out {
            chains: &verified,
            hosts_without_records: &absent,
        };
        serde_json::to_writer_pretty(&mut *out, &value)?;
        writeln!(out)?;
    } else {
        for v in &verified {
            out.write_all(v.report.render(&v.chain.label()).as_bytes())?;
        }
        for host in &absent {
            writeln!(
                out,
                "clickhouse host={host}: NOT verified: no records in the store"
            )?;
        }
        if verified.is_empty() && absent.is_empty() {
            writeln!(out, "{}: NOT verified: no records match", store.url)?;
        }
    }
    let intact = verified.iter().all(|v| v.report.is_intact());
    Ok(if intact && absent.is_empty() && !verified.is_empty() {
        0
    } else {
        1
    })
}

/// Parses an HTTP/1.1 response: its status and its body (chunked, sized, or to the end).
fn read_response(mut r: impl BufRead) -> io::Result<(u16, Vec<u8>)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad HTTP answer: {what}"),
        )
    };
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| bad("status line"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("headers cut short"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad("header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad("content-length"))?);
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = line.trim_end().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(|_| bad("chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok((status, body))
}

/// A string as a ClickHouse literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A `TabSeparated` field back to its bytes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(0x08),
            Some(b'f') => out.push(0x0c),
            Some(b'0') => out.push(0),
            Some(&other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    out
}

/// Ends a page of `rows` (asked for `page` rows, ordered by seq): the `seq` the next page
/// starts at, or `None` when this was the last page. A full page may end inside a run of rows
/// of one `seq`; that run is left for the next page, so none of it is lost between pages.
fn cut_page(rows: &mut Vec<(u64, Vec<u8>)>, page: usize) -> Option<u64> {
    if rows.len() < page {
        return None;
    }
    let (first, last) = (rows.first()?.0, rows.last()?.0);
    if first == last {
        // A page all of one seq (a flood of copies): take it and go on after that seq.
        return Some(last.saturating_add(1));
    }
    rows.retain(|(seq, _)| *seq != last);
    Some(last)
}

/// The `where` of one chain's rows.
fn chain_where(host: &str, log: LogName, name: &str) -> String {
    format!(
        "host = {} AND log = '{}' AND name = {}",
        quote(host),
        log.as_str(),
        quote(name)
    )
}

/// One column of one chain's rows with their `seq`, in `seq` order, page by page: every copy
/// of a row, as the store holds it.
struct Rows {
    store: Store,
    wher: String,
    column: &'static str,
    next_seq: u64,
    page: usize,
    rows: std::vec::IntoIter<(u64, Vec<u8>)>,
    done: bool,
}

impl Rows {
    fn new(store: Store, wher: String, column: &'static str, from: u64, page: usize) -> Self {
        Self {
            store,
            wher,
            column,
            next_seq: from,
            page: page.max(PAGE_MIN),
            rows: Vec::new().into_iter(),
            done: false,
        }
    }

    /// The next page: rows from `next_seq` on.
    fn fetch(&mut self) -> Result<(), Error> {
        let body = self.store.query(
            format!(
                "SELECT seq, {c} FROM {} WHERE {} AND seq >= {} ORDER BY seq, {c} LIMIT {} \
                 FORMAT TabSeparated",
                self.store.table,
                self.wher,
                self.next_seq,
                self.page,
                c = self.column,
            )
            .as_bytes(),
        )?;
        let mut rows = Vec::new();
        for row in body.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
            let (seq, value) = match row.iter().position(|b| *b == b'\t') {
                Some(tab) => (
                    std::str::from_utf8(&row[..tab])
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok()),
                    &row[tab + 1..],
                ),
                None => (None, &row[..0]),
            };
            let seq = seq.ok_or_else(|| {
                self.store
                    .answer(format!("a row {:?}", String::from_utf8_lossy(row)))
            })?;
            rows.push((seq, unescape(value)));
        }
        match cut_page(&mut rows, self.page) {
            Some(next) => self.next_seq = next,
            None => self.done = true,
        }
        self.rows = rows.into_iter();
        Ok(())
    }
}

impl Iterator for Rows {
    type Item = Result<(u64, Vec<u8>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.rows.next() {
                return Some(Ok(row));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// The lines of one chain, page by page ([`Store::lines`]).
pub struct Lines {
    rows: Rows,
    last: Option<(u64, Vec<u8>)>,
}

impl Iterator for Lines {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let row = match self.rows.next()? {
                Ok(row) => row,
                Err(e) => return Some(Err(e.into())),
            };
            if self.last.as_ref() == Some(&row) {
                continue;
            }
            self.last = Some(row.clone());
            return Some(Ok(row.1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_the_password() {
        let u: Url = "http://auditor:s3cret@logs.example:8123/".parse().unwrap();
        assert_eq!(u.authority, "logs.example:8123");
        assert_eq!(u.user.as_deref(), Some("auditor"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.to_string(), "http://auditor@logs.example:8123");
        assert!(!format!("{u:?}").contains("s3cret"));
        let v6: Url = "http://[::1]:8123".parse().unwrap();
        assert_eq!(v6.authority, "[::1]:8123");
        for bad in [
            "https://logs:8443",
            "logs:8123",
            "http://logs",
            "http://logs:8123/tank",
            "http://:8123",
        ] {
            assert!(bad.parse::<Url>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_are_identifiers() {
        let url: Url = "http://127.0.0.1:8123".parse().unwrap();
        for good in ["tank.audit", "audit", "a_1.b_2"] {
            assert!(Store::new(url.clone(), good).is_ok(), "{good}");
        }
        for bad in ["tank.audit; DROP", "a.b.c", "1a", "", "tank."] {
            assert!(Store::new(url.clone(), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tab_separated_fields_unescape_to_their_bytes() {
        let line = br#"{"x":"a\"b \u00e9","y":"tab	end"}"#;
        // ClickHouse escapes backslash, tab and newline in TabSeparated.
        let escaped = br#"{"x":"a\\"b \\u00e9","y":"tab\tend"}"#;
        assert_eq!(unescape(escaped), line);
        assert_eq!(unescape(b"a\\nb\\\\"), b"a\nb\\");
        assert_eq!(quote("it's \\"), r"'it\'s \\'");
    }

    #[test]
    fn a_page_never_ends_inside_a_run_of_one_seq() {
        let rows = |seqs: &[u64]| -> Vec<(u64, Vec<u8>)> {
            seqs.iter()
                .map(|s| (*s, s.to_string().into_bytes()))
                .collect()
        };
        let mut page = rows(&[1, 2, 3, 3]);
        assert_eq!(cut_page(&mut page, 4), Some(3));
        assert_eq!(
            page,
            rows(&[1, 2]),
            "both rows of seq 3 are left for the next page"
        );
        let mut page = rows(&[5, 5, 5]);
        assert_eq!(cut_page(&mut page, 3), Some(6));
        assert_eq!(page.len(), 3);
        let mut page = rows(&[7, 8]);
        assert_eq!(cut_page(&mut page, 3), None, "a short page is the last");
        assert_eq!(cut_page(&mut Vec::new(), 3), None);
    }

    #[test]
    fn responses_parse_chunked_and_sized() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x\r\n!\r\n0\r\n\r\n";
        assert_eq!(
            read_response(&chunked[..]).unwrap(),
            (200, b"hello!".to_vec())
        );
        let sized = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nCodeX";
        assert_eq!(read_response(&sized[..]).unwrap(), (500, b"Code".to_vec()));
        assert!(read_response(&b"SSH-2.0\r\n"[..]).is_err());
    }
}
