//! One function per API: decoded request in, response out. No QUIC here; `node` moves bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use quiver_proto::batch::{BatchError, BatchLimits, RecordBatches, validate_batch};
use quiver_proto::messages::*;
use quiver_proto::{ApiKey, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::order::Turn;
use crate::partition::{Partition, PartitionError};

/// Limits the handlers enforce, from the node configuration.
#[derive(Clone, Copy, Debug)]
pub struct HandlerLimits {
    /// Largest request frame, bytes (also the largest batch).
    pub request_bytes_max: usize,
    /// Longest fetch wait, ms.
    pub fetch_wait_ms_max: u32,
    /// Largest fetch response, bytes.
    pub fetch_bytes_max: u32,
}

use crate::chains::{ConnectionChains, RunningChain, filter_stored};
use crate::pipelines::Pipelines;

fn status_of(e: &PartitionError) -> Status {
    Status::err(e.code, e.message.clone())
}

/// Supported APIs and versions.
pub fn api_versions() -> ApiVersionsResponse {
    ApiVersionsResponse {
        apis: ApiKey::ALL
            .iter()
            .map(|a| ApiVersionRange {
                api: a.code(),
                version_min: 1,
                version_max: a.version_max(),
            })
            .collect(),
    }
}

/// Brokers and topic layout.
pub fn metadata(broker: &Broker, advertised: &str, req: MetadataRequest) -> MetadataResponse {
    let describe = |name: String| match broker.topic(&name) {
        Some(t) => TopicMetadata {
            name,
            status: Status::ok(),
            partitions: (0..t.config.partitions)
                .map(|p| PartitionMetadata {
                    partition: p,
                    leader: broker.node_id(),
                    leader_epoch: 0,
                })
                .collect(),
        },
        None => TopicMetadata {
            status: Status::err(
                ErrorCode::UnknownTopicOrPartition,
                format!("unknown topic {name}"),
            ),
            name,
            partitions: Vec::new(),
        },
    };
    let names = req.topics.unwrap_or_else(|| {
        broker
            .topics()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect()
    });
    MetadataResponse {
        brokers: vec![BrokerInfo {
            node_id: broker.node_id(),
            addr: advertised.to_string(),
        }],
        topics: names.into_iter().map(describe).collect(),
    }
}

/// ClusterStatus of a node that runs alone: `not_in_cluster`, describing the node and its
/// partitions (all led by it).
pub fn single_node_status(broker: &Broker, advertised: &str) -> ClusterStatusResponse {
    let partitions = broker
        .topics()
        .into_iter()
        .flat_map(|(name, t)| {
            (0..t.config.partitions).map(move |p| PartitionLeadership {
                topic: name.to_string(),
                partition: p,
                leader: broker.node_id(),
                leader_epoch: 0,
                replicas: vec![broker.node_id()],
                isr: vec![broker.node_id()],
                adding: Vec::new(),
                removing: Vec::new(),
            })
        })
        .collect();
    ClusterStatusResponse {
        status: Status::err(ErrorCode::NotInCluster, "this node runs alone"),
        node_id: broker.node_id(),
        controller: 0,
        term: 0,
        applied: 0,
        members: vec![ClusterMember {
            node_id: broker.node_id(),
            addr: advertised.to_string(),
            peer_addr: String::new(),
            role: RaftRole::None,
            state: MemberState::Live,
            broker_epoch: 0,
            gossip: GossipStatus::Unknown,
        }],
        partitions,
    }
}

/// Creates topics, one result each.
pub async fn create_topics(broker: &Broker, req: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let status = match broker.create_topic(&t.name, t.partitions, &t.configs).await {
            Ok(()) => Status::ok(),
            Err(e) => Status::err(e.code, e.message),
        };
        results.push(TopicResult {
            name: t.name,
            status,
        });
    }
    CreateTopicsResponse { results }
}

/// Deletes topics, one result each.
pub async fn delete_topics(
    broker: &Broker,
    pipelines: &Pipelines,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut results = Vec::with_capacity(req.names.len());
    for name in req.names {
        if let Some(p) = pipelines.using_topic(&name) {
            results.push(TopicResult {
                status: Status::err(
                    ErrorCode::InvalidConfig,
                    format!("{name} is used by pipeline {p}; delete the pipeline first"),
                ),
                name,
            });
            continue;
        }
        let status = match broker.delete_topic(&name).await {
            Ok(()) => Status::ok(),
            Err(e) => Status::err(e.code, e.message),
        };
        results.push(TopicResult { name, status });
    }
    DeleteTopicsResponse { results }
}

/// Stores a plugin component (compiling and validating it off the async threads).
pub async fn plugin_deploy(broker: &Broker, req: PluginDeployRequest) -> PluginDeployResponse {
    match broker
        .plugins()
        .deploy(&req.name, &req.version, req.component)
        .await
    {
        Ok((created, plugin)) => PluginDeployResponse {
            status: Status::ok(),
            created,
            plugin,
        },
        Err((code, message)) => PluginDeployResponse {
            status: Status::err(code, message),
            created: false,
            plugin: PluginInfo::default(),
        },
    }
}

/// Deployed plugins. A registry that cannot be read answers as a request-level error.
pub fn plugin_list(
    broker: &Broker,
    req: PluginListRequest,
) -> Result<PluginListResponse, (ErrorCode, String)> {
    Ok(PluginListResponse {
        plugins: broker.plugins().list(&req.name)?,
    })
}

/// Removes a plugin version.
pub async fn plugin_remove(
    broker: &Broker,
    pipelines: &Pipelines,
    req: PluginRemoveRequest,
) -> PluginRemoveResponse {
    // Produce-side instances of partitions nobody writes to would otherwise hold an old
    // version until their next produce.
    broker.release_idle_policies(&format!("{}@{}", req.name, req.version));
    if let Some(p) = pipelines.using_plugin(&req.name, &req.version) {
        return PluginRemoveResponse {
            status: Status::err(
                ErrorCode::PluginInUse,
                format!(
                    "{}@{} is used by pipeline {p}; delete the pipeline first",
                    req.name, req.version
                ),
            ),
        };
    }
    if let Some(topic) = broker.policy_using(&req.name, &req.version) {
        return PluginRemoveResponse {
            status: Status::err(
                ErrorCode::PluginInUse,
                format!(
                    "{}@{} is attached to topic {topic} (plugin.on.produce); change that policy first",
                    req.name, req.version
                ),
            ),
        };
    }
    PluginRemoveResponse {
        status: match broker.plugins().remove(&req.name, &req.version).await {
            Ok(()) => Status::ok(),
            Err((code, message)) => Status::err(code, message),
        },
    }
}

/// The outcome of a pipeline operation.
pub fn pipeline_status(r: Result<(), crate::pipelines::PipelineError>) -> PipelineResponse {
    PipelineResponse {
        status: match r {
            Ok(()) => Status::ok(),
            Err((code, message)) => Status::err(code, message),
        },
    }
}

/// Pipelines and their progress.
pub fn pipeline_list(
    pipelines: &Pipelines,
    req: PipelineListRequest,
) -> Result<PipelineListResponse, (ErrorCode, String)> {
    Ok(PipelineListResponse {
        pipelines: pipelines.list(&req.name)?,
    })
}

/// Changes settings of a live topic.
pub async fn alter_topic(broker: &Broker, req: AlterTopicRequest) -> AlterTopicResponse {
    AlterTopicResponse {
        status: match broker.alter_topic(&req.name, &req.set, &req.reset).await {
            Ok(()) => Status::ok(),
            Err(e) => Status::err(e.code, e.message),
        },
    }
}

/// Every topic.
pub fn list_topics(broker: &Broker) -> ListTopicsResponse {
    ListTopicsResponse {
        topics: broker
            .topics()
            .into_iter()
            .map(|(name, t)| TopicListing {
                name: name.to_string(),
                partitions: t.config.partitions,
            })
            .collect(),
    }
}

/// Settings and offsets of topics; reads partition state on a blocking thread (it takes the
/// logs' read locks, which a segment roll may hold for a while).
pub async fn describe_topics(
    broker: &Arc<Broker>,
    req: DescribeTopicsRequest,
) -> DescribeTopicsResponse {
    let broker = broker.clone();
    tokio::task::spawn_blocking(move || describe_topics_blocking(&broker, req))
        .await
        .unwrap_or_default()
}

fn describe_topics_blocking(broker: &Broker, req: DescribeTopicsRequest) -> DescribeTopicsResponse {
    let topics = req
        .names
        .into_iter()
        .map(|name| {
            let Some(t) = broker.topic(&name) else {
                return TopicDescription {
                    status: Status::err(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("unknown topic {name}"),
                    ),
                    name,
                    configs: Vec::new(),
                    partitions: Vec::new(),
                };
            };
            let mut partitions = Vec::with_capacity(t.partitions.len());
            let mut status = Status::ok();
            for (_, p) in t.hosted() {
                match p.state() {
                    Ok(s) => partitions.push(PartitionDescription {
                        partition: p.id().0,
                        log_start_offset: s.log_start_offset,
                        high_watermark: s.high_watermark,
                        log_end_offset: s.log_end_offset,
                        size_bytes: s.size_bytes,
                        segments: s.segments,
                    }),
                    Err(e) => status = status_of(&e),
                }
            }
            TopicDescription {
                name,
                status,
                configs: t.config.to_pairs(),
                partitions,
            }
        })
        .collect();
    DescribeTopicsResponse { topics }
}

fn batch_status(e: &BatchError, partition: u32) -> Status {
    let code = match e {
        BatchError::CrcMismatch { .. } => ErrorCode::CorruptBatch,
        BatchError::RecordTooLarge { .. } => ErrorCode::RecordTooLarge,
        _ => ErrorCode::InvalidBatch,
    };
    Status::err(code, format!("partition {partition}: {e}"))
}

/// Splits and validates the batches produced to one partition: zero-copy slices of the request,
/// which the log writes as they are (it stamps offsets on its own copy of the first 16 bytes).
/// Nothing is appended unless every batch is valid.
/// A topic's produce-side policy, as a produce found it.
struct Policy {
    topic: quiver_proto::TopicName,
    chain: String,
    on_error: crate::topic_config::ErrorPolicy,
    record_bytes_max: usize,
}

type Append =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, PartitionError>> + Send>>;

/// Runs a partition's produce-side chain over its batches and queues what it passes on.
///
/// The partition's chain is held from before the run until the output is queued, so batches
/// reach the chain in the order they are appended (its keyed state sees the log's order).
/// Dead-letter records are appended, and acknowledged, before the partition's own batches are
/// queued: a produce is acknowledged only once its failed records are stored too. When the
/// chain keeps nothing, nothing is appended and the answer's `base_offset` is the log end.
async fn produce_with_policy(
    broker: &Arc<Broker>,
    part: Arc<Partition>,
    batches: Vec<Bytes>,
    policy: Policy,
) -> Append {
    let fail = |code, message: String| -> Append {
        Box::pin(std::future::ready(Err(PartitionError { code, message })))
    };
    let id = part.id().0;
    let slot = broker.policy_slot(&policy.topic, id);
    let mut guard = slot.lock_owned().await;
    // The policy may have changed (or gone) while this produce waited: what counts is the
    // policy when the chain runs. Without one, the batches are stored as produced (and no
    // chain is started in a slot nothing would use again).
    let current = broker
        .topic(policy.topic.as_str())
        .map(|t| t.config.clone());
    let Some(current) = current else {
        return fail(
            ErrorCode::UnknownTopicOrPartition,
            format!("topic {} was deleted", policy.topic),
        );
    };
    if current.on_produce.is_empty() {
        drop(guard);
        return match part.enqueue(batches).await {
            Ok(wait) => Box::pin(wait),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        };
    }
    let policy = Policy {
        chain: current.on_produce.clone(),
        on_error: current.on_error.clone(),
        ..policy
    };
    let log_end = part.state().map(|s| s.log_end_offset).unwrap_or(0);
    let b = broker.clone();
    let topic = policy.topic.to_string();
    let on_error = policy.on_error.clone();
    let chain_text = policy.chain.clone();
    let run = tokio::task::spawn_blocking(move || {
        let registry = b.plugins();
        let stale = guard.as_ref().is_none_or(|(text, _)| *text != chain_text);
        if stale {
            let spec = quiver_proto::messages::parse_chain(&chain_text)
                .map_err(|e| (ErrorCode::InvalidConfig, e))?;
            *guard = None;
            let context = format!("produce {topic}/{id}");
            *guard = Some((chain_text, RunningChain::start(registry, &spec, context)?));
        }
        let (_, running) = guard.as_mut().expect("started above");
        let source = crate::chains::Source {
            topic: &topic,
            partition: id,
        };
        let out =
            crate::chains::apply_policy(running, registry, &batches, &source, &on_error, log_end);
        if running.is_broken() {
            *guard = None;
        }
        Ok::<_, (ErrorCode, String)>((guard, out?))
    })
    .await;
    let (guard, out) = match run {
        Ok(Ok(v)) => v,
        Ok(Err((code, message))) => return fail(code, format!("partition {id}: {message}")),
        Err(e) => return fail(ErrorCode::Unknown, e.to_string()),
    };
    if out.failed > 0 || out.dropped > 0 {
        tracing::debug!(topic = %policy.topic, partition = id, failed = out.failed, dropped = out.dropped, "produce-side policy");
    }
    // Output a transform made is checked like a producer's batch before it is stored.
    let limits = BatchLimits {
        record_bytes_max: policy.record_bytes_max,
        batch_bytes_max: usize::MAX,
    };
    for batch in &out.batches {
        if let Err(e) = validate_batch(batch, &limits) {
            return fail(
                ErrorCode::PluginFailed,
                format!("partition {id}: the chain's output is not storable: {e}"),
            );
        }
    }
    if let (Some(dlq), crate::topic_config::ErrorPolicy::Dlq(dlq_topic)) =
        (out.dlq, &policy.on_error)
    {
        let stored = async {
            let dlq_config = broker
                .topic(dlq_topic)
                .map(|t| t.config.clone())
                .ok_or_else(|| PartitionError {
                    code: ErrorCode::UnknownTopicOrPartition,
                    message: format!("dead-letter topic {dlq_topic} does not exist"),
                })?;
            let count = dlq_config.partitions;
            // Dead letters obey the dead-letter topic's own record limit.
            let dlq_limits = BatchLimits {
                record_bytes_max: dlq_config.max_record_bytes as usize,
                batch_bytes_max: usize::MAX,
            };
            validate_batch(&dlq, &dlq_limits).map_err(|e| PartitionError {
                code: ErrorCode::RecordTooLarge,
                message: format!("a dead letter does not fit {dlq_topic}: {e}"),
            })?;
            let dlq_part = broker.partition(dlq_topic, id % count)?;
            dlq_part.enqueue(vec![dlq]).await?.await
        };
        if let Err(e) = stored.await {
            return fail(
                e.code,
                format!(
                    "partition {id}: failed records could not be stored in {dlq_topic}: {}",
                    e.message
                ),
            );
        }
    }
    if out.batches.is_empty() {
        drop(guard);
        let end = part.state().map(|s| s.log_end_offset).unwrap_or(0);
        return Box::pin(std::future::ready(Ok(end)));
    }
    let queued = part.enqueue(out.batches).await;
    drop(guard);
    match queued {
        Ok(wait) => Box::pin(wait),
        Err(e) => Box::pin(std::future::ready(Err(e))),
    }
}

fn prepare_batches(
    records: &Bytes,
    partition: &Partition,
    record_bytes_max: usize,
    batch_bytes_max: usize,
) -> Result<Vec<Bytes>, Status> {
    let id = partition.id().0;
    if records.is_empty() {
        return Err(Status::err(
            ErrorCode::InvalidBatch,
            format!("partition {id}: no record batches"),
        ));
    }
    let limits = BatchLimits {
        record_bytes_max,
        batch_bytes_max,
    };
    let mut out = Vec::new();
    for view in RecordBatches::new(records) {
        let view = view.map_err(|e| batch_status(&e, id))?;
        validate_batch(view.as_bytes(), &limits).map_err(|e| batch_status(&e, id))?;
        out.push(records.slice_ref(view.as_bytes()));
    }
    Ok(out)
}

/// Appends batches; `None` when the producer asked for no acknowledgement.
///
/// Every partition's batches are validated first; then, holding the request's `turn` in its
/// connection's produce order, all of them are queued to their partitions; then the outcomes
/// are awaited.
pub async fn produce(
    broker: &Arc<Broker>,
    limits: &HandlerLimits,
    req: ProduceRequest,
    turn: Option<Turn>,
) -> Option<ProduceResponse> {
    let deadline = Duration::from_millis(u64::from(req.timeout_ms.max(1)));
    let mut prepared = Vec::new();
    let mut shape = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        let topic = broker.topic(&t.name);
        for p in t.partitions {
            let checked = broker
                .leader_partition(&t.name, p.partition)
                .map_err(|e| status_of(&e))
                .and_then(|part| {
                    let record_max = topic
                        .as_ref()
                        .map(|t| t.config.max_record_bytes as usize)
                        .unwrap_or(0);
                    let policy = topic.as_ref().and_then(|t| {
                        (!t.config.on_produce.is_empty()).then(|| Policy {
                            topic: part.topic().clone(),
                            chain: t.config.on_produce.clone(),
                            on_error: t.config.on_error.clone(),
                            record_bytes_max: record_max,
                        })
                    });
                    prepare_batches(&p.records, &part, record_max, limits.request_bytes_max)
                        .map(|batches| (part, batches, policy))
                });
            match checked {
                Ok(work) => {
                    parts.push((p.partition, Some(prepared.len()), Status::ok()));
                    prepared.push(work);
                }
                Err(status) => parts.push((p.partition, None, status)),
            }
        }
        shape.push((t.name, parts));
    }
    // Queue in the producer's order; the turn is released as soon as everything is queued,
    // so the next request's appends can queue up behind these while they complete.
    let mut pending: Vec<Append> = Vec::with_capacity(prepared.len());
    for (part, batches, policy) in prepared {
        // acks=all on a replicated partition: refused at once without enough in-sync
        // replicas (`min.insync.replicas`), else answered once the records are durable on
        // that many of them.
        let all = req.acks == Acks::All && part.is_replicated();
        if all {
            let r = part.replication();
            if r.isr < r.min_insync {
                pending.push(Box::pin(std::future::ready(Err(
                    PartitionError::not_enough_replicas(&part, r),
                ))));
                continue;
            }
        }
        let records: u64 = batches
            .iter()
            .filter_map(|b| quiver_proto::BatchHeader::parse(b).ok())
            .map(|h| u64::from(h.last_offset_delta) + 1)
            .sum();
        let epoch = match part.role() {
            crate::partition::Role::Leader { epoch } => epoch,
            _ => 0,
        };
        let append: Append = match policy {
            None => match part.enqueue(batches).await {
                Ok(wait) => Box::pin(wait),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
            Some(policy) => produce_with_policy(broker, part.clone(), batches, policy).await,
        };
        if all {
            pending.push(Box::pin(async move {
                let base = append.await?;
                // A policy may have dropped records: the partition's end is then closer;
                // waiting for the last offset sent is the safe side.
                part.wait_acknowledged(epoch, base + records.max(1) - 1)
                    .await?;
                Ok(base)
            }));
        } else {
            pending.push(append);
        }
    }
    drop(turn);
    let waits = pending;
    let appended = tokio::time::timeout(deadline, join_all(waits)).await;
    let response = ProduceResponse {
        topics: shape
            .into_iter()
            .map(|(name, parts)| ProduceTopicResponse {
                name,
                partitions: parts
                    .into_iter()
                    .map(|(partition, slot, status)| {
                        let (status, base_offset) = match (slot, &appended) {
                            (None, _) => (status, 0),
                            (Some(i), Ok(results)) => match &results[i] {
                                Ok(base) => (Status::ok(), *base),
                                Err(e) => (status_of(e), 0),
                            },
                            (Some(_), Err(_)) => (
                                Status::err(
                                    ErrorCode::RequestTimedOut,
                                    "append did not complete within the request timeout; it may still be applied",
                                ),
                                0,
                            ),
                        };
                        ProducePartitionResponse {
                            partition,
                            status,
                            base_offset,
                        }
                    })
                    .collect(),
            })
            .collect(),
    };
    (req.acks != Acks::None).then_some(response)
}

struct FetchSlot {
    topic: usize,
    partition: Arc<Partition>,
    offset: u64,
    max_bytes: usize,
}

/// Reads batches, waiting up to `max_wait_ms` for `min_bytes`.
/// The node-wide bound on fetch response bytes, and how long a fetch may wait for its share.
#[derive(Debug)]
pub struct FetchBudget<'a> {
    /// Permits are bytes of responses being read or sent, across all connections.
    pub bytes: &'a Arc<Semaphore>,
    /// Longest wait for a share of `bytes` before the fetch is answered `request_timed_out`.
    pub wait: Duration,
}

/// Long-poll fetch. The response's bytes are reserved from `budget` only while partitions are
/// read and until the response is sent (the returned permit): a fetch that waits for data
/// holds none, so idle long polls never starve fetches that have data to send.
pub async fn fetch(
    broker: &Arc<Broker>,
    limits: &HandlerLimits,
    req: FetchRequest,
    shutdown: &CancellationToken,
    budget: FetchBudget<'_>,
) -> Result<(FetchResponse, OwnedSemaphorePermit), (ErrorCode, String)> {
    let wait = Duration::from_millis(u64::from(req.max_wait_ms.min(limits.fetch_wait_ms_max)));
    let deadline = Instant::now() + wait;
    let max_bytes = req.max_bytes.min(limits.fetch_bytes_max) as usize;
    let min_bytes = req.min_bytes as usize;

    let mut response = FetchResponse::default();
    let mut slots: Vec<FetchSlot> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut slot_index = Vec::new();
    for (ti, t) in req.topics.into_iter().enumerate() {
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let resp = FetchPartitionResponse {
                partition: p.partition,
                status: Status::ok(),
                high_watermark: 0,
                log_start_offset: 0,
                next_offset: p.offset,
                records: bytes::Bytes::new(),
            };
            if !seen.insert((t.name.clone(), p.partition)) {
                // Listed twice: answered once, so a request cannot multiply the work it asks for.
                parts.push(FetchPartitionResponse {
                    status: Status::err(
                        ErrorCode::InvalidRequest,
                        format!("partition {}/{} listed more than once", t.name, p.partition),
                    ),
                    ..resp
                });
                continue;
            }
            match broker.leader_partition(&t.name, p.partition) {
                Ok(part) => {
                    slot_index.push((ti, parts.len()));
                    slots.push(FetchSlot {
                        topic: ti,
                        partition: part,
                        offset: p.offset,
                        max_bytes: p.partition_max_bytes as usize,
                    });
                }
                Err(e) => {
                    parts.push(FetchPartitionResponse {
                        status: status_of(&e),
                        ..resp
                    });
                    continue;
                }
            }
            parts.push(resp);
        }
        response.topics.push(FetchTopicResponse {
            name: t.name,
            partitions: parts,
        });
    }

    let mut watches: Vec<_> = slots
        .iter()
        .map(|s| s.partition.watch_high_watermark())
        .collect();
    // Reserved before each read: what this fetch may return (a response holds at most one
    // batch over it, which the budget tolerates rather than counts).
    let reserve = (max_bytes.max(1)).min(u32::MAX as usize) as u32;
    loop {
        for w in &mut watches {
            w.borrow_and_update();
        }
        let permit = tokio::select! {
            p = tokio::time::timeout(budget.wait, budget.bytes.clone().acquire_many_owned(reserve)) => match p {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Err((ErrorCode::ShuttingDown, "node is shutting down".into())),
                Err(_) => return Err((
                    ErrorCode::RequestTimedOut,
                    "the node's fetch response budget stayed busy; retry".into(),
                )),
            },
            _ = shutdown.cancelled() => return Err((ErrorCode::ShuttingDown, "node is shutting down".into())),
        };
        let reads = read_slots(&slots, max_bytes).await;
        let total: usize = reads.iter().map(|r| r.1.records.len()).sum();
        let any_error = reads.iter().any(|r| !r.1.status.is_ok());
        if total >= min_bytes.max(1) || any_error || Instant::now() >= deadline || slots.is_empty()
        {
            for ((ti, pi), (_, r)) in slot_index.iter().zip(reads) {
                response.topics[*ti].partitions[*pi] = r;
            }
            debug_assert!(slots.iter().all(|s| s.topic < response.topics.len()));
            return Ok((response, permit));
        }
        drop(permit);
        // Wait for any high watermark to move, the deadline, or shutdown.
        let changed =
            futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.cancelled() => {}
        }
        if shutdown.is_cancelled() {
            // Answer with whatever is there now rather than holding shutdown up; the budget
            // is not waited for (its permit is taken only if free).
            let permit = budget
                .bytes
                .clone()
                .try_acquire_many_owned(reserve)
                .map_err(|_| (ErrorCode::ShuttingDown, "node is shutting down".to_string()))?;
            let reads = read_slots(&slots, max_bytes).await;
            for ((ti, pi), (_, r)) in slot_index.iter().zip(reads) {
                response.topics[*ti].partitions[*pi] = r;
            }
            return Ok((response, permit));
        }
    }
}

async fn read_slots(slots: &[FetchSlot], max_bytes: usize) -> Vec<(usize, FetchPartitionResponse)> {
    let work: Vec<(Arc<Partition>, u64, usize)> = slots
        .iter()
        .map(|s| (s.partition.clone(), s.offset, s.max_bytes))
        .collect();
    let result = tokio::task::spawn_blocking(move || {
        let mut budget = max_bytes;
        let mut served = false;
        work.into_iter()
            .enumerate()
            .map(|(i, (part, offset, part_max))| {
                let state = part.state().ok();
                let (log_start_offset, high_watermark) = state
                    .map(|s| (s.log_start_offset, s.high_watermark))
                    .unwrap_or((0, 0));
                let mut resp = FetchPartitionResponse {
                    partition: part.id().0,
                    status: Status::ok(),
                    high_watermark,
                    log_start_offset,
                    next_offset: offset,
                    records: bytes::Bytes::new(),
                };
                // Once the budget is spent the remaining partitions answer empty. Only while
                // nothing has been served may a batch larger than the budget go out whole (so a
                // consumer always progresses): a response holds at most one such batch.
                let allowed = part_max.min(budget);
                if allowed > 0 || !served {
                    match part.read_blocking(offset, allowed.max(1)) {
                        Ok(bytes) => {
                            served |= !bytes.is_empty();
                            budget = budget.saturating_sub(bytes.len());
                            if let Some(next) = quiver_proto::batch::next_offset_after(&bytes) {
                                resp.next_offset = next.max(offset);
                            }
                            resp.records = bytes;
                        }
                        Err(e) => resp.status = status_of(&e),
                    }
                }
                (i, resp)
            })
            .collect::<Vec<_>>()
    })
    .await;
    match result {
        Ok(v) => v,
        Err(e) => slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    i,
                    FetchPartitionResponse {
                        partition: s.partition.id().0,
                        status: Status::err(ErrorCode::Unknown, e.to_string()),
                        high_watermark: 0,
                        log_start_offset: 0,
                        next_offset: s.offset,
                        records: bytes::Bytes::new(),
                    },
                )
            })
            .collect(),
    }
}

/// Earliest, latest or by-timestamp offsets.
pub async fn list_offsets(broker: &Arc<Broker>, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let broker = broker.clone();
    let lookup = move || {
        let topics =
            req.topics
                .into_iter()
                .map(|t| {
                    let partitions =
                        t.partitions
                            .iter()
                            .map(|p| {
                                let answer = broker
                                    .leader_partition(&t.name, p.partition)
                                    .and_then(|part| {
                                        let s = part.state()?;
                                        Ok(match p.timestamp {
                                            EARLIEST_TIMESTAMP => (s.log_start_offset as i64, -1),
                                            LATEST_TIMESTAMP => (s.high_watermark as i64, -1),
                                            ts => match part.offset_for_timestamp_blocking(ts)? {
                                                Some((o, t)) => (o as i64, t),
                                                None => (-1, -1),
                                            },
                                        })
                                    });
                                match answer {
                                    Ok((offset, timestamp)) => ListOffsetsPartitionResponse {
                                        partition: p.partition,
                                        status: Status::ok(),
                                        offset,
                                        timestamp,
                                    },
                                    Err(e) => ListOffsetsPartitionResponse {
                                        partition: p.partition,
                                        status: status_of(&e),
                                        offset: -1,
                                        timestamp: -1,
                                    },
                                }
                            })
                            .collect();
                    ListOffsetsTopicResponse {
                        name: t.name,
                        partitions,
                    }
                })
                .collect();
        ListOffsetsResponse { topics }
    };
    tokio::task::spawn_blocking(lookup)
        .await
        .unwrap_or_default()
}

/// Checks that every step of a fetch chain names a deployed plugin (before the long poll, so
/// a typo fails at once).
pub async fn check_chain(
    broker: &Arc<Broker>,
    chain: &[ChainStep],
) -> Result<(), (ErrorCode, String)> {
    let (broker, chain) = (broker.clone(), chain.to_vec());
    tokio::task::spawn_blocking(move || {
        for step in &chain {
            crate::plugins::check_name(&step.plugin).map_err(|m| (ErrorCode::InvalidRequest, m))?;
            if !step.version.is_empty() {
                crate::plugins::check_version(&step.version)
                    .map_err(|m| (ErrorCode::InvalidRequest, m))?;
            }
            broker.plugins().resolve(step)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| (ErrorCode::Unknown, e.to_string()))?
}

/// Runs a fetch's chain over every partition's records (consumer-side filtering), one
/// partition at a time on a blocking thread, with the connection's instances for that
/// partition. A partition whose chain fails answers `plugin_failed` with no records and its
/// position unchanged, so the consumer retries the same records (the failed instance is
/// rebuilt first); the other partitions are not affected.
pub async fn apply_chain(
    broker: &Arc<Broker>,
    chains: &ConnectionChains,
    chain: &[ChainStep],
    from: &[Vec<u64>],
    response: &mut FetchResponse,
) {
    for (ti, t) in response.topics.iter_mut().enumerate() {
        for (pi, p) in t.partitions.iter_mut().enumerate() {
            if !p.status.is_ok() || p.records.is_empty() {
                continue;
            }
            let offset = from[ti][pi];
            let slot = match chains.slot(chain, &t.name, p.partition) {
                Ok(s) => s,
                Err((code, message)) => {
                    p.status = Status::err(code, message);
                    p.records = Bytes::new();
                    p.next_offset = offset;
                    continue;
                }
            };
            let mut guard = slot.lock_owned().await;
            let (b, spec, records) = (broker.clone(), chain.to_vec(), p.records.clone());
            let (topic, partition) = (t.name.clone(), p.partition);
            let result = tokio::task::spawn_blocking(move || {
                let registry = b.plugins();
                if guard.is_none() {
                    let context = format!("fetch {topic}/{partition}");
                    *guard = Some(RunningChain::start(registry, &spec, context)?);
                }
                let running = guard.as_mut().expect("started above");
                let out = filter_stored(running, registry, &records, offset);
                if running.is_broken() {
                    *guard = None;
                }
                out
            })
            .await
            .unwrap_or_else(|e| Err((ErrorCode::Unknown, e.to_string())));
            match result {
                Ok(records) => p.records = records,
                Err((code, message)) => {
                    p.status = Status::err(code, message);
                    p.records = Bytes::new();
                    p.next_offset = offset;
                }
            }
        }
    }
}
