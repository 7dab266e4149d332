//! End-to-end tests through a real node on loopback: real QUIC with TLS, real files.
//!
//! How and why: each test starts a node in-process on 127.0.0.1:0 with a fresh data directory
//! and talks to it only through the public client, so these tests exercise exactly what a user
//! runs. Contents are derived from each record's sequence number, so every consumed record can be
//! checked without keeping a copy, and restarting the node on the same directory proves that
//! what was acknowledged is what comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use quiver_broker::{BrokerConfig, Node};
use quiver_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, ConsumerRecord, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};

const TIMEOUT: Duration = Duration::from_secs(120);

async fn start(dir: &Path, tweak: impl FnOnce(&mut BrokerConfig)) -> Node {
    let mut config = BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    };
    tweak(&mut config);
    Node::start(config).await.expect("node starts")
}

async fn client(node: &Node) -> Client {
    let ca = node.ca_file().expect("dev CA generated").clone();
    Client::connect(ClientConfig::new(node.local_addr().to_string(), ca))
        .await
        .expect("client connects")
}

/// The record with sequence number `i`: varied keys (some absent), headers and sizes from 0
/// bytes to 1 MiB.
fn record(topic: &str, i: u64) -> ProducerRecord {
    let size = match i % 10_000 {
        0 => 1 << 20,
        1 => 0,
        2 => 64 << 10,
        n => (n * 7 % 300) as usize,
    };
    let mut value = vec![0u8; size];
    for (j, b) in value.iter_mut().enumerate() {
        *b = (i as usize + j) as u8;
    }
    let mut r = ProducerRecord {
        topic: topic.to_string(),
        value: Some(Bytes::from(value)),
        ..ProducerRecord::default()
    };
    if !i.is_multiple_of(5) {
        r.key = Some(Bytes::from(format!("key-{}", i % 997)));
    }
    for h in 0..(i % 4) {
        r.headers
            .push((format!("h{h}"), Some(Bytes::from(i.to_le_bytes().to_vec()))));
    }
    r.headers
        .push(("seq".into(), Some(Bytes::from(i.to_string()))));
    r
}

fn seq_of(r: &ConsumerRecord) -> u64 {
    let v = r
        .headers
        .iter()
        .find(|(k, _)| k == "seq")
        .and_then(|(_, v)| v.clone())
        .expect("seq header");
    std::str::from_utf8(&v).unwrap().parse().unwrap()
}

fn check_record(r: &ConsumerRecord) {
    let expected = record(&r.topic, seq_of(r));
    assert_eq!(r.key, expected.key, "key of seq {}", seq_of(r));
    assert_eq!(r.value, expected.value, "value of seq {}", seq_of(r));
    assert_eq!(r.headers, expected.headers, "headers of seq {}", seq_of(r));
}

/// Produces `count` records and returns where each was acknowledged: seq → (partition, offset).
async fn produce_all(
    client: &Client,
    topic: &str,
    count: u64,
    config: ProducerConfig,
) -> BTreeMap<u64, (u32, u64)> {
    let producer = Producer::new(client.clone(), config);
    let mut deliveries = Vec::with_capacity(count as usize);
    for i in 0..count {
        deliveries.push((i, producer.send(record(topic, i)).await.expect("send")));
    }
    producer.flush().await.expect("flush");
    let mut acked = BTreeMap::new();
    for (i, d) in deliveries {
        let meta = d.await.expect("delivered");
        acked.insert(
            i,
            (
                meta.partition,
                meta.offset.expect("acks=leader gives offsets"),
            ),
        );
    }
    acked
}

/// Reads every partition from the earliest offset to its high watermark.
async fn consume_all(client: &Client, topic: &str) -> Vec<ConsumerRecord> {
    let mut consumer = Consumer::new(client.clone(), topic, None, ConsumerConfig::default())
        .await
        .unwrap();
    consumer.seek_all(SeekTo::Earliest).await.unwrap();
    let mut ends = BTreeMap::new();
    for p in consumer.assignment() {
        let end = client
            .list_offset(topic, p, quiver_proto::messages::LATEST_TIMESTAMP)
            .await
            .unwrap()
            .unwrap();
        ends.insert(p, end);
    }
    let mut out = Vec::new();
    while ends
        .iter()
        .any(|(p, end)| consumer.position(*p).unwrap() < *end)
    {
        out.extend(consumer.poll().await.unwrap());
    }
    out
}

/// Every acknowledged record is read back exactly once, in send order per partition, with its
/// content, at the acknowledged
/// partition and offset, and offsets in each partition are contiguous from 0.
fn verify(records: &[ConsumerRecord], acked: &BTreeMap<u64, (u32, u64)>) {
    assert_eq!(records.len(), acked.len(), "record count");
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let mut last_seq: BTreeMap<u32, u64> = BTreeMap::new();
    for r in records {
        // Records were sent in sequence order with several requests in flight: each partition
        // must hold them in that order.
        if let Some(prev) = last_seq.insert(r.partition, seq_of(r)) {
            assert!(
                prev < seq_of(r),
                "partition {} holds seq {} after {prev}",
                r.partition,
                seq_of(r)
            );
        }
        let expected_offset = next.entry(r.partition).or_insert(0);
        assert_eq!(
            r.offset, *expected_offset,
            "contiguous offsets in partition {}",
            r.partition
        );
        *expected_offset += 1;
        check_record(r);
        assert_eq!(
            acked.get(&seq_of(r)),
            Some(&(r.partition, r.offset)),
            "seq {} placement",
            seq_of(r)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_records_survive_a_restart() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("events", 4, &[]).await.unwrap();
        c.create_topic("durable", 2, &[("flush.policy".into(), "batch".into())])
            .await
            .unwrap();

        let acked = produce_all(&c, "events", 100_000, ProducerConfig::default()).await;
        // Same key, same partition.
        let mut key_partition: BTreeMap<Bytes, u32> = BTreeMap::new();
        for (i, (p, _)) in &acked {
            if let Some(k) = record("events", *i).key {
                assert_eq!(*key_partition.entry(k).or_insert(*p), *p);
            }
        }
        let lz4 = ProducerConfig {
            compression: quiver_proto::Compression::Lz4,
            in_flight_max: 1,
            ..ProducerConfig::default()
        };
        let acked_durable = produce_all(&c, "durable", 5_000, lz4).await;

        verify(&consume_all(&c, "events").await, &acked);
        verify(&consume_all(&c, "durable").await, &acked_durable);

        drop(c);
        node.shutdown().await;
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        verify(&consume_all(&c, "events").await, &acked);
        verify(&consume_all(&c, "durable").await, &acked_durable);
        // The log continues where it stopped.
        let more = Producer::new(c.clone(), ProducerConfig::default());
        let d = more
            .send(ProducerRecord::new("durable", "after restart").partition(0))
            .await
            .unwrap()
            .await
            .unwrap();
        let before = acked_durable.values().filter(|(p, _)| *p == 0).count() as u64;
        assert_eq!(d.offset, Some(before));
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_by_timestamp_and_offset() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        // Small segments so the time index spans several segments.
        c.create_topic("clock", 1, &[("segment.bytes".into(), "2048".into())])
            .await
            .unwrap();
        let producer = Producer::new(
            c.clone(),
            ProducerConfig {
                linger_ms: 0,
                ..ProducerConfig::default()
            },
        );
        let base = 1_700_000_000_000i64;
        let mut acks = Vec::new();
        for i in 0..200i64 {
            acks.push(
                producer
                    .send(ProducerRecord::new("clock", format!("t{i}")).timestamp(base + i * 1000))
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for a in acks {
            a.await.unwrap();
        }
        let mut consumer = Consumer::new(c.clone(), "clock", None, ConsumerConfig::default())
            .await
            .unwrap();
        for (ts, expected) in [
            (base - 5, 0u64),
            (base, 0),
            (base + 1, 1),
            (base + 150_500, 151),
            (base + 199_000, 199),
        ] {
            consumer.seek(0, SeekTo::Timestamp(ts)).await.unwrap();
            assert_eq!(consumer.position(0), Some(expected), "seek to {ts}");
            let first = consumer.poll().await.unwrap();
            assert_eq!(first[0].offset, expected);
            assert!(first[0].timestamp >= ts);
        }
        // After the last record: the end of the log.
        consumer
            .seek(0, SeekTo::Timestamp(base + 10_000_000))
            .await
            .unwrap();
        assert_eq!(consumer.position(0), Some(200));
        consumer.seek(0, SeekTo::Offset(42)).await.unwrap();
        assert_eq!(
            consumer.poll().await.unwrap()[0].value.as_deref(),
            Some(&b"t42"[..])
        );
        consumer.seek(0, SeekTo::Latest).await.unwrap();
        assert_eq!(consumer.position(0), Some(200));
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_whole_old_segments() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |c| c.retention_check_interval_ms = 50).await;
        let c = client(&node).await;
        c.create_topic(
            "by-bytes",
            1,
            &[
                ("segment.bytes".into(), "4096".into()),
                ("retention.bytes".into(), "16384".into()),
            ],
        )
        .await
        .unwrap();
        c.create_topic(
            "by-time",
            1,
            &[
                ("segment.bytes".into(), "4096".into()),
                ("retention.ms".into(), "60000".into()),
            ],
        )
        .await
        .unwrap();
        // Small batches so segments roll often; old records strictly before fresh ones so
        // whole segments hold only old records.
        let producer = Producer::new(
            c.clone(),
            ProducerConfig {
                linger_ms: 0,
                batch_bytes: 1024,
                ..ProducerConfig::default()
            },
        );
        let now = quiver_broker::now_ms();
        let mut acks = Vec::new();
        for i in 0..400u64 {
            acks.push(
                producer
                    .send(ProducerRecord::new("by-bytes", vec![b'x'; 200]).partition(0))
                    .await
                    .unwrap(),
            );
            let ts = if i < 300 { now - 3_600_000 } else { now };
            if i == 300 {
                producer.flush().await.unwrap();
            }
            acks.push(
                producer
                    .send(
                        ProducerRecord::new("by-time", vec![b'y'; 200])
                            .partition(0)
                            .timestamp(ts),
                    )
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for a in acks {
            a.await.unwrap();
        }

        // A segment holds at most ~20 of these records (4096 / 200 bytes), so once retention
        // has passed over the by-time topic, only old records sharing a segment with fresh
        // ones (the last old segment) may remain.
        const OLD_KEPT_MIN: u64 = 300 - 4096 / 200 - 1;
        // Retention runs every 50 ms; wait (bounded) until it has.
        let mut described = None;
        for _ in 0..200 {
            let b = c.describe_topic("by-bytes").await.unwrap().partitions[0];
            let t = c.describe_topic("by-time").await.unwrap().partitions[0];
            // Retention also ran while records were still arriving: wait for a pass after the last.
            if b.log_start_offset > 0
                && b.size_bytes <= 16384 + 4096
                && t.log_start_offset >= OLD_KEPT_MIN
            {
                described = Some((b, t));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (b, t) = described
            .unwrap_or_else(|| panic!("retention did not run: {:?} {:?}", "by-bytes", "by-time"));
        // By bytes: under the limit plus at most one segment, and the tail is intact.
        assert!(
            b.size_bytes <= 16384 + 4096,
            "size {} after retention",
            b.size_bytes
        );
        assert_eq!(b.log_end_offset, 400);
        // By time: every old segment is gone (at most the one shared with fresh records
        // stays) but no fresh record.
        assert!(
            (OLD_KEPT_MIN..=300).contains(&t.log_start_offset),
            "fresh records deleted: start {}",
            t.log_start_offset
        );
        assert_eq!(t.log_end_offset, 400);

        // A consumer positioned before the start is reset to the earliest stored offset.
        let mut consumer = Consumer::new(c.clone(), "by-bytes", None, ConsumerConfig::default())
            .await
            .unwrap();
        consumer.seek(0, SeekTo::Offset(0)).await.unwrap();
        let mut read = Vec::new();
        while read.len() < (400 - b.log_start_offset) as usize {
            read.extend(consumer.poll().await.unwrap());
        }
        assert_eq!(read[0].offset, b.log_start_offset);
        assert_eq!(read.last().unwrap().offset, 399);
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors_are_typed() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        use quiver_proto::ErrorCode as E;
        c.create_topic("t", 2, &[]).await.unwrap();
        let code = |r: Result<(), quiver_client::ClientError>| r.unwrap_err().code();
        assert_eq!(
            code(c.create_topic("t", 2, &[]).await),
            Some(E::TopicAlreadyExists)
        );
        assert_eq!(
            code(c.create_topic("bad/name", 1, &[]).await),
            Some(E::InvalidTopic)
        );
        assert_eq!(
            code(c.create_topic("zero", 0, &[]).await),
            Some(E::InvalidPartitions)
        );
        assert_eq!(
            code(
                c.create_topic("cfg", 1, &[("retention.ms".into(), "soon".into())])
                    .await
            ),
            Some(E::InvalidConfig)
        );
        assert_eq!(
            code(c.delete_topic("missing").await),
            Some(E::UnknownTopicOrPartition)
        );
        assert_eq!(
            c.describe_topic("missing").await.unwrap_err().code(),
            Some(E::UnknownTopicOrPartition)
        );
        let listed: Vec<_> = c
            .list_topics()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(listed, vec!["t".to_string()]);
        c.delete_topic("t").await.unwrap();
        assert!(c.list_topics().await.unwrap().is_empty());
        // The name is free again, with fresh (empty) partitions.
        c.create_topic("t", 1, &[]).await.unwrap();
        assert_eq!(
            c.describe_topic("t").await.unwrap().partitions[0].log_end_offset,
            0
        );
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: two produce requests on one connection travel on separate QUIC streams, so the
/// node may receive them in either order. Here the second (sequence 1) is sent in full first
/// and the first (sequence 0) only after a pause; the node must still append sequence 0
/// first. Without per-connection ordering, "second" would take offset 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_produce_requests_keep_their_order() {
    use quiver_proto::ApiKey;
    use quiver_proto::frame::frame_prefix;
    use quiver_proto::messages::{
        Acks, Message, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
    };
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("ordered", 1, &[]).await.unwrap();
        let request = |value: &str, sequence: u64| {
            let mut b = quiver_proto::BatchBuilder::new(quiver_proto::Compression::None);
            b.push(None, Some(value.as_bytes()), &[], 1);
            let body = ProduceRequest {
                acks: Acks::Leader,
                timeout_ms: 10_000,
                sequence,
                topics: vec![ProduceTopic {
                    name: "ordered".into(),
                    partitions: vec![ProducePartition {
                        partition: 0,
                        records: b.finish(),
                    }],
                }],
            }
            .to_bytes();
            vec![
                frame_prefix(ApiKey::Produce.code(), 1, sequence, body.len()),
                body,
            ]
        };
        let (mut s0, mut r0) = c.open_raw().await.unwrap();
        let (mut s1, mut r1) = c.open_raw().await.unwrap();
        s1.write_chunks(&mut request("second", 1)).await.unwrap();
        s1.finish().unwrap();
        // Give the node every chance to append "second" early if it did not order.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s0.write_chunks(&mut request("first", 0)).await.unwrap();
        s0.finish().unwrap();
        for r in [&mut r0, &mut r1] {
            let frame = r.read_to_end(1 << 20).await.unwrap();
            let (h, body) = quiver_proto::ResponseHeader::decode(frame).unwrap();
            assert_eq!(h.error, 0);
            let resp = ProduceResponse::from_bytes(body).unwrap();
            assert!(resp.topics[0].partitions[0].status.is_ok());
        }
        let records = consume_all(&c, "ordered").await;
        let values: Vec<_> = records.iter().map(|r| r.value.clone().unwrap()).collect();
        assert_eq!(values, vec![Bytes::from("first"), Bytes::from("second")]);
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: a client that opens a request and never finishes it must neither hold a
/// node's shutdown for the whole grace period nor keep a transport probe open forever. The
/// grace period and read timeout are set far above the test's own bound, so only the fixes
/// (reads that stop at shutdown, probe chunks bounded by the read timeout) let it pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_neither_block_shutdown_nor_probes_forever() {
    use quiver_proto::ApiKey;
    use quiver_proto::frame::frame_prefix;
    use quiver_proto::messages::{Message, ProbeDirection, TransportProbeRequest};
    let dir = tempfile::tempdir().unwrap();
    // A stalled probe upload is answered once a chunk takes longer than the read timeout.
    let node = start(dir.path(), |c| c.request_read_ms_max = 500).await;
    let c = client(&node).await;
    let (mut send, mut recv) = c.open_raw().await.unwrap();
    let body = TransportProbeRequest {
        direction: ProbeDirection::Upload,
        bytes: 0,
    }
    .to_bytes();
    send.write_chunks(&mut [
        frame_prefix(ApiKey::TransportProbe.code(), 1, 9, body.len()),
        body,
        Bytes::from_static(b"some bytes"),
    ])
    .await
    .unwrap();
    // ... and then nothing more, without finishing.
    let frame = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 16))
        .await
        .expect("the node answered the stalled probe")
        .unwrap();
    let (h, _) = quiver_proto::ResponseHeader::decode(frame).unwrap();
    assert_eq!(
        quiver_proto::ErrorCode::from_code(h.error),
        quiver_proto::ErrorCode::RequestTimedOut
    );
    node.shutdown().await;

    // Shutdown with a half-sent request in flight: bounded well below the 10-minute grace.
    let node = start(dir.path(), |c| {
        c.request_read_ms_max = 600_000;
        c.shutdown_grace_ms = 600_000;
    })
    .await;
    let c = client(&node).await;
    let (mut send, _recv) = c.open_raw().await.unwrap();
    send.write_all(&[1, 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(60), node.shutdown())
        .await
        .expect("shutdown was not held up by the stalled request");
}

/// How and why: a fetch's work must be bounded by its own budget: with `max_bytes` 0 only one
/// batch in total may go out (so a consumer still progresses), and a partition listed twice is
/// answered once, so a small request cannot make the node read without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_budget_bounds_the_work_of_one_request() {
    use quiver_proto::messages::{FetchPartition, FetchRequest, FetchResponse, FetchTopic};
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("budget", 2, &[]).await.unwrap();
        let producer = Producer::new(c.clone(), ProducerConfig::default());
        let mut acks = Vec::new();
        for p in [0, 1] {
            acks.push(
                producer
                    .send(ProducerRecord::new("budget", vec![b'v'; 500]).partition(p))
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
        let part = |partition| FetchPartition {
            partition,
            offset: 0,
            partition_max_bytes: 0,
        };
        let req = FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 0,
            topics: vec![FetchTopic {
                name: "budget".into(),
                partitions: vec![part(0), part(1), part(0)],
            }],
            chain: vec![],
        };
        let resp: FetchResponse = c.request(&req, 0).await.unwrap();
        let parts = &resp.topics[0].partitions;
        let with_data = parts.iter().filter(|p| !p.records.is_empty()).count();
        assert_eq!(with_data, 1, "one batch in total for a zero budget");
        assert!(parts[0].status.is_ok() && parts[1].status.is_ok());
        assert_eq!(
            parts[2].status.code,
            quiver_proto::ErrorCode::InvalidRequest,
            "duplicate entry"
        );
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: a producer dropped without `flush` or `close` still sends what it buffered
/// (its sender task drains and then stops), as Kafka's does on close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_producer_still_delivers_what_it_buffered() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("dropped", 1, &[]).await.unwrap();
        // A long linger: nothing would be sent before the drop on its own.
        let producer = Producer::new(
            c.clone(),
            ProducerConfig {
                linger_ms: 600_000,
                ..ProducerConfig::default()
            },
        );
        let mut deliveries = Vec::new();
        for i in 0..100 {
            deliveries.push(
                producer
                    .send(ProducerRecord::new("dropped", format!("r{i}")))
                    .await
                    .unwrap(),
            );
        }
        drop(producer);
        for d in deliveries {
            d.await.unwrap();
        }
        assert_eq!(consume_all(&c, "dropped").await.len(), 100);
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: keyless records stick to one partition only until their batch is sealed, by
/// size *or by linger*; a slow keyless producer (one record per linger period, like
/// `quiver produce` without a key) must still spread over every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_move_on_after_each_lingered_batch() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("keyless", 3, &[]).await.unwrap();
        let producer = Producer::new(
            c.clone(),
            ProducerConfig {
                linger_ms: 1,
                ..ProducerConfig::default()
            },
        );
        let mut per_partition = BTreeMap::<u32, u32>::new();
        for i in 0..30 {
            let meta = producer
                .send(ProducerRecord::new("keyless", format!("r{i}")))
                .await
                .unwrap()
                .await
                .unwrap();
            *per_partition.entry(meta.partition).or_default() += 1;
        }
        // One record per batch, partitions taken round-robin: ten each.
        assert_eq!(
            per_partition,
            BTreeMap::from([(0, 10), (1, 10), (2, 10)]),
            "keyless spread"
        );
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: a fetch is a long poll. It waits while fewer than `min_bytes` are readable,
/// wakes as soon as a produce brings it over (well before `max_wait_ms`), and answers empty
/// once `max_wait_ms` passes with nothing new. The waits here are far longer than the test's
/// own bound where the poll must wake early, so a poll that waited out its `max_wait_ms`
/// fails the test instead of passing slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_long_polls_until_min_bytes_or_max_wait() {
    use quiver_proto::messages::{FetchPartition, FetchRequest, FetchResponse, FetchTopic};
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        c.create_topic("poll", 1, &[]).await.unwrap();
        let fetch = |offset, min_bytes, max_wait_ms| FetchRequest {
            max_wait_ms,
            min_bytes,
            max_bytes: 1 << 20,
            topics: vec![FetchTopic {
                name: "poll".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset,
                    partition_max_bytes: 1 << 20,
                }],
            }],
            chain: vec![],
        };
        // Nothing to read: answered empty after max_wait_ms, status ok.
        let resp: FetchResponse = c.request(&fetch(0, 1, 200), 200).await.unwrap();
        let p = &resp.topics[0].partitions[0];
        assert!(p.status.is_ok() && p.records.is_empty() && p.high_watermark == 0);

        let producer = Producer::new(
            c.clone(),
            ProducerConfig {
                linger_ms: 0,
                ..ProducerConfig::default()
            },
        );
        let send = |v: &'static str| {
            let producer = producer.clone();
            async move {
                producer
                    .send(ProducerRecord::new("poll", v).partition(0))
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            }
        };
        send("first").await;
        let first: FetchResponse = c.request(&fetch(0, 1, 0), 0).await.unwrap();
        let first_bytes = first.topics[0].partitions[0].records.len() as u32;
        assert!(first_bytes > 0);

        // More than is there: the poll waits, even though one batch is readable.
        let c2 = c.clone();
        let req = fetch(0, first_bytes + 1, 60_000);
        let poll = tokio::spawn(async move {
            let r: FetchResponse = c2.request(&req, 60_000).await.unwrap();
            r
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!poll.is_finished(), "answered below min_bytes");
        send("second").await;
        let resp = tokio::time::timeout(Duration::from_secs(20), poll)
            .await
            .expect("the poll woke when the produce arrived")
            .unwrap();
        let p = &resp.topics[0].partitions[0];
        assert!(p.records.len() as u32 > first_bytes);
        assert_eq!(p.high_watermark, 2);

        // A poll at the end wakes for the next record.
        let c3 = c.clone();
        let req = fetch(2, 1, 60_000);
        let poll = tokio::spawn(async move {
            let r: FetchResponse = c3.request(&req, 60_000).await.unwrap();
            r
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        send("third").await;
        let resp = tokio::time::timeout(Duration::from_secs(20), poll)
            .await
            .expect("the poll woke")
            .unwrap();
        assert!(!resp.topics[0].partitions[0].records.is_empty());
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: the node bounds the bytes of fetch responses in flight. A fetch that is only
/// waiting for data must not hold a share of that bound, or a few idle consumers would stall
/// every fetch that has data. Here the bound is one fetch's worth, four long polls sit idle on
/// an empty topic, and a fetch with data must still be served (long before the node's 30 s
/// request timeout, after which it would have failed with `request_timed_out`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_long_polls_do_not_hold_the_fetch_budget() {
    use quiver_proto::messages::{FetchPartition, FetchRequest, FetchResponse, FetchTopic};
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |c| {
            c.in_flight_fetch_bytes_max = 1 << 20;
            c.fetch_bytes_max = 1 << 20;
        })
        .await;
        let c = client(&node).await;
        c.create_topic("idle", 1, &[]).await.unwrap();
        c.create_topic("busy", 1, &[]).await.unwrap();
        let fetch = |topic: &str, max_wait_ms| FetchRequest {
            max_wait_ms,
            min_bytes: 1,
            max_bytes: 1 << 20,
            topics: vec![FetchTopic {
                name: topic.into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }],
            chain: vec![],
        };
        let mut idle = Vec::new();
        for _ in 0..4 {
            let c = c.clone();
            let req = fetch("idle", 60_000);
            idle.push(tokio::spawn(async move {
                let _: Result<FetchResponse, _> = c.request(&req, 60_000).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let producer = Producer::new(c.clone(), ProducerConfig::default());
        producer
            .send(ProducerRecord::new("busy", "data").partition(0))
            .await
            .unwrap()
            .await
            .unwrap();
        let resp: FetchResponse =
            tokio::time::timeout(Duration::from_secs(15), c.request(&fetch("busy", 0), 0))
                .await
                .expect("served while idle polls wait")
                .unwrap();
        let p = &resp.topics[0].partitions[0];
        assert!(p.status.is_ok(), "{:?}", p.status);
        assert!(!p.records.is_empty());
        for t in &idle {
            assert!(!t.is_finished(), "idle polls are still waiting");
        }
        // The idle polls' client would retry against the stopped node: stop them first.
        for t in idle {
            t.abort();
        }
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// How and why: the producer options a user can pick are all exercised against the real node:
/// zstd and lz4 compression read back byte for byte, and `acks=none` (no offsets returned,
/// no response from the node) still lands every record, in order. The consumer is read as a
/// `Stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_and_acks_none_round_trip_through_a_stream() {
    use futures::StreamExt;
    use quiver_client::{Acks, Compression};
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), |_| {}).await;
        let c = client(&node).await;
        for (topic, compression, acks) in [
            ("zstd", Compression::Zstd, Acks::Leader),
            ("lz4", Compression::Lz4, Acks::Leader),
            ("fire", Compression::None, Acks::None),
        ] {
            c.create_topic(topic, 2, &[]).await.unwrap();
            let producer = Producer::new(
                c.clone(),
                ProducerConfig {
                    compression,
                    acks,
                    ..ProducerConfig::default()
                },
            );
            let mut deliveries = Vec::new();
            for i in 0..2_000 {
                deliveries.push(producer.send(record(topic, i)).await.unwrap());
            }
            producer.flush().await.unwrap();
            for d in deliveries {
                let meta = d.await.unwrap();
                assert_eq!(meta.offset.is_none(), acks == Acks::None, "{topic}");
            }
            // acks=none has no acknowledgement to wait for: poll until all arrived (bounded
            // by the test's timeout).
            let consumer = Consumer::new(c.clone(), topic, None, ConsumerConfig::default())
                .await
                .unwrap();
            let mut stream = Box::pin(consumer.into_stream());
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            let mut seen = 0;
            while seen < 2_000 {
                let r = stream.next().await.expect("stream goes on").unwrap();
                check_record(&r);
                if let Some(prev) = last.insert(r.partition, seq_of(&r)) {
                    assert!(prev < seq_of(&r), "{topic}: order within partition");
                }
                seen += 1;
            }
        }
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
