//! Partition replication in the node: one [`ReplicaCore`] (the simulation-tested rules of
//! `quiver_cluster::replication`) per hosted replicated partition, driven over the real
//! partition log.
//!
//! - **Follower:** a task per partition pulls from the leader over the peer protocol
//!   (ReplicaFetch, long-polled), appends what comes as it is (the leader's offsets and
//!   epochs), truncates when the leader says the logs diverge, and takes the high watermark
//!   the leader sends. Its fetches report its log end and fsynced end.
//! - **Leader:** answers fetches through the core (fencing by leader epoch, divergence by
//!   epoch lineage), moves the high watermark to the smallest durable end over the ISR, and
//!   asks the controller for ISR changes (AlterIsr) when a follower lags or catches up.
//! - Produces with `acks=all` wait for the core's acknowledged offset (see
//!   `Partition::wait_acknowledged`).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use quiver_cluster::NodeId;
use quiver_cluster::replication::{FetchAnswer, FetchRequest, LeaderAndIsr, ReplicaCore, Settings};
use quiver_proto::codec::{Reader, Writer};
use quiver_proto::peer::{PeerApi, ReplicaFetchRequest, ReplicaFetchResponse};
use quiver_proto::{BatchHeader, BatchView, ErrorCode};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Cluster;
use super::peer::{PeerAnswer, PeerClient, PeerError, PeerSession};
use crate::partition::{Partition, Replication, Role};

/// Most record bytes a follower asks for per fetch.
const FETCH_BYTES: u32 = 1 << 20;
/// How long a leader holds a fetch that finds nothing new.
const FETCH_WAIT_MS: u32 = 500;
/// A follower that has not caught up with the leader for this long leaves the ISR.
pub const REPLICA_LAG_MAX_MS: u64 = 10_000;
/// How often a leader looks for ISR changes to propose.
const TICK: Duration = Duration::from_millis(250);
/// How often a replica's high watermark is checkpointed (when it moved).
const HW_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    u64::try_from(crate::now_ms()).unwrap_or(0)
}

/// One replicated partition hosted here.
struct Replica {
    partition: Arc<Partition>,
    core: Mutex<ReplicaCore>,
    /// The partition state from the controller and the leader's peer address.
    state: watch::Sender<Option<(LeaderAndIsr, String)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Replica {
    fn core(&self) -> std::sync::MutexGuard<'_, ReplicaCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After any change of the core: the high watermark and produce's view.
    fn publish(&self, core: &ReplicaCore) {
        self.partition.set_high_watermark(core.high_watermark());
        let s = core.state();
        self.partition.publish_replication(Replication {
            epoch: s.epoch,
            isr: s.isr.len() as u16,
            min_insync: core.settings().min_insync as u16,
            acked_upto: if core.is_leader() {
                core.acked_upto()
            } else {
                0
            },
        });
    }
}

/// The replicated partitions of this node.
#[derive(Default)]
pub struct Replicas {
    map: DashMap<(String, u32), Arc<Replica>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("partitions", &self.map.len())
            .finish()
    }
}

impl Replicas {
    /// Applies the controller's state for one hosted partition: starts its replica when new,
    /// feeds the core the leader, epoch and ISR, and sets the partition's role.
    pub fn update(
        &self,
        cluster: &Arc<Cluster>,
        partition: &Arc<Partition>,
        state: LeaderAndIsr,
        leader_addr: String,
        replicas: &[NodeId],
        min_insync: usize,
    ) {
        let key = (partition.topic().to_string(), partition.id().0);
        let replica = match self.map.get(&key).map(|r| r.clone()) {
            Some(r) if Arc::ptr_eq(&r.partition, partition) => r,
            _ => {
                let settings = Settings {
                    min_insync,
                    lag_max_ms: REPLICA_LAG_MAX_MS,
                    fetch_entries_max: usize::MAX,
                };
                let mut core = ReplicaCore::new(cluster.node_id(), settings);
                // The partition opened with its checkpointed high watermark.
                core.restore_high_watermark(partition.high_watermark());
                let r = Arc::new(Replica {
                    partition: partition.clone(),
                    core: Mutex::new(core),
                    state: watch::channel(None).0,
                    tasks: Mutex::new(Vec::new()),
                });
                let weak = Arc::downgrade(cluster);
                let tasks = vec![
                    tokio::spawn(follow(weak.clone(), r.clone())),
                    tokio::spawn(lead(weak, r.clone())),
                    tokio::spawn(checkpoint(r.partition.clone())),
                ];
                *r.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
                if let Some(old) = self.map.insert(key, r.clone()) {
                    old.stop();
                }
                r
            }
        };
        let me = cluster.node_id();
        let role = match state.leader {
            // Cut off from the controller: another node is (or soon will be) the leader.
            Some(l) if l == me && cluster.is_isolated() => Role::Offline { epoch: state.epoch },
            Some(l) if l == me => Role::Leader { epoch: state.epoch },
            Some(l) => Role::Follower {
                leader: l,
                epoch: state.epoch,
            },
            None => Role::Offline { epoch: state.epoch },
        };
        {
            let mut core = replica.core();
            core.on_leader_and_isr(&state, now_ms(), &partition.snapshot());
            core.retain_followers(replicas);
            replica.publish(&core);
        }
        if partition.set_role(role) {
            tracing::info!(topic = %partition.topic(), partition = partition.id().0, ?role, isr = ?state.isr, "replica role");
        }
        replica.state.send_if_modified(|cur| {
            let next = Some((state, leader_addr));
            let changed = *cur != next;
            *cur = next;
            changed
        });
    }

    /// Stops replicas of partitions this node no longer hosts.
    pub fn retain(&self, keep: impl Fn(&str, u32) -> bool) {
        self.map.retain(|(t, p), r| {
            let k = keep(t, *p);
            if !k {
                r.stop();
            }
            k
        });
    }

    /// Stops every replica task.
    pub fn stop(&self) {
        for r in self.map.iter() {
            r.stop();
        }
        self.map.clear();
    }

    /// A follower's fetch, on the leader.
    pub async fn on_fetch(&self, cluster: &Cluster, body: Bytes) -> PeerAnswer {
        let f = match ReplicaFetchRequest::decode(&mut Reader::new(body)) {
            Ok(f) => f,
            Err(e) => return PeerAnswer::err(ErrorCode::InvalidRequest, &e.to_string()),
        };
        let Some(replica) = self
            .map
            .get(&(f.topic.clone(), f.partition))
            .map(|r| r.clone())
        else {
            return PeerAnswer::err(
                ErrorCode::NotLeader,
                &format!(
                    "node {} holds no replica of {}/{}",
                    cluster.node_id(),
                    f.topic,
                    f.partition
                ),
            );
        };
        // A fetch of a replaced incarnation (KIP-380): its log state is not the new one's.
        let (registered, is_replica) = cluster.read(|a| {
            let control = &a.metadata.control;
            (
                control.brokers().get(&f.replica).map(|b| b.epoch),
                control
                    .partition(&f.topic, f.partition)
                    .is_some_and(|p| p.replicas().contains(&f.replica)),
            )
        });
        // A node the partition was moved away from (or not yet moved to, in this node's
        // copy of the metadata) does not fetch: it would count as a follower.
        if !is_replica {
            return PeerAnswer::err(
                ErrorCode::NotLeader,
                &format!(
                    "node {} is not a replica of {}/{} in this node's metadata",
                    f.replica, f.topic, f.partition
                ),
            );
        }
        if registered != Some(f.broker_epoch) {
            return PeerAnswer::err(
                ErrorCode::StaleBrokerEpoch,
                &format!(
                    "broker {} epoch {} is not registered",
                    f.replica, f.broker_epoch
                ),
            );
        }
        let request = FetchRequest {
            from: f.replica,
            epoch: f.leader_epoch,
            fetch_offset: f.fetch_offset,
            last_fetched_epoch: f.last_fetched_epoch,
            durable_end: f.durable_end,
        };
        let part = replica.partition.clone();
        let mut ends = part.watch_ends();
        let mut waited = false;
        let answer = loop {
            let snap = part.snapshot();
            let answer = {
                let mut core = replica.core();
                let a = core.on_fetch(&request, now_ms(), &snap);
                replica.publish(&core);
                a
            };
            match answer {
                FetchAnswer::Records {
                    epoch,
                    start,
                    high_watermark,
                } => {
                    if start < snap.ends.end {
                        let (p, max) = (part.clone(), f.max_bytes.max(1) as usize);
                        let read = tokio::task::spawn_blocking(move || {
                            p.read_for_replica_blocking(start, max)
                        })
                        .await;
                        break match read {
                            Ok(Ok(records)) => ReplicaFetchResponse::Records {
                                epoch,
                                high_watermark,
                                records,
                            },
                            Ok(Err(e)) => return PeerAnswer::err(e.code, &e.message),
                            Err(e) => {
                                return PeerAnswer::err(ErrorCode::StorageError, &e.to_string());
                            }
                        };
                    }
                    if waited || f.wait_ms == 0 {
                        break ReplicaFetchResponse::Records {
                            epoch,
                            high_watermark,
                            records: Bytes::new(),
                        };
                    }
                    // Caught up: hold the fetch until the log grows (or is fsynced, which may
                    // move the high watermark), then answer with a fresh look.
                    waited = true;
                    let wait = Duration::from_millis(u64::from(f.wait_ms.min(FETCH_WAIT_MS * 4)));
                    let _ = tokio::time::timeout(wait, ends.changed()).await;
                }
                FetchAnswer::Diverging {
                    epoch,
                    end_epoch,
                    end_offset,
                } => {
                    break ReplicaFetchResponse::Diverging {
                        epoch,
                        end_epoch,
                        end_offset,
                    };
                }
                FetchAnswer::Fenced { epoch } => break ReplicaFetchResponse::Fenced { epoch },
            }
        };
        let mut w = Writer::new();
        answer.encode(&mut w);
        PeerAnswer::ok(w.into_bytes().freeze())
    }
}

impl Replica {
    fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Splits stored bytes into whole batches, checking each one's CRC.
fn batches(records: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < records.len() {
        let h = BatchHeader::parse(&records[at..]).map_err(|e| e.to_string())?;
        let end = at + h.total_bytes();
        if end > records.len() {
            return Err("a batch runs past the end of the answer".into());
        }
        let b = records.slice(at..end);
        BatchView::parse_verified(&b).map_err(|e| e.to_string())?;
        out.push(b);
        at = end;
    }
    Ok(out)
}

/// The follower's loop: while another node leads, pull from it.
async fn follow(cluster: Weak<Cluster>, replica: Arc<Replica>) {
    let mut state = replica.state.subscribe();
    let part = replica.partition.clone();
    let mut backoff = Duration::from_millis(50);
    // The long-lived fetch stream to the current leader (reopened after an error or when
    // the leader changes).
    let mut session: Option<PeerSession> = None;
    loop {
        let current = state.borrow_and_update().clone();
        let Some((s, leader_addr)) = current else {
            if state.changed().await.is_err() {
                return;
            }
            continue;
        };
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let me = cluster.node_id();
        let (Some(leader), Some(broker_epoch)) = (s.leader, cluster.broker_epoch()) else {
            drop(cluster);
            let _ = tokio::time::timeout(Duration::from_millis(500), state.changed()).await;
            continue;
        };
        if leader == me || leader_addr.is_empty() {
            drop(cluster);
            session = None;
            if state.changed().await.is_err() {
                return;
            }
            continue;
        }
        let snap = part.snapshot();
        let Some((_, req)) = replica.core().fetch_request(&snap) else {
            drop(cluster);
            session = None;
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
            continue;
        };
        let fetch = ReplicaFetchRequest {
            topic: part.topic().to_string(),
            partition: part.id().0,
            replica: me,
            broker_epoch,
            leader_epoch: req.epoch,
            fetch_offset: req.fetch_offset,
            last_fetched_epoch: req.last_fetched_epoch,
            durable_end: req.durable_end,
            max_bytes: FETCH_BYTES,
            wait_ms: FETCH_WAIT_MS,
        };
        let mut w = Writer::new();
        fetch.encode(&mut w);
        let peers = cluster.peers.clone();
        drop(cluster);
        // A new partition state (another leader, most often after this one died) ends the
        // wait at once: the fetch to a dead leader would otherwise hold the follower for the
        // whole call timeout.
        let body = w.into_bytes();
        if session.as_ref().is_some_and(|s| s.addr() != leader_addr) {
            session = None;
        }
        let call = tokio::select! {
            r = fetch_on_session(&peers, &mut session, &leader_addr, &body) => r,
            _ = state.changed() => {
                // The answer in flight, if any, is for the old state: start a new stream.
                session = None;
                continue;
            }
        };
        if call.is_err() {
            session = None;
            peers.forget(&leader_addr).await;
        }
        let answer = match call {
            Ok((ErrorCode::None, body)) => ReplicaFetchResponse::decode(&mut Reader::new(body))
                .map_err(|e| format!("bad answer: {e}")),
            Ok((code, body)) => Err(format!(
                "{}: {}",
                code.name(),
                Reader::new(body).string("message").unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        };
        let outcome: Result<(), String> = async {
            match answer? {
                ReplicaFetchResponse::Records {
                    epoch,
                    high_watermark,
                    records,
                } => {
                    let accepts = replica
                        .core()
                        .accepts_records(epoch, req.fetch_offset, &part.snapshot());
                    if !accepts {
                        return Ok(());
                    }
                    if !records.is_empty() {
                        let b = batches(&records)?;
                        part.append_replica(b).await.map_err(|e| e.message)?;
                    }
                    let mut core = replica.core();
                    core.on_records(high_watermark, &part.snapshot());
                    replica.publish(&core);
                    Ok(())
                }
                ReplicaFetchResponse::Diverging {
                    epoch,
                    end_epoch,
                    end_offset,
                } => {
                    let to = replica
                        .core()
                        .on_diverging(epoch, end_epoch, end_offset, &part.snapshot());
                    if let Some(to) = to {
                        tracing::info!(topic = %part.topic(), partition = part.id().0, to, "log diverges from the leader's; truncating");
                        part.truncate(to).await.map_err(|e| e.message)?;
                        let mut core = replica.core();
                        core.on_truncated(&part.snapshot());
                        replica.publish(&core);
                    }
                    Ok(())
                }
                ReplicaFetchResponse::Fenced { epoch } => {
                    Err(format!("the leader is in epoch {epoch}, this replica in {}", req.epoch))
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::debug!(topic = %part.topic(), partition = part.id().0, error = %e, "replica fetch failed");
                // Wait for newer metadata or back off, whichever first.
                let _ = tokio::time::timeout(backoff, state.changed()).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Writes the partition's high watermark to its checkpoint about once a second while it
/// moves (see `hw_checkpoint`).
async fn checkpoint(part: Arc<Partition>) {
    let mut tick = tokio::time::interval(HW_CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = part.checkpoint_high_watermark().await {
            tracing::warn!(topic = %part.topic(), partition = part.id().0, error = %e, "high-watermark checkpoint not written");
        }
    }
}

/// One fetch on the session to `leader_addr`, opening the session first when there is none.
async fn fetch_on_session(
    peers: &PeerClient,
    session: &mut Option<PeerSession>,
    leader_addr: &str,
    body: &[u8],
) -> Result<(ErrorCode, Bytes), PeerError> {
    let timeout = Duration::from_secs(10);
    let s = match session {
        Some(s) => s,
        None => session.insert(peers.open_session(leader_addr, timeout).await?),
    };
    s.call(PeerApi::ReplicaFetch, body, timeout).await
}

/// The leader's loop: keeps the high watermark moving with the log (appends, fsyncs) and
/// proposes ISR changes.
async fn lead(cluster: Weak<Cluster>, replica: Arc<Replica>) {
    let part = replica.partition.clone();
    let mut ends = part.watch_ends();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = ends.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let proposal = {
            let mut core = replica.core();
            if !core.is_leader() {
                continue;
            }
            let snap = part.snapshot();
            core.on_log_change(&snap);
            replica.publish(&core);
            core.tick(now_ms(), &snap)
        };
        let Some(p) = proposal else {
            continue;
        };
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        tracing::info!(topic = %part.topic(), partition = part.id().0, isr = ?p.isr, "proposing an ISR change");
        let cmd = super::state::Command::AlterIsr {
            topic: part.topic().to_string(),
            partition: part.id().0,
            proposal: p,
        };
        // Answered through the metadata: the reconciler feeds the committed state back.
        let c = cluster.clone();
        tokio::spawn(async move {
            match c.write(cmd).await {
                Ok(super::state::Outcome::Refused { message, .. }) => {
                    tracing::info!(%message, "ISR change refused");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "ISR change not committed"),
            }
        });
    }
}
