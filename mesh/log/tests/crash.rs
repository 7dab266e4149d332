//! Crash test: a writer process is killed (SIGKILL) at random points, over and over, and every
//! write it acknowledged must survive.
//!
//! How: the test re-executes its own binary as a child that runs only [`writer_child_process`]
//! (selected with `--exact` and switched on by an environment variable). The child opens the log
//! in the given directory, resumes at the recovered end, appends batches whose contents are a
//! function of their offsets, flushes (after every batch, or every N batches) and prints
//! `ack <last offset>` after each flush. The parent kills it after a random number of
//! acknowledgements (and a random short pause, so the kill lands at different points of
//! appending, rolling and syncing), reopens the log in-process and checks that it is a valid
//! prefix of what the writer wrote: offsets contiguous from 0, every batch CRC-valid and with
//! the expected contents, and every acknowledged offset present. ~20 cycles run on the same
//! directory. Segments are small so kills also land around rolls.
//!
//! A SIGKILL loses the process, not the page cache, so this checks the process-crash half of
//! the contract (recovery of whatever the writer left, resumption, acknowledgements only after
//! flush); torn writes and lost unsynced pages are covered by the corruption tests.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use quiver_log::{LogConfig, PartitionLog};
use quiver_proto::{BatchBuilder, Compression, RecordBatches};

const WRITER_DIR_ENV: &str = "QUIVER_LOG_CRASH_WRITER";
const FLUSH_EVERY_ENV: &str = "QUIVER_LOG_CRASH_FLUSH_EVERY";
const SEED_ENV: &str = "QUIVER_LOG_CRASH_SEED";
/// Batches one writer run appends at most (it is normally killed long before).
const WRITER_BATCHES_MAX: u64 = 10_000;
const CYCLES: usize = 20;
const ACKS_BEFORE_KILL_MAX: u64 = 12;
const KILL_DELAY_US_MAX: u64 = 3000;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        segment_ms: i64::MAX,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 256,
    }
}

/// Records in the batch that starts at `base`.
fn record_count(base: u64) -> u64 {
    1 + base % 4
}

/// The value of the record at `offset`.
fn value(offset: u64) -> Vec<u8> {
    let len = (offset * 7919 % 300) as usize;
    (0..len)
        .map(|i| (offset as u8).wrapping_add(i as u8))
        .collect()
}

fn batch_at(base: u64) -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    for o in base..base + record_count(base) {
        b.push(None, Some(&value(o)), &[], o as i64);
    }
    b.finish().to_vec()
}

/// The writer, when run as the child (does nothing in a normal test run).
#[test]
fn writer_child_process() {
    let Ok(dir) = std::env::var(WRITER_DIR_ENV) else {
        return;
    };
    let flush_every: u64 = std::env::var(FLUSH_EVERY_ENV).unwrap().parse().unwrap();
    let (mut log, _) = PartitionLog::open(Path::new(&dir), config(), 0).unwrap();
    let mut out = std::io::stdout().lock();
    for n in 1..=WRITER_BATCHES_MAX {
        let mut b = batch_at(log.log_end_offset());
        log.append(&mut b, 1, 0).unwrap();
        if n % flush_every == 0 {
            log.flush().unwrap();
            writeln!(out, "ack {}", log.durable_end_offset() - 1).unwrap();
            out.flush().unwrap();
        }
    }
}

/// xorshift64: the test's own seeded randomness.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// Runs one writer until it has acknowledged `acks` flushes, then kills it; returns the highest
/// acknowledged offset.
fn run_and_kill(dir: &Path, flush_every: u64, acks: u64, delay_us: u64) -> Option<u64> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "writer_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_DIR_ENV, dir)
        .env(FLUSH_EVERY_ENV, flush_every.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = None;
    let mut seen = 0;
    while seen < acks {
        let line = lines
            .next()
            .expect("writer exited before enough acknowledgements")
            .unwrap();
        if let Some(o) = line.strip_prefix("ack ") {
            acked = Some(o.parse::<u64>().unwrap());
            seen += 1;
        }
    }
    std::thread::sleep(Duration::from_micros(delay_us));
    child.kill().unwrap();
    assert!(
        !child.wait().unwrap().success(),
        "the writer finished before it was killed"
    );
    acked
}

/// Reopens the log and checks it is a valid prefix of the writer's output holding `acked`.
fn check(dir: &Path, acked: Option<u64>, context: &str) {
    let (log, _) = PartitionLog::open(dir, config(), 0).unwrap();
    assert_eq!(log.log_start_offset(), 0, "{context}");
    let end = log.log_end_offset();
    if let Some(a) = acked {
        assert!(
            end > a,
            "{context}: acknowledged offset {a} lost, log ends at {end}"
        );
    }
    let bytes = log.read(0, usize::MAX, u64::MAX).unwrap();
    let mut next = 0;
    for b in RecordBatches::new(&bytes) {
        let b = b.unwrap_or_else(|e| panic!("{context}: batch at {next}: {e}"));
        assert_eq!(b.header().base_offset, next, "{context}");
        assert_eq!(
            u64::from(b.header().record_count),
            record_count(next),
            "{context}"
        );
        for r in b.to_records().unwrap() {
            assert_eq!(r.offset, next, "{context}");
            assert_eq!(
                r.value.as_deref(),
                Some(&value(next)[..]),
                "{context}: offset {next}"
            );
            next += 1;
        }
    }
    assert_eq!(next, end, "{context}");
}

fn crash_cycles(flush_every: impl Fn(&mut Rng) -> u64, default_seed: u64) {
    let seed = std::env::var(SEED_ENV).map_or(default_seed, |s| s.parse().unwrap());
    let mut rng = Rng(seed.max(1));
    let dir = tempfile::tempdir().unwrap();
    let mut acked_max = None;
    for cycle in 0..CYCLES {
        let every = flush_every(&mut rng);
        let acks = 1 + rng.below(ACKS_BEFORE_KILL_MAX);
        let delay_us = rng.below(KILL_DELAY_US_MAX);
        let acked = run_and_kill(dir.path(), every, acks, delay_us);
        acked_max = acked_max.max(acked);
        let context = format!("seed {seed}, cycle {cycle}, flush every {every}, {acks} acks");
        check(dir.path(), acked_max, &context);
    }
    assert!(acked_max.is_some());
}

#[test]
fn killed_writer_flushing_every_batch_loses_nothing_acknowledged() {
    crash_cycles(|_| 1, 0x5eed_0001);
}

#[test]
fn killed_writer_flushing_every_few_batches_loses_nothing_acknowledged() {
    crash_cycles(|rng| 2 + rng.below(6), 0x5eed_0002);
}
