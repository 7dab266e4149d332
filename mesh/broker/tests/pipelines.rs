//! Pipelines through a real node: derived topics made by plugin chains.
//!
//! How and why: built-in plugins, built from source by `quiver-test-artifacts`, are deployed
//! over QUIC; pipelines are created, paused, resumed and deleted with the public client, as
//! `quiver pipeline` does; records are produced and read back with the public producer and
//! consumer. What must hold: every input record the chain passes on reaches its output topic
//! (routed by the plugin where it names one), with key, value, headers and timestamp; status
//! shows lag and counts; a paused pipeline makes no progress and catches up on resume; progress
//! survives a node restart with nothing lost and nothing repeated after a clean stop; failed
//! records are dead-lettered with their source offset, or stop the partition under `fail`;
//! topics and plugins a pipeline uses cannot be deleted under it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, read_all, start, wasm};
use quiver_client::{Client, ConsumerRecord, ErrorCode, Producer, ProducerConfig, ProducerRecord};
use quiver_proto::messages::{PipelineInfo, PipelineSpec};
use quiver_test_artifacts as guests;

/// Records `from..to`: JSON with a level (every third an error, every fifth a warning),
/// keyed, with a header.
async fn produce(c: &Client, topic: &str, from: u64, to: u64) {
    let producer = Producer::new(c.clone(), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in from..to {
        let level = match i {
            i if i % 3 == 0 => "error",
            i if i % 5 == 0 => "warn",
            _ => "info",
        };
        let v = format!(r#"{{"i":{i},"level":"{level}"}}"#);
        deliveries.push(
            producer
                .send(
                    ProducerRecord::new(topic, v)
                        .key(format!("k{i}"))
                        .header("n", i.to_string())
                        .timestamp(1_700_000_000_000 + i as i64),
                )
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    for d in deliveries {
        d.await.unwrap();
    }
}

async fn produce_raw(c: &Client, topic: &str, values: &[&str]) {
    let producer = Producer::new(c.clone(), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for v in values {
        deliveries.push(
            producer
                .send(ProducerRecord::new(topic, v.to_string()).partition(0))
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    for d in deliveries {
        d.await.unwrap();
    }
}

fn i_of(r: &ConsumerRecord) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
    v["i"].as_u64().unwrap()
}

fn lag(p: &PipelineInfo) -> u64 {
    p.partitions
        .iter()
        .map(|q| q.high_watermark - q.committed)
        .sum()
}

/// Waits until the pipeline has no lag (bounded).
async fn caught_up(c: &Client, name: &str) -> PipelineInfo {
    for _ in 0..400 {
        let p = c.list_pipelines(name).await.unwrap().pop().unwrap();
        if lag(&p) == 0 && p.partitions.iter().all(|q| q.high_watermark > 0) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("pipeline {name} did not catch up");
}

fn spec(name: &str, from: &str, to: &[&str], chain: &str, on_error: &str) -> PipelineSpec {
    PipelineSpec {
        name: name.into(),
        from: from.into(),
        to: to.iter().map(|t| t.to_string()).collect(),
        chain: chain.into(),
        on_error: on_error.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_derives_a_topic_pauses_resumes_and_survives_a_restart() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        c.create_topic("logs", 2, &[]).await.unwrap();
        c.create_topic("errors", 3, &[]).await.unwrap();
        produce(&c, "logs", 0, 300).await;

        let errors = spec(
            "errors",
            "logs",
            &["errors"],
            "filter-json field=level op=eq value=error",
            "fail",
        );
        // Checked when created.
        for (bad, code) in [
            (
                spec("Bad", "logs", &["errors"], &errors.chain, "fail"),
                ErrorCode::InvalidRequest,
            ),
            (
                spec("p", "nope", &["errors"], &errors.chain, "fail"),
                ErrorCode::UnknownTopicOrPartition,
            ),
            (
                spec("p", "logs", &["nope"], &errors.chain, "fail"),
                ErrorCode::UnknownTopicOrPartition,
            ),
            (
                spec("p", "logs", &["logs"], &errors.chain, "fail"),
                ErrorCode::InvalidConfig,
            ),
            (
                spec("p", "logs", &[], &errors.chain, "fail"),
                ErrorCode::InvalidConfig,
            ),
            (
                spec("p", "logs", &["errors"], "missing", "fail"),
                ErrorCode::PluginNotFound,
            ),
            (
                spec("p", "logs", &["errors"], "", "fail"),
                ErrorCode::InvalidConfig,
            ),
            (
                spec("p", "logs", &["errors"], &errors.chain, "sometimes"),
                ErrorCode::InvalidConfig,
            ),
        ] {
            let e = c.create_pipeline(&bad).await.unwrap_err();
            assert_eq!(e.code(), Some(code), "{bad:?}: {e}");
        }
        c.create_pipeline(&errors).await.unwrap();
        assert_eq!(
            c.create_pipeline(&errors).await.unwrap_err().code(),
            Some(ErrorCode::PipelineExists)
        );
        let status = caught_up(&c, "errors").await;
        assert_eq!(status.partitions.len(), 2);
        let total = |f: fn(&quiver_proto::messages::PipelinePartition) -> u64| {
            status.partitions.iter().map(f).sum::<u64>()
        };
        assert_eq!(total(|q| q.records_in), 300);
        assert_eq!(total(|q| q.records_out), 100);
        assert!(
            status.partitions.iter().all(|q| q.state == "running"),
            "{status:?}"
        );

        let out = read_all(&c, "errors").await;
        let mut got: Vec<u64> = out.iter().map(i_of).collect();
        got.sort();
        assert_eq!(got, (0..300).step_by(3).collect::<Vec<_>>());
        let r = out.iter().find(|r| i_of(r) == 9).unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"k9"[..]));
        assert_eq!(r.timestamp, 1_700_000_000_009);
        assert_eq!(
            r.headers,
            vec![("n".to_string(), Some(bytes::Bytes::from("9")))]
        );
        // Outputs are partitioned by key, like a producer would.
        assert!(
            out.iter().all(|r| r.partition
                == (quiver_client::murmur2(r.key.as_ref().unwrap()) & 0x7fff_ffff) % 3)
        );

        // Paused: no progress; resumed: caught up.
        c.pause_pipeline("errors", true).await.unwrap();
        produce(&c, "logs", 300, 600).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let paused = c.list_pipelines("errors").await.unwrap().pop().unwrap();
        assert!(paused.paused);
        assert_eq!(lag(&paused), 300);
        assert!(paused.partitions.iter().all(|q| q.state == "paused"));
        assert_eq!(read_all(&c, "errors").await.len(), 100);
        c.pause_pipeline("errors", false).await.unwrap();
        caught_up(&c, "errors").await;
        assert_eq!(read_all(&c, "errors").await.len(), 200);

        // Restart: progress is kept; records produced after it are processed once.
        drop(c);
        node.shutdown().await;
        let node = start(dir.path()).await;
        let c = client(&node).await;
        produce(&c, "logs", 600, 900).await;
        caught_up(&c, "errors").await;
        let mut got: Vec<u64> = read_all(&c, "errors").await.iter().map(i_of).collect();
        got.sort();
        assert_eq!(
            got,
            (0..900).step_by(3).collect::<Vec<_>>(),
            "none lost, none twice"
        );

        // In use: its topics and plugin cannot go.
        let deleted = c.delete_topic("errors").await.unwrap_err();
        assert_eq!(deleted.code(), Some(ErrorCode::InvalidConfig), "{deleted}");
        assert_eq!(
            c.remove_plugin("filter-json", "1.0.0")
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::PluginInUse)
        );
        c.delete_pipeline("errors").await.unwrap();
        assert_eq!(
            c.delete_pipeline("errors").await.unwrap_err().code(),
            Some(ErrorCode::PipelineNotFound)
        );
        assert!(c.list_pipelines("").await.unwrap().is_empty());
        c.delete_topic("errors").await.unwrap();
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_routes_dead_letters_and_stops_on_fail() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;
        c.deploy_plugin("route", "1.0.0", wasm(guests::ROUTE))
            .await
            .unwrap();
        c.deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        for t in ["in", "alerts", "other", "bad", "in2"] {
            c.create_topic(t, 1, &[]).await.unwrap();
        }
        // Errors and warnings to alerts, the rest to other; non-JSON to bad.
        c.create_pipeline(&spec(
            "router",
            "in",
            &["other", "alerts"],
            "route field=level map=error:alerts,warn:alerts",
            "dlq:bad",
        ))
        .await
        .unwrap();
        produce(&c, "in", 0, 30).await;
        produce_raw(&c, "in", &["not json"]).await;
        let status = caught_up(&c, "router").await;
        assert_eq!(status.partitions[0].records_failed, 1, "{status:?}");
        let alerts: Vec<u64> = read_all(&c, "alerts").await.iter().map(i_of).collect();
        let other: Vec<u64> = read_all(&c, "other").await.iter().map(i_of).collect();
        assert_eq!(
            alerts,
            (0..30)
                .filter(|i| i % 3 == 0 || i % 5 == 0)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            other,
            (0..30)
                .filter(|i| i % 3 != 0 && i % 5 != 0)
                .collect::<Vec<_>>()
        );
        let bad = read_all(&c, "bad").await;
        assert_eq!(bad.len(), 1);
        let header = |name: &str| {
            bad[0]
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.clone())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(bad[0].value.as_deref(), Some(&b"not json"[..]));
        assert_eq!(header("quiver.plugin").as_deref(), Some("route@1.0.0"));
        assert_eq!(header("quiver.source.topic").as_deref(), Some("in"));
        assert_eq!(header("quiver.source.partition").as_deref(), Some("0"));
        assert_eq!(header("quiver.source.offset").as_deref(), Some("30"));

        // fail: the partition stops at the failing record and says why; nothing after it is
        // written, and it stays stopped on resume until the cause is gone.
        c.create_pipeline(&spec(
            "strict",
            "in2",
            &["other"],
            "filter-json field=level op=eq value=nothing",
            "fail",
        ))
        .await
        .unwrap();
        produce_raw(&c, "in2", &[r#"{"level":"x"}"#, "oops"]).await;
        let mut state = String::new();
        for _ in 0..400 {
            let p = c.list_pipelines("strict").await.unwrap().pop().unwrap();
            state = p.partitions[0].state.clone();
            if state.starts_with("failed") {
                assert!(
                    p.partitions[0].committed <= 1,
                    "the failed read is not committed"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(state.starts_with("failed: record at offset 1"), "{state}");
        assert!(state.contains("filter-json@1.0.0"), "{state}");
        c.pause_pipeline("strict", false).await.unwrap();
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
