//! One partition on this node: its log, its appender task (group commit), and its high
//! watermark, which wakes long-polling fetches.
//!
//! Appends go through a bounded queue to a task that owns the write side: it drains every queued
//! produce (up to [`GROUP_JOBS_MAX`]), appends them on a blocking thread, fsyncs once when the
//! topic's policy is `batch`, then answers them all. That single fsync shared by concurrent
//! producers is the group commit. Reads take the log's read lock on a blocking thread.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quiver_log::{LogError, PartitionLog};
use quiver_proto::{ErrorCode, PartitionId, TopicName};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::epochs::EpochCache;
use crate::now_ms;
use crate::topic_config::{FlushPolicy, TopicConfig};

/// Produce requests waiting for one partition's appender, beyond which producers wait.
pub const APPEND_QUEUE_JOBS_MAX: usize = 1024;
/// Most queued produces appended together under one fsync.
pub const GROUP_JOBS_MAX: usize = 256;

/// A failed partition operation, mapped onto a protocol error code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PartitionError {
    /// Protocol code.
    pub code: ErrorCode,
    /// Details.
    pub message: String,
}

impl PartitionError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `not_enough_replicas` for an `acks=all` produce.
    pub fn not_enough_replicas(p: &Partition, r: Replication) -> Self {
        Self::new(
            ErrorCode::NotEnoughReplicas,
            format!(
                "{}/{} has {} in-sync replica(s), min.insync.replicas is {}",
                p.topic(),
                p.id().0,
                r.isr,
                r.min_insync
            ),
        )
    }
}

impl From<LogError> for PartitionError {
    fn from(e: LogError) -> Self {
        let code = match &e {
            LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            _ => ErrorCode::StorageError,
        };
        Self::new(code, e.to_string())
    }
}

/// How the appender stores a job's batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AppendKind {
    /// A produce on the leader: offsets assigned at the log end, stamped with this epoch.
    Produce {
        /// The leader epoch.
        epoch: u32,
    },
    /// A follower's copy of the leader's batches: each must start at the log end, and keeps
    /// the offsets and epoch the leader gave it.
    Replica,
}

struct AppendJob {
    batches: Vec<Bytes>,
    kind: AppendKind,
    reply: oneshot::Sender<Result<u64, PartitionError>>,
}

/// Where a partition's log ends, and how much of it is fsynced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogEnds {
    /// Offset after the last appended record.
    pub end: u64,
    /// Offset after the last fsynced record.
    pub durable: u64,
}

/// What replication tells produce about a replicated partition (cluster mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replication {
    /// The leader epoch this node leads in (meaningful while it leads).
    pub epoch: u32,
    /// In-sync replicas now.
    pub isr: u16,
    /// The topic's `min.insync.replicas`.
    pub min_insync: u16,
    /// Records below this offset are acknowledged for `acks=all` in `epoch`.
    pub acked_upto: u64,
}

/// A consistent look at a log for replication: its ends and its epoch lineage.
#[derive(Clone, Debug)]
pub struct LogSnapshot {
    /// Ends.
    pub ends: LogEnds,
    /// `(epoch, start offset)` per leader epoch.
    pub epochs: Vec<(u32, u64)>,
}

impl quiver_cluster::replication::LogView for LogSnapshot {
    fn end(&self) -> u64 {
        self.ends.end
    }
    fn durable_end(&self) -> u64 {
        self.ends.durable
    }
    fn last_epoch(&self) -> Option<u32> {
        self.epochs.last().map(|(e, _)| *e)
    }
    fn end_of_epoch(&self, epoch: u32) -> Option<(u32, u64)> {
        crate::epochs::end_of_epoch(&self.epochs, epoch, self.ends.end)
    }
}

/// Offsets and size of a partition's log.
#[derive(Clone, Copy, Debug)]
pub struct PartitionState {
    /// First stored offset.
    pub log_start_offset: u64,
    /// Offset after the last readable record.
    pub high_watermark: u64,
    /// Offset after the last appended record.
    pub log_end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Segments on disk.
    pub segments: u32,
    /// fdatasyncs since the partition was opened.
    pub flushes: u64,
}

/// This node's part in a partition, as the controller's metadata says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It leads the partition in `epoch` (a node alone: always, epoch 0).
    Leader {
        /// Leader epoch.
        epoch: u32,
    },
    /// Another node leads it.
    Follower {
        /// The leader.
        leader: u32,
        /// Leader epoch.
        epoch: u32,
    },
    /// No leader (every in-sync replica is fenced).
    Offline {
        /// Leader epoch.
        epoch: u32,
    },
}

/// A partition hosted by this node.
#[derive(Debug)]
pub struct Partition {
    role: watch::Sender<Role>,
    /// Replicated (cluster mode): the high watermark is replication's, not the appender's.
    replicated: bool,
    replication: watch::Sender<Replication>,
    epochs: Arc<std::sync::Mutex<EpochCache>>,
    ends: watch::Sender<LogEnds>,
    topic: TopicName,
    id: PartitionId,
    dir: PathBuf,
    log: Arc<RwLock<PartitionLog>>,
    high_watermark: watch::Sender<u64>,
    /// The high watermark last written to the checkpoint file (cluster mode).
    checkpointed: std::sync::atomic::AtomicU64,
    /// One checkpoint write at a time (the periodic one and a truncation's).
    checkpoint_lock: tokio::sync::Mutex<()>,
    appends: mpsc::Sender<AppendJob>,
    appender: std::sync::Mutex<Option<JoinHandle<()>>>,
    closing: CancellationToken,
    /// Set when the partition's topic is being deleted: refused appends then say the topic is
    /// gone (not retriable) rather than that the node is shutting down.
    deleting: Arc<AtomicBool>,
}

impl Partition {
    /// Opens (recovering) the partition's log in `dir` and starts its appender task.
    pub async fn open(
        topic: TopicName,
        id: PartitionId,
        dir: PathBuf,
        config: &TopicConfig,
    ) -> Result<Arc<Self>, PartitionError> {
        let log_config = config.log_config();
        let open_dir = dir.clone();
        let (log, report) = tokio::task::spawn_blocking(move || {
            PartitionLog::open(&open_dir, log_config, now_ms())
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))??;
        tracing::info!(%topic, partition = id.0, ?report, "partition opened");
        let end = log.log_end_offset();
        let epochs = EpochCache::load(&dir, &log).map_err(|e| {
            PartitionError::new(ErrorCode::StorageError, format!("leader epochs: {e}"))
        })?;
        let replicated = config.hosted.is_some();
        let ends = LogEnds {
            end,
            durable: log.durable_end_offset(),
        };
        // A replica's high watermark is replication's (what it holds past it may not be
        // committed): it starts from its checkpoint, capped at what is on disk. A node alone
        // serves what it recovered.
        let checkpointed = if replicated {
            crate::hw_checkpoint::load(&dir).map_or(0, |hw| hw.min(ends.durable))
        } else {
            end
        };
        let (hw_tx, _) = watch::channel(checkpointed);
        let (tx, rx) = mpsc::channel(APPEND_QUEUE_JOBS_MAX);
        let partition = Arc::new(Self {
            role: watch::channel(if replicated {
                Role::Offline { epoch: 0 }
            } else {
                Role::Leader { epoch: 0 }
            })
            .0,
            replicated,
            replication: watch::channel(Replication::default()).0,
            epochs: Arc::new(std::sync::Mutex::new(epochs)),
            ends: watch::channel(ends).0,
            topic,
            id,
            dir,
            log: Arc::new(RwLock::new(log)),
            high_watermark: hw_tx,
            checkpointed: std::sync::atomic::AtomicU64::new(checkpointed),
            checkpoint_lock: tokio::sync::Mutex::new(()),
            appends: tx,
            appender: std::sync::Mutex::new(None),
            closing: CancellationToken::new(),
            deleting: Arc::new(AtomicBool::new(false)),
        });
        let task = tokio::spawn(appender(
            partition.log.clone(),
            partition.epochs.clone(),
            Published {
                high_watermark: (!replicated).then(|| partition.high_watermark.clone()),
                ends: partition.ends.clone(),
            },
            rx,
            config.flush_policy,
            config.flush_interval_ms,
            partition.closing.clone(),
        ));
        if let Ok(mut slot) = partition.appender.lock() {
            *slot = Some(task);
        }
        Ok(partition)
    }

    /// Topic name.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Partition index.
    pub fn id(&self) -> PartitionId {
        self.id
    }

    /// This node's part in the partition.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Sets this node's part (from the controller's metadata); returns whether it changed.
    pub fn set_role(&self, role: Role) -> bool {
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        })
    }

    /// Ok if this node leads the partition; else the `not_leader` error naming the leader.
    pub fn check_leader(&self) -> Result<(), PartitionError> {
        let (topic, p) = (&self.topic, self.id.0);
        match self.role() {
            Role::Leader { .. } => Ok(()),
            Role::Follower { leader, epoch } => Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!("node {leader} leads {topic}/{p} in epoch {epoch}; refresh metadata"),
            )),
            Role::Offline { epoch } => Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!("{topic}/{p} has no leader (epoch {epoch}): no in-sync replica is live"),
            )),
        }
    }

    /// Queues validated batches for appending, in call order; the returned future resolves to
    /// the base offset of the first batch once the append is as durable as the topic's flush
    /// policy promises. Waits only for room in the queue.
    pub async fn enqueue(
        &self,
        batches: Vec<Bytes>,
    ) -> Result<
        impl std::future::Future<Output = Result<u64, PartitionError>> + use<>,
        PartitionError,
    > {
        let epoch = match self.role() {
            Role::Leader { epoch } => epoch,
            _ => {
                return Err(self.check_leader().err().unwrap_or_else(|| {
                    PartitionError::new(ErrorCode::NotLeader, "not the leader")
                }));
            }
        };
        self.enqueue_kind(batches, AppendKind::Produce { epoch })
            .await
    }

    /// Appends a follower's copy of the leader's batches (each must start at the log end;
    /// offsets and epochs are kept). Resolves once durable as the flush policy promises.
    pub async fn append_replica(&self, batches: Vec<Bytes>) -> Result<u64, PartitionError> {
        self.enqueue_kind(batches, AppendKind::Replica).await?.await
    }

    async fn enqueue_kind(
        &self,
        batches: Vec<Bytes>,
        kind: AppendKind,
    ) -> Result<
        impl std::future::Future<Output = Result<u64, PartitionError>> + use<>,
        PartitionError,
    > {
        let (reply, rx) = oneshot::channel();
        self.appends
            .send(AppendJob {
                batches,
                kind,
                reply,
            })
            .await
            .map_err(|_| closed_error(&self.deleting, &self.topic, self.id, false))?;
        let (deleting, topic, id) = (self.deleting.clone(), self.topic.clone(), self.id);
        // The flag is read when the reply is lost, not when the job was queued: a delete that
        // starts while the job waits must still be reported as a delete.
        Ok(async move {
            rx.await
                .map_err(|_| closed_error(&deleting, &topic, id, true))?
        })
    }

    /// Appends validated batches: [`enqueue`](Self::enqueue), then wait for the outcome.
    pub async fn append(&self, batches: Vec<Bytes>) -> Result<u64, PartitionError> {
        self.enqueue(batches).await?.await
    }

    /// Whether replication sets the high watermark (cluster mode).
    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// Replication's high watermark (cluster mode); wakes waiting fetches when it moves.
    pub fn set_high_watermark(&self, hw: u64) {
        self.high_watermark.send_if_modified(|cur| {
            let moved = *cur != hw;
            *cur = hw;
            moved
        });
    }

    /// Writes the high watermark to the partition's checkpoint file if it moved since the
    /// last write (cluster mode; see `hw_checkpoint`).
    pub async fn checkpoint_high_watermark(&self) -> Result<(), PartitionError> {
        // Read the high watermark under the lock, so a write of an older value never lands
        // after a newer one.
        let _one_at_a_time = self.checkpoint_lock.lock().await;
        let hw = self.high_watermark();
        if self.checkpointed.load(Ordering::Relaxed) == hw || self.deleting.load(Ordering::SeqCst) {
            return Ok(());
        }
        let dir = self.dir.clone();
        blocking_io(move || crate::hw_checkpoint::store(&dir, hw)).await?;
        self.checkpointed.store(hw, Ordering::Relaxed);
        Ok(())
    }

    /// Replication's state, for produce (cluster mode).
    pub fn replication(&self) -> Replication {
        *self.replication.borrow()
    }

    /// Publishes replication's state (the replica manager, after every change).
    pub fn publish_replication(&self, r: Replication) {
        self.replication.send_if_modified(|cur| {
            let changed = *cur != r;
            *cur = r;
            changed
        });
    }

    /// Waits until the record at `last` appended in `epoch` is acknowledged for `acks=all`:
    /// durable on at least `min.insync.replicas` in-sync replicas. Fails with `not_leader`
    /// when leadership moves first (the record may still be committed by the new leader).
    pub async fn wait_acknowledged(&self, epoch: u32, last: u64) -> Result<(), PartitionError> {
        if !self.replicated {
            return Ok(());
        }
        let mut rx = self.replication.subscribe();
        let r = rx
            .wait_for(|r| {
                r.epoch != epoch
                    || r.acked_upto > last
                    || !matches!(self.role(), Role::Leader { epoch: e } if e == epoch)
            })
            .await
            .map(|r| *r)
            .map_err(|_| PartitionError::new(ErrorCode::ShuttingDown, "partition closed"))?;
        if r.epoch == epoch && r.acked_upto > last {
            return Ok(());
        }
        // Appended here but not acknowledged: the new leader may or may not keep it, so the
        // outcome is unknown to the producer (as with a timeout), not a refusal.
        Err(PartitionError::new(
            ErrorCode::RequestTimedOut,
            format!(
                "leadership of {}/{} moved before offset {last} was acknowledged by the in-sync replicas; it may or may not be kept",
                self.topic, self.id.0
            ),
        ))
    }

    /// The log's ends now.
    pub fn ends(&self) -> LogEnds {
        *self.ends.borrow()
    }

    /// A receiver woken whenever the log grows or is fsynced.
    pub fn watch_ends(&self) -> watch::Receiver<LogEnds> {
        self.ends.subscribe()
    }

    /// The log's ends and epoch lineage, taken together.
    pub fn snapshot(&self) -> LogSnapshot {
        let log = self.log.read().unwrap_or_else(|p| p.into_inner());
        let epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        LogSnapshot {
            ends: LogEnds {
                end: log.log_end_offset(),
                durable: log.durable_end_offset(),
            },
            epochs: epochs.entries().to_vec(),
        }
    }

    /// Whole batches from `offset` up to the log end (not the high watermark): what a leader
    /// sends its followers. Blocking: call from a blocking thread.
    pub fn read_for_replica_blocking(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Bytes, PartitionError> {
        Ok(self.read_log(|log| log.read(offset, max_bytes, u64::MAX))??)
    }

    /// Truncates the log to `to` (by whole batches) and its epoch lineage with it; returns the
    /// new log end. Replication only: a follower whose log diverged from its leader's.
    pub async fn truncate(&self, to: u64) -> Result<u64, PartitionError> {
        let (log, epochs, ends) = (self.log.clone(), self.epochs.clone(), self.ends.clone());
        let end = tokio::task::spawn_blocking(move || -> Result<u64, PartitionError> {
            let mut log = log.write().map_err(|_| lock_poisoned())?;
            let end = log.truncate(to, now_ms())?;
            epochs
                .lock()
                .map_err(|_| lock_poisoned())?
                .truncate(end)
                .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?;
            ends.send_replace(LogEnds {
                end,
                durable: log.durable_end_offset(),
            });
            Ok(end)
        })
        .await
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))??;
        let hw = self.high_watermark().min(end);
        self.set_high_watermark(hw);
        // Below the checkpoint only after an unclean election: lower it now, before the log
        // grows again past it with records that are not committed.
        if hw < self.checkpointed.load(Ordering::Relaxed) {
            self.checkpoint_high_watermark().await?;
        }
        Ok(end)
    }

    /// The high watermark now.
    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    /// A receiver woken whenever the high watermark moves.
    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    fn read_log<T>(&self, f: impl FnOnce(&PartitionLog) -> T) -> Result<T, PartitionError> {
        let log = self
            .log
            .read()
            .map_err(|_| PartitionError::new(ErrorCode::StorageError, "log lock poisoned"))?;
        Ok(f(&log))
    }

    /// Whole batches from `offset`, below the high watermark, at most `max_bytes` (or one whole
    /// batch). Blocking: call from a blocking thread.
    pub fn read_blocking(&self, offset: u64, max_bytes: usize) -> Result<Bytes, PartitionError> {
        let hw = self.high_watermark();
        Ok(self.read_log(|log| log.read(offset, max_bytes, hw))??)
    }

    /// Offsets and size. Cheap: no I/O.
    pub fn state(&self) -> Result<PartitionState, PartitionError> {
        let hw = self.high_watermark();
        self.read_log(|log| PartitionState {
            log_start_offset: log.log_start_offset(),
            high_watermark: hw,
            log_end_offset: log.log_end_offset(),
            size_bytes: log.size_bytes(),
            segments: log.segment_count() as u32,
            flushes: log.flush_count(),
        })
    }

    /// First readable offset whose timestamp is at or after `ts_ms`, with that timestamp.
    /// Blocking: call from a blocking thread.
    pub fn offset_for_timestamp_blocking(
        &self,
        ts_ms: i64,
    ) -> Result<Option<(u64, i64)>, PartitionError> {
        let hw = self.high_watermark();
        let found = self.read_log(|log| log.offset_for_timestamp(ts_ms))??;
        Ok(found.filter(|(o, _)| *o < hw))
    }

    /// Deletes segments past retention. Blocking: call from a blocking thread.
    pub fn enforce_retention_blocking(&self) -> Result<(), PartitionError> {
        let mut log = self
            .log
            .write()
            .map_err(|_| PartitionError::new(ErrorCode::StorageError, "log lock poisoned"))?;
        let report = log.enforce_retention(now_ms())?;
        tracing::debug!(topic = %self.topic, partition = self.id.0, ?report, "retention");
        Ok(())
    }

    /// Stops the appender after it has answered every queued produce and flushed the log.
    /// Later appends fail with `shutting_down`.
    pub async fn close(&self) {
        self.closing.cancel();
        let task = self.appender.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .is_err()
        {
            tracing::error!(topic = %self.topic, partition = self.id.0, "appender did not stop in 30 s");
        }
    }

    fn deleted_dir(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(".deleted");
        self.dir.with_file_name(name)
    }

    /// Marks the partition as belonging to a topic being deleted (before [`close`](Self::close)).
    pub fn begin_delete(&self) {
        self.deleting.store(true, Ordering::SeqCst);
    }

    /// Renames the (closed) partition's directory to `<dir>.deleted` and syncs the parent.
    pub async fn mark_deleted(&self) -> Result<(), PartitionError> {
        let (from, to) = (self.dir.clone(), self.deleted_dir());
        blocking_io(move || {
            std::fs::rename(&from, &to)?;
            if let Some(parent) = to.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        })
        .await
    }

    /// Removes the directory renamed by [`mark_deleted`](Self::mark_deleted).
    pub async fn remove_files(&self) -> Result<(), PartitionError> {
        let dir = self.deleted_dir();
        blocking_io(move || std::fs::remove_dir_all(&dir)).await
    }
}

async fn blocking_io(
    f: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<(), PartitionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))
}

/// The partition's write side: drains queued produces, appends them, fsyncs per the topic's
/// policy, moves the high watermark and answers. Exits after `closing` once the queue is empty,
/// with a final flush.
///
/// fsyncs never hold the log's lock: appends (interval policy) and reads go on while the disk
/// works. Under the batch policy the appender waits for its group's fsync before taking the
/// next group, so produces arriving meanwhile form the next group (group commit).
/// What the appender tells the rest of the partition.
struct Published {
    /// The high watermark, when the appender sets it (a node alone).
    high_watermark: Option<watch::Sender<u64>>,
    /// The log's ends, always.
    ends: watch::Sender<LogEnds>,
}

async fn appender(
    log: Arc<RwLock<PartitionLog>>,
    epochs: Arc<std::sync::Mutex<EpochCache>>,
    published: Published,
    mut rx: mpsc::Receiver<AppendJob>,
    policy: FlushPolicy,
    flush_interval_ms: u64,
    closing: CancellationToken,
) {
    let Published {
        high_watermark,
        ends,
    } = published;
    let sync_each = policy == FlushPolicy::Batch;
    let mut tick = tokio::time::interval(Duration::from_millis(flush_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    let mut closed = false;
    let mut background: Option<JoinHandle<()>> = None;
    // Set when an fsync fails: the page cache may have dropped the data, so nothing appended
    // since the last good fsync can be trusted. The partition then refuses appends and never
    // moves its high watermark until the node restarts and recovery re-reads the log (Kafka
    // takes the log directory offline in the same situation).
    let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let first = tokio::select! {
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = tick.tick(), if !sync_each && dirty && background.as_ref().is_none_or(|b| b.is_finished()) => {
                dirty = false;
                let (log, fenced, ends) = (log.clone(), fenced.clone(), ends.clone());
                background = Some(tokio::task::spawn_blocking(move || {
                    match flush_unlocked(&log) {
                        Ok(durable) => publish_durable(&ends, durable),
                        Err(e) => {
                            tracing::error!(error = %e, "interval flush failed; partition fenced until restart");
                            fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }));
                continue;
            }
            // A tick that came while an fsync was running found nothing to do; when that fsync
            // ends, go round again so data appended meanwhile is fsynced at the next tick,
            // even if no other produce arrives.
            _ = async { if let Some(b) = background.as_mut() { let _ = b.await; } },
                if background.as_ref().is_some_and(|b| !b.is_finished()) => {
                background = None;
                continue;
            }
            _ = closing.cancelled(), if !closed => {
                // Refuse new work but answer what is already queued.
                rx.close();
                closed = true;
                continue;
            }
        };
        let mut jobs = vec![first];
        while jobs.len() < GROUP_JOBS_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if fenced.load(std::sync::atomic::Ordering::SeqCst) {
            for job in jobs {
                let _ = job.reply.send(Err(PartitionError::new(
                    ErrorCode::StorageError,
                    "partition is fenced after a failed fsync; restart the node to recover it",
                )));
            }
            continue;
        }
        let (group_log, group_epochs) = (log.clone(), epochs.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            append_group(&group_log, &group_epochs, jobs, sync_each)
        })
        .await;
        let (jobs, results, new_hw) = match outcome {
            Ok(o) => o,
            Err(e) => {
                // The jobs were lost with the panicking thread; their producers see the
                // dropped reply as `shutting_down` and may retry.
                tracing::error!(error = %e, "append task failed");
                continue;
            }
        };
        if let Ok(l) = log.read() {
            ends.send_replace(LogEnds {
                end: l.log_end_offset(),
                durable: l.durable_end_offset(),
            });
        }
        match new_hw {
            Some(hw) => {
                if let Some(h) = &high_watermark {
                    advance(h, hw);
                }
            }
            None if sync_each => {
                tracing::error!("fsync failed; partition fenced until restart");
                fenced.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            None => {}
        }
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if e.code == ErrorCode::StorageError))
        {
            // A failed write may have left part of a request in the log; stop writing until
            // recovery has looked at it (the producer was told the request failed).
            tracing::error!("append failed; partition fenced until restart");
            fenced.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
        dirty |= !sync_each;
    }
    if let Some(b) = background {
        let _ = b.await;
    }
    if fenced.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let final_log = log.clone();
    match tokio::task::spawn_blocking(move || flush_unlocked(&final_log)).await {
        Ok(Ok(end)) => {
            publish_durable(&ends, end);
            if let Some(h) = &high_watermark {
                advance(h, end);
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
        Err(e) => tracing::error!(error = %e, "final flush failed"),
    }
}

/// The error for an append without an answer from the appender: the topic is gone (not
/// retriable) when it is being deleted. Otherwise, a job that could not be queued was never
/// applied (`shutting_down`, safe to retry), but a queued job whose reply was lost may or may
/// not have been appended (`unknown`: a producer must not assume either).
fn closed_error(
    deleting: &AtomicBool,
    topic: &TopicName,
    id: PartitionId,
    was_queued: bool,
) -> PartitionError {
    if deleting.load(Ordering::SeqCst) {
        PartitionError::new(
            ErrorCode::UnknownTopicOrPartition,
            format!("topic {topic} was deleted (partition {id})"),
        )
    } else if was_queued {
        PartitionError::new(
            ErrorCode::Unknown,
            "the partition's appender stopped; the append may or may not have been applied",
        )
    } else {
        PartitionError::new(ErrorCode::ShuttingDown, "partition is closing")
    }
}

fn advance(high_watermark: &watch::Sender<u64>, hw: u64) {
    high_watermark.send_if_modified(|cur| {
        let moved = hw > *cur;
        if moved {
            *cur = hw;
        }
        moved
    });
}

fn publish_durable(ends: &watch::Sender<LogEnds>, durable: u64) {
    ends.send_if_modified(|e| {
        let moved = durable > e.durable;
        if moved {
            e.durable = durable;
            e.end = e.end.max(durable);
        }
        moved
    });
}

fn lock_poisoned() -> PartitionError {
    PartitionError::new(ErrorCode::StorageError, "log lock poisoned")
}

/// Makes everything appended so far durable, holding the log's lock only to start and to
/// record the flush. Returns the durable end offset.
fn flush_unlocked(log: &RwLock<PartitionLog>) -> Result<u64, PartitionError> {
    let pending = log.write().map_err(|_| lock_poisoned())?.begin_flush()?;
    if let Some(p) = pending {
        p.sync()?;
        log.write()
            .map_err(|_| lock_poisoned())?
            .complete_flush(p.end_offset());
    }
    Ok(log
        .read()
        .map_err(|_| lock_poisoned())?
        .durable_end_offset())
}

type GroupOutcome = (
    Vec<AppendJob>,
    Vec<Result<u64, PartitionError>>,
    Option<u64>,
);

fn append_group(
    log: &RwLock<PartitionLog>,
    epochs: &std::sync::Mutex<EpochCache>,
    jobs: Vec<AppendJob>,
    sync_each: bool,
) -> GroupOutcome {
    let mut results = Vec::with_capacity(jobs.len());
    let log_end = {
        let Ok(mut log) = log.write() else {
            let err = lock_poisoned();
            let results = jobs.iter().map(|_| Err(err.clone())).collect();
            return (jobs, results, None);
        };
        let now = now_ms();
        let mut epochs = epochs.lock().unwrap_or_else(|p| p.into_inner());
        for job in &jobs {
            let mut base = None;
            let mut failed = None;
            for batch in &job.batches {
                let epoch = match job.kind {
                    AppendKind::Produce { epoch } => epoch,
                    AppendKind::Replica => match quiver_proto::BatchHeader::parse(batch) {
                        Ok(h) if h.base_offset == log.log_end_offset() => h.leader_epoch,
                        Ok(h) => {
                            failed = Some(PartitionError::new(
                                ErrorCode::InvalidBatch,
                                format!(
                                    "replicated batch at offset {} but the log ends at {}",
                                    h.base_offset,
                                    log.log_end_offset()
                                ),
                            ));
                            break;
                        }
                        Err(e) => {
                            failed =
                                Some(PartitionError::new(ErrorCode::CorruptBatch, e.to_string()));
                            break;
                        }
                    },
                };
                match log.append_shared(batch, epoch, now) {
                    Ok(info) => {
                        base.get_or_insert(info.base_offset);
                        if let Err(e) = epochs.on_append(epoch, info.base_offset) {
                            failed = Some(PartitionError::new(
                                ErrorCode::StorageError,
                                format!("leader epochs: {e}"),
                            ));
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(PartitionError::from(e));
                        break;
                    }
                }
            }
            results.push(match (failed, base) {
                (Some(e), _) => Err(e),
                (None, Some(b)) => Ok(b),
                (None, None) => Err(PartitionError::new(ErrorCode::InvalidBatch, "no batches")),
            });
        }
        log.log_end_offset()
    };
    if !sync_each {
        return (jobs, results, Some(log_end));
    }
    match flush_unlocked(log) {
        Ok(durable) => (jobs, results, Some(durable)),
        Err(err) => {
            for r in &mut results {
                if r.is_ok() {
                    *r = Err(err.clone());
                }
            }
            (jobs, results, None)
        }
    }
}

#[cfg(test)]
mod tests {
    //! The flush policy as the appender applies it, observed through the log's fsync count.
    //!
    //! How and why: on a current-thread runtime the test queues every produce before the
    //! appender task first runs, so with `flush.policy=batch` all of them must land in one group
    //! and share exactly one fdatasync (group commit), and each is answered only after it.
    //! With `interval` the appends are answered (and readable) without an fsync, and the
    //! interval tick then makes them durable with one fsync for the lot, within a bounded wait.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use quiver_proto::{BatchBuilder, Compression};

    fn batch(i: u32) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(
            None,
            Some(format!("v{i}").as_bytes()),
            &[],
            1_000 + i64::from(i),
        );
        b.finish()
    }

    async fn open(dir: &std::path::Path, policy: FlushPolicy, interval_ms: u64) -> Arc<Partition> {
        let mut config = TopicConfig::defaults(1);
        config.flush_policy = policy;
        config.flush_interval_ms = interval_ms;
        Partition::open(
            TopicName::new("t").unwrap(),
            PartitionId(0),
            dir.join("t-0"),
            &config,
        )
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batch_policy_shares_one_fsync_among_queued_produces() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), FlushPolicy::Batch, 1_000).await;
        let mut waits = Vec::new();
        for i in 0..50 {
            waits.push(p.enqueue(vec![batch(i)]).await.unwrap());
        }
        let mut bases = Vec::new();
        for w in waits {
            bases.push(w.await.unwrap());
        }
        assert_eq!(bases, (0..50).collect::<Vec<u64>>(), "in queue order");
        let s = p.state().unwrap();
        assert_eq!(s.flushes, 1, "one fsync for the whole group");
        assert_eq!(s.high_watermark, 50, "acknowledged means durable");
        // A later produce gets its own fsync before its answer.
        p.append(vec![batch(50)]).await.unwrap();
        assert_eq!(p.state().unwrap().flushes, 2);
        p.close().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn interval_policy_answers_first_and_fsyncs_on_the_tick() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), FlushPolicy::Interval, 20).await;
        for i in 0..20 {
            p.append(vec![batch(i)]).await.unwrap();
        }
        let s = p.state().unwrap();
        assert_eq!(s.high_watermark, 20, "readable once appended");
        assert!(s.flushes < 20, "no fsync per produce: {}", s.flushes);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (durable, flushes) = {
                let log = p.log.read().unwrap();
                (log.durable_end_offset(), log.flush_count())
            };
            if durable == 20 {
                assert!(flushes >= 1);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tick never flushed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        p.close().await;
    }

    /// A replica reopened after a restart starts from its checkpointed high watermark,
    /// capped at what is durable on disk; without a checkpoint it starts at 0 (replication
    /// restores it); checkpoints are written only when the high watermark moved.
    #[tokio::test(flavor = "current_thread")]
    async fn a_replica_starts_from_its_checkpoint_capped_at_the_durable_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), FlushPolicy::Batch, 1_000).await;
        for i in 0..10 {
            p.append(vec![batch(i)]).await.unwrap();
        }
        p.close().await;
        let mut config = TopicConfig::defaults(1);
        config.hosted = Some(vec![0]);
        let reopen = || async {
            Partition::open(
                TopicName::new("t").unwrap(),
                PartitionId(0),
                dir.path().join("t-0"),
                &config,
            )
            .await
            .unwrap()
        };
        let r = reopen().await;
        assert_eq!(r.high_watermark(), 0, "no checkpoint yet");
        r.set_high_watermark(6);
        r.checkpoint_high_watermark().await.unwrap();
        let written = std::fs::metadata(dir.path().join("t-0").join(crate::hw_checkpoint::FILE))
            .unwrap()
            .modified()
            .unwrap();
        r.checkpoint_high_watermark().await.unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("t-0").join(crate::hw_checkpoint::FILE))
                .unwrap()
                .modified()
                .unwrap(),
            written,
            "unchanged: not rewritten"
        );
        r.close().await;
        let r = reopen().await;
        assert_eq!(r.high_watermark(), 6);
        r.close().await;
        crate::hw_checkpoint::store(&dir.path().join("t-0"), 1_000).unwrap();
        let r = reopen().await;
        assert_eq!(r.high_watermark(), 10, "capped at the durable end");
        r.close().await;
    }
}
