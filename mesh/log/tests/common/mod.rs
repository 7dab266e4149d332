//! Helpers shared by the integration tests: building batches and decoding what the log returns.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use quiver_log::{LogConfig, PartitionLog};
use quiver_proto::batch::OwnedRecord;
use quiver_proto::{BatchBuilder, Compression, RecordBatches};

/// One batch holding `values`, record `i` stamped `timestamps[i]`.
pub fn batch(values: &[&[u8]], timestamps: &[i64]) -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    for (v, ts) in values.iter().zip(timestamps) {
        b.push(None, Some(v), &[], *ts);
    }
    b.finish().to_vec()
}

/// A batch of one record of `value_bytes` bytes of `fill`, stamped `ts`.
pub fn single(fill: u8, value_bytes: usize, ts: i64) -> Vec<u8> {
    batch(&[&vec![fill; value_bytes]], &[ts])
}

/// Small segments and a dense index so tests roll and index often; no retention.
pub fn small_config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: i64::MAX,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 100,
    }
}

pub fn open(dir: &Path, config: LogConfig) -> PartitionLog {
    PartitionLog::open(dir, config, 0).unwrap().0
}

/// Every record in `bytes` (whole batches), CRC-checked.
pub fn records(bytes: &[u8]) -> Vec<OwnedRecord> {
    RecordBatches::new(bytes)
        .flat_map(|b| b.unwrap().to_records().unwrap())
        .collect()
}

/// Base offsets of the batches in `bytes`.
pub fn bases(bytes: &[u8]) -> Vec<u64> {
    RecordBatches::new(bytes)
        .map(|b| b.unwrap().header().base_offset)
        .collect()
}

/// Segment files of `ext` in `dir`, sorted.
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// A temporary directory on tmpfs when there is one: for tests of logic, not durability, where
/// fsyncs would only cost time.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}
