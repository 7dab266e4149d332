//! Records per second per core through plugins, beside a native Rust closure doing the same
//! work: `cargo bench -p quiver-runtime --bench plugin_throughput [-- --json] [-- --seconds S]`.
//!
//! Each configuration runs one thread (one core) repeatedly over one pre-built columnar batch
//! for about `--seconds` (default 1) and reports the best of three rounds. A plugin call
//! includes everything the host pays per batch: arming the deadline, lowering the batch into
//! guest memory, the guest's loop over the SDK's record views, and lifting and checking the
//! verdicts. Records are ~100-byte JSON values with an 8-byte key and one header.
//!
//! - `identity`: keeps every record (the trivial filter of the target) vs a native loop that
//!   visits every record's value and keeps it.
//! - `filter-json`: `field=kind op=eq value="click"` vs the same extraction
//!   (`quiver_plugin::json::FieldPath::extract`: serde_json, skipping all but the field)
//!   and comparison compiled natively, and vs building the whole `serde_json::Value`.

use std::time::{Duration, Instant};

use quiver_runtime::{ColumnarBatch, MemoryState, Runtime, RuntimeConfig};

fn batch(n: usize) -> ColumnarBatch {
    let mut b = ColumnarBatch::new();
    for i in 0..n {
        let kind = if i % 2 == 0 { "click" } else { "view" };
        let value = format!(
            r#"{{"id":{i},"kind":"{kind}","score":0.{i:03},"user":"u{:05}","pad":"{}"}}"#,
            i % 10_000,
            "x".repeat(30)
        );
        b.push(
            i as u64,
            1_700_000_000_000 + i as i64,
            Some(format!("key{:05}", i % 100_000).as_bytes()),
            Some(value.as_bytes()),
            &[("src", Some(b"bench"))],
        );
    }
    b
}

/// Best records/s of three rounds of `seconds` each.
fn measure(seconds: f64, n: usize, mut run: impl FnMut() -> usize) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let mut records = 0usize;
        while started.elapsed() < Duration::from_secs_f64(seconds) {
            let kept = run();
            assert!(kept <= n);
            records += n;
        }
        best = best.max(records as f64 / started.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let rt = Runtime::new(RuntimeConfig {
        call_ms_max: 10_000,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let load = |path: &str, params: &[(&str, &str)]| {
        rt.load(&std::fs::read(path).expect("guest built"))
            .expect("loads")
            .instantiate(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                Box::new(MemoryState::new(1 << 20)),
            )
            .expect("instantiates")
    };
    let mut identity = load(quiver_test_artifacts::IDENTITY, &[]);
    let mut filter_json = load(
        quiver_test_artifacts::FILTER_JSON,
        &[("field", "kind"), ("op", "eq"), ("value", "\"click\"")],
    );
    if !json {
        println!("pooling allocator: {}", rt.pooling());
        println!(
            "{:<18} {:>7} {:>16} {:>16} {:>8}",
            "work", "batch", "plugin rec/s", "native rec/s", "ratio"
        );
    }
    for n in [1usize, 100, 1_000, 10_000] {
        let b = batch(n);
        let records = b.records();
        let kind = quiver_plugin::json::FieldPath::parse("kind").expect("a path");
        let rows = [
            (
                "identity",
                measure(seconds, n, || {
                    identity.filter(&b).expect("runs").kept().count()
                }),
                measure(seconds, n, || {
                    records
                        .iter()
                        .filter(|r| std::hint::black_box(r.value.as_ref()).is_some())
                        .count()
                }),
            ),
            (
                "filter-json",
                measure(seconds, n, || {
                    filter_json.filter(&b).expect("runs").kept().count()
                }),
                measure(seconds, n, || {
                    records
                        .iter()
                        .filter(|r| {
                            kind.extract(r.value.as_deref())
                                .ok()
                                .flatten()
                                .is_some_and(|v| v == "click")
                        })
                        .count()
                }),
            ),
            (
                "filter-json/Value",
                measure(seconds, n, || {
                    filter_json.filter(&b).expect("runs").kept().count()
                }),
                measure(seconds, n, || {
                    records
                        .iter()
                        .filter(|r| {
                            serde_json::from_slice::<serde_json::Value>(
                                r.value.as_deref().unwrap_or_default(),
                            )
                            .ok()
                            .is_some_and(|v| v.pointer("/kind") == Some(&"click".into()))
                        })
                        .count()
                }),
            ),
        ];
        for (work, plugin, native) in rows {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "kind": "plugin_throughput", "work": work, "batch": n,
                        "plugin_records_per_s": plugin, "native_records_per_s": native,
                        "pooling": rt.pooling(),
                    })
                );
            } else {
                println!(
                    "{work:<18} {n:>7} {plugin:>16.0} {native:>16.0} {:>8.2}",
                    plugin / native
                );
            }
        }
    }
}
