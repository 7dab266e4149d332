//! Hostile and malformed input against a real node.
//!
//! How: every test starts a node in-process on 127.0.0.1:0 with a temporary data directory, a
//! 1 MiB request limit and a short request read timeout, creates two topics with the real client,
//! and has a well-behaved `Producer` store records before the abuse and again after it. The abuse
//! goes over raw QUIC streams (`quiver_transport`, ALPN `quiver/1`): bytes are written where a
//! client would write one request frame, and `check` classifies what comes back (an error frame
//! and its code, a success frame, an empty finish, a stopped stream) against what the test
//! expects. Expectations come from the framing rules of `quiver_proto::frame` and node.rs; for
//! the seeded random buffers, `verdict` derives the exact error code from the bytes alone, so even
//! the random cases assert a specific answer. Batch faults (bad CRC, oversized record, header
//! contradicting its records) are answered per partition inside a normal ProduceResponse, and
//! each refused produce is followed by a check that the log end did not move. Finally a
//! `Consumer` reads the topic back and must find exactly the acknowledged records, at their
//! acknowledged offsets, in order, with their contents.
//!
//! Why: a broker serves whatever a network peer sends. What must hold is that every malformed
//! request gets a specific, decodable answer (or its stream is stopped) instead of a panic or a
//! hung task; that a stalled stream costs only its own slot; and that through all of it nothing
//! the broker acknowledged is lost or reordered, and nothing it refused is stored. Every wait is
//! bounded by `tokio::time::timeout` so a hang fails the test rather than stalling CI; nothing
//! asserts on speed. Random inputs come from a seed (`QUIVER_TEST_SEED`, printed on failure).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use futures::FutureExt;
use quiver_broker::{BrokerConfig, Node};
use quiver_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};
use quiver_proto::batch::CRC_START;
use quiver_proto::codec::Reader;
use quiver_proto::messages::{
    Acks, AlterTopicRequest, ApiVersionsRequest, ApiVersionsResponse, ClusterStatusRequest,
    CreateTopicsRequest, DeleteTopicsRequest, DescribeTopicsRequest, ElectLeadersRequest,
    FetchPartition, FetchRequest, FetchResponse, FetchTopic, LATEST_TIMESTAMP, ListOffsetsRequest,
    ListTopicsRequest, Message, MetadataRequest, PipelineControlRequest, PipelineCreateRequest,
    PipelineDeleteRequest, PipelineListRequest, PluginDeployRequest, PluginListRequest,
    PluginRemoveRequest, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
    ReassignPartitionsRequest, Status, TransportProbeRequest,
};
use quiver_proto::{ApiKey, BatchBuilder, Compression, ErrorCode, RequestHeader, ResponseHeader};
use quiver_transport::{
    ALPN_CLIENT, ClientTrust, Connection, RecvStream, SendStream, TransportSettings,
};
use tempfile::TempDir;

/// Largest request frame the test nodes accept.
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// How long the test nodes wait for a request's bytes before answering `request_timed_out`.
const REQUEST_READ_MS_MAX: u64 = 2_000;
/// Bound on one exchange; well above `REQUEST_READ_MS_MAX` so a timed-out answer is seen.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(20);
/// Bound on a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Largest response the raw client reads.
const RESPONSE_BYTES_MAX: usize = 4 << 20;
/// Default seed of the random inputs; `QUIVER_TEST_SEED` overrides it.
const SEED: u64 = 0x0bad_1a9e_5eed;

/// Topic with default settings; the well-behaved producer writes here, the abuse targets it too.
const EVENTS: &str = "events";
/// Topic created with `max.record.bytes = SMALL_RECORD_BYTES_MAX`.
const SMALL: &str = "small";
const SMALL_RECORD_BYTES_MAX: usize = 1024;

// Batch header fields the tests patch (see the layout table in `quiver_proto::batch`).
const OFF_BATCH_LENGTH: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_RECORD_COUNT: usize = 57;

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_rules_get_error_answers() -> Result<()> {
    survives(REQUEST_READ_MS_MAX, async |t| {
        let raw = t.raw().await?;
        framing_errors(&raw.conn).await?;
        api_and_version_errors(&raw.conn).await?;
        fetch_version_1(&raw.conn).await?;
        garbage_bodies(&raw.conn).await?;
        random_garbage(&raw.conn, seed(), 96).await?;
        // The connection that carried all of that still serves a valid request.
        let versions: ApiVersionsResponse = request(&raw.conn, &ApiVersionsRequest).await?;
        ensure!(!versions.apis.is_empty(), "empty api list after the abuse");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_per_partition_and_never_stored() -> Result<()> {
    survives(REQUEST_READ_MS_MAX, async |t| {
        let raw = t.raw().await?;
        bad_batches(t, &raw.conn).await?;
        record_size_limit(t, &raw.conn).await?;
        unknown_partitions_and_offsets(t, &raw.conn).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_time_out() -> Result<()> {
    survives(REQUEST_READ_MS_MAX, async |t| {
        let raw = t.raw().await?;
        // A stream that sent part of a length prefix, one that sent part of a frame, and one on
        // the well-behaved client's own connection; none ever finishes. They wait concurrently.
        let on_client = t.client.open_raw().await?;
        let on_raw = raw.conn.open_bi().await?;
        let half_frame = raw.conn.open_bi().await?;
        let half = truncated_frame(100, 50);
        let (a, b, c) = tokio::join!(
            stall(on_client, &[0x10, 0x00]),
            stall(on_raw, &[0x10, 0x00]),
            stall(half_frame, &half),
        );
        let replies = [
            ("2-byte prefix on the client connection", a),
            ("2-byte prefix", b),
            ("half a frame", c),
        ];
        for (what, reply) in replies {
            let reply = reply.with_context(|| what.to_string())?;
            ensure!(
                matches!(
                    reply,
                    Reply::Error {
                        code: ErrorCode::RequestTimedOut,
                        ..
                    } | Reply::Closed(_)
                ),
                "{what}: expected request_timed_out or a stopped stream, got {reply:?}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_client_does_not_disturb_a_well_behaved_one() -> Result<()> {
    // The read timeout is far longer than the test may run, so the stalled streams below stay
    // stalled throughout. If one could hold up other requests, the well-behaved producer and
    // consumer would hang and the test's bound would fail it; no clock is compared.
    survives(600_000, async |t| {
        let raw = t.raw().await?;
        let mut stalled = Vec::new();
        for _ in 0..4 {
            stalled.push(open_stalled(raw.conn.open_bi().await?, &[0x10, 0x00]).await?);
        }
        stalled.push(open_stalled(raw.conn.open_bi().await?, &truncated_frame(100, 50)).await?);
        stalled.push(open_stalled(t.client.open_raw().await?, &[0x10, 0x00]).await?);

        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let abuser = async {
            let mut rng = Rng(seed());
            let mut rounds = 0u32;
            while !*done_rx.borrow() {
                abuse_round(&raw.conn, &mut rng)
                    .await
                    .with_context(|| format!("abuse round {rounds}"))?;
                rounds += 1;
            }
            Ok::<_, anyhow::Error>(rounds)
        };
        let well_behaved = async {
            let acked = produce_acknowledged(&t.client, "during", 200).await;
            let _ = done_tx.send(true);
            acked
        };
        let (rounds, during) = tokio::join!(abuser, well_behaved);
        let (rounds, during) = (rounds?, during?);
        ensure!(rounds > 0, "the abuser never completed a round");
        ensure!(
            during.len() == 200,
            "{} of 200 records acknowledged",
            during.len()
        );

        // The stalled streams were pending the whole time, and the server still holds them:
        // finishing one now gets the answer a short stream deserves.
        for (i, (send, recv)) in stalled.iter_mut().enumerate() {
            ensure!(
                recv.read_chunk(64).now_or_never().is_none(),
                "stalled stream {i} was answered or closed while it was stalled"
            );
            send.finish()?;
            let reply = read_reply(recv).await?;
            ensure!(
                matches!(
                    reply,
                    Reply::Error {
                        code: ErrorCode::InvalidRequest,
                        ..
                    }
                ),
                "stalled stream {i} finished early: expected invalid_request, got {reply:?}"
            );
        }
        Ok(during)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Abuse

async fn framing_errors(conn: &Connection) -> Result<()> {
    use ErrorCode::*;
    let limit = REQUEST_BYTES_MAX as u32;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty stream", vec![], Expect::Error(InvalidRequest)),
        ("3 bytes", vec![1, 2, 3], Expect::Error(InvalidRequest)),
        (
            "length 100, 10 bytes",
            truncated_frame(100, 10),
            Expect::Error(InvalidRequest),
        ),
        (
            "length 0",
            0u32.to_le_bytes().to_vec(),
            Expect::Error(InvalidRequest),
        ),
        (
            "length 11, shorter than a header",
            truncated_frame(11, 11),
            Expect::Error(InvalidRequest),
        ),
        (
            "length at the limit, 100 bytes",
            truncated_frame(limit, 100),
            Expect::Error(InvalidRequest),
        ),
        (
            "length one over the limit",
            truncated_frame(limit + 1, 100),
            Expect::Error(FrameTooLarge),
        ),
        (
            "length u32::MAX",
            u32::MAX.to_le_bytes().to_vec(),
            Expect::Error(FrameTooLarge),
        ),
        (
            "length u32::MAX, then more bytes",
            truncated_frame(u32::MAX, 4096),
            Expect::Error(FrameTooLarge),
        ),
        (
            "smallest valid frame: api_versions, empty body",
            frame(ApiKey::ApiVersions.code(), 1, 1, b"").to_vec(),
            Expect::Answered,
        ),
    ];
    for (what, input, expect) in cases {
        ensure!(
            matches!(expect, Expect::Answered) || verdict(&input) == expect,
            "{what}: the framing model disagrees with the case"
        );
        let reply = check(conn, &input, expect).await.context(what)?;
        if let Reply::Error {
            api, request_id, ..
        } = reply
        {
            // Before the 16-byte header is in there is nothing to echo; once it is (a frame
            // truncated later), the server echoes what it read.
            let echo = if input.len() >= 16 && verdict(&input) != Expect::Error(FrameTooLarge) {
                (
                    u16::from_le_bytes([input[4], input[5]]),
                    u64::from_le_bytes(input[8..16].try_into().context("8 bytes")?),
                )
            } else {
                (0, 0)
            };
            ensure!(
                (api, request_id) == echo,
                "{what}: echoed {api}/{request_id}, expected {echo:?}"
            );
        }
    }
    Ok(())
}

async fn api_and_version_errors(conn: &Connection) -> Result<()> {
    use ErrorCode::*;
    let produce = ApiKey::Produce.code();
    let cases = [
        (777, 1, UnsupportedApi),
        (u16::MAX, 1, UnsupportedApi),
        (produce, 0, UnsupportedVersion),
        (produce, 99, UnsupportedVersion),
        (ApiKey::ApiVersions.code(), 0, UnsupportedVersion),
        (ApiKey::Fetch.code(), u16::MAX, UnsupportedVersion),
    ];
    for (i, (api, version, code)) in cases.into_iter().enumerate() {
        let id = 0xfeed_0000 + i as u64;
        let reply = check(conn, &frame(api, version, id, b"body"), Expect::Error(code))
            .await
            .with_context(|| format!("api {api} version {version}"))?;
        ensure!(
            matches!(reply, Reply::Error { api: a, request_id: r, .. } if a == api && r == id),
            "api {api} version {version}: api and request id not echoed: {reply:?}"
        );
    }
    Ok(())
}

/// A version 1 fetch (no chain) is still served, and answered in the version 1 layout (no
/// `next_offset`); a version 2 body sent as version 1 has trailing bytes and is refused.
async fn fetch_version_1(conn: &Connection) -> Result<()> {
    let v2 = FetchRequest {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            name: "no-such-topic".into(),
            partitions: vec![FetchPartition {
                partition: 0,
                offset: 0,
                partition_max_bytes: 1 << 20,
            }],
        }],
        chain: vec![],
    }
    .to_bytes();
    let v1 = &v2[..v2.len() - 4];
    let fetch = ApiKey::Fetch.code();
    match check(conn, &frame(fetch, 1, 41, v1), Expect::Answered).await? {
        Reply::Success { body, .. } => {
            let resp =
                FetchResponse::from_bytes_version(body.clone(), 1).context("a version 1 answer")?;
            ensure!(
                resp.topics[0].partitions[0].status.code == ErrorCode::UnknownTopicOrPartition,
                "{resp:?}"
            );
            ensure!(
                FetchResponse::from_bytes(body).is_err(),
                "the answer has no next_offset"
            );
        }
        other => bail!("version 1 fetch got {other:?}"),
    }
    check(
        conn,
        &frame(fetch, 1, 42, &v2),
        Expect::Error(ErrorCode::InvalidRequest),
    )
    .await?;
    Ok(())
}

/// A well-framed request of every API whose body is three 0xff bytes: each decoder refuses it
/// (a bad selector, acks or direction byte, a truncated count, or trailing bytes).
async fn garbage_bodies(conn: &Connection) -> Result<()> {
    for (i, api) in ApiKey::ALL.iter().enumerate() {
        let id = 0xbad_0000 + i as u64;
        let input = frame(api.code(), 1, id, &[0xff; 3]);
        let expect = Expect::Error(ErrorCode::InvalidRequest);
        ensure!(verdict(&input) == expect, "{api:?}: 0xff bodies decode");
        let reply = check(conn, &input, expect)
            .await
            .with_context(|| format!("{api:?} with a garbage body"))?;
        ensure!(
            matches!(reply, Reply::Error { api: a, request_id: r, .. } if a == api.code() && r == id),
            "{api:?}: api and request id not echoed: {reply:?}"
        );
    }
    Ok(())
}

async fn random_garbage(conn: &Connection, seed: u64, count: usize) -> Result<()> {
    let mut rng = Rng(seed);
    for i in 0..count {
        let input = garbage(&mut rng, i);
        check(conn, &input, verdict(&input))
            .await
            .with_context(|| {
                format!("random input {i} of seed {seed} (rerun with QUIVER_TEST_SEED={seed})")
            })?;
    }
    Ok(())
}

async fn bad_batches(t: &TestNode, conn: &Connection) -> Result<()> {
    use ErrorCode::*;
    let good = batch(&[b"one", b"two", b"three"]);

    let mut crc_header = good.clone();
    crc_header[CRC_START + 10] ^= 0x01;
    let mut crc_value = good.clone();
    *crc_value.last_mut().context("empty batch")? ^= 0x40;
    let mut magic = good.clone();
    magic[OFF_MAGIC] = 9;
    // Header says four records, last offset delta says three.
    let mut count_only = good.clone();
    put_u32(&mut count_only, OFF_RECORD_COUNT, 4);
    reseal(&mut count_only);
    // Header consistent with itself (four records) but the batch holds three.
    let mut count_and_delta = good.clone();
    put_u32(&mut count_and_delta, OFF_RECORD_COUNT, 4);
    put_u32(&mut count_and_delta, OFF_LAST_OFFSET_DELTA, 3);
    reseal(&mut count_and_delta);
    let mut zero_count = good.clone();
    put_u32(&mut zero_count, OFF_RECORD_COUNT, 0);
    reseal(&mut zero_count);
    let mut reserved_bit = good.clone();
    put_u16(&mut reserved_bit, OFF_ATTRIBUTES, 1 << 7);
    reseal(&mut reserved_bit);
    let mut control = good.clone();
    put_u16(&mut control, OFF_ATTRIBUTES, 1 << 5);
    reseal(&mut control);
    // Claims lz4 but the records section is not lz4: decompression must fail cleanly.
    let mut not_lz4 = good.clone();
    put_u16(&mut not_lz4, OFF_ATTRIBUTES, Compression::Lz4.code());
    reseal(&mut not_lz4);
    let mut long_length = good.clone();
    put_u32(&mut long_length, OFF_BATCH_LENGTH, good.len() as u32 + 100);
    let mut short_length = good.clone();
    put_u32(&mut short_length, OFF_BATCH_LENGTH, 20);
    let valid_then_corrupt = [good.as_slice(), crc_value.as_slice()].concat();
    let valid_then_garbage = [good.as_slice(), &[1, 2, 3, 4, 5]].concat();

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("crc: flipped header byte", crc_header, CorruptBatch),
        ("crc: flipped value byte", crc_value, CorruptBatch),
        ("unknown magic", magic, InvalidBatch),
        (
            "record count disagrees with last offset delta",
            count_only,
            InvalidBatch,
        ),
        (
            "record count disagrees with the records",
            count_and_delta,
            InvalidBatch,
        ),
        ("record count 0", zero_count, InvalidBatch),
        ("reserved attribute bit", reserved_bit, InvalidBatch),
        ("control batch from a producer", control, InvalidBatch),
        ("lz4 attribute over plain records", not_lz4, InvalidBatch),
        ("batch length past the end", long_length, InvalidBatch),
        (
            "batch length shorter than a header",
            short_length,
            InvalidBatch,
        ),
        ("no batches", Vec::new(), InvalidBatch),
        (
            "truncated batch",
            good[..good.len() - 1].to_vec(),
            InvalidBatch,
        ),
        (
            "a header and nothing else",
            good[..40].to_vec(),
            InvalidBatch,
        ),
        (
            "valid batch, then a corrupt one",
            valid_then_corrupt,
            CorruptBatch,
        ),
        (
            "valid batch, then garbage",
            valid_then_garbage,
            InvalidBatch,
        ),
    ];
    for (what, records, code) in cases {
        refused(t, conn, EVENTS, records, code)
            .await
            .context(what)?;
    }
    Ok(())
}

async fn record_size_limit(t: &TestNode, conn: &Connection) -> Result<()> {
    let record_bytes = |n: usize| BatchBuilder::record_bytes(None, Some(&vec![b'x'; n]), &[]);
    let fits = (0..2 * SMALL_RECORD_BYTES_MAX)
        .find(|&n| record_bytes(n) == SMALL_RECORD_BYTES_MAX)
        .context("no value length encodes to exactly the limit")?;
    ensure!(record_bytes(fits + 1) > SMALL_RECORD_BYTES_MAX);

    let oversized = [
        ("one byte over max.record.bytes", vec![b'x'; fits + 1]),
        (
            "twice max.record.bytes",
            vec![b'x'; 2 * SMALL_RECORD_BYTES_MAX],
        ),
    ];
    for (what, value) in &oversized {
        let records = batch(&[b"small", value, b"small"]);
        refused(t, conn, SMALL, records, ErrorCode::RecordTooLarge)
            .await
            .context(*what)?;
    }
    // The limit is inclusive: a record of exactly max.record.bytes is stored.
    let end = log_end(&t.client, SMALL).await?;
    let status = produce_status(conn, SMALL, 0, batch(&[&vec![b'x'; fits]])).await?;
    ensure!(
        status.is_ok(),
        "record of exactly the limit refused: {status:?}"
    );
    ensure!(log_end(&t.client, SMALL).await? == end + 1);
    Ok(())
}

async fn unknown_partitions_and_offsets(t: &TestNode, conn: &Connection) -> Result<()> {
    use ErrorCode::*;
    let good = || batch(&[b"lost"]);
    for (topic, partition) in [
        ("no-such-topic", 0),
        (EVENTS, 7),
        (EVENTS, u32::MAX),
        ("../x", 0),
    ] {
        let status = produce_status(conn, topic, partition, good()).await?;
        ensure!(
            status.code == UnknownTopicOrPartition,
            "produce to {topic}/{partition}: {status:?}"
        );
        let status = fetch_status(conn, topic, partition, 0).await?;
        ensure!(
            status.code == UnknownTopicOrPartition,
            "fetch from {topic}/{partition}: {status:?}"
        );
    }
    let end = log_end(&t.client, EVENTS).await?;
    for offset in [end + 1, end + 1_000, u64::MAX] {
        let status = fetch_status(conn, EVENTS, 0, offset).await?;
        ensure!(
            status.code == OffsetOutOfRange,
            "fetch at {offset} with the log ending at {end}: {status:?}"
        );
    }
    // The end itself is in range: an empty answer, not an error.
    let status = fetch_status(conn, EVENTS, 0, end).await?;
    ensure!(status.is_ok(), "fetch at the log end: {status:?}");
    Ok(())
}

/// One round of the concurrent abuser: random garbage, absurd frames and a corrupt batch.
async fn abuse_round(conn: &Connection, rng: &mut Rng) -> Result<()> {
    for i in 0..8 {
        let input = garbage(rng, i);
        check(conn, &input, verdict(&input)).await?;
    }
    check(
        conn,
        &u32::MAX.to_le_bytes(),
        Expect::Error(ErrorCode::FrameTooLarge),
    )
    .await?;
    check(
        conn,
        &frame(777, 1, 1, b""),
        Expect::Error(ErrorCode::UnsupportedApi),
    )
    .await?;
    let mut corrupt = batch(&[b"never stored"]);
    corrupt[CRC_START + 1] ^= 0x80;
    let status = produce_status(conn, EVENTS, 0, corrupt).await?;
    ensure!(status.code == ErrorCode::CorruptBatch, "{status:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The node and the well-behaved client

struct TestNode {
    node: Node,
    addr: SocketAddr,
    ca: PathBuf,
    client: Client,
    _dir: TempDir,
}

impl TestNode {
    async fn start(request_read_ms_max: u64) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = BrokerConfig {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse()?,
            request_bytes_max: REQUEST_BYTES_MAX,
            request_read_ms_max,
            // A random body that decodes as a download probe must not stream gigabytes.
            probe_bytes_max: 1 << 20,
            shutdown_grace_ms: 5_000,
            ..BrokerConfig::default()
        };
        let node = Node::start(config).await?;
        let addr = node.local_addr();
        let ca = node
            .ca_file()
            .context("the node generated no development CA")?
            .clone();
        let client = Client::connect(ClientConfig::new(addr.to_string(), ca.clone())).await?;
        client.create_topic(EVENTS, 1, &[]).await?;
        let small = [(
            "max.record.bytes".to_string(),
            SMALL_RECORD_BYTES_MAX.to_string(),
        )];
        client.create_topic(SMALL, 1, &small).await?;
        Ok(Self {
            node,
            addr,
            ca,
            client,
            _dir: dir,
        })
    }

    /// A fresh QUIC connection that speaks raw bytes.
    async fn raw(&self) -> Result<RawConn> {
        let trust = ClientTrust::from_ca_file(&self.ca)?;
        let endpoint =
            quiver_transport::Client::new(&trust, ALPN_CLIENT, &TransportSettings::default())?;
        let conn = bounded("raw connect", EXCHANGE_LIMIT, async {
            Ok(endpoint.connect(&self.addr.to_string(), None).await?)
        })
        .await?;
        Ok(RawConn {
            conn,
            _endpoint: endpoint,
        })
    }
}

/// A raw connection and the endpoint that drives it.
struct RawConn {
    conn: Connection,
    _endpoint: quiver_transport::Client,
}

/// Starts a node, has a producer store records, runs `abuse` (which may return records it had
/// acknowledged itself), stores more records, then checks that a consumer reads back exactly the
/// acknowledged records, in order, and that the node shuts down cleanly.
async fn survives<T: Acknowledged>(
    request_read_ms_max: u64,
    abuse: impl AsyncFnOnce(&TestNode) -> Result<T>,
) -> Result<()> {
    bounded("test", TEST_LIMIT, async {
        let t = TestNode::start(request_read_ms_max).await?;
        let mut acked = produce_acknowledged(&t.client, "before", 50).await?;
        acked.extend(abuse(&t).await?.records());
        acked.extend(produce_acknowledged(&t.client, "after", 50).await?);
        read_back(&t.client, &acked).await?;
        bounded("shutdown", EXCHANGE_LIMIT, async {
            t.node.shutdown().await;
            Ok(())
        })
        .await
    })
    .await
}

/// Records a test body acknowledged itself, if any: `()` or `Vec<(offset, value)>`.
trait Acknowledged {
    fn records(self) -> Vec<(u64, Bytes)>;
}
impl Acknowledged for () {
    fn records(self) -> Vec<(u64, Bytes)> {
        Vec::new()
    }
}
impl Acknowledged for Vec<(u64, Bytes)> {
    fn records(self) -> Vec<(u64, Bytes)> {
        self
    }
}

/// Sends `count` records to `EVENTS` one at a time, awaiting each acknowledgement; returns
/// (offset, value) per record. One request in flight, so acknowledged order is log order.
async fn produce_acknowledged(
    client: &Client,
    tag: &str,
    count: usize,
) -> Result<Vec<(u64, Bytes)>> {
    let config = ProducerConfig {
        in_flight_max: 1,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config);
    let mut acked = Vec::with_capacity(count);
    for i in 0..count {
        let value = Bytes::from(format!("{tag}-{i}"));
        let record = ProducerRecord::new(EVENTS, value.clone())
            .key(format!("k{i}"))
            .partition(0);
        let what = format!("{tag} record {i}");
        let delivery = bounded(&what, EXCHANGE_LIMIT, async {
            Ok(producer.send(record).await?)
        })
        .await?;
        let meta = bounded(&what, EXCHANGE_LIMIT, async { Ok(delivery.await?) }).await?;
        let offset = meta.offset.context("acks=leader gave no offset")?;
        acked.push((offset, value));
    }
    bounded("producer close", EXCHANGE_LIMIT, async {
        Ok(producer.close().await?)
    })
    .await?;
    Ok(acked)
}

/// Reads `EVENTS` from the start and checks it holds exactly `acked`: the same offsets (0, 1,
/// 2, ... since nothing refused may be stored), the same values, in order, nothing more.
async fn read_back(client: &Client, acked: &[(u64, Bytes)]) -> Result<()> {
    for (i, (offset, _)) in acked.iter().enumerate() {
        ensure!(
            *offset == i as u64,
            "acknowledged record {i} got offset {offset}: something else reached the log"
        );
    }
    let mut consumer =
        Consumer::new(client.clone(), EVENTS, None, ConsumerConfig::default()).await?;
    let mut got = Vec::new();
    bounded("consume", EXCHANGE_LIMIT, async {
        while got.len() < acked.len() {
            got.extend(consumer.poll().await?);
        }
        Ok(())
    })
    .await?;
    ensure!(
        got.len() == acked.len(),
        "read {} records, {} acknowledged",
        got.len(),
        acked.len()
    );
    for ((offset, value), r) in acked.iter().zip(&got) {
        ensure!(
            r.offset == *offset && r.value.as_ref() == Some(value),
            "at offset {offset}: expected {value:?}, read offset {} value {:?}",
            r.offset,
            r.value
        );
    }
    let end = log_end(client, EVENTS).await?;
    ensure!(
        end == acked.len() as u64,
        "log ends at {end}, {} acknowledged",
        acked.len()
    );
    Ok(())
}

async fn log_end(client: &Client, topic: &str) -> Result<u64> {
    bounded("list offsets", EXCHANGE_LIMIT, async {
        client
            .list_offset(topic, 0, LATEST_TIMESTAMP)
            .await?
            .context("no latest offset")
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Raw exchanges

/// What the server did with one raw stream.
#[derive(Debug)]
enum Reply {
    /// A request-level error frame; its body is exactly one `string`.
    Error {
        api: u16,
        request_id: u64,
        code: ErrorCode,
        #[expect(dead_code, reason = "shown in failure messages")]
        message: String,
    },
    /// A success frame.
    Success {
        api: u16,
        request_id: u64,
        body: Bytes,
    },
    /// The server finished its side without a frame (produce with `acks = none`).
    Empty,
    /// The stream was reset or the connection lost before a whole response arrived.
    Closed(#[expect(dead_code, reason = "shown in failure messages")] String),
}

/// What an input must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// An error frame with this code.
    Error(ErrorCode),
    /// Any well-formed reply: the frame is valid and the outcome depends on its body.
    Answered,
}

/// Sends `input` as a whole stream and checks the reply against `expect`.
async fn check(conn: &Connection, input: &[u8], expect: Expect) -> Result<Reply> {
    let reply = exchange(conn, input)
        .await
        .with_context(|| format!("input {}", show(input)))?;
    let ok = match (expect, &reply) {
        (Expect::Error(want), Reply::Error { code, .. }) => *code == want,
        (Expect::Answered, Reply::Closed(_)) => false,
        (Expect::Answered, _) => true,
        _ => false,
    };
    ensure!(
        ok,
        "input {}: expected {expect:?}, got {reply:?}",
        show(input)
    );
    Ok(reply)
}

/// Writes `input` on a fresh stream, finishes it and reads the reply.
async fn exchange(conn: &Connection, input: &[u8]) -> Result<Reply> {
    bounded("exchange", EXCHANGE_LIMIT, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        // A server refusing a frame early may stop the stream while it is being written; what it
        // answers is what matters, so a failed write is not a failure.
        if send.write_all(input).await.is_ok() {
            let _ = send.finish();
        }
        read_reply(&mut recv).await
    })
    .await
}

/// Writes `input` and never finishes: the stream stays open until the server gives up.
async fn stall(stream: (SendStream, RecvStream), input: &[u8]) -> Result<Reply> {
    let (send, mut recv) = open_stalled(stream, input).await?;
    let reply = read_reply(&mut recv).await;
    // Dropping the send half would finish the stream, so it lives until the reply is in.
    drop(send);
    reply
}

async fn open_stalled(
    (mut send, recv): (SendStream, RecvStream),
    input: &[u8],
) -> Result<(SendStream, RecvStream)> {
    bounded("stalled write", EXCHANGE_LIMIT, async {
        Ok(send.write_all(input).await?)
    })
    .await?;
    Ok((send, recv))
}

async fn read_reply(recv: &mut RecvStream) -> Result<Reply> {
    let frame = bounded("reply", EXCHANGE_LIMIT, async {
        Ok(recv.read_to_end(RESPONSE_BYTES_MAX).await)
    })
    .await?;
    let frame = match frame {
        Ok(frame) => frame,
        Err(e) => return Ok(Reply::Closed(e.to_string())),
    };
    if frame.is_empty() {
        return Ok(Reply::Empty);
    }
    // Whatever the input, the server's own frames must be well formed.
    let (header, body) = ResponseHeader::decode(frame).context("malformed response frame")?;
    if header.error == 0 {
        return Ok(Reply::Success {
            api: header.api,
            request_id: header.request_id,
            body,
        });
    }
    let mut r = Reader::new(body);
    let message = r.string("message").context("error body is not a string")?;
    r.finish().context("error body has trailing bytes")?;
    ensure!(
        !message.is_empty(),
        "error {} without a message",
        header.error
    );
    Ok(Reply::Error {
        api: header.api,
        request_id: header.request_id,
        code: ErrorCode::from_code(header.error),
        message,
    })
}

/// Sends a valid request over a raw stream and decodes its successful response.
async fn request<Req: Message, Resp: Message>(conn: &Connection, req: &Req) -> Result<Resp> {
    let id = 0x5eed_0000_0000_0007;
    let input = frame(Req::API.code(), Req::VERSION, id, &req.to_bytes());
    match check(conn, &input, Expect::Answered).await? {
        Reply::Success {
            api,
            request_id,
            body,
        } => {
            ensure!(
                (api, request_id) == (Req::API.code(), id),
                "{:?} answered as api {api}, request {request_id}",
                Req::API
            );
            Ok(Resp::from_bytes(body)?)
        }
        other => bail!("{:?} request got {other:?}", Req::API),
    }
}

/// Produces `records` to one partition and returns that partition's status.
async fn produce_status(
    conn: &Connection,
    topic: &str,
    partition: u32,
    records: Vec<u8>,
) -> Result<Status> {
    let req = ProduceRequest {
        acks: Acks::Leader,
        timeout_ms: 10_000,
        sequence: quiver_proto::messages::UNORDERED_SEQUENCE,
        topics: vec![ProduceTopic {
            name: topic.to_string(),
            partitions: vec![ProducePartition {
                partition,
                records: Bytes::from(records),
            }],
        }],
    };
    let resp: ProduceResponse = request(conn, &req).await?;
    let p = single(resp.topics.into_iter().flat_map(|t| t.partitions))?;
    ensure!(
        p.partition == partition,
        "answer for partition {}",
        p.partition
    );
    Ok(p.status)
}

/// Fetches one partition at `offset` and returns its status.
async fn fetch_status(
    conn: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<Status> {
    let req = FetchRequest {
        max_wait_ms: 100,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            name: topic.to_string(),
            partitions: vec![FetchPartition {
                partition,
                offset,
                partition_max_bytes: 1 << 20,
            }],
        }],
        chain: vec![],
    };
    let resp: FetchResponse = request(conn, &req).await?;
    let p = single(resp.topics.into_iter().flat_map(|t| t.partitions))?;
    ensure!(
        p.partition == partition,
        "answer for partition {}",
        p.partition
    );
    Ok(p.status)
}

/// Produces a batch that must be refused with `code`, and checks the log did not move.
async fn refused(
    t: &TestNode,
    conn: &Connection,
    topic: &str,
    records: Vec<u8>,
    code: ErrorCode,
) -> Result<()> {
    let end = log_end(&t.client, topic).await?;
    let status = produce_status(conn, topic, 0, records).await?;
    ensure!(status.code == code, "expected {code}, got {status:?}");
    let after = log_end(&t.client, topic).await?;
    ensure!(
        after == end,
        "refused batch moved the log end from {end} to {after}"
    );
    Ok(())
}

fn single<T>(mut items: impl Iterator<Item = T>) -> Result<T> {
    let first = items.next().context("empty answer")?;
    ensure!(items.next().is_none(), "more than one answer");
    Ok(first)
}

// ---------------------------------------------------------------------------------------------
// Inputs

fn frame(api: u16, version: u16, request_id: u64, body: &[u8]) -> Bytes {
    RequestHeader {
        api,
        version,
        request_id,
    }
    .encode(body)
}

/// A length prefix claiming `length` bytes followed by `sent` bytes of filler.
fn truncated_frame(length: u32, sent: usize) -> Vec<u8> {
    let mut b = length.to_le_bytes().to_vec();
    b.resize(4 + sent, 0x01);
    b
}

/// A valid uncompressed batch of `values`, stamped now (old timestamps could meet retention).
fn batch(values: &[&[u8]]) -> Vec<u8> {
    let now = quiver_broker::now_ms();
    let mut b = BatchBuilder::new(Compression::None);
    for v in values {
        b.push(None, Some(v), &[], now);
    }
    b.finish().to_vec()
}

fn put_u32(batch: &mut [u8], at: usize, v: u32) {
    batch[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u16(batch: &mut [u8], at: usize, v: u16) {
    batch[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the CRC after a test changed bytes it covers, so only the intended fault remains.
fn reseal(batch: &mut [u8]) {
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    put_u32(batch, OFF_CRC, crc);
}

/// APIs whose randomly generated bodies may be served without changing the topic table.
const HARMLESS_APIS: [ApiKey; 7] = [
    ApiKey::ApiVersions,
    ApiKey::Metadata,
    ApiKey::ListTopics,
    ApiKey::DescribeTopics,
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
];

/// Random input number `i`, 0 to 199 bytes. Untouched random bytes almost always carry an
/// absurd length prefix, so three in four get a prefix that reaches the later checks: a random
/// small length (too short, truncated or whole), a whole frame with a random header, or a whole
/// frame of a harmless API (mostly at version 1) with a random body.
fn garbage(rng: &mut Rng, i: usize) -> Vec<u8> {
    let len = rng.below(200) as usize;
    let mut b = rng.bytes(len);
    match i % 4 {
        1 if len >= 4 => {
            let length = rng.below(len as u64 + 16) as u32;
            b[..4].copy_from_slice(&length.to_le_bytes());
        }
        2 if len >= 16 => b[..4].copy_from_slice(&(len as u32 - 4).to_le_bytes()),
        3 if len >= 16 => {
            let api = HARMLESS_APIS[rng.below(HARMLESS_APIS.len() as u64) as usize];
            b[..4].copy_from_slice(&(len as u32 - 4).to_le_bytes());
            b[4..6].copy_from_slice(&api.code().to_le_bytes());
            // Mostly version 1, so the body reaches its decoder; sometimes one never supported.
            let version = if rng.below(4) == 0 { 99 } else { 1u16 };
            b[6..8].copy_from_slice(&version.to_le_bytes());
        }
        _ => {}
    }
    b
}

/// What the node must answer to `input` sent as a whole stream, from the framing rules of
/// `quiver_proto::frame` and the node's checks, in the node's order.
fn verdict(input: &[u8]) -> Expect {
    use ErrorCode::*;
    let Some(prefix) = input.first_chunk::<4>() else {
        return Expect::Error(InvalidRequest);
    };
    let length = u32::from_le_bytes(*prefix) as usize;
    if length > REQUEST_BYTES_MAX {
        return Expect::Error(FrameTooLarge);
    }
    if length < 12 || input.len() - 4 < length {
        return Expect::Error(InvalidRequest);
    }
    let api = u16::from_le_bytes([input[4], input[5]]);
    let version = u16::from_le_bytes([input[6], input[7]]);
    let Some(key) = ApiKey::from_code(api) else {
        return Expect::Error(UnsupportedApi);
    };
    if version == 0 || version > key.version_max() {
        return Expect::Error(UnsupportedVersion);
    }
    if body_decodes(key, version, Bytes::copy_from_slice(&input[16..4 + length])) {
        Expect::Answered
    } else {
        Expect::Error(InvalidRequest)
    }
}

fn body_decodes(api: ApiKey, version: u16, body: Bytes) -> bool {
    match api {
        ApiKey::ApiVersions => ApiVersionsRequest::from_bytes(body).is_ok(),
        ApiKey::Metadata => MetadataRequest::from_bytes(body).is_ok(),
        ApiKey::CreateTopics => CreateTopicsRequest::from_bytes(body).is_ok(),
        ApiKey::DeleteTopics => DeleteTopicsRequest::from_bytes(body).is_ok(),
        ApiKey::ListTopics => ListTopicsRequest::from_bytes(body).is_ok(),
        ApiKey::DescribeTopics => DescribeTopicsRequest::from_bytes(body).is_ok(),
        ApiKey::AlterTopic => AlterTopicRequest::from_bytes(body).is_ok(),
        ApiKey::ClusterStatus => ClusterStatusRequest::from_bytes(body).is_ok(),
        ApiKey::ReassignPartitions => ReassignPartitionsRequest::from_bytes(body).is_ok(),
        ApiKey::ElectLeaders => ElectLeadersRequest::from_bytes(body).is_ok(),
        ApiKey::Produce => ProduceRequest::from_bytes(body).is_ok(),
        ApiKey::Fetch => FetchRequest::from_bytes_version(body, version).is_ok(),
        ApiKey::ListOffsets => ListOffsetsRequest::from_bytes(body).is_ok(),
        ApiKey::PluginDeploy => PluginDeployRequest::from_bytes(body).is_ok(),
        ApiKey::PluginList => PluginListRequest::from_bytes(body).is_ok(),
        ApiKey::PluginRemove => PluginRemoveRequest::from_bytes(body).is_ok(),
        ApiKey::PipelineCreate => PipelineCreateRequest::from_bytes(body).is_ok(),
        ApiKey::PipelineList => PipelineListRequest::from_bytes(body).is_ok(),
        ApiKey::PipelineControl => PipelineControlRequest::from_bytes(body).is_ok(),
        ApiKey::PipelineDelete => PipelineDeleteRequest::from_bytes(body).is_ok(),
        ApiKey::TransportProbe => TransportProbeRequest::from_bytes(body).is_ok(),
    }
}

/// SplitMix64: a seeded source of test bytes in a few lines rather than a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn seed() -> u64 {
    std::env::var("QUIVER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED)
}

/// An input for messages: its length and first bytes in hex.
fn show(input: &[u8]) -> String {
    let head: String = input.iter().take(24).map(|b| format!("{b:02x}")).collect();
    let more = if input.len() > 24 { "…" } else { "" };
    format!("[{} bytes: {head}{more}]", input.len())
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| anyhow!("{what}: not done within {limit:?}"))?
}
