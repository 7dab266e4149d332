//! The peer protocol (ALPN `quiver-peer/1`): what brokers say to each other. Same frames as
//! the client protocol (one request per bidirectional stream, the header's `api` from
//! [`PeerApi`]), on a separate endpoint where both sides authenticate with certificates of
//! the cluster CA. PROTOCOL.md §9 describes every message.
//!
//! The controller's Raft messages carry openraft's own request and response types in their
//! serde JSON form: they change with the openraft version, so every node of a cluster must
//! run the same Quiver version (as with Kafka's inter-broker protocol before versioning).

use crate::codec::{DecodeError, Reader, Writer};

/// An API of the peer protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerApi {
    /// Who are you: node id and addresses, both ways.
    Hello,
    /// Raft RequestVote (JSON).
    RaftVote,
    /// Raft AppendEntries (JSON).
    RaftAppend,
    /// Raft InstallSnapshot, one chunk (JSON).
    RaftSnapshot,
    /// A metadata change for the active controller to commit (JSON command and outcome).
    ControllerWrite,
    /// A broker's heartbeat to the active controller.
    BrokerHeartbeat,
    /// A follower pulls a partition from its leader.
    ReplicaFetch,
}

impl PeerApi {
    /// Every peer API.
    pub const ALL: &'static [PeerApi] = &[
        PeerApi::Hello,
        PeerApi::RaftVote,
        PeerApi::RaftAppend,
        PeerApi::RaftSnapshot,
        PeerApi::ControllerWrite,
        PeerApi::BrokerHeartbeat,
        PeerApi::ReplicaFetch,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            PeerApi::Hello => 1,
            PeerApi::RaftVote => 10,
            PeerApi::RaftAppend => 11,
            PeerApi::RaftSnapshot => 12,
            PeerApi::ControllerWrite => 20,
            PeerApi::BrokerHeartbeat => 21,
            PeerApi::ReplicaFetch => 30,
        }
    }

    /// The API for a wire value.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| a.code() == code)
    }
}

/// Hello, request and answer alike: the sender's id and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Node id.
    pub node_id: u32,
    /// Where peers reach it.
    pub peer_addr: String,
    /// Where clients reach it.
    pub client_addr: String,
    /// The active controller it knows (0: none; its controller group may not exist yet).
    pub controller: u32,
}

impl Hello {
    /// Encodes the body.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.node_id);
        w.string(&self.peer_addr);
        w.string(&self.client_addr);
        w.u32(self.controller);
    }

    /// Decodes a whole body.
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let h = Self {
            node_id: r.u32("node_id")?,
            peer_addr: r.string("peer_addr")?,
            client_addr: r.string("client_addr")?,
            controller: r.u32("controller")?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// The body of a `not_controller` answer: a message, then the active controller the
/// answering node knows (0: none) and its peer address (empty if unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotController {
    /// Why.
    pub message: String,
    /// The controller, if known.
    pub leader: u32,
    /// Its peer address, if known.
    pub leader_addr: String,
}

impl NotController {
    /// Encodes the body.
    pub fn encode(&self, w: &mut Writer) {
        w.string(&self.message);
        w.u32(self.leader);
        w.string(&self.leader_addr);
    }

    /// Decodes a whole body.
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let h = Self {
            message: r.string("message")?,
            leader: r.u32("leader")?,
            leader_addr: r.string("leader_addr")?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// A broker's heartbeat: its id and the broker epoch its registration got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerHeartbeat {
    /// Node id.
    pub node_id: u32,
    /// Broker epoch.
    pub broker_epoch: u64,
}

impl BrokerHeartbeat {
    /// Encodes the body.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.node_id);
        w.u64(self.broker_epoch);
    }

    /// Decodes a whole body.
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let h = Self {
            node_id: r.u32("node_id")?,
            broker_epoch: r.u64("broker_epoch")?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// A follower's fetch: where its log stands, so the leader can check it against its own
/// lineage (KIP-320's epoch fencing, KIP-279's divergence) and count its durable end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaFetchRequest {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The follower's node id.
    pub replica: u32,
    /// The follower's broker epoch.
    pub broker_epoch: u64,
    /// The leader epoch the follower knows.
    pub leader_epoch: u32,
    /// The follower's log end: the first offset it wants.
    pub fetch_offset: u64,
    /// Epoch of the follower's last batch, if any.
    pub last_fetched_epoch: Option<u32>,
    /// The follower's fsynced end.
    pub durable_end: u64,
    /// Most record bytes to answer (one whole batch at least).
    pub max_bytes: u32,
    /// How long the leader may wait for new records when there are none (long poll).
    pub wait_ms: u32,
}

fn put_opt_u32(w: &mut Writer, v: Option<u32>) {
    w.i64(v.map_or(-1, i64::from));
}

fn get_opt_u32(r: &mut Reader, field: &'static str) -> Result<Option<u32>, DecodeError> {
    match r.i64(field)? {
        -1 => Ok(None),
        v => u32::try_from(v)
            .map(Some)
            .map_err(|_| DecodeError::Invalid(field)),
    }
}

impl ReplicaFetchRequest {
    /// Encodes the body.
    pub fn encode(&self, w: &mut Writer) {
        w.string(&self.topic);
        w.u32(self.partition);
        w.u32(self.replica);
        w.u64(self.broker_epoch);
        w.u32(self.leader_epoch);
        w.u64(self.fetch_offset);
        put_opt_u32(w, self.last_fetched_epoch);
        w.u64(self.durable_end);
        w.u32(self.max_bytes);
        w.u32(self.wait_ms);
    }

    /// Decodes a whole body.
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let f = Self {
            topic: r.string("topic")?,
            partition: r.u32("partition")?,
            replica: r.u32("replica")?,
            broker_epoch: r.u64("broker_epoch")?,
            leader_epoch: r.u32("leader_epoch")?,
            fetch_offset: r.u64("fetch_offset")?,
            last_fetched_epoch: get_opt_u32(r, "last_fetched_epoch")?,
            durable_end: r.u64("durable_end")?,
            max_bytes: r.u32("max_bytes")?,
            wait_ms: r.u32("wait_ms")?,
        };
        r.finish()?;
        Ok(f)
    }
}

/// The leader's answer to a follower's fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaFetchResponse {
    /// Batches from the fetch offset (possibly none), and the high watermark.
    Records {
        /// The leader's epoch.
        epoch: u32,
        /// High watermark.
        high_watermark: u64,
        /// Whole batches, as stored (offsets and leader epochs in place).
        records: bytes::Bytes,
    },
    /// The follower's log diverges from the leader's: truncate to `end_offset`.
    Diverging {
        /// The leader's epoch.
        epoch: u32,
        /// The largest leader epoch ≤ the follower's last one that the leader has, if any.
        end_epoch: Option<u32>,
        /// Where it ends on the leader.
        end_offset: u64,
    },
    /// The fetch named another leader epoch than the receiver's (or the receiver does not
    /// lead): the follower waits for newer metadata.
    Fenced {
        /// The receiver's epoch.
        epoch: u32,
    },
}

impl ReplicaFetchResponse {
    /// Encodes the body.
    pub fn encode(&self, w: &mut Writer) {
        match self {
            ReplicaFetchResponse::Records {
                epoch,
                high_watermark,
                records,
            } => {
                w.u8(0);
                w.u32(*epoch);
                w.u64(*high_watermark);
                w.bytes(records);
            }
            ReplicaFetchResponse::Diverging {
                epoch,
                end_epoch,
                end_offset,
            } => {
                w.u8(1);
                w.u32(*epoch);
                put_opt_u32(w, *end_epoch);
                w.u64(*end_offset);
            }
            ReplicaFetchResponse::Fenced { epoch } => {
                w.u8(2);
                w.u32(*epoch);
            }
        }
    }

    /// Decodes a whole body.
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let m = match r.u8("kind")? {
            0 => ReplicaFetchResponse::Records {
                epoch: r.u32("epoch")?,
                high_watermark: r.u64("high_watermark")?,
                records: r.bytes("records")?,
            },
            1 => ReplicaFetchResponse::Diverging {
                epoch: r.u32("epoch")?,
                end_epoch: get_opt_u32(r, "end_epoch")?,
                end_offset: r.u64("end_offset")?,
            },
            2 => ReplicaFetchResponse::Fenced {
                epoch: r.u32("epoch")?,
            },
            _ => return Err(DecodeError::Invalid("replica fetch answer kind")),
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn codes_round_trip_and_bodies_refuse_trailing_bytes() {
        for a in PeerApi::ALL {
            assert_eq!(PeerApi::from_code(a.code()), Some(*a));
        }
        assert_eq!(PeerApi::from_code(0), None);
        let h = Hello {
            node_id: 3,
            peer_addr: "127.0.0.1:7401".into(),
            client_addr: "127.0.0.1:7400".into(),
            controller: 0,
        };
        let mut w = Writer::new();
        h.encode(&mut w);
        let bytes = w.into_bytes().freeze();
        assert_eq!(Hello::decode(&mut Reader::new(bytes.clone())).unwrap(), h);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(Hello::decode(&mut Reader::new(Bytes::from(longer))).is_err());
        assert!(Hello::decode(&mut Reader::new(bytes.slice(..5))).is_err());
        let b = BrokerHeartbeat {
            node_id: 2,
            broker_epoch: 9,
        };
        let mut w = Writer::new();
        b.encode(&mut w);
        assert_eq!(
            BrokerHeartbeat::decode(&mut Reader::new(w.into_bytes().freeze())).unwrap(),
            b
        );
        let f = ReplicaFetchRequest {
            topic: "t".into(),
            partition: 1,
            replica: 2,
            broker_epoch: 7,
            leader_epoch: 3,
            fetch_offset: 100,
            last_fetched_epoch: None,
            durable_end: 90,
            max_bytes: 1 << 20,
            wait_ms: 500,
        };
        let mut w = Writer::new();
        f.encode(&mut w);
        assert_eq!(
            ReplicaFetchRequest::decode(&mut Reader::new(w.into_bytes().freeze())).unwrap(),
            f
        );
        for a in [
            ReplicaFetchResponse::Records {
                epoch: 3,
                high_watermark: 9,
                records: Bytes::from_static(b"xyz"),
            },
            ReplicaFetchResponse::Diverging {
                epoch: 3,
                end_epoch: Some(2),
                end_offset: 40,
            },
            ReplicaFetchResponse::Fenced { epoch: 4 },
        ] {
            let mut w = Writer::new();
            a.encode(&mut w);
            let bytes = w.into_bytes().freeze();
            assert_eq!(
                ReplicaFetchResponse::decode(&mut Reader::new(bytes.clone())).unwrap(),
                a
            );
            assert!(
                ReplicaFetchResponse::decode(&mut Reader::new(bytes.slice(..bytes.len() - 1)))
                    .is_err()
            );
        }
    }
}
