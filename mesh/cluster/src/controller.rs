//! The controller's state of one partition: replicas, leader, leader epoch, ISR, and the
//! rules that change them. In the node this state lives in the Raft log (KRaft's model); here
//! it is the pure transition logic, so elections and ISR changes can be simulated.
//!
//! - Leaders are elected only from the ISR (no unclean election).
//! - A broker the controller fences (its lease expired, or it is shutting down) leaves every
//!   ISR it is in, unless it is the last member: the last member keeps the partition's
//!   committed data, so the partition stays offline until it returns.
//! - An ISR change is a compare-and-set on the partition epoch, by the current leader only
//!   (KIP-497): a deposed leader cannot shrink the ISR to itself.

use std::collections::BTreeSet;

use crate::replication::{IsrProposal, LeaderAndIsr};
use crate::{Epoch, NodeId};

/// Why an ISR change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsrError {
    /// The proposer is not the current leader of the current epoch.
    FencedLeader,
    /// The partition changed since the proposal's base (stale partition epoch).
    Stale,
    /// The proposal would leave the leader out, name a replica the partition does not have,
    /// or add a fenced broker.
    Invalid,
}

/// The controller's view of one partition.
#[derive(Clone, Debug)]
pub struct PartitionControl {
    replicas: Vec<NodeId>,
    state: LeaderAndIsr,
    /// Leaders per epoch, for checking (at most one per epoch by construction).
    history: Vec<(Epoch, NodeId)>,
}

impl PartitionControl {
    /// A new partition on `replicas`; the first is its first leader, all are in sync.
    pub fn new(replicas: Vec<NodeId>) -> Self {
        let leader = replicas.first().copied();
        let state = LeaderAndIsr {
            leader,
            epoch: 1,
            partition_epoch: 1,
            isr: replicas.iter().copied().collect(),
        };
        Self {
            history: leader.map(|l| (1, l)).into_iter().collect(),
            replicas,
            state,
        }
    }

    /// The committed state.
    pub fn state(&self) -> &LeaderAndIsr {
        &self.state
    }

    /// Leaders by epoch, in order.
    pub fn history(&self) -> &[(Epoch, NodeId)] {
        &self.history
    }

    fn elect(&mut self, live: &BTreeSet<NodeId>) {
        // Clean election: the first replica (placement order) that is in the ISR and live.
        let candidate = self
            .replicas
            .iter()
            .copied()
            .find(|r| self.state.isr.contains(r) && live.contains(r));
        self.state.epoch += 1;
        self.state.partition_epoch += 1;
        self.state.leader = candidate;
        if let Some(l) = candidate {
            self.history.push((self.state.epoch, l));
        }
    }

    /// A broker was fenced (lease expired or controlled shutdown). Returns whether the state
    /// changed.
    pub fn on_fenced(&mut self, node: NodeId, live: &BTreeSet<NodeId>) -> bool {
        let mut changed = false;
        if self.state.isr.contains(&node) && self.state.isr.len() > 1 {
            self.state.isr.remove(&node);
            self.state.partition_epoch += 1;
            changed = true;
        }
        if self.state.leader == Some(node) {
            self.elect(live);
            changed = true;
        }
        changed
    }

    /// A broker registered (started, or its lease is valid again). An offline partition whose
    /// ISR holds it gets it as leader.
    pub fn on_unfenced(&mut self, node: NodeId, live: &BTreeSet<NodeId>) -> bool {
        if self.state.leader.is_none() && self.state.isr.contains(&node) {
            self.elect(live);
            return true;
        }
        false
    }

    /// A leader's ISR change: committed if it comes from the current leader of the current
    /// epoch, applies to the current partition epoch, keeps the leader, and adds only live
    /// replicas.
    pub fn on_isr_proposal(
        &mut self,
        p: &IsrProposal,
        live: &BTreeSet<NodeId>,
    ) -> Result<(), IsrError> {
        if self.state.leader != Some(p.leader) || self.state.epoch != p.epoch {
            return Err(IsrError::FencedLeader);
        }
        if self.state.partition_epoch != p.partition_epoch {
            return Err(IsrError::Stale);
        }
        let known = p.isr.iter().all(|n| self.replicas.contains(n));
        let added_live = p.isr.difference(&self.state.isr).all(|n| live.contains(n));
        if !p.isr.contains(&p.leader) || !known || !added_live {
            return Err(IsrError::Invalid);
        }
        self.state.isr = p.isr.clone();
        self.state.partition_epoch += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elections_are_clean_and_isr_changes_are_fenced() {
        let live: BTreeSet<NodeId> = [1, 2, 3].into();
        let mut c = PartitionControl::new(vec![1, 2, 3]);
        assert_eq!(c.state().leader, Some(1));
        // The leader shrinks the ISR to {1, 2}.
        let p = IsrProposal {
            leader: 1,
            epoch: 1,
            partition_epoch: 1,
            isr: [1, 2].into(),
        };
        c.on_isr_proposal(&p, &live).unwrap();
        assert_eq!(c.on_isr_proposal(&p, &live), Err(IsrError::Stale));
        // 1 is fenced: 2 leads epoch 2; 3 (out of sync) can never be elected.
        let live: BTreeSet<NodeId> = [2, 3].into();
        assert!(c.on_fenced(1, &live));
        assert_eq!((c.state().leader, c.state().epoch), (Some(2), 2));
        assert_eq!(c.state().isr, [2].into());
        // The deposed leader's proposals are refused.
        let old = IsrProposal {
            leader: 1,
            epoch: 1,
            partition_epoch: c.state().partition_epoch,
            isr: [1].into(),
        };
        assert_eq!(c.on_isr_proposal(&old, &live), Err(IsrError::FencedLeader));
        // 2 is fenced too: it is the last ISR member, so the partition goes offline rather
        // than elect 3.
        assert!(c.on_fenced(2, &[3].into()));
        assert_eq!(c.state().leader, None);
        assert_eq!(c.state().isr, [2].into());
        assert!(!c.on_unfenced(3, &[3].into()));
        assert!(c.on_unfenced(2, &[2, 3].into()));
        assert_eq!(c.state().leader, Some(2));
        let epochs: Vec<Epoch> = c.history().iter().map(|(e, _)| *e).collect();
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
    }
}
