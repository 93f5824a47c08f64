//! coin: version control for continual instruction tuning of multimodal LLMs.
//!
//! The crate is split by module, and the split is kept honest by one rule: the
//! version-control core ([`store`], [`history`], [`tasks`], [`metrics`]) never imports the
//! ML engine ([`ml`]) or the command line ([`cli`]) and never prints. See ARCHITECTURE.md.

pub mod cli;
mod git_durability;
pub mod history;
pub mod metrics;
pub mod ml;
pub mod store;
pub mod tasks;
pub mod workflow;

/// The version of coin that wrote an object, a record or a training key.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
