//! The producer: records accumulate per partition into batches (closed by size or linger), a
//! sender task packs ready batches into produce requests and keeps up to `in_flight_max` of
//! them on the wire at once, and every record gets a future that resolves to its partition and
//! offset.
//!
//! Dropping the last clone of a producer sends what it buffered and then stops its sender
//! task; [`Producer::close`] does the same and waits for the outcome.
//!
//! Order: the sender numbers its produce requests per connection and the node appends them in
//! that order, so records of a partition are stored in the order they were sent, with several
//! requests in flight.
//!
//! Retries are safe by default: a batch is retried (up to `retries_max`, with bounded backoff)
//! only when the attempt certainly stored nothing: the connection could not be made, the node
//! refused the whole request, or it answered the partition with a retriable code for work it
//! did not start (`shutting_down`, `busy`, `not_leader`, `not_enough_replicas`). An attempt
//! whose outcome is unknown (connection lost or timeout after sending, a node-side
//! `request_timed_out` for the append) fails with [`ProduceError::OutcomeUnknown`]: the records
//! may or may not be stored. `retry_unknown_outcome = true` retries those too, which is
//! at-least-once delivery: a record may then be stored twice. In both modes a retried batch is
//! a new request, so with several requests in flight it can land after batches sent later;
//! with `in_flight_max = 1` a partition's batches go one at a time and a retry goes before the
//! next batch, so order survives retries (duplicates remain possible under
//! `retry_unknown_outcome`). The idempotent producer (roadmap) removes duplicates.
//!
//! Routing: each batch goes to its partition's leader, looked up in the client's metadata
//! cache; `not_leader`, unknown partitions and lost connections drop the cached leaders of the
//! topic, so the retry asks again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::Shared;
use quiver_proto::batch::{BATCH_HEADER_BYTES, BatchBuilder};
use quiver_proto::messages::{
    Acks, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
};
use quiver_proto::{Compression, ErrorCode};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::partitioner::partition_for_key;

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Acknowledgement to wait for.
    pub acks: Acks,
    /// How long a batch may wait for more records before it is sent, ms.
    pub linger_ms: u64,
    /// A batch is sent once it reaches this many bytes (before compression).
    pub batch_bytes: usize,
    /// Codec for batches.
    pub compression: Compression,
    /// Produce requests on the wire at once. With 1, a partition's next batch is not sent
    /// while its previous one is in flight or waiting to be retried (Kafka's
    /// `max.in.flight.requests.per.connection=1`), so retries keep the send order.
    pub in_flight_max: usize,
    /// Bytes of records buffered and not yet acknowledged before `send` waits.
    pub buffer_bytes_max: usize,
    /// Most bytes of batches per produce request.
    pub request_bytes_max: usize,
    /// Server-side timeout of a produce request, ms.
    pub request_timeout_ms: u32,
    /// Retries of a failed batch before its records fail.
    pub retries_max: u32,
    /// Also retry attempts whose outcome is unknown (at-least-once: duplicates possible).
    pub retry_unknown_outcome: bool,
    /// First retry backoff, ms (doubles, up to 1 s, as Kafka's KIP-580 default).
    pub retry_backoff_ms: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            acks: Acks::Leader,
            linger_ms: 5,
            batch_bytes: 256 << 10,
            compression: Compression::None,
            in_flight_max: 8,
            buffer_bytes_max: 64 << 20,
            request_bytes_max: 8 << 20,
            request_timeout_ms: 30_000,
            retries_max: 5,
            retry_unknown_outcome: false,
            retry_backoff_ms: 100,
        }
    }
}

/// A record to send.
#[derive(Clone, Debug, Default)]
pub struct ProducerRecord {
    /// Topic name.
    pub topic: String,
    /// Explicit partition; otherwise chosen from the key (or sticky for keyless records).
    pub partition: Option<u32>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Timestamp, ms; defaults to the time of `send`.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            value: Some(value.into()),
            ..Self::default()
        }
    }
    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }
    /// Pins the partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the timestamp.
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp_ms = Some(ms);
        self
    }
}

/// Where a record was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Partition index.
    pub partition: u32,
    /// Offset; `None` with `acks = none`, where the server does not answer.
    pub offset: Option<u64>,
}

/// Why a record was not stored.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProduceError {
    /// The request failed (after retries, when retriable).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The attempt may or may not have stored the record (a lost connection or a timeout
    /// after the request was sent); it was not retried unless `retry_unknown_outcome` is set.
    #[error("outcome unknown, the record may or may not be stored: {0}")]
    OutcomeUnknown(ClientError),
    /// The record cannot be sent at all.
    #[error("{0}")]
    Invalid(String),
    /// The producer was closed before the record was sent.
    #[error("producer closed")]
    Closed,
}

impl ProduceError {
    /// The server's error code, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ProduceError::Client(c) | ProduceError::OutcomeUnknown(c) => c.code(),
            _ => None,
        }
    }
}

type BatchOutcome = Result<Option<u64>, ProduceError>;
type BatchReceiver = Shared<oneshot::Receiver<BatchOutcome>>;

/// Resolves once the record's batch is acknowledged.
#[must_use = "a delivery future does nothing unless awaited; drop it to ignore the outcome"]
pub struct DeliveryFuture {
    rx: BatchReceiver,
    partition: u32,
    index: u32,
}

impl std::fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryFuture")
            .field("partition", &self.partition)
            .field("index", &self.index)
            .finish()
    }
}

impl DeliveryFuture {
    /// Partition the record was assigned to.
    pub fn partition(&self) -> u32 {
        self.partition
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ProduceError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (partition, index) = (self.partition, self.index);
        self.rx.poll_unpin(cx).map(|r| match r {
            Ok(Ok(base)) => Ok(RecordMetadata {
                partition,
                offset: base.map(|b| b + u64::from(index)),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProduceError::Closed),
        })
    }
}

struct OpenBatch {
    /// Increasing per producer; `flush` waits for the batches opened before it.
    id: u64,
    builder: BatchBuilder,
    opened: Instant,
    reply: oneshot::Sender<BatchOutcome>,
    rx: BatchReceiver,
    reserved_bytes: usize,
}

struct ReadyBatch {
    id: u64,
    topic: Arc<str>,
    partition: u32,
    bytes: Bytes,
    records: u32,
    reply: oneshot::Sender<BatchOutcome>,
    reserved_bytes: usize,
    attempts: u32,
}

#[derive(Default)]
struct State {
    open: HashMap<(Arc<str>, u32), OpenBatch>,
    ready: VecDeque<ReadyBatch>,
    topics: HashMap<String, (Arc<str>, u32)>,
    sticky: HashMap<Arc<str>, u32>,
    /// Ids of batches open, ready or in flight.
    unsettled: std::collections::BTreeSet<u64>,
    /// With `in_flight_max = 1`: partitions with a batch in flight or waiting for a retry.
    muted: std::collections::HashSet<(Arc<str>, u32)>,
    /// Id of the next batch to open.
    next_batch_id: u64,
    flush_requested: bool,
    closed: bool,
}

struct Inner {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    wake: Notify,
    idle: Notify,
    buffer: Semaphore,
    in_flight: Arc<Semaphore>,
    round_robin: AtomicU32,
}

/// Sends records; cheap to clone (all clones share one accumulator and sender task).
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
    /// Shared by the clones; when the last one is dropped the sender sends what is buffered
    /// and then stops (the sender task itself holds only `inner`).
    _last: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.closed = true;
        }
        self.0.wake.notify_one();
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .finish()
    }
}

fn closed_error() -> ProduceError {
    ProduceError::Closed
}

impl Producer {
    /// Starts a producer on `client`.
    pub fn new(client: Client, config: ProducerConfig) -> Self {
        let inner = Arc::new(Inner {
            client,
            buffer: Semaphore::new(config.buffer_bytes_max.max(1)),
            in_flight: Arc::new(Semaphore::new(config.in_flight_max.max(1))),
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            round_robin: AtomicU32::new(0),
        });
        tokio::spawn(sender(inner.clone()));
        Self {
            _last: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, ProduceError> {
        self.inner.state.lock().map_err(|_| closed_error())
    }

    async fn topic_info(&self, topic: &str) -> Result<(Arc<str>, u32), ProduceError> {
        if let Some(t) = self.lock()?.topics.get(topic) {
            return Ok(t.clone());
        }
        let count = self.inner.client.partition_count(topic).await?;
        if count == 0 {
            return Err(ProduceError::Invalid(format!(
                "topic {topic} has no partitions"
            )));
        }
        let entry = (Arc::<str>::from(topic), count);
        self.lock()?.topics.insert(topic.to_string(), entry.clone());
        Ok(entry)
    }

    /// Queues a record; waits only when `buffer_bytes_max` is reached. The returned future
    /// resolves when the record is acknowledged (or fails).
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture, ProduceError> {
        let (topic, partitions) = self.topic_info(&record.topic).await?;
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let size =
            BatchBuilder::record_bytes(record.key.as_deref(), record.value.as_deref(), &headers);
        let size_max = self.inner.config.request_bytes_max - BATCH_HEADER_BYTES;
        if size > size_max {
            return Err(ProduceError::Invalid(format!(
                "record of {size} bytes exceeds the producer's request_bytes_max of {size_max}"
            )));
        }
        let reserve = size.min(self.inner.config.buffer_bytes_max).max(1);
        self.inner
            .buffer
            .acquire_many(reserve as u32)
            .await
            .map_err(|_| closed_error())?
            .forget();
        let ts = record.timestamp_ms.unwrap_or_else(now_ms);
        let batch_bytes = self.inner.config.batch_bytes;
        let mut st = self.lock()?;
        if st.closed {
            drop(st);
            self.inner.buffer.add_permits(reserve);
            return Err(ProduceError::Closed);
        }
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < partitions => p,
            (Some(p), _) => {
                drop(st);
                self.inner.buffer.add_permits(reserve);
                return Err(ProduceError::Invalid(format!(
                    "partition {p} does not exist; {topic} has {partitions}"
                )));
            }
            (None, Some(k)) => partition_for_key(k, partitions),
            (None, None) => *st.sticky.entry(topic.clone()).or_insert_with(|| {
                self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % partitions
            }),
        };
        let key = (topic.clone(), partition);
        // Close the open batch first if this record would overflow it.
        if st.open.get(&key).is_some_and(|b| {
            !b.builder.is_empty() && b.builder.estimated_bytes() + size > batch_bytes
        }) {
            self.close_batch(&mut st, &key);
        }
        let compression = self.inner.config.compression;
        // Room for a full batch up front: growing by doubling would copy it several times.
        let capacity = batch_bytes.max(size) + 64;
        let mut opened_new = false;
        let batch = st.open.entry(key.clone()).or_insert_with(|| {
            opened_new = true;
            let (reply, rx) = oneshot::channel();
            OpenBatch {
                id: 0,
                builder: BatchBuilder::with_capacity(compression, capacity),
                opened: Instant::now(),
                reply,
                rx: rx.shared(),
                reserved_bytes: 0,
            }
        });
        let index = batch.builder.len();
        batch
            .builder
            .push(record.key.as_deref(), record.value.as_deref(), &headers, ts);
        batch.reserved_bytes += reserve;
        let rx = batch.rx.clone();
        let full = batch.builder.estimated_bytes() >= batch_bytes;
        if opened_new {
            let id = st.next_batch_id;
            st.next_batch_id += 1;
            st.unsettled.insert(id);
            if let Some(b) = st.open.get_mut(&key) {
                b.id = id;
            }
        }
        if full {
            self.close_batch(&mut st, &key);
        }
        drop(st);
        if full || opened_new {
            self.inner.wake.notify_one();
        }
        Ok(DeliveryFuture {
            rx,
            partition,
            index,
        })
    }

    fn close_batch(&self, st: &mut State, key: &(Arc<str>, u32)) {
        if let Some(b) = st.open.remove(key) {
            st.ready.push_back(seal(key, b));
            unstick(st, key);
        }
    }

    /// Sends every buffered record now and waits until every record sent before this call is
    /// acknowledged or failed (records sent meanwhile do not hold it up).
    pub async fn flush(&self) -> Result<(), ProduceError> {
        let upto = self.lock()?.next_batch_id;
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut st = self.lock()?;
                if st.unsettled.first().is_none_or(|id| *id >= upto) {
                    return Ok(());
                }
                st.flush_requested = true;
            }
            self.inner.wake.notify_one();
            idle.await;
        }
    }

    /// Flushes, then stops the sender task. Later sends fail with [`ProduceError::Closed`].
    pub async fn close(&self) -> Result<(), ProduceError> {
        self.flush().await?;
        self.lock()?.closed = true;
        self.inner.wake.notify_one();
        Ok(())
    }
}

/// A keyless producer moves on once the batch of its sticky partition is sealed (full, lingered
/// or flushed), so keyless records spread over the partitions batch by batch (Kafka's sticky
/// partitioner, KIP-480). The next keyless record picks the next partition round-robin.
fn unstick(st: &mut State, key: &(Arc<str>, u32)) {
    if st.sticky.get(&key.0) == Some(&key.1) {
        st.sticky.remove(&key.0);
    }
}

fn seal(key: &(Arc<str>, u32), mut b: OpenBatch) -> ReadyBatch {
    let records = b.builder.len();
    ReadyBatch {
        id: b.id,
        topic: key.0.clone(),
        partition: key.1,
        bytes: b.builder.finish(),
        records,
        reply: b.reply,
        reserved_bytes: b.reserved_bytes,
        attempts: 0,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Moves expired batches to the ready queue and packs ready batches into requests.
fn take_requests(inner: &Inner, st: &mut State) -> (Vec<Vec<ReadyBatch>>, Option<Instant>) {
    let linger = Duration::from_millis(inner.config.linger_ms);
    let now = Instant::now();
    let force = st.flush_requested || st.closed;
    st.flush_requested = false;
    let expired: Vec<_> = st
        .open
        .iter()
        .filter(|(_, b)| force || b.opened + linger <= now)
        .map(|(k, _)| k.clone())
        .collect();
    for k in expired {
        if let Some(b) = st.open.remove(&k) {
            st.ready.push_back(seal(&k, b));
            unstick(st, &k);
        }
    }
    let next = st.open.values().map(|b| b.opened + linger).min();
    let mut requests = Vec::new();
    let mut current: Vec<ReadyBatch> = Vec::new();
    let mut current_bytes = 0;
    let ordered = inner.config.in_flight_max <= 1;
    let mut held = VecDeque::new();
    while let Some(b) = st.ready.pop_front() {
        let key = (b.topic.clone(), b.partition);
        if ordered {
            // One batch of a partition at a time: later ones wait behind it (and its retry).
            if st.muted.contains(&key) {
                held.push_back(b);
                continue;
            }
            st.muted.insert(key);
        }
        if !current.is_empty() && current_bytes + b.bytes.len() > inner.config.request_bytes_max {
            requests.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += b.bytes.len();
        current.push(b);
    }
    if !current.is_empty() {
        requests.push(current);
    }
    st.ready = held;
    (requests, next)
}

async fn sender(inner: Arc<Inner>) {
    loop {
        let (requests, next, done) = {
            let Ok(mut st) = inner.state.lock() else {
                return;
            };
            let (r, n) = take_requests(&inner, &mut st);
            let done = st.closed && st.unsettled.is_empty() && r.is_empty();
            (r, n, done)
        };
        if done {
            return;
        }
        let idle = requests.is_empty();
        for batches in requests {
            // Each batch goes to its partition's leader: one request per leader.
            let mut groups: Vec<(Client, Vec<ReadyBatch>)> = Vec::new();
            for b in batches {
                let node = match inner.client.leader_for(&b.topic, b.partition).await {
                    Ok(c) => c,
                    // No route now: the node first given answers (not_leader, retried).
                    Err(_) => inner.client.clone(),
                };
                match groups
                    .iter_mut()
                    .find(|(c, _)| c.config().server == node.config().server)
                {
                    Some((_, g)) => g.push(b),
                    None => groups.push((node, vec![b])),
                }
            }
            for (node, batches) in groups {
                let Ok(permit) = inner.in_flight.clone().acquire_owned().await else {
                    return;
                };
                // Sequence numbers are taken here, in the sender's order, so the node appends
                // the requests in this order even though they travel on separate streams.
                let slot = node.ordered_connection().await;
                let inner2 = inner.clone();
                tokio::spawn(async move {
                    send_request(&inner2, &node, slot, batches).await;
                    drop(permit);
                });
            }
        }
        if idle {
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = inner.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => inner.wake.notified().await,
            }
        }
    }
}

/// Sends one produce request and settles (or requeues) its batches.
async fn send_request(
    inner: &Arc<Inner>,
    node: &Client,
    slot: Result<(quiver_transport::Connection, u64), ClientError>,
    batches: Vec<ReadyBatch>,
) {
    let mut topics: Vec<ProduceTopic> = Vec::new();
    // Batches of one partition are concatenated in order; remember each batch's record offset
    // within its partition's run to compute its base offset from the response.
    let mut positions = Vec::with_capacity(batches.len());
    let mut runs: HashMap<(Arc<str>, u32), (u64, Vec<Bytes>)> = HashMap::new();
    let mut order: Vec<(Arc<str>, u32)> = Vec::new();
    for b in &batches {
        let key = (b.topic.clone(), b.partition);
        let run = runs.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (0, Vec::new())
        });
        positions.push(run.0);
        run.0 += u64::from(b.records);
        run.1.push(b.bytes.clone());
    }
    for key in &order {
        let Some((_, parts)) = runs.remove(key) else {
            continue;
        };
        // One batch (the usual case) goes as is; several are concatenated.
        let records = if parts.len() == 1 {
            parts[0].clone()
        } else {
            Bytes::from(parts.concat())
        };
        let part = ProducePartition {
            partition: key.1,
            records,
        };
        match topics.iter_mut().find(|t| *t.name == *key.0) {
            Some(t) => t.partitions.push(part),
            None => topics.push(ProduceTopic {
                name: key.0.to_string(),
                partitions: vec![part],
            }),
        }
    }
    // Without a connection the request was never sent: nothing can have been stored.
    let connected = slot.is_ok();
    let outcome: Result<Option<ProduceResponse>, ClientError> = match slot {
        Ok((conn, sequence)) => {
            let req = ProduceRequest {
                acks: inner.config.acks,
                timeout_ms: inner.config.request_timeout_ms,
                sequence,
                topics,
            };
            node.produce_on(&conn, &req).await
        }
        Err(e) => Err(e),
    };
    let mut retry = Vec::new();
    let mut settled = Vec::new();
    let mut settled_keys = Vec::new();
    let mut released = 0usize;
    for (b, pos) in batches.into_iter().zip(positions) {
        // Whether a failed attempt certainly stored nothing of this batch.
        let mut not_stored = !connected;
        let result: Result<Option<u64>, ClientError> = match &outcome {
            Ok(None) => Ok(None),
            Ok(Some(resp)) => resp
                .topics
                .iter()
                .find(|t| *t.name == *b.topic)
                .and_then(|t| t.partitions.iter().find(|p| p.partition == b.partition))
                .map(|p| {
                    if p.status.is_ok() {
                        Ok(Some(p.base_offset + pos))
                    } else {
                        // The node answers a partition with an error before appending, except
                        // when the append timed out or its outcome was lost.
                        not_stored = !matches!(
                            p.status.code,
                            ErrorCode::RequestTimedOut | ErrorCode::Unknown
                        );
                        Err(ClientError::server(&p.status))
                    }
                })
                .unwrap_or_else(|| {
                    Err(ClientError::Protocol(
                        "partition missing from produce response".into(),
                    ))
                }),
            Err(e) => {
                // An error frame instead of a response: the node refused the request before
                // handling it (it never reached a partition).
                not_stored |= matches!(e, ClientError::Server { .. });
                Err(e.clone())
            }
        };
        if let Err(e) = &result
            && matches!(
                e.code(),
                None | Some(ErrorCode::NotLeader | ErrorCode::UnknownTopicOrPartition)
            )
        {
            // Leadership may have moved (or the node is gone): look the leader up again.
            inner.client.invalidate_routes(&b.topic);
        }
        match result {
            Err(e)
                if e.is_retriable()
                    && b.attempts < inner.config.retries_max
                    && (not_stored || inner.config.retry_unknown_outcome) =>
            {
                retry.push((b, e))
            }
            other => {
                released += b.reserved_bytes;
                settled.push(b.id);
                settled_keys.push((b.topic.clone(), b.partition));
                let _ = b.reply.send(other.map_err(|e| {
                    if not_stored {
                        ProduceError::Client(e)
                    } else {
                        ProduceError::OutcomeUnknown(e)
                    }
                }));
            }
        }
    }
    inner.buffer.add_permits(released);
    let unmute: Vec<(Arc<str>, u32)> = settled_keys;
    if !retry.is_empty() {
        let attempts = retry.iter().map(|(b, _)| b.attempts).max().unwrap_or(0);
        let backoff = inner
            .config
            .retry_backoff_ms
            .saturating_mul(1 << attempts.min(5))
            .min(1_000);
        tracing::debug!(batches = retry.len(), error = %retry[0].1, backoff_ms = backoff, "retrying produce");
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        if let Ok(mut st) = inner.state.lock() {
            for (mut b, _) in retry.into_iter().rev() {
                b.attempts += 1;
                // Ahead of any later batch of its partition, which stays muted behind it.
                st.muted.remove(&(b.topic.clone(), b.partition));
                st.ready.push_front(b);
            }
        }
        inner.wake.notify_one();
    }
    if !unmute.is_empty() {
        if let Ok(mut st) = inner.state.lock() {
            for k in &unmute {
                st.muted.remove(k);
            }
        }
        inner.wake.notify_one();
    }
    if !settled.is_empty() {
        let idle = inner
            .state
            .lock()
            .map(|mut st| {
                for id in &settled {
                    st.unsettled.remove(id);
                }
                st.unsettled.is_empty()
            })
            .unwrap_or(true);
        // Flushes wait for particular batches: wake them on every settlement.
        inner.idle.notify_waiters();
        if idle {
            // A closed producer's sender is waiting to see the last batch settle.
            inner.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_keeps_records_and_count() {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, Some(b"a"), &[], 1);
        b.push(None, Some(b"b"), &[], 2);
        let (reply, rx) = oneshot::channel();
        let open = OpenBatch {
            id: 7,
            builder: b,
            opened: Instant::now(),
            reply,
            rx: rx.shared(),
            reserved_bytes: 10,
        };
        let ready = seal(&(Arc::from("t"), 3), open);
        assert_eq!(
            (ready.partition, ready.records, ready.reserved_bytes),
            (3, 2, 10)
        );
        assert!(
            quiver_proto::batch::validate_batch(
                &ready.bytes,
                &quiver_proto::BatchLimits {
                    record_bytes_max: 100,
                    batch_bytes_max: 1000
                }
            )
            .is_ok()
        );
    }
}
