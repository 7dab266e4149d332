//! Cluster membership by SWIM gossip ([`foca`]) over QUIC datagrams of the peer endpoint.
//!
//! Gossip is for discovery and advisory failure detection: it tells an operator, and the node's
//! own connection logic, which peers exist and which look dead.
//!
//! Architecture Invariant: gossip never decides leadership, placement or ISR membership. Those
//! are the controller's (Raft) and a broker's lease; a member gossip calls `Down` may still be
//! a partition leader, and one it calls `Alive` may be fenced.
//!
//! Layers, after the sans-IO habit:
//! - `Membership` is the core: foca plus a timer queue, fed `handle_*(input, now)` and
//!   drained with `poll_transmit()` / `poll_timeout()`. It does no I/O and reads no clock.
//! - [`Gossip`] is the async driver: one task owns the core and loops over datagrams (from the
//!   [`DatagramSink`](super::peer::DatagramSink) of the [`PeerClient`]), commands and the next
//!   deadline. foca's `Runtime::send_to` is synchronous, so outgoing packets go to a small
//!   `Outbox`: a bounded queue and a sender task per peer, so that a dead peer's handshake
//!   (up to the connect timeout) never holds up packets to live ones.
//!
//! Wire format: foca's framing with postcard-encoded [`Member`]s, at most
//! [`GOSSIP_PACKET_BYTES_MAX`] bytes per datagram. Only holders of a cluster certificate can
//! reach the peer endpoint at all (mTLS); still, every datagram is treated as hostile input:
//! undecodable ones are counted, logged (rate-limited) and dropped.

use std::collections::{BTreeMap, HashMap};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, State, Timer,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::peer::PeerClient;

/// The largest gossip packet. A QUIC datagram must fit one packet: at the 1200-byte minimum
/// path MTU quinn leaves 1200 − 21 (flags, packet number, AEAD tag) − the peer's connection
/// id (up to 20) − 9 (frame header) = 1150 bytes. Corrosion uses 1178, which assumes shorter
/// connection ids than quinn's.
pub const GOSSIP_PACKET_BYTES_MAX: usize = 1150;
/// Datagrams waiting for the gossip task; beyond it they are dropped (gossip tolerates loss).
const INCOMING_QUEUE_LEN: usize = 1024;
/// Commands waiting for the gossip task.
const COMMAND_QUEUE_LEN: usize = 16;
/// Packets queued towards one peer; beyond it they are dropped.
const PEER_QUEUE_LEN: usize = 32;
/// A peer's sender task ends after this long without packets (it is restarted on demand).
const PEER_SENDER_IDLE: Duration = Duration::from_secs(60);
/// Peers with a sender task at once: bounds what bogus gossip about made-up members can cost.
const PEER_SENDERS_MAX: usize = 1024;
/// Seeds remembered for re-announcing.
const SEEDS_MAX: usize = 64;
/// Rejected datagrams and failed timers are logged at warn at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How long [`Gossip::leave`] waits for the goodbye packets to reach quinn.
const LEAVE_FLUSH_WAIT: Duration = Duration::from_secs(1);

/// A node as gossip knows it: foca's identity type. Small on purpose (about 60 bytes
/// postcard-encoded), so that a datagram carries well over a dozen of them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node id; foca's `Identity::Addr`, so one node id is one member.
    pub node_id: u32,
    /// Where peers reach the node (its advertised peer address).
    pub peer_addr: String,
    /// Where clients reach the node.
    pub client_addr: String,
    /// Generation of this identity: the higher one wins when two identities claim the same
    /// node id, and [`renew`](foca::Identity::renew) bumps it when the cluster declared this
    /// one down. Start a process with a value that grows across restarts (a broker epoch, the
    /// start time in ms) so it wins over its previous self at once. Not foca's own `u16`
    /// incarnation, which refutes suspicion within one identity.
    pub incarnation: u64,
}

impl foca::Identity for Member {
    type Addr = u32;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            incarnation: self.incarnation.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> u32 {
        self.node_id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // The addresses break ties so that every node picks the same winner when two
        // processes were (mis)configured with one node id and one incarnation.
        (self.incarnation, &self.peer_addr, &self.client_addr)
            > (
                adversary.incarnation,
                &adversary.peer_addr,
                &adversary.client_addr,
            )
    }
}

/// How a member looks from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GossipState {
    /// Answering probes.
    Alive,
    /// A probe failed; the member has `suspect_to_down_after` to refute it.
    Suspect,
    /// Declared down by the cluster (or it left); kept until foca forgets it.
    Down,
}

impl From<State> for GossipState {
    fn from(state: State) -> Self {
        match state {
            State::Alive => Self::Alive,
            State::Suspect => Self::Suspect,
            State::Down => Self::Down,
        }
    }
}

/// One member in a [`Gossip::members`] snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GossipView {
    /// The node id.
    pub node_id: u32,
    /// Where peers reach it.
    pub peer_addr: String,
    /// Where clients reach it.
    pub client_addr: String,
    /// Its identity's generation ([`Member::incarnation`]).
    pub incarnation: u64,
    /// Alive, suspect or down.
    pub state: GossipState,
}

impl GossipView {
    fn new(member: &Member, state: GossipState) -> Self {
        Self {
            node_id: member.node_id,
            peer_addr: member.peer_addr.clone(),
            client_addr: member.client_addr.clone(),
            incarnation: member.incarnation,
            state,
        }
    }
}

/// Timings and limits of gossip. The defaults are foca's LAN preset (memberlist's
/// `DefaultLANConfig`) for a small cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipSettings {
    /// Expected cluster size: sets how often an update is retransmitted.
    pub expected_members: u32,
    /// How often a random member is probed; a member that does not answer within one
    /// period (directly or through others) becomes suspect.
    pub probe_period: Duration,
    /// How long a direct probe waits before asking other members to probe (less than
    /// `probe_period`, preferably under half of it).
    pub probe_rtt: Duration,
    /// How long a suspect member has to refute the suspicion before it is declared down.
    pub suspect_to_down_after: Duration,
    /// Updates are also pushed to a few random members this often, besides probes.
    pub gossip_interval: Duration,
    /// While no other member is alive, the seeds given to [`Gossip::announce`] are announced
    /// to again this often (a seed may have been down, or the node partitioned).
    pub announce_interval: Duration,
    /// A down member is forgotten (and may rejoin with the same identity) after this long.
    pub remove_down_after: Duration,
    /// The largest packet sent or accepted; at most [`GOSSIP_PACKET_BYTES_MAX`] unless every
    /// path is known to carry larger QUIC packets.
    pub max_packet_bytes: usize,
}

impl Default for GossipSettings {
    fn default() -> Self {
        Self {
            expected_members: 3,
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            suspect_to_down_after: Duration::from_secs(4),
            gossip_interval: Duration::from_millis(200),
            announce_interval: Duration::from_secs(2),
            remove_down_after: Duration::from_secs(24 * 60 * 60),
            max_packet_bytes: GOSSIP_PACKET_BYTES_MAX,
        }
    }
}

impl GossipSettings {
    /// foca's configuration, or why these settings make none.
    fn foca_config(&self) -> Result<foca::Config, GossipError> {
        let invalid = |reason: &str| Err(GossipError::InvalidSettings(reason.to_owned()));
        if self.probe_rtt.is_zero() || self.probe_rtt >= self.probe_period {
            return invalid("probe_rtt must be above zero and below probe_period");
        }
        if self.suspect_to_down_after.is_zero() {
            return invalid("suspect_to_down_after must be above zero");
        }
        if self.gossip_interval.is_zero() || self.announce_interval.is_zero() {
            return invalid("gossip_interval and announce_interval must be above zero");
        }
        // Room for a header with two identities and a few members; no more than UDP carries.
        let max_packet_size = NonZeroUsize::new(self.max_packet_bytes)
            .filter(|n| (512..=65_527).contains(&n.get()))
            .ok_or_else(|| {
                GossipError::InvalidSettings("max_packet_bytes must be within 512..=65527".into())
            })?;
        let mut config = foca::Config::new_lan(
            NonZeroU32::new(self.expected_members).unwrap_or(NonZeroU32::MIN),
        );
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_to_down_after;
        config.remove_down_after = Some(self.remove_down_after);
        config.max_packet_size = max_packet_size;
        // The LAN preset gossips to 3 members each time; only the interval is ours.
        if let Some(periodic) = config.periodic_gossip.as_mut() {
            periodic.frequency = self.gossip_interval;
        }
        Ok(config)
    }
}

/// Gossip could not start or is no longer running.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The settings are out of range.
    #[error("invalid gossip settings: {0}")]
    InvalidSettings(String),
    /// Another gossip instance already receives this peer client's datagrams (a sink is
    /// attached once per `PeerClient`, even after that instance stopped).
    #[error("the peer client's datagrams already go to another gossip instance")]
    SinkTaken,
    /// The gossip task has stopped (after [`Gossip::leave`]).
    #[error("gossip has stopped")]
    Stopped,
}

/// Logs a recurring problem at debug every time and at warn at most every
/// [`WARN_INTERVAL`], with the number of occurrences in between.
#[derive(Debug, Default)]
struct Throttled {
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn record(&mut self, what: &'static str, error: &foca::Error, now: Instant) {
        tracing::debug!(%error, "{what}");
        let due = self
            .last_warn
            .is_none_or(|at| now.saturating_duration_since(at) >= WARN_INTERVAL);
        if due {
            tracing::warn!(%error, suppressed = self.suppressed, "{what}");
            self.last_warn = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

type SwimCore = Foca<Member, PostcardCodec, SmallRng, NoCustomBroadcast>;

/// The sans-IO membership core: foca, the timers it asked for, and the seeds to re-announce
/// to. Time only enters through the `now` arguments.
struct Membership {
    foca: SwimCore,
    runtime: AccumulatingRuntime<Member>,
    /// Deadlines of foca's timers; the sequence number keeps equal deadlines in submission
    /// order.
    timers: BTreeMap<(Instant, u64), Timer<Member>>,
    timer_seq: u64,
    seeds: Vec<Member>,
    announce_interval: Duration,
    next_announce: Instant,
    left: bool,
    rejected: Arc<AtomicU64>,
    rejected_log: Throttled,
    timer_log: Throttled,
}

impl Membership {
    fn new(
        me: Member,
        config: foca::Config,
        announce_interval: Duration,
        rng: SmallRng,
        now: Instant,
    ) -> Self {
        Self {
            foca: Foca::new(me, config, rng, PostcardCodec),
            runtime: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            seeds: Vec::new(),
            announce_interval,
            next_announce: now + announce_interval,
            left: false,
            rejected: Arc::new(AtomicU64::new(0)),
            rejected_log: Throttled::default(),
            timer_log: Throttled::default(),
        }
    }

    /// One datagram from a peer. Garbage is counted and logged, never fatal.
    fn handle_datagram(&mut self, data: &[u8], now: Instant) {
        if self.left {
            return;
        }
        if let Err(e) = self.foca.handle_data(data, &mut self.runtime) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            self.rejected_log
                .record("gossip datagram rejected", &e, now);
        }
        self.absorb(now);
    }

    /// Joins the cluster `seed` belongs to, and remembers `seed` for re-announcing while no
    /// other member is alive. Its incarnation does not matter (foca accepts an announce to
    /// any identity of the right node id).
    fn announce(&mut self, seed: Member, now: Instant) {
        if self.left || seed.node_id == self.foca.identity().node_id {
            return;
        }
        if let Some(known) = self.seeds.iter_mut().find(|s| s.node_id == seed.node_id) {
            *known = seed.clone();
        } else if self.seeds.len() < SEEDS_MAX {
            self.seeds.push(seed.clone());
        }
        if let Err(e) = self.foca.announce(seed, &mut self.runtime) {
            self.timer_log.record("gossip announce failed", &e, now);
        }
        self.absorb(now);
    }

    /// Fires the timers due at `now`, and re-announces to the seeds if it is time.
    fn handle_timeout(&mut self, now: Instant) {
        if self.left {
            return;
        }
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
                self.timer_log.record("gossip timer failed", &e, now);
            }
            self.absorb(now);
        }
        if now >= self.next_announce {
            self.next_announce = now + self.announce_interval;
            if self.foca.num_members() == 0 {
                for seed in self.seeds.clone() {
                    if let Err(e) = self.foca.announce(seed, &mut self.runtime) {
                        self.timer_log.record("gossip announce failed", &e, now);
                    }
                }
                self.absorb(now);
            }
        }
    }

    /// Declares this node down to a few members and stops taking part.
    fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            self.timer_log.record("gossip leave failed", &e, now);
        }
        self.absorb(now);
        self.left = true;
        self.timers.clear();
    }

    /// The next packet to send, and to whom.
    fn poll_transmit(&mut self) -> Option<(Member, Bytes)> {
        self.runtime.to_send()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called next.
    fn poll_timeout(&self) -> Instant {
        match self.timers.first_key_value() {
            Some(((at, _), _)) => (*at).min(self.next_announce),
            None => self.next_announce,
        }
    }

    /// Every member foca knows, down ones included, plus this node; by node id.
    fn views(&self) -> Vec<GossipView> {
        let me = self.foca.identity();
        let mut views: Vec<GossipView> = self
            .foca
            .iter_membership_state()
            // foca keeps this node's earlier identities (as down): this node is added below.
            .filter(|m| m.id().node_id != me.node_id)
            .map(|m| GossipView::new(m.id(), m.state().into()))
            .collect();
        let own_state = if self.left {
            GossipState::Down
        } else {
            GossipState::Alive
        };
        views.push(GossipView::new(me, own_state));
        views.sort_by_key(|v| v.node_id);
        views
    }

    /// Takes foca's timer requests and notifications out of the runtime; packets stay there
    /// for `poll_transmit`.
    fn absorb(&mut self, now: Instant) {
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.insert((now + after, self.timer_seq), timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(m) => {
                    tracing::info!(node_id = m.node_id, peer_addr = %m.peer_addr, "gossip: member up");
                }
                OwnedNotification::MemberDown(m) => {
                    tracing::info!(node_id = m.node_id, peer_addr = %m.peer_addr, "gossip: member down");
                }
                OwnedNotification::Rename(old, new) => tracing::info!(
                    node_id = new.node_id,
                    old_incarnation = old.incarnation,
                    incarnation = new.incarnation,
                    peer_addr = %new.peer_addr,
                    "gossip: member rejoined with a new identity"
                ),
                OwnedNotification::Active => tracing::info!("gossip: joined the cluster"),
                OwnedNotification::Idle => tracing::warn!("gossip: no other member is alive"),
                OwnedNotification::Defunct => {
                    tracing::warn!("gossip: this node was declared down");
                }
                OwnedNotification::Rejoin(me) => tracing::info!(
                    incarnation = me.incarnation,
                    "gossip: declared down, rejoining with a new identity"
                ),
            }
        }
    }
}

/// Packets on their way to peers: a bounded queue and a sender task per peer address.
struct Outbox {
    peers: Arc<PeerClient>,
    senders: HashMap<String, mpsc::Sender<Bytes>>,
    tasks: JoinSet<()>,
}

impl Outbox {
    fn new(peers: Arc<PeerClient>) -> Self {
        Self {
            peers,
            senders: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Queues `packet` for `to` without waiting; drops it if that peer's queue is full.
    fn send(&mut self, to: &Member, packet: Bytes) {
        // Reap finished sender tasks so the set does not grow.
        while self.tasks.try_join_next().is_some() {}
        let packet = match self.senders.get(&to.peer_addr) {
            Some(tx) => match tx.try_send(packet) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(
                        node_id = to.node_id,
                        "gossip queue to peer full, packet dropped"
                    );
                    return;
                }
                // The sender task ended after being idle: start another.
                Err(mpsc::error::TrySendError::Closed(packet)) => packet,
            },
            None => packet,
        };
        self.senders.retain(|_, tx| !tx.is_closed());
        if self.senders.len() >= PEER_SENDERS_MAX {
            tracing::warn!(
                node_id = to.node_id,
                peers = self.senders.len(),
                "too many gossip peers, packet dropped"
            );
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_LEN);
        // A fresh channel has room for one packet.
        let _ = tx.try_send(packet);
        self.senders.insert(to.peer_addr.clone(), tx);
        self.tasks
            .spawn(send_loop(self.peers.clone(), to.peer_addr.clone(), rx));
    }

    /// Lets the sender tasks send what is queued, waiting at most `limit`.
    async fn flush(mut self, limit: Duration) {
        self.senders.clear();
        let drained = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, drained).await.is_err() {
            tracing::debug!("gossip packets still queued at leave, dropped");
        }
    }
}

/// Sends one peer's packets in order until idle for [`PEER_SENDER_IDLE`].
async fn send_loop(peers: Arc<PeerClient>, addr: String, mut packets: mpsc::Receiver<Bytes>) {
    while let Ok(Some(packet)) = tokio::time::timeout(PEER_SENDER_IDLE, packets.recv()).await {
        if let Err(e) = peers.send_datagram(&addr, packet).await {
            tracing::debug!(peer = %addr, error = %e, "gossip packet not sent");
            // What queued up meanwhile (probably during a failed dial) is stale: probes
            // and acks are only useful within a probe period.
            while packets.try_recv().is_ok() {}
        }
    }
}

enum Command {
    Announce(Member),
    Leave(oneshot::Sender<()>),
}

/// A running gossip member: the handle to the task that owns the membership (share it in an
/// `Arc`).
/// Dropping it stops gossip at once without leaving (the cluster then detects the node as
/// down, as after a crash); call [`leave`](Self::leave) for a graceful exit.
#[derive(Debug)]
pub struct Gossip {
    commands: mpsc::Sender<Command>,
    members: watch::Receiver<Vec<GossipView>>,
    rejected: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Gossip {
    /// Starts gossiping as `me` over `peers`' connections, taking over the datagrams of its
    /// [`DatagramSink`](super::peer::DatagramSink) (pass the same sink to
    /// [`serve_with_datagrams`](super::peer::serve_with_datagrams) so accepted connections
    /// feed it too). The node is alone until [`announce`](Self::announce).
    /// Must be called within a tokio runtime.
    pub fn start(
        me: Member,
        peers: Arc<PeerClient>,
        settings: &GossipSettings,
    ) -> Result<Self, GossipError> {
        let config = settings.foca_config()?;
        let (datagram_tx, datagrams) = mpsc::channel(INCOMING_QUEUE_LEN);
        if !peers.datagram_sink().attach(datagram_tx) {
            return Err(GossipError::SinkTaken);
        }
        let rng = SmallRng::from_rng(&mut rand::rng());
        let core = Membership::new(me, config, settings.announce_interval, rng, Instant::now());
        let rejected = core.rejected.clone();
        let (views, members) = watch::channel(core.views());
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        let task = tokio::spawn(run(core, datagrams, command_rx, Outbox::new(peers), views));
        Ok(Self {
            commands,
            members,
            rejected,
            task,
        })
    }

    /// Joins the cluster through `seed`, a node known from configuration or a `Hello` (its
    /// incarnation may be 0). Seeds are announced to again while no other member is alive.
    pub async fn announce(&self, seed: Member) -> Result<(), GossipError> {
        self.commands
            .send(Command::Announce(seed))
            .await
            .map_err(|_| GossipError::Stopped)
    }

    /// Leaves gracefully: tells a few members this node is down, waits (at most a second)
    /// for those packets to go out, and stops the task. The last snapshot stays readable.
    pub async fn leave(&self) -> Result<(), GossipError> {
        let (done, left) = oneshot::channel();
        self.commands
            .send(Command::Leave(done))
            .await
            .map_err(|_| GossipError::Stopped)?;
        left.await.map_err(|_| GossipError::Stopped)
    }

    /// Every member seen and not yet forgotten, this node included, ordered by node id.
    pub fn members(&self) -> Vec<GossipView> {
        self.members.borrow().clone()
    }

    /// The membership snapshot, to wait for changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<GossipView>> {
        self.members.clone()
    }

    /// Datagrams rejected so far (undecodable, too large, misaddressed).
    pub fn rejected_datagrams(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The driver: moves datagrams and time into the core and packets out of it.
async fn run(
    mut core: Membership,
    mut datagrams: mpsc::Receiver<Bytes>,
    mut commands: mpsc::Receiver<Command>,
    mut outbox: Outbox,
    views: watch::Sender<Vec<GossipView>>,
) {
    loop {
        let deadline = tokio::time::Instant::from_std(core.poll_timeout());
        let mut leaving = None;
        tokio::select! {
            Some(datagram) = datagrams.recv() => core.handle_datagram(&datagram, Instant::now()),
            command = commands.recv() => match command {
                Some(Command::Announce(seed)) => core.announce(seed, Instant::now()),
                Some(Command::Leave(done)) => {
                    core.leave(Instant::now());
                    leaving = Some(done);
                }
                // The handle is gone (its drop aborts this task anyway).
                None => return,
            },
            () = tokio::time::sleep_until(deadline) => core.handle_timeout(Instant::now()),
        }
        while let Some((to, packet)) = core.poll_transmit() {
            outbox.send(&to, packet);
        }
        let now = core.views();
        views.send_if_modified(|current| {
            let changed = *current != now;
            if changed {
                *current = now;
            }
            changed
        });
        if let Some(done) = leaving {
            outbox.flush(LEAVE_FLUSH_WAIT).await;
            let _ = done.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real gossip over real QUIC: every node is a peer endpoint on 127.0.0.1 with a
    //! certificate of one development CA, a `PeerClient` and the accept loop, as in a node.
    //! Timings are shortened (probe every 300 ms) and every wait polls a condition with a
    //! deadline; nothing sleeps in place of an assertion.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use quiver_proto::ErrorCode;
    use quiver_proto::peer::PeerApi;
    use quiver_transport::{ClientTrust, Server, ServerIdentity, TransportSettings};

    use super::*;
    use crate::cluster::peer::{PeerAnswer, PeerHandler, serve_with_datagrams};

    const DEADLINE: Duration = Duration::from_secs(20);

    /// The peer endpoint's request side is not under test.
    struct NoRequests;

    impl PeerHandler for NoRequests {
        async fn handle(self: Arc<Self>, _api: PeerApi, _body: Bytes) -> PeerAnswer {
            PeerAnswer::err(ErrorCode::UnsupportedApi, "not in this test")
        }
    }

    struct TestNode {
        me: Member,
        server: Arc<Server>,
        gossip: Gossip,
    }

    fn fast_settings() -> GossipSettings {
        GossipSettings {
            probe_period: Duration::from_millis(300),
            probe_rtt: Duration::from_millis(100),
            suspect_to_down_after: Duration::from_millis(1_000),
            gossip_interval: Duration::from_millis(100),
            announce_interval: Duration::from_millis(500),
            ..GossipSettings::default()
        }
    }

    fn transport_settings() -> TransportSettings {
        TransportSettings {
            // A dead peer costs a send task this much per dial.
            connect_timeout_ms: 1_000,
            shutdown_wait_ms: 200,
            ..TransportSettings::default()
        }
    }

    fn identity(dir: &Path, name: &str) -> (ServerIdentity, ClientTrust) {
        let (identity, ca) =
            ServerIdentity::load_or_generate_dev_with_ca(&dir.join(name), &dir.join("ca"), &[])
                .unwrap();
        (identity, ClientTrust::from_ca_file(&ca).unwrap())
    }

    fn start_node(dir: &Path, node_id: u32) -> TestNode {
        let (identity, trust) = identity(dir, &format!("node-{node_id}"));
        let server = Arc::new(
            Server::bind_peer(
                "127.0.0.1:0".parse().unwrap(),
                &identity,
                &trust,
                &transport_settings(),
            )
            .unwrap(),
        );
        let peers = Arc::new(PeerClient::new(server.clone()));
        tokio::spawn(serve_with_datagrams(
            server.clone(),
            Arc::new(NoRequests),
            peers.datagram_sink(),
        ));
        let me = Member {
            node_id,
            peer_addr: server.local_addr().unwrap().to_string(),
            client_addr: format!("client-{node_id}.example:7000"),
            incarnation: 0,
        };
        let gossip = Gossip::start(me.clone(), peers, &fast_settings()).unwrap();
        TestNode { me, server, gossip }
    }

    /// Waits until `check` holds for `gossip`'s snapshot, or panics with the last one.
    async fn wait_for(gossip: &Gossip, what: &str, check: impl Fn(&[GossipView]) -> bool) {
        let mut rx = gossip.subscribe();
        let waited = tokio::time::timeout(DEADLINE, rx.wait_for(|views| check(views))).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "{what} within {DEADLINE:?}; last snapshot: {:#?}",
            gossip.members()
        );
    }

    fn state_of(views: &[GossipView], node_id: u32) -> Option<GossipState> {
        views.iter().find(|v| v.node_id == node_id).map(|v| v.state)
    }

    fn knows_alive(views: &[GossipView], member: &Member) -> bool {
        views.iter().any(|v| {
            v.node_id == member.node_id
                && v.peer_addr == member.peer_addr
                && v.client_addr == member.client_addr
                && v.state == GossipState::Alive
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_discover_each_other_and_see_a_crashed_one_down() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<TestNode> = (1..=3).map(|id| start_node(dir.path(), id)).collect();
        // Nodes 2 and 3 know only node 1; node 2 and 3 must learn of each other by gossip.
        for node in &nodes[1..] {
            node.gossip.announce(nodes[0].me.clone()).await.unwrap();
        }
        let all: Vec<Member> = nodes.iter().map(|n| n.me.clone()).collect();
        for node in &nodes {
            wait_for(
                &node.gossip,
                &format!("node {} sees all three alive", node.me.node_id),
                |views| views.len() == 3 && all.iter().all(|m| knows_alive(views, m)),
            )
            .await;
        }

        // Node 3 crashes: its gossip stops without leaving and its endpoint goes away.
        let mut nodes = nodes;
        let crashed = nodes.pop().unwrap();
        drop(crashed.gossip);
        crashed.server.shutdown(0, "crash").await;
        for node in &nodes {
            wait_for(
                &node.gossip,
                &format!("node {} sees node 3 down", node.me.node_id),
                |views| state_of(views, 3) == Some(GossipState::Down),
            )
            .await;
        }
        // The survivors still see each other (a brief suspicion under load is refuted).
        for node in &nodes {
            wait_for(
                &node.gossip,
                &format!("node {} sees nodes 1 and 2 alive", node.me.node_id),
                |views| {
                    state_of(views, 1) == Some(GossipState::Alive)
                        && state_of(views, 2) == Some(GossipState::Alive)
                },
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_datagrams_are_rejected_and_gossip_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let node1 = start_node(dir.path(), 1);
        let node2 = start_node(dir.path(), 2);

        // A fellow node (certificate of the same CA) that sends junk instead of gossip.
        let (identity, trust) = identity(dir.path(), "junk");
        let junk_endpoint =
            quiver_transport::Client::new_peer(&trust, &identity, &transport_settings()).unwrap();
        let conn = junk_endpoint
            .connect(&node1.me.peer_addr, None)
            .await
            .unwrap();
        let max = conn.max_datagram_size().unwrap();
        assert!(max > GOSSIP_PACKET_BYTES_MAX, "datagram limit {max}");
        let junk: Vec<Bytes> = vec![
            Bytes::new(),
            Bytes::from_static(&[0xff; 64]),
            Bytes::from_static(b"\x01\x02not postcard at all"),
            // Longer than any gossip packet.
            Bytes::from(vec![0u8; GOSSIP_PACKET_BYTES_MAX + 1]),
            // A plausible start (node id 7, a short address) cut off mid-identity.
            Bytes::from_static(&[7, 5, b'1', b'2']),
        ];
        let mut sent = 0;
        for datagram in &junk {
            conn.send_datagram(datagram.clone()).unwrap();
            sent += 1;
        }
        // Datagrams are unreliable, but nothing drops on loopback at this rate: every one is
        // expected to arrive and be rejected.
        let deadline = Instant::now() + DEADLINE;
        while node1.gossip.rejected_datagrams() < sent {
            assert!(
                Instant::now() < deadline,
                "only {} of {sent} junk datagrams rejected",
                node1.gossip.rejected_datagrams()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Node 1 goes on: node 2 joins through it, while more junk keeps arriving.
        node2.gossip.announce(node1.me.clone()).await.unwrap();
        for datagram in &junk {
            conn.send_datagram(datagram.clone()).unwrap();
        }
        for node in [&node1, &node2] {
            wait_for(&node.gossip, "both nodes see each other alive", |views| {
                knows_alive(views, &node1.me) && knows_alive(views, &node2.me)
            })
            .await;
        }
        assert_eq!(
            state_of(&node1.gossip.members(), 7),
            None,
            "no member made up from junk"
        );
    }
}
