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
    }
}
