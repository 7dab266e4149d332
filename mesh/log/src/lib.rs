//! The partition log: an append-only sequence of record batches in segment files, with sparse
//! indexes, crash recovery and retention.
//!
//! Architecture invariant: this crate has no async, never reads the clock (time is a parameter,
//! `now_ms`, milliseconds since the Unix epoch) and uses no random numbers. It stores the bytes
//! of [`quiver_proto::batch`] exactly as produced; it never re-encodes a batch.
//!
//! # On-disk format
//!
//! A partition is one directory. The log is a sequence of segments; segment *i* holds the
//! batches with offsets from its base offset up to (excluding) the base offset of segment
//! *i + 1*. The last segment is the *active* one; the others are *sealed* and never change
//! again. Each segment is three files named by its base offset, zero-padded to 20 decimal
//! digits:
//!
//! - `00000000000000000000.log`: the batches back to back in offset order, each exactly as
//!   described in [`quiver_proto::batch`] with `base_offset` and `leader_epoch` filled in. No
//!   file header, no padding, no trailer. Batch *n + 1* has `base_offset` = last offset of
//!   batch *n* + 1, within a segment and across segments. A segment is smaller than
//!   [`SEGMENT_BYTES_MAX`] (2 GiB), so byte positions fit in a `u32`, and its relative offsets
//!   (`offset − base offset`) fit in a `u32`.
//! - `….index`: sparse offset index, 8-byte entries `relative_offset: u32 LE, position: u32
//!   LE`, meaning "the batch whose `base_offset` is `base + relative_offset` starts at byte
//!   `position` of the `.log`". Both fields strictly increase. An entry is written for a batch
//!   once at least `index_interval_bytes` of log were appended since the previous entry; the
//!   first batch (position 0) never needs one.
//! - `….timeindex`: sparse time index, 12-byte entries `timestamp: i64 LE, relative_offset:
//!   u32 LE`, meaning "every record of the batch at `base + relative_offset`, and of every batch
//!   before it in this segment, has a timestamp ≤ `timestamp`". Entries are written at the same
//!   points as `.index` entries when the segment's largest timestamp grew since the last time
//!   entry, and once more when the segment is sealed, so the last entry of a sealed segment is
//!   its largest record timestamp. Timestamps strictly increase.
//!
//! Other files in the directory are left alone (the broker may keep its own there), except the
//! strays recovery removes.
//!
//! # Writer and readers
//!
//! The single writer (`&mut PartitionLog`) only appends whole batches at the end of the active
//! segment, rolls to a new active segment, and deletes whole segments from the front. Readers
//! (`&PartitionLog`, e.g. behind an `RwLock`) use positional reads, see only whole batches below
//! the log end offset, and check every batch's CRC before returning it. A batch that fails is
//! never returned: a read stops before it, and a read that starts at it is a
//! [`LogError::Corrupt`]. Indexes are hints: a lookup always confirms the batch it
//! lands on, and falls back to scanning the segment when an index leads astray.
//!
//! # Durability
//!
//! - [`PartitionLog::append`] writes to the page cache only.
//! - [`PartitionLog::flush`] fdatasyncs the active `.log`; afterwards
//!   `durable_end_offset() == log_end_offset()`. Acknowledge only what is below
//!   `durable_end_offset()`. Group commit is the caller's: append several batches, flush once.
//! - [`PartitionLog::begin_flush`] / [`PendingSync::sync`] / [`PartitionLog::complete_flush`]
//!   split a flush so the fdatasync runs without holding the log (appends and reads go on).
//! - Rolling flushes and fdatasyncs the old segment's `.index`, `.timeindex` and `.log`, then
//!   creates the new segment's files and fsyncs the directory.
//! - Index files are written with buffered appends and need not be durable: recovery rebuilds
//!   them from the log.
//! - Retention unlinks each doomed segment's `.log`, oldest first, fsyncing the directory after
//!   each, so a crash can only leave a prefix of the segments deleted; then its index files.
//! - [`PartitionLog::delete`] renames the directory to `<dir>.deleted`, fsyncs the parent,
//!   removes it and fsyncs the parent again. The owner of the parent directory removes any
//!   `*.deleted` directory it finds at startup.
//!
//! # Limits
//!
//! - A segment stays below [`SEGMENT_BYTES_MAX`] (2 GiB) and spans at most 2^32 offsets; the log
//!   rolls before either would be exceeded. A batch larger than `SEGMENT_BYTES_MAX` is refused.
//! - Both indexes of every segment are held in memory: 8 bytes per `index_interval_bytes` of log
//!   plus at most 12 bytes per time entry, about 0.5% of the log size at the default interval.
//! - Scans read 1 MiB at a time (a larger batch is read whole); a fetch holds at most
//!   `max_bytes`, or the one batch at its start.
//!
//! # Recovery (on open)
//!
//! 1. Files named `*.deleted` or `*.tmp` (left by an interrupted operation) and index files
//!    without a `.log` are removed, with a warning. No segment at all: an empty one at base 0
//!    is created.
//! 2. The last segment is scanned batch by batch: framing, CRC, a consistent header, and
//!    contiguous offsets starting at the segment's base. At the first failure (a torn or
//!    corrupt tail) the file is truncated there (`set_len`, then fsync). Its indexes are rebuilt
//!    from the scan and rewritten unless the files already hold exactly that.
//!    The active segment is then fdatasynced: data that survived a process crash only in the
//!    page cache becomes durable before `durable_end_offset` counts it.
//! 3. Older segments are not scanned: their indexes are loaded and checked (whole entries, both
//!    fields strictly increasing, relative offsets below the next segment's base, positions
//!    inside the file, a time entry if non-empty). Failing that, or missing, they are rebuilt by
//!    scanning the segment's framing. Corrupt bytes inside an older segment are found by the
//!    CRC check when read, and reported, never served.
//! 4. The log end offset is the offset after the last valid batch; the durable end offset
//!    equals it. The active segment's age (for `segment_ms`) counts from the open.
#![forbid(unsafe_code)]

mod error;
mod index;
mod partition;
mod segment;

pub use error::LogError;
pub use partition::{
    AppendInfo, LogConfig, PartitionLog, PendingSync, RecoveryReport, RetentionReport,
    SEGMENT_BYTES_MAX,
};
