//! The one place a request path is normalised. Every `path_prefixes` rule, allowed and
//! denied, is judged on the normal form, and the normal form is what the origin is sent,
//! so what was judged is what is served.
//!
//! Normal form ([`normalise`]):
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every other
//!   escape is kept with uppercase hex (`/%70rivate` is `/private`, `%2f` is `%2F`);
//! - repeated slashes collapse (`//private` is `/private`);
//! - dot segments are resolved as RFC 3986 §5.2.4 does (`/pub/../private` is `/private`,
//!   and `..` never climbs above `/`);
//! - an encoded slash (`%2F`) stays inside its segment: it never matches a `/` of an
//!   allowed prefix, so `/pub%2F..%2Fprivate` is not under `/pub/`. A denial is judged on
//!   the path both as it is and with every `%2F` read as a separator
//!   ([`Normal::denial_views`]), since origins differ on whether it separates;
//! - a backslash (raw or `%5C`), a NUL (`%00`) and a malformed escape are refused: origins
//!   read those in more than one way.
//!
//! The query is kept as sent and never judged. Matching is case-sensitive, as paths are.

use std::fmt;

/// A request path in normal form, with its query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normal {
    path: String,
    /// The path with each `%2F` read as a separator, when it holds one.
    separated: Option<String>,
    query: Option<String>,
}

/// Why a path cannot be normalised (the request gets a `400`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    /// A backslash, raw or encoded.
    #[error("the path holds a backslash (origins differ on whether it separates segments)")]
    Backslash,
    /// An encoded NUL.
    #[error("the path holds an encoded NUL")]
    Nul,
}

impl Normal {
    /// The path in normal form, without the query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The ways a denial reads the path: as it is, and, when it holds an encoded slash,
    /// with each `%2F` taken as a separator (and normalised again).
    pub fn denial_views(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.path.as_str()).chain(self.separated.as_deref())
    }

    /// Whether an allowed prefix (itself in normal form) covers this path.
    pub fn allowed_by(&self, prefix: &str) -> bool {
        self.path.starts_with(prefix)
    }

    /// Whether a denied prefix (itself in normal form) covers this path in any reading.
    pub fn denied_by(&self, prefix: &str) -> bool {
        self.denial_views().any(|p| p.starts_with(prefix))
    }
}

impl fmt::Display for Normal {
    /// The origin-form target sent to the origin: path, then `?query` if there was one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// Normalises an origin-form request target (`/path?query`; no fragment).
pub fn normalise(target: &str) -> Result<Normal, PathError> {
    let (raw, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(raw)?;
    let path = resolve(&decoded);
    let separated = path
        .contains("%2F")
        .then(|| resolve(&path.replace("%2F", "/")));
    Ok(Normal {
        path,
        separated,
        query,
    })
}

/// Normalises a rule's prefix the way request paths are, so the two compare. A prefix
/// keeps its trailing slash (`/pub/` matches below `/pub`, not `/public`).
pub fn normalise_prefix(prefix: &str) -> Result<String, PathError> {
    if prefix.contains('?') {
        // Judged against the path alone, a `?` could never match.
        return Err(PathError::NotAbsolute);
    }
    normalise(prefix).map(|n| n.path)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters, uppercases the others, refuses the ambiguous.
fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = h << 4 | l;
                match v {
                    0 => return Err(PathError::Nul),
                    b'\\' => return Err(PathError::Backslash),
                    v if is_unreserved(v) => out.push(v as char),
                    v => {
                        out.push('%');
                        out.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // Multi-byte characters are copied whole: `raw` is a str.
                let ch = raw[i..].chars().next().unwrap_or_default();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    Ok(out)
}

/// Collapses repeated slashes and resolves dot segments of an absolute path.
fn resolve(path: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segs.pop();
                trailing = true;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segs.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalise(s).unwrap().to_string()
    }

    #[test]
    fn normal_forms() {
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/b"), "/a/b");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/%70rivate/x"), "/private/x");
        assert_eq!(n("//private/x"), "/private/x");
        assert_eq!(n("/a///b//"), "/a/b/");
        assert_eq!(n("/./private/x"), "/private/x");
        assert_eq!(n("/pub/../private/x"), "/private/x");
        assert_eq!(n("/pub/%2e%2E/private/x"), "/private/x");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a%20b?q=%2e%2e/x"), "/a%20b?q=%2e%2e/x");
        assert_eq!(n("/%7euser"), "/~user");
        assert_eq!(n("/caf\u{e9}"), "/caf\u{e9}");
        assert_eq!(normalise("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalise("/a%5cb"), Err(PathError::Backslash));
        assert_eq!(normalise("/a%00"), Err(PathError::Nul));
        assert_eq!(normalise("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalise("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalise("a/b"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn encoded_slashes() {
        let p = normalise("/private%2fsecret.txt").unwrap();
        assert!(!p.allowed_by("/private/"));
        assert!(p.denied_by("/private/"));
        let p = normalise("/pub%2F..%2Fprivate%2Fx").unwrap();
        assert!(!p.allowed_by("/pub/"));
        assert!(p.denied_by("/private/"));
        let p = normalise("/pub/x").unwrap();
        assert!(p.allowed_by("/pub/"));
        assert!(!p.denied_by("/private/"));
    }

    #[test]
    fn prefixes() {
        assert_eq!(normalise_prefix("/pub/").unwrap(), "/pub/");
        assert_eq!(normalise_prefix("/pub").unwrap(), "/pub");
        assert_eq!(normalise_prefix("//a/./b/").unwrap(), "/a/b/");
        assert_eq!(normalise_prefix("/%70ub/").unwrap(), "/pub/");
        assert!(normalise_prefix("/a?b").is_err());
    }
}
