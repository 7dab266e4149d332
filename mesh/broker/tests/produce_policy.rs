//! Produce-side plugin policies through a real node (`plugin.on.produce`, `plugin.on.error`).
//!
//! How and why: built-in plugins and test guests, built from source by
//! `quiver-test-artifacts`, are deployed over QUIC and attached to topics with the public
//! client, as `quiver topic create|alter --on-produce --on-error` does; records are produced
//! and read back with the public producer and consumer. What must hold: what is stored is
//! what the chain passed on, in order; `fail` refuses the produce naming the record and stores
//! nothing of that partition; `skip` drops failed records; `dlq` stores them unchanged in the
//! dead-letter topic with the documented headers, also when the plugin traps; the policy is
//! validated when set, survives a restart, keeps its plugins from being removed, and can be
//! changed or cleared on the live topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, header, read_all, start, wasm};
use quiver_client::{Client, ConsumerRecord, ErrorCode, Producer, ProducerConfig, ProducerRecord};
use quiver_test_artifacts as guests;

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Produces `values` (keyed k0, k1, ...) to partition 0 as one batch; each record's outcome.
async fn produce(
    c: &Client,
    topic: &str,
    values: &[&str],
) -> Vec<Result<Option<u64>, quiver_client::ProduceError>> {
    let producer = Producer::new(
        c.clone(),
        ProducerConfig {
            linger_ms: 50,
            ..ProducerConfig::default()
        },
    );
    let mut deliveries = Vec::new();
    for (i, v) in values.iter().enumerate() {
        deliveries.push(
            producer
                .send(
                    ProducerRecord::new(topic, v.to_string())
                        .key(format!("k{i}"))
                        .header("src", "test")
                        .partition(0),
                )
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    let mut out = Vec::new();
    for d in deliveries {
        out.push(d.await.map(|m| m.offset));
    }
    out
}

fn value(r: &ConsumerRecord) -> String {
    String::from_utf8(r.value.as_ref().unwrap().to_vec()).unwrap()
}

const CHAIN: &str = "filter-json field=level op=ne value=debug | redact@1.0.0 fields=ssn";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_filters_redacts_and_dead_letters_before_append() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        c.deploy_plugin("redact", "1.0.0", wasm(guests::REDACT))
            .await
            .unwrap();

        // Checked when set: unknown plugins, a missing dead-letter topic, itself as one.
        let refused = |r: Result<(), quiver_client::ClientError>| r.unwrap_err().code().unwrap();
        assert_eq!(
            refused(
                c.create_topic("users", 1, &kv(&[("plugin.on.produce", "nope")]))
                    .await
            ),
            ErrorCode::PluginNotFound
        );
        assert_eq!(
            refused(
                c.create_topic(
                    "users",
                    1,
                    &kv(&[("plugin.on.produce", CHAIN), ("plugin.on.error", "dlq:bad")])
                )
                .await
            ),
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            refused(
                c.create_topic("users", 1, &kv(&[("plugin.on.produce", "redact@")]))
                    .await
            ),
            ErrorCode::InvalidConfig
        );
        c.create_topic("bad", 1, &[]).await.unwrap();
        c.create_topic(
            "users",
            1,
            &kv(&[("plugin.on.produce", CHAIN), ("plugin.on.error", "dlq:bad")]),
        )
        .await
        .unwrap();
        let described = c.describe_topic("users").await.unwrap();
        assert!(
            described
                .configs
                .contains(&("plugin.on.error".to_string(), "dlq:bad".to_string()))
        );

        let outcomes = produce(
            &c,
            "users",
            &[
                r#"{"level":"info","ssn":"123-45-6789","n":1}"#,
                r#"{"level":"debug","n":2}"#,
                "not json",
                r#"{"level":"error","n":4}"#,
            ],
        )
        .await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let stored = read_all(&c, "users").await;
        let values: Vec<String> = stored.iter().map(value).collect();
        assert_eq!(
            values,
            vec![
                r#"{"level":"info","n":1,"ssn":"***"}"#.to_string(),
                r#"{"level":"error","n":4}"#.to_string(),
            ]
        );
        assert_eq!(stored[0].key.as_deref(), Some(&b"k0"[..]));
        assert_eq!(stored[1].key.as_deref(), Some(&b"k3"[..]));
        assert_eq!(header(&stored[1], "src").as_deref(), Some("test"));
        assert_eq!((stored[0].offset, stored[1].offset), (0, 1));

        let dead = read_all(&c, "bad").await;
        assert_eq!(dead.len(), 1);
        let d = &dead[0];
        assert_eq!(value(d), "not json");
        assert_eq!(d.key.as_deref(), Some(&b"k2"[..]));
        assert_eq!(
            header(d, "src").as_deref(),
            Some("test"),
            "its own headers kept"
        );
        assert_eq!(
            header(d, "quiver.plugin").as_deref(),
            Some("filter-json@1.0.0")
        );
        assert!(header(d, "quiver.error").is_some_and(|e| !e.is_empty()));
        assert_eq!(header(d, "quiver.source.topic").as_deref(), Some("users"));
        assert_eq!(header(d, "quiver.source.partition").as_deref(), Some("0"));
        assert_eq!(header(d, "quiver.source.index").as_deref(), Some("2"));

        // A policy's plugins and dead-letter topic are in use.
        assert_eq!(
            c.remove_plugin("redact", "1.0.0").await.unwrap_err().code(),
            Some(ErrorCode::PluginInUse)
        );
        assert_eq!(
            c.remove_plugin("filter-json", "1.0.0")
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::PluginInUse),
            "named without a version, the highest deployed is in use"
        );
        assert_eq!(
            refused(c.delete_topic("bad").await),
            ErrorCode::InvalidConfig
        );

        // fail: the produce is refused naming the record, and nothing of it is stored.
        c.alter_topic("users", &kv(&[("plugin.on.error", "fail")]), &[])
            .await
            .unwrap();
        let outcomes = produce(&c, "users", &[r#"{"level":"info"}"#, "oops"]).await;
        for o in &outcomes {
            let e = o.as_ref().unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{e}");
            assert!(e.to_string().contains("record 1 (key \"k1\")"), "{e}");
            assert!(e.to_string().contains("filter-json@1.0.0"), "{e}");
        }
        assert_eq!(read_all(&c, "users").await.len(), 2);

        // skip: failed records are dropped, the rest stored.
        c.alter_topic("users", &kv(&[("plugin.on.error", "skip")]), &[])
            .await
            .unwrap();
        let outcomes = produce(&c, "users", &[r#"{"level":"info","n":5}"#, "oops"]).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let stored = read_all(&c, "users").await;
        assert_eq!(stored.len(), 3);
        assert_eq!(value(&stored[2]), r#"{"level":"info","n":5}"#);
        assert_eq!(
            read_all(&c, "bad").await.len(),
            1,
            "skip writes no dead letters"
        );

        // Only policy settings change on a live topic.
        assert_eq!(
            refused(
                c.alter_topic("users", &kv(&[("retention.ms", "1")]), &[])
                    .await
            ),
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            refused(
                c.alter_topic("users", &kv(&[("plugin.on.produce", "nope")]), &[])
                    .await
            ),
            ErrorCode::PluginNotFound
        );
        assert_eq!(
            refused(
                c.alter_topic("nothing", &kv(&[("plugin.on.error", "skip")]), &[])
                    .await
            ),
            ErrorCode::UnknownTopicOrPartition
        );

        // The policy survives a restart.
        drop(c);
        node.shutdown().await;
        let node = start(dir.path()).await;
        let c = client(&node).await;
        let outcomes = produce(
            &c,
            "users",
            &[r#"{"level":"debug"}"#, r#"{"level":"warn","ssn":"x"}"#],
        )
        .await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let stored = read_all(&c, "users").await;
        assert_eq!(stored.len(), 4);
        assert_eq!(value(&stored[3]), r#"{"level":"warn","ssn":"***"}"#);

        // Cleared: records are stored as produced, and the plugins are free to go.
        c.alter_topic(
            "users",
            &[],
            &[
                "plugin.on.produce".to_string(),
                "plugin.on.error".to_string(),
            ],
        )
        .await
        .unwrap();
        produce(&c, "users", &[r#"{"level":"debug","ssn":"1"}"#]).await[0]
            .as_ref()
            .unwrap();
        assert_eq!(
            value(read_all(&c, "users").await.last().unwrap()),
            r#"{"level":"debug","ssn":"1"}"#
        );
        c.remove_plugin("redact", "1.0.0").await.unwrap();
        c.delete_topic("bad").await.unwrap();
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_policy_drops_repeated_keys_across_requests() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("dedupe", "1.0.0", wasm(guests::DEDUPE))
            .await
            .unwrap();
        c.create_topic(
            "orders",
            1,
            &kv(&[("plugin.on.produce", "dedupe window-ms=60000")]),
        )
        .await
        .unwrap();
        // One record per request, so every record is the first of its request: the plugin
        // must still see distinct offsets to tell a duplicate from a replay.
        let producer = Producer::new(c.clone(), ProducerConfig::default());
        for key in ["a", "b", "a", "c", "b", "a"] {
            producer
                .send(
                    ProducerRecord::new("orders", key.to_string())
                        .key(key)
                        .partition(0),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let stored: Vec<String> = read_all(&c, "orders").await.iter().map(value).collect();
        assert_eq!(stored, vec!["a", "b", "c"]);
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_traps_sends_its_batch_to_the_dead_letter_topic() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("panic", "0.1.0", wasm(guests::PANIC))
            .await
            .unwrap();
        c.create_topic("dead", 2, &[]).await.unwrap();
        c.create_topic(
            "t",
            1,
            &kv(&[
                ("plugin.on.produce", "panic"),
                ("plugin.on.error", "dlq:dead"),
            ]),
        )
        .await
        .unwrap();
        let outcomes = produce(&c, "t", &["fine", "boom", "fine too"]).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert!(read_all(&c, "t").await.is_empty());
        let dead = read_all(&c, "dead").await;
        assert_eq!(
            dead.iter().map(value).collect::<Vec<_>>(),
            vec!["fine", "boom", "fine too"],
            "the whole batch the plugin failed on"
        );
        assert!(dead.iter().all(|d| d.partition == 0));
        let error = header(&dead[1], "quiver.error").unwrap();
        assert!(error.contains("trapped"), "{error}");
        assert_eq!(
            header(&dead[1], "quiver.plugin").as_deref(),
            Some("panic@0.1.0")
        );
        // The rebuilt instance serves the next batch.
        let outcomes = produce(&c, "t", &["ok"]).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(
            read_all(&c, "t")
                .await
                .iter()
                .map(value)
                .collect::<Vec<_>>(),
            vec!["ok"]
        );
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
