//! tank-loader's library: everything the binary does, in modules named for their job.
//!
//! The binary (`main.rs`) only parses the command line. The root integration tests use this
//! library too, so they read audit records and find cgroups with the same code as the loader.

pub mod activity;
pub mod backfill;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod clickhouse;
pub mod config;
pub mod crosscheck;
pub mod drain;
pub mod gate;
pub mod metrics;
pub mod nft;
pub mod privileges;
pub mod query;
pub mod report;
pub mod ring;
pub mod run;
pub mod status;
pub mod suggest;
pub mod trace;
