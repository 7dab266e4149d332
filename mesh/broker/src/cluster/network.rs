//! openraft's network over the peer protocol: each Raft RPC is one peer request whose body is
//! the openraft message in JSON, answered with `Result<response, RaftError>` in JSON.

use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use quiver_proto::ErrorCode;
use quiver_proto::peer::PeerApi;
use serde::de::DeserializeOwned;

use super::peer::{PeerClient, PeerError};
use super::raft::{RaftId, TypeConfig};

/// Makes a [`Network`] per target.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    /// The shared peer client.
    pub peers: Arc<PeerClient>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> Self::Network {
        Network {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// Raft RPCs to one peer.
#[derive(Debug)]
pub struct Network {
    peers: Arc<PeerClient>,
    target: RaftId,
    addr: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Remote(String);

impl Network {
    async fn rpc<
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &self,
        api: PeerApi,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<RaftId, BasicNode, RaftError<RaftId, E>>> {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (code, answer) = self
            .peers
            .call(&self.addr, api, &body, timeout)
            .await
            .map_err(|e| match e {
                PeerError::Timeout(_) => RPCError::Unreachable(Unreachable::new(&e)),
                PeerError::Transport { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            })?;
        if code != ErrorCode::None {
            let e = Remote(format!(
                "{}: {}",
                code.name(),
                String::from_utf8_lossy(&answer)
            ));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let r: Result<Resp, RaftError<RaftId, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        self.rpc(PeerApi::RaftAppend, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftId>,
        RPCError<RaftId, BasicNode, RaftError<RaftId, InstallSnapshotError>>,
    > {
        self.rpc(PeerApi::RaftSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        self.rpc(PeerApi::RaftVote, &rpc, option.hard_ttl()).await
    }
}
