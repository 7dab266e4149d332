//! Request and response bodies of protocol version 1. PROTOCOL.md describes each field; the
//! encoders here are the reference.
//!
//! Topic settings travel as string key/value pairs (as in Kafka) so new settings never change
//! the message layout; [`config_keys`] lists the keys this version understands.

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, Writer};
use crate::error::ErrorCode;
use crate::frame::ApiKey;

/// A message body with a fixed API.
pub trait Message: Sized {
    /// The API this body belongs to.
    const API: ApiKey;
    /// The API version this type encodes (requests carry it in their header).
    const VERSION: u16 = 1;
    /// Appends the body.
    fn encode(&self, w: &mut Writer);
    /// Decodes the body, consuming `r` entirely.
    fn decode(r: &mut Reader) -> Result<Self, DecodeError>;

    /// Encodes as a list of chunks to send with one gather write. Messages that carry record
    /// batches return the batches as their own chunks, so they are sent without copying.
    fn encode_chunks(&self) -> Vec<Bytes> {
        vec![self.to_bytes()]
    }

    /// Encodes into a fresh buffer.
    fn to_bytes(&self) -> Bytes {
        let mut w = Writer::new();
        self.encode(&mut w);
        w.into_bytes().freeze()
    }

    /// Decodes a whole body, refusing trailing bytes.
    fn from_bytes(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let m = Self::decode(&mut r)?;
        r.finish()?;
        Ok(m)
    }
}

/// Topic setting keys understood by protocol version 1.
pub mod config_keys {
    /// Delete whole segments older than this many ms (`-1` keeps forever).
    pub const RETENTION_MS: &str = "retention.ms";
    /// Delete oldest whole segments while the partition is larger than this (`-1` unlimited).
    pub const RETENTION_BYTES: &str = "retention.bytes";
    /// Roll a new segment when the active one reaches this size.
    pub const SEGMENT_BYTES: &str = "segment.bytes";
    /// Roll a new segment when the active one is this old.
    pub const SEGMENT_MS: &str = "segment.ms";
    /// `batch` (fsync before acknowledging, with group commit) or `interval`.
    pub const FLUSH_POLICY: &str = "flush.policy";
    /// With `flush.policy=interval`, fsync at least this often.
    pub const FLUSH_INTERVAL_MS: &str = "flush.interval.ms";
    /// Largest record accepted (encoded key + value + headers).
    pub const MAX_RECORD_BYTES: &str = "max.record.bytes";
    /// Produce-side policy: a plugin chain (in the text form of
    /// [`parse_chain`](super::parse_chain)) every produced batch runs through before it is
    /// appended; empty for none.
    pub const PLUGIN_ON_PRODUCE: &str = "plugin.on.produce";
    /// What happens to records the produce-side chain fails: `fail`, `skip` or `dlq:TOPIC`.
    pub const PLUGIN_ON_ERROR: &str = "plugin.on.error";
    /// Replicas per partition (cluster mode; a node alone accepts only 1). Fixed at creation.
    pub const REPLICATION_FACTOR: &str = "replication.factor";
    /// Produces with `acks=all` are refused with `not_enough_replicas` while the ISR is smaller.
    pub const MIN_INSYNC_REPLICAS: &str = "min.insync.replicas";
    /// Every key, in documentation order.
    pub const ALL: &[&str] = &[
        RETENTION_MS,
        RETENTION_BYTES,
        SEGMENT_BYTES,
        SEGMENT_MS,
        FLUSH_POLICY,
        FLUSH_INTERVAL_MS,
        MAX_RECORD_BYTES,
        PLUGIN_ON_PRODUCE,
        PLUGIN_ON_ERROR,
        REPLICATION_FACTOR,
        MIN_INSYNC_REPLICAS,
    ];
    /// Keys AlterTopic may change on a live topic.
    pub const ALTERABLE: &[&str] = &[PLUGIN_ON_PRODUCE, PLUGIN_ON_ERROR];
}

fn put_configs(w: &mut Writer, configs: &[(String, String)]) {
    w.count(configs.len());
    for (k, v) in configs {
        w.string(k);
        w.string(v);
    }
}

fn get_configs(r: &mut Reader) -> Result<Vec<(String, String)>, DecodeError> {
    let n = r.count("configs", 4)?;
    (0..n)
        .map(|_| Ok((r.string("config key")?, r.string("config value")?)))
        .collect()
}

fn get_vec<T>(
    r: &mut Reader,
    field: &'static str,
    min_item_bytes: usize,
    mut f: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let n = r.count(field, min_item_bytes)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f(r)?);
    }
    Ok(out)
}

fn put_vec<T>(w: &mut Writer, items: &[T], mut f: impl FnMut(&mut Writer, &T)) {
    w.count(items.len());
    for i in items {
        f(w, i);
    }
}

/// An error code with a human-readable message (empty on success).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: ErrorCode,
    /// Details for people.
    pub message: String,
}

impl Status {
    /// Success.
    pub fn ok() -> Self {
        Self {
            code: ErrorCode::None,
            message: String::new(),
        }
    }
    /// A failure.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    /// Whether this is success.
    pub fn is_ok(&self) -> bool {
        self.code == ErrorCode::None
    }
    fn encode(&self, w: &mut Writer) {
        w.u16(self.code.code());
        w.string(&self.message);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            code: ErrorCode::from_code(r.u16("error")?),
            message: r.string("message")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ApiVersions

/// Asks which APIs the server supports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiVersionsRequest;

/// One supported API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiVersionRange {
    /// API code.
    pub api: u16,
    /// Lowest supported version.
    pub version_min: u16,
    /// Highest supported version.
    pub version_max: u16,
}

/// Supported APIs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiVersionsResponse {
    /// One entry per API.
    pub apis: Vec<ApiVersionRange>,
}

impl Message for ApiVersionsRequest {
    const API: ApiKey = ApiKey::ApiVersions;
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self)
    }
}

impl Message for ApiVersionsResponse {
    const API: ApiKey = ApiKey::ApiVersions;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.apis, |w, a| {
            w.u16(a.api);
            w.u16(a.version_min);
            w.u16(a.version_max);
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            apis: get_vec(r, "apis", 6, |r| {
                Ok(ApiVersionRange {
                    api: r.u16("api")?,
                    version_min: r.u16("version_min")?,
                    version_max: r.u16("version_max")?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// Asks for brokers and the partition layout of some or all topics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataRequest {
    /// Topics to describe; `None` for all.
    pub topics: Option<Vec<String>>,
}

/// A broker of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerInfo {
    /// Node id.
    pub node_id: u32,
    /// Address clients connect to (`host:port`).
    pub addr: String,
}

/// Layout of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionMetadata {
    /// Partition index.
    pub partition: u32,
    /// Node id of the leader.
    pub leader: u32,
    /// Current leader epoch.
    pub leader_epoch: u32,
}

/// Layout of one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMetadata {
    /// Topic name.
    pub name: String,
    /// `unknown_topic_or_partition` when it does not exist.
    pub status: Status,
    /// Partitions in index order.
    pub partitions: Vec<PartitionMetadata>,
}

/// Brokers and topic layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataResponse {
    /// Known brokers.
    pub brokers: Vec<BrokerInfo>,
    /// Requested topics.
    pub topics: Vec<TopicMetadata>,
}

impl Message for MetadataRequest {
    const API: ApiKey = ApiKey::Metadata;
    fn encode(&self, w: &mut Writer) {
        match &self.topics {
            None => w.u8(0),
            Some(t) => {
                w.u8(1);
                put_vec(w, t, |w, n| w.string(n));
            }
        }
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let topics = match r.u8("all_topics")? {
            0 => None,
            1 => Some(get_vec(r, "topics", 2, |r| r.string("topic"))?),
            _ => return Err(DecodeError::Invalid("metadata topic selector")),
        };
        Ok(Self { topics })
    }
}

impl Message for MetadataResponse {
    const API: ApiKey = ApiKey::Metadata;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.brokers, |w, b| {
            w.u32(b.node_id);
            w.string(&b.addr);
        });
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            t.status.encode(w);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                w.u32(p.leader);
                w.u32(p.leader_epoch);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            brokers: get_vec(r, "brokers", 6, |r| {
                Ok(BrokerInfo {
                    node_id: r.u32("node_id")?,
                    addr: r.string("addr")?,
                })
            })?,
            topics: get_vec(r, "topics", 8, |r| {
                Ok(TopicMetadata {
                    name: r.string("name")?,
                    status: Status::decode(r)?,
                    partitions: get_vec(r, "partitions", 12, |r| {
                        Ok(PartitionMetadata {
                            partition: r.u32("partition")?,
                            leader: r.u32("leader")?,
                            leader_epoch: r.u32("leader_epoch")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Topic administration

/// One topic to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTopic {
    /// Topic name.
    pub name: String,
    /// Number of partitions (≥ 1).
    pub partitions: u32,
    /// Settings that differ from the server's defaults (see [`config_keys`]).
    pub configs: Vec<(String, String)>,
}

/// Creates topics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateTopicsRequest {
    /// Topics to create.
    pub topics: Vec<NewTopic>,
}

/// Per-topic outcome of a create or delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicResult {
    /// Topic name.
    pub name: String,
    /// Outcome.
    pub status: Status,
}

/// Outcome per topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateTopicsResponse {
    /// One result per requested topic, in request order.
    pub results: Vec<TopicResult>,
}

/// Deletes topics and their data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteTopicsRequest {
    /// Topic names.
    pub names: Vec<String>,
}

/// Outcome per topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteTopicsResponse {
    /// One result per requested topic, in request order.
    pub results: Vec<TopicResult>,
}

fn put_results(w: &mut Writer, results: &[TopicResult]) {
    put_vec(w, results, |w, t| {
        w.string(&t.name);
        t.status.encode(w);
    });
}

fn get_results(r: &mut Reader) -> Result<Vec<TopicResult>, DecodeError> {
    get_vec(r, "results", 6, |r| {
        Ok(TopicResult {
            name: r.string("name")?,
            status: Status::decode(r)?,
        })
    })
}

impl Message for CreateTopicsRequest {
    const API: ApiKey = ApiKey::CreateTopics;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            w.u32(t.partitions);
            put_configs(w, &t.configs);
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 10, |r| {
                Ok(NewTopic {
                    name: r.string("name")?,
                    partitions: r.u32("partitions")?,
                    configs: get_configs(r)?,
                })
            })?,
        })
    }
}

impl Message for CreateTopicsResponse {
    const API: ApiKey = ApiKey::CreateTopics;
    fn encode(&self, w: &mut Writer) {
        put_results(w, &self.results);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            results: get_results(r)?,
        })
    }
}

/// Changes settings of a live topic (only [`config_keys::ALTERABLE`] keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlterTopicRequest {
    /// Topic name.
    pub name: String,
    /// Settings to set.
    pub set: Vec<(String, String)>,
    /// Settings to reset to their defaults.
    pub reset: Vec<String>,
}

/// Outcome of an alter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlterTopicResponse {
    /// `none`, `unknown_topic_or_partition`, `invalid_config`, `plugin_not_found`,
    /// `storage_error`.
    pub status: Status,
}

impl Message for AlterTopicRequest {
    const API: ApiKey = ApiKey::AlterTopic;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
        put_configs(w, &self.set);
        put_vec(w, &self.reset, |w, k| w.string(k));
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
            set: get_configs(r)?,
            reset: get_vec(r, "reset", 2, |r| r.string("key"))?,
        })
    }
}

impl Message for AlterTopicResponse {
    const API: ApiKey = ApiKey::AlterTopic;
    fn encode(&self, w: &mut Writer) {
        self.status.encode(w);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            status: Status::decode(r)?,
        })
    }
}

impl Message for DeleteTopicsRequest {
    const API: ApiKey = ApiKey::DeleteTopics;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.names, |w, n| w.string(n));
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            names: get_vec(r, "names", 2, |r| r.string("name"))?,
        })
    }
}

impl Message for DeleteTopicsResponse {
    const API: ApiKey = ApiKey::DeleteTopics;
    fn encode(&self, w: &mut Writer) {
        put_results(w, &self.results);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            results: get_results(r)?,
        })
    }
}

/// Lists topics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListTopicsRequest;

/// A topic and its partition count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicListing {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// Every topic, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListTopicsResponse {
    /// Topics.
    pub topics: Vec<TopicListing>,
}

impl Message for ListTopicsRequest {
    const API: ApiKey = ApiKey::ListTopics;
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self)
    }
}

impl Message for ListTopicsResponse {
    const API: ApiKey = ApiKey::ListTopics;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            w.u32(t.partitions);
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 6, |r| {
                Ok(TopicListing {
                    name: r.string("name")?,
                    partitions: r.u32("partitions")?,
                })
            })?,
        })
    }
}

/// Asks for the cluster's members, controller and partition leadership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStatusRequest;

/// A member's part in the controller's Raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftRole {
    /// Not in the group (not yet added).
    None = 0,
    /// Votes in controller elections.
    Voter = 1,
    /// Follows the metadata log without voting.
    Learner = 2,
}

/// A member as the controller knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Known to the Raft group but not registered as a broker.
    Unregistered = 0,
    /// Registered with a valid lease.
    Live = 1,
    /// Its lease ran out or it shut down: it leads nothing and is in no ISR (unless the last).
    Fenced = 2,
}

/// A member as the answering node's gossip (SWIM failure detection) sees it: advisory only,
/// it never decides leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GossipStatus {
    /// Not known to gossip (yet).
    Unknown = 0,
    /// Answers probes.
    Alive = 1,
    /// Missed probes; others are asked to confirm.
    Suspect = 2,
    /// Declared down (or it left).
    Down = 3,
}

/// One cluster member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMember {
    /// Node id.
    pub node_id: u32,
    /// Address clients reach it at (empty if not registered).
    pub addr: String,
    /// Address peers reach it at.
    pub peer_addr: String,
    /// Part in the controller group.
    pub role: RaftRole,
    /// Broker state.
    pub state: MemberState,
    /// Current broker epoch (0 if not registered).
    pub broker_epoch: u64,
    /// What gossip says of it.
    pub gossip: GossipStatus,
}

/// One partition's placement and leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLeadership {
    /// Topic.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Leader (0: offline).
    pub leader: u32,
    /// Leader epoch.
    pub leader_epoch: u32,
    /// Replicas in placement order (during a reassignment: target, then those leaving).
    pub replicas: Vec<u32>,
    /// In-sync replicas.
    pub isr: Vec<u32>,
    /// Replicas a reassignment in progress adds.
    pub adding: Vec<u32>,
    /// Replicas a reassignment in progress removes once the target is in sync.
    pub removing: Vec<u32>,
}

/// The cluster as the answering node's copy of the metadata log shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatusResponse {
    /// `Ok`, or `not_in_cluster` from a node running alone (the other fields then describe it
    /// alone).
    pub status: Status,
    /// The node that answered.
    pub node_id: u32,
    /// Active controller (0: none known).
    pub controller: u32,
    /// Raft term of the controller group.
    pub term: u64,
    /// Index of the last metadata log entry applied on the answering node.
    pub applied: u64,
    /// Members, by id.
    pub members: Vec<ClusterMember>,
    /// Partitions, by topic and index.
    pub partitions: Vec<PartitionLeadership>,
}

impl Message for ClusterStatusRequest {
    const API: ApiKey = ApiKey::ClusterStatus;
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self)
    }
}

impl Message for ClusterStatusResponse {
    const API: ApiKey = ApiKey::ClusterStatus;
    fn encode(&self, w: &mut Writer) {
        self.status.encode(w);
        w.u32(self.node_id);
        w.u32(self.controller);
        w.u64(self.term);
        w.u64(self.applied);
        put_vec(w, &self.members, |w, m| {
            w.u32(m.node_id);
            w.string(&m.addr);
            w.string(&m.peer_addr);
            w.u8(m.role as u8);
            w.u8(m.state as u8);
            w.u64(m.broker_epoch);
            w.u8(m.gossip as u8);
        });
        put_vec(w, &self.partitions, |w, p| {
            w.string(&p.topic);
            w.u32(p.partition);
            w.u32(p.leader);
            w.u32(p.leader_epoch);
            put_vec(w, &p.replicas, |w, r| w.u32(*r));
            put_vec(w, &p.isr, |w, r| w.u32(*r));
            put_vec(w, &p.adding, |w, r| w.u32(*r));
            put_vec(w, &p.removing, |w, r| w.u32(*r));
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            status: Status::decode(r)?,
            node_id: r.u32("node_id")?,
            controller: r.u32("controller")?,
            term: r.u64("term")?,
            applied: r.u64("applied")?,
            members: get_vec(r, "members", 19, |r| {
                Ok(ClusterMember {
                    node_id: r.u32("node_id")?,
                    addr: r.string("addr")?,
                    peer_addr: r.string("peer_addr")?,
                    role: match r.u8("role")? {
                        0 => RaftRole::None,
                        1 => RaftRole::Voter,
                        2 => RaftRole::Learner,
                        _ => return Err(DecodeError::Invalid("raft role")),
                    },
                    state: match r.u8("state")? {
                        0 => MemberState::Unregistered,
                        1 => MemberState::Live,
                        2 => MemberState::Fenced,
                        _ => return Err(DecodeError::Invalid("member state")),
                    },
                    broker_epoch: r.u64("broker_epoch")?,
                    gossip: match r.u8("gossip")? {
                        0 => GossipStatus::Unknown,
                        1 => GossipStatus::Alive,
                        2 => GossipStatus::Suspect,
                        3 => GossipStatus::Down,
                        _ => return Err(DecodeError::Invalid("gossip state")),
                    },
                })
            })?,
            partitions: get_vec(r, "partitions", 22, |r| {
                Ok(PartitionLeadership {
                    topic: r.string("topic")?,
                    partition: r.u32("partition")?,
                    leader: r.u32("leader")?,
                    leader_epoch: r.u32("leader_epoch")?,
                    replicas: get_vec(r, "replicas", 4, |r| r.u32("replica"))?,
                    isr: get_vec(r, "isr", 4, |r| r.u32("isr"))?,
                    adding: get_vec(r, "adding", 4, |r| r.u32("adding"))?,
                    removing: get_vec(r, "removing", 4, |r| r.u32("removing"))?,
                })
            })?,
        })
    }
}

/// One partition's reassignment: its new replicas (the first is the preferred leader), or
/// `None` to cancel the one in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionReassignment {
    /// Topic.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Target replicas; `None` cancels.
    pub replicas: Option<Vec<u32>>,
}

/// Moves partitions to new replicas (KIP-455's model): the new replicas copy the log and join
/// the ISR while the partition keeps serving; the old ones leave once the target is in sync.
/// Answered once the controller committed the start of each move (not its end: watch
/// ClusterStatus's `adding` and `removing`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReassignPartitionsRequest {
    /// The moves.
    pub partitions: Vec<PartitionReassignment>,
}

/// The outcome for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionResult {
    /// Topic.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// `Ok`, or why the partition's part was refused.
    pub status: Status,
}

/// One result per requested partition, in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReassignPartitionsResponse {
    /// Results.
    pub results: Vec<PartitionResult>,
}

fn put_partition_results(w: &mut Writer, results: &[PartitionResult]) {
    put_vec(w, results, |w, p| {
        w.string(&p.topic);
        w.u32(p.partition);
        p.status.encode(w);
    });
}

fn get_partition_results(r: &mut Reader) -> Result<Vec<PartitionResult>, DecodeError> {
    get_vec(r, "results", 10, |r| {
        Ok(PartitionResult {
            topic: r.string("topic")?,
            partition: r.u32("partition")?,
            status: Status::decode(r)?,
        })
    })
}

impl Message for ReassignPartitionsRequest {
    const API: ApiKey = ApiKey::ReassignPartitions;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.partitions, |w, p| {
            w.string(&p.topic);
            w.u32(p.partition);
            match &p.replicas {
                None => w.u8(0),
                Some(rs) => {
                    w.u8(1);
                    put_vec(w, rs, |w, r| w.u32(*r));
                }
            }
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            partitions: get_vec(r, "partitions", 7, |r| {
                Ok(PartitionReassignment {
                    topic: r.string("topic")?,
                    partition: r.u32("partition")?,
                    replicas: match r.u8("has_replicas")? {
                        0 => None,
                        1 => Some(get_vec(r, "replicas", 4, |r| r.u32("replica"))?),
                        _ => return Err(DecodeError::Invalid("has_replicas")),
                    },
                })
            })?,
        })
    }
}

impl Message for ReassignPartitionsResponse {
    const API: ApiKey = ApiKey::ReassignPartitions;
    fn encode(&self, w: &mut Writer) {
        put_partition_results(w, &self.results);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            results: get_partition_results(r)?,
        })
    }
}

/// Which election an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectionType {
    /// The first replica leads again, if it is live and in sync.
    Preferred = 0,
    /// A partition without a leader (no live in-sync replica) gets the first live replica
    /// as leader, out of sync or not: records only the old ISR held are lost.
    Unclean = 1,
}

/// Elects leaders for partitions on an operator's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectLeadersRequest {
    /// The rule.
    pub election: ElectionType,
    /// `(topic, partition)` pairs.
    pub partitions: Vec<(String, u32)>,
}

/// One result per requested partition, in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElectLeadersResponse {
    /// Results.
    pub results: Vec<PartitionResult>,
}

impl Message for ElectLeadersRequest {
    const API: ApiKey = ApiKey::ElectLeaders;
    fn encode(&self, w: &mut Writer) {
        w.u8(self.election as u8);
        put_vec(w, &self.partitions, |w, (t, p)| {
            w.string(t);
            w.u32(*p);
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            election: match r.u8("election")? {
                0 => ElectionType::Preferred,
                1 => ElectionType::Unclean,
                _ => return Err(DecodeError::Invalid("election")),
            },
            partitions: get_vec(r, "partitions", 6, |r| {
                Ok((r.string("topic")?, r.u32("partition")?))
            })?,
        })
    }
}

impl Message for ElectLeadersResponse {
    const API: ApiKey = ApiKey::ElectLeaders;
    fn encode(&self, w: &mut Writer) {
        put_partition_results(w, &self.results);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            results: get_partition_results(r)?,
        })
    }
}

/// Describes topics: settings and per-partition offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DescribeTopicsRequest {
    /// Topic names.
    pub names: Vec<String>,
}

/// State of one partition's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionDescription {
    /// Partition index.
    pub partition: u32,
    /// First offset still stored.
    pub log_start_offset: u64,
    /// Offset after the last record consumers may read.
    pub high_watermark: u64,
    /// Offset after the last record appended.
    pub log_end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: u32,
}

/// One topic's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// `unknown_topic_or_partition` when it does not exist.
    pub status: Status,
    /// Effective settings, every key of [`config_keys`].
    pub configs: Vec<(String, String)>,
    /// Partitions in index order.
    pub partitions: Vec<PartitionDescription>,
}

/// Descriptions in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DescribeTopicsResponse {
    /// One per requested topic.
    pub topics: Vec<TopicDescription>,
}

impl Message for DescribeTopicsRequest {
    const API: ApiKey = ApiKey::DescribeTopics;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.names, |w, n| w.string(n));
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            names: get_vec(r, "names", 2, |r| r.string("name"))?,
        })
    }
}

impl Message for DescribeTopicsResponse {
    const API: ApiKey = ApiKey::DescribeTopics;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            t.status.encode(w);
            put_configs(w, &t.configs);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                w.u64(p.log_start_offset);
                w.u64(p.high_watermark);
                w.u64(p.log_end_offset);
                w.u64(p.size_bytes);
                w.u32(p.segments);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 12, |r| {
                Ok(TopicDescription {
                    name: r.string("name")?,
                    status: Status::decode(r)?,
                    configs: get_configs(r)?,
                    partitions: get_vec(r, "partitions", 40, |r| {
                        Ok(PartitionDescription {
                            partition: r.u32("partition")?,
                            log_start_offset: r.u64("log_start_offset")?,
                            high_watermark: r.u64("high_watermark")?,
                            log_end_offset: r.u64("log_end_offset")?,
                            size_bytes: r.u64("size_bytes")?,
                            segments: r.u32("segments")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Produce

/// How much acknowledgement a producer waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Acks {
    /// No response at all: the server reads the request and sends nothing back.
    None,
    /// The leader appended the batch (and, for `flush.policy=batch` topics, fsynced it).
    #[default]
    Leader,
    /// Every in-sync replica has it (cluster mode; on a single node the same as `Leader`).
    All,
}

impl Acks {
    /// Wire value.
    pub fn code(self) -> u8 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => 2,
        }
    }
    /// From a wire value.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Acks::None),
            1 => Some(Acks::Leader),
            2 => Some(Acks::All),
            _ => None,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "0" => Ok(Acks::None),
            "leader" | "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            o => Err(format!("unknown acks {o:?}; expected none, leader or all")),
        }
    }
}

/// Batches for one partition: one or more whole record batches back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducePartition {
    /// Partition index.
    pub partition: u32,
    /// Record batches.
    pub records: Bytes,
}

/// Batches for one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceTopic {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: Vec<ProducePartition>,
}

/// `sequence` value of a produce request that takes no part in ordering.
pub const UNORDERED_SEQUENCE: u64 = u64::MAX;

/// Appends record batches to one or more partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceRequest {
    /// Acknowledgement wanted.
    pub acks: Acks,
    /// How long the server may take before answering `request_timed_out`.
    pub timeout_ms: u32,
    /// Position of this request among the produce requests of its connection: 0, 1, 2, ...
    /// Requests travel on separate streams and may arrive in any order; the server appends
    /// them to their partitions in sequence order, so pipelined requests keep the producer's
    /// order. [`UNORDERED_SEQUENCE`] opts out.
    pub sequence: u64,
    /// Topics.
    pub topics: Vec<ProduceTopic>,
}

/// Outcome for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducePartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome; on failure nothing of this partition's batches was appended, except after
    /// `request_timed_out` and `unknown`, whose appends may or may not have happened.
    pub status: Status,
    /// Offset given to the first record.
    pub base_offset: u64,
}

/// Outcome for one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceTopicResponse {
    /// Topic name.
    pub name: String,
    /// Partitions in request order.
    pub partitions: Vec<ProducePartitionResponse>,
}

/// Outcomes in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProduceResponse {
    /// Topics.
    pub topics: Vec<ProduceTopicResponse>,
}

impl ProduceRequest {
    /// Bytes of the fixed fields at the start of a produce body: `acks`, `timeout_ms`,
    /// `sequence`. A server can read them first, wait for the request's turn, and only then
    /// reserve memory for the rest.
    pub const FIXED_BYTES: usize = 13;

    /// The `sequence` field of a body's first [`FIXED_BYTES`](Self::FIXED_BYTES) bytes.
    pub fn peek_sequence(fixed: &[u8]) -> Option<u64> {
        let b: [u8; 8] = fixed.get(5..13)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Decodes a body received in two parts: the fixed fields, then the rest.
    pub fn decode_split(fixed: Bytes, rest: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(fixed);
        let (acks, timeout_ms, sequence) = Self::decode_fixed(&mut r)?;
        r.finish()?;
        let mut r = Reader::new(rest);
        let topics = Self::decode_topics(&mut r)?;
        r.finish()?;
        Ok(Self {
            acks,
            timeout_ms,
            sequence,
            topics,
        })
    }

    fn decode_fixed(r: &mut Reader) -> Result<(Acks, u32, u64), DecodeError> {
        let acks = Acks::from_code(r.u8("acks")?).ok_or(DecodeError::Invalid("acks"))?;
        Ok((acks, r.u32("timeout_ms")?, r.u64("sequence")?))
    }

    fn decode_topics(r: &mut Reader) -> Result<Vec<ProduceTopic>, DecodeError> {
        get_vec(r, "topics", 6, |r| {
            Ok(ProduceTopic {
                name: r.string("name")?,
                partitions: get_vec(r, "partitions", 8, |r| {
                    Ok(ProducePartition {
                        partition: r.u32("partition")?,
                        records: r.bytes("records")?,
                    })
                })?,
            })
        })
    }
}

impl Message for ProduceRequest {
    const API: ApiKey = ApiKey::Produce;
    fn encode_chunks(&self) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        let mut w = Writer::new();
        w.u8(self.acks.code());
        w.u32(self.timeout_ms);
        w.u64(self.sequence);
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                w.count(p.records.len());
                chunks.push(std::mem::take(&mut w).into_bytes().freeze());
                chunks.push(p.records.clone());
            }
        }
        if !w.is_empty() {
            chunks.push(w.into_bytes().freeze());
        }
        chunks
    }
    fn encode(&self, w: &mut Writer) {
        for c in self.encode_chunks() {
            w.buffer_mut().extend_from_slice(&c);
        }
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let (acks, timeout_ms, sequence) = Self::decode_fixed(r)?;
        Ok(Self {
            acks,
            timeout_ms,
            sequence,
            topics: Self::decode_topics(r)?,
        })
    }
}

impl Message for ProduceResponse {
    const API: ApiKey = ApiKey::Produce;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                p.status.encode(w);
                w.u64(p.base_offset);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 6, |r| {
                Ok(ProduceTopicResponse {
                    name: r.string("name")?,
                    partitions: get_vec(r, "partitions", 16, |r| {
                        Ok(ProducePartitionResponse {
                            partition: r.u32("partition")?,
                            status: Status::decode(r)?,
                            base_offset: r.u64("base_offset")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Fetch

/// Where to read in one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchPartition {
    /// Partition index.
    pub partition: u32,
    /// First offset wanted.
    pub offset: u64,
    /// Most bytes to return for this partition (at least one whole batch is returned if the
    /// first batch is larger, so a consumer always makes progress).
    pub partition_max_bytes: u32,
}

/// Partitions of one topic to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchTopic {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: Vec<FetchPartition>,
}

/// One step of a plugin chain: a deployed plugin and the configuration given to its `init`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChainStep {
    /// Plugin name.
    pub plugin: String,
    /// Exact version, or empty for the highest deployed version (re-resolved at every batch
    /// boundary, so a newly deployed version takes over).
    pub version: String,
    /// Configuration pairs, in order.
    pub params: Vec<(String, String)>,
}

impl std::fmt::Display for ChainStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.plugin)?;
        if !self.version.is_empty() {
            write!(f, "@{}", self.version)?;
        }
        Ok(())
    }
}

/// Most steps in one chain.
pub const CHAIN_STEPS_MAX: usize = 8;
const _: () = assert!(CHAIN_STEPS_MAX == 8, "update the decode error message");

pub(crate) fn put_chain(w: &mut Writer, chain: &[ChainStep]) {
    put_vec(w, chain, |w, s| {
        w.string(&s.plugin);
        w.string(&s.version);
        put_vec(w, &s.params, |w, (k, v)| {
            w.string(k);
            w.string(v);
        });
    });
}

pub(crate) fn get_chain(r: &mut Reader) -> Result<Vec<ChainStep>, DecodeError> {
    let chain = get_vec(r, "chain", 8, |r| {
        Ok(ChainStep {
            plugin: r.string("plugin")?,
            version: r.string("version")?,
            // Two strings: at least their two 2-byte lengths.
            params: get_vec(r, "params", 4, |r| {
                Ok((r.string("key")?, r.string("value")?))
            })?,
        })
    })?;
    if chain.len() > CHAIN_STEPS_MAX {
        return Err(DecodeError::Invalid("a chain has at most 8 steps"));
    }
    Ok(chain)
}

/// Parses a chain's text form, as topic settings and the CLI write it: steps separated by
/// `|`, each `NAME[@VERSION]` followed by `KEY=VALUE` parameters separated by spaces. A value
/// with spaces or `|` is written in double quotes, with `\"` and `\\` inside. Example:
/// `filter-json@1.0.0 field=level op=eq value=error | redact fields=user,email`.
pub fn parse_chain(text: &str) -> Result<Vec<ChainStep>, String> {
    let mut steps = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    let finish_step = |words: &mut Vec<String>, steps: &mut Vec<ChainStep>| -> Result<(), String> {
        let mut it = std::mem::take(words).into_iter();
        let Some(head) = it.next() else {
            return Err("an empty step".to_string());
        };
        let (plugin, version) = match head.split_once('@') {
            Some((n, v)) if !v.is_empty() => (n.to_string(), v.to_string()),
            Some(_) => return Err(format!("{head:?}: empty version after @")),
            None => (head.clone(), String::new()),
        };
        if plugin.is_empty() || plugin.contains('=') {
            return Err(format!("{head:?}: a step starts with NAME[@VERSION]"));
        }
        let mut params = Vec::new();
        for kv in it {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => params.push((k.to_string(), v.to_string())),
                _ => return Err(format!("{kv:?}: expected KEY=VALUE")),
            }
        }
        steps.push(ChainStep {
            plugin,
            version,
            params,
        });
        Ok(())
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err("unterminated quote".to_string()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => word.push(e),
                            _ => return Err("only \\\" and \\\\ are escapes".to_string()),
                        },
                        Some(x) => word.push(x),
                    }
                }
            }
            '|' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                finish_step(&mut words, &mut steps)?;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if !words.is_empty() || !steps.is_empty() {
        finish_step(&mut words, &mut steps)?;
    }
    if steps.len() > CHAIN_STEPS_MAX {
        return Err(format!("a chain has at most {CHAIN_STEPS_MAX} steps"));
    }
    Ok(steps)
}

/// The text form of a chain (parsed back by [`parse_chain`]).
pub fn format_chain(chain: &[ChainStep]) -> String {
    let quote = |s: &str| {
        if !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == '|' || c == '"') {
            return s.to_string();
        }
        let mut q = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    };
    chain
        .iter()
        .map(|s| {
            let mut t = s.to_string();
            for (k, v) in &s.params {
                t.push(' ');
                t.push_str(&quote(&format!("{k}={v}")));
            }
            t
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Reads record batches; a long poll that waits up to `max_wait_ms` for `min_bytes`.
///
/// Version 2 adds `chain`: plugins the node runs over the records before sending them
/// (consumer-side filtering), and `next_offset` in every partition's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// Longest wait for data, ms.
    pub max_wait_ms: u32,
    /// Answer as soon as this many bytes are available.
    pub min_bytes: u32,
    /// Most bytes in the whole response.
    pub max_bytes: u32,
    /// Topics.
    pub topics: Vec<FetchTopic>,
    /// Plugins applied, in order, to every partition's records (version 2; empty: none).
    pub chain: Vec<ChainStep>,
}

/// Data of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchPartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome.
    pub status: Status,
    /// Offset after the last readable record.
    pub high_watermark: u64,
    /// First offset still stored.
    pub log_start_offset: u64,
    /// Where the consumer reads next (version 2): past every record this answer covered, also
    /// those a chain dropped. Equal to the requested offset when nothing was read.
    pub next_offset: u64,
    /// Record batches. Without a chain, whole batches as stored: the first may start before
    /// the requested offset (batches are never split); consumers skip records below it. With
    /// a chain, each stored batch that kept records is re-encoded with only those records,
    /// at their original offsets (offset deltas may then have gaps).
    pub records: Bytes,
}

/// Data of one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchTopicResponse {
    /// Topic name.
    pub name: String,
    /// Partitions in request order.
    pub partitions: Vec<FetchPartitionResponse>,
}

/// Data in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchResponse {
    /// Topics.
    pub topics: Vec<FetchTopicResponse>,
}

impl FetchRequest {
    fn decode_fields(r: &mut Reader, version: u16) -> Result<Self, DecodeError> {
        Ok(Self {
            max_wait_ms: r.u32("max_wait_ms")?,
            min_bytes: r.u32("min_bytes")?,
            max_bytes: r.u32("max_bytes")?,
            topics: get_vec(r, "topics", 6, |r| {
                Ok(FetchTopic {
                    name: r.string("name")?,
                    partitions: get_vec(r, "partitions", 16, |r| {
                        Ok(FetchPartition {
                            partition: r.u32("partition")?,
                            offset: r.u64("offset")?,
                            partition_max_bytes: r.u32("partition_max_bytes")?,
                        })
                    })?,
                })
            })?,
            chain: if version >= 2 {
                get_chain(r)?
            } else {
                Vec::new()
            },
        })
    }

    /// Decodes a body of `version` (1 or 2), refusing trailing bytes.
    pub fn from_bytes_version(body: Bytes, version: u16) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let m = Self::decode_fields(&mut r, version)?;
        r.finish()?;
        Ok(m)
    }
}

impl Message for FetchRequest {
    const API: ApiKey = ApiKey::Fetch;
    const VERSION: u16 = 2;
    fn encode(&self, w: &mut Writer) {
        w.u32(self.max_wait_ms);
        w.u32(self.min_bytes);
        w.u32(self.max_bytes);
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                w.u64(p.offset);
                w.u32(p.partition_max_bytes);
            });
        });
        put_chain(w, &self.chain);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Self::decode_fields(r, Self::VERSION)
    }
}

impl FetchResponse {
    /// Encodes for a request of `version`: version 1 has no `next_offset`. The stored
    /// batches go out as their own chunks: a fetch without a chain never copies record bytes.
    pub fn encode_chunks_version(&self, version: u16) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        let mut w = Writer::new();
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                p.status.encode(&mut w);
                w.u64(p.high_watermark);
                w.u64(p.log_start_offset);
                if version >= 2 {
                    w.u64(p.next_offset);
                }
                w.count(p.records.len());
                if !p.records.is_empty() {
                    chunks.push(std::mem::take(&mut w).into_bytes().freeze());
                    chunks.push(p.records.clone());
                }
            }
        }
        if !w.is_empty() {
            chunks.push(w.into_bytes().freeze());
        }
        chunks
    }

    fn decode_fields(r: &mut Reader, version: u16) -> Result<Self, DecodeError> {
        let fixed = if version >= 2 { 34 } else { 26 };
        Ok(Self {
            topics: get_vec(r, "topics", 6, |r| {
                Ok(FetchTopicResponse {
                    name: r.string("name")?,
                    partitions: get_vec(r, "partitions", fixed, |r| {
                        let partition = r.u32("partition")?;
                        let status = Status::decode(r)?;
                        let high_watermark = r.u64("high_watermark")?;
                        let log_start_offset = r.u64("log_start_offset")?;
                        let next_offset = if version >= 2 {
                            r.u64("next_offset")?
                        } else {
                            0
                        };
                        Ok(FetchPartitionResponse {
                            partition,
                            status,
                            high_watermark,
                            log_start_offset,
                            next_offset,
                            records: r.bytes("records")?,
                        })
                    })?,
                })
            })?,
        })
    }

    /// Decodes a body of `version` (1 or 2), refusing trailing bytes. Version 1 carries no
    /// `next_offset` (it decodes as 0).
    pub fn from_bytes_version(body: Bytes, version: u16) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let m = Self::decode_fields(&mut r, version)?;
        r.finish()?;
        Ok(m)
    }
}

impl Message for FetchResponse {
    const API: ApiKey = ApiKey::Fetch;
    const VERSION: u16 = 2;
    fn encode_chunks(&self) -> Vec<Bytes> {
        self.encode_chunks_version(Self::VERSION)
    }
    fn encode(&self, w: &mut Writer) {
        for c in self.encode_chunks() {
            w.buffer_mut().extend_from_slice(&c);
        }
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Self::decode_fields(r, Self::VERSION)
    }
}

// ---------------------------------------------------------------------------------------------
// ListOffsets

/// `timestamp` value asking for the earliest stored offset.
pub const EARLIEST_TIMESTAMP: i64 = -2;
/// `timestamp` value asking for the latest offset: the high watermark (the next offset a
/// consumer can read up to).
pub const LATEST_TIMESTAMP: i64 = -1;

/// One partition to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    /// Partition index.
    pub partition: u32,
    /// [`EARLIEST_TIMESTAMP`], [`LATEST_TIMESTAMP`], or a time in ms: the first offset whose
    /// record timestamp is at or after it.
    pub timestamp: i64,
}

/// Partitions of one topic to look up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsTopic {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: Vec<ListOffsetsPartition>,
}

/// Looks up offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    /// Topics.
    pub topics: Vec<ListOffsetsTopic>,
}

/// One partition's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsPartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome.
    pub status: Status,
    /// The offset, or −1 when no record has a timestamp at or after the one asked for.
    pub offset: i64,
    /// Timestamp of the record found (−1 for earliest/latest or none).
    pub timestamp: i64,
}

/// One topic's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsTopicResponse {
    /// Topic name.
    pub name: String,
    /// Partitions in request order.
    pub partitions: Vec<ListOffsetsPartitionResponse>,
}

/// Answers in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOffsetsResponse {
    /// Topics.
    pub topics: Vec<ListOffsetsTopicResponse>,
}

impl Message for ListOffsetsRequest {
    const API: ApiKey = ApiKey::ListOffsets;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                w.i64(p.timestamp);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 6, |r| {
                Ok(ListOffsetsTopic {
                    name: r.string("name")?,
                    partitions: get_vec(r, "partitions", 12, |r| {
                        Ok(ListOffsetsPartition {
                            partition: r.u32("partition")?,
                            timestamp: r.i64("timestamp")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

impl Message for ListOffsetsResponse {
    const API: ApiKey = ApiKey::ListOffsets;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.topics, |w, t| {
            w.string(&t.name);
            put_vec(w, &t.partitions, |w, p| {
                w.u32(p.partition);
                p.status.encode(w);
                w.i64(p.offset);
                w.i64(p.timestamp);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            topics: get_vec(r, "topics", 6, |r| {
                Ok(ListOffsetsTopicResponse {
                    name: r.string("name")?,
                    partitions: get_vec(r, "partitions", 24, |r| {
                        Ok(ListOffsetsPartitionResponse {
                            partition: r.u32("partition")?,
                            status: Status::decode(r)?,
                            offset: r.i64("offset")?,
                            timestamp: r.i64("timestamp")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TransportProbe

/// Direction of a transport probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeDirection {
    /// The client streams raw bytes after the request frame until it finishes the stream; the
    /// server discards them and answers with the count.
    Upload,
    /// The server answers with a response frame, then streams `bytes` raw bytes and finishes.
    Download,
}

/// Measures the raw stream throughput between a client and this server, over the same
/// connection settings as every other request (`quiver perf transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportProbeRequest {
    /// Which way the bytes flow.
    pub direction: ProbeDirection,
    /// For downloads, how many bytes the server sends (bounded by the server).
    pub bytes: u64,
}

/// Bytes the server received (upload) or will send (download).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportProbeResponse {
    /// Byte count.
    pub bytes: u64,
}

impl Message for TransportProbeRequest {
    const API: ApiKey = ApiKey::TransportProbe;
    fn encode(&self, w: &mut Writer) {
        w.u8(match self.direction {
            ProbeDirection::Upload => 0,
            ProbeDirection::Download => 1,
        });
        w.u64(self.bytes);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let direction = match r.u8("direction")? {
            0 => ProbeDirection::Upload,
            1 => ProbeDirection::Download,
            _ => return Err(DecodeError::Invalid("probe direction")),
        };
        Ok(Self {
            direction,
            bytes: r.u64("bytes")?,
        })
    }
}

impl Message for TransportProbeResponse {
    const API: ApiKey = ApiKey::TransportProbe;
    fn encode(&self, w: &mut Writer) {
        w.u64(self.bytes);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            bytes: r.u64("bytes")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Pipelines

/// A pipeline's definition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineSpec {
    /// Name (`[a-z0-9_-]`, 1–64 bytes).
    pub name: String,
    /// Input topic.
    pub from: String,
    /// Output topics; records a transform does not route go to the first.
    pub to: Vec<String>,
    /// The chain, in text form ([`parse_chain`]).
    pub chain: String,
    /// `fail`, `skip` or `dlq:TOPIC`.
    pub on_error: String,
}

fn put_pipeline_spec(w: &mut Writer, p: &PipelineSpec) {
    w.string(&p.name);
    w.string(&p.from);
    put_vec(w, &p.to, |w, t| w.string(t));
    w.string(&p.chain);
    w.string(&p.on_error);
}

fn get_pipeline_spec(r: &mut Reader) -> Result<PipelineSpec, DecodeError> {
    Ok(PipelineSpec {
        name: r.string("name")?,
        from: r.string("from")?,
        to: get_vec(r, "to", 2, |r| r.string("topic"))?,
        chain: r.string("chain")?,
        on_error: r.string("on_error")?,
    })
}

/// One input partition of a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelinePartition {
    /// Input partition.
    pub partition: u32,
    /// Next input offset to process (committed).
    pub committed: u64,
    /// The input partition's high watermark; lag = `high_watermark - committed`.
    pub high_watermark: u64,
    /// Records read since the node started.
    pub records_in: u64,
    /// Records written to output topics since the node started.
    pub records_out: u64,
    /// Records failed (skipped or dead-lettered) since the node started.
    pub records_failed: u64,
    /// `running`, `paused` or `failed: REASON`.
    pub state: String,
}

/// A pipeline and its progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineInfo {
    /// Definition.
    pub spec: PipelineSpec,
    /// Paused by an operator.
    pub paused: bool,
    /// Per input partition.
    pub partitions: Vec<PipelinePartition>,
}

/// Creates a pipeline; it starts at the earliest stored input offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineCreateRequest {
    /// Definition.
    pub spec: PipelineSpec,
}

/// Outcome of a pipeline operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineResponse {
    /// Outcome.
    pub status: Status,
}

/// Pipelines: the one named, or all when `name` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineListRequest {
    /// Name, or empty.
    pub name: String,
}

/// Pipelines by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineListResponse {
    /// Pipelines.
    pub pipelines: Vec<PipelineInfo>,
}

/// Pauses (`pause` = true) or resumes a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineControlRequest {
    /// Name.
    pub name: String,
    /// Pause (true) or resume (false).
    pub pause: bool,
}

/// Deletes a pipeline (its output stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineDeleteRequest {
    /// Name.
    pub name: String,
}

impl Message for PipelineCreateRequest {
    const API: ApiKey = ApiKey::PipelineCreate;
    fn encode(&self, w: &mut Writer) {
        put_pipeline_spec(w, &self.spec);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            spec: get_pipeline_spec(r)?,
        })
    }
}

impl Message for PipelineResponse {
    // The same body answers create, control and delete; the frame's api says which.
    const API: ApiKey = ApiKey::PipelineCreate;
    fn encode(&self, w: &mut Writer) {
        self.status.encode(w);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            status: Status::decode(r)?,
        })
    }
}

impl Message for PipelineListRequest {
    const API: ApiKey = ApiKey::PipelineList;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
        })
    }
}

impl Message for PipelineListResponse {
    const API: ApiKey = ApiKey::PipelineList;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.pipelines, |w, p| {
            put_pipeline_spec(w, &p.spec);
            w.u8(u8::from(p.paused));
            put_vec(w, &p.partitions, |w, q| {
                w.u32(q.partition);
                w.u64(q.committed);
                w.u64(q.high_watermark);
                w.u64(q.records_in);
                w.u64(q.records_out);
                w.u64(q.records_failed);
                w.string(&q.state);
            });
        });
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            pipelines: get_vec(r, "pipelines", 19, |r| {
                Ok(PipelineInfo {
                    spec: get_pipeline_spec(r)?,
                    paused: match r.u8("paused")? {
                        0 => false,
                        1 => true,
                        _ => return Err(DecodeError::Invalid("paused must be 0 or 1")),
                    },
                    partitions: get_vec(r, "partitions", 46, |r| {
                        Ok(PipelinePartition {
                            partition: r.u32("partition")?,
                            committed: r.u64("committed")?,
                            high_watermark: r.u64("high_watermark")?,
                            records_in: r.u64("records_in")?,
                            records_out: r.u64("records_out")?,
                            records_failed: r.u64("records_failed")?,
                            state: r.string("state")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

impl Message for PipelineControlRequest {
    const API: ApiKey = ApiKey::PipelineControl;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
        w.u8(u8::from(self.pause));
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
            pause: match r.u8("pause")? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Invalid("pause must be 0 or 1")),
            },
        })
    }
}

impl Message for PipelineDeleteRequest {
    const API: ApiKey = ApiKey::PipelineDelete;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<M: Message + PartialEq + std::fmt::Debug>(m: M) {
        let bytes = m.to_bytes();
        let chunked: Vec<u8> = m.encode_chunks().concat();
        assert_eq!(chunked, bytes.to_vec(), "encode_chunks agrees with encode");
        let back = M::from_bytes(bytes.clone()).unwrap();
        assert_eq!(back, m);
        // Every strict prefix fails cleanly.
        for cut in 0..bytes.len() {
            let _ = M::from_bytes(bytes.slice(..cut));
        }
    }

    #[test]
    fn produce_decodes_in_two_parts() {
        let req = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 5,
            sequence: 42,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 3,
                    records: Bytes::from_static(b"batch"),
                }],
            }],
        };
        let body = req.to_bytes();
        let fixed = body.slice(..ProduceRequest::FIXED_BYTES);
        assert_eq!(ProduceRequest::peek_sequence(&fixed), Some(42));
        let rest = body.slice(ProduceRequest::FIXED_BYTES..);
        assert_eq!(ProduceRequest::decode_split(fixed, rest).unwrap(), req);
    }

    #[test]
    fn fetch_version_1_has_no_chain_and_no_next_offset() {
        let v2 = FetchRequest {
            max_wait_ms: 1,
            min_bytes: 2,
            max_bytes: 3,
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset: 9,
                    partition_max_bytes: 4,
                }],
            }],
            chain: vec![],
        };
        let body = v2.to_bytes();
        // A v1 body is the v2 body without the (empty) chain count.
        let v1 = body.slice(..body.len() - 4);
        assert_eq!(FetchRequest::from_bytes_version(v1.clone(), 1).unwrap(), v2);
        assert!(FetchRequest::from_bytes_version(v1, 2).is_err());
        let resp = FetchResponse {
            topics: vec![FetchTopicResponse {
                name: "t".into(),
                partitions: vec![FetchPartitionResponse {
                    partition: 0,
                    status: Status::ok(),
                    high_watermark: 10,
                    log_start_offset: 0,
                    next_offset: 10,
                    records: Bytes::from_static(b"batches"),
                }],
            }],
        };
        let v1: Vec<u8> = resp.encode_chunks_version(1).concat();
        assert_eq!(v1.len() + 8, resp.to_bytes().len());
        let back = FetchResponse::from_bytes_version(Bytes::from(v1), 1).unwrap();
        assert_eq!(back.topics[0].partitions[0].next_offset, 0);
        assert_eq!(
            back.topics[0].partitions[0].records,
            resp.topics[0].partitions[0].records
        );
    }

    #[test]
    fn chain_text_roundtrips_and_refuses_nonsense() {
        let chain = parse_chain(
            r#"filter-json@1.0.0 field=level op=eq value=error | redact "fields=a b|c" mask="x\"y\\z""#,
        )
        .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].plugin, "filter-json");
        assert_eq!(chain[0].version, "1.0.0");
        assert_eq!(chain[0].params[2], ("value".into(), "error".into()));
        assert_eq!(chain[1].version, "");
        assert_eq!(chain[1].params[0], ("fields".into(), "a b|c".into()));
        assert_eq!(chain[1].params[1], ("mask".into(), "x\"y\\z".into()));
        assert_eq!(parse_chain(&format_chain(&chain)).unwrap(), chain);
        assert_eq!(parse_chain("").unwrap(), vec![]);
        assert_eq!(parse_chain("  ").unwrap(), vec![]);
        for bad in [
            "a |",
            "| a",
            "a || b",
            "a@ x=1",
            "a novalue",
            "a =v",
            "a \"open",
            "k=v",
            "a x=\"\\n\"",
        ] {
            assert!(parse_chain(bad).is_err(), "{bad:?}");
        }
        let long = ["p"; CHAIN_STEPS_MAX + 1].join(" | ");
        assert!(parse_chain(&long).is_err());
    }

    #[test]
    fn short_params_decode() {
        roundtrip(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 0,
            topics: vec![],
            chain: vec![ChainStep {
                plugin: "s".into(),
                version: String::new(),
                params: vec![("by".into(), "x".into()), ("k".into(), String::new())],
            }],
        });
    }

    #[test]
    fn chains_are_bounded() {
        let step = ChainStep {
            plugin: "p".into(),
            version: String::new(),
            params: vec![],
        };
        let mut w = Writer::new();
        put_chain(&mut w, &vec![step; CHAIN_STEPS_MAX + 1]);
        let mut r = Reader::new(w.into_bytes().freeze());
        assert!(get_chain(&mut r).is_err());
    }

    #[test]
    fn all_messages_roundtrip() {
        let info = PluginInfo {
            name: "filter-json".into(),
            version: "1.2.3-rc.1".into(),
            kind: "filter".into(),
            sha256: "ab".repeat(32),
            bytes: 123_456,
            deployed_ms: 1_700_000_000_000,
            attached: 2,
            records_in: 10,
            guest_us: 7,
            ..PluginInfo::default()
        };
        roundtrip(PluginDeployRequest {
            name: "filter-json".into(),
            version: "1.2.3".into(),
            component: Bytes::from_static(b"\0asm\x0d\0\x01\0"),
        });
        roundtrip(PluginDeployResponse {
            status: Status::ok(),
            created: true,
            plugin: info.clone(),
        });
        roundtrip(PluginDeployResponse {
            status: Status::err(ErrorCode::PluginExists, "differs"),
            created: false,
            plugin: PluginInfo::default(),
        });
        roundtrip(PluginListRequest {
            name: String::new(),
        });
        roundtrip(PluginListResponse {
            plugins: vec![info.clone(), info],
        });
        roundtrip(AlterTopicRequest {
            name: "t".into(),
            set: vec![("plugin.on.error".into(), "skip".into())],
            reset: vec!["plugin.on.produce".into()],
        });
        roundtrip(AlterTopicResponse {
            status: Status::err(ErrorCode::InvalidConfig, "no"),
        });
        roundtrip(ClusterStatusResponse {
            status: Status::ok(),
            node_id: 2,
            controller: 1,
            term: 7,
            applied: 99,
            members: vec![ClusterMember {
                node_id: 1,
                addr: "127.0.0.1:7400".into(),
                peer_addr: "127.0.0.1:7401".into(),
                role: RaftRole::Voter,
                state: MemberState::Fenced,
                broker_epoch: 4,
                gossip: GossipStatus::Suspect,
            }],
            partitions: vec![PartitionLeadership {
                topic: "t".into(),
                partition: 3,
                leader: 1,
                leader_epoch: 5,
                replicas: vec![4, 2, 1],
                isr: vec![1, 2],
                adding: vec![4],
                removing: vec![1],
            }],
        });
        roundtrip(ReassignPartitionsRequest {
            partitions: vec![
                PartitionReassignment {
                    topic: "t".into(),
                    partition: 0,
                    replicas: Some(vec![3, 1]),
                },
                PartitionReassignment {
                    topic: "u".into(),
                    partition: 9,
                    replicas: None,
                },
            ],
        });
        let results = vec![
            PartitionResult {
                topic: "t".into(),
                partition: 0,
                status: Status::ok(),
            },
            PartitionResult {
                topic: String::new(),
                partition: 1,
                status: Status::err(ErrorCode::InvalidReplicaAssignment, "no"),
            },
        ];
        roundtrip(ReassignPartitionsResponse {
            results: results.clone(),
        });
        roundtrip(ElectLeadersRequest {
            election: ElectionType::Unclean,
            partitions: vec![("t".into(), 0), ("u".into(), 4)],
        });
        roundtrip(ElectLeadersResponse { results });
        let spec = PipelineSpec {
            name: "errors".into(),
            from: "logs".into(),
            to: vec!["errors".into(), "other".into()],
            chain: "filter-json field=level op=eq value=error".into(),
            on_error: "dlq:bad".into(),
        };
        roundtrip(PipelineCreateRequest { spec: spec.clone() });
        roundtrip(PipelineResponse {
            status: Status::err(ErrorCode::PipelineExists, "exists"),
        });
        roundtrip(PipelineListRequest { name: "".into() });
        roundtrip(PipelineListResponse {
            pipelines: vec![PipelineInfo {
                spec,
                paused: true,
                partitions: vec![PipelinePartition {
                    partition: 3,
                    committed: 10,
                    high_watermark: 12,
                    records_in: 10,
                    records_out: 4,
                    records_failed: 1,
                    state: "failed: boom".into(),
                }],
            }],
        });
        roundtrip(PipelineControlRequest {
            name: "p".into(),
            pause: true,
        });
        roundtrip(PipelineDeleteRequest { name: "p".into() });
        roundtrip(PluginRemoveRequest {
            name: "a".into(),
            version: "0.1.0".into(),
        });
        roundtrip(PluginRemoveResponse {
            status: Status::err(ErrorCode::PluginNotFound, "no such plugin"),
        });
        roundtrip(TransportProbeRequest {
            direction: ProbeDirection::Download,
            bytes: 1 << 30,
        });
        roundtrip(TransportProbeResponse { bytes: 5 });
        roundtrip(ApiVersionsResponse {
            apis: vec![ApiVersionRange {
                api: 10,
                version_min: 1,
                version_max: 1,
            }],
        });
        roundtrip(MetadataRequest { topics: None });
        roundtrip(MetadataRequest {
            topics: Some(vec!["a".into()]),
        });
        roundtrip(MetadataResponse {
            brokers: vec![BrokerInfo {
                node_id: 1,
                addr: "127.0.0.1:7400".into(),
            }],
            topics: vec![TopicMetadata {
                name: "t".into(),
                status: Status::ok(),
                partitions: vec![PartitionMetadata {
                    partition: 0,
                    leader: 1,
                    leader_epoch: 0,
                }],
            }],
        });
        roundtrip(CreateTopicsRequest {
            topics: vec![NewTopic {
                name: "t".into(),
                partitions: 3,
                configs: vec![("retention.ms".into(), "1000".into())],
            }],
        });
        roundtrip(CreateTopicsResponse {
            results: vec![TopicResult {
                name: "t".into(),
                status: Status::err(ErrorCode::TopicAlreadyExists, "exists"),
            }],
        });
        roundtrip(DeleteTopicsRequest {
            names: vec!["x".into()],
        });
        roundtrip(ListTopicsResponse {
            topics: vec![TopicListing {
                name: "t".into(),
                partitions: 2,
            }],
        });
        roundtrip(DescribeTopicsResponse {
            topics: vec![TopicDescription {
                name: "t".into(),
                status: Status::ok(),
                configs: vec![("a".into(), "b".into())],
                partitions: vec![PartitionDescription {
                    partition: 0,
                    log_start_offset: 1,
                    high_watermark: 2,
                    log_end_offset: 3,
                    size_bytes: 4,
                    segments: 5,
                }],
            }],
        });
        roundtrip(ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 30_000,
            sequence: 7,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 1,
                    records: Bytes::from_static(b"batch"),
                }],
            }],
        });
        roundtrip(ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: "t".into(),
                partitions: vec![ProducePartitionResponse {
                    partition: 1,
                    status: Status::ok(),
                    base_offset: 77,
                }],
            }],
        });
        roundtrip(FetchRequest {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 1 << 20,
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset: 5,
                    partition_max_bytes: 1 << 20,
                }],
            }],
            chain: vec![ChainStep {
                plugin: "filter-json".into(),
                version: "1.0.0".into(),
                params: vec![
                    ("field".into(), "level".into()),
                    ("eq".into(), "error".into()),
                ],
            }],
        });
        roundtrip(FetchResponse {
            topics: vec![FetchTopicResponse {
                name: "t".into(),
                partitions: vec![
                    FetchPartitionResponse {
                        partition: 0,
                        status: Status::ok(),
                        high_watermark: 10,
                        log_start_offset: 0,
                        next_offset: 8,
                        records: Bytes::from_static(b"xyz"),
                    },
                    FetchPartitionResponse {
                        partition: 1,
                        status: Status::err(ErrorCode::OffsetOutOfRange, "nope"),
                        high_watermark: 0,
                        log_start_offset: 0,
                        next_offset: 0,
                        records: Bytes::new(),
                    },
                ],
            }],
        });
        roundtrip(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: "t".into(),
                partitions: vec![ListOffsetsPartition {
                    partition: 0,
                    timestamp: EARLIEST_TIMESTAMP,
                }],
            }],
        });
        roundtrip(ListOffsetsResponse {
            topics: vec![ListOffsetsTopicResponse {
                name: "t".into(),
                partitions: vec![ListOffsetsPartitionResponse {
                    partition: 0,
                    status: Status::ok(),
                    offset: 3,
                    timestamp: -1,
                }],
            }],
        });
    }
}

#[cfg(test)]
mod protocol_md_examples {
    //! The Produce example of PROTOCOL.md §4.7 (request and response frames) is exactly what
    //! this crate encodes: a client written from the document alone sends these bytes.
    use super::*;
    use crate::{BatchBuilder, Compression, RequestHeader, ResponseHeader};

    /// The hex tokens at the start of each line of the ```text block after `heading`.
    fn hex_block(doc: &str, heading: &str, nth: usize) -> Vec<u8> {
        let mut rest = &doc[doc.find(heading).expect("heading")..];
        let mut block = "";
        for _ in 0..=nth {
            let start = rest.find("```text").expect("a text block") + 7;
            let len = rest[start..].find("```").expect("block end");
            block = &rest[start..start + len];
            rest = &rest[start + len + 3..];
        }
        block
            .lines()
            .flat_map(|l| {
                l.split_whitespace()
                    .take_while(|t| t.len() == 2 && u8::from_str_radix(t, 16).is_ok())
                    .map(|t| u8::from_str_radix(t, 16).unwrap_or_default())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn produce_request_and_response_frames_match_the_document() {
        let doc = include_str!("../../../PROTOCOL.md");
        let mut batch = BatchBuilder::new(Compression::None);
        batch.push(Some(b"k"), Some(b"hello"), &[], 1_700_000_000_000);
        let batch = batch.finish();
        let req = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 5000,
            sequence: 0,
            topics: vec![ProduceTopic {
                name: "orders".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: batch.clone(),
                }],
            }],
        };
        let frame = RequestHeader {
            api: ApiKey::Produce.code(),
            version: 1,
            request_id: 7,
        }
        .encode(&req.to_bytes());
        let mut documented = hex_block(doc, "### 4.7 Produce", 0);
        documented.extend_from_slice(&batch);
        assert_eq!(documented, frame.to_vec(), "PROTOCOL.md 4.7 request");
        assert_eq!(frame.len(), 127);

        let resp = ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: "orders".into(),
                partitions: vec![ProducePartitionResponse {
                    partition: 0,
                    status: Status::ok(),
                    base_offset: 0,
                }],
            }],
        };
        let frame = ResponseHeader {
            api: ApiKey::Produce.code(),
            error: 0,
            request_id: 7,
        }
        .encode(&resp.to_bytes());
        assert_eq!(
            hex_block(doc, "### 4.7 Produce", 1),
            frame.to_vec(),
            "PROTOCOL.md 4.7 response"
        );
    }
}

/// A deployed plugin version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginInfo {
    /// Name (`[a-z0-9_-]`, 1–64 bytes).
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// World: `filter` or `transform`.
    pub kind: String,
    /// sha256 of the component, hex.
    pub sha256: String,
    /// Size of the component, bytes.
    pub bytes: u64,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_ms: i64,
    /// Running instances (fetch chains, topic policies, pipelines); removal is refused while
    /// this is not 0.
    pub attached: u32,
    /// Batches run since the node started (this and the counters below cover every
    /// instance of this version).
    pub batches: u64,
    /// Records given to the plugin.
    pub records_in: u64,
    /// Records it passed on (kept by a filter, emitted by a transform).
    pub records_out: u64,
    /// Records a filter dropped.
    pub records_dropped: u64,
    /// Records it failed.
    pub records_failed: u64,
    /// Calls that ended in a plugin error (trap, timeout, out of memory, invalid output).
    pub errors: u64,
    /// Time spent in the guest, µs.
    pub guest_us: u64,
}

fn put_plugin(w: &mut Writer, p: &PluginInfo) {
    w.string(&p.name);
    w.string(&p.version);
    w.string(&p.kind);
    w.string(&p.sha256);
    w.u64(p.bytes);
    w.i64(p.deployed_ms);
    w.u32(p.attached);
    for c in [
        p.batches,
        p.records_in,
        p.records_out,
        p.records_dropped,
        p.records_failed,
        p.errors,
        p.guest_us,
    ] {
        w.u64(c);
    }
}

fn get_plugin(r: &mut Reader) -> Result<PluginInfo, DecodeError> {
    Ok(PluginInfo {
        name: r.string("name")?,
        version: r.string("version")?,
        kind: r.string("kind")?,
        sha256: r.string("sha256")?,
        bytes: r.u64("bytes")?,
        deployed_ms: r.i64("deployed_ms")?,
        attached: r.u32("attached")?,
        batches: r.u64("batches")?,
        records_in: r.u64("records_in")?,
        records_out: r.u64("records_out")?,
        records_dropped: r.u64("records_dropped")?,
        records_failed: r.u64("records_failed")?,
        errors: r.u64("errors")?,
        guest_us: r.u64("guest_us")?,
    })
}

/// Deploys `component` as `name@version`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginDeployRequest {
    /// Plugin name.
    pub name: String,
    /// Semantic version (`MAJOR.MINOR.PATCH`, optional pre-release).
    pub version: String,
    /// The component's bytes.
    pub component: Bytes,
}

/// Outcome of a deploy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginDeployResponse {
    /// `plugin_exists`, `invalid_plugin`, `invalid_request` (name or version) or success.
    pub status: Status,
    /// Whether this request stored it (false: the same bytes were already deployed).
    pub created: bool,
    /// The deployed plugin (empty fields on failure).
    pub plugin: PluginInfo,
}

impl Message for PluginDeployRequest {
    const API: ApiKey = ApiKey::PluginDeploy;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
        w.string(&self.version);
        w.bytes(&self.component);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
            version: r.string("version")?,
            component: r.bytes("component")?,
        })
    }
}

impl Message for PluginDeployResponse {
    const API: ApiKey = ApiKey::PluginDeploy;
    fn encode(&self, w: &mut Writer) {
        self.status.encode(w);
        w.u8(u8::from(self.created));
        put_plugin(w, &self.plugin);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            status: Status::decode(r)?,
            created: match r.u8("created")? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Invalid("created")),
            },
            plugin: get_plugin(r)?,
        })
    }
}

/// Lists deployed plugins: every version of `name`, or everything when `name` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginListRequest {
    /// Name to list, or empty for all.
    pub name: String,
}

/// Deployed plugins, by name then version (semantic order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginListResponse {
    /// The plugins.
    pub plugins: Vec<PluginInfo>,
}

impl Message for PluginListRequest {
    const API: ApiKey = ApiKey::PluginList;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
        })
    }
}

impl Message for PluginListResponse {
    const API: ApiKey = ApiKey::PluginList;
    fn encode(&self, w: &mut Writer) {
        put_vec(w, &self.plugins, put_plugin);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            plugins: get_vec(r, "plugins", 86, get_plugin)?,
        })
    }
}

/// Removes `name@version`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginRemoveRequest {
    /// Plugin name.
    pub name: String,
    /// Version to remove.
    pub version: String,
}

/// Outcome of a remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRemoveResponse {
    /// `plugin_not_found` or success.
    pub status: Status,
}

impl Message for PluginRemoveRequest {
    const API: ApiKey = ApiKey::PluginRemove;
    fn encode(&self, w: &mut Writer) {
        w.string(&self.name);
        w.string(&self.version);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("name")?,
            version: r.string("version")?,
        })
    }
}

impl Message for PluginRemoveResponse {
    const API: ApiKey = ApiKey::PluginRemove;
    fn encode(&self, w: &mut Writer) {
        self.status.encode(w);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            status: Status::decode(r)?,
        })
    }
}
