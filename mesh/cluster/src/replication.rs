//! One partition's replica on one node, Kafka's replication protocol with the fixes of
//! KIP-101/279 (truncation by epoch lineage, not by high watermark), KIP-320 (epoch-fenced
//! fetches) and KIP-497 (ISR changes take effect only once the controller commits them).
//!
//! - Every entry carries the epoch of the leader that appended it.
//! - Followers pull: a fetch names the follower's leader epoch, its log end and the epoch of
//!   its last entry. The leader answers records from there, or the point where the
//!   follower's log diverges from its own (the end of the largest common epoch); the follower
//!   truncates to it and fetches again.
//! - The high watermark is the smallest **durable** end offset over the ISR: an entry below it
//!   is fsynced on every ISR member. A produce with `acks=all` is acknowledged once that
//!   minimum passes it while the ISR has at least `min_insync` members (the simulation found
//!   that checking the ISR size at acknowledgement time instead is unsafe: an entry that
//!   passed while the ISR was one member would be acknowledged once a lagging replica joined).
//! - The leader asks the controller to shrink the ISR when a follower has not caught up
//!   within `lag_max`, and to expand it when a follower has caught up and durably holds
//!   everything below the high watermark; it
//!   keeps using the ISR it has until the controller's answer arrives, and while an addition
//!   is pending it counts the added replica for the high watermark too (Kafka's "maximal
//!   ISR"), since the controller may commit it, and elect it, first.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Epoch, NodeId};

/// One entry of a partition log as replication sees it: the appending leader's epoch and
/// what it holds (an id, in the simulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Epoch of the leader that appended it.
    pub epoch: Epoch,
    /// Payload id.
    pub id: u64,
}

/// A replica's log: entries, and how many of them are durable (fsynced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaLog {
    entries: Vec<Entry>,
    durable: u64,
}

impl ReplicaLog {
    /// Offset after the last entry.
    pub fn end(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Offset after the last durable entry.
    pub fn durable_end(&self) -> u64 {
        self.durable
    }

    /// Every entry.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Epoch of the last entry.
    pub fn last_epoch(&self) -> Option<Epoch> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Appends (not durable until [`sync`](Self::sync)).
    pub fn append(&mut self, entries: &[Entry]) {
        self.entries.extend_from_slice(entries);
    }

    /// fsync: everything appended is durable.
    pub fn sync(&mut self) {
        self.durable = self.end();
    }

    /// A crash: what was not fsynced is gone.
    pub fn crash(&mut self) {
        self.entries.truncate(self.durable as usize);
    }

    /// Removes entries from `to` on.
    pub fn truncate(&mut self, to: u64) {
        if to < self.end() {
            self.entries.truncate(to as usize);
            self.durable = self.durable.min(to);
        }
    }

    /// OffsetForLeaderEpoch (KIP-279): the largest epoch ≤ `epoch` in this log and the offset
    /// where it ends (where the next larger epoch starts, or the log end); `None` when the log
    /// has no entry of an epoch ≤ `epoch` (then nothing is common: truncate to 0).
    pub fn end_of_epoch(&self, epoch: Epoch) -> Option<(Epoch, u64)> {
        let mut found: Option<Epoch> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.epoch <= epoch {
                found = Some(found.map_or(e.epoch, |f| f.max(e.epoch)));
            } else if let Some(f) = found {
                // Epochs never decrease along a log: the first larger epoch ends `f`.
                return Some((f, i as u64));
            }
        }
        found.map(|f| (f, self.end()))
    }
}

/// A replication message between replicas of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Follower → leader.
    Fetch {
        /// The follower.
        from: NodeId,
        /// The leader epoch the follower knows.
        epoch: Epoch,
        /// The follower's log end: the first offset it wants.
        fetch_offset: u64,
        /// Epoch of the follower's last entry.
        last_fetched_epoch: Option<Epoch>,
        /// The follower's durable end (≤ `fetch_offset`).
        durable_end: u64,
    },
    /// Leader → follower: entries from `start` and the high watermark.
    Records {
        /// The leader's epoch.
        epoch: Epoch,
        /// Offset of the first entry (the fetch offset).
        start: u64,
        /// Entries.
        entries: Vec<Entry>,
        /// High watermark.
        high_watermark: u64,
    },
    /// Leader → follower: the follower's log diverges; truncate to `end_offset` (the end of
    /// epoch `end_epoch` on the leader, the largest epoch both may share).
    Diverging {
        /// The leader's epoch.
        epoch: Epoch,
        /// The largest leader epoch ≤ the follower's last epoch, if any.
        end_epoch: Option<Epoch>,
        /// Where that epoch ends on the leader.
        end_offset: u64,
    },
    /// The fetch named another epoch than the receiver's, or the receiver is not the leader.
    Fenced {
        /// The receiver's epoch.
        epoch: Epoch,
    },
}

/// The partition's leader, epoch and ISR as the controller committed them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderAndIsr {
    /// The leader, or `None` while the partition is offline.
    pub leader: Option<NodeId>,
    /// The leader epoch.
    pub epoch: Epoch,
    /// Bumped at every change (leader or ISR): the compare-and-set version.
    pub partition_epoch: u32,
    /// In-sync replicas.
    pub isr: BTreeSet<NodeId>,
}

/// An ISR change the leader asks the controller to commit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IsrProposal {
    /// The proposing leader.
    pub leader: NodeId,
    /// Its leader epoch.
    pub epoch: Epoch,
    /// The partition epoch the change applies to.
    pub partition_epoch: u32,
    /// The ISR wanted.
    pub isr: BTreeSet<NodeId>,
}

/// Why a produce was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProduceError {
    /// This replica is not the leader (of the epoch it knows).
    NotLeader,
    /// The ISR is smaller than `min_insync`.
    NotEnoughReplicas,
}

/// Settings of a partition's replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `min.insync.replicas`.
    pub min_insync: usize,
    /// A follower that has not caught up for this long leaves the ISR (ms).
    pub lag_max_ms: u64,
    /// Most entries per fetch answer.
    pub fetch_entries_max: usize,
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// Its durable end, as it last reported it (0 until it fetches in this epoch).
    durable: u64,
    /// Its log end, as it last reported it.
    end: u64,
    /// Last time it was caught up to the leader's log end.
    caught_up_ms: u64,
}

/// What a replica's log looks like to replication: its ends and its epoch lineage. The node
/// implements it over the partition log (and its leader-epoch file); [`ReplicaLog`] is the
/// simulation's.
pub trait LogView {
    /// Offset after the last entry.
    fn end(&self) -> u64;
    /// Offset after the last fsynced entry.
    fn durable_end(&self) -> u64;
    /// Epoch of the last entry.
    fn last_epoch(&self) -> Option<Epoch>;
    /// OffsetForLeaderEpoch: the largest epoch ≤ `epoch` in the log and where it ends.
    fn end_of_epoch(&self, epoch: Epoch) -> Option<(Epoch, u64)>;
}

impl LogView for ReplicaLog {
    fn end(&self) -> u64 {
        ReplicaLog::end(self)
    }
    fn durable_end(&self) -> u64 {
        ReplicaLog::durable_end(self)
    }
    fn last_epoch(&self) -> Option<Epoch> {
        ReplicaLog::last_epoch(self)
    }
    fn end_of_epoch(&self, epoch: Epoch) -> Option<(Epoch, u64)> {
        ReplicaLog::end_of_epoch(self, epoch)
    }
}

/// A follower's fetch, as the leader receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// The follower.
    pub from: NodeId,
    /// The leader epoch the follower knows.
    pub epoch: Epoch,
    /// The follower's log end: the first offset it wants.
    pub fetch_offset: u64,
    /// Epoch of the follower's last entry.
    pub last_fetched_epoch: Option<Epoch>,
    /// The follower's durable end (≤ `fetch_offset`).
    pub durable_end: u64,
}

/// The leader's answer to a fetch, without the records (the caller reads those).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchAnswer {
    /// Send entries from `start` (the fetch offset), with the high watermark.
    Records {
        /// The leader's epoch.
        epoch: Epoch,
        /// The fetch offset.
        start: u64,
        /// High watermark.
        high_watermark: u64,
    },
    /// The follower's log diverges: it truncates to `end_offset`.
    Diverging {
        /// The leader's epoch.
        epoch: Epoch,
        /// The largest leader epoch ≤ the follower's last epoch, if any.
        end_epoch: Option<Epoch>,
        /// Where that epoch ends on the leader.
        end_offset: u64,
    },
    /// Wrong epoch, or not the leader.
    Fenced {
        /// The receiver's epoch.
        epoch: Epoch,
    },
}

/// One replica's replication state, without its log: every decision takes a [`LogView`] and
/// the caller does the log's I/O (appending, truncating, fsyncing, reading), then tells the
/// core what changed. The node drives it over real partition logs; [`Replica`] drives it over
/// an in-memory log for the simulation.
#[derive(Debug)]
pub struct ReplicaCore {
    id: NodeId,
    settings: Settings,
    state: LeaderAndIsr,
    high_watermark: u64,
    /// As leader: entries below this are durable on at least `min_insync` ISR members, i.e.
    /// acknowledged for `acks=all`. It moves only while the ISR has `min_insync` members, and
    /// from the minimum just computed, not from the (never decreasing) high watermark: an
    /// entry that passed the high watermark while the ISR was too small is not acknowledged
    /// by a replica joining later without it.
    acked_upto: u64,
    progress: BTreeMap<NodeId, Progress>,
    /// An ISR change sent to the controller and not answered yet, and when.
    pending: Option<(u64, IsrProposal)>,
}

impl ReplicaCore {
    /// A replica knowing nothing of the partition yet (after a restart it learns the high
    /// watermark again from the leader).
    pub fn new(id: NodeId, settings: Settings) -> Self {
        Self {
            id,
            settings,
            state: LeaderAndIsr {
                leader: None,
                epoch: 0,
                partition_epoch: 0,
                isr: BTreeSet::new(),
            },
            high_watermark: 0,
            acked_upto: 0,
            progress: BTreeMap::new(),
            pending: None,
        }
    }

    /// This node.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The high watermark this replica knows.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// As leader: entries below this are acknowledged for `acks=all`.
    pub fn acked_upto(&self) -> u64 {
        self.acked_upto
    }

    /// The partition state this replica knows.
    pub fn state(&self) -> &LeaderAndIsr {
        &self.state
    }

    /// Whether this replica leads its known epoch.
    pub fn is_leader(&self) -> bool {
        self.state.leader == Some(self.id)
    }

    /// Applies a partition state from the controller (ignores older ones).
    pub fn on_leader_and_isr(&mut self, s: &LeaderAndIsr, now_ms: u64, log: &impl LogView) {
        if (s.epoch, s.partition_epoch) <= (self.state.epoch, self.state.partition_epoch)
            && self.state.leader.is_some()
        {
            return;
        }
        let new_leadership = s.epoch != self.state.epoch || !self.is_leader();
        self.state = s.clone();
        if let Some((_, p)) = &self.pending
            && p.partition_epoch < s.partition_epoch
        {
            self.pending = None;
        }
        if self.is_leader() && new_leadership {
            // A new epoch: nothing is known of the followers yet (the high watermark stays
            // where it was until they report).
            self.progress = s
                .isr
                .iter()
                .filter(|n| **n != self.id)
                .map(|n| {
                    (
                        *n,
                        Progress {
                            caught_up_ms: now_ms,
                            ..Progress::default()
                        },
                    )
                })
                .collect();
            self.pending = None;
            self.high_watermark = self.high_watermark.min(log.end());
            self.acked_upto = 0;
        }
        if !self.is_leader() {
            self.progress.clear();
            self.pending = None;
        }
        self.on_log_change(log);
    }

    /// Starts from a high watermark checkpointed by an earlier incarnation (capped at the
    /// log's durable end by the caller): it named committed records when written. Never
    /// lowers what this core knows.
    pub fn restore_high_watermark(&mut self, high_watermark: u64) {
        self.high_watermark = self.high_watermark.max(high_watermark);
    }

    /// Forgets followers that are no longer replicas (a reassignment removed them), so none
    /// is proposed for the ISR again.
    pub fn retain_followers(&mut self, replicas: &[NodeId]) {
        self.progress.retain(|n, _| replicas.contains(n));
    }

    /// Whether a produce may be appended now, and the epoch to stamp it with.
    pub fn check_produce(&self) -> Result<Epoch, ProduceError> {
        if !self.is_leader() {
            return Err(ProduceError::NotLeader);
        }
        if self.state.isr.len() < self.settings.min_insync {
            return Err(ProduceError::NotEnoughReplicas);
        }
        Ok(self.state.epoch)
    }

    /// Whether the entry at `offset`, appended in `epoch`, is acknowledged for `acks=all`:
    /// still this leader's epoch, and durable on at least `min_insync` in-sync replicas.
    pub fn acknowledged(&self, epoch: Epoch, offset: u64) -> bool {
        self.is_leader() && self.state.epoch == epoch && self.acked_upto > offset
    }

    /// The local log grew or was fsynced: as leader, the high watermark may move.
    pub fn on_log_change(&mut self, log: &impl LogView) {
        self.advance_high_watermark(log);
    }

    /// The fetch a follower sends now, to its leader.
    pub fn fetch_request(&self, log: &impl LogView) -> Option<(NodeId, FetchRequest)> {
        let leader = self.state.leader?;
        if leader == self.id {
            return None;
        }
        Some((
            leader,
            FetchRequest {
                from: self.id,
                epoch: self.state.epoch,
                fetch_offset: log.end(),
                last_fetched_epoch: log.last_epoch(),
                durable_end: log.durable_end(),
            },
        ))
    }

    /// As follower: whether records of `epoch` starting at `start` may be appended now.
    pub fn accepts_records(&self, epoch: Epoch, start: u64, log: &impl LogView) -> bool {
        epoch == self.state.epoch && !self.is_leader() && start == log.end()
    }

    /// As follower: records were appended (or none came); `high_watermark` is the leader's.
    pub fn on_records(&mut self, high_watermark: u64, log: &impl LogView) {
        let hw = high_watermark.min(log.end());
        self.high_watermark = self.high_watermark.max(hw);
    }

    /// As follower: the leader says the log diverges. Returns where to truncate to, if this
    /// answer applies; then call [`on_truncated`](Self::on_truncated).
    pub fn on_diverging(
        &self,
        epoch: Epoch,
        end_epoch: Option<Epoch>,
        end_offset: u64,
        log: &impl LogView,
    ) -> Option<u64> {
        if epoch != self.state.epoch || self.is_leader() {
            return None;
        }
        // KIP-279: also no further than where that epoch (or the largest one below it) ends
        // here, so the next fetch names an epoch both logs share.
        let mine = end_epoch
            .and_then(|e| log.end_of_epoch(e))
            .map_or(0, |(_, end)| end);
        Some(end_offset.min(mine))
    }

    /// The log was truncated.
    pub fn on_truncated(&mut self, log: &impl LogView) {
        self.high_watermark = self.high_watermark.min(log.end());
    }

    /// As leader: answers a follower's fetch (the caller then reads records from the fetch
    /// offset when the answer is [`FetchAnswer::Records`]).
    pub fn on_fetch(&mut self, f: &FetchRequest, now_ms: u64, log: &impl LogView) -> FetchAnswer {
        let mine = self.state.epoch;
        if !self.is_leader() || f.epoch != mine {
            return FetchAnswer::Fenced { epoch: mine };
        }
        // Where does the follower's log stop agreeing with ours?
        let diverging = match f.last_fetched_epoch {
            None => (f.fetch_offset > 0).then_some((None, 0)),
            Some(last) => match log.end_of_epoch(last) {
                None => Some((None, 0)),
                Some((e, end)) if e != last || end < f.fetch_offset => Some((Some(e), end)),
                Some(_) => None,
            },
        };
        if let Some((end_epoch, end_offset)) = diverging {
            return FetchAnswer::Diverging {
                epoch: mine,
                end_epoch,
                end_offset: end_offset.min(f.fetch_offset),
            };
        }
        let leader_end = log.end();
        let p = self.progress.entry(f.from).or_insert_with(|| Progress {
            caught_up_ms: 0,
            ..Progress::default()
        });
        p.end = f.fetch_offset;
        p.durable = f.durable_end.min(f.fetch_offset);
        if f.fetch_offset >= leader_end {
            p.caught_up_ms = now_ms;
        }
        self.advance_high_watermark(log);
        FetchAnswer::Records {
            epoch: mine,
            start: f.fetch_offset,
            high_watermark: self.high_watermark,
        }
    }

    fn advance_high_watermark(&mut self, log: &impl LogView) {
        if !self.is_leader() {
            return;
        }
        // Over the *maximal* ISR: the committed one plus a replica being added. The
        // controller may already have committed the addition (and could elect that replica)
        // before this leader hears of it, so what it acknowledges must be on it too.
        let mut hw = log.durable_end();
        let pending = self.pending.as_ref().map(|(_, p)| &p.isr);
        for n in self.state.isr.iter().chain(pending.into_iter().flatten()) {
            if *n != self.id {
                hw = hw.min(self.progress.get(n).map_or(0, |p| p.durable));
            }
        }
        self.high_watermark = self.high_watermark.max(hw).min(log.end());
        if self.state.isr.len() >= self.settings.min_insync {
            self.acked_upto = self.acked_upto.max(hw.min(log.end()));
        }
    }

    /// Periodic work of a leader: an ISR change to ask the controller for (a follower that
    /// lagged for `lag_max_ms` out, one that reached the high watermark in), at most one at a
    /// time; a proposal unanswered for `lag_max_ms` is sent again.
    pub fn tick(&mut self, now_ms: u64, log: &impl LogView) -> Option<IsrProposal> {
        if !self.is_leader() {
            return None;
        }
        if let Some((at, _)) = &self.pending {
            if now_ms.saturating_sub(*at) < self.settings.lag_max_ms {
                return None;
            }
            // Unanswered (lost, or refused as stale): decide again from what is known now.
            self.pending = None;
        }
        let mut isr = self.state.isr.clone();
        let lagging: Vec<NodeId> = isr
            .iter()
            .copied()
            .filter(|n| *n != self.id)
            .filter(|n| {
                let p = self.progress.get(n);
                now_ms.saturating_sub(p.map_or(0, |p| p.caught_up_ms)) > self.settings.lag_max_ms
            })
            .collect();
        if let Some(n) = lagging.first() {
            isr.remove(n);
        } else {
            // A replica joins once it has caught up and durably holds everything below the
            // high watermark: every ISR member must, since any of them may be elected, also
            // after a power loss (the simulation found the log-end-only rule losing
            // acknowledged records that way).
            let joining = self.progress.iter().find(|(n, p)| {
                !isr.contains(n) && p.durable >= self.high_watermark && p.end >= log.end()
            });
            match joining {
                Some((n, _)) => {
                    isr.insert(*n);
                }
                None => return None,
            }
        }
        let p = IsrProposal {
            leader: self.id,
            epoch: self.state.epoch,
            partition_epoch: self.state.partition_epoch,
            isr,
        };
        self.pending = Some((now_ms, p.clone()));
        Some(p)
    }
}

/// One replica of one partition with an in-memory log: [`ReplicaCore`] plus the log I/O, as
/// the simulation runs it (the node does the same I/O on its partition logs).
#[derive(Debug)]
pub struct Replica {
    core: ReplicaCore,
    log: ReplicaLog,
}

impl Replica {
    /// A replica with `log` (what survived on disk), knowing nothing of the partition yet.
    pub fn new(id: NodeId, settings: Settings, log: ReplicaLog) -> Self {
        Self {
            core: ReplicaCore::new(id, settings),
            log,
        }
    }

    /// This node.
    pub fn id(&self) -> NodeId {
        self.core.id()
    }

    /// The log.
    pub fn log(&self) -> &ReplicaLog {
        &self.log
    }

    /// The high watermark this replica knows.
    pub fn high_watermark(&self) -> u64 {
        self.core.high_watermark()
    }

    /// The partition state this replica knows.
    pub fn state(&self) -> &LeaderAndIsr {
        self.core.state()
    }

    /// Whether this replica leads its known epoch.
    pub fn is_leader(&self) -> bool {
        self.core.is_leader()
    }

    /// Applies a partition state from the controller (ignores older ones).
    pub fn on_leader_and_isr(&mut self, s: &LeaderAndIsr, now_ms: u64) {
        self.core.on_leader_and_isr(s, now_ms, &self.log);
    }

    /// Appends `ids` as the leader. Returns the offset of the first.
    pub fn produce(&mut self, ids: &[u64]) -> Result<u64, ProduceError> {
        let epoch = self.core.check_produce()?;
        let base = self.log.end();
        let entries: Vec<Entry> = ids.iter().map(|id| Entry { epoch, id: *id }).collect();
        self.log.append(&entries);
        self.core.on_log_change(&self.log);
        Ok(base)
    }

    /// Whether the entry at `offset`, appended in `epoch`, is acknowledged for `acks=all`.
    pub fn acknowledged(&self, epoch: Epoch, offset: u64) -> bool {
        self.core.acknowledged(epoch, offset)
    }

    /// fsync.
    pub fn sync(&mut self) {
        self.log.sync();
        self.core.on_log_change(&self.log);
    }

    /// The fetch a follower sends now, to its leader.
    pub fn fetch(&self) -> Option<(NodeId, Message)> {
        self.core.fetch_request(&self.log).map(|(to, f)| {
            (
                to,
                Message::Fetch {
                    from: f.from,
                    epoch: f.epoch,
                    fetch_offset: f.fetch_offset,
                    last_fetched_epoch: f.last_fetched_epoch,
                    durable_end: f.durable_end,
                },
            )
        })
    }

    /// Starts from a checkpointed high watermark, capped at the log's durable end (see
    /// [`ReplicaCore::restore_high_watermark`]).
    pub fn restore_high_watermark(&mut self, high_watermark: u64) {
        let hw = high_watermark.min(self.log.durable_end());
        self.core.restore_high_watermark(hw);
    }

    /// Forgets followers that are no longer replicas (see [`ReplicaCore::retain_followers`]).
    pub fn retain_followers(&mut self, replicas: &[NodeId]) {
        self.core.retain_followers(replicas);
    }

    /// Handles a message; returns the answer to send back, if any.
    pub fn on_message(&mut self, m: Message, now_ms: u64) -> Option<(NodeId, Message)> {
        match m {
            Message::Fetch {
                from,
                epoch,
                fetch_offset,
                last_fetched_epoch,
                durable_end,
            } => {
                let f = FetchRequest {
                    from,
                    epoch,
                    fetch_offset,
                    last_fetched_epoch,
                    durable_end,
                };
                let answer = match self.core.on_fetch(&f, now_ms, &self.log) {
                    FetchAnswer::Records {
                        epoch,
                        start,
                        high_watermark,
                    } => {
                        let first = start as usize;
                        let stop = (first + self.core.settings().fetch_entries_max)
                            .min(self.log.entries().len());
                        Message::Records {
                            epoch,
                            start,
                            entries: self.log.entries()[first..stop].to_vec(),
                            high_watermark,
                        }
                    }
                    FetchAnswer::Diverging {
                        epoch,
                        end_epoch,
                        end_offset,
                    } => Message::Diverging {
                        epoch,
                        end_epoch,
                        end_offset,
                    },
                    FetchAnswer::Fenced { epoch } => Message::Fenced { epoch },
                };
                Some((from, answer))
            }
            Message::Records {
                epoch,
                start,
                entries,
                high_watermark,
            } => {
                if self.core.accepts_records(epoch, start, &self.log) {
                    self.log.append(&entries);
                    self.core.on_records(high_watermark, &self.log);
                }
                None
            }
            Message::Diverging {
                epoch,
                end_epoch,
                end_offset,
            } => {
                if let Some(to) = self
                    .core
                    .on_diverging(epoch, end_epoch, end_offset, &self.log)
                {
                    self.log.truncate(to);
                    self.core.on_truncated(&self.log);
                }
                None
            }
            Message::Fenced { .. } => None,
        }
    }

    /// Periodic work of a leader: an ISR change to ask the controller for.
    pub fn tick(&mut self, now_ms: u64) -> Option<IsrProposal> {
        self.core.tick(now_ms, &self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(epochs: &[Epoch]) -> ReplicaLog {
        let mut l = ReplicaLog::default();
        let entries: Vec<Entry> = epochs
            .iter()
            .enumerate()
            .map(|(i, e)| Entry {
                epoch: *e,
                id: i as u64,
            })
            .collect();
        l.append(&entries);
        l.sync();
        l
    }

    #[test]
    fn end_of_epoch_follows_the_lineage() {
        let l = log(&[1, 1, 2, 2, 2, 5]);
        assert_eq!(l.end_of_epoch(0), None);
        assert_eq!(l.end_of_epoch(1), Some((1, 2)));
        assert_eq!(l.end_of_epoch(2), Some((2, 5)));
        assert_eq!(
            l.end_of_epoch(3),
            Some((2, 5)),
            "epochs 3, 4 never led here"
        );
        assert_eq!(l.end_of_epoch(5), Some((5, 6)));
        assert_eq!(l.end_of_epoch(9), Some((5, 6)));
    }

    #[test]
    fn crash_and_truncate_keep_durable_consistent() {
        let mut l = log(&[1, 1]);
        l.append(&[Entry { epoch: 1, id: 9 }]);
        assert_eq!((l.end(), l.durable_end()), (3, 2));
        l.crash();
        assert_eq!(l.end(), 2);
        l.truncate(1);
        assert_eq!((l.end(), l.durable_end()), (1, 1));
    }

    #[test]
    fn a_diverged_follower_truncates_to_the_common_epoch_and_catches_up() {
        let settings = Settings {
            min_insync: 2,
            lag_max_ms: 1_000,
            fetch_entries_max: 100,
        };
        // The follower has epoch-1 entries the new leader (epoch 2) never got.
        let mut leader = Replica::new(1, settings, log(&[1, 1, 2, 2]));
        let mut follower = Replica::new(2, settings, log(&[1, 1, 1, 1, 1]));
        let state = LeaderAndIsr {
            leader: Some(1),
            epoch: 2,
            partition_epoch: 3,
            isr: [1, 2].into(),
        };
        leader.on_leader_and_isr(&state, 0);
        follower.on_leader_and_isr(&state, 0);
        for step in 0..4 {
            let (to, fetch) = follower.fetch().unwrap();
            assert_eq!(to, 1);
            let (back, answer) = leader.on_message(fetch, step).unwrap();
            assert_eq!(back, 2);
            follower.on_message(answer, step);
            follower.sync();
        }
        assert_eq!(follower.log().entries(), leader.log().entries());
        // One more fetch reports the follower's durable end: everything is committed.
        let (_, fetch) = follower.fetch().unwrap();
        leader.on_message(fetch, 5);
        assert_eq!(leader.high_watermark(), 4);
        assert!(leader.acknowledged(2, 3));
        // A fetch of an old epoch is fenced.
        let stale = Message::Fetch {
            from: 2,
            epoch: 1,
            fetch_offset: 4,
            last_fetched_epoch: Some(2),
            durable_end: 4,
        };
        assert_eq!(
            leader.on_message(stale, 6).unwrap().1,
            Message::Fenced { epoch: 2 }
        );
    }
}
