//! Which failed produce attempts the producer retries.
//!
//! How: a scripted peer speaks the real protocol over real QUIC + TLS (quiver-transport with a
//! development CA) and answers each produce request as its script says: per-partition error
//! codes, an error frame, or no answer at all. A real node cannot be made to fail on cue in
//! these ways, which is why the peer exists; it answers metadata like a one-partition node.
//! The peer counts the produce requests it receives, so each test asserts exactly how many
//! attempts the producer made and which error reached the caller.
//!
//! Why: a retry is only safe when the failed attempt certainly stored nothing. Retrying an
//! attempt whose outcome is unknown stores records twice, so by default the producer must
//! surface it as `OutcomeUnknown` after one attempt, and retry it only when the user opts into
//! at-least-once delivery.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use quiver_client::{
    Client, ClientConfig, ErrorCode, ProduceError, Producer, ProducerConfig, ProducerRecord,
};
use quiver_proto::frame::FRAME_LENGTH_BYTES;
use quiver_proto::messages::{
    ApiVersionsResponse, Message, MetadataResponse, PartitionMetadata, ProducePartitionResponse,
    ProduceRequest, ProduceResponse, ProduceTopicResponse, Status, TopicMetadata,
};
use quiver_proto::{ApiKey, RequestHeader, ResponseHeader, Writer};
use quiver_transport::{ALPN_CLIENT, RecvStream, SendStream, Server, ServerIdentity};

const LIMIT: Duration = Duration::from_secs(60);

/// How the peer answers one produce request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Success, base offset 0.
    Ok,
    /// The partition answered with this code.
    Partition(ErrorCode),
    /// An error frame for the whole request (the request was refused before handling).
    Frame(ErrorCode),
    /// No answer; the stream stays open.
    Silent,
}

struct Peer {
    addr: String,
    ca: std::path::PathBuf,
    produces: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
    _server: Arc<Server>,
}

/// Starts a peer that answers the n-th produce request with `script[n]` (`Ok` past its end).
async fn peer(script: Vec<Answer>) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let (identity, ca) = ServerIdentity::load_or_generate_dev(dir.path(), &[]).unwrap();
    let server = Arc::new(
        Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            ALPN_CLIENT,
            &Default::default(),
        )
        .unwrap(),
    );
    let addr = server.local_addr().unwrap().to_string();
    let produces = Arc::new(AtomicU32::new(0));
    let (srv, count) = (server.clone(), produces.clone());
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Some(conn) = srv.accept().await {
            let (count, script) = (count.clone(), script.clone());
            tokio::spawn(async move {
                while let Ok(Some((send, recv))) = conn.accept_bi().await {
                    tokio::spawn(answer(send, recv, count.clone(), script.clone()));
                }
            });
        }
    });
    Peer {
        addr,
        ca,
        produces,
        _dir: dir,
        _server: server,
    }
}

async fn answer(
    mut send: SendStream,
    mut recv: RecvStream,
    count: Arc<AtomicU32>,
    script: Arc<Vec<Answer>>,
) {
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    if recv.read_exact(&mut prefix).await.is_err() {
        return;
    }
    let len = u32::from_le_bytes(prefix) as usize;
    let Ok(rest) = recv.read_exact_bytes(len).await else {
        return;
    };
    let (header, body) = RequestHeader::decode_after_prefix(rest).unwrap();
    let reply = |body: bytes::Bytes| {
        ResponseHeader {
            api: header.api,
            error: 0,
            request_id: header.request_id,
        }
        .encode(&body)
    };
    let frame = match ApiKey::from_code(header.api) {
        Some(ApiKey::ApiVersions) => reply(ApiVersionsResponse { apis: vec![] }.to_bytes()),
        Some(ApiKey::Metadata) => reply(
            MetadataResponse {
                brokers: vec![],
                topics: vec![TopicMetadata {
                    name: "t".into(),
                    status: Status::ok(),
                    partitions: vec![PartitionMetadata {
                        partition: 0,
                        leader: 1,
                        leader_epoch: 0,
                    }],
                }],
            }
            .to_bytes(),
        ),
        Some(ApiKey::Produce) => {
            ProduceRequest::from_bytes(body).expect("the producer sends valid requests");
            let n = count.fetch_add(1, Ordering::SeqCst) as usize;
            let status = match script.get(n).copied().unwrap_or(Answer::Ok) {
                Answer::Ok => Status::ok(),
                Answer::Partition(code) => Status::err(code, "scripted"),
                Answer::Frame(code) => {
                    let mut w = Writer::new();
                    w.string("scripted");
                    let frame = ResponseHeader {
                        api: header.api,
                        error: code.code(),
                        request_id: header.request_id,
                    }
                    .encode(&w.into_bytes());
                    let _ = send.write_all(&frame).await;
                    let _ = send.finish();
                    return;
                }
                Answer::Silent => {
                    // Hold the stream open well past the producer's timeout.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
            };
            reply(
                ProduceResponse {
                    topics: vec![ProduceTopicResponse {
                        name: "t".into(),
                        partitions: vec![ProducePartitionResponse {
                            partition: 0,
                            status,
                            base_offset: 0,
                        }],
                    }],
                }
                .to_bytes(),
            )
        }
        _ => return,
    };
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
}

/// Sends one record through a producer with `config` and returns its outcome.
async fn produce_one(
    peer: &Peer,
    config: ProducerConfig,
) -> Result<quiver_client::RecordMetadata, ProduceError> {
    // A short client-side wait, so a silent peer is a timeout rather than a long hang.
    let mut client_config = ClientConfig::new(peer.addr.clone(), peer.ca.clone());
    client_config.request_timeout_ms = 1_000;
    let client = Client::connect(client_config).await.unwrap();
    let producer = Producer::new(client, config);
    let d = producer
        .send(ProducerRecord::new("t", "v").partition(0))
        .await
        .unwrap();
    d.await
}

fn config() -> ProducerConfig {
    ProducerConfig {
        linger_ms: 0,
        retries_max: 3,
        retry_backoff_ms: 1,
        request_timeout_ms: 500,
        ..ProducerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_that_stored_nothing_are_retried() {
    tokio::time::timeout(LIMIT, async {
        let p = peer(vec![
            Answer::Partition(ErrorCode::ShuttingDown),
            Answer::Frame(ErrorCode::Busy),
            Answer::Partition(ErrorCode::NotLeader),
        ])
        .await;
        let meta = produce_one(&p, config())
            .await
            .expect("fourth attempt succeeds");
        assert_eq!(meta.offset, Some(0));
        assert_eq!(p.produces.load(Ordering::SeqCst), 4);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_retries_max() {
    tokio::time::timeout(LIMIT, async {
        let p = peer(vec![Answer::Partition(ErrorCode::ShuttingDown); 10]).await;
        match produce_one(&p, config()).await {
            Err(ProduceError::Client(e)) => assert_eq!(e.code(), Some(ErrorCode::ShuttingDown)),
            other => panic!("expected shutting_down, got {other:?}"),
        }
        assert_eq!(
            p.produces.load(Ordering::SeqCst),
            4,
            "one attempt + retries_max"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_are_not_retried_by_default() {
    tokio::time::timeout(LIMIT, async {
        // The node's own "append did not complete in time": it may still be applied.
        let p = peer(vec![Answer::Partition(ErrorCode::RequestTimedOut)]).await;
        match produce_one(&p, config()).await {
            Err(ProduceError::OutcomeUnknown(e)) => {
                assert_eq!(e.code(), Some(ErrorCode::RequestTimedOut))
            }
            other => panic!("expected an unknown outcome, got {other:?}"),
        }
        assert_eq!(p.produces.load(Ordering::SeqCst), 1);

        // No answer at all: the client times out not knowing.
        let p = peer(vec![Answer::Silent]).await;
        match produce_one(&p, config()).await {
            Err(ProduceError::OutcomeUnknown(quiver_client::ClientError::Timeout(_))) => {}
            other => panic!("expected an unknown outcome after a timeout, got {other:?}"),
        }
        assert_eq!(p.produces.load(Ordering::SeqCst), 1);

        // The same request refused as a whole before it was handled: safe, retried.
        let p = peer(vec![Answer::Frame(ErrorCode::RequestTimedOut)]).await;
        produce_one(&p, config()).await.unwrap();
        assert_eq!(p.produces.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_retries_unknown_outcomes() {
    tokio::time::timeout(LIMIT, async {
        let p = peer(vec![
            Answer::Silent,
            Answer::Partition(ErrorCode::RequestTimedOut),
        ])
        .await;
        let cfg = ProducerConfig {
            retry_unknown_outcome: true,
            ..config()
        };
        produce_one(&p, cfg).await.expect("third attempt succeeds");
        assert_eq!(p.produces.load(Ordering::SeqCst), 3);
    })
    .await
    .unwrap();
}
