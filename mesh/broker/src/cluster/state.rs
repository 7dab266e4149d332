//! What the controller's Raft log holds: the commands, and the metadata they build. Applying a
//! command is a pure function of the metadata and the command, so every node that applies the
//! same log holds the same metadata.
//!
//! The partition and broker rules are `quiver_cluster::controller::ClusterControl`'s (checked
//! by the seeded simulation); this module adds what the node needs beside them: peer
//! addresses and topic settings.
//!
//! Broker leases are **not** in the log: the active controller tracks heartbeats in memory
//! (KRaft does the same) and writes only the resulting fencing and unfencing.

use std::collections::BTreeMap;

use quiver_cluster::NodeId;
use quiver_cluster::controller::{ClusterControl, ClusterError, OperatorError};
use quiver_cluster::replication::IsrProposal;
use quiver_proto::ErrorCode;
use serde::{Deserialize, Serialize};

/// A metadata change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A broker starts: it gets a new broker epoch; an older incarnation is fenced first.
    Register {
        /// Node id.
        node: NodeId,
        /// Where clients reach it.
        addr: String,
        /// Where peers reach it.
        peer_addr: String,
    },
    /// The active controller saw no heartbeat of this incarnation within the lease.
    Fence {
        /// Node id.
        node: NodeId,
        /// Its broker epoch.
        epoch: u64,
    },
    /// This incarnation heartbeats again.
    Unfence {
        /// Node id.
        node: NodeId,
        /// Its broker epoch.
        epoch: u64,
    },
    /// Controlled shutdown: leadership moves away now.
    Shutdown {
        /// Node id.
        node: NodeId,
        /// Its broker epoch.
        epoch: u64,
    },
    /// A new topic, placed over the live brokers.
    CreateTopic {
        /// Name (validated by the node that took the request).
        name: String,
        /// Partition count.
        partitions: u32,
        /// Replicas per partition.
        replication: u16,
        /// Effective settings, as `key = value`.
        configs: BTreeMap<String, String>,
    },
    /// A topic goes away.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// An operator moves a partition to new replicas, or (`replicas: None`) cancels the move
    /// in progress.
    Reassign {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Target replicas, the first the preferred leader.
        replicas: Option<Vec<NodeId>>,
    },
    /// An operator asks for a leader election: the preferred replica, or (`unclean`) any
    /// live replica of a partition without a leader.
    Elect {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Unclean rather than preferred.
        unclean: bool,
    },
    /// A partition leader's ISR change (compare-and-set on the partition epoch).
    AlterIsr {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The change.
        proposal: IsrProposal,
    },
}

/// What applying a command gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied.
    Done,
    /// Applied, nothing changed (an idempotent repeat).
    Unchanged,
    /// A registration: the new broker epoch.
    Registered {
        /// Broker epoch.
        epoch: u64,
    },
    /// Refused; the metadata did not change.
    Refused {
        /// Protocol error code.
        code: u16,
        /// Why.
        message: String,
    },
}

impl Outcome {
    fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Refused {
            code: code.code(),
            message: message.into(),
        }
    }
}

/// The cluster metadata every node holds a copy of.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metadata {
    /// Brokers, placement, leaders, epochs and ISRs.
    pub control: ClusterControl,
    /// Peer addresses of registered brokers.
    pub peer_addrs: BTreeMap<NodeId, String>,
    /// Settings per topic.
    pub configs: BTreeMap<String, BTreeMap<String, String>>,
    /// Per topic, the log index of its creation: its id. A node holding a topic of that name
    /// with another id (or none in the metadata, once it has applied past that id) holds a
    /// deleted topic's data.
    #[serde(default)]
    pub topic_ids: BTreeMap<String, u64>,
}

impl Metadata {
    /// Applies one command, the log entry at `index`.
    pub fn apply(&mut self, command: &Command, index: u64) -> Outcome {
        match command {
            Command::Register {
                node,
                addr,
                peer_addr,
            } => {
                // The lease time is unused: leases live in the active controller's memory.
                let epoch = self.control.register(*node, addr, 0);
                self.peer_addrs.insert(*node, peer_addr.clone());
                Outcome::Registered { epoch }
            }
            Command::Fence { node, epoch } => changed(self.control.fence_broker(*node, *epoch)),
            Command::Unfence { node, epoch } => changed(self.control.unfence_broker(*node, *epoch)),
            Command::Shutdown { node, epoch } => match self.control.shutdown(*node, *epoch) {
                Ok(()) => Outcome::Done,
                Err(e) => refusal(e),
            },
            Command::CreateTopic {
                name,
                partitions,
                replication,
                configs,
            } => match self
                .control
                .create_topic(name, *partitions, usize::from(*replication))
            {
                Ok(()) => {
                    self.configs.insert(name.clone(), configs.clone());
                    self.topic_ids.insert(name.clone(), index);
                    Outcome::Done
                }
                Err(e) => refusal(e),
            },
            Command::DeleteTopic { name } => match self.control.delete_topic(name) {
                Ok(()) => {
                    self.configs.remove(name);
                    self.topic_ids.remove(name);
                    Outcome::Done
                }
                Err(e) => refusal(e),
            },
            Command::AlterIsr {
                topic,
                partition,
                proposal,
            } => match self.control.isr_proposal(topic, *partition, proposal) {
                Ok(()) => Outcome::Done,
                Err(e) => refusal(e),
            },
            Command::Reassign {
                topic,
                partition,
                replicas,
            } => match self
                .control
                .reassign(topic, *partition, replicas.as_deref())
            {
                Ok(()) => Outcome::Done,
                Err(e) => refusal(e),
            },
            Command::Elect {
                topic,
                partition,
                unclean,
            } => match self.control.elect(topic, *partition, *unclean) {
                Ok(()) => Outcome::Done,
                Err(e) => refusal(e),
            },
        }
    }
}

fn changed(r: Result<bool, ClusterError>) -> Outcome {
    match r {
        Ok(true) => Outcome::Done,
        Ok(false) => Outcome::Unchanged,
        Err(e) => refusal(e),
    }
}

fn refusal(e: ClusterError) -> Outcome {
    match e {
        ClusterError::StaleBroker => Outcome::refused(
            ErrorCode::StaleBrokerEpoch,
            "the broker is not registered under that epoch",
        ),
        ClusterError::NotEnoughBrokers { wanted, live } => Outcome::refused(
            ErrorCode::InvalidReplicationFactor,
            format!("replication factor {wanted} but {live} live brokers"),
        ),
        ClusterError::TopicExists => {
            Outcome::refused(ErrorCode::TopicAlreadyExists, "the topic exists")
        }
        ClusterError::UnknownPartition => Outcome::refused(
            ErrorCode::UnknownTopicOrPartition,
            "no such topic or partition",
        ),
        ClusterError::Isr(e) => Outcome::refused(
            ErrorCode::InvalidRequest,
            format!("ISR change refused: {e:?}"),
        ),
        ClusterError::Operator(e) => match e {
            OperatorError::ElectionNotNeeded(m) => {
                Outcome::refused(ErrorCode::ElectionNotNeeded, m)
            }
            OperatorError::EligibleLeadersNotAvailable(m) => {
                Outcome::refused(ErrorCode::EligibleLeadersNotAvailable, m)
            }
            OperatorError::InvalidAssignment(m) => {
                Outcome::refused(ErrorCode::InvalidReplicaAssignment, m)
            }
            OperatorError::NoReassignmentInProgress => Outcome::refused(
                ErrorCode::NoReassignmentInProgress,
                "the partition is not being reassigned",
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(m: &mut Metadata, node: NodeId) -> u64 {
        match m.apply(
            &Command::Register {
                node,
                addr: format!("127.0.0.1:{}", 7400 + node * 10),
                peer_addr: format!("127.0.0.1:{}", 7401 + node * 10),
            },
            0,
        ) {
            Outcome::Registered { epoch } => epoch,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn commands_build_the_metadata_and_survive_a_json_round_trip() {
        let mut m = Metadata::default();
        let e1 = register(&mut m, 1);
        register(&mut m, 2);
        let create = Command::CreateTopic {
            name: "t".into(),
            partitions: 2,
            replication: 3,
            configs: BTreeMap::new(),
        };
        assert!(matches!(
            m.apply(&create, 9),
            Outcome::Refused { code, .. } if code == ErrorCode::InvalidReplicationFactor.code()
        ));
        register(&mut m, 3);
        assert_eq!(m.apply(&create, 9), Outcome::Done);
        assert!(matches!(m.apply(&create, 9), Outcome::Refused { .. }));
        assert_eq!(
            m.apply(&Command::Fence { node: 1, epoch: e1 }, 9),
            Outcome::Done
        );
        assert_eq!(
            m.apply(&Command::Fence { node: 1, epoch: e1 }, 9),
            Outcome::Unchanged
        );
        let p0 = m.control.partition("t", 0).unwrap().state().clone();
        assert_eq!(p0.leader, Some(2), "leadership left the fenced broker");
        // Snapshots are JSON: what comes back applies the same way.
        let json = serde_json::to_vec(&m).unwrap();
        let mut back: Metadata = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.control.partition("t", 0).unwrap().state(), &p0);
        for x in [&mut m, &mut back] {
            assert_eq!(
                x.apply(&Command::Unfence { node: 1, epoch: e1 }, 9),
                Outcome::Done
            );
            assert_eq!(
                x.apply(&Command::DeleteTopic { name: "t".into() }, 9),
                Outcome::Done
            );
        }
        assert_eq!(
            serde_json::to_vec(&m).unwrap(),
            serde_json::to_vec(&back).unwrap()
        );
    }
}
