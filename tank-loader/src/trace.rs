//! `tank-loader trace`: a live view of connection attempts.
//!
//! It follows the audit log instead of reading the ring buffer: a second reader of a ring buffer
//! takes events away from the first, and the audit log must have them all. What trace shows is
//! therefore exactly what was recorded. A line it cannot read as one of the kernel log's
//! records is reported (on stderr, and in the exit code with `--no-follow`), never skipped.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tank_ebpf_common::event::hook;
use tank_ebpf_common::ocsf::kernel::{LifecycleRecord, NetworkRecord, UnrecordedRecord};
use tank_ebpf_common::ocsf::{self, Action, Kind};

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
        (!self.denied || r.action == Action::Denied)
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

/// What `follow` found, when it stops at the end of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Complete lines that are not a kernel-log record this build can read.
    pub unreadable: u64,
}

impl Filter {
    fn is_empty(&self) -> bool {
        !self.denied && self.pid.is_none() && self.comm.is_none()
    }
}

const POLL: Duration = Duration::from_millis(100);

/// Follows the log at `path`, writing matching records to `out` until interrupted (or, with
/// `no_follow`, until the end of the log). Unreadable lines are reported on `err`.
pub fn follow(
    path: &Path,
    filter: &Filter,
    opts: Options,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Summary> {
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
    let mut summary = Summary::default();
    loop {
        let offset = reader.stream_position()? - pending.len() as u64;
        let n = reader.read_line(&mut pending)?;
        if n == 0 || !pending.ends_with('\n') {
            // End of the log, possibly mid-record: wait for the rest.
            if opts.no_follow {
                return Ok(summary);
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
        let shown = match serde_json::from_str::<serde_json::Value>(&line)
            .map_err(|e| e.to_string())
            .and_then(|v| ocsf::parse(&v).map_err(|e| e.to_string()))
        {
            Ok(Kind::Kernel(r)) if filter.accepts(&r) => Some(row(&r)),
            Ok(Kind::Lifecycle(r)) if filter.is_empty() => Some(lifecycle_row(&r)),
            Ok(Kind::Unrecorded(r)) if filter.pid.is_none() && filter.comm.is_none() => {
                Some(unrecorded_row(&r))
            }
            Ok(Kind::Kernel(_) | Kind::Lifecycle(_) | Kind::Unrecorded(_)) => None,
            Ok(Kind::Proxy(_) | Kind::Request(_)) => {
                unreadable(err, path, offset, "a proxy record, not a kernel one")?;
                summary.unreadable += 1;
                None
            }
            Err(why) => {
                unreadable(err, path, offset, &why)?;
                summary.unreadable += 1;
                None
            }
        };
        let Some(shown) = shown else { continue };
        if opts.json {
            out.write_all(line.as_bytes())?;
        } else {
            writeln!(out, "{shown}")?;
        }
        out.flush()?;
    }
}

fn unreadable(err: &mut impl Write, path: &Path, offset: u64, why: &str) -> std::io::Result<()> {
    writeln!(
        err,
        "tank-loader: trace: {} at byte {offset}: unreadable record: {why}",
        path.display()
    )
}

fn lifecycle_row(r: &LifecycleRecord) -> String {
    let time = r.time_dt.get(11..23).unwrap_or(&r.time_dt);
    format!("{time:<12} {:>7}  {}", "-", r.message)
}

fn unrecorded_row(r: &UnrecordedRecord) -> String {
    let time = r.time_dt.get(11..23).unwrap_or(&r.time_dt);
    let verdict = if r.allowed() { "allow" } else { "DENY" };
    format!(
        "{time:<12} {:>7}  {:<15} {:<4} {:<40} {verdict:<7} UNRECORDED: {}",
        "-", "-", "-", "-", r.message
    )
}

fn row(r: &NetworkRecord) -> String {
    let time = r.time_dt.get(11..23).unwrap_or(&r.time_dt);
    // An established connection is the second record of an allowed connect: say so, and
    // name the local end the kernel chose (what the proxy's log calls the client).
    let reason = r.unmapped.reason.as_str();
    let (verdict, reason) = match r.src_endpoint.addr() {
        Some(src) if r.unmapped.hook.0 == hook::ESTABLISHED => {
            ("open", format!("{reason} from {src}"))
        }
        _ if r.allowed() => ("allow", reason.to_owned()),
        _ => ("DENY", reason.to_owned()),
    };
    format!(
        "{:<12} {:>7}  {:<15} {:<4} {:<40} {:<7} {}",
        time,
        r.actor.process.pid,
        r.actor.process.name,
        r.connection_info.protocol_name,
        r.dst_endpoint
            .addr()
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        verdict,
        reason
    )
}
