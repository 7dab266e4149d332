//! Cluster mode: the controller's Raft group, the peer endpoint, and the node's part in both.
//!
//! - Every node runs the Raft group of [`raft`]: `--controller-voters` vote, every other
//!   registered broker is added as a learner, so each node applies the metadata log itself.
//!   A node started with `--seeds` alone joins a running cluster that way.
//! - Nodes find each other by SWIM gossip ([`gossip`], foca over QUIC datagrams): each
//!   announces itself to its seeds and to the peers its metadata names. Gossip is for
//!   discovery and for an advisory view of who is up (ClusterStatus); it never decides
//!   leadership or fences anyone.
//! - The node with the smallest voter id initialises the group once it has reached every
//!   voter (`Hello`) through the seeds or the members gossip found, and only if none of them
//!   knows a controller already.
//! - Every node registers as a broker (a new broker epoch per start) and heartbeats the active
//!   controller. The active controller keeps leases in memory and writes `Fence` when one runs
//!   out and `Unfence` when a fenced broker heartbeats again; a new active controller gives
//!   every broker a fresh lease first, so a controller failover fences nobody by itself.
//! - Metadata changes are written through the active controller (a write on another node is
//!   forwarded over the peer protocol) and answered once committed; the writer then waits
//!   until its own copy has applied them.

pub mod admin;
pub mod gossip;
pub mod network;
pub mod peer;
pub mod raft;
pub mod replicas;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use quiver_proto::ErrorCode;
use quiver_proto::codec::{Reader, Writer};
use quiver_proto::messages::{
    ClusterMember, ClusterStatusResponse, GossipStatus, MemberState, PartitionLeadership, RaftRole,
    Status,
};
use quiver_proto::peer::{BrokerHeartbeat, Hello, NotController, PeerApi};
use quiver_transport::{ClientTrust, Server, ServerIdentity, TransportSettings};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::network::NetworkFactory;
use self::peer::{PeerAnswer, PeerClient, PeerHandler};
use self::raft::{Applied, LogStore, RaftId, StateMachine, TypeConfig};
use self::state::{Command, Outcome};

/// How a node takes part in a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// This node.
    pub node_id: u32,
    /// Where clients reach this node.
    pub client_addr: String,
    /// Where peers reach this node (the advertised peer address).
    pub peer_addr: String,
    /// Peer addresses to start from.
    pub seeds: Vec<String>,
    /// The controller voters' node ids.
    pub voters: BTreeSet<u32>,
    /// Gossip timing.
    pub gossip: gossip::GossipSettings,
    /// How often a broker heartbeats the controller.
    pub heartbeat: Duration,
    /// A broker that has not heartbeated for this long is fenced.
    pub lease: Duration,
    /// Raft election timeout range, ms.
    pub election_timeout_ms: (u64, u64),
    /// Raft heartbeat interval, ms.
    pub raft_heartbeat_ms: u64,
}

/// A metadata write failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct WriteError {
    /// Protocol code.
    pub code: ErrorCode,
    /// Details.
    pub message: String,
}

#[derive(Serialize, Deserialize)]
struct WriteReply {
    outcome: Outcome,
    index: u64,
}

/// How long a metadata write may take, forwarding and retries included.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// One peer call of the controller protocol.
const PEER_CALL: Duration = Duration::from_secs(3);
/// Heartbeat intervals a new active controller gives the node that led the controller group
/// before it, instead of a full lease (see `controller_loop`).
const PREVIOUS_CONTROLLER_GRACE_HEARTBEATS: u32 = 3;
/// How many terms after the previous controller's a takeover still counts as its successor.
const PREVIOUS_CONTROLLER_TERMS: u64 = 3;

/// This node's part in the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    raft: Raft<TypeConfig>,
    applied: Arc<RwLock<Applied>>,
    changes: watch::Receiver<u64>,
    peers: Arc<PeerClient>,
    server: Arc<Server>,
    /// Membership by gossip: discovery and an advisory view of who is up.
    gossip: gossip::Gossip,
    /// Where the reconciler records the newest metadata index it acted on (see
    /// `admin::reconcile`).
    reconciled_path: std::path::PathBuf,
    /// Replicated partitions hosted here.
    replicas: replicas::Replicas,
    /// This incarnation's broker epoch, once registered.
    epoch: watch::Sender<Option<u64>>,
    /// Set when no heartbeat has reached the active controller for a lease: the controller
    /// has fenced this node (or will), so it leads nothing until it gets through again.
    isolated: watch::Sender<bool>,
    /// As active controller: last heartbeat per broker (its epoch, when).
    leases: std::sync::Mutex<HashMap<u32, (u64, Instant)>>,
    /// The term this node last started leading in.
    lead_term: std::sync::Mutex<Option<u64>>,
    /// The last controller hint from a `not_controller` answer.
    hint: std::sync::Mutex<Option<String>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.settings.node_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Opens the controller log in `dir`, binds the peer endpoint at `peer_listen` and starts
    /// taking part. `identity` serves on the peer endpoint and authenticates this node to its
    /// peers; `trust` holds the cluster CA.
    pub async fn start(
        mut settings: ClusterSettings,
        dir: &std::path::Path,
        peer_listen: std::net::SocketAddr,
        identity: &ServerIdentity,
        trust: &ClientTrust,
        transport: &TransportSettings,
    ) -> anyhow::Result<(Arc<Self>, std::net::SocketAddr)> {
        if settings.node_id == 0 {
            anyhow::bail!("node ids start at 1 in a cluster");
        }
        if settings.voters.is_empty() && settings.seeds.is_empty() {
            anyhow::bail!(
                "a cluster needs controller voters (--controller-voters 1,2,3), or seeds to join one that runs (--seeds)"
            );
        }
        // Without voters the node joins a running cluster through its seeds, as a broker
        // (a learner of the metadata log) that never votes.
        if !settings.voters.is_empty()
            && (settings.voters.len().is_multiple_of(2) || settings.voters.len() > 7)
        {
            anyhow::bail!(
                "{} controller voters: use 1, 3 or 5 (an even count tolerates no more failures than one fewer)",
                settings.voters.len()
            );
        }
        let store = LogStore::open(&dir.join("controller"))?;
        let sm = StateMachine::open(&store)?;
        let applied = sm.applied();
        let changes = sm.watch();
        let server = Arc::new(Server::bind_peer(peer_listen, identity, trust, transport)?);
        let bound = server.local_addr()?;
        if settings.peer_addr.is_empty() {
            settings.peer_addr = bound.to_string();
        }
        let peers = Arc::new(PeerClient::new(server.clone()));
        // A new incarnation per start (milliseconds since the epoch), so a restarted node
        // rejoins gossip at once rather than after being declared down.
        let me = gossip::Member {
            node_id: settings.node_id,
            peer_addr: settings.peer_addr.clone(),
            client_addr: settings.client_addr.clone(),
            incarnation: u64::try_from(crate::now_ms()).unwrap_or(0),
        };
        let gossip = gossip::Gossip::start(me, peers.clone(), &settings.gossip)
            .map_err(|e| anyhow::anyhow!("gossip: {e}"))?;
        let config = openraft::Config {
            cluster_name: "quiver".into(),
            heartbeat_interval: settings.raft_heartbeat_ms,
            election_timeout_min: settings.election_timeout_ms.0,
            election_timeout_max: settings.election_timeout_ms.1,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
            max_in_snapshot_log_to_keep: 1_000,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(
            u64::from(settings.node_id),
            Arc::new(config),
            NetworkFactory {
                peers: peers.clone(),
            },
            store,
            sm,
        )
        .await?;
        let cluster = Arc::new(Self {
            settings,
            raft,
            applied,
            changes,
            peers: peers.clone(),
            server: server.clone(),
            gossip,
            reconciled_path: dir.join("reconciled-index"),
            replicas: replicas::Replicas::default(),
            epoch: watch::channel(None).0,
            isolated: watch::channel(false).0,
            leases: Default::default(),
            lead_term: Default::default(),
            hint: Default::default(),
            tasks: Default::default(),
        });
        let tasks = vec![
            tokio::spawn(peer::serve_with_datagrams(
                server,
                cluster.clone(),
                peers.datagram_sink(),
            )),
            tokio::spawn(cluster.clone().join_gossip()),
            tokio::spawn(cluster.clone().bootstrap()),
            tokio::spawn(cluster.clone().broker_loop()),
            tokio::spawn(cluster.clone().controller_loop()),
        ];
        *cluster.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        tracing::info!(node = cluster.settings.node_id, bound = %bound, advertised = %cluster.settings.peer_addr, "cluster member started");
        Ok((cluster, bound))
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.settings.node_id
    }

    /// The node's copy of the metadata.
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.applied.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Moves at every applied metadata entry.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// This incarnation's broker epoch, once registered.
    pub fn broker_epoch(&self) -> Option<u64> {
        *self.epoch.borrow()
    }

    /// Whether this node has lost the controller for longer than a lease (it then leads
    /// nothing, see [`Self::isolation`]).
    pub fn is_isolated(&self) -> bool {
        *self.isolated.borrow()
    }

    /// Moves when this node loses or regains the controller.
    pub fn isolation(&self) -> watch::Receiver<bool> {
        self.isolated.subscribe()
    }

    /// Waits until this node is registered (bounded).
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut rx = self.epoch.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn me(&self) -> RaftId {
        u64::from(self.settings.node_id)
    }

    fn leader(&self) -> Option<RaftId> {
        self.raft.metrics().borrow().current_leader
    }

    fn peer_addr_of(&self, id: RaftId) -> Option<String> {
        self.read(|a| {
            a.membership
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
                .or_else(|| {
                    u32::try_from(id)
                        .ok()
                        .and_then(|i| a.metadata.peer_addrs.get(&i).cloned())
                })
        })
    }

    fn not_controller(&self) -> PeerAnswer {
        let leader = self.leader().filter(|l| *l != self.me());
        let body = NotController {
            message: format!(
                "node {} is not the active controller",
                self.settings.node_id
            ),
            leader: leader.and_then(|l| u32::try_from(l).ok()).unwrap_or(0),
            leader_addr: leader
                .and_then(|l| self.peer_addr_of(l))
                .unwrap_or_default(),
        };
        let mut w = Writer::new();
        body.encode(&mut w);
        PeerAnswer {
            code: ErrorCode::NotController,
            body: w.into_bytes().freeze(),
        }
    }

    /// Commits `command` through the active controller (forwarding it when that is another
    /// node) and waits until this node's copy has applied it. Retries across controller
    /// changes within a deadline.
    pub async fn write(&self, command: Command) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut backoff = Duration::from_millis(50);
        let mut seed = 0usize;
        let mut last_error = String::from("no controller known");
        while Instant::now() < deadline {
            let attempt = match self.leader() {
                Some(l) if l == self.me() => match self.leader_write(command.clone()).await {
                    Ok(r) => Ok(r),
                    Err(None) => Err("leadership moved".to_string()),
                    Err(Some(e)) => return Err(e),
                },
                known => {
                    let addr = known
                        .and_then(|l| self.peer_addr_of(l))
                        .or_else(|| self.hint.lock().unwrap_or_else(|p| p.into_inner()).take())
                        .or_else(|| {
                            let s = &self.settings.seeds;
                            seed += 1;
                            (!s.is_empty()).then(|| s[seed % s.len()].clone())
                        });
                    match addr {
                        Some(addr) => self.forward_write(&addr, &command).await,
                        None => Err("no controller known and no seeds".to_string()),
                    }
                }
            };
            match attempt {
                Ok(reply) => {
                    self.wait_applied(reply.index, deadline).await;
                    return Ok(reply.outcome);
                }
                Err(e) => last_error = e,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        Err(WriteError {
            code: ErrorCode::RequestTimedOut,
            message: format!("the metadata change was not committed in time: {last_error}"),
        })
    }

    /// `Err(None)`: not (or no longer) the leader, retry; `Err(Some)`: fatal.
    async fn leader_write(&self, command: Command) -> Result<WriteReply, Option<WriteError>> {
        let register = match &command {
            Command::Register { node, .. } => Some(*node),
            _ => None,
        };
        match self.raft.client_write(command).await {
            Ok(r) => {
                if let (Some(node), Outcome::Registered { epoch }) = (register, &r.data) {
                    // The lease starts at registration, not at the first heartbeat.
                    self.leases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node, (*epoch, Instant::now()));
                }
                Ok(WriteReply {
                    outcome: r.data,
                    index: r.log_id.index,
                })
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
            Err(e) => Err(Some(WriteError {
                code: ErrorCode::Unknown,
                message: format!("controller write failed: {e}"),
            })),
        }
    }

    async fn forward_write(&self, addr: &str, command: &Command) -> Result<WriteReply, String> {
        let body = serde_json::to_vec(command).map_err(|e| e.to_string())?;
        let (code, answer) = self
            .peers
            .call(addr, PeerApi::ControllerWrite, &body, PEER_CALL)
            .await
            .map_err(|e| e.to_string())?;
        match code {
            ErrorCode::None => serde_json::from_slice(&answer).map_err(|e| e.to_string()),
            ErrorCode::NotController => {
                if let Ok(nc) = NotController::decode(&mut Reader::new(answer))
                    && !nc.leader_addr.is_empty()
                {
                    *self.hint.lock().unwrap_or_else(|p| p.into_inner()) = Some(nc.leader_addr);
                }
                Err(format!("{addr} is not the controller"))
            }
            other => Err(format!("{addr} answered {}", other.name())),
        }
    }

    /// Waits (until `deadline`) for this node's copy to apply entry `index`.
    pub async fn wait_applied(&self, index: u64, deadline: Instant) {
        let mut rx = self.changes.clone();
        let wait = rx.wait_for(|applied| *applied >= index);
        let _ =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), wait).await;
    }

    /// Initialises the controller group, on the smallest voter only, once every voter is
    /// reachable and none knows a controller already.
    async fn bootstrap(self: Arc<Self>) {
        let me = self.settings.node_id;
        if self.settings.voters.first() != Some(&me) {
            return;
        }
        loop {
            match self.raft.is_initialized().await {
                Ok(false) => {}
                _ => return,
            }
            let mut known = BTreeMap::from([(me, self.settings.peer_addr.clone())]);
            let mut led_elsewhere = false;
            // The seeds, and the voters gossip has found alive (a voter need not be a seed).
            let mut targets = self.settings.seeds.clone();
            for m in self.gossip.members() {
                if m.state == gossip::GossipState::Alive
                    && m.node_id != me
                    && self.settings.voters.contains(&m.node_id)
                    && !targets.contains(&m.peer_addr)
                {
                    targets.push(m.peer_addr);
                }
            }
            for target in &targets {
                if let Ok(h) = self.hello(target).await {
                    led_elsewhere |= h.controller != 0;
                    if self.settings.voters.contains(&h.node_id) {
                        known.insert(h.node_id, h.peer_addr);
                    }
                }
            }
            if led_elsewhere {
                tracing::info!("a controller exists already; joining it");
                return;
            }
            if self.settings.voters.iter().all(|v| known.contains_key(v)) {
                match self.raft.initialize(raft::nodes(&known)).await {
                    Ok(()) => tracing::info!(voters = ?known, "controller group initialised"),
                    Err(e) => tracing::info!(error = %e, "controller group not initialised here"),
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Joins gossip: announces this node to every seed (once a `Hello` names it) and to
    /// every peer the metadata knows; again every few seconds while gossip has found no other
    /// live member.
    async fn join_gossip(self: Arc<Self>) {
        let me = self.settings.node_id;
        loop {
            let mut seeds: Vec<gossip::Member> = Vec::new();
            for seed in &self.settings.seeds {
                if let Ok(h) = self.hello(seed).await
                    && h.node_id != me
                {
                    seeds.push(gossip::Member {
                        node_id: h.node_id,
                        peer_addr: h.peer_addr,
                        client_addr: h.client_addr,
                        incarnation: 0,
                    });
                }
            }
            let from_metadata: Vec<gossip::Member> = self.read(|a| {
                a.metadata
                    .peer_addrs
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .map(|(id, peer_addr)| gossip::Member {
                        node_id: *id,
                        peer_addr: peer_addr.clone(),
                        client_addr: a
                            .metadata
                            .control
                            .brokers()
                            .get(id)
                            .map(|b| b.addr.clone())
                            .unwrap_or_default(),
                        incarnation: 0,
                    })
                    .collect()
            });
            for m in seeds.into_iter().chain(from_metadata) {
                if self.gossip.announce(m).await.is_err() {
                    return;
                }
            }
            let mut members = self.gossip.subscribe();
            loop {
                let others_alive = members
                    .borrow_and_update()
                    .iter()
                    .any(|m| m.node_id != me && m.state == gossip::GossipState::Alive);
                if !others_alive {
                    break;
                }
                if members.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// The file the reconciler keeps its newest acted-on metadata index in.
    pub fn reconciled_path(&self) -> &std::path::Path {
        &self.reconciled_path
    }

    /// What gossip says of each member this node's gossip knows.
    pub fn gossip_members(&self) -> Vec<gossip::GossipView> {
        self.gossip.members()
    }

    async fn hello(&self, addr: &str) -> Result<Hello, String> {
        let mut w = Writer::new();
        self.own_hello().encode(&mut w);
        let (code, body) = self
            .peers
            .call(addr, PeerApi::Hello, &w.into_bytes(), PEER_CALL)
            .await
            .map_err(|e| e.to_string())?;
        if code != ErrorCode::None {
            return Err(code.name().to_string());
        }
        Hello::decode(&mut Reader::new(body)).map_err(|e| e.to_string())
    }

    fn own_hello(&self) -> Hello {
        Hello {
            node_id: self.settings.node_id,
            peer_addr: self.settings.peer_addr.clone(),
            client_addr: self.settings.client_addr.clone(),
            controller: self
                .leader()
                .and_then(|l| u32::try_from(l).ok())
                .unwrap_or(0),
        }
    }

    /// Registers this incarnation, then heartbeats the active controller; registers again
    /// when the controller says the epoch was replaced.
    async fn broker_loop(self: Arc<Self>) {
        let mut last_ok = Instant::now();
        let mut controller = None;
        // The active controller fences a broker a lease after it last heard from it; a new
        // controller first gives every broker a whole lease. Past that (and the longest
        // election, so a controller failover alone does not trip it), this node has been
        // fenced and other leaders elected: it stops leading. Until then only acks=all
        // writes are safe, as everywhere (acks=1 writes the old leader takes are lost).
        let threshold =
            self.settings.lease + Duration::from_millis(self.settings.election_timeout_ms.1 * 2);
        loop {
            let ok = self.broker_round().await;
            let now_controller = {
                let m = self.raft.metrics();
                let m = m.borrow();
                m.current_leader.map(|l| (l, m.current_term))
            };
            if ok || (now_controller.is_some() && now_controller != controller) {
                last_ok = Instant::now();
            }
            controller = now_controller;
            let isolated = !ok && last_ok.elapsed() > threshold;
            if self.isolated.send_if_modified(|i| {
                let changed = *i != isolated;
                *i = isolated;
                changed
            }) {
                if isolated {
                    tracing::warn!(
                        "no heartbeat reached the controller for a lease; leading nothing until one does"
                    );
                } else {
                    tracing::info!("the controller is reachable again");
                }
            }
            tokio::time::sleep(self.settings.heartbeat).await;
        }
    }

    /// One registration or heartbeat; whether the controller answered it.
    async fn broker_round(&self) -> bool {
        {
            match self.broker_epoch() {
                None => {
                    let cmd = Command::Register {
                        node: self.settings.node_id,
                        addr: self.settings.client_addr.clone(),
                        peer_addr: self.settings.peer_addr.clone(),
                    };
                    match self.write(cmd).await {
                        Ok(Outcome::Registered { epoch }) => {
                            tracing::info!(epoch, "registered with the controller");
                            self.epoch.send_replace(Some(epoch));
                            true
                        }
                        Ok(o) => {
                            tracing::warn!(outcome = ?o, "registration refused");
                            false
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "registration failed; retrying");
                            false
                        }
                    }
                }
                Some(epoch) => {
                    let hb = BrokerHeartbeat {
                        node_id: self.settings.node_id,
                        broker_epoch: epoch,
                    };
                    match self.send_heartbeat(hb).await {
                        ErrorCode::None => true,
                        ErrorCode::StaleBrokerEpoch => {
                            tracing::warn!(epoch, "broker epoch replaced; registering again");
                            self.epoch.send_replace(None);
                            // The controller answered: it knows of this node.
                            true
                        }
                        _ => false,
                    }
                }
            }
        }
    }

    async fn send_heartbeat(&self, hb: BrokerHeartbeat) -> ErrorCode {
        match self.leader() {
            Some(l) if l == self.me() => {
                // A controller cut off from its quorum still believes it leads: confirm with
                // a quorum first, or this node would never notice it is isolated.
                let confirmed =
                    tokio::time::timeout(self.settings.heartbeat, self.raft.ensure_linearizable())
                        .await;
                if !matches!(confirmed, Ok(Ok(_))) {
                    return ErrorCode::NotController;
                }
                self.on_heartbeat(hb).await.code
            }
            Some(l) => match self.peer_addr_of(l) {
                Some(addr) => {
                    let mut w = Writer::new();
                    hb.encode(&mut w);
                    match self
                        .peers
                        .call(&addr, PeerApi::BrokerHeartbeat, &w.into_bytes(), PEER_CALL)
                        .await
                    {
                        Ok((code, _)) => code,
                        Err(_) => ErrorCode::RequestTimedOut,
                    }
                }
                None => ErrorCode::NotController,
            },
            None => ErrorCode::NotController,
        }
    }

    /// The active controller's side of a heartbeat.
    async fn on_heartbeat(&self, hb: BrokerHeartbeat) -> PeerAnswer {
        if self.leader() != Some(self.me()) {
            return self.not_controller();
        }
        let state = self.read(|a| {
            a.metadata
                .control
                .brokers()
                .get(&hb.node_id)
                .map(|b| (b.epoch, b.fenced))
        });
        match state {
            Some((epoch, fenced)) if epoch == hb.broker_epoch => {
                self.leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hb.node_id, (epoch, Instant::now()));
                if fenced {
                    let cmd = Command::Unfence {
                        node: hb.node_id,
                        epoch,
                    };
                    if let Err(Some(e)) = self.leader_write(cmd).await {
                        tracing::warn!(error = %e, node = hb.node_id, "unfencing failed");
                    }
                }
                PeerAnswer::ok(Bytes::new())
            }
            _ => PeerAnswer::err(
                ErrorCode::StaleBrokerEpoch,
                &format!(
                    "broker {} epoch {} is not the registered incarnation",
                    hb.node_id, hb.broker_epoch
                ),
            ),
        }
    }

    /// As active controller: fences brokers whose lease ran out and adds registered brokers
    /// to the group as learners.
    async fn controller_loop(self: Arc<Self>) {
        let tick = (self.settings.heartbeat / 2).max(Duration::from_millis(20));
        // The last other node seen leading the group, and in which term: when this node
        // takes over in the next terms, that one has just been silent for an election
        // timeout.
        let mut previous: Option<(RaftId, u64)> = None;
        loop {
            tokio::time::sleep(tick).await;
            let (leader, term, state) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.current_term, m.state)
            };
            if leader != Some(self.me()) || state != ServerState::Leader {
                *self.lead_term.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if let Some(l) = leader
                    && l != self.me()
                {
                    previous = Some((l, term));
                }
                continue;
            }
            let (brokers, members, peer_addrs) = self.read(|a| {
                let brokers: Vec<(u32, u64, bool)> = a
                    .metadata
                    .control
                    .brokers()
                    .iter()
                    .map(|(id, b)| (*id, b.epoch, b.fenced))
                    .collect();
                let members: BTreeSet<RaftId> = a
                    .membership
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect();
                (brokers, members, a.metadata.peer_addrs.clone())
            });
            {
                let mut lead = self.lead_term.lock().unwrap_or_else(|p| p.into_inner());
                if *lead != Some(term) {
                    // A new active controller: everyone gets a full lease from now (they
                    // heartbeated the old controller), except the old controller itself. A
                    // majority has just gone an election timeout without hearing from it, so
                    // it gets `PREVIOUS_CONTROLLER_GRACE_HEARTBEATS` heartbeats to show it is
                    // alive. If it is, its next heartbeat unfences it.
                    *lead = Some(term);
                    let now = Instant::now();
                    let grace = self.settings.heartbeat * PREVIOUS_CONTROLLER_GRACE_HEARTBEATS;
                    let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
                    leases.clear();
                    // Only a leader seen in one of the last few terms (a failed election or
                    // two may come between); never one from long ago.
                    let silent = previous
                        .take()
                        .filter(|(_, t)| term <= t + PREVIOUS_CONTROLLER_TERMS)
                        .map(|(l, _)| l);
                    for (id, epoch, _) in &brokers {
                        let start = if silent == Some(u64::from(*id)) {
                            now.checked_sub(self.settings.lease.saturating_sub(grace))
                                .unwrap_or(now)
                        } else {
                            now
                        };
                        leases.insert(*id, (*epoch, start));
                    }
                    tracing::info!(term, previous = ?silent, "active controller");
                }
            }
            let expired: Vec<(u32, u64)> = {
                let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
                brokers
                    .iter()
                    .filter(|(_, _, fenced)| !fenced)
                    .filter(|(id, epoch, _)| match leases.get(id) {
                        Some((e, at)) => e != epoch || at.elapsed() > self.settings.lease,
                        None => true,
                    })
                    .map(|(id, epoch, _)| (*id, *epoch))
                    .collect()
            };
            for (node, epoch) in expired {
                tracing::warn!(node, epoch, "broker lease expired; fencing");
                let _ = self.leader_write(Command::Fence { node, epoch }).await;
            }
            for (id, addr) in peer_addrs {
                let rid = u64::from(id);
                if !members.contains(&rid) {
                    match self
                        .raft
                        .add_learner(rid, BasicNode::new(&addr), false)
                        .await
                    {
                        Ok(_) => tracing::info!(node = id, %addr, "added as a metadata learner"),
                        Err(e) => tracing::debug!(node = id, error = %e, "adding learner failed"),
                    }
                }
            }
        }
    }

    /// Where peers reach this node.
    pub fn peer_addr(&self) -> &str {
        &self.settings.peer_addr
    }

    /// Controlled shutdown: leadership of this node's partitions moves away now (bounded).
    /// The node keeps taking part until [`stop`](Self::stop).
    pub async fn controlled_shutdown(&self) {
        if let Some(epoch) = self.broker_epoch() {
            let cmd = Command::Shutdown {
                node: self.settings.node_id,
                epoch,
            };
            match tokio::time::timeout(Duration::from_secs(5), self.write(cmd)).await {
                Ok(Ok(_)) => tracing::info!("controlled shutdown: leadership moved away"),
                Ok(Err(e)) => tracing::warn!(error = %e, "controlled shutdown not committed"),
                Err(_) => tracing::warn!("controlled shutdown timed out"),
            }
        }
    }

    /// The replicated partitions hosted here.
    pub fn replicas(&self) -> &replicas::Replicas {
        &self.replicas
    }

    /// Stops the Raft group, the peer endpoint and this node's tasks.
    pub async fn stop(&self) {
        self.replicas.stop();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        // Tell gossip this node leaves (the others see it down at once, not after probes).
        if let Err(e) = self.gossip.leave().await {
            tracing::debug!(error = %e, "gossip leave");
        }
        self.peers.shutdown().await;
        self.server.shutdown(0, "node shutting down").await;
    }

    /// The ClusterStatus answer from this node's copy.
    pub fn status(&self) -> ClusterStatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let gossip: BTreeMap<u32, gossip::GossipView> = self
            .gossip
            .members()
            .into_iter()
            .map(|m| (m.node_id, m))
            .collect();
        self.read(|a| {
            let membership = a.membership.membership();
            let voters: BTreeSet<RaftId> = membership.voter_ids().collect();
            let mut ids: BTreeSet<u32> = a.metadata.control.brokers().keys().copied().collect();
            ids.extend(
                membership
                    .nodes()
                    .filter_map(|(id, _)| u32::try_from(*id).ok()),
            );
            // Members only gossip knows of (up, not yet in the group or registered).
            ids.extend(gossip.keys().copied());
            let members = ids
                .into_iter()
                .map(|id| {
                    let b = a.metadata.control.brokers().get(&id);
                    let rid = u64::from(id);
                    let g = gossip.get(&id);
                    ClusterMember {
                        node_id: id,
                        addr: b
                            .map(|b| b.addr.clone())
                            .or_else(|| g.map(|g| g.client_addr.clone()))
                            .unwrap_or_default(),
                        peer_addr: a
                            .metadata
                            .peer_addrs
                            .get(&id)
                            .cloned()
                            .or_else(|| membership.get_node(&rid).map(|n| n.addr.clone()))
                            .or_else(|| g.map(|g| g.peer_addr.clone()))
                            .unwrap_or_default(),
                        role: if voters.contains(&rid) {
                            RaftRole::Voter
                        } else if membership.get_node(&rid).is_some() {
                            RaftRole::Learner
                        } else {
                            RaftRole::None
                        },
                        state: match b {
                            None => MemberState::Unregistered,
                            Some(b) if b.fenced => MemberState::Fenced,
                            Some(_) => MemberState::Live,
                        },
                        broker_epoch: b.map_or(0, |b| b.epoch),
                        gossip: match g.map(|g| g.state) {
                            None => GossipStatus::Unknown,
                            Some(gossip::GossipState::Alive) => GossipStatus::Alive,
                            Some(gossip::GossipState::Suspect) => GossipStatus::Suspect,
                            Some(gossip::GossipState::Down) => GossipStatus::Down,
                        },
                    }
                })
                .collect();
            let partitions = a
                .metadata
                .control
                .topics()
                .flat_map(|(name, parts)| {
                    parts
                        .iter()
                        .enumerate()
                        .map(move |(i, p)| PartitionLeadership {
                            topic: name.to_string(),
                            partition: i as u32,
                            leader: p.state().leader.unwrap_or(0),
                            leader_epoch: p.state().epoch,
                            replicas: p.replicas().to_vec(),
                            isr: p.state().isr.iter().copied().collect(),
                            adding: p
                                .reassignment()
                                .map(|r| r.adding.clone())
                                .unwrap_or_default(),
                            removing: p
                                .reassignment()
                                .map(|r| r.removing.clone())
                                .unwrap_or_default(),
                        })
                })
                .collect();
            ClusterStatusResponse {
                status: Status::ok(),
                node_id: self.settings.node_id,
                controller: m
                    .current_leader
                    .and_then(|l| u32::try_from(l).ok())
                    .unwrap_or(0),
                term: m.current_term,
                applied: a.last_applied.map_or(0, |l| l.index),
                members,
                partitions,
            }
        })
    }
}

fn json<T: Serialize>(v: &T) -> PeerAnswer {
    match serde_json::to_vec(v) {
        Ok(b) => PeerAnswer::ok(b),
        Err(e) => PeerAnswer::err(ErrorCode::Unknown, &e.to_string()),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, PeerAnswer> {
    serde_json::from_slice(body)
        .map_err(|e| PeerAnswer::err(ErrorCode::InvalidRequest, &format!("bad body: {e}")))
}

impl PeerHandler for Cluster {
    async fn handle(self: Arc<Self>, api: PeerApi, body: Bytes) -> PeerAnswer {
        let r: Result<PeerAnswer, PeerAnswer> = async {
            Ok(match api {
                PeerApi::Hello => {
                    Hello::decode(&mut Reader::new(body))
                        .map_err(|e| PeerAnswer::err(ErrorCode::InvalidRequest, &e.to_string()))?;
                    let mut w = Writer::new();
                    self.own_hello().encode(&mut w);
                    PeerAnswer::ok(w.into_bytes().freeze())
                }
                PeerApi::RaftVote => json(&self.raft.vote(parse(&body)?).await),
                PeerApi::RaftAppend => json(&self.raft.append_entries(parse(&body)?).await),
                PeerApi::RaftSnapshot => json(&self.raft.install_snapshot(parse(&body)?).await),
                PeerApi::ControllerWrite => {
                    let command: Command = parse(&body)?;
                    match self.leader_write(command).await {
                        Ok(reply) => json(&reply),
                        Err(None) => self.not_controller(),
                        Err(Some(e)) => PeerAnswer::err(e.code, &e.message),
                    }
                }
                PeerApi::ReplicaFetch => self.replicas.on_fetch(&self, body).await,
                PeerApi::BrokerHeartbeat => {
                    let hb = BrokerHeartbeat::decode(&mut Reader::new(body))
                        .map_err(|e| PeerAnswer::err(ErrorCode::InvalidRequest, &e.to_string()))?;
                    self.on_heartbeat(hb).await
                }
            })
        }
        .await;
        r.unwrap_or_else(|e| e)
    }
}
