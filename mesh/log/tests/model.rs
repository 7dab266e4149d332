//! The log against an in-memory model, with proptest.
//!
//! How: a random sequence of operations (append, flush, reopen, read, time lookup, retention,
//! with the clock moving forward) runs against a real log with tiny segments (512 bytes to 2 KiB), so it rolls, indexes
//! and deletes often, and against [`Model`]: a list of the batches that should be in the log
//! and the segment boundaries the rolling rules imply. After every operation the offsets, sizes
//! and segment count must agree; reads must return exactly the model's bytes and records; time
//! lookups the model's answer. Why: the model is simple enough to be obviously right, so any
//! disagreement is a bug in the log (or a rule the model states differently, which is as useful).
//! It runs on tmpfs when available: it checks logic, and fsyncs would only cost time.
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use quiver_log::{LogConfig, LogError, PartitionLog};
use quiver_proto::batch::{set_base_offset, set_leader_epoch};
use quiver_proto::{BatchBuilder, Compression};

#[derive(Clone, Debug)]
enum Op {
    /// Records as (value bytes, timestamp relative to now); the clock advances by `dt_ms` first.
    Append {
        records: Vec<(usize, i64)>,
        dt_ms: i64,
    },
    Flush,
    Reopen {
        dt_ms: i64,
    },
    Read {
        offset_pick: u64,
        max_bytes: usize,
        upto_pick: Option<u64>,
    },
    OffsetForTimestamp {
        ts_delta_ms: i64,
    },
    EnforceRetention {
        dt_ms: i64,
    },
}

/// Times are whole multiples of 100 ms so that boundaries (exactly `segment_ms` old, exactly at
/// the retention cutoff) come up often.
fn ms(hundreds: std::ops::Range<i64>) -> impl Strategy<Value = i64> {
    hundreds.prop_map(|h| h * 100)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec((0usize..300, ms(-30..5)), 1..5), ms(0..3))
            .prop_map(|(records, dt_ms)| Op::Append { records, dt_ms }),
        1 => Just(Op::Flush),
        1 => ms(0..20).prop_map(|dt_ms| Op::Reopen { dt_ms }),
        3 => (any::<u64>(), 0usize..2000, prop::option::of(any::<u64>()))
            .prop_map(|(offset_pick, max_bytes, upto_pick)| Op::Read { offset_pick, max_bytes, upto_pick }),
        2 => ms(-60..10).prop_map(|ts_delta_ms| Op::OffsetForTimestamp { ts_delta_ms }),
        1 => ms(0..50).prop_map(|dt_ms| Op::EnforceRetention { dt_ms }),
    ]
}

fn config() -> impl Strategy<Value = LogConfig> {
    (
        prop_oneof![Just(512u64), Just(1024), Just(2048)],
        0u32..200,
        ms(5..50),
        prop::option::of(ms(20..200)),
        prop::option::of(500u64..4000),
    )
        .prop_map(
            |(segment_bytes, index_interval_bytes, segment_ms, retention_ms, retention_bytes)| {
                LogConfig {
                    segment_bytes,
                    segment_ms,
                    retention_ms,
                    retention_bytes,
                    index_interval_bytes,
                }
            },
        )
}

#[derive(Debug)]
struct ModelBatch {
    base: u64,
    last: u64,
    bytes: Vec<u8>,
    /// (offset, timestamp, value) per record.
    records: Vec<(u64, i64, Vec<u8>)>,
}

#[derive(Debug)]
struct ModelSegment {
    base: u64,
    size: u64,
    max_ts: Option<i64>,
}

#[derive(Debug)]
struct Model {
    config: LogConfig,
    batches: Vec<ModelBatch>,
    segments: Vec<ModelSegment>,
    first_append_ms: Option<i64>,
    end: u64,
    durable: u64,
}

impl Model {
    fn start(&self) -> u64 {
        self.segments[0].base
    }

    fn roll(&mut self) {
        self.segments.push(ModelSegment {
            base: self.end,
            size: 0,
            max_ts: None,
        });
        self.first_append_ms = None;
        self.durable = self.end;
    }

    fn append(&mut self, mut bytes: Vec<u8>, records: &[(Vec<u8>, i64)], now_ms: i64) {
        let active = self.segments.last().unwrap();
        let len = bytes.len() as u64;
        if active.size > 0
            && (active.size + len > self.config.segment_bytes
                || self
                    .first_append_ms
                    .is_some_and(|t| now_ms - t > self.config.segment_ms))
        {
            self.roll();
        }
        let base = self.end;
        set_base_offset(&mut bytes, base);
        set_leader_epoch(&mut bytes, 7);
        let max = records.iter().map(|r| r.1).max().unwrap();
        let active = self.segments.last_mut().unwrap();
        active.size += len;
        active.max_ts = Some(active.max_ts.map_or(max, |m| m.max(max)));
        self.first_append_ms.get_or_insert(now_ms);
        self.end = base + records.len() as u64;
        self.batches.push(ModelBatch {
            base,
            last: self.end - 1,
            bytes,
            records: records
                .iter()
                .enumerate()
                .map(|(i, (v, ts))| (base + i as u64, *ts, v.clone()))
                .collect(),
        });
    }

    fn enforce_retention(&mut self, now_ms: i64) {
        if let Some(r) = self.config.retention_ms {
            let cutoff = now_ms.saturating_sub(r);
            let expired = |s: &ModelSegment| s.max_ts.is_some_and(|m| m < cutoff);
            let mut n = self.segments.iter().take_while(|s| expired(s)).count();
            if n == self.segments.len() {
                self.roll();
            }
            n = n.min(self.segments.len() - 1);
            self.segments.drain(..n);
        }
        if let Some(limit) = self.config.retention_bytes {
            while self.segments.len() > 1
                && self.segments.iter().map(|s| s.size).sum::<u64>() > limit
            {
                self.segments.remove(0);
            }
        }
        let start = self.start();
        self.batches.retain(|b| b.base >= start);
    }

    fn read(&self, offset: u64, max_bytes: usize, upto: u64) -> Result<Vec<u8>, (u64, u64)> {
        if offset < self.start() || offset > self.end {
            return Err((self.start(), self.end));
        }
        let mut out = Vec::new();
        let first = self.batches.iter().position(|b| b.last >= offset);
        for b in first.map_or(&[][..], |i| &self.batches[i..]) {
            if b.last >= upto || (!out.is_empty() && out.len() + b.bytes.len() > max_bytes) {
                break;
            }
            out.extend_from_slice(&b.bytes);
        }
        Ok(out)
    }

    fn offset_for_timestamp(&self, ts: i64) -> Option<(u64, i64)> {
        self.batches
            .iter()
            .flat_map(|b| &b.records)
            .find(|r| r.1 >= ts)
            .map(|r| (r.0, r.1))
    }
}

fn check_state(log: &PartitionLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.log_start_offset(), model.start());
    prop_assert_eq!(log.log_end_offset(), model.end);
    prop_assert_eq!(log.durable_end_offset(), model.durable);
    prop_assert_eq!(log.segment_count(), model.segments.len());
    prop_assert_eq!(
        log.size_bytes(),
        model.segments.iter().map(|s| s.size).sum::<u64>()
    );
    Ok(())
}

fn run(config: LogConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = common::scratch_dir();
    let mut now_ms = 1_000_000i64;
    let (mut log, _) = PartitionLog::open(dir.path(), config.clone(), now_ms).unwrap();
    let mut model = Model {
        config: config.clone(),
        batches: Vec::new(),
        segments: vec![ModelSegment {
            base: 0,
            size: 0,
            max_ts: None,
        }],
        first_append_ms: None,
        end: 0,
        durable: 0,
    };
    let mut seq = 0u64;
    for op in ops {
        match op {
            Op::Append { records, dt_ms } => {
                now_ms += dt_ms;
                let records: Vec<(Vec<u8>, i64)> = records
                    .iter()
                    .map(|&(len, delta)| {
                        seq += 1;
                        (vec![(seq % 251) as u8; len], now_ms + delta)
                    })
                    .collect();
                let mut b = BatchBuilder::new(Compression::None);
                for (v, ts) in &records {
                    b.push(None, Some(v), &[], *ts);
                }
                let mut bytes = b.finish().to_vec();
                model.append(bytes.clone(), &records, now_ms);
                let info = log.append(&mut bytes, 7, now_ms).unwrap();
                prop_assert_eq!(&bytes, &model.batches.last().unwrap().bytes);
                prop_assert_eq!(info.last_offset, model.end - 1);
            }
            Op::Flush => {
                log.flush().unwrap();
                model.durable = model.end;
            }
            Op::Reopen { dt_ms } => {
                now_ms += dt_ms;
                drop(log);
                let (reopened, report) =
                    PartitionLog::open(dir.path(), config.clone(), now_ms).unwrap();
                log = reopened;
                prop_assert_eq!((report.truncated_bytes, report.indexes_rebuilt), (0, 0));
                model.durable = model.end;
                model.first_append_ms = (model.segments.last().unwrap().size > 0).then_some(now_ms);
            }
            Op::Read {
                offset_pick,
                max_bytes,
                upto_pick,
            } => {
                let (start, end) = (model.start(), model.end);
                let offset = start.saturating_sub(2) + offset_pick % (end - start + 5);
                let upto = upto_pick.map_or(u64::MAX, |p| start + p % (end - start + 2));
                match (
                    log.read(offset, max_bytes, upto),
                    model.read(offset, max_bytes, upto),
                ) {
                    (Ok(got), Ok(want)) => {
                        prop_assert_eq!(
                            &got[..],
                            &want[..],
                            "read({}, {}, {})",
                            offset,
                            max_bytes,
                            upto
                        );
                        let recs: Vec<(u64, i64, Vec<u8>)> = common::records(&got)
                            .into_iter()
                            .map(|r| (r.offset, r.timestamp, r.value.unwrap().to_vec()))
                            .collect();
                        let want: Vec<_> = model
                            .batches
                            .iter()
                            .flat_map(|b| &b.records)
                            .filter(|r| recs.first().is_some_and(|f| r.0 >= f.0))
                            .take(recs.len())
                            .cloned()
                            .collect();
                        prop_assert_eq!(recs, want);
                    }
                    (
                        Err(LogError::OffsetOutOfRange {
                            start: s, end: e, ..
                        }),
                        Err(want),
                    ) => {
                        prop_assert_eq!((s, e), want);
                    }
                    (got, want) => {
                        prop_assert!(false, "read({offset}): got {got:?}, want {want:?}")
                    }
                }
            }
            Op::OffsetForTimestamp { ts_delta_ms } => {
                let ts = now_ms + ts_delta_ms;
                prop_assert_eq!(
                    log.offset_for_timestamp(ts).unwrap(),
                    model.offset_for_timestamp(ts),
                    "ts {}",
                    ts
                );
            }
            Op::EnforceRetention { dt_ms } => {
                now_ms += dt_ms;
                let report = log.enforce_retention(now_ms).unwrap();
                model.enforce_retention(now_ms);
                prop_assert_eq!(report.log_start_offset, model.start());
            }
        }
        check_state(&log, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(config in config(), ops in prop::collection::vec(op(), 1..60)) {
        run(config, ops)?;
    }
}
