//! What tank's kernel programs and its userspace must agree on, declared once.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and no `bool` (its size in
//! the kernel is not guaranteed to match): the eBPF programs in `tank-ebpf` write these bytes
//! and `tank-loader` reads them back, so a second copy of a layout anywhere would be a silent
//! bug. Size checks at the bottom of each module fail the build when a layout drifts.
//!
//! Codes (hooks, verdicts, reasons, modes) are named constants. They are stable: a code is
//! never renumbered, and a retired one stays reserved, because audit logs outlive releases.
//!
//! With the `chain` feature (std) this crate also holds what the kernel audit log and the egress
//! proxy's log share: the tamper-evident chain ([`chain`]) and the OCSF record ([`ocsf`]). The
//! workspace layout is fixed, and this is the one crate both userspace sides already share.
//! For the same reason the `manual` feature holds the man-page rendering both binaries use.
#![cfg_attr(not(any(feature = "chain", feature = "manual", test)), no_std)]

pub mod allow;
pub mod counters;
pub mod event;
pub mod settings;

#[cfg(feature = "chain")]
pub mod chain;
#[cfg(feature = "manual")]
pub mod manual;
#[cfg(feature = "chain")]
pub mod ocsf;
