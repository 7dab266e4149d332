//! Consumer-side plugin chains through a real node (Fetch version 2).
//!
//! How and why: built-in plugins and test guests, built from source by
//! `quiver-test-artifacts`, are deployed over QUIC and named in fetches by the public
//! consumer, as `quiver consume --plugin` does. What must hold: the node sends only what the
//! chain keeps, at the records' original offsets; a consumer's position moves past what was
//! dropped and a consumer started mid-log resumes correctly; transforms rewrite records in
//! place; a version deployed while a chain runs takes over at a batch boundary with no record
//! lost or seen twice; a plugin that fails answers `plugin_failed` for its partition and the
//! node keeps serving; a version in use cannot be removed; `plugin describe` counts the work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, start, wasm};
use quiver_client::{
    ChainStep, Client, Consumer, ConsumerConfig, ConsumerRecord, ErrorCode, Producer,
    ProducerConfig, ProducerRecord, SeekTo,
};
use quiver_test_artifacts as guests;

fn step(plugin: &str, version: &str, params: &[(&str, &str)]) -> ChainStep {
    ChainStep {
        plugin: plugin.into(),
        version: version.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// `count` JSON records over the topic's partitions, in batches of about `batch_bytes`;
/// every third is an error.
async fn produce(c: &Client, topic: &str, count: u64, batch_bytes: usize) {
    let producer = Producer::new(
        c.clone(),
        ProducerConfig {
            batch_bytes,
            ..ProducerConfig::default()
        },
    );
    let mut deliveries = Vec::new();
    for i in 0..count {
        let level = if i % 3 == 0 { "error" } else { "info" };
        let value = format!(r#"{{"i":{i},"level":"{level}","user":"u{i}"}}"#);
        deliveries.push(
            producer
                .send(ProducerRecord::new(topic, value).key(format!("k{i}")))
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    for d in deliveries {
        d.await.unwrap();
    }
}

/// Reads every partition to its current end (positions at the high watermarks).
async fn read_all(
    c: &Client,
    topic: &str,
    chain: Vec<ChainStep>,
    start: SeekTo,
) -> Result<Vec<ConsumerRecord>, quiver_client::ClientError> {
    let mut consumer = Consumer::new(
        c.clone(),
        topic,
        None,
        ConsumerConfig {
            chain,
            fetch_wait_ms_max: 50,
            partition_bytes_max: 4 << 10,
            ..ConsumerConfig::default()
        },
    )
    .await?;
    consumer.seek_all(start).await?;
    let mut out = Vec::new();
    for _ in 0..10_000 {
        out.extend(consumer.poll().await?);
        if consumer.caught_up() {
            return Ok(out);
        }
    }
    panic!("the consumer did not catch up");
}

fn field(r: &ConsumerRecord, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
    v[name].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_chain_filters_on_the_node_and_offsets_are_kept() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        c.create_topic("logs", 2, &[]).await.unwrap();
        produce(&c, "logs", 3_000, 4_000).await;

        let all = read_all(&c, "logs", vec![], SeekTo::Earliest)
            .await
            .unwrap();
        assert_eq!(all.len(), 3_000);
        let errors = vec![step(
            "filter-json",
            "1.0.0",
            &[("field", "level"), ("op", "eq"), ("value", "error")],
        )];
        let kept = read_all(&c, "logs", errors.clone(), SeekTo::Earliest)
            .await
            .unwrap();
        // Exactly the error records, each at its own offset, with its key and value.
        let mut expected: Vec<_> = all
            .iter()
            .filter(|r| field(r, "level") == "error")
            .map(|r| (r.partition, r.offset, r.key.clone(), r.value.clone()))
            .collect();
        let mut got: Vec<_> = kept
            .iter()
            .map(|r| (r.partition, r.offset, r.key.clone(), r.value.clone()))
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(got.len(), 1_000);
        assert_eq!(got, expected);

        // A consumer starting mid-log (inside a stored batch) sees only what follows.
        let mid = all
            .iter()
            .filter(|r| r.partition == 0)
            .nth(700)
            .unwrap()
            .offset
            + 1;
        let mut consumer = Consumer::new(
            c.clone(),
            "logs",
            Some(vec![0]),
            ConsumerConfig {
                chain: errors.clone(),
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
        consumer.seek(0, SeekTo::Offset(mid)).await.unwrap();
        let mut resumed = Vec::new();
        while !consumer.caught_up() {
            resumed.extend(consumer.poll().await.unwrap());
        }
        let expected_after: Vec<u64> = expected
            .iter()
            .filter(|e| e.0 == 0 && e.1 >= mid)
            .map(|e| e.1)
            .collect();
        assert_eq!(
            resumed.iter().map(|r| r.offset).collect::<Vec<_>>(),
            expected_after
        );

        // A chain that keeps nothing still moves the position to the end.
        let none = vec![step(
            "filter-json",
            "",
            &[("field", "level"), ("op", "eq"), ("value", "fatal")],
        )];
        let mut consumer = Consumer::new(
            c.clone(),
            "logs",
            None,
            ConsumerConfig {
                chain: none,
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
        let mut seen = 0;
        let mut polls = 0;
        while !consumer.caught_up() {
            seen += consumer.poll().await.unwrap().len();
            polls += 1;
            assert!(polls < 1_000, "positions must move past dropped records");
        }
        assert_eq!(seen, 0);
        for p in consumer.assignment() {
            assert_eq!(consumer.position(p), consumer.high_watermark(p));
        }

        // A transform rewrites records in place: same offsets, the field masked.
        c.deploy_plugin("redact", "1.0.0", wasm(guests::REDACT))
            .await
            .unwrap();
        let chain = vec![
            errors[0].clone(),
            step("redact", "1.0.0", &[("fields", "user")]),
        ];
        let redacted = read_all(&c, "logs", chain, SeekTo::Earliest).await.unwrap();
        let mut offsets: Vec<_> = redacted.iter().map(|r| (r.partition, r.offset)).collect();
        offsets.sort();
        assert_eq!(
            offsets,
            expected.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>()
        );
        assert!(redacted.iter().all(|r| field(r, "user") == "***"));
        assert!(redacted.iter().all(|r| field(r, "level") == "error"));

        // describe counts what ran: every record went into filter-json 1.0.0 at least once.
        let info = c.list_plugins("filter-json").await.unwrap();
        let v1 = info.iter().find(|p| p.version == "1.0.0").unwrap();
        assert!(v1.records_in >= 3_000, "{v1:?}");
        assert!(
            v1.records_out >= 1_000 && v1.records_dropped >= 2_000,
            "{v1:?}"
        );
        assert!(v1.batches > 0 && v1.guest_us > 0, "{v1:?}");
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_takes_over_at_a_batch_boundary() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        // pick 1.0.0 keeps one record in two; pick 2.0.0 keeps everything.
        c.deploy_plugin("pick", "1.0.0", wasm(guests::SAMPLE))
            .await
            .unwrap();
        c.create_topic("t", 1, &[]).await.unwrap();
        produce(&c, "t", 400, 1_500).await;

        let mut consumer = Consumer::new(
            c.clone(),
            "t",
            None,
            ConsumerConfig {
                chain: vec![step("pick", "", &[("rate", "2")])],
                partition_bytes_max: 1,
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
        // One stored batch per fetch (the partition limit is 1 byte).
        let mut before = Vec::new();
        while consumer.position(0).unwrap() < 200 {
            before.extend(consumer.poll().await.unwrap());
        }
        let swap_at = consumer.position(0).unwrap();
        c.deploy_plugin("pick", "2.0.0", wasm(guests::IDENTITY))
            .await
            .unwrap();
        let mut after = Vec::new();
        while !consumer.caught_up() {
            after.extend(consumer.poll().await.unwrap());
        }
        assert_eq!(
            before.len() as u64,
            swap_at.div_ceil(2),
            "the 1st, 3rd, ... before the swap"
        );
        let after_offsets: Vec<u64> = after.iter().map(|r| r.offset).collect();
        assert_eq!(
            after_offsets,
            (swap_at..400).collect::<Vec<_>>(),
            "every record after the swap, none twice"
        );
        let infos = c.list_plugins("pick").await.unwrap();
        assert_eq!(infos[0].attached, 0, "1.0.0 was let go: {infos:?}");
        assert_eq!(infos[1].attached, 1, "2.0.0 runs: {infos:?}");
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_chains_are_reported_and_the_node_keeps_serving() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        c.deploy_plugin("panic", "0.1.0", wasm(guests::PANIC))
            .await
            .unwrap();
        c.create_topic("t", 1, &[]).await.unwrap();
        produce(&c, "t", 30, 1_000).await;

        let code = |r: Result<Vec<ConsumerRecord>, quiver_client::ClientError>| {
            r.expect_err("refused").code().expect("a server code")
        };
        // Unknown plugin or version: the whole fetch is refused.
        for chain in [
            vec![step("nope", "", &[])],
            vec![step("filter-json", "9.9.9", &[])],
        ] {
            assert_eq!(
                code(read_all(&c, "t", chain, SeekTo::Earliest).await),
                ErrorCode::PluginNotFound
            );
        }
        assert_eq!(
            code(read_all(&c, "t", vec![step("Bad Name", "", &[])], SeekTo::Earliest).await),
            ErrorCode::InvalidRequest
        );
        // Parameters init refuses, and a guest that traps: plugin_failed, with the reason.
        let err = read_all(
            &c,
            "t",
            vec![step("filter-json", "", &[])],
            SeekTo::Earliest,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PluginFailed), "{err}");
        assert!(err.to_string().contains("filter-json@1.0.0"), "{err}");
        c.create_topic("boom", 1, &[]).await.unwrap();
        let producer = Producer::new(c.clone(), ProducerConfig::default());
        for v in ["fine", "boom", "fine"] {
            drop(producer.send(ProducerRecord::new("boom", v)).await.unwrap());
        }
        producer.flush().await.unwrap();
        drop(producer);
        let err = read_all(&c, "boom", vec![step("panic", "", &[])], SeekTo::Earliest)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PluginFailed), "{err}");
        assert!(err.to_string().contains("trapped"), "{err}");
        // The same plugin serves the next fetch that does not make it panic.
        assert_eq!(
            read_all(&c, "t", vec![step("panic", "", &[])], SeekTo::Earliest)
                .await
                .unwrap()
                .len(),
            30
        );

        // The node still serves, with and without a chain.
        assert_eq!(
            read_all(&c, "t", vec![], SeekTo::Earliest)
                .await
                .unwrap()
                .len(),
            30
        );
        let chain = vec![step(
            "filter-json",
            "",
            &[("field", "level"), ("op", "eq"), ("value", "error")],
        )];
        assert_eq!(
            read_all(&c, "t", chain.clone(), SeekTo::Earliest)
                .await
                .unwrap()
                .len(),
            10
        );

        // A version with running instances cannot be removed; once its consumer's
        // connection is gone, it can.
        let other = client(&node).await;
        let _held = read_all(&other, "t", chain, SeekTo::Earliest)
            .await
            .unwrap();
        let refused = c.remove_plugin("filter-json", "1.0.0").await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::PluginInUse), "{refused}");
        drop(other);
        drop(c);
        let c = client(&node).await;
        let mut removed = false;
        for _ in 0..100 {
            match c.remove_plugin("filter-json", "1.0.0").await {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) if e.code() == Some(ErrorCode::PluginInUse) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(removed, "the plugin is let go when the connections close");
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
