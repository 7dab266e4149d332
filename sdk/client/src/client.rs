//! The connection and request/response plumbing shared by admin, producer and consumer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use quiver_proto::codec::Reader;
use quiver_proto::frame::frame_prefix;
use quiver_proto::messages::*;
use quiver_proto::{ErrorCode, ResponseHeader};
use quiver_transport::{ClientTrust, Connection, TransportError, TransportSettings};
use tokio::sync::Mutex;

/// How to reach a node.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of the node.
    pub server: String,
    /// CA certificate (PEM) that signed the node's certificate.
    pub ca_file: PathBuf,
    /// TLS server name; defaults to the host part of `server` (`localhost` for IP addresses).
    pub server_name: Option<String>,
    /// Longest wait for any response, ms (fetches add their own `max_wait_ms`).
    pub request_timeout_ms: u64,
    /// Largest response accepted, bytes.
    pub response_bytes_max: usize,
    /// Retries of requests that are safe to repeat (reads and metadata).
    pub retries_max: u32,
    /// First retry backoff, ms; doubles up to `retry_backoff_ms_max`.
    pub retry_backoff_ms: u64,
    /// Longest retry backoff, ms.
    pub retry_backoff_ms_max: u64,
    /// QUIC tuning.
    pub transport: TransportSettings,
}

impl ClientConfig {
    /// Defaults for `server`, trusting `ca_file`.
    pub fn new(server: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        Self {
            server: server.into(),
            ca_file: ca_file.into(),
            server_name: None,
            request_timeout_ms: 30_000,
            response_bytes_max: 256 << 20,
            retries_max: 5,
            retry_backoff_ms: 100,
            retry_backoff_ms_max: 2_000,
            transport: TransportSettings::default(),
        }
    }
}

/// A client-side failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or was lost.
    #[error("transport: {0}")]
    Transport(String),
    /// No response within the request timeout.
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    /// The server answered with an error.
    #[error("{code}: {message}")]
    Server {
        /// Protocol code.
        code: ErrorCode,
        /// Server's message.
        message: String,
    },
    /// The server's response could not be decoded.
    #[error("malformed response: {0}")]
    Protocol(String),
    /// Invalid client-side input or configuration.
    #[error("{0}")]
    Config(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// The single partition result of a one-partition admin request.
fn first_partition_result(results: Vec<PartitionResult>) -> Result<(), ClientError> {
    match results.into_iter().next() {
        Some(r) if r.status.is_ok() => Ok(()),
        Some(r) => Err(ClientError::server(&r.status)),
        None => Err(ClientError::Protocol("no result for the partition".into())),
    }
}

impl ClientError {
    /// The protocol error code, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether repeating the request may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Timeout(_) => true,
            ClientError::Server { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    pub(crate) fn server(status: &Status) -> Self {
        ClientError::Server {
            code: status.code,
            message: status.message.clone(),
        }
    }
}

impl From<TransportError> for ClientError {
    fn from(e: TransportError) -> Self {
        ClientError::Transport(e.to_string())
    }
}

struct Inner {
    config: ClientConfig,
    endpoint: Arc<quiver_transport::Client>,
    /// The connection and the next produce sequence on it (sequences restart per connection).
    conn: Mutex<Option<(Connection, Arc<AtomicU64>)>>,
    next_id: AtomicU64,
    /// A client for one node that the root client routes to (it routes nothing itself).
    direct: bool,
    /// Partition leaders and broker addresses from metadata (root client only).
    routes: std::sync::Mutex<Routes>,
    /// Clients for the other nodes, by address (root client only).
    nodes: Mutex<std::collections::HashMap<String, Client>>,
}

/// The metadata cache: which node leads which partition, and where nodes are.
#[derive(Default)]
struct Routes {
    brokers: std::collections::HashMap<u32, String>,
    leaders: std::collections::HashMap<(String, u32), (u32, u32)>,
}

/// A cloneable handle to one QUIC connection (re-established on demand after a loss).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.config.server)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects (TLS 1.3, ALPN `quiver/1`) and checks the server answers.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let trust = ClientTrust::from_ca_file(&config.ca_file).map_err(|e| {
            ClientError::Config(format!("ca file {}: {e}", config.ca_file.display()))
        })?;
        let endpoint = Arc::new(quiver_transport::Client::new(
            &trust,
            quiver_transport::ALPN_CLIENT,
            &config.transport,
        )?);
        let client = Self {
            inner: Arc::new(Inner {
                config,
                endpoint,
                conn: Mutex::new(None),
                next_id: AtomicU64::new(1),
                direct: false,
                routes: Default::default(),
                nodes: Default::default(),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// Closes the connection gracefully and waits (bounded) for the node to acknowledge, so
    /// the node releases what the connection held (e.g. its fetch chains) at once rather than
    /// at its idle timeout. Requests after this fail.
    pub async fn close(&self) {
        self.inner.conn.lock().await.take();
        self.inner.endpoint.shutdown(0, "client closed").await;
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Whether this is a client for one node that a root client routes to.
    pub fn is_routed(&self) -> bool {
        self.inner.direct
    }

    /// A client for the node at `addr`, sharing this client's endpoint (cached).
    async fn node(&self, addr: &str) -> Client {
        if self.inner.direct || addr == self.inner.config.server {
            return self.clone();
        }
        let mut nodes = self.inner.nodes.lock().await;
        if let Some(c) = nodes.get(addr) {
            return c.clone();
        }
        let mut config = self.inner.config.clone();
        config.server = addr.to_string();
        let c = Client {
            inner: Arc::new(Inner {
                config,
                endpoint: self.inner.endpoint.clone(),
                conn: Mutex::new(None),
                next_id: AtomicU64::new(1),
                direct: true,
                routes: Default::default(),
                nodes: Default::default(),
            }),
        };
        nodes.insert(addr.to_string(), c.clone());
        c
    }

    /// Refreshes the leaders of `topic` from metadata: asked of the node this client was
    /// given first, then of the other nodes it knows, so a dead bootstrap node is no obstacle.
    pub async fn refresh_routes(&self, topic: &str) -> Result<(), ClientError> {
        let req = MetadataRequest {
            topics: Some(vec![topic.to_string()]),
        };
        let others: Vec<String> = {
            let r = self.inner.routes.lock().unwrap_or_else(|p| p.into_inner());
            r.brokers.values().cloned().collect()
        };
        let mut last = None;
        let mut answer: Option<MetadataResponse> = None;
        match self.request_once::<_, MetadataResponse>(&req, 0).await {
            Ok(m) => answer = Some(m),
            Err(e) => last = Some(e),
        }
        if answer.is_none() {
            for addr in others {
                let c = self.node(&addr).await;
                match c.request_once::<_, MetadataResponse>(&req, 0).await {
                    Ok(m) => {
                        answer = Some(m);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
        }
        let m = match answer {
            Some(m) => m,
            None => return Err(last.unwrap_or(ClientError::Closed)),
        };
        let mut r = self.inner.routes.lock().unwrap_or_else(|p| p.into_inner());
        for b in &m.brokers {
            r.brokers.insert(b.node_id, b.addr.clone());
        }
        for t in &m.topics {
            if t.status.is_ok() {
                for p in &t.partitions {
                    r.leaders
                        .insert((t.name.clone(), p.partition), (p.leader, p.leader_epoch));
                }
            }
        }
        Ok(())
    }

    /// Forgets the cached leaders of `topic` (after `not_leader` or a lost connection), so
    /// the next request looks them up again.
    pub fn invalidate_routes(&self, topic: &str) {
        if let Ok(mut r) = self.inner.routes.lock() {
            r.leaders.retain(|(t, _), _| t != topic);
        }
    }

    /// The client for the node that leads `topic`/`partition` (this one when it runs alone
    /// or is the leader). `not_leader` when the partition has no leader now.
    pub async fn leader_for(&self, topic: &str, partition: u32) -> Result<Client, ClientError> {
        if self.inner.direct {
            return Ok(self.clone());
        }
        let key = (topic.to_string(), partition);
        let cached = self.lookup_route(&key);
        let (leader, addr, brokers) = match cached {
            Some(found) => found,
            None => {
                self.refresh_routes(topic).await?;
                self.lookup_route(&key).ok_or_else(|| ClientError::Server {
                    code: ErrorCode::UnknownTopicOrPartition,
                    message: format!("no metadata for {topic}/{partition}"),
                })?
            }
        };
        if leader == 0 {
            self.invalidate_routes(topic);
            return Err(ClientError::Server {
                code: ErrorCode::NotLeader,
                message: format!("{topic}/{partition} has no leader now"),
            });
        }
        match addr {
            // A node alone (or one whose advertised address is the one dialled).
            _ if brokers <= 1 => Ok(self.clone()),
            Some(addr) => Ok(self.node(&addr).await),
            None => Ok(self.clone()),
        }
    }

    fn lookup_route(&self, key: &(String, u32)) -> Option<(u32, Option<String>, usize)> {
        let r = self.inner.routes.lock().unwrap_or_else(|p| p.into_inner());
        let (leader, _) = *r.leaders.get(key)?;
        Some((leader, r.brokers.get(&leader).cloned(), r.brokers.len()))
    }

    async fn slot(&self) -> Result<(Connection, Arc<AtomicU64>), ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some((c, seq)) = slot.as_ref() {
            return Ok((c.clone(), seq.clone()));
        }
        let cfg = &self.inner.config;
        let conn = self
            .inner
            .endpoint
            .connect(&cfg.server, cfg.server_name.as_deref())
            .await
            .map_err(|e| ClientError::Transport(format!("cannot reach {}: {e}", cfg.server)))?;
        let seq = Arc::new(AtomicU64::new(0));
        *slot = Some((conn.clone(), seq.clone()));
        Ok((conn, seq))
    }

    async fn connection(&self) -> Result<Connection, ClientError> {
        Ok(self.slot().await?.0)
    }

    /// The connection and the next produce sequence on it. Call in the order the produce
    /// requests must be appended; the node appends them in sequence order per connection.
    pub async fn ordered_connection(&self) -> Result<(Connection, u64), ClientError> {
        let (conn, seq) = self.slot().await?;
        Ok((conn, seq.fetch_add(1, Ordering::Relaxed)))
    }

    async fn forget_connection(&self, failed: &Connection) {
        let mut slot = self.inner.conn.lock().await;
        if slot.as_ref().map(|(c, _)| c.id()) == Some(failed.id()) {
            *slot = None;
        }
    }

    /// Sends a produce request on `conn` (from [`ordered_connection`](Self::ordered_connection));
    /// `Ok(None)` for `acks = none`, where the server does not answer.
    pub async fn produce_on(
        &self,
        conn: &Connection,
        req: &ProduceRequest,
    ) -> Result<Option<ProduceResponse>, ClientError> {
        let result = if req.acks == Acks::None {
            self.send_on(conn, req).await.map(|()| None)
        } else {
            self.exchange::<ProduceRequest, ProduceResponse>(conn, req, u64::from(req.timeout_ms))
                .await
                .map(Some)
        };
        if matches!(result, Err(ClientError::Transport(_))) {
            self.forget_connection(conn).await;
        }
        result
    }

    async fn send_on<Req: Message>(&self, conn: &Connection, req: &Req) -> Result<(), ClientError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut chunks = request_chunks(req, id);
        send.write_chunks(&mut chunks).await?;
        send.finish()?;
        recv.stop(0);
        Ok(())
    }

    /// Sends one request and waits for its response, once (no retry).
    pub async fn request_once<Req: Message, Resp: Message>(
        &self,
        req: &Req,
        extra_wait_ms: u64,
    ) -> Result<Resp, ClientError> {
        let conn = self.connection().await?;
        let result = self.exchange::<Req, Resp>(&conn, req, extra_wait_ms).await;
        if matches!(result, Err(ClientError::Transport(_))) {
            self.forget_connection(&conn).await;
        }
        result
    }

    async fn exchange<Req: Message, Resp: Message>(
        &self,
        conn: &Connection,
        req: &Req,
        extra_wait_ms: u64,
    ) -> Result<Resp, ClientError> {
        let timeout_ms = self.inner.config.request_timeout_ms + extra_wait_ms;
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let mut chunks = request_chunks(req, id);
            send.write_chunks(&mut chunks).await?;
            send.finish()?;
            let frame = recv
                .read_to_end(self.inner.config.response_bytes_max)
                .await?;
            Ok::<Bytes, ClientError>(frame)
        };
        let frame = tokio::time::timeout(Duration::from_millis(timeout_ms), work)
            .await
            .map_err(|_| ClientError::Timeout(timeout_ms))??;
        decode_response(frame)
    }

    /// Sends a request that is safe to repeat, retrying transport failures and retriable
    /// server errors with bounded exponential backoff.
    pub async fn request<Req: Message, Resp: Message>(
        &self,
        req: &Req,
        extra_wait_ms: u64,
    ) -> Result<Resp, ClientError> {
        let cfg = &self.inner.config;
        let mut backoff = cfg.retry_backoff_ms;
        let mut attempt = 0;
        loop {
            match self.request_once(req, extra_wait_ms).await {
                Err(e) if e.is_retriable() && attempt < cfg.retries_max => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "retrying request");
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                    backoff = (backoff * 2).min(cfg.retry_backoff_ms_max);
                }
                other => return other,
            }
        }
    }

    /// Opens a raw stream for the transport probe (`quiver perf transport`).
    pub async fn open_raw(
        &self,
    ) -> Result<(quiver_transport::SendStream, quiver_transport::RecvStream), ClientError> {
        let conn = self.connection().await?;
        Ok(conn.open_bi().await?)
    }

    /// The server's supported APIs.
    pub async fn api_versions(&self) -> Result<ApiVersionsResponse, ClientError> {
        self.request(&ApiVersionsRequest, 0).await
    }

    /// Brokers and partition layout of `topics` (all when `None`).
    pub async fn metadata(
        &self,
        topics: Option<Vec<String>>,
    ) -> Result<MetadataResponse, ClientError> {
        self.request(&MetadataRequest { topics }, 0).await
    }

    /// Number of partitions of `topic`.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        let m = self.metadata(Some(vec![topic.to_string()])).await?;
        let t = m
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("metadata without the topic".into()))?;
        if !t.status.is_ok() {
            return Err(ClientError::server(&t.status));
        }
        Ok(t.partitions.len() as u32)
    }

    /// Creates a topic. Settings are `key=value` pairs (see PROTOCOL.md).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        // Not retried: a lost response would turn into `topic_already_exists`.
        let r: CreateTopicsResponse = self
            .request_once(
                &CreateTopicsRequest {
                    topics: vec![NewTopic {
                        name: name.to_string(),
                        partitions,
                        configs: configs.to_vec(),
                    }],
                },
                0,
            )
            .await?;
        first_result(r.results)
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let r: DeleteTopicsResponse = self
            .request_once(
                &DeleteTopicsRequest {
                    names: vec![name.to_string()],
                },
                0,
            )
            .await?;
        first_result(r.results)
    }

    /// Changes settings of a live topic (the alterable ones: its plugin policy); `reset`
    /// restores defaults.
    pub async fn alter_topic(
        &self,
        name: &str,
        set: &[(String, String)],
        reset: &[String],
    ) -> Result<(), ClientError> {
        let resp: AlterTopicResponse = self
            .request(
                &AlterTopicRequest {
                    name: name.to_string(),
                    set: set.to_vec(),
                    reset: reset.to_vec(),
                },
                0,
            )
            .await?;
        if resp.status.is_ok() {
            Ok(())
        } else {
            Err(ClientError::server(&resp.status))
        }
    }

    /// Creates a pipeline (it starts at once, from the earliest stored input offsets).
    pub async fn create_pipeline(&self, spec: &PipelineSpec) -> Result<(), ClientError> {
        let resp: PipelineResponse = self
            .request_api(&PipelineCreateRequest { spec: spec.clone() })
            .await?;
        status_result(&resp.status)
    }

    /// Pipelines with their progress: the one named, or all when `name` is empty.
    pub async fn list_pipelines(&self, name: &str) -> Result<Vec<PipelineInfo>, ClientError> {
        let resp: PipelineListResponse = self
            .request(
                &PipelineListRequest {
                    name: name.to_string(),
                },
                0,
            )
            .await?;
        Ok(resp.pipelines)
    }

    /// Pauses (`true`) or resumes a pipeline.
    pub async fn pause_pipeline(&self, name: &str, pause: bool) -> Result<(), ClientError> {
        let resp: PipelineResponse = self
            .request_api(&PipelineControlRequest {
                name: name.to_string(),
                pause,
            })
            .await?;
        status_result(&resp.status)
    }

    /// Deletes a pipeline and its progress (what it wrote stays).
    pub async fn delete_pipeline(&self, name: &str) -> Result<(), ClientError> {
        let resp: PipelineResponse = self
            .request_api(&PipelineDeleteRequest {
                name: name.to_string(),
            })
            .await?;
        status_result(&resp.status)
    }

    /// A request whose response body is a [`PipelineResponse`] (shared by several APIs: the
    /// frame names the API, the body type does not).
    async fn request_api<Req: Message>(&self, req: &Req) -> Result<PipelineResponse, ClientError> {
        self.request::<Req, PipelineResponse>(req, 0).await
    }

    /// Deploys a plugin component as `name@version`; `true` when stored now, `false` when
    /// the same bytes were already deployed. Retried like a read: a deploy is idempotent.
    /// Compiling a large component can take seconds, so the wait is longer than usual.
    pub async fn deploy_plugin(
        &self,
        name: &str,
        version: &str,
        component: bytes::Bytes,
    ) -> Result<(bool, PluginInfo), ClientError> {
        let r: PluginDeployResponse = self
            .request(
                &PluginDeployRequest {
                    name: name.to_string(),
                    version: version.to_string(),
                    component,
                },
                60_000,
            )
            .await?;
        if !r.status.is_ok() {
            return Err(ClientError::server(&r.status));
        }
        Ok((r.created, r.plugin))
    }

    /// Deployed plugins: every version of `name`, or all when `name` is empty.
    pub async fn list_plugins(&self, name: &str) -> Result<Vec<PluginInfo>, ClientError> {
        let r: PluginListResponse = self
            .request(
                &PluginListRequest {
                    name: name.to_string(),
                },
                0,
            )
            .await?;
        Ok(r.plugins)
    }

    /// Removes `name@version`.
    pub async fn remove_plugin(&self, name: &str, version: &str) -> Result<(), ClientError> {
        let r: PluginRemoveResponse = self
            .request_once(
                &PluginRemoveRequest {
                    name: name.to_string(),
                    version: version.to_string(),
                },
                0,
            )
            .await?;
        if r.status.is_ok() {
            Ok(())
        } else {
            Err(ClientError::server(&r.status))
        }
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicListing>, ClientError> {
        let r: ListTopicsResponse = self.request(&ListTopicsRequest, 0).await?;
        Ok(r.topics)
    }

    /// Members, controller and partition leadership as the connected node sees them (a node
    /// that runs alone answers with status `not_in_cluster` and itself as the only member).
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        self.request(&ClusterStatusRequest, 0).await
    }

    /// Starts moving a partition to `replicas` (the first is its preferred leader), or with
    /// `None` cancels the move in progress. Returns once the controller committed the start:
    /// the new replicas then copy the log and the old ones leave when the new ones are in
    /// sync ([`cluster_status`](Self::cluster_status) shows `adding` and `removing` until
    /// then).
    pub async fn reassign_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: Option<Vec<u32>>,
    ) -> Result<(), ClientError> {
        let r: ReassignPartitionsResponse = self
            .request_once(
                &ReassignPartitionsRequest {
                    partitions: vec![PartitionReassignment {
                        topic: topic.to_string(),
                        partition,
                        replicas,
                    }],
                },
                0,
            )
            .await?;
        first_partition_result(r.results)
    }

    /// Asks the controller for a leader election on one partition: the preferred replica,
    /// or an unclean one (which may lose acknowledged records; only for a partition with no
    /// live in-sync replica).
    pub async fn elect_leader(
        &self,
        topic: &str,
        partition: u32,
        election: ElectionType,
    ) -> Result<(), ClientError> {
        let r: ElectLeadersResponse = self
            .request_once(
                &ElectLeadersRequest {
                    election,
                    partitions: vec![(topic.to_string(), partition)],
                },
                0,
            )
            .await?;
        first_partition_result(r.results)
    }

    /// Settings and offsets of a topic.
    ///
    /// In a cluster each node describes the partitions it hosts, so the partitions are asked
    /// of their leaders (from fresh metadata) and merged; a partition without a leader is
    /// left out, and a leader that cannot answer fails the call (retry).
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        if self.inner.direct {
            return self.describe_here(name).await;
        }
        let m: MetadataResponse = self
            .request(
                &MetadataRequest {
                    topics: Some(vec![name.to_string()]),
                },
                0,
            )
            .await?;
        if m.brokers.len() <= 1 {
            return self.describe_here(name).await;
        }
        let Some(t) = m.topics.into_iter().next() else {
            return Err(ClientError::Protocol("empty metadata response".into()));
        };
        if !t.status.is_ok() {
            return Err(ClientError::server(&t.status));
        }
        let addrs: HashMap<u32, String> =
            m.brokers.into_iter().map(|b| (b.node_id, b.addr)).collect();
        let mut by_leader: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for p in &t.partitions {
            if let Some(addr) = addrs.get(&p.leader) {
                by_leader.entry(addr.clone()).or_default().push(p.partition);
            }
        }
        let mut merged: Option<TopicDescription> = None;
        let mut partitions = Vec::new();
        let mut last_error = None;
        for (addr, led) in by_leader {
            match self.node(&addr).await.describe_here(name).await {
                Ok(d) => {
                    partitions.extend(
                        d.partitions
                            .iter()
                            .filter(|x| led.contains(&x.partition))
                            .copied(),
                    );
                    merged.get_or_insert(d);
                }
                Err(e) => last_error = Some(e),
            }
        }
        // A leader that could not answer (not hosting the partition yet, or gone): the
        // caller retries rather than gets a partial description.
        if let Some(e) = last_error {
            return Err(e);
        }
        let Some(mut d) = merged else {
            return Err(ClientError::Server {
                code: ErrorCode::NotLeader,
                message: format!("no partition of {name} has a leader"),
            });
        };
        partitions.sort_by_key(|p| p.partition);
        d.partitions = partitions;
        Ok(d)
    }

    /// Settings and offsets of the partitions the connected node hosts.
    async fn describe_here(&self, name: &str) -> Result<TopicDescription, ClientError> {
        let r: DescribeTopicsResponse = self
            .request(
                &DescribeTopicsRequest {
                    names: vec![name.to_string()],
                },
                0,
            )
            .await?;
        let t = r
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("empty describe response".into()))?;
        if !t.status.is_ok() {
            return Err(ClientError::server(&t.status));
        }
        Ok(t)
    }

    /// Looks up one partition's offset: [`EARLIEST_TIMESTAMP`], [`LATEST_TIMESTAMP`] or a time
    /// in ms. `Ok(None)` when no record is at or after that time.
    pub async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<u64>, ClientError> {
        let cfg = &self.inner.config;
        let mut backoff = cfg.retry_backoff_ms;
        let mut attempt = 0;
        loop {
            let r = match self.leader_for(topic, partition).await {
                Ok(leader) => leader.list_offset_here(topic, partition, timestamp).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.is_retriable() && attempt < cfg.retries_max => {
                    self.invalidate_routes(topic);
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                    backoff = (backoff * 2).min(cfg.retry_backoff_ms_max);
                }
                other => return other,
            }
        }
    }

    async fn list_offset_here(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<u64>, ClientError> {
        let r: ListOffsetsResponse = self
            .request_once(
                &ListOffsetsRequest {
                    topics: vec![ListOffsetsTopic {
                        name: topic.to_string(),
                        partitions: vec![ListOffsetsPartition {
                            partition,
                            timestamp,
                        }],
                    }],
                },
                0,
            )
            .await?;
        let p = r
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .next()
            .ok_or_else(|| ClientError::Protocol("empty list-offsets response".into()))?;
        if !p.status.is_ok() {
            return Err(ClientError::server(&p.status));
        }
        Ok(u64::try_from(p.offset).ok())
    }
}

fn first_result(results: Vec<TopicResult>) -> Result<(), ClientError> {
    let r = results
        .into_iter()
        .next()
        .ok_or_else(|| ClientError::Protocol("empty result list".into()))?;
    if r.status.is_ok() {
        Ok(())
    } else {
        Err(ClientError::server(&r.status))
    }
}

/// Splits a response frame, turning a request-level error into [`ClientError::Server`].
pub(crate) fn decode_response<Resp: Message>(frame: Bytes) -> Result<Resp, ClientError> {
    let (header, body) =
        ResponseHeader::decode(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if header.error != 0 {
        let message = Reader::new(body)
            .string("message")
            .unwrap_or_else(|_| "(no message)".into());
        return Err(ClientError::Server {
            code: ErrorCode::from_code(header.error),
            message,
        });
    }
    Resp::from_bytes(body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// The frame prefix followed by the body's chunks (record batches are not copied).
fn request_chunks<Req: Message>(req: &Req, id: u64) -> Vec<Bytes> {
    let body = req.encode_chunks();
    let len = body.iter().map(Bytes::len).sum();
    let mut chunks = Vec::with_capacity(body.len() + 1);
    chunks.push(frame_prefix(Req::API.code(), Req::VERSION, id, len));
    chunks.extend(body);
    chunks
}

fn status_result(status: &Status) -> Result<(), ClientError> {
    if status.is_ok() {
        Ok(())
    } else {
        Err(ClientError::server(status))
    }
}
