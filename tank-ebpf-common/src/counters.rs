//! Per-CPU counters of every attempt the kernel programs judged.
//!
//! Together with the events in the ring buffer they account for every attempt: an attempt
//! either produced an event (and is counted allowed or denied) or it is counted unrecorded.

/// Name of the per-CPU counter array in the eBPF object and under the pin directory.
pub const MAP_NAME: &str = "TANK_COUNTERS";

/// Attempts allowed and recorded.
pub const ALLOWED: u32 = 0;
/// Attempts denied and recorded.
pub const DENIED: u32 = 1;
/// Attempts denied with no record, because the ring buffer had no room. In enforce mode this
/// includes allowlisted attempts: nothing allowed is ever unrecorded.
pub const UNRECORDED_DENIED: u32 = 2;
/// Attempts allowed with no record: only in audit mode, where nothing is denied.
pub const UNRECORDED_ALLOWED: u32 = 3;

/// Established TCP connections whose 4-tuple could not be recorded (ring buffer full). The
/// connection itself was recorded at connect; only its local address and port are missing, so
/// a cross-check cannot match it to the proxy's record.
pub const UNRECORDED_ESTABLISHED: u32 = 4;

/// Number of counter slots.
pub const COUNT: u32 = 5;

/// Human names of the slots, indexed by slot.
pub const NAMES: [&str; COUNT as usize] = [
    "allowed",
    "denied",
    "unrecorded_denied",
    "unrecorded_allowed",
    "unrecorded_established",
];
