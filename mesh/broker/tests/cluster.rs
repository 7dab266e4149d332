//! Three `quiver` processes on loopback forming one cluster, as a user runs them: the
//! controller group, placement, replication, failover after SIGKILL, restart and catch-up,
//! controlled shutdown.
//!
//! How and why: every node is a child process with its own data directory and a shared
//! development CA directory; peer ports are chosen before start (bound and released) so the
//! seeds can name them, client ports are `:0` and read from each node's stdout. Faults are
//! real: SIGKILL, then a restart on the same data. Every wait is bounded; nothing here
//! asserts on speed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    SeekTo,
};
use quiver_proto::messages::{
    ClusterStatusResponse, GossipStatus, MemberState, PartitionLeadership, RaftRole,
};

const QUIVER: &str = env!("CARGO_BIN_EXE_quiver");

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node's process and how to start it again.
struct Node {
    id: u32,
    args: Vec<String>,
    child: Option<Child>,
    addr: String,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{}.log", self.args[4]))
            .unwrap();
        let mut child = Command::new(QUIVER)
            .args(&self.args)
            .env("QUIVER_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("quiver listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        self.addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("node printed its address");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and a bounded wait for a clean exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(status.success(), "node {} exited with {status}", self.id);
                    return;
                }
                assert!(Instant::now() < deadline, "node {} did not stop", self.id);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Node `id` of a test cluster under `dir`: fast leases and elections, its peer endpoint on
/// `port` advertised as `advertised`, `seeds`, and a controller vote if `voter`.
fn node_for(
    dir: &std::path::Path,
    id: u32,
    port: u16,
    advertised: u16,
    seeds: &[u16],
    voter: bool,
) -> Node {
    let data = dir.join(format!("n{id}"));
    let config = dir.join(format!("n{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "[cluster]\nheartbeat_ms = 200\nlease_ms = 1500\nelection_timeout_ms = 600\ngossip_probe_ms = 300\npeer_advertised_addr = \"127.0.0.1:{advertised}\"\n"
        ),
    )
    .unwrap();
    let mut args: Vec<String> = [
        "serve",
        "--node-id",
        &id.to_string(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--peer-listen",
        &format!("127.0.0.1:{port}"),
        "--dev-ca-dir",
        dir.join("ca").to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if voter {
        args.extend(["--controller-voters".to_string(), "1,2,3".to_string()]);
    }
    if !seeds.is_empty() {
        let seeds: Vec<String> = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        args.extend(["--seeds".to_string(), seeds.join(",")]);
    }
    Node {
        id,
        args,
        child: None,
        addr: String::new(),
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Runs the `quiver` CLI against node `via`; returns (success, stdout + stderr).
    fn cli(&self, via: u32, args: &[&str]) -> (bool, String) {
        let out = Command::new(QUIVER)
            .args(args)
            .args(["--server", &self.nodes[via as usize - 1].addr])
            .arg("--ca")
            .arg(&self.ca)
            .output()
            .expect("run the CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Where node `id` keeps partition `partition` of `topic`.
    fn partition_dir(&self, id: u32, topic: &str, partition: u32) -> PathBuf {
        PathBuf::from(&self.nodes[id as usize - 1].args[4])
            .join("topics")
            .join(format!("{topic}-{partition}"))
    }

    /// Three nodes, all controller voters, with fast leases so failover is quick.
    fn start() -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
        Self::start_advertising(&ports, &ports)
    }

    /// As [`start`](Self::start), with node `i`'s peer endpoint on `ports[i]` and advertised
    /// to the others as `advertised[i]` (a proxy in front of it); every node's seeds are all
    /// three.
    fn start_advertising(ports: &[u16], advertised: &[u16]) -> Cluster {
        let all: Vec<u16> = advertised.to_vec();
        Self::start_with(ports, advertised, |_| all.clone())
    }

    /// Three nodes whose seeds form a chain: node 1 has none, node 2 names node 1, node 3
    /// names node 2. Node 1, which initialises the controller group, can only learn of node 3
    /// through gossip.
    fn start_chained() -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
        let seeds = ports.clone();
        Self::start_with(&ports, &ports, |id| match id {
            1 => Vec::new(),
            n => vec![seeds[n as usize - 2]],
        })
    }

    fn start_with(
        ports: &[u16],
        advertised: &[u16],
        seeds_of: impl Fn(u32) -> Vec<u16>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let nodes = (1..=3u32)
            .map(|id| {
                let i = id as usize - 1;
                node_for(dir.path(), id, ports[i], advertised[i], &seeds_of(id), true)
            })
            .collect();
        let mut c = Cluster {
            nodes,
            ca: ca_dir.join("ca.pem"),
            _dir: dir,
        };
        for n in &mut c.nodes {
            n.spawn();
        }
        c
    }

    /// Starts node `id` (after 1, 2, 3) with `--seeds` alone: a broker joining the running
    /// cluster, without a vote in the controller.
    fn join(&mut self, id: u32, seed: u32) {
        assert_eq!(id as usize, self.nodes.len() + 1);
        let port = free_udp_port();
        let seed_port = self.peer_port(seed);
        let mut n = node_for(self._dir.path(), id, port, port, &[seed_port], false);
        n.spawn();
        self.nodes.push(n);
    }

    /// The advertised peer port of node `id`.
    fn peer_port(&self, id: u32) -> u16 {
        let config = PathBuf::from(&self.nodes[id as usize - 1].args[4]).with_extension("toml");
        let text = std::fs::read_to_string(config).unwrap();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("peer_advertised_addr = "))
            .unwrap()
            .trim_matches('"');
        addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    fn node(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    async fn client(&self, id: u32) -> Client {
        let mut config = ClientConfig::new(self.nodes[id as usize - 1].addr.clone(), &self.ca);
        // A SIGKILLed node sends no close: the client learns of its death by timing out.
        config.request_timeout_ms = 3_000;
        config.transport.idle_timeout_ms = 3_000;
        config.transport.keep_alive_ms = 500;
        config.transport.connect_timeout_ms = 2_000;
        Client::connect(config).await.unwrap()
    }

    /// Waits (bounded) until node `via` reports a status satisfying `f`.
    async fn wait_status(
        &self,
        via: u32,
        what: &str,
        f: impl Fn(&ClusterStatusResponse) -> bool,
    ) -> ClusterStatusResponse {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = self.client(via).await;
        loop {
            if let Ok(s) = client.cluster_status().await
                && f(&s)
            {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn live(s: &ClusterStatusResponse) -> BTreeSet<u32> {
    s.members
        .iter()
        .filter(|m| m.state == MemberState::Live)
        .map(|m| m.node_id)
        .collect()
}

fn leader_of(s: &ClusterStatusResponse, topic: &str, partition: u32) -> u32 {
    s.partitions
        .iter()
        .find(|p| p.topic == topic && p.partition == partition)
        .map_or(0, |p| p.leader)
}

fn partition<'a>(
    s: &'a ClusterStatusResponse,
    topic: &str,
    partition: u32,
) -> &'a PartitionLeadership {
    s.partitions
        .iter()
        .find(|p| p.topic == topic && p.partition == partition)
        .expect("the partition is in the status")
}

fn full_isr(s: &ClusterStatusResponse, topic: &str) -> bool {
    let parts: Vec<_> = s.partitions.iter().filter(|p| p.topic == topic).collect();
    !parts.is_empty()
        && parts
            .iter()
            .all(|p| p.isr.len() == p.replicas.len() && p.leader != 0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_nodes_form_a_cluster_place_topics_and_survive_losing_the_controller() {
    let rt = runtime();
    // Seeds in a chain (1 ← 2 ← 3): the cluster forms only if gossip tells node 1 of node 3.
    let mut cluster = Cluster::start_chained();
    rt.block_on(async {
        let s = cluster
            .wait_status(2, "three live members and a controller", |s| {
                s.status.is_ok() && s.controller != 0 && live(s).len() == 3
            })
            .await;
        assert_eq!(s.members.len(), 3);
        for id in 1..=3 {
            cluster
                .wait_status(id, "gossip: every member alive", |s| {
                    s.members.len() == 3
                        && s.members.iter().all(|m| m.gossip == GossipStatus::Alive)
                })
                .await;
        }
        let c = cluster.client(3).await;
        // Placement: replicas spread, leaders rotate; a replication factor above the live
        // node count is refused.
        c.create_topic("spread", 3, &[("replication.factor".into(), "2".into())])
            .await
            .unwrap();
        let e = c
            .create_topic("too-wide", 1, &[("replication.factor".into(), "4".into())])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid_replication_factor"), "{e}");
        let s = cluster
            .wait_status(1, "the topic in node 1's metadata", |s| {
                s.partitions.iter().filter(|p| p.topic == "spread").count() == 3
            })
            .await;
        let leaders: BTreeSet<u32> = (0..3).map(|p| leader_of(&s, "spread", p)).collect();
        assert_eq!(leaders, [1, 2, 3].into(), "leaders rotate over the nodes");
        for p in s.partitions.iter().filter(|p| p.topic == "spread") {
            assert_eq!(p.replicas.len(), 2);
        }
        // Describing a topic through any node covers every partition: each is asked of its
        // leader (node 1 does not host all of them).
        let c1 = cluster.client(1).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let described = loop {
            // A leader may not host its partition yet the moment the metadata names it.
            match c1.describe_topic("spread").await {
                Ok(d) => {
                    break d
                        .partitions
                        .iter()
                        .map(|p| p.partition)
                        .collect::<Vec<u32>>();
                }
                Err(e) => assert!(Instant::now() < deadline, "describe: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(described, vec![0, 1, 2]);
        // Every node answers metadata (and topic listings) from its own copy, whether it
        // hosts the topic or not.
        c.create_topic("one-replica", 1, &[]).await.unwrap();
        for id in 1..=3 {
            let client = cluster.client(id).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let m = client.metadata(None).await.unwrap();
                let listed = client.list_topics().await.unwrap();
                let names: BTreeSet<&str> = listed.iter().map(|t| t.name.as_str()).collect();
                if m.brokers.len() == 3
                    && m.topics.iter().any(|t| t.name == "one-replica")
                    && names.contains("spread")
                    && names.contains("one-replica")
                {
                    break;
                }
                assert!(Instant::now() < deadline, "node {id}: {m:?} {names:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        s.controller
    });
    // SIGKILL the active controller: another voter takes over, the dead node is fenced, and
    // the metadata can still change.
    let controller = rt.block_on(async {
        cluster
            .wait_status(1, "a controller", |s| s.controller != 0)
            .await
            .controller
    });
    cluster.node(controller).kill();
    let other = if controller == 1 { 2 } else { 1 };
    rt.block_on(async {
        let s = cluster
            .wait_status(other, "a new controller and the old one fenced", |s| {
                s.controller != 0 && s.controller != controller && !live(s).contains(&controller)
            })
            .await;
        // Gossip, advisory, sees it down too (after its own probes and suspicion).
        cluster
            .wait_status(other, "gossip: the killed node down", |s| {
                s.members
                    .iter()
                    .any(|m| m.node_id == controller && m.gossip == GossipStatus::Down)
            })
            .await;
        assert!(
            s.partitions.iter().all(|p| p.leader != controller),
            "no partition is led by the fenced node: {:?}",
            s.partitions
        );
        cluster
            .client(other)
            .await
            .create_topic("after", 1, &[])
            .await
            .unwrap();
    });
    // It restarts with a new broker epoch and catches up on the metadata it missed.
    let epoch_before = rt.block_on(async {
        let s = cluster.wait_status(other, "status", |_| true).await;
        s.members
            .iter()
            .find(|m| m.node_id == controller)
            .unwrap()
            .broker_epoch
    });
    cluster.node(controller).spawn();
    rt.block_on(async {
        let s = cluster
            .wait_status(
                controller,
                "the restarted node live with the new topic",
                |s| live(s).len() == 3 && s.partitions.iter().any(|p| p.topic == "after"),
            )
            .await;
        // A new incarnation is alive to gossip again, as seen from another node.
        cluster
            .wait_status(other, "gossip: the restarted node alive", |s| {
                s.members
                    .iter()
                    .any(|m| m.node_id == controller && m.gossip == GossipStatus::Alive)
            })
            .await;
        let epoch = s
            .members
            .iter()
            .find(|m| m.node_id == controller)
            .unwrap()
            .broker_epoch;
        assert!(
            epoch > epoch_before,
            "a new incarnation gets a new broker epoch"
        );
    });
    // Controlled shutdown: a node stopped with SIGTERM hands its leaderships over before it
    // exits, so the metadata shows it fenced and leading nothing as soon as it is gone (no
    // lease has to run out first).
    let leader = rt.block_on(async {
        let s = cluster
            .wait_status(1, "every partition of spread led", |s| {
                live(s).len() == 3 && (0..3).all(|p| leader_of(s, "spread", p) != 0)
            })
            .await;
        leader_of(&s, "spread", 0)
    });
    cluster.node(leader).stop();
    let asked = if leader == 1 { 2 } else { 1 };
    rt.block_on(async {
        let c = cluster.client(asked).await;
        // The change is committed before the node exits; the node asked may apply it a
        // heartbeat later. A lease could not have run out yet (1.5 s after the last
        // heartbeat), so what is seen within a second is the controlled shutdown's doing.
        let started = Instant::now();
        let s = loop {
            let s = c.cluster_status().await.unwrap();
            let fenced = s
                .members
                .iter()
                .any(|m| m.node_id == leader && m.state == MemberState::Fenced);
            if fenced || started.elapsed() > Duration::from_secs(1) {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let member = s.members.iter().find(|m| m.node_id == leader).unwrap();
        assert_eq!(
            member.state,
            MemberState::Fenced,
            "node {leader} fenced by its controlled shutdown"
        );
        assert!(
            s.partitions.iter().all(|p| p.leader != leader),
            "leadership moved before node {leader} stopped: {:?}",
            s.partitions
        );
    });
    for n in &mut cluster.nodes {
        n.stop();
    }
}

/// Creates `topic` with `partitions` partitions, three replicas, min ISR 2 and fsync before
/// acknowledging, and waits for every partition's full ISR.
async fn create_replicated(cluster: &Cluster, topic: &str, partitions: u32) {
    create_topic(cluster, topic, partitions, 3, 2).await;
}

/// Creates `topic` with `rf` replicas per partition and `min_isr`, fsync before
/// acknowledging, once all three nodes are live; waits for every partition's full ISR.
async fn create_topic(cluster: &Cluster, topic: &str, partitions: u32, rf: u16, min_isr: u16) {
    cluster
        .wait_status(1, "three live members", |s| {
            live(s).len() == 3 && s.controller != 0
        })
        .await;
    cluster
        .client(1)
        .await
        .create_topic(
            topic,
            partitions,
            &[
                ("replication.factor".into(), rf.to_string()),
                ("min.insync.replicas".into(), min_isr.to_string()),
                ("flush.policy".into(), "batch".into()),
            ],
        )
        .await
        .unwrap();
    cluster
        .wait_status(1, "full ISRs", |s| full_isr(s, topic))
        .await;
}

/// A paced acks=all producer of sequence-numbered records (`record-SEQ`, partition SEQ mod
/// `partitions`). It retries attempts of unknown outcome (at-least-once: duplicates are
/// possible and counted by the tests) and keeps one request in flight, so acknowledged
/// records of a partition are stored in send order. About 5,000 records a second at most and
/// capped, so every run is bounded.
struct Writer {
    acked: Arc<Mutex<BTreeMap<u64, (u32, u64)>>>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(
        rt: &tokio::runtime::Runtime,
        client: Client,
        topic: &'static str,
        partitions: u32,
    ) -> Writer {
        let acked: Arc<Mutex<BTreeMap<u64, (u32, u64)>>> = Arc::default();
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let producer = {
            let _g = rt.enter();
            Producer::new(
                client,
                ProducerConfig {
                    acks: Acks::All,
                    linger_ms: 2,
                    in_flight_max: 1,
                    retries_max: 100,
                    retry_unknown_outcome: true,
                    retry_backoff_ms: 100,
                    request_timeout_ms: 5_000,
                    ..ProducerConfig::default()
                },
            )
        };
        let task = {
            let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
            rt.spawn(async move {
                let mut seq = 0u64;
                let mut waiting = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && seq < 1_000_000 {
                    let record = ProducerRecord::new(topic, format!("record-{seq}"))
                        .partition((seq % u64::from(partitions)) as u32);
                    let d = producer.send(record).await.unwrap();
                    let (acked, failed) = (acked.clone(), failed.clone());
                    waiting.push(tokio::spawn(async move {
                        match d.await {
                            Ok(meta) => {
                                acked
                                    .lock()
                                    .unwrap()
                                    .insert(seq, (meta.partition, meta.offset.unwrap()));
                            }
                            Err(_) => {
                                failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }));
                    seq += 1;
                    if seq.is_multiple_of(5) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                producer.flush().await.ok();
                for w in waiting {
                    let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
                }
                seq
            })
        };
        Writer {
            acked,
            failed,
            stop,
            task,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits (bounded) until `more` further records are acknowledged.
    fn wait_more(&self, more: usize) {
        let target = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "the producer made no progress to {target}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops writing; returns (records sent, acknowledged seq -> place, failed count).
    fn finish(self, rt: &tokio::runtime::Runtime) -> (u64, BTreeMap<u64, (u32, u64)>, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(120), self.task).await })
            .expect("the writer finished")
            .unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (
            sent,
            acked,
            self.failed.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

/// Every stored record of `topic` (partitions 0..`partitions`), read through a consumer that
/// routes to the leaders, up to each partition's end.
async fn read_back(client: Client, topic: &str, partitions: u32) -> BTreeMap<(u32, u64), String> {
    let mut consumer = Consumer::new(client.clone(), topic, None, ConsumerConfig::default())
        .await
        .unwrap();
    consumer.seek_all(SeekTo::Earliest).await.unwrap();
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        ends.insert(p, client.list_offset(topic, p, -1).await.unwrap().unwrap());
    }
    let mut stored = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, e)| consumer.position(*p).unwrap() < *e)
    {
        assert!(Instant::now() < deadline, "could not read back to {ends:?}");
        for r in consumer.poll().await.unwrap() {
            stored.insert(
                (r.partition, r.offset),
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            );
        }
    }
    stored
}

/// Every acknowledged record is at its place with its content, offsets are dense, and
/// acknowledged records of each partition are in send order. Returns the duplicates count.
fn check_acknowledged(
    acked: &BTreeMap<u64, (u32, u64)>,
    stored: &BTreeMap<(u32, u64), String>,
    partitions: u32,
) -> usize {
    for (seq, place) in acked {
        let value = stored
            .get(place)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} at {place:?} lost"));
        assert_eq!(value, &format!("record-{seq}"), "content at {place:?}");
    }
    for p in 0..partitions {
        let offsets: Vec<u64> = stored
            .keys()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "gap in partition {p}"
        );
        // `acked` is ordered by seq: offsets must grow with it.
        let in_order: Vec<u64> = acked
            .values()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        assert!(
            in_order.windows(2).all(|w| w[0] < w[1]),
            "acknowledged records of partition {p} out of send order"
        );
    }
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    for v in stored.values() {
        *copies.entry(v.as_str()).or_default() += 1;
    }
    copies.values().map(|c| c - 1).sum()
}

/// Item 7 of the cluster issue: acks=all records survive repeated SIGKILLs of the partition
/// leader. Each cycle kills the leader of partition 0 while the [`Writer`] writes, lets it go
/// on against the new leader, then restarts the node and waits for it to rejoin the ISR. At
/// the end every acknowledged record is where it was acknowledged (see
/// [`check_acknowledged`]); duplicates from retries are counted and printed.
#[test]
fn acknowledged_records_survive_sigkill_of_the_leader_three_times() {
    let rt = runtime();
    let mut cluster = Cluster::start();
    let topic = "ledger";
    rt.block_on(create_replicated(&cluster, topic, 2));
    // The producer bootstraps from node 3 but routes to the leaders itself.
    let writer = Writer::start(&rt, rt.block_on(cluster.client(3)), topic, 2);
    let mut killed = Vec::new();
    for _ in 1..=3 {
        writer.wait_more(2_000);
        let leader = rt.block_on(async {
            let via = if cluster.nodes.iter().all(|n| n.child.is_some()) {
                1
            } else {
                2
            };
            let s = cluster
                .wait_status(via, "a leader for partition 0", |s| {
                    leader_of(s, topic, 0) != 0
                })
                .await;
            leader_of(&s, topic, 0)
        });
        cluster.node(leader).kill();
        killed.push(leader);
        let survivor = (1..=3).find(|i| *i != leader).unwrap();
        rt.block_on(async {
            cluster
                .wait_status(survivor, "a new leader for partition 0", |s| {
                    let l = leader_of(s, topic, 0);
                    l != 0 && l != leader
                })
                .await;
        });
        // Writes go on against the new leader while the old one is down.
        writer.wait_more(1_000);
        cluster.node(leader).spawn();
        rt.block_on(async {
            cluster
                .wait_status(survivor, "the restarted node back in every ISR", |s| {
                    live(s).len() == 3 && full_isr(s, topic)
                })
                .await;
        });
    }
    writer.wait_more(500);
    let (sent, acked, failed) = writer.finish(&rt);
    let stored = rt.block_on(async { read_back(cluster.client(2).await, topic, 2).await });
    let duplicates = check_acknowledged(&acked, &stored, 2);
    eprintln!(
        "killed leaders {killed:?}; {sent} sent, {} acknowledged, {failed} failed, {} stored, {duplicates} duplicates from retries",
        acked.len(),
        stored.len()
    );
    for n in &mut cluster.nodes {
        n.stop();
    }
}

/// A UDP relay in front of each node's peer endpoint, which can cut one node off: it then
/// drops every datagram to that node's front address and every datagram from its peer port
/// (a node dials its peers from the port it listens on), in both directions.
struct Proxy {
    /// The cut node: (its front port, its peer port).
    cut: Arc<Mutex<Option<(u16, u16)>>>,
    fronts: Vec<u16>,
    backends: Vec<u16>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(backends: &[u16]) -> Proxy {
        let cut: Arc<Mutex<Option<(u16, u16)>>> = Arc::default();
        let mut fronts = Vec::new();
        let mut tasks = Vec::new();
        for backend in backends {
            let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            let front_port = front.local_addr().unwrap().port();
            fronts.push(front_port);
            let backend: std::net::SocketAddr = format!("127.0.0.1:{backend}").parse().unwrap();
            tasks.push(tokio::spawn(relay(front, front_port, backend, cut.clone())));
        }
        Proxy {
            cut,
            fronts,
            backends: backends.to_vec(),
            tasks,
        }
    }

    /// Cuts node `id` (1-based) off from its peers, or heals (`None`).
    fn isolate(&self, id: Option<u32>) {
        *self.cut.lock().unwrap() =
            id.map(|i| (self.fronts[i as usize - 1], self.backends[i as usize - 1]));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn blocked(cut: &Mutex<Option<(u16, u16)>>, front: u16, source_port: u16) -> bool {
    cut.lock()
        .unwrap()
        .is_some_and(|(f, p)| f == front || source_port == p)
}

async fn relay(
    front: Arc<tokio::net::UdpSocket>,
    front_port: u16,
    backend: std::net::SocketAddr,
    cut: Arc<Mutex<Option<(u16, u16)>>>,
) {
    let mut upstreams: std::collections::HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
        Default::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, source) = match front.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        if blocked(&cut, front_port, source.port()) {
            continue;
        }
        let up = match upstreams.get(&source) {
            Some(u) => u.clone(),
            None => {
                let u = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                u.connect(backend).await.unwrap();
                let (u2, front2, cut2) = (u.clone(), front.clone(), cut.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    loop {
                        // A datagram sent before the node was up comes back as "connection
                        // refused" on this connected socket: not the end of the relay.
                        let n = match u2.recv(&mut buf).await {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                            Err(_) => return,
                        };
                        if !blocked(&cut2, front_port, source.port()) {
                            let _ = front2.send_to(&buf[..n], source).await;
                        }
                    }
                });
                upstreams.insert(source, u.clone());
                u
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

/// Item 7, the network partition: the leader of a partition is cut off from its peers (a
/// relay in front of every peer endpoint drops its traffic both ways) while an acks=all
/// producer writes. The others elect a new leader; the old one, unable to reach the
/// controller for a lease, stops accepting writes (`not_leader`); after healing it truncates
/// what it took alone and rejoins the ISR; nothing acknowledged is lost.
#[test]
fn an_isolated_leader_is_replaced_and_stops_accepting_writes() {
    let rt = runtime();
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let proxy = rt.block_on(Proxy::start(&ports));
    let mut cluster = Cluster::start_advertising(&ports, &proxy.fronts);
    let topic = "split";
    rt.block_on(create_replicated(&cluster, topic, 1));
    let leader = rt.block_on(async {
        let s = cluster
            .wait_status(1, "a leader", |s| leader_of(s, topic, 0) != 0)
            .await;
        leader_of(&s, topic, 0)
    });
    let other = (1..=3).find(|i| *i != leader).unwrap();
    let writer = Writer::start(&rt, rt.block_on(cluster.client(other)), topic, 1);
    writer.wait_more(2_000);
    proxy.isolate(Some(leader));
    rt.block_on(async {
        cluster
            .wait_status(other, "a new leader on the majority side", |s| {
                let l = leader_of(s, topic, 0);
                l != 0 && l != leader
            })
            .await;
    });
    writer.wait_more(1_000);
    // The old leader, asked directly by a client, refuses writes once it has gone a lease
    // (and the longest election) without reaching the controller.
    rt.block_on(async {
        let c = cluster.client(leader).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = Producer::new(
                c.clone(),
                ProducerConfig {
                    acks: Acks::Leader,
                    retries_max: 0,
                    linger_ms: 0,
                    ..ProducerConfig::default()
                },
            );
            let r = p
                .send(ProducerRecord::new(topic, "to the isolated node"))
                .await
                .unwrap()
                .await;
            match r {
                Err(e) if e.code() == Some(quiver_proto::ErrorCode::NotLeader) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "the isolated leader still takes writes: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    proxy.isolate(None);
    rt.block_on(async {
        cluster
            .wait_status(other, "the old leader back in the ISR", |s| {
                live(s).len() == 3 && full_isr(s, topic)
            })
            .await;
    });
    writer.wait_more(500);
    let (_, acked, _) = writer.finish(&rt);
    // Read back through the old leader's address: the client routes to the new leader.
    let stored = rt.block_on(async { read_back(cluster.client(leader).await, topic, 1).await });
    let duplicates = check_acknowledged(&acked, &stored, 1);
    // Anything the isolated leader took alone (acks=1 before it noticed) was truncated away
    // when it rejoined as a follower of the new epoch.
    assert!(
        !stored.values().any(|v| v == "to the isolated node"),
        "a write the isolated leader took alone survived its truncation"
    );
    eprintln!(
        "isolated leader {leader}; {} acknowledged, {} stored, {duplicates} duplicates",
        acked.len(),
        stored.len()
    );
    for n in &mut cluster.nodes {
        n.stop();
    }
}

/// Items 1 and 8 of the cluster issue: a fourth node started with `--seeds` alone joins the
/// running cluster as a broker without a controller vote, and `quiver partition reassign`
/// moves a partition from nodes {1, 2} to {4, 2} while an acks=all producer keeps writing.
/// Node 4 copies the log and joins the ISR, leadership leaves node 1 (removed), node 1
/// deletes its replica, and every acknowledged record is still there, in order. Refusals get
/// their own codes.
#[test]
fn a_new_node_joins_and_a_partition_moves_to_it_while_a_producer_writes() {
    let rt = runtime();
    let mut cluster = Cluster::start();
    let topic = "moving";
    // One partition on [1, 2] (placement starts at the first live node).
    rt.block_on(create_topic(&cluster, topic, 1, 2, 2));
    let s = rt.block_on(cluster.wait_status(1, "a leader", |s| leader_of(s, topic, 0) != 0));
    assert_eq!(partition(&s, topic, 0).replicas, vec![1, 2]);
    cluster.join(4, 2);
    let s = rt.block_on(cluster.wait_status(1, "node 4 registered and alive", |s| {
        s.members.iter().any(|m| {
            m.node_id == 4
                && m.state == MemberState::Live
                && m.role == RaftRole::Learner
                && m.gossip == GossipStatus::Alive
        })
    }));
    assert_eq!(s.members.len(), 4);
    assert!(cluster.partition_dir(1, topic, 0).exists());
    assert!(!cluster.partition_dir(4, topic, 0).exists());
    let writer = Writer::start(&rt, rt.block_on(cluster.client(2)), topic, 1);
    writer.wait_more(3_000);
    let (ok, out) = cluster.cli(
        2,
        &[
            "partition",
            "reassign",
            "moving/0",
            "--replicas",
            "4,2",
            "--wait",
        ],
    );
    assert!(ok, "reassign failed: {out}");
    let s = rt.block_on(cluster.wait_status(4, "the move applied on node 4", |s| {
        partition(s, topic, 0).replicas == vec![4, 2]
    }));
    let p = partition(&s, topic, 0);
    assert_eq!((p.leader, p.isr.clone()), (4, vec![2, 4]), "{p:?}");
    assert!(p.adding.is_empty() && p.removing.is_empty());
    assert!(cluster.partition_dir(4, topic, 0).exists());
    // Writes go on against the new leader; the removed replica's files go.
    writer.wait_more(1_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.partition_dir(1, topic, 0).exists() {
        assert!(
            Instant::now() < deadline,
            "node 1 kept the replica moved away"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Refusals.
    let (ok, out) = cluster.cli(
        1,
        &["partition", "reassign", "moving/0", "--replicas", "3,9"],
    );
    assert!(!ok && out.contains("invalid_replica_assignment"), "{out}");
    let (ok, out) = cluster.cli(
        1,
        &["partition", "reassign", "moving/0", "--replicas", "3,3"],
    );
    assert!(!ok && out.contains("invalid_replica_assignment"), "{out}");
    let (ok, out) = cluster.cli(1, &["partition", "reassign", "moving/0", "--cancel"]);
    assert!(!ok && out.contains("no_reassignment_in_progress"), "{out}");
    let (ok, out) = cluster.cli(1, &["partition", "reassign", "moving/7", "--replicas", "1"]);
    assert!(!ok && out.contains("unknown_topic_or_partition"), "{out}");
    let (ok, out) = cluster.cli(1, &["partition", "reassign", "moving", "--replicas", "1"]);
    assert!(!ok && out.contains("TOPIC/PARTITION"), "{out}");
    writer.wait_more(500);
    let (sent, acked, failed) = writer.finish(&rt);
    let stored = rt.block_on(async { read_back(cluster.client(1).await, topic, 1).await });
    let duplicates = check_acknowledged(&acked, &stored, 1);
    eprintln!(
        "moved [1, 2] -> [4, 2] while writing: {sent} sent, {} acknowledged, {failed} failed, {} stored, {duplicates} duplicates",
        acked.len(),
        stored.len()
    );
    for n in &mut cluster.nodes {
        n.stop();
    }
}

/// Writes `n` records `PREFIX-i` to partition 0 with acks=all, each acknowledged before the
/// next is sent.
async fn write_all(client: Client, topic: &str, prefix: &str, n: usize) {
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: Acks::All,
            linger_ms: 0,
            retries_max: 50,
            retry_backoff_ms: 100,
            ..ProducerConfig::default()
        },
    );
    for i in 0..n {
        let record = ProducerRecord::new(topic, format!("{prefix}-{i}")).partition(0);
        producer
            .send(record)
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("{prefix}-{i} not acknowledged: {e}"));
    }
}

/// Item 4 of the cluster issue: no unclean election unless an operator asks for it. A
/// partition on [1, 2] with min ISR 1 loses follower 2 (the ISR shrinks to {1}), takes more
/// writes, then loses leader 1 as node 2 comes back: the partition goes offline and stays
/// so, since 2 is out of sync. `quiver partition elect --unclean` makes 2 the leader;
/// what only 1 held is lost, as the operator accepted. When 1 returns it truncates to 2's
/// log and rejoins the ISR, and a preferred election gives it back leadership.
#[test]
fn an_operator_elects_an_unclean_leader_and_then_the_preferred_one() {
    let rt = runtime();
    let mut cluster = Cluster::start();
    let topic = "fragile";
    rt.block_on(create_topic(&cluster, topic, 1, 2, 1));
    let s = rt.block_on(cluster.wait_status(3, "a leader", |s| leader_of(s, topic, 0) == 1));
    assert_eq!(partition(&s, topic, 0).replicas, vec![1, 2]);
    rt.block_on(async { write_all(cluster.client(3).await, topic, "both", 50).await });
    // The follower dies: its lease runs out and it leaves the ISR.
    cluster.node(2).kill();
    rt.block_on(cluster.wait_status(3, "the ISR shrunk to {1}", |s| {
        partition(s, topic, 0).isr == vec![1]
    }));
    rt.block_on(async { write_all(cluster.client(3).await, topic, "alone", 50).await });
    // The leader dies: no in-sync replica is left. Node 2 comes back at once (the controller
    // needs two of its three voters to fence node 1), but cannot catch up from a dead leader.
    cluster.node(1).kill();
    cluster.node(2).spawn();
    rt.block_on(
        cluster.wait_status(3, "node 2 live, the partition offline", |s| {
            live(s).contains(&2) && !live(s).contains(&1) && leader_of(s, topic, 0) == 0
        }),
    );
    // Out of sync, node 2 is never elected by itself.
    std::thread::sleep(Duration::from_secs(3));
    let s = rt.block_on(cluster.wait_status(3, "a status", |_| true));
    assert_eq!(
        leader_of(&s, topic, 0),
        0,
        "an unclean election nobody asked for"
    );
    let (ok, out) = cluster.cli(3, &["partition", "elect", "fragile/0", "--preferred"]);
    assert!(
        !ok && out.contains("eligible_leaders_not_available"),
        "{out}"
    );
    let (ok, out) = cluster.cli(3, &["partition", "elect", "fragile/0", "--unclean"]);
    assert!(ok, "unclean election failed: {out}");
    let s = rt.block_on(cluster.wait_status(3, "node 2 leads", |s| leader_of(s, topic, 0) == 2));
    assert_eq!(partition(&s, topic, 0).isr, vec![2]);
    let (ok, out) = cluster.cli(3, &["partition", "elect", "fragile/0", "--unclean"]);
    assert!(!ok && out.contains("election_not_needed"), "{out}");
    rt.block_on(async { write_all(cluster.client(3).await, topic, "after", 50).await });
    // Node 1 returns, truncates what only it held, and catches up.
    cluster.node(1).spawn();
    rt.block_on(cluster.wait_status(3, "node 1 back in the ISR", |s| {
        partition(s, topic, 0).isr == vec![1, 2]
    }));
    let (ok, out) = cluster.cli(3, &["partition", "elect", "fragile/0", "--preferred"]);
    assert!(ok, "preferred election failed: {out}");
    rt.block_on(cluster.wait_status(3, "node 1 leads again", |s| leader_of(s, topic, 0) == 1));
    let (ok, out) = cluster.cli(3, &["partition", "elect", "fragile/0", "--preferred"]);
    assert!(!ok && out.contains("election_not_needed"), "{out}");
    let stored = rt.block_on(async { read_back(cluster.client(1).await, topic, 1).await });
    let values: Vec<&str> = stored.values().map(String::as_str).collect();
    let expected: Vec<String> = (0..50)
        .map(|i| format!("both-{i}"))
        .chain((0..50).map(|i| format!("after-{i}")))
        .collect();
    assert_eq!(values, expected, "the log after the unclean election");
    // Every replica checkpoints the high watermark (the 100 records), for its next start.
    for id in [1, 2] {
        let file = cluster.partition_dir(id, topic, 0).join("high-watermark");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(&file).ok().as_deref() != Some("quiver-hw 1\n100\n") {
            assert!(
                Instant::now() < deadline,
                "node {id}: checkpoint {:?}",
                std::fs::read_to_string(&file)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for n in &mut cluster.nodes {
        n.stop();
    }
}
