//! The Quiver node and the `quiver` command.
//!
//! - [`node`] accepts QUIC connections and turns request frames into handler calls.
//! - [`handlers`] implement each API over the [`broker::Broker`].
//! - [`broker`] holds the topic table; [`partition`] owns one log, its group-commit appender
//!   and its high watermark.
//! - [`order`] keeps a connection's pipelined produce requests in the producer's order.
//! - [`plugins`] is the registry of deployed Wasm components; [`chains`] runs plugin chains
//!   over stored batches (consumer-side filtering).
//! - [`pipelines`] runs pipelines: derived topics made by a plugin chain per input partition.
//! - [`catalog`] persists topics in `sled`; [`topic_config`] validates topic settings.
//! - [`cli`] is the command line (server, client commands, perf tool).
#![forbid(unsafe_code)]

pub mod broker;
pub mod catalog;
pub mod chains;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod epochs;
pub mod handlers;
pub mod hw_checkpoint;
pub mod node;
pub mod order;
pub mod partition;
pub mod pipelines;
pub mod plugins;
pub mod topic_config;

pub use config::BrokerConfig;
pub use node::Node;

/// Milliseconds since the Unix epoch; the one place the node reads the wall clock for records
/// and retention.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
