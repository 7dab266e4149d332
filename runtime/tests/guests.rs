//! The runtime against real components: the reference guests, and one misbehaving guest per
//! way a plugin can go wrong.
//!
//! How: the components are built from `runtime/test-guests/*` by `quiver-test-artifacts`'s
//! build script with the real SDK, and loaded through the same `Runtime` the broker uses.
//! Each misbehaving guest must end its call with the right typed `PluginError`, and the same
//! instance (rebuilt from its pre-instantiated plugin) must then serve the next batch; the
//! runtime must keep serving other plugins throughout. Limits are set low so the tests run
//! fast, but nothing here asserts on speed: deadlines are limits, not measurements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use quiver_runtime::{
    CacheOutcome, Chain, ColumnarBatch, LogSource, MemoryState, MetricValue, PluginError,
    PluginKind, Runtime, RuntimeConfig, StateStore,
};
use quiver_test_artifacts as guests;

/// A runtime with a generous deadline: the tests run in parallel on a loaded machine, and a
/// deadline is only meant to stop guests that never return (see `SPIN_DEADLINE_MS`).
fn runtime() -> Runtime {
    runtime_with_deadline(10_000)
}

/// The deadline of the test where it is the point.
const SPIN_DEADLINE_MS: u64 = 300;

fn runtime_with_deadline(call_ms_max: u64) -> Runtime {
    Runtime::new(RuntimeConfig {
        call_ms_max,
        memory_bytes_max: 32 << 20,
        instances_max: 32,
        log_lines_per_call_max: 100,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn batch(values: &[&str]) -> ColumnarBatch {
    let mut b = ColumnarBatch::new();
    for (i, v) in values.iter().enumerate() {
        b.push(
            100 + i as u64,
            1_000 + i as i64,
            Some(format!("k{i}").as_bytes()),
            Some(v.as_bytes()),
            &[("mark", Some(b"xyz")), ("null", None)],
        );
    }
    b
}

fn state() -> Box<dyn StateStore> {
    Box::new(MemoryState::new(1 << 20))
}

fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn reference_filter_keeps_drops_fails_and_uses_host_services() {
    let rt = runtime();
    let plugin = rt.load(&wasm(guests::REFERENCE)).unwrap();
    assert_eq!(plugin.kind(), PluginKind::Filter);
    assert_eq!(
        plugin.sha256(),
        quiver_runtime::sha256_hex(&wasm(guests::REFERENCE))
    );

    match plugin.instantiate(vec![], state()).map_err(|r| r.error) {
        Err(PluginError::InitFailed(m)) => assert!(m.contains("missing parameter: needle"), "{m}"),
        other => panic!("expected init to fail, got {other:?}"),
    }

    let mut inst = plugin
        .instantiate(params(&[("needle", "an")]), state())
        .unwrap();
    let init_logs = &inst.report().logs;
    assert!(
        init_logs
            .iter()
            .any(|l| l.message == "reference filter ready"
                && l.fields == vec![("needle".into(), "an".into())]),
        "{init_logs:?}"
    );
    let out = inst
        .filter(&batch(&["banana", "berry", "FAIL", "mango"]))
        .unwrap();
    assert_eq!(out.keep, vec![true, false, false, true]);
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].0, 2);
    assert!(
        out.failures[0].1.contains("offset 102"),
        "{:?}",
        out.failures
    );
    let metrics = inst.metrics();
    assert!(
        metrics.contains(&("records".into(), MetricValue::Counter(4))),
        "{metrics:?}"
    );
    assert!(metrics.contains(&("last-mark-bytes".into(), MetricValue::Gauge(3.0))));
    let s = inst.stats();
    assert_eq!(
        (
            s.batches,
            s.records_in,
            s.records_out,
            s.records_dropped,
            s.records_failed
        ),
        (1, 4, 2, 1, 1)
    );

    // Keyed state outlives the instance (a version swap hands it on).
    let state = inst.into_state();
    assert_eq!(state.get(b"seen"), Some(4u64.to_le_bytes().to_vec()));
    let mut next = plugin
        .instantiate(params(&[("needle", "")]), state)
        .unwrap();
    next.filter(&batch(&["x"])).unwrap();
    assert_eq!(
        next.into_state().get(b"seen"),
        Some(5u64.to_le_bytes().to_vec())
    );
}

#[test]
fn transform_splits_routes_and_fails_per_record() {
    let rt = runtime();
    let plugin = rt.load(&wasm(guests::SPLIT)).unwrap();
    assert_eq!(plugin.kind(), PluginKind::Transform);
    let mut inst = plugin.instantiate(vec![], state()).unwrap();
    let mut input = batch(&["a,b", "", "FAIL"]);
    input.push(7, 5, None, Some(b"c"), &[("route", Some(b"other"))]);
    let out = inst.transform(&input).unwrap();
    let records = out.records.records();
    let values: Vec<_> = records.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(values, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(out.sources, vec![0, 0, 3]);
    assert_eq!(out.topics, vec![None, None, Some("other".into())]);
    assert_eq!(records[0].key.as_deref(), Some(&b"k0"[..]), "key kept");
    assert_eq!(records[0].timestamp, 1_000, "input timestamp kept");
    assert_eq!(
        records[0].headers[1],
        ("null".into(), None),
        "null header kept"
    );
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].0, 2);
    // A transform is not a filter: refused, and the instance is not torn down for it.
    assert!(matches!(inst.filter(&input), Err(PluginError::Invalid(_))));
    assert_eq!(inst.stats().errors, 0);
    assert_eq!(inst.transform(&input).unwrap().sources, vec![0, 0, 3]);
}

#[test]
fn a_guest_that_loops_forever_times_out_and_the_next_batch_still_runs() {
    let rt = runtime_with_deadline(SPIN_DEADLINE_MS);
    let mut inst = rt
        .load(&wasm(guests::SPIN))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            inst.filter(&batch(&["x"])),
            Err(PluginError::Timeout(SPIN_DEADLINE_MS))
        );
    }
    assert_eq!(inst.stats().errors, 2);
    assert_eq!(inst.stats().rebuilds, 1, "rebuilt before the second batch");
    // Other plugins on the same runtime are unaffected.
    let mut other = rt
        .load(&wasm(guests::REFERENCE))
        .unwrap()
        .instantiate(params(&[("needle", "x")]), state())
        .unwrap();
    assert_eq!(other.filter(&batch(&["x"])).unwrap().keep, vec![true]);
}

#[test]
fn a_guest_that_allocates_without_bound_hits_its_memory_cap() {
    let rt = runtime();
    let mut inst = rt
        .load(&wasm(guests::HOG))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    assert_eq!(
        inst.filter(&batch(&["x"])),
        Err(PluginError::OutOfMemory(32 << 20))
    );
    assert_eq!(
        inst.filter(&batch(&["x"])),
        Err(PluginError::OutOfMemory(32 << 20))
    );
}

#[test]
fn a_panicking_guest_traps_and_is_rebuilt_for_the_next_batch() {
    let rt = runtime();
    let mut inst = rt
        .load(&wasm(guests::PANIC))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    match inst.filter(&batch(&["ok", "boom"])) {
        Err(PluginError::Trap(m)) => assert!(m.contains("guest panicked at offset 101"), "{m}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let out = inst.filter(&batch(&["ok", "fine"])).unwrap();
    assert_eq!(out.keep, vec![true, true]);
    assert_eq!(inst.stats().rebuilds, 1);
}

#[test]
fn output_that_breaks_the_contract_is_refused() {
    let rt = runtime();
    let plugin = rt.load(&wasm(guests::BAD_OUTPUT)).unwrap();
    for (mode, expected) in [
        (
            "short",
            PluginError::InvalidOutput("2 verdicts for 3 records".into()),
        ),
        (
            "out-of-range",
            PluginError::InvalidOutput("failure names record 10 of 3".into()),
        ),
        (
            "duplicate",
            PluginError::InvalidOutput("record 0 is named as failed twice".into()),
        ),
        ("error", PluginError::Failed("the plugin gave up".into())),
    ] {
        let mut inst = plugin
            .instantiate(params(&[("mode", mode)]), state())
            .unwrap();
        for round in 0..2 {
            assert_eq!(
                inst.filter(&batch(&["a", "b", "c"])),
                Err(expected.clone()),
                "{mode}, round {round}"
            );
        }
        let s = inst.stats();
        assert_eq!(
            (s.errors, s.rebuilds, s.batches),
            (2, 1, 0),
            "{mode}: {s:?}"
        );
    }
}

#[test]
fn a_chatty_guest_is_bounded_and_keeps_working() {
    let rt = runtime();
    let mut inst = rt
        .load(&wasm(guests::CHATTY))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    let mut b = ColumnarBatch::new();
    b.push(0, 0, None, Some(b"v"), &[]);
    let out = inst.filter(&b).unwrap();
    assert_eq!(out.keep, vec![true]);
    let report = inst.report();
    assert_eq!(report.logs.len(), 100, "kept lines are capped");
    assert!(
        report.logs_dropped >= 100_000 - 100,
        "dropped {}",
        report.logs_dropped
    );
    // Offset 1: the guest stays quiet, and the report says so.
    let mut quiet = ColumnarBatch::new();
    quiet.push(1, 0, None, Some(b"v"), &[]);
    inst.filter(&quiet).unwrap();
    assert!(inst.report().logs.is_empty());
    assert_eq!(inst.report().logs_dropped, 0);
    // Offset 1000: it floods again, and gets a fresh allowance of 100 lines.
    let mut again = ColumnarBatch::new();
    again.push(1_000, 0, None, Some(b"v"), &[]);
    inst.filter(&again).unwrap();
    assert_eq!(inst.report().logs.len(), 100, "a fresh allowance per call");
    assert!(
        inst.report()
            .logs
            .iter()
            .all(|l| l.source == LogSource::Log)
    );
}

#[test]
fn printed_output_becomes_log_lines() {
    let rt = Runtime::new(RuntimeConfig {
        log_lines_per_call_max: 100_000_000,
        log_bytes_per_call_max: usize::MAX,
        call_ms_max: 10_000,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut inst = rt
        .load(&wasm(guests::CHATTY))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    let mut b = ColumnarBatch::new();
    b.push(0, 0, None, Some(b"v"), &[]);
    inst.filter(&b).unwrap();
    let logs = &inst.report().logs;
    let stdout = logs
        .iter()
        .filter(|l| l.source == LogSource::Stdout)
        .count();
    let stderr = logs
        .iter()
        .filter(|l| l.source == LogSource::Stderr)
        .count();
    // 64 KiB kept of each 1 MiB stream: 64 lines of 1 KiB (the cut line included).
    assert!((60..=65).contains(&stdout), "{stdout} stdout lines");
    assert!((60..=65).contains(&stderr), "{stderr} stderr lines");
    assert!(inst.report().logs_dropped >= 2, "both streams overflowed");
}

#[test]
fn not_a_component_is_refused() {
    let rt = runtime();
    for bytes in [&b"garbage"[..], &b"\0asm\x01\0\0\0"[..], &[][..]] {
        match rt.load(bytes) {
            Err(PluginError::Invalid(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn precompiled_components_are_cached_and_corrupt_artifacts_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let bytes = wasm(guests::REFERENCE);
    let first = Runtime::new(config.clone()).unwrap().load(&bytes).unwrap();
    assert_eq!(first.cache_outcome(), CacheOutcome::Compiled);
    let rt = Runtime::new(config.clone()).unwrap();
    let again = rt.load(&bytes).unwrap();
    assert_eq!(again.cache_outcome(), CacheOutcome::Hit);
    let mut inst = again
        .instantiate(params(&[("needle", "a")]), state())
        .unwrap();
    assert_eq!(
        inst.filter(&batch(&["a", "b"])).unwrap().keep,
        vec![true, false]
    );

    // Flip a byte in the artifact: its checksum no longer matches, so it is rebuilt.
    let artifact = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut data = std::fs::read(&artifact).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&artifact, data).unwrap();
    let rebuilt = Runtime::new(config).unwrap().load(&bytes).unwrap();
    assert_eq!(rebuilt.cache_outcome(), CacheOutcome::Compiled);
    let mut inst = rebuilt
        .instantiate(params(&[("needle", "b")]), state())
        .unwrap();
    assert_eq!(
        inst.filter(&batch(&["a", "b"])).unwrap().keep,
        vec![false, true]
    );
}

#[test]
fn a_chain_runs_filters_in_order_on_what_each_kept() {
    let rt = runtime();
    let reference = rt.load(&wasm(guests::REFERENCE)).unwrap();
    let step = |needle: &str| {
        reference
            .instantiate(params(&[("needle", needle)]), state())
            .unwrap()
    };
    let mut chain = Chain::new(vec![step("a"), step("n"), step("FAIL")]).unwrap();
    let out = chain
        .run(&batch(&["apple", "banana", "ant", "berry", "FAIL"]))
        .unwrap();
    // "a" keeps apple, banana, ant (FAIL fails, berry drops); "n" keeps banana, ant; the
    // third step sees only those two and keeps neither.
    assert_eq!(out.kept, Vec::<usize>::new());
    assert_eq!(out.failures.len(), 1);
    assert_eq!((out.failures[0].0, out.failures[0].1), (4, 0));
    let counts: Vec<u64> = chain.steps().iter().map(|s| s.stats().records_in).collect();
    assert_eq!(
        counts,
        vec![5, 3, 2],
        "each step sees what the previous kept"
    );

    let mut pass = Chain::new(vec![step("a"), step("an")]).unwrap();
    assert_eq!(
        pass.run(&batch(&["banana", "mango", "man"])).unwrap().kept,
        vec![0, 1, 2]
    );

    assert!(Chain::new(vec![]).is_err());
}

#[test]
fn a_chain_mixes_filters_and_transforms_and_maps_outputs_to_their_sources() {
    let rt = runtime();
    let reference = rt.load(&wasm(guests::REFERENCE)).unwrap();
    let split = rt.load(&wasm(guests::SPLIT)).unwrap();
    let filter = |needle: &str| {
        reference
            .instantiate(params(&[("needle", needle)]), state())
            .unwrap()
    };
    // Keep values with "a", split them at commas, keep the parts with "a".
    let mut chain = Chain::new(vec![
        filter("a"),
        split.instantiate(vec![], state()).unwrap(),
        filter("a"),
    ])
    .unwrap();
    let input = batch(&["x,y", "a,b,ab", "FAIL", "ca"]);
    let out = chain.run(&input).unwrap();
    // "x,y" is dropped by the first filter, "FAIL" fails in it; "a,b,ab" gives a, b, ab of
    // which b is dropped; "ca" gives ca.
    assert_eq!(out.kept, vec![1, 1, 3]);
    let values: Vec<Vec<u8>> = (0..out.kept.len())
        .map(|j| out.record(&input, j).value.unwrap())
        .collect();
    assert_eq!(values, vec![b"a".to_vec(), b"ab".to_vec(), b"ca".to_vec()]);
    assert!(out.output.is_some());
    assert!(out.topics.is_empty());
    assert_eq!(out.failures.len(), 1);
    assert_eq!((out.failures[0].0, out.failures[0].1), (2, 0));
    // Split's outputs carry the source's offset.
    assert_eq!(out.record(&input, 0).offset, 101);

    // Filters only: no output batch, the kept records are the input's.
    let mut filters = Chain::new(vec![filter("a")]).unwrap();
    let out = filters.run(&input).unwrap();
    assert!(out.output.is_none());
    assert_eq!(out.kept, vec![1, 3]);
    assert_eq!(out.record(&input, 1).value.unwrap(), b"ca".to_vec());
}

#[test]
fn a_chain_step_is_replaced_at_a_batch_boundary_keeping_state() {
    let rt = runtime();
    let reference = rt.load(&wasm(guests::REFERENCE)).unwrap();
    let mut chain = Chain::new(vec![
        reference
            .instantiate(params(&[("needle", "a")]), state())
            .unwrap(),
    ])
    .unwrap();
    assert_eq!(chain.run(&batch(&["a", "b"])).unwrap().kept, vec![0]);
    // A configuration init refuses: the old step is started again and keeps working.
    let (e, broken) = chain.replace_step(0, &reference, params(&[])).unwrap_err();
    assert!(!broken);
    assert!(matches!(e, PluginError::InitFailed(_)), "{e:?}");
    assert_eq!(chain.run(&batch(&["a", "b"])).unwrap().kept, vec![0]);
    chain
        .replace_step(0, &reference, params(&[("needle", "b")]))
        .unwrap();
    assert_eq!(chain.run(&batch(&["a", "b"])).unwrap().kept, vec![1]);
}

#[test]
fn transform_output_over_the_limit_is_refused() {
    let rt = Runtime::new(RuntimeConfig {
        output_data_bytes_max: 4,
        call_ms_max: 10_000,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut inst = rt
        .load(&wasm(guests::SPLIT))
        .unwrap()
        .instantiate(vec![], state())
        .unwrap();
    match inst.transform(&batch(&["aaaa,bbbb"])) {
        Err(PluginError::InvalidOutput(m)) => assert!(m.contains("limit"), "{m}"),
        other => panic!("expected the output to be refused, got {other:?}"),
    }
    // Small outputs still go through on the rebuilt instance.
    let mut small = ColumnarBatch::new();
    small.push(0, 0, None, Some(b"a,b"), &[]);
    assert_eq!(inst.transform(&small).unwrap().records.len(), 2);
}
