//! The proxy server. One connection, followed from accept to its record:
//!
//! 1. [`admission`]: the accept loop takes the connection and judges it before it sends a
//!    byte: client network, connection caps, descriptors. A refused one is answered there.
//! 2. [`connection`]: one task per connection reads the request head (size cap, read
//!    timeout), checks the policy, resolves the name ([`resolve`]: `[hosts]`, then the
//!    proxy's own DNS resolver), keeps only addresses the policy may reach, dials exactly
//!    one of them, relays, and queues the connection's one audit record.
//!
//! Around them, [`lifecycle`] binds the listeners, owns the state every connection shares,
//! reloads the policy on SIGHUP and drains on SIGTERM; [`admin`] serves `/metrics` and
//! `/healthz`. Errors of one connection are logged and recorded, never propagated; the
//! accept loops survive them.

mod admin;
mod admission;
mod connection;
mod lifecycle;
mod resolve;

pub use lifecycle::{run, Bound, Shared};
