//! Recovery from damaged files. Each test writes a log of known batches, closes it, damages a
//! file the way a crash or a bad disk would (torn tail, flipped byte, lost or garbled index),
//! reopens it and checks what recovery reports and what reads return: a torn or corrupt tail
//! of the last segment is cut, lost indexes are rebuilt, and corrupt bytes in an older segment
//! are reported by reads, never served.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use quiver_log::{LogError, PartitionLog};

const SEGMENT_BYTES: u64 = 600;

/// 30 one-record batches of 40-byte values (value byte = offset, timestamp = 100 × offset)
/// over several segments; returns the size of one batch.
fn write_log(dir: &Path) -> usize {
    let mut log = open(dir, small_config(SEGMENT_BYTES));
    for i in 0..30u8 {
        log.append(&mut single(i, 40, 100 * i64::from(i)), 0, 0)
            .unwrap();
    }
    log.flush().unwrap();
    single(0, 40, 0).len()
}

fn reopen(dir: &Path) -> (PartitionLog, quiver_log::RecoveryReport) {
    PartitionLog::open(dir, small_config(SEGMENT_BYTES), 0).unwrap()
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn last_log(dir: &Path) -> PathBuf {
    files(dir, "log").pop().unwrap()
}

/// Checks that every offset in the log reads back as written.
fn check_contents(log: &PartitionLog) {
    let all = records(
        &log.read(log.log_start_offset(), usize::MAX, u64::MAX)
            .unwrap(),
    );
    assert_eq!(
        all.len() as u64,
        log.log_end_offset() - log.log_start_offset()
    );
    for r in all {
        assert_eq!(r.value.unwrap()[0], r.offset as u8);
        assert_eq!(r.timestamp, 100 * r.offset as i64);
    }
}

#[test]
fn torn_tail_is_truncated_to_the_previous_batch() {
    let dir = tempfile::tempdir().unwrap();
    let batch = write_log(dir.path()) as u64;
    let path = last_log(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    let batches = len / batch;
    assert!(batches >= 2);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - batch / 2).unwrap();
    let (log, report) = reopen(dir.path());
    assert_eq!(report.truncated_bytes, batch - batch / 2);
    assert_eq!(log.log_end_offset(), 29);
    assert_eq!(fs::metadata(&path).unwrap().len(), len - batch);
    check_contents(&log);
    // The next append takes the lost offset.
    drop(log);
    let (mut log, _) = reopen(dir.path());
    assert_eq!(
        log.append(&mut single(29, 40, 2900), 0, 0)
            .unwrap()
            .base_offset,
        29
    );
    check_contents(&log);
}

#[test]
fn flipped_byte_in_the_last_batch_truncates_it() {
    let dir = tempfile::tempdir().unwrap();
    let batch = write_log(dir.path()) as u64;
    let path = last_log(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    flip(&path, len - 3); // in the value, covered by the CRC
    let (log, report) = reopen(dir.path());
    assert_eq!(report.truncated_bytes, batch);
    assert_eq!(log.log_end_offset(), 29);
    check_contents(&log);
}

#[test]
fn corrupt_middle_of_the_last_segment_cuts_everything_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let batch = write_log(dir.path()) as u64;
    let path = last_log(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    let batches = len / batch;
    assert!(batches >= 3);
    // The base offset is outside the CRC; a wrong one breaks the offset sequence.
    flip(&path, batch);
    let (log, report) = reopen(dir.path());
    assert_eq!(report.truncated_bytes, len - batch);
    assert_eq!(log.log_end_offset(), 30 - batches + 1);
    check_contents(&log);
}

#[test]
fn garbage_after_the_last_batch_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let path = last_log(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    // A preallocated or zero-filled tail, as a file system may leave after a crash.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let (log, report) = reopen(dir.path());
    assert_eq!(report.truncated_bytes, 4096);
    assert_eq!(log.log_end_offset(), 30);
    check_contents(&log);
}

#[test]
fn lost_or_garbled_indexes_of_older_segments_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let (log, _) = reopen(dir.path());
    let segments = log.segment_count();
    assert!(segments >= 4);
    let expected_ts = log.offset_for_timestamp(1250).unwrap();
    drop(log);
    let index = files(dir.path(), "index");
    let time = files(dir.path(), "timeindex");
    let original = fs::read(&index[1]).unwrap();
    fs::remove_file(&index[0]).unwrap();
    fs::remove_file(&time[0]).unwrap();
    fs::write(&index[1], b"garbage").unwrap(); // not whole entries
    fs::write(&time[2], [0xffu8; 24]).unwrap(); // whole entries pointing past the segment
    let (log, report) = reopen(dir.path());
    assert_eq!(report.indexes_rebuilt, 3);
    assert_eq!(
        fs::read(&index[1]).unwrap(),
        original,
        "rebuilt byte for byte"
    );
    assert!(index[0].exists() && time[0].exists());
    check_contents(&log);
    assert_eq!(log.offset_for_timestamp(1250).unwrap(), expected_ts);
    for o in 0..30 {
        assert_eq!(bases(&log.read(o, 1, u64::MAX).unwrap()), vec![o]);
    }
    drop(log);
    assert_eq!(reopen(dir.path()).1.indexes_rebuilt, 0);
}

#[test]
fn a_plausible_but_wrong_index_does_not_break_reads() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let index = files(dir.path(), "index");
    // Increasing entries inside the file that point at the wrong positions.
    let mut bogus = Vec::new();
    for (rel, pos) in [(1u32, 7u32), (2, 100)] {
        bogus.extend_from_slice(&rel.to_le_bytes());
        bogus.extend_from_slice(&pos.to_le_bytes());
    }
    fs::write(&index[0], bogus).unwrap();
    let (log, report) = reopen(dir.path());
    assert_eq!(report.indexes_rebuilt, 0, "it looks valid");
    for o in 0..30 {
        assert_eq!(bases(&log.read(o, 1, u64::MAX).unwrap()), vec![o]);
    }
}

#[test]
fn corrupt_batch_in_an_older_segment_is_reported_not_served() {
    // Also a batch whose base offset (outside the CRC) was garbled: caught by the sequence check.
    let dir = tempfile::tempdir().unwrap();
    let batch = write_log(dir.path()) as u64;
    let first = files(dir.path(), "log").remove(0);
    flip(&first, 2 * batch);
    let (log, _) = reopen(dir.path());
    assert!(matches!(
        log.read(2, 1, u64::MAX),
        Err(LogError::Corrupt { .. })
    ));
    assert_eq!(
        bases(&log.read(0, usize::MAX, u64::MAX).unwrap()),
        vec![0, 1]
    );
    assert_eq!(bases(&log.read(3, 1, u64::MAX).unwrap()), vec![3]);

    let dir = tempfile::tempdir().unwrap();
    let batch = write_log(dir.path()) as u64;
    let first = files(dir.path(), "log").remove(0);
    // Second batch of the first segment (offset 1), inside its value.
    flip(&first, batch + batch - 5);
    let (log, report) = reopen(dir.path());
    assert_eq!(
        report.truncated_bytes, 0,
        "older segments are not scanned at open"
    );
    assert_eq!(log.log_end_offset(), 30);
    for (offset, max_bytes) in [(1, 1), (1, usize::MAX)] {
        match log.read(offset, max_bytes, u64::MAX) {
            Err(LogError::Corrupt { position, .. }) => assert_eq!(position, batch),
            other => panic!("read at {offset}: {other:?}"),
        }
    }
    // A read that reaches the bad batch stops before it; the next one reports it.
    assert_eq!(bases(&log.read(0, usize::MAX, u64::MAX).unwrap()), vec![0]);
    let rest = records(&log.read(2, usize::MAX, u64::MAX).unwrap());
    assert_eq!(rest.len(), 28);
    assert!(matches!(
        log.offset_for_timestamp(100),
        Err(LogError::Corrupt { .. })
    ));
    assert_eq!(log.offset_for_timestamp(200).unwrap(), Some((2, 200)));
}
