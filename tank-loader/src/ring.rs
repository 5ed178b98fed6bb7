//! The kernel's event ring buffer, read in place and consumed only once its records are durable.
//!
//! A reader that hands the kernel its space back as soon as it has read an event (aya's
//! `RingBuf` does) loses that event when the loader is killed before the event reaches the
//! log. This reader keeps two positions: `read`, how far it has read, and the kernel's consumer
//! position, which [`Ring::commit`] moves only after the drain has made the records up to there
//! durable. A loader killed in between leaves the events in the ring for the next one; the
//! position after each event goes into its record (`unmapped.ring_pos`) so the next loader
//! skips the ones the log already holds ([`Ring::resume`]): every event lands exactly once.
//!
//! Layout (kernel/bpf/ringbuf.c): page 0 is the consumer position (read-write), page 1 the
//! producer position (read-only), then the data pages, mapped twice in a row so that a record
//! wrapping around the end reads as one slice. Each record is an 8-byte header (length with a
//! busy and a discard bit, then a page offset) and its data, padded to 8 bytes.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::Context;
use aya::maps::MapData;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER: u64 = 8;

/// A ring buffer map, mapped into the loader.
pub struct Ring {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// Position of the next record to read.
    read: u64,
}

struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> anyhow::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's descriptor; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("cannot map the ring buffer");
        }
        Ok(Self {
            ptr: NonNull::new(ptr).expect("mmap does not return NULL on success"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// One event read from the ring, with the position just after it.
pub struct Item<'a> {
    /// The event's bytes, in place in the ring.
    pub data: &'a [u8],
    /// The ring position after this record: what to commit once it is durable.
    pub end: u64,
}

impl Ring {
    /// Maps the ring buffer `map`. Reading starts at the kernel's consumer position.
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let size = map
            .info()
            .context("cannot read the ring buffer's size")?
            .max_entries() as usize;
        anyhow::ensure!(
            size.is_power_of_two(),
            "ring buffer size {size} is not a power of two"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: size as u64 - 1,
            read: 0,
        };
        ring.read = ring.committed();
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: page 0 of the mapping is the kernel's u64 consumer position, 8-aligned.
        unsafe { &*self.consumer.ptr.as_ptr().cast::<AtomicU64>() }
    }

    /// The kernel's consumer position: everything before it was handed back.
    pub fn committed(&self) -> u64 {
        self.consumer_pos().load(Ordering::Acquire)
    }

    /// The producer position: everything before it was reserved by the kernel programs.
    pub fn produced(&self) -> u64 {
        // SAFETY: the first page of the producer mapping is the kernel's u64 producer position.
        unsafe { &*self.producer.ptr.as_ptr().cast::<AtomicU64>() }.load(Ordering::Acquire)
    }

    /// The size of the data area, in bytes.
    pub fn size(&self) -> u32 {
        (self.mask + 1) as u32
    }

    /// Position of the next record to read.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// Skips what a previous loader already logged: reading resumes at `logged` (the
    /// `ring_pos` of the log's last record) when it lies between the consumer and producer
    /// positions, as it does when the previous loader read this same ring. Returns whether it
    /// did.
    pub fn resume(&mut self, logged: u64) -> bool {
        let (committed, produced) = (self.committed(), self.produced());
        let same_ring = committed <= logged && logged <= produced;
        if same_ring {
            self.read = logged;
        }
        same_ring
    }

    /// Calls `each` with every committed record from the read position on, up to `max` of
    /// them, stopping at a record still being written. Discarded records are stepped over.
    /// Returns how many records `each` saw.
    pub fn read(&mut self, max: usize, mut each: impl FnMut(Item<'_>)) -> usize {
        let base = self.producer.ptr.as_ptr().cast::<u8>();
        let mut produced = self.produced();
        let mut n = 0;
        while n < max {
            if self.read == produced {
                produced = self.produced();
                if self.read == produced {
                    break;
                }
            }
            let offset = self.page + (self.read & self.mask) as usize;
            // SAFETY: offset is inside the first copy of the data pages; the header is 8-aligned.
            let header = unsafe { &*base.add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                break;
            }
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            let end = self.read + (HEADER + len).next_multiple_of(8);
            if header & DISCARD_BIT == 0 {
                // SAFETY: the data pages are mapped twice in a row, so a record that wraps
                // around the end is contiguous; len is at most the ring size.
                let data = unsafe {
                    std::slice::from_raw_parts(base.add(offset + HEADER as usize), len as usize)
                };
                each(Item { data, end });
                n += 1;
            }
            self.read = end;
        }
        n
    }

    /// Hands the kernel back everything before `pos` (a position `read` reported, whose records
    /// are now durable).
    pub fn commit(&mut self, pos: u64) {
        self.consumer_pos().store(pos, Ordering::Release);
    }

    /// True when records are waiting past the read position.
    pub fn pending(&self) -> bool {
        self.read != self.produced()
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_fd().as_raw_fd()
    }
}

// SAFETY: the mappings are owned by the Ring and only touched through &self/&mut self.
unsafe impl Send for Ring {}
