//! egress-proxy: tank's forward proxy, the audited trust boundary on its own host.
//!
//! The agent host's kernel lets the agent connect only to this proxy. The proxy serves
//! HTTP/1.1 `CONNECT` tunnels and absolute-form `http://` requests, decides each against a
//! TOML policy ([`config`], [`policy`]; paths in one normal form, [`path`]), resolves names
//! itself and refuses private and metadata addresses ([`addr`]), connects to exactly the
//! address it checked, relays ([`relay`]) and writes one tamper-evident audit record per
//! connection ([`audit`]). [`server`] follows one connection from accept to its record.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`server::run`], [`config::load`] and
//! `tank_ebpf_common::chain::verify`. Operations are documented in docs/proxy.md.
#![deny(missing_docs)]

pub mod addr;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod clienthello;
pub mod config;
pub mod credentials;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod relay;
pub mod server;
pub mod target;
