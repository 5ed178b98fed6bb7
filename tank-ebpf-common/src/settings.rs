//! Run-time settings the loader writes and the kernel programs read.

/// Name of the settings array in the eBPF object and under the pin directory.
pub const MAP_NAME: &str = "TANK_SETTINGS";

/// Slot holding the enforcement mode (one of [`mode`]).
pub const MODE: u32 = 0;

/// Slot: 1 lets the agent create MPTCP sockets, 0 (the default) refuses them at sock_create.
pub const ALLOW_MPTCP: u32 = 1;

/// Slot: depth of the agent cgroup in the cgroup2 hierarchy (`/a/agent` is 2). The BPF LSM
/// program, which sees every task on the host, scopes itself to the agent's subtree with it.
pub const AGENT_LEVEL: u32 = 2;

/// Slot: low 32 bits of the agent cgroup's id (see [`AGENT_LEVEL`]).
pub const AGENT_ID_LO: u32 = 3;

/// Slot: high 32 bits of the agent cgroup's id. Zero id = not set yet: the LSM program then
/// judges nothing, because it cannot tell the agent from the rest of the host.
pub const AGENT_ID_HI: u32 = 4;

/// Number of settings slots.
pub const COUNT: u32 = 5;

/// Enforcement modes.
pub mod mode {
    /// Deny everything not allowlisted. The zero value, so an unset map enforces.
    pub const ENFORCE: u32 = 0;
    /// Record everything, deny nothing: for rolling out a policy.
    pub const AUDIT: u32 = 1;
}
