//! The built-in plugins (`plugins/*`) as components, through the runtime the broker uses.
//!
//! How and why: each plugin is built from source by `quiver-test-artifacts` with the real SDK
//! and exercised on JSON records chosen to hit every operator and parameter, including bad
//! parameters (refused by `init` with a message) and values that are not JSON (handled by the
//! plugin's documented policy). The expected outcomes follow each plugin's README.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use quiver_runtime::{ColumnarBatch, Instance, MemoryState, PluginError, Runtime, RuntimeConfig};
use quiver_test_artifacts as guests;

/// A generous deadline: tests run in parallel on a loaded machine.
fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        call_ms_max: 10_000,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn instance(path: &str, params: &[(&str, &str)]) -> Result<Instance, PluginError> {
    let rt = runtime();
    let plugin = rt.load(&std::fs::read(path).unwrap()).unwrap();
    plugin
        .instantiate(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Box::new(MemoryState::new(1 << 20)),
        )
        .map_err(|r| r.error)
}

fn json_batch(values: &[&str]) -> ColumnarBatch {
    let mut b = ColumnarBatch::new();
    for (i, v) in values.iter().enumerate() {
        b.push(
            i as u64,
            1_000 * i as i64,
            Some(format!("k{}", i % 3).as_bytes()),
            Some(v.as_bytes()),
            &[],
        );
    }
    b
}

fn keep(path: &str, params: &[(&str, &str)], values: &[&str]) -> Vec<bool> {
    instance(path, params)
        .unwrap()
        .filter(&json_batch(values))
        .unwrap()
        .keep
}

const PEOPLE: &[&str] = &[
    r#"{"name":"ann","age":31,"tags":["a"],"addr":{"city":"Oslo"}}"#,
    r#"{"name":"bob","age":17}"#,
    r#"{"name":"cy","age":31.0,"addr":{"city":"Rome"}}"#,
    r#"{"name":"dee"}"#,
];

#[test]
fn filter_json_operators() {
    let f = guests::FILTER_JSON;
    assert_eq!(
        keep(
            f,
            &[("field", "age"), ("op", "eq"), ("value", "31")],
            PEOPLE
        ),
        [true, false, true, false]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "name"), ("op", "eq"), ("value", "bob")],
            PEOPLE
        ),
        [false, true, false, false]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "name"), ("op", "ne"), ("value", "bob")],
            PEOPLE
        ),
        [true, false, true, true]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "age"), ("op", "lt"), ("value", "18")],
            PEOPLE
        ),
        [false, true, false, false]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "age"), ("op", "gt"), ("value", "18")],
            PEOPLE
        ),
        [true, false, true, false]
    );
    assert_eq!(
        keep(f, &[("field", "addr.city"), ("op", "exists")], PEOPLE),
        [true, false, true, false]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "/addr/city"), ("op", "regex"), ("value", "^R")],
            PEOPLE
        ),
        [false, false, true, false]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "name"), ("op", "gt"), ("value", "b")],
            PEOPLE
        ),
        [false, true, true, true]
    );
}

#[test]
fn filter_json_parameters_and_invalid_values() {
    let f = guests::FILTER_JSON;
    for (params, needle) in [
        (
            &[("op", "eq"), ("value", "1")][..],
            "missing parameter: field",
        ),
        (
            &[("field", "a"), ("op", "like"), ("value", "1")][..],
            "unknown op",
        ),
        (
            &[("field", "a"), ("op", "eq")][..],
            "needs parameter: value",
        ),
        (
            &[("field", "a"), ("op", "regex"), ("value", "(")][..],
            "not a valid regex",
        ),
        (
            &[("field", "a"), ("op", "exists"), ("on-invalid", "shrug")][..],
            "on-invalid",
        ),
    ] {
        match instance(f, params) {
            Err(PluginError::InitFailed(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{params:?}: expected init to fail, got {other:?}"),
        }
    }
    let values = [r#"{"a":1}"#, "not json", r#"{"a":2}"#];
    let mut i = instance(f, &[("field", "a"), ("op", "exists")]).unwrap();
    let out = i.filter(&json_batch(&values)).unwrap();
    assert_eq!(out.keep, [true, false, true]);
    assert_eq!(out.failures.len(), 1);
    assert!(out.failures[0].1.contains("not JSON"), "{:?}", out.failures);
    assert_eq!(
        keep(
            f,
            &[("field", "a"), ("op", "exists"), ("on-invalid", "keep")],
            &values
        ),
        [true, true, true]
    );
    assert_eq!(
        keep(
            f,
            &[("field", "a"), ("op", "exists"), ("on-invalid", "drop")],
            &values
        ),
        [true, false, true]
    );
}

#[test]
fn redact_masks_or_drops_fields() {
    let mut i = instance(guests::REDACT, &[("fields", "name, addr.city")]).unwrap();
    let out = i.transform(&json_batch(&PEOPLE[..2])).unwrap();
    let values: Vec<String> = out
        .records
        .records()
        .into_iter()
        .map(|r| String::from_utf8(r.value.unwrap()).unwrap())
        .collect();
    assert_eq!(
        values,
        [
            r#"{"addr":{"city":"***"},"age":31,"name":"***","tags":["a"]}"#,
            r#"{"age":17,"name":"***"}"#
        ]
    );
    assert_eq!(out.sources, [0, 1]);
    assert_eq!(
        out.records.records()[1].key.as_deref(),
        Some(&b"k1"[..]),
        "key kept"
    );

    let mut i = instance(guests::REDACT, &[("fields", "age,tags"), ("mode", "drop")]).unwrap();
    let out = i.transform(&json_batch(&[PEOPLE[0], "nope"])).unwrap();
    let r = out.records.records();
    assert_eq!(r.len(), 1);
    assert_eq!(
        String::from_utf8(r[0].value.clone().unwrap()).unwrap(),
        r#"{"addr":{"city":"Oslo"},"name":"ann"}"#
    );
    assert_eq!(
        out.failures.len(),
        1,
        "a value that is not JSON fails its record"
    );
    assert!(matches!(
        instance(guests::REDACT, &[("fields", "a"), ("mode", "hide")]),
        Err(PluginError::InitFailed(_))
    ));
}

#[test]
fn sample_by_count_and_by_key() {
    let values: Vec<String> = (0..10).map(|i| format!("{{\"i\":{i}}}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let k = keep(guests::SAMPLE, &[("rate", "3")], &refs);
    assert_eq!(
        k,
        [
            true, false, false, true, false, false, true, false, false, true
        ]
    );
    // By key: the same keys are kept every time, whatever the order.
    let by_key = keep(guests::SAMPLE, &[("rate", "2"), ("by", "key")], &refs);
    for (i, kept) in by_key.iter().enumerate() {
        assert_eq!(*kept, by_key[i % 3], "key k{} decides the same way", i % 3);
    }
    // FNV-1a 64 of "k0", "k1", "k2" is even, odd, even.
    assert_eq!(by_key[..3], [true, false, true]);
    assert!(matches!(
        instance(guests::SAMPLE, &[("rate", "0")]),
        Err(PluginError::InitFailed(_))
    ));
}

#[test]
fn route_by_field_or_header() {
    let mut i = instance(
        guests::ROUTE,
        &[
            ("field", "addr.city"),
            ("map", "Oslo:nordic,Rome:south"),
            ("default", "elsewhere"),
        ],
    )
    .unwrap();
    let out = i.transform(&json_batch(PEOPLE)).unwrap();
    assert_eq!(
        out.topics,
        [
            Some("nordic".into()),
            Some("elsewhere".into()),
            Some("south".into()),
            Some("elsewhere".into())
        ]
    );
    let mut i = instance(guests::ROUTE, &[("field", "name"), ("prefix", "people-")]).unwrap();
    let out = i.transform(&json_batch(&PEOPLE[..2])).unwrap();
    assert_eq!(
        out.topics,
        [Some("people-ann".into()), Some("people-bob".into())]
    );

    let mut i = instance(guests::ROUTE, &[("header", "dest")]).unwrap();
    let mut b = ColumnarBatch::new();
    b.push(0, 0, None, Some(b"x"), &[("dest", Some(b"audit"))]);
    b.push(1, 0, None, Some(b"y"), &[]);
    let out = i.transform(&b).unwrap();
    assert_eq!(
        out.topics,
        [Some("audit".into()), None],
        "no header: the attachment's output"
    );
    assert!(matches!(
        instance(guests::ROUTE, &[]),
        Err(PluginError::InitFailed(_))
    ));
}

#[test]
fn dedupe_drops_keys_seen_within_the_window_across_instances() {
    // Keys k0, k1, k2, k0, k1, k2 ... at timestamps 0, 1000, 2000, ...
    let values: Vec<String> = (0..9).map(|i| format!("{{\"i\":{i}}}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    // A 2.5 s window: k0 at 0 s, then 3 s (kept: 3 s later), 6 s (kept).
    assert_eq!(
        keep(guests::DEDUPE, &[("window-ms", "2500")], &refs),
        [true; 9]
    );
    // A 5 s window: k0 at 0 kept, 3 s dropped, 6 s kept (6 s after the last kept one).
    assert_eq!(
        keep(guests::DEDUPE, &[("window-ms", "5000")], &refs),
        [true, true, true, false, false, false, true, true, true]
    );
    // State carries across instances (a restart or a version swap).
    let rt = runtime();
    let plugin = rt.load(&std::fs::read(guests::DEDUPE).unwrap()).unwrap();
    let params = vec![("window-ms".to_string(), "60000".to_string())];
    let mut first = plugin
        .instantiate(params.clone(), Box::new(MemoryState::new(1 << 20)))
        .unwrap();
    assert_eq!(
        first.filter(&json_batch(&refs[..3])).unwrap().keep,
        [true, true, true]
    );
    let mut second = plugin.instantiate(params, first.into_state()).unwrap();
    // The same batch run again (a restart before its output was committed): the same
    // records, at the same offsets, are kept again: at least once, nothing lost.
    assert_eq!(
        second.filter(&json_batch(&refs[..3])).unwrap().keep,
        [true, true, true]
    );
    // New records with those keys within the window are duplicates.
    let mut later = ColumnarBatch::new();
    for i in 3..6u64 {
        let key = format!("k{}", i % 3);
        later.push(i, 1_000 * i as i64, Some(key.as_bytes()), Some(b"{}"), &[]);
    }
    assert_eq!(second.filter(&later).unwrap().keep, [false, false, false]);
    // By a JSON field instead of the key.
    assert_eq!(
        keep(
            guests::DEDUPE,
            &[("field", "name")],
            &[r#"{"name":"a"}"#, r#"{"name":"b"}"#, r#"{"name":"a"}"#]
        ),
        [true, true, false]
    );
}

#[test]
fn the_plugin_template_builds_and_filters() {
    let f = guests::TEMPLATE;
    let logs = [
        r#"{"level":"debug","msg":"a"}"#,
        r#"{"level":"warn","msg":"b"}"#,
        r#"{"msg":"no level"}"#,
        r#"{"level":"error","msg":"c"}"#,
    ];
    assert_eq!(keep(f, &[], &logs), [false, true, false, true]);
    assert_eq!(
        keep(f, &[("min-level", "debug")], &logs),
        [true, true, false, true]
    );
    assert!(matches!(
        instance(f, &[("min-level", "loud")]),
        Err(PluginError::InitFailed(_))
    ));
    let mut i = instance(f, &[]).unwrap();
    let out = i.filter(&json_batch(&["nope"])).unwrap();
    assert_eq!(out.failures.len(), 1);
}
