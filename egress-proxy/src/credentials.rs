//! Credentials the agent never holds: `[[credentials]]` entries set a header on inspected
//! requests to one host (and optional path prefix) from a secret file on the proxy host.
//!
//! The agent is given a placeholder (`tank-credential-NAME`) where its tools expect the
//! secret. On a matching request the proxy sets the header to the operator's template with
//! the secret in it, whether the agent sent the header absent or with the placeholder; any
//! other value is refused (`credential-mismatch`), so a key the agent found elsewhere cannot
//! ride on the rule. On the way back, the secret is masked (same length, `*`) in response
//! headers and bodies, and the origin is asked for an unencoded body, so an origin echoing
//! its request (httpbin's `/headers`) cannot hand the secret to the agent. Redirects are not
//! followed by the proxy: a request to another host is a new request, to which this
//! credential does not apply.
//!
//! The secret is read when the policy loads (and again on every reload), must not be
//! readable by others, and never appears in the config, a log line, a record, a metric or
//! an error: [`Secret`] has no `Display` and its `Debug` is redacted.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use http::{HeaderName, HeaderValue};

/// The placeholder the agent is given for credential `name`.
pub fn placeholder(name: &str) -> String {
    format!("tank-credential-{name}")
}

/// Secret bytes; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Reads a secret file: one value, a trailing newline dropped. The file must exist,
    /// be a regular file not readable by others, and hold a non-empty single-line value.
    /// Errors name the file, never its content.
    pub fn read(path: &Path) -> Result<Secret, String> {
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("secret file `{}`: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!(
                "secret file `{}` is not a regular file",
                path.display()
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(format!(
                "secret file `{}` is accessible to others (mode {mode:o}); chmod o-rwx it",
                path.display()
            ));
        }
        let mut bytes =
            std::fs::read(path).map_err(|e| format!("secret file `{}`: {e}", path.display()))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(format!("secret file `{}` is empty", path.display()));
        }
        if bytes.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(format!(
                "secret file `{}` holds control characters or more than one line",
                path.display()
            ));
        }
        Ok(Secret(bytes))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// One `[[credentials]]` entry, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// Its name: in the placeholder and in request records.
    pub name: String,
    /// The canonical host it is for (exactly; no wildcard).
    pub host: String,
    /// Only requests whose normalised path starts with this.
    pub path_prefix: Option<String>,
    /// The header set.
    pub header: HeaderName,
    /// The header value with `{secret}` in it.
    pub template: String,
    /// Where the secret was read from.
    pub secret_file: PathBuf,
    /// The secret.
    pub secret: Secret,
}

/// What a credential did to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Set: the header now carries the secret.
    Injected,
    /// The agent sent its own value: refuse.
    Mismatch,
}

impl Credential {
    /// Whether this credential is for a request to `host` with `path`.
    pub fn applies(&self, host: &str, path: &str) -> bool {
        self.host == host
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }

    /// The value the agent may send: the template with the placeholder for the secret.
    pub fn placeholder_value(&self) -> String {
        self.template.replace("{secret}", &placeholder(&self.name))
    }

    fn value(&self) -> HeaderValue {
        let (before, after) = self
            .template
            .split_once("{secret}")
            .expect("validated: the template holds {secret}");
        let mut v = Vec::with_capacity(self.template.len() + self.secret.0.len());
        v.extend_from_slice(before.as_bytes());
        v.extend_from_slice(&self.secret.0);
        v.extend_from_slice(after.as_bytes());
        let mut value = HeaderValue::from_bytes(&v).expect("validated: header-safe bytes");
        value.set_sensitive(true);
        value
    }

    /// Sets the header on `headers`, or says the agent sent a value of its own.
    pub fn apply(&self, headers: &mut http::HeaderMap) -> Applied {
        let sent: Vec<_> = headers.get_all(&self.header).iter().collect();
        let placeholder = self.placeholder_value();
        if sent.len() > 1
            || sent
                .first()
                .is_some_and(|v| v.as_bytes() != placeholder.as_bytes())
        {
            return Applied::Mismatch;
        }
        headers.insert(self.header.clone(), self.value());
        // An encoded body would hide an echoed secret from the mask.
        headers.remove(http::header::ACCEPT_ENCODING);
        Applied::Injected
    }
}

/// Replaces every occurrence of `secret` in `buf` with `*`s of the same length.
pub fn mask(buf: &mut [u8], secret: &[u8]) -> usize {
    if secret.is_empty() || buf.len() < secret.len() {
        return 0;
    }
    let mut n = 0;
    let mut i = 0;
    while i + secret.len() <= buf.len() {
        if &buf[i..i + secret.len()] == secret {
            buf[i..i + secret.len()].fill(b'*');
            n += 1;
            i += secret.len();
        } else {
            i += 1;
        }
    }
    n
}

/// Masks a secret in a byte stream that arrives in pieces: keeps back only the end of a
/// piece that could begin an occurrence (its longest suffix that is a prefix of the secret),
/// so a stream that does not end in such bytes passes on at once (WebSocket frames too).
#[derive(Debug)]
pub struct StreamMask {
    secret: Vec<u8>,
    carry: Vec<u8>,
}

impl StreamMask {
    /// A mask for `secret`.
    pub fn new(secret: &Secret) -> Self {
        Self {
            secret: secret.0.clone(),
            carry: Vec::new(),
        }
    }

    /// Feeds a piece; returns the bytes that can be passed on.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(piece);
        mask(&mut buf, &self.secret);
        let keep = (1..self.secret.len())
            .rev()
            .filter(|&k| k <= buf.len())
            .find(|&k| buf[buf.len() - k..] == self.secret[..k])
            .unwrap_or(0);
        self.carry = buf.split_off(buf.len() - keep);
        buf
    }

    /// Whether bytes are held back.
    pub fn holding(&self) -> bool {
        !self.carry.is_empty()
    }

    /// The bytes held back: at the end of the stream, or when the stream paused.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_finds_the_secret_across_piece_boundaries() {
        let secret = Secret(b"s3cr3t-value".to_vec());
        let text = b"before s3cr3t-value middle s3cr3t-values3cr3t-value end s3cr3t-valu";
        for cut in 1..text.len() {
            let mut m = StreamMask::new(&secret);
            let mut out = Vec::new();
            for piece in text.chunks(cut) {
                out.extend(m.feed(piece));
            }
            out.extend(m.finish());
            assert_eq!(out.len(), text.len());
            let out = String::from_utf8(out).unwrap();
            assert_eq!(out.matches("s3cr3t-value").count(), 0, "cut {cut}: {out}");
            assert!(out.ends_with("end s3cr3t-valu"), "{out}");
        }
        // Bytes that cannot begin the secret are not held back.
        let mut m = StreamMask::new(&secret);
        assert_eq!(m.feed(b"hello world"), b"hello world");
        assert_eq!(m.feed(b"then s3c"), b"then ");
        assert!(m.holding());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn secret_files_must_be_private_and_present() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let e = Secret::read(&p).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        std::fs::write(&p, "hunter2\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::read(&p).unwrap_err();
        assert!(
            e.contains("accessible to others") && !e.contains("hunter2"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::read(&p).unwrap().expose(), b"hunter2");
    }
}
