//! Quiver's cluster logic as state machines without I/O, clocks or randomness: the node drives
//! them with messages and times, and a seeded simulation (`tests/simulation.rs`) drives them
//! through drops, delays, reordering, partitions and crashes.
//!
//! - [`replication`]: one partition's replica on one node: leader (ISR, follower progress,
//!   high watermark) or follower (pull, truncation by epoch lineage).
//! - [`controller`]: the controller's state: brokers (epochs, leases, fencing), placement, and
//!   per partition the leader, leader epoch and ISR, with clean election and compare-and-set
//!   ISR changes. In the node this becomes the state machine of the Raft group.
#![forbid(unsafe_code)]

pub mod controller;
pub mod replication;

/// A broker's id.
pub type NodeId = u32;
/// A partition leader's epoch: bumped by the controller at every leader change.
pub type Epoch = u32;
