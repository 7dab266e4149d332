//! The consumer: reads assigned partitions of one topic from positions it keeps, one fetch
//! request (a long poll) at a time, and hands out records in offset order per partition.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use quiver_proto::batch::RecordBatches;
use quiver_proto::messages::{
    ChainStep, EARLIEST_TIMESTAMP, FetchPartition, FetchRequest, FetchResponse, FetchTopic,
    LATEST_TIMESTAMP,
};
use quiver_proto::{Compression, ErrorCode};

use crate::client::{Client, ClientError};

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Most bytes per fetch response.
    pub fetch_bytes_max: u32,
    /// Most bytes per partition per fetch.
    pub partition_bytes_max: u32,
    /// Longest the server holds a fetch waiting for data, ms.
    pub fetch_wait_ms_max: u32,
    /// The server answers as soon as this many bytes are available.
    pub fetch_bytes_min: u32,
    /// What to do when a position is no longer (or not yet) in the log.
    pub offset_reset: OffsetReset,
    /// Plugins the node runs over the records before sending them (consumer-side
    /// filtering); empty for none. Records keep their offsets; the consumer's position moves
    /// past records the chain dropped.
    pub chain: Vec<ChainStep>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            fetch_bytes_max: 16 << 20,
            partition_bytes_max: 4 << 20,
            fetch_wait_ms_max: 500,
            fetch_bytes_min: 1,
            offset_reset: OffsetReset::Earliest,
            chain: Vec::new(),
        }
    }
}

/// Where a consumer goes when its position is out of range (e.g. deleted by retention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    /// The earliest stored offset.
    Earliest,
    /// The end of the log.
    Latest,
    /// Fail the poll with `offset_out_of_range`.
    Fail,
}

/// Where to start reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTo {
    /// The earliest stored offset.
    Earliest,
    /// The end of the log: only records produced from now on.
    Latest,
    /// An exact offset.
    Offset(u64),
    /// The first record with a timestamp at or after this time (ms); the end if none.
    Timestamp(i64),
}

/// A consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition index.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Timestamp, ms.
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Reads one topic's assigned partitions.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    topic: Arc<str>,
    config: ConsumerConfig,
    positions: BTreeMap<u32, u64>,
    high_watermarks: BTreeMap<u32, u64>,
}

impl Consumer {
    /// Assigns `partitions` of `topic` (all when `None`), each positioned at the earliest offset.
    pub async fn new(
        client: Client,
        topic: &str,
        partitions: Option<Vec<u32>>,
        config: ConsumerConfig,
    ) -> Result<Self, ClientError> {
        let count = client.partition_count(topic).await?;
        let partitions = match partitions {
            None => (0..count).collect(),
            Some(ps) => {
                if let Some(bad) = ps.iter().find(|p| **p >= count) {
                    return Err(ClientError::Config(format!(
                        "partition {bad} does not exist; {topic} has {count}"
                    )));
                }
                ps
            }
        };
        let mut c = Self {
            client,
            topic: Arc::from(topic),
            config,
            positions: partitions.iter().map(|p| (*p, 0)).collect(),
            high_watermarks: BTreeMap::new(),
        };
        c.seek_all(SeekTo::Earliest).await?;
        Ok(c)
    }

    /// Assigned partitions.
    pub fn assignment(&self) -> Vec<u32> {
        self.positions.keys().copied().collect()
    }

    /// Next offset to read in `partition`.
    pub fn position(&self, partition: u32) -> Option<u64> {
        self.positions.get(&partition).copied()
    }

    /// High watermark of `partition` as of the last fetch.
    pub fn high_watermark(&self, partition: u32) -> Option<u64> {
        self.high_watermarks.get(&partition).copied()
    }

    /// Whether every assigned partition has been read up to its last known high watermark.
    pub fn caught_up(&self) -> bool {
        self.positions
            .iter()
            .all(|(p, pos)| self.high_watermarks.get(p).is_some_and(|hw| pos >= hw))
    }

    /// Moves one partition's position.
    pub async fn seek(&mut self, partition: u32, to: SeekTo) -> Result<(), ClientError> {
        if !self.positions.contains_key(&partition) {
            return Err(ClientError::Config(format!(
                "partition {partition} is not assigned"
            )));
        }
        let offset = match to {
            SeekTo::Offset(o) => o,
            SeekTo::Earliest => self.lookup(partition, EARLIEST_TIMESTAMP).await?,
            SeekTo::Latest => self.lookup(partition, LATEST_TIMESTAMP).await?,
            SeekTo::Timestamp(ts) => {
                match self.client.list_offset(&self.topic, partition, ts).await? {
                    Some(o) => o,
                    None => self.lookup(partition, LATEST_TIMESTAMP).await?,
                }
            }
        };
        self.positions.insert(partition, offset);
        Ok(())
    }

    /// Moves every assigned partition's position.
    pub async fn seek_all(&mut self, to: SeekTo) -> Result<(), ClientError> {
        for p in self.assignment() {
            self.seek(p, to).await?;
        }
        Ok(())
    }

    async fn lookup(&self, partition: u32, ts: i64) -> Result<u64, ClientError> {
        self.client
            .list_offset(&self.topic, partition, ts)
            .await?
            .ok_or_else(|| ClientError::Protocol("no offset for earliest/latest".into()))
    }

    /// One fetch: waits up to `fetch_wait_ms_max` for data and returns the records read (possibly
    /// none), advancing positions past them.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        // One fetch per partition leader, all at once (a node alone leads them all).
        let mut groups: Vec<(Client, Vec<FetchPartition>)> = Vec::new();
        for (p, o) in &self.positions {
            let node = match self.client.leader_for(&self.topic, *p).await {
                Ok(c) => c,
                Err(e) if e.is_retriable() => {
                    // No leader now: skip the partition this round.
                    tracing::debug!(partition = p, error = %e, "no leader to fetch from");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let part = FetchPartition {
                partition: *p,
                offset: *o,
                partition_max_bytes: self.config.partition_bytes_max,
            };
            match groups
                .iter_mut()
                .find(|(c, _)| c.config().server == node.config().server)
            {
                Some((_, g)) => g.push(part),
                None => groups.push((node, vec![part])),
            }
        }
        if groups.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            return Ok(Vec::new());
        }
        let fetches = groups.into_iter().map(|(node, partitions)| {
            let req = FetchRequest {
                max_wait_ms: self.config.fetch_wait_ms_max,
                min_bytes: self.config.fetch_bytes_min,
                max_bytes: self.config.fetch_bytes_max,
                topics: vec![FetchTopic {
                    name: self.topic.to_string(),
                    partitions,
                }],
                chain: self.config.chain.clone(),
            };
            let wait = u64::from(self.config.fetch_wait_ms_max);
            async move {
                // A routed node is asked once (a dead leader must not hold the poll up through
                // retries; the next poll looks the leader up again); the node first given is
                // retried as before.
                if node.is_routed() {
                    node.request_once::<_, FetchResponse>(&req, wait).await
                } else {
                    node.request::<_, FetchResponse>(&req, wait).await
                }
            }
        });
        let answers = futures::future::join_all(fetches).await;
        let mut topics = Vec::new();
        let mut failed = None;
        for a in answers {
            match a {
                Ok(r) => topics.extend(r.topics),
                Err(e) => {
                    self.client.invalidate_routes(&self.topic);
                    failed.get_or_insert(e);
                }
            }
        }
        if topics.is_empty()
            && let Some(e) = failed
        {
            return Err(e);
        }
        let resp = FetchResponse { topics };
        // Decode every partition first and move positions only when all succeeded: an error
        // must not leave a position past records that were never handed out.
        let mut out = Vec::new();
        let mut advanced = Vec::new();
        let mut resets = Vec::new();
        for t in resp.topics {
            for p in t.partitions {
                if p.status.code == ErrorCode::OffsetOutOfRange {
                    resets.push(p.partition);
                    continue;
                }
                if p.status.code == ErrorCode::NotLeader {
                    // Leadership moved: look it up again and fetch from there next poll.
                    self.client.invalidate_routes(&self.topic);
                    continue;
                }
                if !p.status.is_ok() {
                    return Err(ClientError::server(&p.status));
                }
                self.high_watermarks.insert(p.partition, p.high_watermark);
                let Some(pos) = self.positions.get(&p.partition).copied() else {
                    continue;
                };
                let next = decode_records(&self.topic, p.partition, &p.records, pos, &mut out)?;
                // `next_offset` also covers records a chain dropped.
                advanced.push((p.partition, next.max(pos).max(p.next_offset)));
            }
        }
        for (partition, next) in advanced {
            self.positions.insert(partition, next);
        }
        for partition in resets {
            let to = match self.config.offset_reset {
                OffsetReset::Earliest => SeekTo::Earliest,
                OffsetReset::Latest => SeekTo::Latest,
                // Hand out what was read; the next poll reports the error again.
                OffsetReset::Fail if !out.is_empty() => continue,
                OffsetReset::Fail => {
                    return Err(ClientError::Server {
                        code: ErrorCode::OffsetOutOfRange,
                        message: format!("partition {partition}: position out of range"),
                    });
                }
            };
            // The records decoded above are kept even if a reset fails: report it next poll.
            if let Err(e) = self.seek(partition, to).await {
                tracing::warn!(partition, error = %e, "offset reset failed");
            }
        }
        Ok(out)
    }

    /// The records as an endless stream (it waits for new records at the end of the log).
    pub fn into_stream(self) -> impl Stream<Item = Result<ConsumerRecord, ClientError>> {
        futures::stream::unfold(
            (self, VecDeque::new()),
            |(mut consumer, mut buffered): (Consumer, VecDeque<ConsumerRecord>)| async move {
                loop {
                    if let Some(r) = buffered.pop_front() {
                        return Some((Ok(r), (consumer, buffered)));
                    }
                    match consumer.poll().await {
                        Ok(records) => buffered.extend(records),
                        Err(e) => return Some((Err(e), (consumer, buffered))),
                    }
                }
            },
        )
    }
}

/// Decodes the batches of one partition, keeping records at or after `from`. Returns the next
/// position. Uncompressed values are zero-copy slices of the response.
fn decode_records(
    topic: &Arc<str>,
    partition: u32,
    records: &Bytes,
    from: u64,
    out: &mut Vec<ConsumerRecord>,
) -> Result<u64, ClientError> {
    let mut next = from;
    for view in RecordBatches::new(records) {
        let view =
            view.map_err(|e| ClientError::Protocol(format!("partition {partition}: {e}")))?;
        let h = *view.header();
        next = next.max(h.next_offset());
        if h.next_offset() <= from {
            continue;
        }
        let zero_copy = h.compression() == Some(Compression::None);
        let slice = |b: &[u8]| {
            if zero_copy {
                records.slice_ref(b)
            } else {
                Bytes::copy_from_slice(b)
            }
        };
        // Batches a chain re-encoded have gaps in their offset deltas.
        view.for_each_record_sparse(usize::MAX, |r| {
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset < from {
                return;
            }
            out.push(ConsumerRecord {
                topic: topic.clone(),
                partition,
                offset,
                timestamp: r.timestamp,
                key: r.key.map(slice),
                value: r.value.map(slice),
                headers: r
                    .headers()
                    .map(|h| (h.key.to_string(), h.value.map(slice)))
                    .collect(),
            });
        })
        .map_err(|e| ClientError::Protocol(format!("partition {partition}: {e}")))?;
    }
    Ok(next)
}
