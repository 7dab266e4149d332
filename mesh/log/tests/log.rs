//! Behaviour of the partition log through its public API: appends and reads, index lookups,
//! rolling, retention, time lookups, reopening. Each test builds a small log in a temporary
//! directory with batches whose contents say where they belong.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use quiver_log::{LogConfig, LogError, PartitionLog};

/// 40 one-record batches of 50-byte values, record `i` has value byte `i` and timestamp
/// `1000 + 10 * i`.
fn forty(log: &mut PartitionLog) {
    for i in 0..40u8 {
        let mut b = single(i, 50, 1000 + 10 * i64::from(i));
        let info = log.append(&mut b, 3, 0).unwrap();
        assert_eq!(
            (info.base_offset, info.last_offset),
            (u64::from(i), u64::from(i))
        );
    }
}

#[test]
fn append_assigns_offsets_and_epoch_and_reads_back_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(1 << 20));
    let mut a = batch(&[b"a", b"b", b"c"], &[5, 7, 6]);
    let info = log.append(&mut a, 9, 0).unwrap();
    assert_eq!(
        (info.base_offset, info.last_offset, info.max_timestamp),
        (0, 2, 7)
    );
    let mut b = batch(&[b"d"], &[8]);
    assert_eq!(log.append(&mut b, 9, 0).unwrap().base_offset, 3);
    assert_eq!(log.log_end_offset(), 4);

    let all = log.read(0, usize::MAX, u64::MAX).unwrap();
    assert_eq!(
        &all[..a.len()],
        &a[..],
        "stored bytes are the appended bytes, offsets filled in"
    );
    assert_eq!(&all[a.len()..], &b[..]);
    let view = quiver_proto::BatchView::parse(&all).unwrap();
    assert_eq!(view.header().leader_epoch, 9);
    let values: Vec<_> = records(&all)
        .into_iter()
        .map(|r| (r.offset, r.value.unwrap()))
        .collect();
    assert_eq!(values[3], (3, bytes::Bytes::from_static(b"d")));
    // An offset inside a batch returns that whole batch.
    assert_eq!(
        bases(&log.read(1, usize::MAX, u64::MAX).unwrap()),
        vec![0, 3]
    );
}

#[test]
fn index_lookups_find_every_offset_in_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(700));
    forty(&mut log);
    assert!(log.segment_count() > 3);
    let sealed_index = std::fs::metadata(&files(dir.path(), "index")[0])
        .unwrap()
        .len();
    assert!(sealed_index > 0, "a rolled segment's index is on disk");
    for o in 0..40u64 {
        let got = log.read(o, 1, u64::MAX).unwrap();
        let recs = records(&got);
        assert_eq!(recs.len(), 1, "offset {o}");
        assert_eq!(recs[0].offset, o);
        assert_eq!(recs[0].value.as_ref().unwrap()[0], o as u8);
    }
    // Reads cross segment boundaries.
    let all = log.read(0, usize::MAX, u64::MAX).unwrap();
    assert_eq!(bases(&all), (0..40).collect::<Vec<_>>());
}

#[test]
fn read_honours_max_bytes_and_upto() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(700));
    forty(&mut log);
    let one = log.read(0, 1, u64::MAX).unwrap().len();
    // max_bytes counts whole batches only.
    assert_eq!(
        bases(&log.read(5, 3 * one, u64::MAX).unwrap()),
        vec![5, 6, 7]
    );
    assert_eq!(
        bases(&log.read(5, 3 * one + one - 1, u64::MAX).unwrap()),
        vec![5, 6, 7]
    );
    // A first batch larger than max_bytes comes alone.
    assert_eq!(bases(&log.read(5, 0, u64::MAX).unwrap()), vec![5]);
    // upto is exclusive: only batches entirely below it.
    assert_eq!(bases(&log.read(5, usize::MAX, 8).unwrap()), vec![5, 6, 7]);
    assert!(log.read(8, usize::MAX, 8).unwrap().is_empty());
    assert!(log.read(9, usize::MAX, 8).unwrap().is_empty());
    assert!(log.read(40, usize::MAX, u64::MAX).unwrap().is_empty());

    // A batch straddling upto is held back entirely.
    let mut b = batch(&[b"x", b"y", b"z"], &[1, 1, 1]);
    log.append(&mut b, 0, 0).unwrap();
    assert!(log.read(40, usize::MAX, 42).unwrap().is_empty());
    assert_eq!(bases(&log.read(41, usize::MAX, 43).unwrap()), vec![40]);
}

#[test]
fn out_of_range_offsets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(
        dir.path(),
        LogConfig {
            retention_bytes: Some(1),
            ..small_config(300)
        },
    );
    forty(&mut log);
    log.enforce_retention(0).unwrap();
    let (start, end) = (log.log_start_offset(), log.log_end_offset());
    assert!(start > 0);
    for offset in [0, start - 1, end + 1, u64::MAX] {
        match log.read(offset, 100, u64::MAX) {
            Err(LogError::OffsetOutOfRange {
                offset: o,
                start: s,
                end: e,
            }) => {
                assert_eq!((o, s, e), (offset, start, end));
            }
            other => panic!("offset {offset}: {other:?}"),
        }
    }
    assert!(log.read(start, 100, u64::MAX).is_ok());
}

#[test]
fn rolls_by_size_and_a_large_batch_gets_its_own_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(1000));
    let size = single(0, 200, 0).len() as u64; // 200 + header and framing
    for i in 0..10 {
        log.append(&mut single(i, 200, 0), 0, 0).unwrap();
    }
    let per_segment = 1000 / size;
    assert_eq!(log.segment_count() as u64, 10_u64.div_ceil(per_segment));
    assert_eq!(log.size_bytes(), 10 * size);
    let names: Vec<_> = files(dir.path(), "log")
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(names[0], "00000000000000000000.log");
    assert_eq!(names[1], format!("{per_segment:020}.log"));
    // Exactly full is not over: two batches fill a segment of twice their size.
    let dir2 = tempfile::tempdir().unwrap();
    let mut exact = open(dir2.path(), small_config(2 * size));
    for i in 0..4 {
        exact.append(&mut single(i, 200, 0), 0, 0).unwrap();
    }
    assert_eq!(exact.segment_count(), 2);
    // Larger than a segment: rolls, then fits alone.
    let before = log.segment_count();
    log.append(&mut single(0, 3000, 0), 0, 0).unwrap();
    log.append(&mut single(0, 10, 0), 0, 0).unwrap();
    assert_eq!(log.segment_count(), before + 2);
}

#[test]
fn rolls_by_age_of_the_first_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_ms: 100,
        ..small_config(1 << 20)
    };
    let mut log = PartitionLog::open(dir.path(), config.clone(), 1000)
        .unwrap()
        .0;
    // An empty segment never rolls, however old the log.
    log.append(&mut single(0, 10, 0), 0, 5000).unwrap();
    log.append(&mut single(0, 10, 0), 0, 5100).unwrap();
    assert_eq!(
        log.segment_count(),
        1,
        "exactly segment_ms old is not older"
    );
    log.append(&mut single(0, 10, 0), 0, 5101).unwrap();
    assert_eq!(log.segment_count(), 2);
    assert_eq!(log.durable_end_offset(), 2, "rolling syncs the old segment");
    // After a reopen the active segment's age counts from the open.
    drop(log);
    let mut log = PartitionLog::open(dir.path(), config, 9000).unwrap().0;
    log.append(&mut single(0, 10, 0), 0, 9100).unwrap();
    assert_eq!(log.segment_count(), 2);
    log.append(&mut single(0, 10, 0), 0, 9101).unwrap();
    assert_eq!(log.segment_count(), 3);
}

#[test]
fn retention_by_time_deletes_expired_prefix_and_rolls_an_expired_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(
        dir.path(),
        LogConfig {
            retention_ms: Some(1000),
            ..small_config(700)
        },
    );
    forty(&mut log); // timestamps 1000..=1390
    let segments = log.segment_count();
    let r = log.enforce_retention(1000 + 999).unwrap();
    assert_eq!(r.segments_deleted, 0);
    // Cutoff 1200: segments whose every record is older than 1200 go.
    let r = log.enforce_retention(2200).unwrap();
    assert!(r.segments_deleted > 0 && !r.rolled);
    let start = log.log_start_offset();
    assert_eq!(r.log_start_offset, start);
    assert!(start <= 20, "offset 20 has timestamp 1200 and stays");
    let first = records(&log.read(start, usize::MAX, u64::MAX).unwrap());
    assert!(first.iter().any(|r| r.timestamp >= 1200));
    assert_eq!(log.segment_count(), segments - r.segments_deleted);
    assert_eq!(files(dir.path(), "log").len(), log.segment_count());
    assert_eq!(files(dir.path(), "index").len(), log.segment_count());
    // Everything expired: the active segment rolls so it can go; the log is empty at the end.
    let r = log.enforce_retention(10_000).unwrap();
    assert!(r.rolled);
    assert_eq!(log.segment_count(), 1);
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (40, 40));
    assert_eq!(log.size_bytes(), 0);
    assert!(log.read(40, 100, u64::MAX).unwrap().is_empty());
    // Nothing left to do on an empty log.
    let r = log.enforce_retention(100_000).unwrap();
    assert_eq!((r.segments_deleted, r.rolled), (0, false));
    log.append(&mut single(1, 1, 5), 0, 0).unwrap();
    assert_eq!(log.log_end_offset(), 41);
}

#[test]
fn retention_by_time_keeps_a_segment_whose_newest_record_is_exactly_at_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(
        dir.path(),
        LogConfig {
            retention_ms: Some(1000),
            ..small_config(1)
        },
    );
    for ts in [100, 200, 300] {
        log.append(&mut single(0, 1, ts), 0, 0).unwrap();
    }
    assert_eq!(log.segment_count(), 3);
    let r = log.enforce_retention(1200).unwrap();
    assert_eq!((r.segments_deleted, r.log_start_offset), (1, 1));
}

#[test]
fn retention_by_bytes_keeps_at_most_the_limit_but_never_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(
        dir.path(),
        LogConfig {
            retention_bytes: Some(1500),
            ..small_config(700)
        },
    );
    forty(&mut log);
    let r = log.enforce_retention(0).unwrap();
    assert!(r.segments_deleted > 0);
    assert!(log.size_bytes() <= 1500);
    assert!(log.size_bytes() + r.bytes_deleted > 1500);
    // Exactly at the limit is not over it.
    drop(log);
    let sizes: Vec<u64> = files(dir.path(), "log")
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let keep: u64 = sizes[sizes.len() - 2..].iter().sum();
    let mut log = open(
        dir.path(),
        LogConfig {
            retention_bytes: Some(keep),
            ..small_config(700)
        },
    );
    log.enforce_retention(0).unwrap();
    assert_eq!((log.segment_count(), log.size_bytes()), (2, keep));
    let mut log = {
        drop(log);
        open(
            dir.path(),
            LogConfig {
                retention_bytes: Some(0),
                ..small_config(700)
            },
        )
    };
    log.enforce_retention(0).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert!(log.size_bytes() > 0, "the active segment stays");
}

#[test]
fn offset_for_timestamp_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(400));
    assert_eq!(log.offset_for_timestamp(0).unwrap(), None);
    // Timestamps out of order within and across batches.
    let batches: &[&[i64]] = &[
        &[100, 90, 110],
        &[105],
        &[200, 150],
        &[120],
        &[300, 250, 260],
        &[10],
    ];
    let mut all = Vec::new();
    for ts in batches {
        let values: Vec<&[u8]> = ts
            .iter()
            .map(|_| &b"0123456789012345678901234567890123456789"[..])
            .collect();
        log.append(&mut batch(&values, ts), 0, 0).unwrap();
        all.extend_from_slice(ts);
    }
    assert!(log.segment_count() > 2);
    let expect = |t: i64| all.iter().position(|&x| x >= t).map(|i| (i as u64, all[i]));
    for t in [
        i64::MIN,
        0,
        89,
        90,
        100,
        101,
        106,
        110,
        111,
        121,
        150,
        151,
        200,
        201,
        255,
        260,
        300,
        301,
        i64::MAX,
    ] {
        assert_eq!(log.offset_for_timestamp(t).unwrap(), expect(t), "ts {t}");
    }
    // Same answers after a reopen (time indexes loaded from disk, sealed with their maximum).
    drop(log);
    let log = open(dir.path(), small_config(400));
    for t in [0, 101, 111, 201, 301] {
        assert_eq!(log.offset_for_timestamp(t).unwrap(), expect(t), "ts {t}");
    }
}

#[test]
fn reopen_after_clean_close_reproduces_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(2000),
        ..small_config(700)
    };
    let mut log = open(dir.path(), config.clone());
    forty(&mut log);
    log.enforce_retention(0).unwrap();
    log.flush().unwrap();
    let before = (
        log.log_start_offset(),
        log.log_end_offset(),
        log.segment_count(),
        log.size_bytes(),
        log.read(log.log_start_offset(), usize::MAX, u64::MAX)
            .unwrap(),
        log.offset_for_timestamp(1200).unwrap(),
    );
    drop(log);
    let (mut log, report) = PartitionLog::open(dir.path(), config.clone(), 0).unwrap();
    assert_eq!(
        (
            report.truncated_bytes,
            report.indexes_rebuilt,
            report.stray_files_removed
        ),
        (0, 0, 0)
    );
    assert_eq!(report.segments, before.2);
    let after = (
        log.log_start_offset(),
        log.log_end_offset(),
        log.segment_count(),
        log.size_bytes(),
        log.read(log.log_start_offset(), usize::MAX, u64::MAX)
            .unwrap(),
        log.offset_for_timestamp(1200).unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(log.durable_end_offset(), log.log_end_offset());
    // Appends continue where the log ended.
    assert_eq!(
        log.append(&mut single(0, 1, 0), 0, 0).unwrap().base_offset,
        40
    );
}

#[test]
fn durable_end_offset_follows_flushes_and_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(300));
    assert_eq!(log.durable_end_offset(), 0);
    log.append(&mut single(0, 100, 0), 0, 0).unwrap();
    assert_eq!(log.durable_end_offset(), 0);
    log.flush().unwrap();
    assert_eq!(log.durable_end_offset(), 1);
    log.append(&mut single(0, 100, 0), 0, 0).unwrap();
    log.append(&mut single(0, 100, 0), 0, 0).unwrap(); // rolls before this one
    assert_eq!((log.durable_end_offset(), log.log_end_offset()), (2, 3));
    log.flush().unwrap();
    assert_eq!(log.durable_end_offset(), 3);
}

#[test]
fn strays_are_removed_and_other_files_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(1 << 20));
    forty(&mut log);
    drop(log);
    let p = dir.path();
    for name in [
        "00000000000000000100.index",
        "00000000000000000100.timeindex",
        "00000000000000000000.log.deleted",
        "00000000000000000007.index.tmp",
        "leader-epoch-checkpoint",
    ] {
        std::fs::write(p.join(name), b"x").unwrap();
    }
    let (log, report) = PartitionLog::open(p, small_config(1 << 20), 0).unwrap();
    assert_eq!(report.stray_files_removed, 4);
    assert!(p.join("leader-epoch-checkpoint").exists());
    assert!(!p.join("00000000000000000100.index").exists());
    assert_eq!(log.log_end_offset(), 40);
}

#[test]
fn delete_removes_the_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("topic-0");
    let mut log = open(&dir, small_config(300));
    forty(&mut log);
    log.delete().unwrap();
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn malformed_appends_are_rejected_without_side_effects() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(300));
    let mut b = single(0, 10, 0);
    b.push(0);
    assert!(matches!(
        log.append(&mut b, 0, 0),
        Err(LogError::InvalidBatch(_))
    ));
    assert!(matches!(
        log.append(&mut [0u8; 10], 0, 0),
        Err(LogError::InvalidBatch(_))
    ));
    assert_eq!((log.log_end_offset(), log.size_bytes()), (0, 0));
}

#[test]
fn truncate_cuts_whole_batches_across_segments_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the 40 batches span several.
    let mut log = open(dir.path(), small_config(400));
    forty(&mut log);
    assert!(log.segment_count() > 3);
    // Into the middle of a batch of three records: cut back to that batch's start.
    let mut three = batch(&[b"x", b"y", b"z"], &[1, 2, 3]);
    assert_eq!(log.append(&mut three, 4, 0).unwrap().base_offset, 40);
    assert_eq!(log.truncate(42, 0).unwrap(), 40);
    assert_eq!(log.log_end_offset(), 40);
    // Into an older segment: everything from offset 17 on goes, newer segments included.
    let segments = log.segment_count();
    assert_eq!(log.truncate(17, 0).unwrap(), 17);
    assert!(log.segment_count() < segments);
    assert_eq!(log.log_end_offset(), 17);
    assert_eq!(
        bases(&log.read(0, usize::MAX, u64::MAX).unwrap()),
        (0..17).collect::<Vec<_>>()
    );
    // Appends go on from the cut, and reads find them through rebuilt indexes.
    let mut next = single(99, 50, 5000);
    assert_eq!(log.append(&mut next, 5, 0).unwrap().base_offset, 17);
    log.flush().unwrap();
    drop(log);
    let log = open(dir.path(), small_config(400));
    assert_eq!(log.log_end_offset(), 18);
    let back = records(&log.read(10, usize::MAX, u64::MAX).unwrap());
    assert_eq!(back.last().unwrap().offset, 17);
    assert_eq!(back.last().unwrap().value.as_deref(), Some(&[99u8; 50][..]));
    // Truncating at or past the end changes nothing.
    let mut log = log;
    assert_eq!(log.truncate(18, 0).unwrap(), 18);
    assert_eq!(log.truncate(1_000, 0).unwrap(), 18);
}

#[test]
fn truncate_below_the_log_start_starts_the_log_again_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), small_config(400));
    forty(&mut log);
    assert_eq!(log.truncate(0, 0).unwrap(), 0);
    assert_eq!(log.log_end_offset(), 0);
    assert!(log.read(0, usize::MAX, u64::MAX).unwrap().is_empty());
    let mut b = single(1, 50, 1);
    assert_eq!(log.append(&mut b, 7, 0).unwrap().base_offset, 0);
}
