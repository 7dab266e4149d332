//! The controller's Raft group on openraft: the type configuration, the durable log store
//! (sled, fsynced before openraft is told an append is done), and the state machine that
//! applies [`Command`]s to the node's copy of the [`Metadata`].
//!
//! Every node runs the group: the controller voters (`--controller-voters`) vote, every other
//! broker follows as a learner, so each node applies the whole metadata log itself and can
//! answer metadata requests from its own copy (KRaft's brokers do the same).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{Command, Metadata, Outcome};

openraft::declare_raft_types!(
    /// Quiver's controller group.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = BasicNode,
);

/// A Raft node id (a broker's node id, widened).
pub type RaftId = u64;
type SError = StorageError<RaftId>;

fn io(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// The Raft log, vote and last purged id in a sled database of their own. Every write that
/// openraft must find again after a crash is followed by an fsync (`flush_async`) before it
/// is reported done.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            anyhow::anyhow!("cannot open the controller log in {}: {e}", dir.display())
        })?;
        Ok(Self {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    async fn sync(&self) -> Result<(), AnyError> {
        self.db.flush_async().await.map(|_| ()).map_err(io)
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, AnyError> {
        match self.meta.get(key).map_err(io)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), AnyError> {
        let bytes = serde_json::to_vec(v).map_err(io)?;
        self.meta.insert(key, bytes).map_err(io)?;
        Ok(())
    }

    fn entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, AnyError> {
        serde_json::from_slice(bytes).map_err(io)
    }
}

fn key_bounds(range: &impl RangeBounds<u64>) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        let mut out = Vec::new();
        for kv in self.log.range(key_bounds(&range)) {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(io(e)))?;
            out.push(Self::entry(&v).map_err(StorageIOError::read_logs)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let purged: Option<LogId<RaftId>> =
            self.get_meta("purged").map_err(StorageIOError::read_logs)?;
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(io(e)))?
        {
            Some((_, v)) => Some(Self::entry(&v).map_err(StorageIOError::read_logs)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftId>) -> Result<(), SError> {
        self.put_meta("vote", vote)
            .map_err(StorageIOError::write_vote)?;
        self.sync().await.map_err(StorageIOError::write_vote)?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftId>>, SError> {
        Ok(self.get_meta("vote").map_err(StorageIOError::read_vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<RaftId>>) -> Result<(), SError> {
        // Not fsynced on its own: after a crash openraft learns the commit point again from
        // the leader; a saved one only lets a restarted node apply sooner.
        self.put_meta("committed", &committed)
            .map_err(StorageIOError::write_logs)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<RaftId>>, SError> {
        Ok(self
            .get_meta::<Option<LogId<RaftId>>>("committed")
            .map_err(StorageIOError::read_logs)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let bytes = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(io(e)))?;
            batch.insert(&e.log_id.index.to_be_bytes(), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(io(e)))?;
        let synced = self.sync().await;
        callback.log_io_completed(
            synced
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        synced.map_err(StorageIOError::write_logs)?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<RaftId>) -> Result<(), SError> {
        self.remove_range(log_id.index..)
            .map_err(StorageIOError::write_logs)?;
        self.sync().await.map_err(StorageIOError::write_logs)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<RaftId>) -> Result<(), SError> {
        // The purge point first: a crash in between leaves entries below it, which are
        // ignored, never a gap that looks like log.
        self.put_meta("purged", &log_id)
            .map_err(StorageIOError::write_logs)?;
        self.sync().await.map_err(StorageIOError::write_logs)?;
        self.remove_range(..=log_id.index)
            .map_err(StorageIOError::write_logs)?;
        self.sync().await.map_err(StorageIOError::write_logs)?;
        Ok(())
    }
}

impl LogStore {
    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), AnyError> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(key_bounds(&range)) {
            let (k, _) = kv.map_err(io)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io)
    }

    /// The stored snapshot, if any.
    fn snapshot(&self) -> Result<Option<StoredSnapshot>, AnyError> {
        self.get_meta("snapshot")
    }

    fn save_snapshot(&self, s: &StoredSnapshot) -> Result<(), AnyError> {
        self.put_meta("snapshot", s)
    }
}

/// The applied metadata and where it stands in the log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied entry.
    pub last_applied: Option<LogId<RaftId>>,
    /// Last applied membership.
    pub membership: StoredMembership<RaftId, BasicNode>,
    /// The metadata.
    pub metadata: Metadata,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine: the node's copy of the metadata, shared with the rest of the node, and a
/// watch that moves at every applied entry.
#[derive(Clone, Debug)]
pub struct StateMachine {
    applied: Arc<RwLock<Applied>>,
    changes: watch::Sender<u64>,
    store: LogStore,
    snapshot_index: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    /// A state machine starting from the store's snapshot, if it has one (openraft then
    /// re-applies the log after it).
    pub fn open(store: &LogStore) -> anyhow::Result<Self> {
        let applied = match store.snapshot().map_err(|e| anyhow::anyhow!("{e}"))? {
            Some(s) => serde_json::from_slice(&s.data)?,
            None => Applied::default(),
        };
        let index = applied.last_applied.map_or(0, |l: LogId<RaftId>| l.index);
        Ok(Self {
            applied: Arc::new(RwLock::new(applied)),
            changes: watch::channel(index).0,
            store: store.clone(),
            snapshot_index: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// The shared metadata.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    /// Moves to the last applied index at every change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        let (data, last, membership) = {
            let a = self.read();
            let data =
                serde_json::to_vec(&*a).map_err(|e| StorageIOError::read_state_machine(io(e)))?;
            (data, a.last_applied, a.membership.clone())
        };
        let n = self
            .snapshot_index
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}-{n}",
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index)
            ),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.store
            .save_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.store
            .sync()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<RaftId>>, StoredMembership<RaftId, BasicNode>), SError> {
        let a = self.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let index = {
            let mut a = self.write();
            for e in entries {
                a.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Outcome::Unchanged),
                    EntryPayload::Normal(c) => out.push(a.metadata.apply(&c, e.log_id.index)),
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Outcome::Done);
                    }
                }
            }
            a.last_applied.map_or(0, |l| l.index)
        };
        self.changes.send_replace(index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io(e)))?;
        self.store
            .save_snapshot(&StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.store
            .sync()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        let index = applied.last_applied.map_or(0, |l| l.index);
        *self.write() = applied;
        self.changes.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        let s = self
            .store
            .snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// The voters' addresses as openraft nodes.
pub fn nodes(voters: &BTreeMap<u32, String>) -> BTreeMap<RaftId, BasicNode> {
    voters
        .iter()
        .map(|(id, addr)| (u64::from(*id), BasicNode::new(addr)))
        .collect()
}
