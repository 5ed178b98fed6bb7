//! Real clients through an inspected tunnel, each trusting the proxy's CA the way the
//! appliance configures the agent container (docs/proxy.md, image/): `SSL_CERT_FILE`
//! (OpenSSL: curl, Python), `REQUESTS_CA_BUNDLE` (requests), `NODE_EXTRA_CA_CERTS` (Node),
//! `GIT_SSL_CAINFO` (git), with the proxy from `https_proxy`. Each must reach the allowed
//! repository and be refused the other; the origin is judged by what it received.

mod common;
use common::https::{make_ca, CertKind, HttpsOrigin};
use common::websocket::WsOrigin;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Setup {
    dir: tempfile::TempDir,
    origin: HttpsOrigin,
    proxy: Proxy,
    ca: PathBuf,
}

impl Setup {
    fn new(files: Option<PathBuf>) -> Setup {
        let dir = tempdir();
        let origin = HttpsOrigin::start(
            dir.path(),
            &["github.test"],
            &["h2", "http/1.1"],
            CertKind::Good,
            files,
        );
        make_ca(dir.path(), "ca", &["github.test"]);
        let body = format!(
            r#"allowed_domains = [
  {{ domain = "github.test", ports = [{p}], inspect = true, allow_private = true, methods = ["GET"], path_prefixes = ["/repos/owner/repo/", "/git/owner/repo.git/"] }},
]
[hosts]
"github.test" = "127.0.0.1"
[inspection]
ca_dir = "ca"
upstream_ca = "{up}"
"#,
            p = origin.port,
            up = origin.ca_pem.display()
        );
        let proxy = Proxy::start(dir.path(), &body);
        let ca = dir.path().join("ca/ca.pem");
        Setup {
            dir,
            origin,
            proxy,
            ca,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://github.test:{}{path}", self.origin.port)
    }

    /// A command with the agent container's environment: proxy and CA from variables only.
    fn agent(&self, program: &str) -> Command {
        agent(program, &self.proxy, &self.ca, self.dir.path())
    }

    /// The agent-side HTTP versions of the first `n` request records.
    fn request_versions(&self, n: usize) -> Vec<String> {
        let records = wait_for(
            std::time::Duration::from_secs(10),
            "request records",
            || {
                let r = self.proxy.records();
                (r.iter().filter(|r| r["class_uid"] == 4002).count() >= n).then_some(r)
            },
        );
        records
            .iter()
            .filter(|r| r["class_uid"] == 4002)
            .map(|r| r["http_request"]["version"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// `program` with the agent container's environment: the proxy from `https_proxy`, the CA
/// from the variables the appliance sets (nothing else that could reach elsewhere).
fn agent(program: &str, proxy: &Proxy, ca: &Path, home: &Path) -> Command {
    let mut c = Command::new(program);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "CURL_CA_BUNDLE",
        "SSL_CERT_DIR",
    ] {
        c.env_remove(v);
    }
    let ca = ca.to_str().unwrap();
    c.env("https_proxy", proxy.url())
        .env("HTTPS_PROXY", proxy.url())
        .env("SSL_CERT_FILE", ca)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env("GIT_SSL_CAINFO", ca)
        .env("CARGO_HTTP_CAINFO", ca)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn curl_over_http1_and_http2() {
    require_tool("curl", "curl");
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let s = Setup::new(None);
        let out = s
            .agent("curl")
            .args([
                "-q",
                "-sS",
                "--max-time",
                "20",
                flag,
                "-w",
                "\n%{http_code}\n",
            ])
            .arg(s.url("/repos/owner/repo/issues"))
            .arg(s.url("/repos/owner/other/issues"))
            .output()
            .unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(
            t.contains("\"full_name\":\"owner/repo/issues\"") && t.contains("}\n200\n"),
            "{t}"
        );
        assert!(
            t.contains("refused: path /repos/owner/other/issues") && t.contains("\n403"),
            "{t}"
        );
        assert_eq!(s.origin.seen().len(), 1);
        // Both URLs went over one tunnel (curl reuses it); the records say which version.
        let versions = s.request_versions(2);
        assert_eq!(versions, [version, version], "{flag}");
        let records = s.proxy.records();
        let uids: std::collections::HashSet<_> = records
            .iter()
            .filter(|r| r["class_uid"] == 4002)
            .map(|r| {
                r["metadata"]["correlation_uid"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(uids.len(), 1, "{records:#?}");
    }
}

#[test]
fn python_urllib_and_requests() {
    let s = Setup::new(None);
    let script = r#"
import sys, urllib.request, urllib.error, requests
ok = urllib.request.urlopen(sys.argv[1]).read().decode()
assert '"owner/repo/issues"' in ok, ok
try:
    urllib.request.urlopen(sys.argv[2]); raise SystemExit("urllib: not refused")
except urllib.error.HTTPError as e:
    assert e.code == 403 and e.headers["X-Tank-Refused-By"] == "path-not-allowed", e
r = requests.get(sys.argv[1]); assert r.status_code == 200, r.text
r = requests.get(sys.argv[2], headers={"Accept": "application/json"})
assert r.status_code == 403 and r.json()["reason"] == "path-not-allowed", r.text
print("python ok")
"#;
    let out = s
        .agent("python3")
        .args(["-c", script])
        .arg(s.url("/repos/owner/repo/issues"))
        .arg(s.url("/repos/owner/other/issues"))
        .output()
        .expect("python3");
    assert!(
        out.status.success() && text(&out).contains("python ok"),
        "{}",
        text(&out)
    );
    assert_eq!(s.origin.seen().len(), 2);
}

/// Node's own TLS client (OpenSSL, trusting NODE_EXTRA_CA_CERTS) inside a CONNECT tunnel
/// it opens itself: Node 20's `fetch` has no proxy support without the undici package.
#[test]
fn node_https_through_a_connect_tunnel() {
    require_tool("node", "nodejs");
    let s = Setup::new(None);
    let script = r#"
const http = require('http'), https = require('https');
const [proxy, host, port] = [new URL(process.env.https_proxy), 'github.test', process.env.ORIGIN_PORT];
function get(path) {
  return new Promise((ok, fail) => {
    const c = http.request({ host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: `${host}:${port}` });
    c.on('connect', (res, socket) => {
      if (res.statusCode !== 200) return fail(new Error('CONNECT ' + res.statusCode));
      const r = https.get({ host, port, path, socket, agent: false, servername: host }, (res) => {
        let body = ''; res.on('data', (d) => body += d); res.on('end', () => ok([res.statusCode, res.headers, body]));
      });
      r.on('error', fail);
    });
    c.on('error', fail); c.end();
  });
}
(async () => {
  const [a, , body] = await get('/repos/owner/repo/issues');
  if (a !== 200 || !body.includes('owner/repo/issues')) throw new Error('allowed: ' + a + body);
  const [b, h] = await get('/repos/owner/other/issues');
  if (b !== 403 || h['x-tank-refused-by'] !== 'path-not-allowed') throw new Error('refused: ' + b);
  console.log('node ok');
})().catch((e) => { console.error(e); process.exit(1); });
"#;
    let out = s
        .agent("node")
        .args(["-e", script])
        .env("ORIGIN_PORT", s.origin.port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).contains("node ok"),
        "{}",
        text(&out)
    );
    assert_eq!(s.origin.seen().len(), 1);
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
}

/// git over dumb HTTPS: the allowed repository clones, the other one of the same host is
/// refused.
#[test]
fn git_clones_the_allowed_repository_only() {
    require_tool("git", "git");
    let files = tempdir();
    let root = files.path();
    for repo in ["repo", "other"] {
        let work = root.join(format!("work-{repo}"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("README"), format!("this is {repo}\n")).unwrap();
        git(&work, &["add", "README"]);
        git(
            &work,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "-m",
                "first",
            ],
        );
        let bare = root.join(format!("owner/{repo}.git"));
        git(
            root,
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
        git(&bare, &["update-server-info"]);
    }
    let s = Setup::new(Some(root.to_owned()));
    let dest = s.dir.path().join("clone");
    let out = s
        .agent("git")
        .arg("clone")
        .arg("-q")
        .arg(s.url("/git/owner/repo.git"))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dest.join("README")).unwrap(),
        "this is repo\n"
    );
    let out = s
        .agent("git")
        .arg("clone")
        .arg("-q")
        .arg(s.url("/git/owner/other.git"))
        .arg(s.dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the other repository was cloned");
    assert!(text(&out).contains("403"), "{}", text(&out));
    assert!(
        s.origin
            .seen()
            .iter()
            .all(|r| r.path.starts_with("/git/owner/repo.git/")),
        "{:?}",
        s.origin.seen()
    );
}

const WS_SECRET: &str = "ws-s3cr3t-0123456789abcdef";

/// A WebSocket upgrade is a request like any other: judged on method and path (and given
/// the credential), recorded, and on an allowed path relayed both ways after the origin's
/// `101`. The client is the `websockets` library, reaching the proxy from `https_proxy` and
/// trusting the CA from `SSL_CERT_FILE`; judged by what the origin received.
#[test]
fn websocket_upgrades_are_judged_then_relayed_both_ways() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let origin = WsOrigin::start(dir.path(), &["ws.test"]);
    let ca_dir = make_ca(dir.path(), "ca", &["ws.test"]);
    let token = dir.path().join("ws-token");
    std::fs::write(&token, format!("{WS_SECRET}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let body = format!(
        r#"allowed_domains = [
  {{ domain = "ws.test", ports = [{p}], inspect = true, allow_private = true, methods = ["GET"], path_prefixes = ["/ws/chat"] }},
]
[hosts]
"ws.test" = "127.0.0.1"
[inspection]
ca_dir = "ca"
upstream_ca = "{up}"
[[credentials]]
name = "ws"
host = "ws.test"
header = "Authorization"
value = "Bearer {{secret}}"
secret_file = "ws-token"
"#,
        p = origin.port,
        up = origin.ca_pem.display()
    );
    let proxy = Proxy::start(dir.path(), &body);
    let script = r#"
import asyncio, sys
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

async def main():
    # The proxy comes from https_proxy, the CA from SSL_CERT_FILE: nothing passed here.
    async with connect(sys.argv[1]) as ws:
        assert await ws.recv() == "welcome"
        await ws.send("hello M:ws-allowed")
        assert await ws.recv() == "echo:hello M:ws-allowed"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        await ws.send("whoami")
        print("WHOAMI", await ws.recv())
    try:
        async with connect(sys.argv[2]) as ws:
            raise SystemExit("the denied path was upgraded")
    except InvalidStatus as e:
        r = e.response
        assert r.status_code == 403, r.status_code
        assert r.headers["X-Tank-Refused-By"] == "path-not-allowed", r.headers
    print("websocket ok")

asyncio.run(main())
"#;
    let url = |path: &str| format!("wss://ws.test:{}{path}", origin.port);
    let out = agent("python3", &proxy, &ca_dir.join("ca.pem"), dir.path())
        .env("PYTHONPATH", common::websocket::python_path())
        .args(["-c", script])
        .arg(url("/ws/chat"))
        .arg(url("/ws/admin"))
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success() && t.contains("websocket ok"), "{t}");

    // What the origin received: one handshake, on the allowed path, with the secret the
    // proxy set; every message the client sent, in order; nothing of the denied path.
    let received = origin.received();
    let opens: Vec<_> = received.iter().filter(|e| e["event"] == "open").collect();
    assert_eq!(opens.len(), 1, "{received:#?}");
    assert_eq!(opens[0]["path"], "/ws/chat");
    assert_eq!(
        opens[0]["headers"]["authorization"],
        format!("Bearer {WS_SECRET}")
    );
    let messages: Vec<_> = received
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        ["hello M:ws-allowed", "000162696e617279", "whoami"],
        "{received:#?}"
    );
    // The origin sent the secret back in a frame; the agent got it masked.
    let whoami = t.lines().find(|l| l.starts_with("WHOAMI")).unwrap();
    assert!(
        !t.contains(WS_SECRET) && whoami.contains("Bearer ****"),
        "{whoami}"
    );

    let records = wait_for(
        std::time::Duration::from_secs(10),
        "both request records",
        || {
            let r = proxy.records();
            (r.iter().filter(|r| r["class_uid"] == 4002).count() >= 2).then_some(r)
        },
    );
    let base = format!("https://ws.test:{}", origin.port);
    let chat = record_where(
        &records,
        &[("/http_request/url/url_string", &format!("{base}/ws/chat"))],
    );
    assert_eq!(chat["http_response"]["code"], 101, "{chat:#}");
    assert_eq!(chat["unmapped"]["credential"], "ws", "{chat:#}");
    // The relayed frames are counted: three client frames out (masked, so > 40 bytes),
    // four origin frames in.
    assert!(
        chat["traffic"]["bytes_out"].as_u64().unwrap() > 40,
        "{chat:#}"
    );
    assert!(
        chat["traffic"]["bytes_in"].as_u64().unwrap() > 40,
        "{chat:#}"
    );
    let admin = record_where(
        &records,
        &[("/http_request/url/url_string", &format!("{base}/ws/admin"))],
    );
    assert_eq!(admin["http_response"]["code"], 403, "{admin:#}");
    assert_eq!(admin["unmapped"]["rule"], "path-not-allowed", "{admin:#}");
    assert!(!std::fs::read_to_string(&proxy.audit)
        .unwrap()
        .contains(WS_SECRET));
    assert!(!proxy.log_text().contains(WS_SECRET));
}
