//! `tank-loader trace`: a live view of connection attempts.
//!
//! It follows the audit log instead of reading the ring buffer: a second reader of a ring buffer
//! takes events away from the first, and the audit log must have them all. What trace shows is
//! therefore exactly what was recorded.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::record::{NetworkRecord, NETWORK_ACTIVITY};

/// Which records to show, and how.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only denied attempts.
    pub denied: bool,
    /// Only this process id.
    pub pid: Option<u32>,
    /// Only this task name.
    pub comm: Option<String>,
}

impl Filter {
    fn accepts(&self, r: &NetworkRecord) -> bool {
        (!self.denied || r.action_id == 2)
            && self.pid.is_none_or(|p| p == r.actor.process.pid)
            && self
                .comm
                .as_ref()
                .is_none_or(|c| *c == r.actor.process.name)
    }
}

/// Output options.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// One JSON record per line instead of a table.
    pub json: bool,
    /// Start at the beginning of the log instead of its end.
    pub history: bool,
    /// Stop at the end of the log instead of waiting for more.
    pub no_follow: bool,
}

const POLL: Duration = Duration::from_millis(100);

/// Follows the log at `path`, writing matching records to `out` until interrupted (or, with
/// `no_follow`, until the end of the log).
pub fn follow(
    path: &Path,
    filter: &Filter,
    opts: Options,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let open = || {
        File::open(path).with_context(|| {
            format!(
                "cannot open audit log {} (is tank-loader running?)",
                path.display()
            )
        })
    };
    let mut reader = BufReader::new(open()?);
    if !opts.history {
        reader.seek(SeekFrom::End(0))?;
    }
    if !opts.json {
        writeln!(
            out,
            "{:<12} {:>7}  {:<15} {:<4} {:<40} {:<7} REASON",
            "TIME", "PID", "COMM", "PROTO", "DESTINATION", "VERDICT"
        )?;
    }
    let mut pending = String::new();
    loop {
        let n = reader.read_line(&mut pending)?;
        if n == 0 || !pending.ends_with('\n') {
            // End of the log, possibly mid-record: wait for the rest.
            if opts.no_follow {
                return Ok(());
            }
            let pos = reader.stream_position()?;
            if std::fs::metadata(path)
                .map(|m| m.len() < pos)
                .unwrap_or(false)
            {
                // The log was replaced or cut: start again from its beginning.
                reader = BufReader::new(open()?);
                pending.clear();
            }
            std::thread::sleep(POLL);
            continue;
        }
        let line = std::mem::take(&mut pending);
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value.get("class_uid").and_then(|c| c.as_u64()) != Some(u64::from(NETWORK_ACTIVITY)) {
            continue;
        }
        let Ok(record) = serde_json::from_value::<NetworkRecord>(value) else {
            continue;
        };
        if !filter.accepts(&record) {
            continue;
        }
        if opts.json {
            out.write_all(line.as_bytes())?;
        } else {
            writeln!(out, "{}", row(&record))?;
        }
        out.flush()?;
    }
}

fn row(r: &NetworkRecord) -> String {
    let time = r.time_dt.get(11..23).unwrap_or(&r.time_dt);
    // An established connection is the second record of an allowed connect: say so, and
    // name the local end the kernel chose (what the proxy's log calls the client).
    let (verdict, reason) = match &r.src_endpoint {
        Some(src) if r.unmapped.hook == "established" => (
            "open",
            format!("{} from {}", r.unmapped.reason, endpoint(&src.ip, src.port)),
        ),
        _ if r.action_id == 1 => ("allow", r.unmapped.reason.clone()),
        _ => ("DENY", r.unmapped.reason.clone()),
    };
    format!(
        "{:<12} {:>7}  {:<15} {:<4} {:<40} {:<7} {}",
        time,
        r.actor.process.pid,
        r.actor.process.name,
        r.connection_info.protocol_name,
        endpoint(&r.dst_endpoint.ip, r.dst_endpoint.port),
        verdict,
        reason
    )
}

/// `ip:port`, with IPv6 addresses in brackets.
fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}
