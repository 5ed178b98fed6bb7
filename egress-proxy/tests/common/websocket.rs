//! A WebSocket origin on loopback for the inspection tests: the `websockets` library
//! (PyPI, installed by `cargo xtask setup` into `target/ocsf-python`) serving `wss://` with
//! a leaf from its own throwaway CA. It says `welcome`, echoes every message, answers
//! `whoami` with the `Authorization` header of its handshake, and writes what it received
//! (handshakes with their headers, names lowercased; messages) to a JSON-lines log: the tests judge by that.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::tls::{CertKind, OriginCert};

const SERVER: &str = r#"
import asyncio, json, ssl, sys
from websockets.asyncio.server import serve

cert, key, log = sys.argv[1:4]

def note(**fields):
    with open(log, "a") as f:
        f.write(json.dumps(fields) + "\n")

async def handler(ws):
    path = ws.request.path
    note(event="open", path=path, headers={k.lower(): v for k, v in ws.request.headers.raw_items()})
    await ws.send("welcome")
    async for message in ws:
        text = isinstance(message, str)
        note(event="message", path=path, text=text, data=message if text else message.hex())
        if message == "whoami":
            await ws.send("you sent " + ws.request.headers.get("Authorization", "nothing"))
        else:
            await ws.send("echo:" + message if text else message)

async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    async with serve(handler, "127.0.0.1", 0, ssl=ctx) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"#;

/// Where `cargo xtask setup` puts the tests' PyPI packages (`websockets` among them).
pub fn python_path() -> &'static str {
    tank_ebpf_common::ocsf::validate::PYTHON_PACKAGES_DIR
}

/// The running origin; dropped = killed.
pub struct WsOrigin {
    child: Child,
    pub port: u16,
    /// The origin CA's PEM (the proxy's `upstream_ca`).
    pub ca_pem: PathBuf,
    log: PathBuf,
}

impl Drop for WsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WsOrigin {
    /// Starts the origin for `names` with files in `dir`.
    pub fn start(dir: &Path, names: &[&str]) -> WsOrigin {
        let cert = OriginCert::new(dir.join("ws-origin-ca.pem"), names, CertKind::Good);
        let (pem, key) = cert.write_pem(dir, "ws-origin");
        let log = dir.join("ws-origin.jsonl");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(&pem)
            .arg(&key)
            .arg(&log)
            .env("PYTHONPATH", python_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 for the WebSocket origin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the WebSocket origin did not start (is `websockets` installed in {}? `cargo xtask setup` does): {line:?}", python_path())
        });
        WsOrigin {
            child,
            port,
            ca_pem: cert.ca_pem,
            log,
        }
    }

    /// Everything the origin received so far, one JSON object per event.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("the origin writes JSON lines"))
            .collect()
    }
}
