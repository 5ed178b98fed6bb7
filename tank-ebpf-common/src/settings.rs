//! Run-time settings the loader writes and the kernel programs read.

/// Name of the settings array in the eBPF object and under the pin directory.
pub const MAP_NAME: &str = "TANK_SETTINGS";

/// Slot holding the enforcement mode (one of [`mode`]).
pub const MODE: u32 = 0;

/// Number of settings slots.
pub const COUNT: u32 = 1;

/// Enforcement modes.
pub mod mode {
    /// Deny everything not allowlisted. The zero value, so an unset map enforces.
    pub const ENFORCE: u32 = 0;
    /// Record everything, deny nothing: for rolling out a policy.
    pub const AUDIT: u32 = 1;
}
