//! [`ChainWriter`]: appends chained records, keeps space in reserve, rotates segments.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::segment::{self, SegmentLink};
use super::{
    is_no_space, link_of, lock, ChainError, Hash, Head, Link, CLOSES, OPENS, PREV, SEGMENT, SEQ,
};

/// Bytes allocated at once ahead of the end of the log, so most appends need no `fallocate`.
const GROW: u64 = 64 * 1024;
/// The anchor is rewritten in place at this fixed width, so moving it never needs new space.
const ANCHOR_WIDTH: usize = 127;
/// A batch is written to the file once it holds this many bytes.
pub const FLUSH_BYTES: usize = 1 << 20;

/// Room beyond its reserve a log must have again before a writer that a full disk stopped
/// resumes: with less, the first records after the outage record would meet the full disk
/// again, and the writer would flap between refusing and serving.
pub const RESUME_ROOM: u64 = 64 * 1024;

/// When and how a writer rotates its log into segments. All off by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the active file holds this many bytes.
    pub max_bytes: Option<u64>,
    /// Rotate once the active file is this old.
    pub max_age: Option<Duration>,
    /// Keep at most this many rotated segments (at least 1); older ones are deleted.
    pub keep_segments: Option<usize>,
    /// Delete rotated segments last written longer ago than this.
    pub keep_age: Option<Duration>,
    /// Compress rotated segments with zstd (in a background thread).
    pub compress: bool,
}

/// How a writer behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Bytes kept allocated after the last record that [`ChainWriter::append`] never uses, so
    /// [`ChainWriter::append_keeping`] with a smaller reserve still finds space on a full disk.
    pub reserve_bytes: u64,
    /// Rotation.
    pub rotation: Rotation,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reserve_bytes: 16 * 1024,
            rotation: Rotation::default(),
        }
    }
}

/// The `[audit]` table of both tank configs (the loader's and the proxy's): reserve and
/// rotation, as an operator writes them. [`Settings::options`] validates them.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Bytes kept allocated for records that must fit on a full disk (default 64 KiB).
    pub reserve_bytes: Option<u64>,
    /// Rotate at this size; 0 turns rotation by size off (default 64 MiB).
    pub rotate_bytes: Option<u64>,
    /// Rotate at this age; 0 turns rotation by age off (default a day).
    pub rotate_age_secs: Option<f64>,
    /// Keep at most this many rotated segments (default: all).
    pub keep_segments: Option<usize>,
    /// Delete rotated segments older than this (default: never).
    pub keep_days: Option<f64>,
    /// zstd-compress rotated segments (default true).
    pub compress: Option<bool>,
}

impl Settings {
    /// Default `reserve_bytes`.
    pub const RESERVE_BYTES: u64 = 64 << 10;
    /// Default `rotate_bytes`.
    pub const ROTATE_BYTES: u64 = 64 << 20;
    /// Default `rotate_age_secs`.
    pub const ROTATE_AGE_SECS: f64 = 86_400.0;

    /// The writer options these settings ask for, or what is wrong with them (one line).
    pub fn options(&self) -> Result<Options, String> {
        let reserve = self.reserve_bytes.unwrap_or(Self::RESERVE_BYTES);
        if !(4096..=1 << 30).contains(&reserve) {
            return Err(format!(
                "`reserve_bytes` must be from 4096 to {}",
                1u64 << 30
            ));
        }
        if self.keep_segments == Some(0) {
            return Err("`keep_segments` must be 1 or more (leave it out to keep all)".into());
        }
        let secs = |v: Option<f64>, key: &str, unit: f64| match v {
            Some(s) if s.is_finite() && (0.0..=1e9).contains(&s) => {
                Ok(Some(Duration::from_secs_f64(s * unit)).filter(|d| !d.is_zero()))
            }
            Some(_) => Err(format!("`{key}` must be from 0 to 1e9")),
            None => Ok(None),
        };
        Ok(Options {
            reserve_bytes: reserve,
            rotation: Rotation {
                max_bytes: Some(self.rotate_bytes.unwrap_or(Self::ROTATE_BYTES)).filter(|b| *b > 0),
                max_age: secs(
                    Some(self.rotate_age_secs.unwrap_or(Self::ROTATE_AGE_SECS)),
                    "rotate_age_secs",
                    1.0,
                )?,
                keep_segments: self.keep_segments,
                keep_age: secs(self.keep_days, "keep_days", 86_400.0)?,
                compress: self.compress.unwrap_or(true),
            },
        })
    }
}

/// What [`ChainWriter::open`] found and repaired at the end of an existing log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of the partial last line a crash left (never synced: the anchor is before
    /// it), cut from the log; the writer's caller logs it, with the figure.
    pub partial_bytes: usize,
}

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The segment the active file became (compressed later when configured).
    pub segment: PathBuf,
    /// Segments deleted under the retention rule.
    pub removed: Vec<PathBuf>,
}

/// The writer's own field on a record, besides `seq` and `prev`.
enum Mark<'a> {
    None,
    Segment(&'a SegmentLink),
    Opens,
    Closes(u64),
}

fn mark_key(mark: &Mark<'_>) -> Option<&'static str> {
    match mark {
        Mark::None => None,
        Mark::Segment(_) => Some(SEGMENT),
        Mark::Opens => Some(OPENS),
        Mark::Closes(_) => Some(CLOSES),
    }
}

/// Appends records to a chained log.
#[derive(Debug)]
pub struct ChainWriter {
    path: PathBuf,
    file: File,
    anchor: File,
    /// The last record appended.
    head: Head,
    /// The last record in the file: what `head` returns to if writing the batch fails.
    written: Head,
    /// Records appended since the last write, newline-terminated.
    batch: Vec<u8>,
    /// The last complete record the log held when it was opened.
    tail: Option<serde_json::Value>,
    /// Bytes of complete records in the active file (the batch not counted).
    len: u64,
    /// End of the space known to be allocated for the active file (`u64::MAX`: the file
    /// system cannot preallocate, so appends are not checked ahead).
    allocated: u64,
    opts: Options,
    /// `seq` of the first record of the active file (head + 1 while it is empty).
    segment_first: u64,
    /// When the active file was started.
    segment_born: SystemTime,
    /// Records up to here were deleted by this writer's retention.
    removed_through: u64,
    /// The background compression of rotated segments, finished on drop.
    compressor: Option<Compressor>,
}

/// One thread that compresses rotated segments in the order they come, at idle priority
/// (`SCHED_IDLE`): compressing is housekeeping, and must not take the core the drain needs to
/// keep up with the kernel. A segment waiting for it is a valid, uncompressed segment.
#[derive(Debug)]
struct Compressor {
    queue: std::sync::mpsc::Sender<PathBuf>,
    thread: std::thread::JoinHandle<()>,
}

impl Compressor {
    fn start() -> Option<Self> {
        let (queue, segments) = std::sync::mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name("chain-compress".into())
            .spawn(move || {
                let idle = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is the calling thread; `idle` is a valid sched_param. Best
                // effort: at normal priority compression is only slower to give way.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
                for s in segments {
                    // A full disk leaves it uncompressed: still a valid segment.
                    let _ = segment::compress(&s);
                }
            })
            .ok()?;
        Some(Self { queue, thread })
    }

    /// Closes the queue and waits for what it holds.
    fn finish(self) {
        drop(self.queue);
        let _ = self.thread.join();
    }
}

impl Drop for ChainWriter {
    /// Writes what was appended since the last sync to the file (not durable), so dropping a
    /// writer does not throw records away, and leaves every rotated segment compressed.
    fn drop(&mut self) {
        let _ = self.flush();
        if let Some(c) = self.compressor.take() {
            c.finish();
        }
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> ChainError {
    let path = path.to_owned();
    move |source| ChainError::Io {
        path,
        action,
        source,
    }
}

fn open_active(path: &Path) -> Result<File, ChainError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o640)
        .open(path)
        .map_err(io_err(path, "open for appending"))?;
    lock(&file).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => ChainError::Locked {
            path: path.to_owned(),
        },
        _ => ChainError::Io {
            path: path.to_owned(),
            action: "lock",
            source: e,
        },
    })?;
    Ok(file)
}

impl ChainWriter {
    /// [`Self::open_with`] with the default [`Options`] (no rotation).
    pub fn open(path: &Path) -> Result<(Self, Option<Recovery>), ChainError> {
        Self::open_with(path, Options::default())
    }

    /// Opens `path` for appending, creating it (mode 0640) if absent, and continues its chain
    /// (from its last rotated segment when the active file is empty or gone). The writer holds
    /// an exclusive `flock` on the log for its lifetime.
    ///
    /// A partial last line (a crash mid-write) is cut and reported in the returned
    /// [`Recovery`]; the chain continues from the last complete record.
    pub fn open_with(path: &Path, opts: Options) -> Result<(Self, Option<Recovery>), ChainError> {
        let mut file = open_active(path)?;
        let (mut head, mut tail, partial_bytes) = read_tail(&mut file).map_err(|e| match e {
            TailError::Io(source) => ChainError::Io {
                path: path.to_owned(),
                action: "read its tail",
                source,
            },
            TailError::Bad(problem) => ChainError::Unreadable {
                path: path.to_owned(),
                problem,
            },
        })?;
        // The fragment was never made durable (a batch is synced, and the anchor moved, only
        // once it is written whole), so cutting it loses nothing that was recorded: the
        // kernel log's events are drained again from the ring, which is consumed only after
        // the sync. Leaving it in would keep the chain from ever verifying again.
        let recovery = if partial_bytes > 0 {
            let len = file
                .metadata()
                .map_err(io_err(path, "read its length"))?
                .len();
            file.set_len(len - partial_bytes as u64)
                .map_err(io_err(path, "cut a partial last line"))?;
            file.sync_data()
                .map_err(io_err(path, "sync after cutting a partial last line"))?;
            Some(Recovery { partial_bytes })
        } else {
            None
        };
        let (segment_first, removed_through) = match first_record(path) {
            Some((seq, link)) => (seq, link.map_or(0, |l| l.removed_through_seq)),
            None => {
                // Empty active file: continue from the newest rotated segment, if any (a
                // rotation cut short between renaming the old file and writing the new).
                if let Some(last) = segment::rotated(path).ok().and_then(|s| s.last().cloned()) {
                    let mut lines = segment::reader(&last.path)
                        .map_err(io_err(path, "read its newest segment"))?;
                    (head, tail) =
                        tail_of_lines(&mut lines).map_err(|problem| ChainError::Unreadable {
                            path: last.path.clone(),
                            problem,
                        })?;
                }
                (head.seq + 1, 0)
            }
        };
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        let anchor_path = super::anchor_path(path);
        let anchor = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o640)
            .open(&anchor_path)
            .map_err(io_err(&anchor_path, "open the anchor"))?;
        let mut writer = Self {
            path: path.to_owned(),
            file,
            anchor,
            written: head.clone(),
            head,
            batch: Vec::with_capacity(FLUSH_BYTES + 64 * 1024),
            tail,
            len: meta.len(),
            allocated: meta.len(),
            opts,
            segment_first,
            segment_born: meta
                .created()
                .or_else(|_| meta.modified())
                .unwrap_or_else(|_| SystemTime::now()),
            removed_through,
            compressor: None,
        };
        if writer.len == 0 {
            writer.segment_born = SystemTime::now();
        }
        // Segments whose compression a stop cut short.
        if writer.opts.rotation.compress {
            let pending: Vec<PathBuf> = segment::rotated(path)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.path)
                .filter(|p| p.extension().is_none_or(|e| e != "zst"))
                .collect();
            writer.compress(pending);
        }
        // Best effort: a full disk at start shows as a refused first append.
        let _ = writer.ensure(0, writer.opts.reserve_bytes);
        Ok((writer, recovery))
    }

    /// Appends one record, keeping the configured reserve free after it; `record` must
    /// serialize to a JSON object. Returns its `seq`.
    ///
    /// The record goes into the writer's batch, which reaches the file in large `write(2)`s
    /// (at [`FLUSH_BYTES`], [`Self::flush`] and every sync); it is durable only after
    /// [`Self::sync`]. Its space in the file is allocated before it is accepted.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<u64, ChainError> {
        self.append_keeping(record, self.opts.reserve_bytes)
    }

    /// Appends one record if, after it, `keep` bytes are still allocated for later records.
    /// `keep` below the configured reserve draws on it (a closing or outage record); 0 lets the
    /// record take whatever is allocated. On [`ChainError::Full`] nothing was written.
    pub fn append_keeping<T: Serialize>(
        &mut self,
        record: &T,
        keep: u64,
    ) -> Result<u64, ChainError> {
        self.append_line(record, Mark::None, keep)
    }

    /// Appends a record that opens a span (a tunnel): it carries `unmapped.opens: true`, and
    /// [`super::verify`] lists it as open until a record closes it. It is in the file (its
    /// `write(2)` returned, with the batch before it) when this returns: what the span does
    /// next is on the strength of it.
    pub fn append_opening<T: Serialize>(
        &mut self,
        record: &T,
        keep: u64,
    ) -> Result<u64, ChainError> {
        let seq = self.append_line(record, Mark::Opens, keep)?;
        self.flush()?;
        Ok(seq)
    }

    /// Appends a record that closes the span opened by record `opened`: it carries
    /// `unmapped.closes: <seq>`.
    pub fn append_closing<T: Serialize>(
        &mut self,
        record: &T,
        opened: u64,
        keep: u64,
    ) -> Result<u64, ChainError> {
        self.append_line(record, Mark::Closes(opened), keep)
    }

    /// Makes sure `keep` bytes are allocated past the end of the log for records written
    /// later (space held for them); on a full disk [`ChainError::Full`].
    pub fn make_room(&mut self, keep: u64) -> Result<(), ChainError> {
        self.ensure(0, keep)
    }

    /// Appends one record that `write` formats straight into the line buffer, given the
    /// record's [`Link`] (its `seq` and `prev`, which it must write where [`Self::append`] puts
    /// them): the path of writers that cannot afford an intermediate value. Keeps the
    /// configured reserve like [`Self::append`]. Returns its `seq`.
    pub fn append_with(
        &mut self,
        write: impl FnOnce(Link<'_>, &mut Vec<u8>),
    ) -> Result<u64, ChainError> {
        self.write_line(write, self.opts.reserve_bytes)
    }

    fn append_line<T: Serialize>(
        &mut self,
        record: &T,
        mark: Mark<'_>,
        keep: u64,
    ) -> Result<u64, ChainError> {
        let serde_json::Value::Object(mut fields) =
            serde_json::to_value(record).map_err(|_| ChainError::BadRecord)?
        else {
            return Err(ChainError::BadRecord);
        };
        let seq = self.head.seq + 1;
        let mut chain = vec![(SEQ, seq.into()), (PREV, self.head.hash.to_string().into())];
        match mark {
            Mark::None => {}
            Mark::Segment(link) => chain.push((
                ("unmapped", SEGMENT),
                serde_json::to_value(link).map_err(|_| ChainError::BadRecord)?,
            )),
            Mark::Opens => chain.push((("unmapped", OPENS), true.into())),
            Mark::Closes(opened) => chain.push((("unmapped", CLOSES), opened.into())),
        }
        for ((object, key), value) in chain {
            let slot = fields
                .entry(object)
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            match slot {
                serde_json::Value::Object(o) if !o.contains_key(key) => {
                    o.insert(key.to_owned(), value);
                }
                _ => return Err(ChainError::BadRecord),
            }
        }
        // The writer's own fields are refused in a record even where they are not written.
        if let Some(serde_json::Value::Object(u)) = fields.get("unmapped") {
            let mine = |k: &str| !matches!(mark_key(&mark), Some(m) if m == k);
            if [SEGMENT, OPENS, CLOSES]
                .iter()
                .any(|k| mine(k) && u.contains_key(*k))
            {
                return Err(ChainError::BadRecord);
            }
        }
        let body = serde_json::to_vec(&fields).map_err(|_| ChainError::BadRecord)?;
        self.write_line(|_, line| line.extend_from_slice(&body), keep)
    }

    fn write_line(
        &mut self,
        write: impl FnOnce(Link<'_>, &mut Vec<u8>),
        keep: u64,
    ) -> Result<u64, ChainError> {
        let seq = self.head.seq + 1;
        let start = self.batch.len();
        write(
            Link {
                seq,
                prev: &self.head.hash,
            },
            &mut self.batch,
        );
        let hash = Hash::of(&self.batch[start..]);
        self.batch.push(b'\n');
        // The batch so far, this record and `keep` must all have their space.
        if let Err(e) = self.ensure(0, keep) {
            self.batch.truncate(start);
            return Err(e);
        }
        self.head = Head { seq, hash };
        if self.batch.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Writes the batch to the file (not durable before [`Self::sync`]). On failure the
    /// records of the batch are dropped, whatever of it reached the file is cut back off (a
    /// full disk must never leave half a record), and the chain continues from the last
    /// record written.
    pub fn flush(&mut self) -> Result<(), ChainError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let bytes = self.batch.len() as u64;
        let written = self.file.write_all(&self.batch);
        self.batch.clear();
        match written {
            Ok(()) => {
                self.len += bytes;
                self.written = self.head.clone();
                Ok(())
            }
            Err(source) => {
                let _ = self.file.set_len(self.len);
                self.allocated = self.len;
                self.head = self.written.clone();
                Err(if is_no_space(&source) {
                    ChainError::Full {
                        path: self.path.clone(),
                        bytes,
                        keep: 0,
                    }
                } else {
                    ChainError::Io {
                        path: self.path.clone(),
                        action: "append records",
                        source,
                    }
                })
            }
        }
    }

    /// Makes sure the batch, `bytes` more and `keep` after them are allocated past the end of
    /// the file.
    fn ensure(&mut self, bytes: u64, keep: u64) -> Result<(), ChainError> {
        let bytes = self.batch.len() as u64 + bytes;
        let need = self.len + bytes + keep;
        if need <= self.allocated {
            return Ok(());
        }
        for want in [need + GROW, need] {
            // SAFETY: fallocate on a descriptor we own; KEEP_SIZE leaves the file size alone.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    self.len as libc::off_t,
                    (want - self.len) as libc::off_t,
                )
            };
            if rc == 0 {
                self.allocated = want;
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => continue,
                // A file system that cannot preallocate: appends are only cut back on failure.
                Some(libc::EOPNOTSUPP) => {
                    self.allocated = u64::MAX;
                    return Ok(());
                }
                _ => return Err(io_err(&self.path, "allocate space")(e)),
            }
        }
        Err(ChainError::Full {
            path: self.path.clone(),
            bytes,
            keep,
        })
    }

    /// Writes every appended record, makes it durable, then moves the anchor to the last one.
    pub fn sync(&mut self) -> Result<&Head, ChainError> {
        self.flush()?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "fdatasync"))?;
        // Durable records are not read again by the writer: their pages leave the page cache
        // now rather than through reclaim, which made each new page of a fast log cost several
        // times its copy (1 GB synced in 64 MiB steps: 5.2-5.8 s kept, 3.2-3.8 s dropped; the
        // drain of 1M records: 8.8-9.7 s against 9.9-12.0 s kept, interleaved, under load 9).
        // Readers that follow the log read them back from the disk. Advice only: a failure
        // changes nothing that was written.
        // SAFETY: posix_fadvise on a descriptor we own; offset 0, length 0 means to the end.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // In place at a fixed width: on a full disk the anchor still moves.
        let mut body = serde_json::to_vec(&self.head).expect("Head serializes");
        body.resize(ANCHOR_WIDTH.max(body.len()), b' ');
        body.push(b'\n');
        self.anchor
            .write_all_at(&body, 0)
            .map_err(|source| ChainError::Io {
                path: super::anchor_path(&self.path),
                action: "write the anchor",
                source,
            })?;
        Ok(&self.head)
    }

    /// The last record appended.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The last complete record the log held when it was opened (`None` for an empty log):
    /// where a writer that continues a log finds what its predecessor last wrote.
    pub fn tail(&self) -> Option<&serde_json::Value> {
        self.tail.as_ref()
    }

    /// The bytes it keeps allocated after the last record ([`Options::reserve_bytes`]).
    pub fn reserve_bytes(&self) -> u64 {
        self.opts.reserve_bytes
    }

    /// The active file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the rotation rule says the active file should become a segment now.
    pub fn rotation_due(&self) -> bool {
        let r = &self.opts.rotation;
        self.head.seq >= self.segment_first
            && (r
                .max_bytes
                .is_some_and(|m| self.len + self.batch.len() as u64 >= m)
                || r.max_age
                    .is_some_and(|a| self.segment_born.elapsed().unwrap_or_default() >= a))
    }

    /// Turns the active file into a segment and starts a new active file whose first record
    /// is `record`, carrying the [`SegmentLink`]; then applies retention and, when configured,
    /// compresses the segment in the background. On failure (no space for the new file) the
    /// active file stays as it was and the rotation can be tried again later.
    pub fn rotate<T: Serialize>(&mut self, record: &T) -> Result<Rotated, ChainError> {
        self.sync()?;
        let segment = segment::segment_path(&self.path, self.segment_first);
        fs::rename(&self.path, &segment).map_err(io_err(&self.path, "rename to a segment"))?;
        let undo_rename = |e: ChainError| {
            let _ = fs::rename(&segment, &self.path);
            e
        };
        let new = open_active(&self.path).map_err(undo_rename)?;
        let segments = segment::rotated(&self.path).unwrap_or_default();
        let older_than = self
            .opts
            .rotation
            .keep_age
            .and_then(|a| SystemTime::now().checked_sub(a));
        let removed = segment::expired(&segments, self.opts.rotation.keep_segments, older_than);
        let removed_through = removed
            .iter()
            .filter_map(|r| segments.iter().find(|s| s.first_seq > r.first_seq))
            .map(|next| next.first_seq - 1)
            .fold(self.removed_through, u64::max);
        let link = SegmentLink {
            previous: segment
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned),
            previous_last_seq: self.head.seq,
            removed: removed
                .iter()
                .filter_map(|r| r.path.file_name()?.to_str().map(str::to_owned))
                .collect(),
            removed_through_seq: removed_through,
        };
        let old = std::mem::replace(&mut self.file, new);
        let saved = (
            self.len,
            self.allocated,
            self.segment_first,
            self.segment_born,
        );
        (self.len, self.allocated) = (0, 0);
        (self.segment_first, self.segment_born) = (self.head.seq + 1, SystemTime::now());
        // The link record may use the reserve: rotating must not be what a full disk stops.
        if let Err(e) = self.append_line(record, Mark::Segment(&link), 0) {
            self.file = old;
            (
                self.len,
                self.allocated,
                self.segment_first,
                self.segment_born,
            ) = saved;
            let _ = fs::remove_file(&self.path);
            let _ = fs::rename(&segment, &self.path);
            return Err(e);
        }
        self.removed_through = removed_through;
        let _ = self.ensure(0, self.opts.reserve_bytes);
        self.sync()?;
        // Give back the old file's reserve, then retention, then compression.
        let _ = punch_past_end(&old, saved.0, saved.1);
        drop(old);
        let mut gone = Vec::new();
        for r in removed {
            if fs::remove_file(&r.path).is_ok() {
                gone.push(r.path);
            }
        }
        if self.opts.rotation.compress {
            self.compress(vec![segment.clone()]);
        }
        Ok(Rotated {
            segment,
            removed: gone,
        })
    }

    /// Queues `segments` for the background compressor (started on first use): appends never
    /// wait for it. A crash mid-compression leaves a segment uncompressed, redone at next open.
    fn compress(&mut self, segments: Vec<PathBuf>) {
        if segments.is_empty() {
            return;
        }
        if self.compressor.is_none() {
            self.compressor = Compressor::start();
        }
        for s in segments {
            let queued = self.compressor.as_ref().map(|c| c.queue.send(s));
            if !matches!(queued, Some(Ok(()))) {
                // No thread: the segment stays uncompressed until the next open.
                break;
            }
        }
    }

    /// For sites whose logrotate moves the log away and signals the writer (SIGHUP): when the
    /// log's path no longer names the file being written (moved, deleted, or truncated by
    /// `copytruncate`), starts a new file there whose first record is `record`, linked to the
    /// last record written. Returns whether it did.
    pub fn reopen<T: Serialize>(&mut self, record: &T) -> Result<bool, ChainError> {
        // What was appended belongs after the records already in the old file.
        self.flush()?;
        let ours = self.file.metadata().map_err(io_err(&self.path, "stat"))?;
        let same = fs::metadata(&self.path)
            .is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino() && m.len() == self.len);
        if same {
            return Ok(false);
        }
        let new = open_active(&self.path)?;
        let found = new.metadata().map_err(io_err(&self.path, "stat"))?;
        if found.len() > 0 && found.ino() != ours.ino() {
            return Err(ChainError::Unreadable {
                path: self.path.clone(),
                problem: "a file not written by this writer now has its name; move it away".into(),
            });
        }
        let link = SegmentLink {
            previous: None,
            previous_last_seq: self.head.seq,
            removed: Vec::new(),
            removed_through_seq: self.removed_through,
        };
        self.file = new;
        (self.len, self.allocated) = (found.len(), found.len());
        (self.segment_first, self.segment_born) = (self.head.seq + 1, SystemTime::now());
        self.append_line(record, Mark::Segment(&link), 0)?;
        let _ = self.ensure(0, self.opts.reserve_bytes);
        self.sync()?;
        Ok(true)
    }
}

/// Frees the space allocated past `len` (the reserve of a file no longer written).
fn punch_past_end(file: &File, len: u64, allocated: u64) -> io::Result<()> {
    if allocated <= len || allocated == u64::MAX {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            len as libc::off_t,
            (allocated - len) as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `seq` and link of the first record of the file at `path`, if it has one.
fn first_record(path: &Path) -> Option<(u64, Option<SegmentLink>)> {
    let mut line = Vec::new();
    io::BufReader::new(File::open(path).ok()?)
        .read_until(b'\n', &mut line)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(line.strip_suffix(b"\n")?).ok()?;
    let link = super::chain_field(&v, SEGMENT).and_then(|l| serde_json::from_value(l.clone()).ok());
    Some((link_of(&v)?.0, link))
}

enum TailError {
    Io(io::Error),
    Bad(String),
}

/// The head of a whole (decompressed) segment, read front to back.
fn tail_of_lines(lines: &mut dyn BufRead) -> Result<(Head, Option<serde_json::Value>), String> {
    let (mut last, mut buf) = (Vec::new(), Vec::new());
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) if buf.ends_with(b"\n") => std::mem::swap(&mut last, &mut buf),
            Ok(_) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    if last.is_empty() {
        return Ok((Head::genesis(), None));
    }
    head_of(&last[..last.len() - 1])
        .map(|(h, v)| (h, Some(v)))
        .map_err(|e| match e {
            TailError::Bad(p) => p,
            TailError::Io(e) => e.to_string(),
        })
}

/// Finds the last complete record (its head) and the length of a partial line after it.
fn read_tail(file: &mut File) -> Result<(Head, Option<serde_json::Value>, usize), TailError> {
    let len = file.seek(SeekFrom::End(0)).map_err(TailError::Io)?;
    if len == 0 {
        return Ok((Head::genesis(), None, 0));
    }
    // Read backwards in growing windows until the window holds a whole last record.
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(TailError::Io)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.take(len - start)
            .read_to_end(&mut buf)
            .map_err(TailError::Io)?;
        let partial = buf.iter().rev().take_while(|&&b| b != b'\n').count();
        let complete = &buf[..buf.len() - partial];
        if complete.is_empty() && start == 0 {
            // Only a partial line: a crash during the very first record.
            return Ok((Head::genesis(), None, partial));
        }
        let body = &complete[..complete.len().saturating_sub(1)];
        match body.iter().rposition(|&b| b == b'\n') {
            Some(nl) => return head_of(&body[nl + 1..]).map(|(h, v)| (h, Some(v), partial)),
            None if start == 0 => return head_of(body).map(|(h, v)| (h, Some(v), partial)),
            None => window *= 4,
        }
    }
}

fn head_of(line: &[u8]) -> Result<(Head, serde_json::Value), TailError> {
    let value = serde_json::from_slice::<serde_json::Value>(line).ok();
    let seq = value.as_ref().and_then(|v| link_of(v).map(|(seq, _)| seq));
    match (seq, value) {
        (Some(seq), Some(value)) => Ok((
            Head {
                seq,
                hash: Hash::of(line),
            },
            value,
        )),
        _ => Err(TailError::Bad(
            "its last complete line is not a chained record".to_owned(),
        )),
    }
}
