//! The network side of a node: accepts QUIC connections, reads one request frame per
//! bidirectional stream, dispatches it to a handler and writes the response frame.
//!
//! Shutdown is an input: [`Node::shutdown`] stops accepting connections, answers new requests
//! with `shutting_down`, waits (bounded) for in-flight requests, flushes every partition, then
//! closes QUIC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_proto::codec::Writer;
use quiver_proto::frame::{
    FRAME_HEADER_BYTES, FRAME_LENGTH_BYTES, check_length_prefix, frame_prefix,
};
use quiver_proto::messages::*;
use quiver_proto::{ApiKey, ErrorCode, RequestHeader};
use quiver_transport::{Connection, RecvStream, SendStream, Server, ServerIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::chains::ConnectionChains;
use crate::cluster::{Cluster, ClusterSettings};
use crate::config::BrokerConfig;
use crate::handlers::{self, HandlerLimits};
use crate::order::{ProduceOrder, Turn};
use crate::pipelines::Pipelines;

/// QUIC application close code sent to clients when the node shuts down.
pub const CLOSE_SHUTDOWN: u32 = 1;
/// Stream reset/stop code for a refused request.
pub const STREAM_REFUSED: u32 = 2;
/// Largest chunk written per call by the transport probe.
const PROBE_CHUNK_BYTES: usize = 256 << 10;

/// Consumer-side chains one connection may run at once (one per chain and partition).
const FETCH_CHAINS_PER_CONNECTION_MAX: usize = 64;

struct Shared {
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
    pipelines: Arc<Pipelines>,
    limits: HandlerLimits,
    advertised: String,
    request_read: Duration,
    probe_bytes_max: u64,
    /// Bytes of request frames being read or handled, across all connections: a frame's
    /// length is reserved before its bytes are read.
    request_bytes: Arc<tokio::sync::Semaphore>,
    /// Bytes fetch responses may hold at once across all connections.
    fetch_bytes: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    requests: TaskTracker,
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    server: Arc<Server>,
    local_addr: SocketAddr,
    ca_file: Option<PathBuf>,
    accept_task: tokio::task::JoinHandle<()>,
    retention_task: tokio::task::JoinHandle<()>,
    /// Writes guest log lines to the plugin log topic.
    log_task: Option<tokio::task::JoinHandle<()>>,
    /// Makes local partitions follow the cluster metadata.
    reconcile_task: Option<tokio::task::JoinHandle<()>>,
    grace: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("local_addr", &self.local_addr)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens storage, binds the QUIC endpoint and starts serving.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display())
        })?;
        let tls_dir = config.data_dir.join("tls");
        let (identity, ca_file) = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => (ServerIdentity::from_pem_files(cert, key)?, None),
            (None, None) => {
                let ca_dir = config.cluster.dev_ca_dir.clone().unwrap_or(tls_dir.clone());
                let (id, ca) = ServerIdentity::load_or_generate_dev_with_ca(
                    &tls_dir,
                    &ca_dir,
                    &config.tls_dev_names,
                )?;
                (id, Some(ca))
            }
            _ => anyhow::bail!("tls_cert and tls_key must be given together"),
        };
        let broker =
            Arc::new(Broker::open(config.node_id, &config.data_dir, &config.topic_defaults).await?);
        let server = Arc::new(Server::bind(
            config.listen,
            &identity,
            quiver_transport::ALPN_CLIENT,
            &config.transport.settings(),
        )?);
        let local_addr = server.local_addr()?;
        let advertised = config
            .advertised_addr
            .clone()
            .unwrap_or_else(|| local_addr.to_string());
        let cluster = match config.cluster.enabled() {
            false => None,
            true => {
                let c = &config.cluster;
                let peer_ca = c.peer_ca.clone().or(ca_file.clone()).ok_or_else(|| {
                    anyhow::anyhow!("cluster mode with tls_cert needs cluster.peer_ca, the CA of every node's certificate")
                })?;
                let trust = quiver_transport::ClientTrust::from_ca_file(&peer_ca)?;
                let settings = ClusterSettings {
                    node_id: config.node_id,
                    client_addr: advertised.clone(),
                    peer_addr: c.peer_advertised_addr.clone().unwrap_or_default(),
                    seeds: c.seeds.clone(),
                    voters: c.controller_voters.iter().copied().collect(),
                    heartbeat: Duration::from_millis(c.heartbeat_ms.max(10)),
                    lease: Duration::from_millis(c.lease_ms.max(c.heartbeat_ms * 2)),
                    election_timeout_ms: (
                        c.election_timeout_ms.max(50),
                        c.election_timeout_ms.max(50) * 2,
                    ),
                    raft_heartbeat_ms: (c.election_timeout_ms / 4).max(10),
                    gossip: {
                        let probe = Duration::from_millis(c.gossip_probe_ms.max(20));
                        crate::cluster::gossip::GossipSettings {
                            expected_members: (c.controller_voters.len() + c.seeds.len()).max(3)
                                as u32,
                            probe_period: probe,
                            probe_rtt: probe / 2,
                            suspect_to_down_after: probe * 4,
                            ..Default::default()
                        }
                    },
                };
                let (cluster, _) = Cluster::start(
                    settings,
                    &config.data_dir,
                    c.peer_listen(local_addr),
                    &identity,
                    &trust,
                    &config.transport.settings(),
                )
                .await?;
                Some(cluster)
            }
        };
        let reconcile_task = cluster
            .as_ref()
            .map(|c| tokio::spawn(crate::cluster::admin::reconcile(c.clone(), broker.clone())));
        let pipelines = Pipelines::open(broker.clone(), broker.catalog())?;
        let log_task = broker
            .plugins()
            .take_log_receiver()
            .map(|rx| tokio::spawn(crate::plugins::write_logs(broker.clone(), rx)));
        let shared = Arc::new(Shared {
            broker,
            cluster,
            pipelines,
            limits: HandlerLimits {
                request_bytes_max: config.request_bytes_max,
                fetch_wait_ms_max: config.fetch_wait_ms_max,
                fetch_bytes_max: config.fetch_bytes_max,
            },
            advertised,
            request_read: Duration::from_millis(config.request_read_ms_max),
            probe_bytes_max: config.probe_bytes_max,
            request_bytes: Arc::new(tokio::sync::Semaphore::new(
                config
                    .in_flight_request_bytes_max
                    .max(config.request_bytes_max),
            )),
            fetch_bytes: Arc::new(tokio::sync::Semaphore::new(
                config
                    .in_flight_fetch_bytes_max
                    .max(config.fetch_bytes_max as usize),
            )),
            shutdown: CancellationToken::new(),
            requests: TaskTracker::new(),
        });
        let accept_task = tokio::spawn(accept_loop(shared.clone(), server.clone()));
        let retention_task = tokio::spawn(retention_loop(
            shared.clone(),
            Duration::from_millis(config.retention_check_interval_ms.max(10)),
        ));
        tracing::info!(addr = %local_addr, data_dir = %config.data_dir.display(), "node serving");
        Ok(Self {
            shared,
            server,
            local_addr,
            ca_file,
            accept_task,
            retention_task,
            log_task,
            reconcile_task,
            grace: Duration::from_millis(config.shutdown_grace_ms),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The generated development CA clients must trust, when no certificate was configured.
    pub fn ca_file(&self) -> Option<&PathBuf> {
        self.ca_file.as_ref()
    }

    /// The node's part in its cluster, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.shared.cluster.as_ref()
    }

    /// The node's data plane (for tests and tools in the same process).
    pub fn broker(&self) -> &Arc<Broker> {
        &self.shared.broker
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests (bounded by
    /// `shutdown_grace_ms`), flush and close every partition, close QUIC.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        // Leadership moves away first, while this node still serves its followers.
        if let Some(c) = &self.shared.cluster {
            c.controlled_shutdown().await;
        }
        self.shared.shutdown.cancel();
        self.accept_task.abort();
        self.retention_task.abort();
        self.shared.requests.close();
        if tokio::time::timeout(self.grace, self.shared.requests.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests still running after the grace period");
        }
        // Pipelines finish the batch in hand and commit it.
        if tokio::time::timeout(self.grace, self.shared.pipelines.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("pipelines still running after the grace period");
        }
        // Lines still queued are dropped; the task holds the broker, which must go.
        if let Some(t) = self.log_task {
            t.abort();
            let _ = t.await;
        }
        if let Some(t) = self.reconcile_task {
            t.abort();
            let _ = t.await;
        }
        if let Some(c) = &self.shared.cluster {
            c.stop().await;
        }
        self.shared.broker.close().await;
        self.server
            .shutdown(CLOSE_SHUTDOWN, "node shutting down")
            .await;
        tracing::info!("shut down");
    }
}

async fn retention_loop(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let broker = shared.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.enforce_retention_blocking()).await;
    }
}

async fn accept_loop(shared: Arc<Shared>, server: Arc<Server>) {
    while let Some(conn) = server.accept().await {
        // Connections are not tracked: they end when QUIC closes them at the end of shutdown.
        // Only requests are waited for.
        tokio::spawn(serve_connection(shared.clone(), conn));
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: Connection) {
    tracing::debug!(remote = %conn.remote_addr(), "connection");
    let order = ProduceOrder::new(shared.request_read);
    let chains = Arc::new(ConnectionChains::new(FETCH_CHAINS_PER_CONNECTION_MAX));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(remote = %conn.remote_addr(), error = %e, "connection ended");
                break;
            }
        };
        let shared2 = shared.clone();
        // Requests of a closing node still get an answer (`shutting_down`), so the tracker
        // spawns even after close(); wait() covers them.
        shared.requests.spawn(serve_stream(
            shared2,
            order.clone(),
            chains.clone(),
            send,
            recv,
        ));
    }
}

fn error_frame(api: u16, request_id: u64, code: ErrorCode, message: &str) -> Bytes {
    let mut w = Writer::new();
    w.string(message);
    quiver_proto::ResponseHeader {
        api,
        error: code.code(),
        request_id,
    }
    .encode(&w.into_bytes())
}

async fn respond(send: &mut SendStream, mut chunks: Vec<Bytes>) {
    if send.write_chunks(&mut chunks).await.is_ok() {
        let _ = send.finish();
    }
}

async fn respond_error(send: &mut SendStream, api: u16, id: u64, code: ErrorCode, message: &str) {
    respond(send, vec![error_frame(api, id, code, message)]).await;
}

/// Waits for `fut` at most the request read timeout, and not past shutdown.
async fn read_bounded<T>(
    shared: &Shared,
    fut: impl std::future::Future<Output = Result<T, quiver_transport::TransportError>>,
) -> Result<T, (ErrorCode, String)> {
    tokio::select! {
        r = tokio::time::timeout(shared.request_read, fut) => match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err((ErrorCode::InvalidRequest, format!("truncated frame: {e}"))),
            Err(_) => Err((ErrorCode::RequestTimedOut, "request not received in time".to_string())),
        },
        _ = shared.shutdown.cancelled() => Err((ErrorCode::ShuttingDown, "node is shutting down".to_string())),
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    order: Arc<ProduceOrder>,
    chains: Arc<ConnectionChains>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    if let Err((code, message)) = read_bounded(&shared, recv.read_exact(&mut prefix)).await {
        if code != ErrorCode::InvalidRequest {
            recv.stop(STREAM_REFUSED);
        }
        respond_error(&mut send, 0, 0, code, &message).await;
        return;
    }
    let length = match check_length_prefix(prefix, shared.limits.request_bytes_max) {
        Ok(n) => n,
        Err(e) => {
            let code = match e {
                quiver_proto::FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                _ => ErrorCode::InvalidRequest,
            };
            recv.stop(STREAM_REFUSED);
            respond_error(&mut send, 0, 0, code, &e.to_string()).await;
            return;
        }
    };
    // The fixed part of the header first: it says whether this is a produce, whose turn in
    // its connection's order must come before it may reserve memory for its body.
    const HEAD_BYTES: usize = FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES;
    let head = match read_bounded(&shared, recv.read_exact_bytes(HEAD_BYTES)).await {
        Ok(b) => b,
        Err((code, message)) => {
            if code != ErrorCode::InvalidRequest {
                recv.stop(STREAM_REFUSED);
            }
            respond_error(&mut send, 0, 0, code, &message).await;
            return;
        }
    };
    let header = match RequestHeader::decode_after_prefix(head) {
        Ok((h, _)) => h,
        Err(e) => {
            respond_error(&mut send, 0, 0, ErrorCode::InvalidRequest, &e.to_string()).await;
            return;
        }
    };
    let (api_code, id) = (header.api, header.request_id);
    let body_bytes = length - HEAD_BYTES;
    // A produce reads its fixed fields and waits for its turn before reserving memory: a
    // request holding memory never waits on another request, so the node-wide bound cannot
    // deadlock with the ordering.
    let mut produce = None;
    let mut rest_bytes = body_bytes;
    if header.api == ApiKey::Produce.code()
        && header.version == 1
        && body_bytes >= ProduceRequest::FIXED_BYTES
    {
        let fixed =
            match read_bounded(&shared, recv.read_exact_bytes(ProduceRequest::FIXED_BYTES)).await {
                Ok(b) => b,
                Err((code, message)) => {
                    recv.stop(STREAM_REFUSED);
                    respond_error(&mut send, api_code, id, code, &message).await;
                    return;
                }
            };
        let sequence = ProduceRequest::peek_sequence(&fixed).unwrap_or(UNORDERED_SEQUENCE);
        let turn = tokio::select! {
            t = order.turn(sequence) => match t {
                Ok(t) => t,
                Err(e) => {
                    recv.stop(STREAM_REFUSED);
                    respond_error(&mut send, api_code, id, ErrorCode::InvalidRequest, &e.to_string()).await;
                    return;
                }
            },
            _ = shared.shutdown.cancelled() => {
                respond_error(&mut send, api_code, id, ErrorCode::ShuttingDown, "node is shutting down").await;
                return;
            }
        };
        rest_bytes -= ProduceRequest::FIXED_BYTES;
        produce = Some((fixed, turn));
    }
    let permit = match read_bounded(&shared, async {
        shared
            .request_bytes
            .clone()
            .acquire_many_owned(rest_bytes as u32)
            .await
            .map_err(|_| quiver_transport::TransportError::Closed)
    })
    .await
    {
        Ok(p) => p,
        Err((code, message)) => {
            recv.stop(STREAM_REFUSED);
            respond_error(&mut send, api_code, id, code, &message).await;
            return;
        }
    };
    let rest = match read_bounded(&shared, recv.read_exact_bytes(rest_bytes)).await {
        Ok(b) => b,
        Err((code, message)) => {
            if code != ErrorCode::InvalidRequest {
                recv.stop(STREAM_REFUSED);
            }
            respond_error(&mut send, api_code, id, code, &message).await;
            return;
        }
    };
    // Request-level checks once the whole frame is in, as for a frame of any other shape.
    if shared.shutdown.is_cancelled() {
        respond_error(
            &mut send,
            api_code,
            id,
            ErrorCode::ShuttingDown,
            "node is shutting down",
        )
        .await;
        return;
    }
    let Some(api) = ApiKey::from_code(api_code) else {
        respond_error(
            &mut send,
            api_code,
            id,
            ErrorCode::UnsupportedApi,
            &format!("unknown api {api_code}"),
        )
        .await;
        return;
    };
    if header.version == 0 || header.version > api.version_max() {
        respond_error(
            &mut send,
            api_code,
            id,
            ErrorCode::UnsupportedVersion,
            &format!("api {api_code} supports versions 1..={}", api.version_max()),
        )
        .await;
        return;
    }
    let body = match produce {
        Some((fixed, turn)) => Body::Produce { fixed, rest, turn },
        None => Body::Whole(rest),
    };
    let outcome = dispatch(
        &shared,
        api,
        header.version,
        &chains,
        body,
        &mut recv,
        &mut send,
    )
    .await;
    // The request's bytes are released once handled; the response holds its own.
    drop(permit);
    match outcome {
        Ok(Some(Response { chunks, _hold })) => {
            let body_bytes = chunks.iter().map(Bytes::len).sum();
            let mut all = Vec::with_capacity(chunks.len() + 1);
            all.push(frame_prefix(api_code, 0, id, body_bytes));
            all.extend(chunks);
            respond(&mut send, all).await;
            drop(_hold);
        }
        Ok(None) => {
            let _ = send.finish();
        }
        Err((code, message)) => respond_error(&mut send, api_code, id, code, &message).await,
    }
}

type DispatchResult = Result<Option<Response>, (ErrorCode, String)>;

/// A response body's chunks, and what must stay reserved until they are sent.
struct Response {
    chunks: Vec<Bytes>,
    _hold: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<Vec<Bytes>> for Response {
    fn from(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks,
            _hold: None,
        }
    }
}

fn decode<M: Message>(body: Bytes) -> Result<M, (ErrorCode, String)> {
    M::from_bytes(body).map_err(|e| {
        (
            ErrorCode::InvalidRequest,
            format!("malformed {:?} request: {e}", M::API),
        )
    })
}

fn one<M: Message>(m: &M) -> Option<Response> {
    Some(vec![m.to_bytes()].into())
}

/// A request body as read: whole, or (for produce) its fixed fields and the rest, holding
/// the request's turn in its connection's produce order.
enum Body {
    Whole(Bytes),
    Produce {
        fixed: Bytes,
        rest: Bytes,
        turn: Option<Turn>,
    },
}

/// `not_in_cluster` for each partition of a cluster-only request to a node alone.
fn alone(partitions: impl Iterator<Item = (String, u32)>) -> Vec<PartitionResult> {
    partitions
        .map(|(topic, partition)| PartitionResult {
            topic,
            partition,
            status: Status::err(
                ErrorCode::NotInCluster,
                "this node runs alone: partitions have no other replicas",
            ),
        })
        .collect()
}

async fn dispatch(
    shared: &Shared,
    api: ApiKey,
    version: u16,
    chains: &ConnectionChains,
    body: Body,
    recv: &mut RecvStream,
    send: &mut SendStream,
) -> DispatchResult {
    let broker = &shared.broker;
    let body = match body {
        Body::Produce { fixed, rest, turn } => {
            let req = ProduceRequest::decode_split(fixed, rest).map_err(|e| {
                (
                    ErrorCode::InvalidRequest,
                    format!("malformed Produce request: {e}"),
                )
            })?;
            return Ok(handlers::produce(broker, &shared.limits, req, turn)
                .await
                .map(|r| r.encode_chunks().into()));
        }
        Body::Whole(b) => b,
    };
    Ok(match api {
        ApiKey::ApiVersions => {
            decode::<ApiVersionsRequest>(body)?;
            one(&handlers::api_versions())
        }
        ApiKey::Metadata => match &shared.cluster {
            Some(c) => one(&crate::cluster::admin::metadata(c, decode(body)?)),
            None => one(&handlers::metadata(
                broker,
                &shared.advertised,
                decode(body)?,
            )),
        },
        ApiKey::CreateTopics => match &shared.cluster {
            Some(c) => one(&crate::cluster::admin::create_topics(c, broker, decode(body)?).await),
            None => one(&handlers::create_topics(broker, decode(body)?).await),
        },
        ApiKey::DeleteTopics => match &shared.cluster {
            Some(c) => {
                one(
                    &crate::cluster::admin::delete_topics(c, &shared.pipelines, decode(body)?)
                        .await,
                )
            }
            None => one(&handlers::delete_topics(broker, &shared.pipelines, decode(body)?).await),
        },
        ApiKey::ClusterStatus => {
            decode::<ClusterStatusRequest>(body)?;
            match &shared.cluster {
                Some(c) => one(&c.status()),
                None => one(&handlers::single_node_status(broker, &shared.advertised)),
            }
        }
        ApiKey::ReassignPartitions => {
            let req: ReassignPartitionsRequest = decode(body)?;
            match &shared.cluster {
                Some(c) => one(&crate::cluster::admin::reassign_partitions(c, req).await),
                None => one(&ReassignPartitionsResponse {
                    results: alone(req.partitions.into_iter().map(|p| (p.topic, p.partition))),
                }),
            }
        }
        ApiKey::ElectLeaders => {
            let req: ElectLeadersRequest = decode(body)?;
            match &shared.cluster {
                Some(c) => one(&crate::cluster::admin::elect_leaders(c, req).await),
                None => one(&ElectLeadersResponse {
                    results: alone(req.partitions.into_iter()),
                }),
            }
        }
        ApiKey::ListTopics => {
            decode::<ListTopicsRequest>(body)?;
            match &shared.cluster {
                Some(c) => one(&crate::cluster::admin::list_topics(c, broker)),
                None => one(&handlers::list_topics(broker)),
            }
        }
        ApiKey::DescribeTopics => one(&handlers::describe_topics(broker, decode(body)?).await),
        ApiKey::AlterTopic => one(&handlers::alter_topic(broker, decode(body)?).await),
        // A produce body shorter than its fixed fields (otherwise handled above).
        ApiKey::Produce => handlers::produce(broker, &shared.limits, decode(body)?, None)
            .await
            .map(|r| r.encode_chunks().into()),
        ApiKey::Fetch => {
            let mut req = FetchRequest::from_bytes_version(body, version).map_err(|e| {
                (
                    ErrorCode::InvalidRequest,
                    format!("malformed Fetch request: {e}"),
                )
            })?;
            let chain = std::mem::take(&mut req.chain);
            if !chain.is_empty() {
                handlers::check_chain(broker, &chain).await?;
            }
            let from: Vec<Vec<u64>> = req
                .topics
                .iter()
                .map(|t| t.partitions.iter().map(|p| p.offset).collect())
                .collect();
            let budget = handlers::FetchBudget {
                bytes: &shared.fetch_bytes,
                wait: shared.request_read,
            };
            let (mut resp, permit) =
                handlers::fetch(broker, &shared.limits, req, &shared.shutdown, budget).await?;
            if !chain.is_empty() {
                handlers::apply_chain(broker, chains, &chain, &from, &mut resp).await;
            }
            // The permit travels with the response: its bytes count until they are sent.
            return Ok(Some(Response {
                chunks: resp.encode_chunks_version(version),
                _hold: Some(permit),
            }));
        }
        ApiKey::ListOffsets => one(&handlers::list_offsets(broker, decode(body)?).await),
        ApiKey::PluginDeploy => one(&handlers::plugin_deploy(broker, decode(body)?).await),
        ApiKey::PluginList => one(&handlers::plugin_list(broker, decode(body)?)?),
        ApiKey::PluginRemove => {
            one(&handlers::plugin_remove(broker, &shared.pipelines, decode(body)?).await)
        }
        ApiKey::PipelineCreate => {
            let req: PipelineCreateRequest = decode(body)?;
            one(&handlers::pipeline_status(
                shared.pipelines.create(&req.spec).await,
            ))
        }
        ApiKey::PipelineList => one(&handlers::pipeline_list(&shared.pipelines, decode(body)?)?),
        ApiKey::PipelineControl => {
            let req: PipelineControlRequest = decode(body)?;
            one(&handlers::pipeline_status(
                shared.pipelines.control(&req.name, req.pause).await,
            ))
        }
        ApiKey::PipelineDelete => {
            let req: PipelineDeleteRequest = decode(body)?;
            one(&handlers::pipeline_status(
                shared.pipelines.delete(&req.name).await,
            ))
        }
        ApiKey::TransportProbe => {
            probe(shared, decode(body)?, recv, send).await?;
            None
        }
    })
}

/// `quiver perf transport`: raw bytes over the same connection settings as real requests.
async fn probe(
    shared: &Shared,
    req: TransportProbeRequest,
    recv: &mut RecvStream,
    send: &mut SendStream,
) -> Result<(), (ErrorCode, String)> {
    let io = |e: quiver_transport::TransportError| (ErrorCode::Unknown, e.to_string());
    match req.direction {
        ProbeDirection::Upload => {
            let mut bytes = 0u64;
            // Each chunk must arrive within the read timeout: a stalled probe is dropped.
            while let Some(chunk) = read_bounded(shared, recv.read_chunk(usize::MAX)).await? {
                bytes += chunk.len() as u64;
            }
            let body = TransportProbeResponse { bytes }.to_bytes();
            let mut chunks = [
                frame_prefix(ApiKey::TransportProbe.code(), 0, 0, body.len()),
                body,
            ];
            send.write_chunks(&mut chunks).await.map_err(io)?;
        }
        ProbeDirection::Download => {
            let total = req.bytes.min(shared.probe_bytes_max);
            let body = TransportProbeResponse { bytes: total }.to_bytes();
            let mut chunks = [
                frame_prefix(ApiKey::TransportProbe.code(), 0, 0, body.len()),
                body,
            ];
            send.write_chunks(&mut chunks).await.map_err(io)?;
            let block = Bytes::from(vec![0x5a; PROBE_CHUNK_BYTES]);
            let mut left = total;
            while left > 0 {
                let n = left.min(PROBE_CHUNK_BYTES as u64) as usize;
                let mut c = [block.slice(..n)];
                send.write_chunks(&mut c).await.map_err(io)?;
                left -= n as u64;
            }
        }
    }
    let _ = send.finish();
    Ok(())
}
