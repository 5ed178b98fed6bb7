//! Real clients through an inspected tunnel, each trusting the proxy's CA the way the
//! appliance configures the agent container (docs/proxy.md, image/): `SSL_CERT_FILE`
//! (OpenSSL: curl, Python, `websockets`), `REQUESTS_CA_BUNDLE` (requests, pip),
//! `NODE_EXTRA_CA_CERTS` (Node, npm), `GIT_SSL_CAINFO` (git), `CARGO_HTTP_CAINFO` (cargo),
//! with the proxy from `https_proxy`. Each must reach the allowed repository or package and
//! be refused another of the same host; the origin is judged by what it received. The
//! package managers are given the test's own index only (and the proxy, which would refuse
//! and record any other host, is checked to have been asked for nothing else).

mod common;
use common::https::{make_ca, CertKind, HttpsOrigin};
use common::websocket::WsOrigin;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The proxy with an inspected tunnel's rules for two hosts of one origin: `github.test`
/// (one repository: REST API and git) and `registry.test` (the package indexes, with one
/// package each allowed).
struct Setup {
    dir: tempfile::TempDir,
    origin: HttpsOrigin,
    proxy: Proxy,
    ca: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempdir();
        let root = dir.path().join("origin");
        std::fs::create_dir_all(root.join("git")).unwrap();
        std::fs::create_dir_all(root.join("files")).unwrap();
        let origin = HttpsOrigin::start(
            dir.path(),
            &["github.test", "registry.test"],
            &["h2", "http/1.1"],
            CertKind::Good,
            Some(root),
        );
        make_ca(dir.path(), "ca", &["github.test", "registry.test"]);
        let body = format!(
            r#"allowed_domains = [
  {{ domain = "github.test", ports = [{p}], inspect = true, allow_private = true, methods = ["GET", "POST"], path_prefixes = ["/repos/owner/repo/", "/git/owner/repo.git/"] }},
  {{ domain = "registry.test", ports = [{p}], inspect = true, allow_private = true, methods = ["GET"], path_prefixes = ["/files/pypi/simple/", "/files/pypi/files/tankdemo-", "/files/npm/tankdemo", "/files/cargo/index/", "/files/cargo/dl/tankdemo/"] }},
]
[hosts]
"github.test" = "127.0.0.1"
"registry.test" = "127.0.0.1"
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

    fn registry_url(&self, path: &str) -> String {
        format!("https://registry.test:{}{path}", self.origin.port)
    }

    /// Where the origin serves `/git/` (repositories) and `/files/` from.
    fn served(&self, under: &str) -> PathBuf {
        self.dir.path().join("origin").join(under)
    }

    /// Stops the proxy (its records are then all written) and checks that every connection
    /// the clients made through it was for the test's own hosts: no client tried a public
    /// registry (such a try would have been refused, and recorded, here).
    fn only_own_hosts_were_asked(&mut self) {
        self.proxy.stop();
        let records = self.proxy.records();
        assert!(!records.is_empty());
        for r in &records {
            let host = r["dst_endpoint"]["hostname"].as_str().unwrap_or_default();
            assert!(
                ["github.test", "registry.test"].contains(&host),
                "a client asked for {host}: {r:#}"
            );
        }
    }

    /// The paths the origin received requests for.
    fn seen_paths(&self) -> Vec<String> {
        self.origin.seen().into_iter().map(|r| r.path).collect()
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
        let s = Setup::new();
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
    let s = Setup::new();
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
    let s = Setup::new();
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

/// git over smart HTTPS (`git http-backend` behind the origin): the allowed repository
/// clones, the other one of the same host is refused, over the same rules.
#[test]
fn git_clones_the_allowed_repository_only() {
    require_tool("git", "git");
    let mut s = Setup::new();
    let root = s.served("git");
    for repo in ["repo", "other"] {
        let work = s.dir.path().join(format!("work-{repo}"));
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
            &root,
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
    }
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
    // Smart HTTP: the pack came from git-upload-pack, not from files.
    let seen = s.origin.seen();
    assert!(
        seen.iter()
            .any(|r| r.method == "POST" && r.path == "/git/owner/repo.git/git-upload-pack"),
        "{seen:?}"
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
        s.seen_paths()
            .iter()
            .all(|p| p.starts_with("/git/owner/repo.git/")),
        "{:?}",
        s.seen_paths()
    );
    s.only_own_hosts_were_asked();
}

/// Runs `cmd`, returning its output; panics naming it if it cannot start.
fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

/// The hex digest of `file` by a coreutils tool (`sha1sum`, `sha256sum`).
fn digest(tool: &str, file: &Path) -> String {
    let out = run(Command::new(tool).arg(file));
    assert!(out.status.success(), "{tool}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Writes a pure-Python wheel of `name` (its module holds `MARKER = marker`) and its
/// PEP 503 page under `index` (`simple/NAME/index.html`, `files/*.whl`).
const MAKE_WHEEL: &str = r#"
import base64, hashlib, os, sys, zipfile
index, name, marker = sys.argv[1:4]
whl = f"{name}-1.0-py3-none-any.whl"
info = f"{name}-1.0.dist-info"
files = {
    f"{name}/__init__.py": f'MARKER = "{marker}"\n',
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tank-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for path, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(text.encode())}")
files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
os.makedirs(f"{index}/files", exist_ok=True)
with zipfile.ZipFile(f"{index}/files/{whl}", "w") as z:
    for path, text in files.items():
        z.writestr(path, text)
sha = hashlib.sha256(open(f"{index}/files/{whl}", "rb").read()).hexdigest()
os.makedirs(f"{index}/simple/{name}", exist_ok=True)
with open(f"{index}/simple/{name}/index.html", "w") as f:
    f.write(f'<!DOCTYPE html><html><body><a href="../../files/{whl}#sha256={sha}">{whl}</a></body></html>\n')
"#;

/// pip installs from a PEP 503 index the origin serves (`--index-url` only: no other index,
/// no cache, no version check), trusting the CA from `REQUESTS_CA_BUNDLE`; a package whose
/// files the rule does not cover is refused on its download.
#[test]
fn pip_installs_the_allowed_package_only() {
    let mut s = Setup::new();
    let index = s.served("files/pypi");
    for (name, marker) in [("tankdemo", "M:pip-allowed"), ("tankother", "M:pip-denied")] {
        let out = run(Command::new("python3")
            .args(["-c", MAKE_WHEEL])
            .arg(&index)
            .args([name, marker]));
        assert!(out.status.success(), "{}", text(&out));
    }
    let pip = |name: &str, target: &Path| {
        run(s
            .agent("python3")
            .args(["-m", "pip", "install", "--no-cache-dir", "--no-deps"])
            .args(["--disable-pip-version-check", "--no-input", "--target"])
            .arg(target)
            .arg("--index-url")
            .arg(s.registry_url("/files/pypi/simple/"))
            .arg(name)
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env_remove("PIP_EXTRA_INDEX_URL")
            .env_remove("PIP_FIND_LINKS")
            .env_remove("PYTHONPATH"))
    };
    let target = s.dir.path().join("site");
    let out = pip("tankdemo", &target);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(target.join("tankdemo/__init__.py")).unwrap(),
        "MARKER = \"M:pip-allowed\"\n"
    );
    let out = pip("tankother", &s.dir.path().join("site-other"));
    assert!(!out.status.success(), "tankother was installed");
    assert!(text(&out).contains("403"), "{}", text(&out));
    let paths = s.seen_paths();
    assert!(
        paths.contains(&"/files/pypi/files/tankdemo-1.0-py3-none-any.whl".to_owned()),
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("/files/pypi/files/tankother")),
        "{paths:?}"
    );
    s.only_own_hosts_were_asked();
}

/// npm installs from a registry the origin serves (`--registry` only, no audit, no update
/// check, its own cache), trusting the CA from `NODE_EXTRA_CA_CERTS`; another package's
/// metadata is refused.
#[test]
fn npm_installs_the_allowed_package_only() {
    require_tool("npm", "npm");
    let mut s = Setup::new();
    let registry = s.served("files/npm");
    std::fs::create_dir_all(&registry).unwrap();
    for (name, marker) in [("tankdemo", "M:npm-allowed"), ("tankother", "M:npm-denied")] {
        let src = s.dir.path().join(format!("npm-src-{name}/package"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("package.json"),
            format!(r#"{{"name":"{name}","version":"1.0.0","main":"index.js"}}"#),
        )
        .unwrap();
        std::fs::write(
            src.join("index.js"),
            format!("module.exports = '{marker}';\n"),
        )
        .unwrap();
        let tgz = registry.join(format!("{name}-1.0.0.tgz"));
        let out = run(Command::new("tar")
            .arg("-czf")
            .arg(&tgz)
            .arg("-C")
            .arg(src.parent().unwrap())
            .arg("package"));
        assert!(out.status.success(), "{}", text(&out));
        let metadata = serde_json::json!({
            "name": name,
            "dist-tags": { "latest": "1.0.0" },
            "versions": { "1.0.0": {
                "name": name, "version": "1.0.0", "main": "index.js",
                "dist": {
                    "tarball": s.registry_url(&format!("/files/npm/{name}-1.0.0.tgz")),
                    "shasum": digest("sha1sum", &tgz),
                },
            }},
        });
        std::fs::write(registry.join(name), metadata.to_string()).unwrap();
    }
    // No npmrc of the machine's: empty user and global configs of the test's own.
    let (user_rc, global_rc) = (
        s.dir.path().join("npmrc"),
        s.dir.path().join("npmrc-global"),
    );
    std::fs::write(&user_rc, "").unwrap();
    std::fs::write(&global_rc, "").unwrap();
    let npm = |name: &str, prefix: &Path| {
        std::fs::create_dir_all(prefix).unwrap();
        run(s
            .agent("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-update-notifier"])
            .arg("--registry")
            .arg(s.registry_url("/files/npm/"))
            .arg("--prefix")
            .arg(prefix)
            .arg("--cache")
            .arg(s.dir.path().join("npm-cache"))
            .arg(name)
            .env("NPM_CONFIG_USERCONFIG", &user_rc)
            .env("NPM_CONFIG_GLOBALCONFIG", &global_rc))
    };
    let prefix = s.dir.path().join("npm-project");
    let out = npm("tankdemo", &prefix);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(prefix.join("node_modules/tankdemo/index.js")).unwrap(),
        "module.exports = 'M:npm-allowed';\n"
    );
    let out = npm("tankother", &s.dir.path().join("npm-other"));
    assert!(!out.status.success(), "tankother was installed");
    assert!(text(&out).contains("403"), "{}", text(&out));
    let paths = s.seen_paths();
    assert!(
        paths.contains(&"/files/npm/tankdemo-1.0.0.tgz".to_owned()),
        "{paths:?}"
    );
    assert!(!paths.iter().any(|p| p.contains("tankother")), "{paths:?}");
    s.only_own_hosts_were_asked();
}

/// cargo fetches a crate from a sparse registry the origin serves, which replaces
/// crates.io (so nothing else is asked), with a CARGO_HOME of its own and the CA from
/// `CARGO_HTTP_CAINFO`; another crate's download is refused.
#[test]
fn cargo_fetches_the_allowed_crate_only() {
    let mut s = Setup::new();
    let index = s.served("files/cargo/index");
    std::fs::create_dir_all(index.join("ta/nk")).unwrap();
    std::fs::write(
        index.join("config.json"),
        serde_json::json!({ "dl": s.registry_url("/files/cargo/dl") }).to_string(),
    )
    .unwrap();
    for (name, marker) in [
        ("tankdemo", "M:cargo-allowed"),
        ("tankother", "M:cargo-denied"),
    ] {
        let src = s.dir.path().join(format!("crate-src-{name}"));
        let pkg = src.join(format!("{name}-0.1.0"));
        std::fs::create_dir_all(pkg.join("src")).unwrap();
        std::fs::write(
            pkg.join("Cargo.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n"),
        )
        .unwrap();
        std::fs::write(
            pkg.join("src/lib.rs"),
            format!("pub const MARKER: &str = \"{marker}\";\n"),
        )
        .unwrap();
        let dl = s.served(&format!("files/cargo/dl/{name}/0.1.0"));
        std::fs::create_dir_all(&dl).unwrap();
        let out = run(Command::new("tar")
            .arg("-czf")
            .arg(dl.join("download"))
            .arg("-C")
            .arg(&src)
            .arg(format!("{name}-0.1.0")));
        assert!(out.status.success(), "{}", text(&out));
        let line = serde_json::json!({
            "name": name, "vers": "0.1.0", "deps": [], "features": {}, "yanked": false,
            "cksum": digest("sha256sum", &dl.join("download")),
        });
        std::fs::write(index.join(format!("ta/nk/{name}")), format!("{line}\n")).unwrap();
    }
    let cargo_home = s.dir.path().join("cargo-home");
    std::fs::create_dir_all(&cargo_home).unwrap();
    std::fs::write(
        cargo_home.join("config.toml"),
        format!(
            "[source.crates-io]\nreplace-with = \"tank\"\n[source.tank]\nregistry = \"sparse+{}\"\n",
            s.registry_url("/files/cargo/index/")
        ),
    )
    .unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let fetch = |name: &str| {
        let project = s.dir.path().join(format!("uses-{name}"));
        std::fs::create_dir_all(project.join("src")).unwrap();
        std::fs::write(
            project.join("Cargo.toml"),
            format!("[package]\nname = \"uses-{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[dependencies]\n{name} = \"0.1\"\n"),
        )
        .unwrap();
        std::fs::write(project.join("src/lib.rs"), "").unwrap();
        let mut cmd = s.agent(cargo.to_str().unwrap());
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| k.starts_with("CARGO") && k != "CARGO_HTTP_CAINFO")
            {
                cmd.env_remove(k);
            }
        }
        run(cmd
            .arg("fetch")
            .arg("--manifest-path")
            .arg(project.join("Cargo.toml"))
            .env("CARGO_HOME", &cargo_home)
            .env("CARGO_HTTP_CAINFO", &s.ca)
            .env("CARGO_TERM_COLOR", "never"))
    };
    let out = fetch("tankdemo");
    assert!(out.status.success(), "{}", text(&out));
    let cached: Vec<_> = std::fs::read_dir(cargo_home.join("registry/cache"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached, ["tankdemo-0.1.0.crate"]);
    let out = fetch("tankother");
    assert!(!out.status.success(), "tankother was fetched");
    assert!(text(&out).contains("403"), "{}", text(&out));
    let paths = s.seen_paths();
    assert!(
        paths.contains(&"/files/cargo/dl/tankdemo/0.1.0/download".to_owned()),
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("/files/cargo/dl/tankother")),
        "{paths:?}"
    );
    s.only_own_hosts_were_asked();
}

/// The proxy's records, once (bounded wait) it holds `n` request records.
fn request_records(proxy: &Proxy, n: usize) -> Vec<serde_json::Value> {
    wait_for(
        std::time::Duration::from_secs(10),
        "the request records",
        || {
            let r = proxy.records();
            (r.iter().filter(|r| r["class_uid"] == 4002).count() >= n).then_some(r)
        },
    )
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

    let records = request_records(&proxy, 2);
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

/// The frames of an upgraded WebSocket are charged to the rule's budget like tunnel bytes:
/// with `bytes_out = "4 KiB/h"`, a client sending 1 KiB messages of random bytes gets three
/// through (each frame 1 KiB plus its header, compression cannot shrink them), the fourth is cut inside its frame, the cut is
/// recorded with the figure that reached the ceiling, and the next upgrade is refused `429`.
/// Judged by what the origin received.
#[test]
fn a_websocket_is_cut_at_its_rules_byte_ceiling() {
    let dir = tempdir();
    let origin = WsOrigin::start(dir.path(), &["ws.test"]);
    let ca_dir = make_ca(dir.path(), "ca", &["ws.test"]);
    let body = format!(
        "allowed_domains = [{{ domain = \"ws.test\", ports = [{p}], inspect = true, allow_private = true, name = \"ws\", budget = {{ bytes_out = \"4 KiB/h\" }} }}]\n[hosts]\n\"ws.test\" = \"127.0.0.1\"\n[inspection]\nca_dir = \"ca\"\nupstream_ca = \"{up}\"\n",
        p = origin.port,
        up = origin.ca_pem.display()
    );
    let proxy = Proxy::start(dir.path(), &body);
    let script = r#"
import asyncio, os, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

async def main():
    sent = 0
    try:
        async with connect(sys.argv[1]) as ws:
            assert await ws.recv() == "welcome"
            for i in range(20):
                # Random, so that permessage-deflate cannot shrink it.
                await ws.send(os.urandom(1024))
                await ws.recv()
                sent += 1
    except ConnectionClosed:
        pass
    print("ECHOED", sent)
    try:
        async with connect(sys.argv[1]) as ws:
            raise SystemExit("an upgrade past the ceiling was relayed")
    except InvalidStatus as e:
        r = e.response
        print("AFTER", r.status_code, r.headers["X-Tank-Refused-By"])

asyncio.run(main())
"#;
    let out = agent("python3", &proxy, &ca_dir.join("ca.pem"), dir.path())
        .env("PYTHONPATH", common::websocket::python_path())
        .args(["-c", script])
        .arg(format!("wss://ws.test:{}/ws/chat", origin.port))
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("ECHOED 3\n"), "{t}");
    assert!(
        t.contains("AFTER 429 budget:allowed_domains:ws:bytes_out"),
        "{t}"
    );

    // The origin got three whole messages and nothing of a later upgrade.
    let received = origin.received();
    let messages = received.iter().filter(|e| e["event"] == "message").count();
    let opens = received.iter().filter(|e| e["event"] == "open").count();
    assert_eq!((opens, messages), (1, 3), "{received:#?}");

    let records = request_records(&proxy, 2);
    let cut = records
        .iter()
        .find(|r| r["class_uid"] == 4002 && r["http_response"]["code"] == 101)
        .unwrap_or_else(|| panic!("no record of the upgrade: {records:#?}"));
    assert_eq!(cut["unmapped"]["budget"]["kind"], "bytes_out", "{cut:#}");
    assert_eq!(cut["unmapped"]["budget"]["state"], "exceeded", "{cut:#}");
    assert_eq!(cut["unmapped"]["budget"]["used"], 4096, "{cut:#}");
    // Exactly the ceiling left the proxy towards the origin: not one read past it.
    assert_eq!(cut["traffic"]["bytes_out"], 4096, "{cut:#}");
    assert!(
        cut["unmapped"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cut by budget:allowed_domains:ws:bytes_out")),
        "{cut:#}"
    );
}
