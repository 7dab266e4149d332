//! [`PartitionLog`]: opening and recovery, appends and rolls, reads, time lookups, retention.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use quiver_proto::batch::{set_base_offset, set_leader_epoch};
use quiver_proto::{BatchError, BatchHeader, BatchView};

use crate::error::{LogError, io_err};

/// Bytes at the front of a batch that hold `base_offset`, `batch_length` and `leader_epoch`.
const STAMPED_PREFIX_BYTES: usize = 16;
use crate::index::{IndexBuilder, Indexes, OffsetEntry, TimeEntry};
use crate::segment::{
    INDEX_EXT, LOG_EXT, Scanned, Scanner, Segment, TIME_INDEX_EXT, last_offset, parse_segment_name,
    segment_path,
};

/// Largest segment, bytes: positions in the `.index` are `u32` and stay below 2^31.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Per-partition storage settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll when appending would make the active segment larger than this many bytes (default
    /// 1 GiB; clamped to [`SEGMENT_BYTES_MAX`]). A batch larger than this gets a segment alone.
    pub segment_bytes: u64,
    /// Roll when the active segment's first append is older than this (default 7 days).
    pub segment_ms: i64,
    /// Delete segments whose largest record timestamp is older than this; `None` keeps them
    /// forever (default 7 days, as in Kafka).
    pub retention_ms: Option<i64>,
    /// Delete the oldest segments while the log is larger than this; `None` is unlimited
    /// (the default).
    pub retention_bytes: Option<u64>,
    /// Add a sparse index entry every this many bytes of log (default 4096).
    pub index_interval_bytes: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_ms: 7 * DAY_MS,
            retention_ms: Some(7 * DAY_MS),
            retention_bytes: None,
            index_interval_bytes: 4096,
        }
    }
}

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset assigned to the first record.
    pub base_offset: u64,
    /// Offset of the last record.
    pub last_offset: u64,
    /// Largest record timestamp of the batch, ms.
    pub max_timestamp: i64,
}

/// What [`PartitionLog::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Bytes cut from the tail of the last segment (torn or corrupt batches).
    pub truncated_bytes: u64,
    /// Segments whose index files were missing or inconsistent and were rewritten.
    pub indexes_rebuilt: usize,
    /// Leftover files removed (`*.deleted`, `*.tmp`, indexes without a log).
    pub stray_files_removed: usize,
}

/// What [`PartitionLog::enforce_retention`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of log deleted.
    pub bytes_deleted: u64,
    /// Whether the active segment was rolled so that it could expire.
    pub rolled: bool,
    /// The log start offset afterwards.
    pub log_start_offset: u64,
}

/// The buffered index writers and bookkeeping of the active segment.
#[derive(Debug)]
struct ActiveWriter {
    index_path: PathBuf,
    index_file: BufWriter<File>,
    time_path: PathBuf,
    time_file: BufWriter<File>,
    builder: IndexBuilder,
    /// When the first batch went into the segment (or when the log was opened, if it already
    /// held batches then).
    first_append_ms: Option<i64>,
}

impl ActiveWriter {
    fn new(
        dir: &Path,
        base_offset: u64,
        builder: IndexBuilder,
        truncate: bool,
    ) -> Result<Self, LogError> {
        let open = |path: &Path| {
            let mut o = OpenOptions::new();
            if truncate {
                o.write(true).create(true).truncate(true);
            } else {
                o.append(true).create(true);
            }
            o.open(path)
                .map(BufWriter::new)
                .map_err(io_err("open", path))
        };
        let index_path = segment_path(dir, base_offset, INDEX_EXT);
        let time_path = segment_path(dir, base_offset, TIME_INDEX_EXT);
        Ok(Self {
            index_file: open(&index_path)?,
            time_file: open(&time_path)?,
            index_path,
            time_path,
            builder,
            first_append_ms: None,
        })
    }

    /// Appends new index entries (buffered).
    fn write_entries(
        &mut self,
        (offset, time): (Option<OffsetEntry>, Option<TimeEntry>),
    ) -> Result<(), LogError> {
        if let Some(e) = offset {
            self.index_file
                .write_all(&e.encode())
                .map_err(io_err("write", &self.index_path))?;
        }
        if let Some(e) = time {
            self.time_file
                .write_all(&e.encode())
                .map_err(io_err("write", &self.time_path))?;
        }
        Ok(())
    }

    /// Hands buffered entries to the OS; with `sync`, also makes them durable.
    fn flush(&mut self, sync: bool) -> Result<(), LogError> {
        for (file, path) in [
            (&mut self.index_file, &self.index_path),
            (&mut self.time_file, &self.time_path),
        ] {
            file.flush().map_err(io_err("write", path))?;
            if sync {
                file.get_ref().sync_data().map_err(io_err("sync", path))?;
            }
        }
        Ok(())
    }
}

/// The log of one partition, stored in one directory. See the crate documentation for the
/// format, the durability contract and recovery.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    /// Sealed segments, oldest first.
    sealed: Vec<Segment>,
    active: Segment,
    writer: ActiveWriter,
    log_end_offset: u64,
    durable_end_offset: u64,
    size_bytes: u64,
    /// fdatasyncs of the active segment completed since open (`flush` and `complete_flush`).
    flushes: u64,
}

impl PartitionLog {
    /// Opens (creating if missing) the log in `dir`, recovering it as the crate documentation
    /// describes.
    pub fn open(
        dir: &Path,
        mut config: LogConfig,
        now_ms: i64,
    ) -> Result<(Self, RecoveryReport), LogError> {
        config.segment_bytes = config.segment_bytes.min(SEGMENT_BYTES_MAX);
        let mut report = RecoveryReport::default();
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            sync_dir(parent_of(dir))?;
        }
        let mut bases = list_segments(dir, &mut report)?;
        if bases.is_empty() {
            for ext in [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT] {
                let path = segment_path(dir, 0, ext);
                File::create(&path).map_err(io_err("create", &path))?;
            }
            sync_dir(dir)?;
            bases.push(0);
        }
        let interval = config.index_interval_bytes;
        let mut sealed = Vec::with_capacity(bases.len() - 1);
        for pair in bases.windows(2) {
            let (segment, rebuilt) = load_sealed(dir, pair[0], pair[1], interval)?;
            report.indexes_rebuilt += usize::from(rebuilt);
            sealed.push(segment);
        }
        let last_base = bases[bases.len() - 1];
        let (active, mut writer, log_end_offset) =
            recover_active(dir, last_base, interval, &mut report)?;
        if active.size_bytes > 0 {
            writer.first_append_ms = Some(now_ms);
        }
        // What survived a crash may still be only in the page cache (never fsynced, never
        // acknowledged under the batch policy). Make it durable before calling it durable, so
        // a later power loss cannot take back records consumers have read.
        active
            .log
            .sync_data()
            .map_err(io_err("sync", &active.path))?;
        let size_bytes = sealed.iter().map(|s| s.size_bytes).sum::<u64>() + active.size_bytes;
        report.segments = sealed.len() + 1;
        let log = Self {
            dir: dir.to_path_buf(),
            config,
            sealed,
            active,
            writer,
            log_end_offset,
            durable_end_offset: log_end_offset,
            flushes: 0,
            size_bytes,
        };
        tracing::debug!(dir = %dir.display(), start = log.log_start_offset(), end = log_end_offset, ?report, "opened partition log");
        Ok((log, report))
    }

    /// Appends one batch that the caller already validated with
    /// [`quiver_proto::batch::validate_batch`]. Writes the assigned base offset (the log end
    /// offset) and `leader_epoch` into `batch` in place (both outside the CRC), rolls first if
    /// the active segment is full or old, writes the batch and updates the indexes. Does not
    /// fsync: see [`flush`](Self::flush).
    pub fn append(
        &mut self,
        batch: &mut [u8],
        leader_epoch: u32,
        now_ms: i64,
    ) -> Result<AppendInfo, LogError> {
        let info = self.append_shared(batch, leader_epoch, now_ms)?;
        set_base_offset(batch, info.base_offset);
        set_leader_epoch(batch, leader_epoch);
        Ok(info)
    }

    /// Like [`append`](Self::append), but leaves `batch` untouched: the stored copy gets the
    /// base offset and leader epoch, written from a stamped copy of the batch's first 16
    /// bytes. The batch can stay in a shared, immutable buffer (a slice of the received
    /// request), so the broker never copies it before the write.
    pub fn append_shared(
        &mut self,
        batch: &[u8],
        leader_epoch: u32,
        now_ms: i64,
    ) -> Result<AppendInfo, LogError> {
        let bytes = batch.len() as u64;
        let h = BatchHeader::parse(batch)?;
        if h.total_bytes() != batch.len() {
            return Err(BatchError::Invalid(format!(
                "batch length field says {} bytes, got {}",
                h.total_bytes(),
                batch.len()
            ))
            .into());
        }
        if bytes > SEGMENT_BYTES_MAX {
            return Err(LogError::BatchTooLarge {
                bytes,
                max_bytes: SEGMENT_BYTES_MAX,
            });
        }
        if h.record_count == 0 || h.last_offset_delta != h.record_count - 1 {
            return Err(BatchError::Invalid("inconsistent record count".into()).into());
        }
        let base_offset = self.log_end_offset;
        let last = base_offset
            .checked_add(u64::from(h.last_offset_delta))
            .ok_or_else(|| BatchError::Invalid("offsets overflow".into()))?;
        if self.should_roll(bytes, last, now_ms) {
            self.roll()?;
        }
        // The fields the log assigns sit in the first 16 bytes, outside the CRC.
        let mut head = [0u8; STAMPED_PREFIX_BYTES];
        head.copy_from_slice(&batch[..STAMPED_PREFIX_BYTES]);
        set_base_offset(&mut head, base_offset);
        set_leader_epoch(&mut head, leader_epoch);

        let seg = &mut self.active;
        let position = seg.size_bytes;
        let written = seg.log.write_all_at(&head, position).and_then(|()| {
            seg.log.write_all_at(
                &batch[STAMPED_PREFIX_BYTES..],
                position + STAMPED_PREFIX_BYTES as u64,
            )
        });
        if let Err(e) = written {
            // Best effort: drop a partial write so the file ends with whole batches again.
            let _ = seg.log.set_len(position);
            return Err(io_err("write", &seg.path)(e));
        }
        seg.size_bytes += bytes;
        self.size_bytes += bytes;
        self.log_end_offset = last + 1;
        self.writer.first_append_ms.get_or_insert(now_ms);
        // Fits: `should_roll` keeps relative offsets within u32.
        let rel = (base_offset - seg.base_offset) as u32;
        let added =
            self.writer
                .builder
                .on_batch(&mut seg.indexes, rel, position, bytes, h.max_timestamp);
        seg.max_timestamp = self.writer.builder.max_timestamp();
        // The batch is in the log now, so the append has happened: a failed index write must not
        // report otherwise. The index is a hint; recovery rebuilds it, and a persistent failure
        // surfaces at the next roll, which syncs the index files before anything else.
        if let Err(e) = self.writer.write_entries(added) {
            tracing::warn!(error = %e, "could not write index entries");
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: last,
            max_timestamp: h.max_timestamp,
        })
    }

    /// fdatasyncs the active segment; afterwards `durable_end_offset() == log_end_offset()`.
    /// (Rolled segments were synced when they were rolled.)
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.durable_end_offset == self.log_end_offset {
            return Ok(());
        }
        self.writer.flush(false)?;
        self.active
            .log
            .sync_data()
            .map_err(io_err("sync", &self.active.path))?;
        self.durable_end_offset = self.log_end_offset;
        self.flushes += 1;
        Ok(())
    }

    /// Starts a flush that runs without holding the log: flushes the index buffers and returns
    /// a [`PendingSync`] for everything appended so far (`None` when it is all durable). Run
    /// [`PendingSync::sync`] outside any lock, then report it with
    /// [`complete_flush`](Self::complete_flush). Appends and reads may continue meanwhile;
    /// a roll in between syncs the old segment itself, so the pending sync stays correct.
    pub fn begin_flush(&mut self) -> Result<Option<PendingSync>, LogError> {
        if self.durable_end_offset == self.log_end_offset {
            return Ok(None);
        }
        self.writer.flush(false)?;
        let file = self
            .active
            .log
            .try_clone()
            .map_err(io_err("dup", &self.active.path))?;
        Ok(Some(PendingSync {
            file,
            path: self.active.path.clone(),
            end_offset: self.log_end_offset,
        }))
    }

    /// Records that a [`PendingSync`] finished: everything below `end_offset` is durable.
    pub fn complete_flush(&mut self, end_offset: u64) {
        debug_assert!(end_offset <= self.log_end_offset);
        self.durable_end_offset = self
            .durable_end_offset
            .max(end_offset.min(self.log_end_offset));
        self.flushes += 1;
    }

    /// fdatasyncs completed since the log was opened: how the fsync policy is observed (group
    /// commit shares one among many appends).
    pub fn flush_count(&self) -> u64 {
        self.flushes
    }

    /// The first offset in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.sealed.first().unwrap_or(&self.active).base_offset
    }

    /// The next offset to assign.
    pub fn log_end_offset(&self) -> u64 {
        self.log_end_offset
    }

    /// Every offset below this is fsynced.
    pub fn durable_end_offset(&self) -> u64 {
        self.durable_end_offset
    }

    /// Bytes of all `.log` files.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// The settings in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Whole batches starting with the batch that contains `offset`, in order, crossing
    /// segments: at most `max_bytes` in total unless the first batch alone is larger (then
    /// exactly that batch, so consumers always progress), and only batches whose last offset
    /// is below `upto` (the high watermark, exclusive). Every batch's CRC is checked first: a
    /// corrupt first batch is [`LogError::Corrupt`]; a later one ends the result before it, so
    /// the next read, starting there, reports it.
    ///
    /// Empty when `offset` is the log end offset or `>= upto`;
    /// [`LogError::OffsetOutOfRange`] when it is outside `[log start, log end]`.
    pub fn read(&self, offset: u64, max_bytes: usize, upto: u64) -> Result<Bytes, LogError> {
        let (start, end) = (self.log_start_offset(), self.log_end_offset);
        if offset < start || offset > end {
            return Err(LogError::OffsetOutOfRange { offset, start, end });
        }
        if offset == end || offset >= upto {
            return Ok(Bytes::new());
        }
        let mut i = self.segment_index(offset);
        let (mut position, ..) = self.segment(i).locate(offset)?;
        let mut out = BytesMut::new();
        let mut expected = None;
        while i < self.segment_count() {
            let seg = self.segment(i);
            if position >= seg.size_bytes {
                i += 1;
                position = 0;
                continue;
            }
            let header = seg
                .read_header(position)
                .and_then(|(h, last)| match expected {
                    Some(e) if e != h.base_offset => Err(seg.corrupt(
                        position,
                        format!("expected a batch at offset {e}, found {}", h.base_offset),
                    )),
                    _ => Ok((h.total_bytes(), last)),
                });
            let (total, last) = match header {
                Ok(found) => found,
                Err(e) => return serve_prefix(e, out),
            };
            if last >= upto || (!out.is_empty() && out.len() + total > max_bytes) {
                break;
            }
            if let Err(e) = seg.read_batch_into(position, total, &mut out) {
                return serve_prefix(e, out);
            }
            expected = Some(last + 1);
            position += total as u64;
        }
        Ok(out.freeze())
    }

    /// The first offset whose record timestamp is `>= ts_ms`, with that timestamp; `None` if no
    /// record is that recent. Skips whole segments by their largest timestamp and, inside the
    /// segment, jumps with the time index, then decodes the one batch that holds the answer.
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<(u64, i64)>, LogError> {
        for seg in self.segments() {
            if seg.max_timestamp.is_none_or(|m| m < ts_ms) {
                continue;
            }
            let rel = seg.indexes.time_floor(ts_ms);
            let (mut position, ..) = seg.locate(seg.base_offset + u64::from(rel))?;
            while position < seg.size_bytes {
                let (h, _) = seg.read_header(position)?;
                if h.max_timestamp >= ts_ms {
                    let mut buf = BytesMut::new();
                    seg.read_batch_into(position, h.total_bytes(), &mut buf)?;
                    let corrupt = |e: BatchError| seg.corrupt(position, e.to_string());
                    let view = BatchView::parse(&buf).map_err(corrupt)?;
                    let mut found = None;
                    view.for_each_record(usize::MAX, |r| {
                        if found.is_none() && r.timestamp >= ts_ms {
                            found = Some((h.base_offset + u64::from(r.offset_delta), r.timestamp));
                        }
                    })
                    .map_err(corrupt)?;
                    if found.is_some() {
                        return Ok(found);
                    }
                }
                position += h.total_bytes() as u64;
            }
        }
        Ok(None)
    }

    /// Deletes whole segments from the front: by time (every record older than
    /// `now_ms - retention_ms`), then by size (oldest first while the log is larger than
    /// `retention_bytes`). The active segment is never deleted while it is the only one; when
    /// it has entirely expired by time it is rolled first so that it can go.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<RetentionReport, LogError> {
        let mut report = RetentionReport::default();
        if let Some(retention_ms) = self.config.retention_ms {
            let cutoff = now_ms.saturating_sub(retention_ms);
            let expired = |s: &Segment| s.max_timestamp.is_some_and(|m| m < cutoff);
            let mut n = self.sealed.iter().take_while(|s| expired(s)).count();
            if n == self.sealed.len() && expired(&self.active) {
                self.roll()?;
                report.rolled = true;
                n += 1;
            }
            self.delete_oldest(n, &mut report)?;
        }
        if let Some(bytes_max) = self.config.retention_bytes {
            let (mut n, mut size) = (0, self.size_bytes);
            while n < self.sealed.len() && size > bytes_max {
                size -= self.sealed[n].size_bytes;
                n += 1;
            }
            self.delete_oldest(n, &mut report)?;
        }
        report.log_start_offset = self.log_start_offset();
        Ok(report)
    }

    /// Removes every batch from the one holding `to` on (replication: a follower whose log
    /// diverged from its new leader's). Truncation is by whole batches, so the new log end may
    /// be below `to` (the start of the batch holding it). Segments after it are deleted
    /// newest first, the segment holding it is cut and fsynced, and the log is reopened, which
    /// rebuilds that segment's indexes. `to` below the log start empties the log and starts it
    /// again at `to`. Returns the new log end.
    pub fn truncate(&mut self, to: u64, now_ms: i64) -> Result<u64, LogError> {
        if to >= self.log_end_offset {
            return Ok(self.log_end_offset);
        }
        let dir = self.dir.clone();
        let remove = |base: u64| -> Result<(), LogError> {
            for ext in [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT] {
                let path = segment_path(&dir, base, ext);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err("remove", &path)(e));
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        let bases: Vec<u64> = self.segments().map(|s| s.base_offset).collect();
        if to < self.log_start_offset() {
            for base in bases.iter().rev() {
                remove(*base)?;
                sync_dir(&dir)?;
            }
            let path = segment_path(&dir, to, LOG_EXT);
            File::create(&path).map_err(io_err("create", &path))?;
            sync_dir(&dir)?;
        } else {
            let i = self.segment_index(to);
            let (position, header, _) = self.segment(i).locate(to)?;
            debug_assert!(header.base_offset <= to);
            for base in bases[i + 1..].iter().rev() {
                remove(*base)?;
                sync_dir(&dir)?;
            }
            let seg = self.segment(i);
            // Sealed segments are open read-only: cut through a handle of its own.
            let file = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open", &seg.path))?;
            file.set_len(position)
                .map_err(io_err("truncate", &seg.path))?;
            file.sync_all().map_err(io_err("sync", &seg.path))?;
            // Its indexes may point past the cut: rebuilt when the log is reopened.
            for ext in [INDEX_EXT, TIME_INDEX_EXT] {
                let path = segment_path(&dir, seg.base_offset, ext);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err("remove", &path)(e));
                    }
                    _ => {}
                }
            }
            sync_dir(&dir)?;
        }
        let (log, _) = Self::open(&dir, self.config.clone(), now_ms)?;
        let flushes = self.flushes;
        *self = log;
        self.flushes = flushes;
        tracing::info!(dir = %dir.display(), to, end = self.log_end_offset, "truncated");
        Ok(self.log_end_offset)
    }

    /// Removes the whole directory (topic deletion): renamed to `<dir>.deleted` first so that a
    /// crash leaves either the whole log or a directory marked for deletion.
    pub fn delete(self) -> Result<(), LogError> {
        let dir = self.dir.clone();
        drop(self);
        let parent = parent_of(&dir);
        let mut doomed = dir.clone().into_os_string();
        doomed.push(".deleted");
        let doomed = PathBuf::from(doomed);
        if doomed.exists() {
            fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
        }
        fs::rename(&dir, &doomed).map_err(io_err("rename", &dir))?;
        sync_dir(parent)?;
        fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
        sync_dir(parent)
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.sealed.iter().chain(std::iter::once(&self.active))
    }

    fn segment(&self, i: usize) -> &Segment {
        self.sealed.get(i).unwrap_or(&self.active)
    }

    /// Index of the segment holding `offset` (which is at least the log start offset).
    fn segment_index(&self, offset: u64) -> usize {
        if offset >= self.active.base_offset {
            return self.sealed.len();
        }
        self.sealed
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1)
    }

    fn should_roll(&self, batch_bytes: u64, last_offset: u64, now_ms: i64) -> bool {
        let seg = &self.active;
        seg.size_bytes > 0
            && (seg.size_bytes + batch_bytes > self.config.segment_bytes
                || self
                    .writer
                    .first_append_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) > self.config.segment_ms)
                || last_offset - seg.base_offset > u64::from(u32::MAX))
    }

    /// Seals the active segment (final time entry, indexes and log synced) and starts a new one
    /// at the log end offset.
    fn roll(&mut self) -> Result<(), LogError> {
        let new_base = self.log_end_offset;
        if let Some(e) = self.writer.builder.final_time_entry(&self.active.indexes) {
            self.writer.write_entries((None, Some(e)))?;
            self.active.indexes.times.push(e);
        }
        self.writer.flush(true)?;
        self.active
            .log
            .sync_data()
            .map_err(io_err("sync", &self.active.path))?;
        let path = segment_path(&self.dir, new_base, LOG_EXT);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let builder = IndexBuilder::new(self.config.index_interval_bytes);
        let writer = ActiveWriter::new(&self.dir, new_base, builder, true)?;
        sync_dir(&self.dir)?;
        let segment = Segment {
            base_offset: new_base,
            path,
            log,
            size_bytes: 0,
            indexes: Indexes::default(),
            max_timestamp: None,
        };
        self.sealed
            .push(std::mem::replace(&mut self.active, segment));
        self.writer = writer;
        self.durable_end_offset = new_base;
        tracing::debug!(dir = %self.dir.display(), base_offset = new_base, "rolled segment");
        Ok(())
    }

    /// Deletes the `n` oldest sealed segments.
    fn delete_oldest(&mut self, n: usize, report: &mut RetentionReport) -> Result<(), LogError> {
        for _ in 0..n.min(self.sealed.len()) {
            let path = &self.sealed[0].path;
            fs::remove_file(path).map_err(io_err("remove", path))?;
            let seg = self.sealed.remove(0);
            self.size_bytes -= seg.size_bytes;
            report.segments_deleted += 1;
            report.bytes_deleted += seg.size_bytes;
            // Durable before the next segment goes, so a crash leaves a prefix deleted, no hole.
            sync_dir(&self.dir)?;
            for ext in [INDEX_EXT, TIME_INDEX_EXT] {
                let path = segment_path(&self.dir, seg.base_offset, ext);
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    // A leftover index is removed as a stray at the next open.
                    tracing::warn!(path = %path.display(), error = %e, "could not remove index file");
                }
            }
            tracing::info!(dir = %self.dir.display(), base_offset = seg.base_offset, bytes = seg.size_bytes, "deleted segment");
        }
        Ok(())
    }
}

/// The segment base offsets in `dir`, ascending, after removing strays.
fn list_segments(dir: &Path, report: &mut RecoveryReport) -> Result<Vec<u64>, LogError> {
    let mut logs = BTreeSet::new();
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let is_file = entry.file_type().map_err(io_err("stat", &path))?.is_file();
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|_| is_file) else {
            continue;
        };
        if name.ends_with(".deleted") || name.ends_with(".tmp") {
            remove_stray(&path, report)?;
            continue;
        }
        match parse_segment_name(name) {
            Some((base, LOG_EXT)) => {
                logs.insert(base);
            }
            Some((base, _)) => indexes.push((base, path)),
            None => tracing::debug!(path = %path.display(), "leaving unknown file alone"),
        }
    }
    for (base, path) in indexes {
        if !logs.contains(&base) {
            remove_stray(&path, report)?;
        }
    }
    if report.stray_files_removed > 0 {
        sync_dir(dir)?;
    }
    Ok(logs.into_iter().collect())
}

fn remove_stray(path: &Path, report: &mut RecoveryReport) -> Result<(), LogError> {
    tracing::warn!(path = %path.display(), "removing stray file");
    fs::remove_file(path).map_err(io_err("remove", path))?;
    report.stray_files_removed += 1;
    Ok(())
}

/// Loads a sealed segment whose successor starts at `next_base`; rebuilds its indexes if they
/// are missing or inconsistent (the `bool`).
fn load_sealed(
    dir: &Path,
    base: u64,
    next_base: u64,
    interval: u32,
) -> Result<(Segment, bool), LogError> {
    let path = segment_path(dir, base, LOG_EXT);
    let log = File::open(&path).map_err(io_err("open", &path))?;
    let size = log.metadata().map_err(io_err("stat", &path))?.len();
    let (index_path, time_path) = (
        segment_path(dir, base, INDEX_EXT),
        segment_path(dir, base, TIME_INDEX_EXT),
    );
    let loaded = match (read_optional(&index_path)?, read_optional(&time_path)?) {
        (Some(o), Some(t)) => Indexes::decode_sealed(&o, &t, next_base.saturating_sub(base), size),
        _ => None,
    };
    let rebuilt = loaded.is_none();
    let indexes = match loaded {
        Some(indexes) => indexes,
        None => {
            tracing::warn!(segment = %path.display(), "rebuilding missing or inconsistent indexes");
            let mut scan = scan_segment(&log, &path, base, size, interval, false)?;
            if let Some((position, why)) = &scan.stop {
                // Reads that reach this point report it; the batches before it stay readable.
                tracing::warn!(segment = %path.display(), position, why, "unreadable batch in sealed segment");
            }
            let last_entry = scan.builder.final_time_entry(&scan.indexes);
            scan.indexes.times.extend(last_entry);
            write_indexes(&index_path, &time_path, &scan.indexes)?;
            scan.indexes
        }
    };
    let max_timestamp = indexes.times.last().map(|e| e.timestamp_ms);
    let segment = Segment {
        base_offset: base,
        path,
        log,
        size_bytes: size,
        indexes,
        max_timestamp,
    };
    Ok((segment, rebuilt))
}

/// Recovers the last segment: scan, truncate a bad tail, rebuild indexes. Returns the segment,
/// its writer and the log end offset.
fn recover_active(
    dir: &Path,
    base: u64,
    interval: u32,
    report: &mut RecoveryReport,
) -> Result<(Segment, ActiveWriter, u64), LogError> {
    let path = segment_path(dir, base, LOG_EXT);
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    let len = log.metadata().map_err(io_err("stat", &path))?.len();
    let scan = scan_segment(&log, &path, base, len, interval, true)?;
    if let Some((position, why)) = &scan.stop {
        tracing::warn!(segment = %path.display(), position, why, cut_bytes = len - position, "truncating torn tail");
        log.set_len(*position).map_err(io_err("truncate", &path))?;
        log.sync_all().map_err(io_err("sync", &path))?;
        report.truncated_bytes += len - position;
    }
    let (index_path, time_path) = (
        segment_path(dir, base, INDEX_EXT),
        segment_path(dir, base, TIME_INDEX_EXT),
    );
    let (o, t) = (scan.indexes.encode_offsets(), scan.indexes.encode_times());
    if read_optional(&index_path)?.as_ref() != Some(&o)
        || read_optional(&time_path)?.as_ref() != Some(&t)
    {
        write_indexes(&index_path, &time_path, &scan.indexes)?;
        report.indexes_rebuilt += 1;
    }
    let max_timestamp = scan.builder.max_timestamp();
    let writer = ActiveWriter::new(dir, base, scan.builder, false)?;
    let segment = Segment {
        base_offset: base,
        path,
        log,
        size_bytes: scan.valid_bytes,
        indexes: scan.indexes,
        max_timestamp,
    };
    Ok((segment, writer, scan.next_offset))
}

/// The result of scanning a segment front to back.
#[derive(Debug)]
struct SegmentScan {
    indexes: Indexes,
    builder: IndexBuilder,
    /// Bytes of whole, valid batches from the start.
    valid_bytes: u64,
    /// Offset after the last valid batch.
    next_offset: u64,
    /// Where and why the scan stopped before the end of the file.
    stop: Option<(u64, String)>,
}

/// Scans a segment, building its indexes, up to the first batch that is torn, inconsistent,
/// out of sequence or (with `verify_crc`) fails its CRC.
fn scan_segment(
    log: &File,
    path: &Path,
    base: u64,
    len: u64,
    interval: u32,
    verify_crc: bool,
) -> Result<SegmentScan, LogError> {
    let mut scan = Scanner::new(log, path, len);
    let mut out = SegmentScan {
        indexes: Indexes::default(),
        builder: IndexBuilder::new(interval),
        valid_bytes: 0,
        next_offset: base,
        stop: None,
    };
    loop {
        let position = scan.position();
        let bytes = match scan.next_batch()? {
            Scanned::End => break,
            Scanned::Torn(why) => {
                out.stop = Some((position, why));
                break;
            }
            Scanned::Batch(bytes) => bytes,
        };
        let checked = check_batch(bytes, out.next_offset, base, verify_crc);
        let (h, last) = match checked {
            Ok(ok) => ok,
            Err(why) => {
                out.stop = Some((position, why));
                break;
            }
        };
        let rel = (h.base_offset - base) as u32; // check_batch bounds it
        let total = h.total_bytes() as u64;
        out.builder
            .on_batch(&mut out.indexes, rel, position, total, h.max_timestamp);
        out.valid_bytes = position + total;
        out.next_offset = last + 1;
    }
    Ok(out)
}

/// Checks one framed batch found by a scan: header, optionally CRC, offset sequence.
fn check_batch(
    bytes: &[u8],
    expected: u64,
    base: u64,
    verify_crc: bool,
) -> Result<(BatchHeader, u64), String> {
    let h = if verify_crc {
        BatchView::parse(bytes).map(|v| *v.header())
    } else {
        BatchHeader::parse(bytes)
    }
    .map_err(|e| e.to_string())?;
    if h.base_offset != expected {
        return Err(format!(
            "expected a batch at offset {expected}, found {}",
            h.base_offset
        ));
    }
    let last = last_offset(&h).ok_or("inconsistent record count")?;
    if last - base > u64::from(u32::MAX) {
        return Err(format!(
            "offset {last} is too far from the segment base {base}"
        ));
    }
    Ok((h, last))
}

/// After a read failed with `e`: the whole batches already in `out` if the failure is corrupt
/// data after them (the reader gets what is good, and the error when it reads on), else `e`.
fn serve_prefix(e: LogError, out: BytesMut) -> Result<Bytes, LogError> {
    match e {
        LogError::Corrupt { .. } if !out.is_empty() => {
            tracing::warn!(error = %e, "stopping a read before corrupt data");
            Ok(out.freeze())
        }
        e => Err(e),
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, LogError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Rewrites both index files (not synced: indexes need not be durable).
fn write_indexes(index_path: &Path, time_path: &Path, idx: &Indexes) -> Result<(), LogError> {
    fs::write(index_path, idx.encode_offsets()).map_err(io_err("write", index_path))?;
    fs::write(time_path, idx.encode_times()).map_err(io_err("write", time_path))
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// An fdatasync to run outside the log's lock; see [`PartitionLog::begin_flush`].
#[derive(Debug)]
pub struct PendingSync {
    file: File,
    path: PathBuf,
    end_offset: u64,
}

impl PendingSync {
    /// Offsets below this are durable once [`sync`](Self::sync) returns.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// fdatasyncs the segment that was active when the flush began.
    pub fn sync(&self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io_err("sync", &self.path))
    }
}
