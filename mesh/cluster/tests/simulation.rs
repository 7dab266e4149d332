//! Deterministic simulation of one partition on four nodes, created on three (RF 3, min ISR
//! 2, acks=all), driven by a seeded random schedule: produces (mostly to the leader, some to
//! stale or random nodes), fetches, fsyncs, message drops, delays and reordering, network
//! partitions that isolate a node, crashes that lose what was not fsynced (one node, or all
//! at once as in a power loss), restarts, and operator reassignments of the partition to
//! another two or three of the four nodes (and cancellations). A node learns of placement
//! changes from late metadata, as in the broker: a node no longer placed deletes its replica,
//! a node newly placed starts an empty one, and a leader ignores fetches from nodes that are
//! not replicas in its copy of the metadata. Replicas checkpoint their high watermark now
//! and then and a restarted one starts from its checkpoint (capped at what survived). The
//! controller is the real `ClusterControl` (broker registration with epochs, leases, fencing,
//! placement, ISR changes), run as one reliable authority (Raft is not simulated) whose
//! decisions reach the nodes late.
//!
//! Checked all along: at most one node appends entries of any leader epoch; replicas agree
//! below their high watermarks; an acknowledged offset is never given to another record.
//! Checked at the end, after healing everything and letting the cluster settle: every
//! acknowledged record is in the leader's log at its offset, below the high watermark, no
//! reassignment is left in progress, every replica is back in the ISR and holds the leader's
//! log.
//!
//! A failure prints its seed; `QUIVER_SIM_SEED=N` replays one seed, `QUIVER_SIM_SEEDS=N` runs
//! more of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use quiver_cluster::controller::{ClusterControl, PartitionControl};
use quiver_cluster::replication::{
    IsrProposal, LeaderAndIsr, Message, Replica, ReplicaLog, Settings,
};
use quiver_cluster::{Epoch, NodeId};

const NODES: [NodeId; 4] = [1, 2, 3, 4];
const LEASE_MS: u64 = 60;
const RUN_MS: u64 = 3_000;
const SETTLE_MS: u64 = 3_000;

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

enum Event {
    /// A replication message arrives.
    Deliver {
        from: NodeId,
        to: NodeId,
        msg: Message,
    },
    /// The controller's state arrives at a node: leader, epochs, ISR and replicas.
    Metadata {
        to: NodeId,
        state: LeaderAndIsr,
        replicas: Vec<NodeId>,
    },
    /// A leader's ISR proposal arrives at the controller.
    Proposal(IsrProposal),
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    nodes: BTreeMap<NodeId, Option<Replica>>,
    disks: BTreeMap<NodeId, ReplicaLog>,
    /// The controller: brokers with epochs and leases, and the partition `t`/0.
    cluster: ClusterControl,
    /// Each running node's broker epoch.
    epochs: BTreeMap<NodeId, u64>,
    /// Per node, the replicas of the newest metadata it applied (older metadata arriving
    /// late is ignored, as a broker applies the metadata log in order).
    known: BTreeMap<NodeId, (u32, Vec<NodeId>)>,
    /// Reassignments started (and cancellations), for the run's report.
    moves: u64,
    /// Per node, the high watermark its replica last checkpointed to disk (it lags).
    checkpoints: BTreeMap<NodeId, u64>,
    /// Nodes cut off from the others and from the controller, until the given time.
    isolated: BTreeMap<NodeId, u64>,
    settings: Settings,
    /// Produced, not yet acknowledged: (node, epoch, offset, id).
    pending: Vec<(NodeId, Epoch, u64, u64)>,
    /// Acknowledged: offset → id.
    acked: BTreeMap<u64, u64>,
    /// Which node appended entries of each epoch.
    appended_by: BTreeMap<Epoch, NodeId>,
    next_id: u64,
    faults: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let settings = Settings {
            min_insync: 2,
            lag_max_ms: 40,
            fetch_entries_max: 16,
        };
        let mut cluster = ClusterControl::new(LEASE_MS);
        let epochs = NODES
            .iter()
            .map(|n| (*n, cluster.register(*n, "", 0)))
            .collect();
        cluster.create_topic("t", 1, 3).unwrap();
        let mut nodes = BTreeMap::new();
        let mut known = BTreeMap::new();
        let part = cluster.partition("t", 0).unwrap();
        for n in NODES {
            let mut r = Replica::new(n, settings, ReplicaLog::default());
            if part.replicas().contains(&n) {
                r.on_leader_and_isr(part.state(), 0);
            }
            nodes.insert(n, Some(r));
            known.insert(n, (part.state().partition_epoch, part.replicas().to_vec()));
        }
        Self {
            rng: Rng(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            disks: BTreeMap::new(),
            cluster,
            epochs,
            known,
            moves: 0,
            checkpoints: BTreeMap::new(),
            isolated: BTreeMap::new(),
            settings,
            pending: Vec::new(),
            acked: BTreeMap::new(),
            appended_by: BTreeMap::new(),
            next_id: 1,
            faults: true,
        }
    }

    fn schedule(&mut self, delay: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, e);
    }

    fn cut(&self, n: NodeId) -> bool {
        self.isolated.get(&n).is_some_and(|until| *until > self.now)
    }

    /// Sends between nodes: maybe dropped, delayed 0–9 ms (so reordered), never across a cut.
    fn send(&mut self, from: NodeId, to: NodeId, msg: Message) {
        if self.cut(from) || self.cut(to) || (self.faults && self.rng.chance(20_000)) {
            return;
        }
        let delay = self.rng.below(10);
        self.schedule(delay, Event::Deliver { from, to, msg });
    }

    fn control(&self) -> &PartitionControl {
        self.cluster.partition("t", 0).unwrap()
    }

    fn broadcast_metadata(&mut self) {
        let state = self.control().state().clone();
        let replicas = self.control().replicas().to_vec();
        for n in NODES {
            let delay = 1 + self.rng.below(15);
            self.schedule(
                delay,
                Event::Metadata {
                    to: n,
                    state: state.clone(),
                    replicas: replicas.clone(),
                },
            );
        }
    }

    fn hosts(&self, n: NodeId) -> bool {
        self.known[&n].1.contains(&n)
    }

    /// Node `n` applies metadata: newer placement first (a replica moved away is deleted,
    /// one moved here starts empty), then the partition state for a replica it hosts.
    fn apply_metadata(&mut self, n: NodeId, state: &LeaderAndIsr, replicas: &[NodeId]) {
        if state.partition_epoch < self.known[&n].0 {
            return;
        }
        let (was, is) = (self.hosts(n), replicas.contains(&n));
        self.known
            .insert(n, (state.partition_epoch, replicas.to_vec()));
        let Some(Some(r)) = self.nodes.get_mut(&n) else {
            return;
        };
        if was && !is {
            *r = Replica::new(n, self.settings, ReplicaLog::default());
            self.pending.retain(|p| p.0 != n);
            self.checkpoints.remove(&n);
        }
        if is {
            r.on_leader_and_isr(state, self.now);
            r.retain_followers(replicas);
        }
    }

    fn crash(&mut self, n: NodeId) {
        // The process and its replica state are gone; what was fsynced stays on disk.
        if let Some(Some(r)) = self.nodes.insert(n, None) {
            let mut log = r.log().clone();
            log.crash();
            self.disks.insert(n, log);
            self.pending.retain(|p| p.0 != n);
        }
    }

    fn restart(&mut self, n: NodeId) {
        let log = self.disks.remove(&n).unwrap_or_default();
        let mut r = Replica::new(n, self.settings, log);
        // It starts from its checkpointed high watermark (capped at what survived on disk).
        if let Some(hw) = self.checkpoints.get(&n) {
            r.restore_high_watermark(*hw);
        }
        // A new incarnation registers: the old one is fenced first (its ISR membership was
        // for a log that may have lost its unsynced tail), then the new one unfenced.
        let before = self.cluster.version();
        let epoch = self.cluster.register(n, "", self.now);
        self.epochs.insert(n, epoch);
        self.nodes.insert(n, Some(r));
        let (state, replicas) = (
            self.control().state().clone(),
            self.control().replicas().to_vec(),
        );
        // A restarted node reads the current metadata (its replica was deleted on disk if the
        // partition moved away meanwhile; it is empty if the partition moved here).
        self.known.insert(n, (0, replicas.clone()));
        if !replicas.contains(&n) {
            self.disks.remove(&n);
            self.nodes.insert(
                n,
                Some(Replica::new(n, self.settings, ReplicaLog::default())),
            );
        }
        self.apply_metadata(n, &state, &replicas);
        if self.cluster.version() != before {
            self.broadcast_metadata();
        }
    }

    fn step(&mut self) {
        let now = self.now;
        // Faults.
        if self.faults {
            if self.rng.chance(1_500) {
                let n = NODES[self.rng.below(NODES.len() as u64) as usize];
                if self.nodes[&n].is_some() {
                    self.crash(n);
                }
            }
            if self.rng.chance(1_000) {
                let n = NODES[self.rng.below(NODES.len() as u64) as usize];
                let until = now + 50 + self.rng.below(300);
                self.isolated.insert(n, until);
            }
            // A power loss: every node at once loses what it had not fsynced.
            if self.rng.chance(150) {
                for n in NODES {
                    self.crash(n);
                }
            }
            // An operator moves the partition to two or three of the four nodes, or cancels.
            if self.rng.chance(2_000) {
                let r = if self.rng.chance(200_000) {
                    self.cluster.reassign("t", 0, None)
                } else {
                    let mut target: Vec<NodeId> = NODES.to_vec();
                    let keep = 2 + self.rng.below(2) as usize;
                    while target.len() > keep {
                        target.remove(self.rng.below(target.len() as u64) as usize);
                    }
                    target.rotate_left(self.rng.below(keep as u64) as usize);
                    self.cluster.reassign("t", 0, Some(&target))
                };
                if r.is_ok() {
                    self.moves += 1;
                    self.broadcast_metadata();
                }
            }
        }
        for n in NODES {
            if self.nodes[&n].is_none() && (!self.faults || self.rng.chance(8_000)) {
                self.restart(n);
            }
        }
        // Heartbeats and leases.
        for n in NODES {
            if self.nodes[&n].is_some() && !self.cut(n) {
                let before = self.cluster.version();
                self.cluster
                    .heartbeat(n, self.epochs[&n], now)
                    .expect("the running incarnation heartbeats");
                if self.cluster.version() != before {
                    // Unfenced: the others and the node itself hear of it.
                    self.broadcast_metadata();
                }
            }
        }
        let before = self.cluster.version();
        self.cluster.tick(now);
        if self.cluster.version() != before {
            self.broadcast_metadata();
        }
        // Produces: mostly to the leader, some anywhere (stale leaders, followers).
        if self.faults && self.rng.chance(400_000) {
            let target = if self.rng.chance(900_000) {
                self.control().state().leader
            } else {
                Some(NODES[self.rng.below(NODES.len() as u64) as usize])
            };
            if let Some(t) = target
                && !self.cut(t)
                && let Some(Some(r)) = self.nodes.get_mut(&t)
            {
                let count = 1 + self.rng.below(3);
                let ids: Vec<u64> = (0..count).map(|i| self.next_id + i).collect();
                if let Ok(base) = r.produce(&ids) {
                    self.next_id += count;
                    let epoch = r.state().epoch;
                    match self.appended_by.insert(epoch, t) {
                        Some(other) if other != t => {
                            panic!("epoch {epoch} appended by {other} and {t}")
                        }
                        _ => {}
                    }
                    for (i, id) in ids.iter().enumerate() {
                        self.pending.push((t, epoch, base + i as u64, *id));
                    }
                }
            }
        }
        // Node work: fsync, fetch, ISR proposals.
        let mut sends = Vec::new();
        let mut proposals = Vec::new();
        let sync_each: Vec<bool> = NODES.iter().map(|_| self.rng.chance(50_000)).collect();
        let fetch_each: Vec<bool> = NODES.iter().map(|_| self.rng.chance(300_000)).collect();
        let checkpoint_each: Vec<bool> = NODES.iter().map(|_| self.rng.chance(20_000)).collect();
        let hosting: Vec<bool> = NODES.iter().map(|n| self.hosts(*n)).collect();
        for (i, n) in NODES.iter().enumerate() {
            let Some(Some(r)) = self.nodes.get_mut(n) else {
                continue;
            };
            if !hosting[i] {
                continue;
            }
            if sync_each[i] {
                r.sync();
            }
            if checkpoint_each[i] {
                self.checkpoints.insert(*n, r.high_watermark());
            }
            if fetch_each[i]
                && let Some((to, m)) = r.fetch()
            {
                sends.push((*n, to, m));
            }
            if let Some(p) = r.tick(now) {
                proposals.push((*n, p));
            }
        }
        for (from, to, m) in sends {
            self.send(from, to, m);
        }
        for (from, p) in proposals {
            if !self.cut(from) {
                let delay = 1 + self.rng.below(10);
                self.schedule(delay, Event::Proposal(p));
            }
        }
        // Deliveries due now.
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            let e = self.events.remove(&seq).expect("scheduled");
            self.handle(e);
        }
        self.collect_acks();
        if self.now.is_multiple_of(10) {
            self.check_agreement();
        }
    }

    fn handle(&mut self, e: Event) {
        let now = self.now;
        match e {
            Event::Deliver { from, to, msg } => {
                if self.cut(to) {
                    return;
                }
                // A leader answers fetches of replicas only (by its own metadata).
                if matches!(msg, Message::Fetch { .. }) && !self.known[&to].1.contains(&from) {
                    return;
                }
                let answer = match self.nodes.get_mut(&to) {
                    Some(Some(r)) => r.on_message(msg, now),
                    _ => None,
                };
                if let Some((back, m)) = answer {
                    debug_assert_eq!(back, from);
                    self.send(to, back, m);
                }
            }
            Event::Metadata {
                to,
                state,
                replicas,
            } => {
                if self.cut(to) {
                    // Brokers pull the controller's log: a cut node gets it later.
                    self.schedule(
                        10,
                        Event::Metadata {
                            to,
                            state,
                            replicas,
                        },
                    );
                    return;
                }
                self.apply_metadata(to, &state, &replicas);
            }
            Event::Proposal(p) => {
                if self.cluster.isr_proposal("t", 0, &p).is_ok() {
                    self.broadcast_metadata();
                }
            }
        }
    }

    fn collect_acks(&mut self) {
        let mut still = Vec::new();
        for (n, epoch, offset, id) in std::mem::take(&mut self.pending) {
            let Some(Some(r)) = self.nodes.get(&n) else {
                continue;
            };
            if r.acknowledged(epoch, offset) {
                assert_eq!(
                    r.log().entries()[offset as usize].id,
                    id,
                    "acked entry moved"
                );
                if let Some(other) = self.acked.insert(offset, id) {
                    panic!("offset {offset} acknowledged for {other} and then for {id}");
                }
            } else if r.state().epoch == epoch && r.is_leader() {
                still.push((n, epoch, offset, id));
            }
            // Otherwise the leadership moved on: the outcome is unknown to the client.
        }
        self.pending = still;
    }

    /// Replicas agree below their high watermarks, and keep every acknowledged record there.
    fn check_agreement(&self) {
        let live: Vec<&Replica> = self.nodes.values().flatten().collect();
        for a in &live {
            for b in &live {
                let upto = a.high_watermark().min(b.high_watermark()) as usize;
                assert_eq!(
                    &a.log().entries()[..upto],
                    &b.log().entries()[..upto],
                    "replicas {} and {} disagree below {upto} at {} ms",
                    a.id(),
                    b.id(),
                    self.now
                );
            }
            let hw = a.high_watermark();
            for (offset, id) in self.acked.range(..hw) {
                assert_eq!(
                    a.log().entries()[*offset as usize].id,
                    *id,
                    "replica {} lost acknowledged offset {offset} below its high watermark",
                    a.id()
                );
            }
        }
    }

    fn run(mut self) -> (usize, u64, u64) {
        for _ in 0..RUN_MS {
            self.step();
            self.now += 1;
        }
        // Heal everything and let it settle: no faults, no produces.
        self.faults = false;
        self.isolated.clear();
        for _ in 0..SETTLE_MS {
            self.step();
            self.now += 1;
        }
        let state = self.control().state().clone();
        let leader = state.leader.expect("a leader after healing");
        let l = self.nodes[&leader].as_ref().expect("the leader runs");
        let entries = l.log().entries();
        for (offset, id) in &self.acked {
            assert!(
                (*offset as usize) < entries.len() && entries[*offset as usize].id == *id,
                "acknowledged offset {offset} (id {id}) lost"
            );
            assert!(
                *offset < l.high_watermark(),
                "acknowledged offset {offset} above the high watermark"
            );
        }
        for n in &state.isr {
            let r = self.nodes[n].as_ref().expect("ISR members run");
            let upto = l.high_watermark() as usize;
            assert_eq!(
                &r.log().entries()[..upto],
                &entries[..upto],
                "ISR member {n} differs"
            );
        }
        // Liveness once healed: no move is left half done, and every replica is back in sync
        // with the leader.
        let replicas = self.control().replicas().to_vec();
        assert!(
            self.control().reassignment().is_none(),
            "a reassignment still in progress: {:?}",
            self.control().reassignment()
        );
        assert_eq!(
            state.isr.iter().copied().collect::<Vec<_>>(),
            {
                let mut r = replicas.clone();
                r.sort_unstable();
                r
            },
            "ISR after settling"
        );
        for n in &replicas {
            let r = self.nodes[n].as_ref().expect("all run");
            assert_eq!(r.log().entries(), entries, "replica {n} did not catch up");
        }
        let epochs: Vec<Epoch> = self.control().history().iter().map(|(e, _)| *e).collect();
        assert!(
            epochs.windows(2).all(|w| w[0] < w[1]),
            "one leader per epoch"
        );
        (
            self.acked.len(),
            self.control().state().epoch as u64,
            self.moves,
        )
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("QUIVER_SIM_SEED") {
        return vec![s.parse().expect("QUIVER_SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("QUIVER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    (1..=n).collect()
}

#[test]
fn replication_keeps_every_acknowledged_record_under_faults() {
    let mut acked_total = 0;
    let mut elections = 0;
    let mut moves = 0;
    for seed in seeds() {
        let outcome = std::panic::catch_unwind(|| Sim::new(seed).run());
        match outcome {
            Ok((acked, epochs, m)) => {
                acked_total += acked;
                elections += epochs;
                moves += m;
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("seed {seed} failed (QUIVER_SIM_SEED={seed} to replay): {msg}");
            }
        }
    }
    eprintln!(
        "simulation: {acked_total} acknowledged records, {elections} leader epochs, {moves} reassignments over all seeds"
    );
    // The schedule must actually exercise the protocol.
    assert!(
        acked_total > 1_000,
        "too few acknowledgements: {acked_total}"
    );
    assert!(elections > 60, "too few leader changes: {elections}");
    assert!(moves > 60, "too few reassignments: {moves}");
}
