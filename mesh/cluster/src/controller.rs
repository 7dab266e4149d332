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
//! - A reassignment (KIP-455) first grows the replicas to target + removing; the new replicas
//!   copy the log as followers and join the ISR through the leader; once every target replica
//!   is in sync, the replicas become the target and leadership leaves a removed leader.
//! - An operator may ask for an election: *preferred* moves leadership back to the first
//!   replica when it is in sync; *unclean* makes an out-of-sync replica leader of a partition
//!   with no live in-sync replica, accepting the loss of what only the ISR held.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::replication::{IsrProposal, LeaderAndIsr};
use crate::{Epoch, NodeId};

/// Why an ISR change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IsrError {
    /// The proposer is not the current leader of the current epoch.
    FencedLeader,
    /// The partition changed since the proposal's base (stale partition epoch).
    Stale,
    /// The proposal would leave the leader out, name a replica the partition does not have,
    /// or add a fenced broker.
    Invalid,
}

/// Why an operator's election or reassignment was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorError {
    /// The partition already has the leader the election would give it.
    ElectionNotNeeded(String),
    /// No replica can be elected by the rule asked for.
    EligibleLeadersNotAvailable(String),
    /// The replica list is empty, repeats a broker, names an unknown broker, or would leave
    /// no in-sync replica.
    InvalidAssignment(String),
    /// A cancellation, but no reassignment is in progress.
    NoReassignmentInProgress,
}

/// A partition's reassignment in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassignment {
    /// The replicas before it, in their order (a cancellation restores them).
    pub original: Vec<NodeId>,
    /// Replicas being added (in the replicas, not yet in sync at the start).
    pub adding: Vec<NodeId>,
    /// Replicas to be removed once every target replica is in sync.
    pub removing: Vec<NodeId>,
}

/// The controller's view of one partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionControl {
    replicas: Vec<NodeId>,
    state: LeaderAndIsr,
    /// A reassignment in progress; `replicas` is then target + removing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reassignment: Option<Reassignment>,
    /// Leaders per epoch, for checking (at most one per epoch by construction); not kept in
    /// snapshots.
    #[serde(skip)]
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
            reassignment: None,
        }
    }

    /// Replicas in placement order (the first is the preferred leader).
    pub fn replicas(&self) -> &[NodeId] {
        &self.replicas
    }

    /// The committed state.
    pub fn state(&self) -> &LeaderAndIsr {
        &self.state
    }

    /// Leaders by epoch, in order.
    pub fn history(&self) -> &[(Epoch, NodeId)] {
        &self.history
    }

    /// The reassignment in progress, if any.
    pub fn reassignment(&self) -> Option<&Reassignment> {
        self.reassignment.as_ref()
    }

    /// The replicas before the reassignment in progress (the replicas when none is).
    fn original(&self) -> Vec<NodeId> {
        match &self.reassignment {
            Some(r) => r.original.clone(),
            None => self.replicas.clone(),
        }
    }

    fn set_leader(&mut self, leader: NodeId) {
        self.state.epoch += 1;
        self.state.partition_epoch += 1;
        self.state.leader = Some(leader);
        self.history.push((self.state.epoch, leader));
    }

    /// Replaces the replica set by `replicas`, keeping the ISR members among them and moving
    /// leadership off a leader that is not in it.
    fn set_replicas(
        &mut self,
        replicas: Vec<NodeId>,
        reassignment: Option<Reassignment>,
        live: &BTreeSet<NodeId>,
    ) -> Result<(), OperatorError> {
        let isr: BTreeSet<NodeId> = self
            .state
            .isr
            .iter()
            .copied()
            .filter(|n| replicas.contains(n))
            .collect();
        if isr.is_empty() {
            return Err(OperatorError::InvalidAssignment(format!(
                "replicas {replicas:?} would leave no in-sync replica (ISR {:?})",
                self.state.isr
            )));
        }
        self.replicas = replicas;
        self.reassignment = reassignment;
        self.state.isr = isr;
        self.state.partition_epoch += 1;
        if self
            .state
            .leader
            .is_some_and(|l| !self.replicas.contains(&l))
        {
            self.elect(live);
        }
        Ok(())
    }

    /// Starts moving the partition to `target` (KIP-455): the replicas become target +
    /// removing; the new ones copy the log and join the ISR through the leader. A
    /// reassignment in progress is replaced (its original replicas stay the base). Completes
    /// at once when every target replica is already in sync. Brokers are checked by the
    /// caller.
    pub fn reassign(
        &mut self,
        target: &[NodeId],
        live: &BTreeSet<NodeId>,
    ) -> Result<(), OperatorError> {
        let distinct: BTreeSet<NodeId> = target.iter().copied().collect();
        if target.is_empty() || distinct.len() != target.len() {
            return Err(OperatorError::InvalidAssignment(format!(
                "replicas {target:?} must be a non-empty list of distinct brokers"
            )));
        }
        let original = self.original();
        let adding: Vec<NodeId> = target
            .iter()
            .copied()
            .filter(|n| !original.contains(n))
            .collect();
        let removing: Vec<NodeId> = original
            .iter()
            .copied()
            .filter(|n| !target.contains(n))
            .collect();
        let mut replicas = target.to_vec();
        replicas.extend(&removing);
        if self.reassignment.is_none() && target == self.replicas.as_slice() {
            return Ok(());
        }
        let moving = !(adding.is_empty() && removing.is_empty());
        self.set_replicas(
            replicas,
            moving.then_some(Reassignment {
                original,
                adding,
                removing,
            }),
            live,
        )?;
        self.try_complete(live);
        Ok(())
    }

    /// Cancels the reassignment in progress: back to the original replicas.
    pub fn cancel_reassignment(&mut self, live: &BTreeSet<NodeId>) -> Result<(), OperatorError> {
        if self.reassignment.is_none() {
            return Err(OperatorError::NoReassignmentInProgress);
        }
        let original = self.original();
        self.set_replicas(original, None, live)
    }

    /// Ends a reassignment whose target replicas are all in sync: the removed replicas go,
    /// and a removed leader hands over to the first live target replica. Returns whether it
    /// completed.
    fn try_complete(&mut self, live: &BTreeSet<NodeId>) -> bool {
        let Some(r) = &self.reassignment else {
            return false;
        };
        let target: Vec<NodeId> = self
            .replicas
            .iter()
            .copied()
            .filter(|n| !r.removing.contains(n))
            .collect();
        if !target.iter().all(|n| self.state.isr.contains(n)) {
            return false;
        }
        // Cannot fail: the target is non-empty and in sync.
        self.set_replicas(target, None, live).is_ok()
    }

    /// An operator's preferred-leader election: the first replica leads again, if it is
    /// live and in sync and does not lead already.
    pub fn elect_preferred(&mut self, live: &BTreeSet<NodeId>) -> Result<(), OperatorError> {
        let preferred = self.replicas[0];
        if self.state.leader == Some(preferred) {
            return Err(OperatorError::ElectionNotNeeded(format!(
                "the preferred replica {preferred} leads already"
            )));
        }
        if !self.state.isr.contains(&preferred) || !live.contains(&preferred) {
            return Err(OperatorError::EligibleLeadersNotAvailable(format!(
                "the preferred replica {preferred} is not live and in sync"
            )));
        }
        self.set_leader(preferred);
        Ok(())
    }

    /// An operator's unclean election, for a partition without a leader: the first live
    /// replica leads, out of sync or not, and the ISR restarts with it alone. What only the
    /// old ISR held (up to everything acknowledged since the new leader fell behind) is lost;
    /// the old ISR members truncate to the new leader's log when they return.
    pub fn elect_unclean(&mut self, live: &BTreeSet<NodeId>) -> Result<(), OperatorError> {
        if let Some(l) = self.state.leader {
            return Err(OperatorError::ElectionNotNeeded(format!(
                "replica {l} leads; an unclean election is only for a partition without a leader"
            )));
        }
        // Never a replica a move is still adding: its log may be empty.
        let adding = self.reassignment.as_ref().map(|r| r.adding.clone());
        let Some(candidate) = self
            .replicas
            .iter()
            .copied()
            .filter(|r| !adding.as_ref().is_some_and(|a| a.contains(r)))
            .find(|r| live.contains(r))
        else {
            return Err(OperatorError::EligibleLeadersNotAvailable(format!(
                "no replica of {:?} is live (replicas being added do not count)",
                self.replicas
            )));
        };
        self.state.isr = [candidate].into();
        self.set_leader(candidate);
        Ok(())
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
        self.try_complete(live);
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

    fn add_to_isr(c: &mut PartitionControl, n: NodeId, live: &BTreeSet<NodeId>) {
        let s = c.state().clone();
        let mut isr = s.isr.clone();
        isr.insert(n);
        let p = IsrProposal {
            leader: s.leader.unwrap(),
            epoch: s.epoch,
            partition_epoch: s.partition_epoch,
            isr,
        };
        c.on_isr_proposal(&p, live).unwrap();
    }

    #[test]
    fn a_reassignment_grows_the_replicas_then_completes_once_the_target_is_in_sync() {
        let live: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let mut c = PartitionControl::new(vec![1, 2, 3]);
        c.reassign(&[4, 2, 3], &live).unwrap();
        assert_eq!(c.replicas(), &[4, 2, 3, 1]);
        assert_eq!(
            c.reassignment(),
            Some(&Reassignment {
                original: vec![1, 2, 3],
                adding: vec![4],
                removing: vec![1]
            })
        );
        assert_eq!(
            c.state().leader,
            Some(1),
            "the old leader leads until the move ends"
        );
        assert_eq!(c.state().isr, [1, 2, 3].into());
        // 4 has caught up: the leader adds it, the move completes and 1, removed, hands over.
        add_to_isr(&mut c, 4, &live);
        assert_eq!(c.replicas(), &[4, 2, 3]);
        assert!(c.reassignment().is_none());
        assert_eq!(c.state().isr, [2, 3, 4].into());
        assert_eq!((c.state().leader, c.state().epoch), (Some(4), 2));
        // Asking for what is already there changes nothing.
        let pe = c.state().partition_epoch;
        c.reassign(&[4, 2, 3], &live).unwrap();
        assert_eq!(c.state().partition_epoch, pe);
        // Dropping the last replica is a real change, not a repeat.
        let mut d = PartitionControl::new(vec![1, 2, 3]);
        d.reassign(&[1, 2], &live).unwrap();
        assert_eq!((d.replicas(), d.reassignment()), (&[1, 2][..], None));
        assert_eq!(d.state().isr, [1, 2].into());
        // Shrinking to replicas in sync completes at once; the leader stays.
        c.reassign(&[4, 3], &live).unwrap();
        assert_eq!((c.replicas(), c.reassignment()), (&[4, 3][..], None));
        assert_eq!(c.state().isr, [3, 4].into());
        assert_eq!(c.state().leader, Some(4));
        // A move to 1 cancelled before 1 caught up: back to [4, 3], 1 never in the ISR.
        c.reassign(&[1, 3], &live).unwrap();
        assert_eq!(c.replicas(), &[1, 3, 4]);
        c.cancel_reassignment(&live).unwrap();
        assert_eq!((c.replicas(), c.reassignment()), (&[4, 3][..], None));
        assert_eq!(c.state().isr, [3, 4].into());
        assert_eq!(
            c.cancel_reassignment(&live),
            Err(OperatorError::NoReassignmentInProgress)
        );
        // A second move replaces one in progress, from the same original replicas.
        c.reassign(&[1, 2], &live).unwrap();
        c.reassign(&[4, 1], &live).unwrap();
        assert_eq!(c.replicas(), &[4, 1, 3]);
        assert_eq!(
            c.reassignment(),
            Some(&Reassignment {
                original: vec![4, 3],
                adding: vec![1],
                removing: vec![3]
            })
        );
        for bad in [&[][..], &[1, 1][..]] {
            assert!(matches!(
                c.reassign(bad, &live),
                Err(OperatorError::InvalidAssignment(_))
            ));
        }
        let epochs: Vec<Epoch> = c.history().iter().map(|(e, _)| *e).collect();
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
    }

    #[test]
    fn operators_elect_the_preferred_leader_or_an_unclean_one() {
        // Preferred: 1 lost leadership; once back in sync it can lead again.
        let mut c = PartitionControl::new(vec![1, 2, 3]);
        c.on_fenced(1, &[2, 3].into());
        let live: BTreeSet<NodeId> = [1, 2, 3].into();
        c.on_unfenced(1, &live);
        assert_eq!(c.state().leader, Some(2));
        assert!(matches!(
            c.elect_preferred(&live),
            Err(OperatorError::EligibleLeadersNotAvailable(_))
        ));
        add_to_isr(&mut c, 1, &live);
        c.elect_preferred(&live).unwrap();
        assert_eq!((c.state().leader, c.state().epoch), (Some(1), 3));
        assert!(matches!(
            c.elect_preferred(&live),
            Err(OperatorError::ElectionNotNeeded(_))
        ));
        // Unclean: the ISR shrank to 1, then 1 died; 2 is live but out of sync.
        let mut c = PartitionControl::new(vec![1, 2]);
        let shrink = IsrProposal {
            leader: 1,
            epoch: 1,
            partition_epoch: 1,
            isr: [1].into(),
        };
        c.on_isr_proposal(&shrink, &[1, 2].into()).unwrap();
        assert!(matches!(
            c.elect_unclean(&[1, 2].into()),
            Err(OperatorError::ElectionNotNeeded(_))
        ));
        c.on_fenced(1, &[2].into());
        assert_eq!(c.state().leader, None, "no clean candidate: offline");
        assert!(matches!(
            c.elect_unclean(&BTreeSet::new()),
            Err(OperatorError::EligibleLeadersNotAvailable(_))
        ));
        c.elect_unclean(&[2].into()).unwrap();
        assert_eq!(c.state().leader, Some(2));
        assert_eq!(c.state().isr, [2].into());
        assert_eq!(c.state().epoch, 3);
        // 1 returns: 2 keeps leading; 1 follows (and truncates) like any other follower.
        assert!(!c.on_unfenced(1, &[1, 2].into()));
        assert_eq!(c.state().leader, Some(2));
        // A replica a move is adding (an empty log) is never the unclean choice.
        let mut c = PartitionControl::new(vec![1, 2]);
        c.on_isr_proposal(&shrink, &[1, 2].into()).unwrap();
        c.reassign(&[3, 2], &[1, 2, 3].into()).unwrap();
        assert_eq!(c.replicas(), &[3, 2, 1]);
        c.on_fenced(1, &[2, 3].into());
        assert_eq!(c.state().leader, None);
        c.elect_unclean(&[2, 3].into()).unwrap();
        assert_eq!(c.state().leader, Some(2), "not 3, which is being added");
        let mut c = PartitionControl::new(vec![1, 2]);
        c.on_isr_proposal(&shrink, &[1, 2].into()).unwrap();
        c.reassign(&[3, 2], &[1, 2, 3].into()).unwrap();
        c.on_fenced(1, &[3].into());
        assert!(matches!(
            c.elect_unclean(&[3].into()),
            Err(OperatorError::EligibleLeadersNotAvailable(_))
        ));
    }
}

/// A broker as the controller knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerState {
    /// Its current registration: a new, larger epoch at every (re)start (KRaft's broker
    /// epoch); requests of an older incarnation are refused.
    pub epoch: u64,
    /// Address clients and peers reach it at.
    pub addr: String,
    /// Its lease runs until this time; past it the broker is fenced.
    pub lease_until_ms: u64,
    /// Fenced: its lease expired or it shut down; it leads nothing and is in no ISR (unless
    /// the last member) until it heartbeats again.
    pub fenced: bool,
}

/// Why a cluster change was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterError {
    /// The broker is not registered, or the request comes from an older incarnation.
    StaleBroker,
    /// More replicas asked for than unfenced brokers.
    NotEnoughBrokers {
        /// Replicas wanted.
        wanted: usize,
        /// Unfenced brokers.
        live: usize,
    },
    /// A topic with that name exists.
    TopicExists,
    /// No such topic or partition.
    UnknownPartition,
    /// An ISR change was refused.
    Isr(IsrError),
    /// An operator's election or reassignment was refused.
    Operator(OperatorError),
}

/// The controller's whole state, as the Raft log will hold it: brokers with epochs and
/// leases, and every partition's leader, epoch and ISR. Every change bumps `version`, the
/// offset brokers follow the metadata at.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterControl {
    lease_ms: u64,
    brokers: std::collections::BTreeMap<NodeId, BrokerState>,
    next_epoch: u64,
    topics: std::collections::BTreeMap<String, Vec<PartitionControl>>,
    version: u64,
}

impl ClusterControl {
    /// An empty cluster whose broker leases last `lease_ms`.
    pub fn new(lease_ms: u64) -> Self {
        Self {
            lease_ms,
            ..Self::default()
        }
    }

    /// Bumped at every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The brokers.
    pub fn brokers(&self) -> &std::collections::BTreeMap<NodeId, BrokerState> {
        &self.brokers
    }

    /// Unfenced brokers.
    pub fn live(&self) -> BTreeSet<NodeId> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.fenced)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A partition's control state.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionControl> {
        self.topics.get(topic)?.get(partition as usize)
    }

    /// A broker (re)starts: it gets a new epoch and a lease. A previous incarnation is fenced
    /// first, so it leaves the ISRs it was in (its unsynced tail may be gone) and gives up
    /// leadership; then the new one is unfenced. Returns the new epoch.
    pub fn register(&mut self, id: NodeId, addr: &str, now_ms: u64) -> u64 {
        if self.brokers.get(&id).is_some_and(|b| !b.fenced) {
            self.fence(id);
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.brokers.insert(
            id,
            BrokerState {
                epoch,
                addr: addr.to_string(),
                lease_until_ms: now_ms + self.lease_ms,
                fenced: false,
            },
        );
        let live = self.live();
        for parts in self.topics.values_mut() {
            for p in parts {
                p.on_unfenced(id, &live);
            }
        }
        self.version += 1;
        epoch
    }

    /// A heartbeat of incarnation `epoch`: renews its lease, and unfences it if it was fenced.
    pub fn heartbeat(&mut self, id: NodeId, epoch: u64, now_ms: u64) -> Result<(), ClusterError> {
        let b = self.brokers.get_mut(&id).ok_or(ClusterError::StaleBroker)?;
        if b.epoch != epoch {
            return Err(ClusterError::StaleBroker);
        }
        b.lease_until_ms = now_ms + self.lease_ms;
        if b.fenced {
            b.fenced = false;
            let live = self.live();
            for parts in self.topics.values_mut() {
                for p in parts {
                    p.on_unfenced(id, &live);
                }
            }
            self.version += 1;
        }
        Ok(())
    }

    fn fence(&mut self, id: NodeId) {
        if let Some(b) = self.brokers.get_mut(&id) {
            b.fenced = true;
        }
        let live = self.live();
        for parts in self.topics.values_mut() {
            for p in parts {
                p.on_fenced(id, &live);
            }
        }
        self.version += 1;
    }

    /// Fences incarnation `epoch` of broker `id`, when the lease is kept outside this state
    /// (the node's active controller tracks heartbeats in memory, as KRaft does, and writes
    /// only the fencing to the Raft log). Returns whether anything changed.
    pub fn fence_broker(&mut self, id: NodeId, epoch: u64) -> Result<bool, ClusterError> {
        match self.brokers.get(&id) {
            Some(b) if b.epoch == epoch => {
                if b.fenced {
                    return Ok(false);
                }
                self.fence(id);
                Ok(true)
            }
            _ => Err(ClusterError::StaleBroker),
        }
    }

    /// Unfences incarnation `epoch` of broker `id` (it heartbeats again). Returns whether
    /// anything changed.
    pub fn unfence_broker(&mut self, id: NodeId, epoch: u64) -> Result<bool, ClusterError> {
        let b = self.brokers.get_mut(&id).ok_or(ClusterError::StaleBroker)?;
        if b.epoch != epoch {
            return Err(ClusterError::StaleBroker);
        }
        if !b.fenced {
            return Ok(false);
        }
        b.fenced = false;
        let live = self.live();
        for parts in self.topics.values_mut() {
            for p in parts {
                p.on_unfenced(id, &live);
            }
        }
        self.version += 1;
        Ok(true)
    }

    /// Every topic and its partitions.
    pub fn topics(&self) -> impl Iterator<Item = (&str, &[PartitionControl])> {
        self.topics.iter().map(|(n, p)| (n.as_str(), p.as_slice()))
    }

    /// Deletes a topic.
    pub fn delete_topic(&mut self, name: &str) -> Result<(), ClusterError> {
        self.topics
            .remove(name)
            .ok_or(ClusterError::UnknownPartition)?;
        self.version += 1;
        Ok(())
    }

    /// Fences every broker whose lease ran out; returns them.
    pub fn tick(&mut self, now_ms: u64) -> Vec<NodeId> {
        let expired: Vec<NodeId> = self
            .brokers
            .iter()
            .filter(|(_, b)| !b.fenced && b.lease_until_ms < now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.fence(*id);
        }
        expired
    }

    /// Controlled shutdown of incarnation `epoch`: leadership moves away and the broker leaves
    /// the ISRs now, rather than when its lease runs out.
    pub fn shutdown(&mut self, id: NodeId, epoch: u64) -> Result<(), ClusterError> {
        match self.brokers.get(&id) {
            Some(b) if b.epoch == epoch => {
                self.fence(id);
                Ok(())
            }
            _ => Err(ClusterError::StaleBroker),
        }
    }

    /// Creates a topic with `partitions` partitions of `replication` replicas each, spread
    /// over the unfenced brokers: partition `p`'s replicas are the brokers (in id order) from
    /// position `p` on, so leaders (the first replica) rotate over the brokers.
    pub fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        replication: usize,
    ) -> Result<(), ClusterError> {
        if self.topics.contains_key(name) {
            return Err(ClusterError::TopicExists);
        }
        let live: Vec<NodeId> = self.live().into_iter().collect();
        if replication == 0 || replication > live.len() {
            return Err(ClusterError::NotEnoughBrokers {
                wanted: replication,
                live: live.len(),
            });
        }
        let parts = (0..partitions as usize)
            .map(|p| {
                PartitionControl::new(
                    (0..replication)
                        .map(|i| live[(p + i) % live.len()])
                        .collect(),
                )
            })
            .collect();
        self.topics.insert(name.to_string(), parts);
        self.version += 1;
        Ok(())
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<&mut PartitionControl, ClusterError> {
        self.topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(partition as usize))
            .ok_or(ClusterError::UnknownPartition)
    }

    /// An operator's reassignment of one partition to `target` (every broker registered,
    /// fenced or not), or with `None` the cancellation of the one in progress.
    pub fn reassign(
        &mut self,
        topic: &str,
        partition: u32,
        target: Option<&[NodeId]>,
    ) -> Result<(), ClusterError> {
        let live = self.live();
        if let Some(unknown) = target
            .into_iter()
            .flatten()
            .find(|n| !self.brokers.contains_key(n))
        {
            return Err(ClusterError::Operator(OperatorError::InvalidAssignment(
                format!("broker {unknown} is not registered"),
            )));
        }
        let part = self.partition_mut(topic, partition)?;
        match target {
            Some(t) => part.reassign(t, &live),
            None => part.cancel_reassignment(&live),
        }
        .map_err(ClusterError::Operator)?;
        self.version += 1;
        Ok(())
    }

    /// An operator's leader election for one partition: preferred, or unclean.
    pub fn elect(
        &mut self,
        topic: &str,
        partition: u32,
        unclean: bool,
    ) -> Result<(), ClusterError> {
        let live = self.live();
        let part = self.partition_mut(topic, partition)?;
        if unclean {
            part.elect_unclean(&live)
        } else {
            part.elect_preferred(&live)
        }
        .map_err(ClusterError::Operator)?;
        self.version += 1;
        Ok(())
    }

    /// A leader's ISR change for one partition.
    pub fn isr_proposal(
        &mut self,
        topic: &str,
        partition: u32,
        p: &IsrProposal,
    ) -> Result<(), ClusterError> {
        let live = self.live();
        let part = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(partition as usize))
            .ok_or(ClusterError::UnknownPartition)?;
        part.on_isr_proposal(p, &live).map_err(ClusterError::Isr)?;
        self.version += 1;
        Ok(())
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn placement_spreads_leaders_and_respects_live_brokers() {
        let mut c = ClusterControl::new(100);
        for id in [1, 2, 3] {
            c.register(id, &format!("127.0.0.1:{}", 7400 + id), 0);
        }
        assert_eq!(
            c.create_topic("t", 1, 4),
            Err(ClusterError::NotEnoughBrokers { wanted: 4, live: 3 })
        );
        c.create_topic("t", 6, 3).unwrap();
        assert_eq!(c.create_topic("t", 1, 1), Err(ClusterError::TopicExists));
        let leaders: Vec<Option<NodeId>> = (0..6)
            .map(|p| c.partition("t", p).unwrap().state().leader)
            .collect();
        assert_eq!(
            leaders,
            vec![Some(1), Some(2), Some(3), Some(1), Some(2), Some(3)]
        );
        for p in 0..6 {
            assert_eq!(c.partition("t", p).unwrap().state().isr.len(), 3);
        }
    }

    #[test]
    fn leases_fence_and_new_incarnations_replace_old_ones() {
        let mut c = ClusterControl::new(100);
        let e1 = c.register(1, "a", 0);
        let e2 = c.register(2, "b", 0);
        c.register(3, "c", 0);
        c.create_topic("t", 1, 3).unwrap();
        // 2 and 3 keep heartbeating; 1 goes quiet.
        for now in [50, 100, 150] {
            c.heartbeat(2, e2, now).unwrap();
            c.heartbeat(3, c.brokers()[&3].epoch, now).unwrap();
        }
        assert_eq!(c.tick(150), vec![1]);
        let s = c.partition("t", 0).unwrap().state();
        assert_eq!(s.leader, Some(2), "a new leader from the ISR");
        assert!(!s.isr.contains(&1));
        // 1 restarts: a new epoch; the old incarnation's heartbeats are refused.
        let e1b = c.register(1, "a", 200);
        assert!(e1b > e1);
        assert_eq!(c.heartbeat(1, e1, 210), Err(ClusterError::StaleBroker));
        c.heartbeat(1, e1b, 210).unwrap();
        // Controlled shutdown moves leadership at once.
        let v = c.version();
        c.shutdown(2, e2).unwrap();
        assert!(c.version() > v);
        let s = c.partition("t", 0).unwrap().state();
        assert_eq!(s.leader, Some(3));
        assert_eq!(c.shutdown(2, e2 + 100), Err(ClusterError::StaleBroker));
    }
}
