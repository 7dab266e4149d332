//! One segment: a `.log` file of back-to-back batches plus its indexes, and the two ways of
//! walking it: positional header reads (lookups, fetches) and a buffered front-to-back scan
//! (recovery, index rebuilds).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use quiver_proto::batch::{BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, peek_batch_bytes};
use quiver_proto::{BatchHeader, BatchView};

use crate::error::{LogError, io_err};
use crate::index::Indexes;

/// Extension of the log file of a segment.
pub(crate) const LOG_EXT: &str = "log";
/// Extension of the offset index of a segment.
pub(crate) const INDEX_EXT: &str = "index";
/// Extension of the time index of a segment.
pub(crate) const TIME_INDEX_EXT: &str = "timeindex";
/// Digits of the zero-padded base offset in file names.
const NAME_DIGITS: usize = 20;
/// Bytes a scan reads per positional read (a larger batch is read whole).
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// `dir/<base offset, 20 digits>.<ext>`.
pub(crate) fn segment_path(dir: &Path, base_offset: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base_offset:0NAME_DIGITS$}.{ext}"))
}

/// Splits a file name into (base offset, extension) if it names a segment file.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ext = [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT]
        .into_iter()
        .find(|e| *e == ext)?;
    Some((stem.parse().ok()?, ext))
}

/// The offset of the last record of a batch, `None` if the header is inconsistent.
pub(crate) fn last_offset(h: &BatchHeader) -> Option<u64> {
    if h.record_count == 0 || h.last_offset_delta != h.record_count - 1 {
        return None;
    }
    h.base_offset.checked_add(u64::from(h.last_offset_delta))
}

/// A segment of the log.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of the first batch; also the file name.
    pub(crate) base_offset: u64,
    /// Path of the `.log` file.
    pub(crate) path: PathBuf,
    /// The `.log` file.
    pub(crate) log: File,
    /// Bytes of valid batches in `log`.
    pub(crate) size_bytes: u64,
    /// Both indexes, in memory.
    pub(crate) indexes: Indexes,
    /// Largest record timestamp in the segment, `None` while empty.
    pub(crate) max_timestamp: Option<i64>,
}

impl Segment {
    pub(crate) fn corrupt(&self, position: u64, detail: impl Into<String>) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            position,
            detail: detail.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `position`.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], position: u64) -> Result<(), LogError> {
        self.log
            .read_exact_at(buf, position)
            .map_err(io_err("read", &self.path))
    }

    /// Reads and frames the batch header at `position`: the whole batch must lie within the
    /// segment and its header must be self-consistent. The CRC is not checked here.
    pub(crate) fn read_header(&self, position: u64) -> Result<(BatchHeader, u64), LogError> {
        if position + BATCH_HEADER_BYTES as u64 > self.size_bytes {
            return Err(self.corrupt(position, "batch header runs past the end of the segment"));
        }
        let mut buf = [0u8; BATCH_HEADER_BYTES];
        self.read_exact_at(&mut buf, position)?;
        let h = BatchHeader::parse(&buf).map_err(|e| self.corrupt(position, e.to_string()))?;
        let total = h.total_bytes() as u64;
        if total < BATCH_HEADER_BYTES as u64 || position + total > self.size_bytes {
            return Err(self.corrupt(position, format!("bad batch length {}", h.batch_length)));
        }
        let last =
            last_offset(&h).ok_or_else(|| self.corrupt(position, "inconsistent record count"))?;
        Ok((h, last))
    }

    /// Position and header of the batch that contains `offset`, which must lie in this segment.
    /// Starts from the offset index; if the index leads astray (it is only a hint), scans from
    /// the start of the file instead.
    pub(crate) fn locate(&self, offset: u64) -> Result<(u64, BatchHeader, u64), LogError> {
        let rel = u32::try_from(offset.saturating_sub(self.base_offset)).unwrap_or(u32::MAX);
        let entry = self.indexes.offset_floor(rel);
        let from = (
            u64::from(entry.position),
            self.base_offset + u64::from(entry.rel_offset),
        );
        match self.scan_to(offset, from) {
            Err(e) if entry.position != 0 => {
                tracing::warn!(segment = %self.path.display(), error = %e, "offset index led astray; scanning from the start");
                self.scan_to(offset, (0, self.base_offset))
            }
            found => found,
        }
    }

    fn scan_to(
        &self,
        offset: u64,
        (mut position, mut expected): (u64, u64),
    ) -> Result<(u64, BatchHeader, u64), LogError> {
        loop {
            if position >= self.size_bytes {
                return Err(self.corrupt(position, format!("offset {offset} not found")));
            }
            let (h, last) = self.read_header(position)?;
            if h.base_offset != expected {
                return Err(self.corrupt(
                    position,
                    format!(
                        "expected a batch at offset {expected}, found {}",
                        h.base_offset
                    ),
                ));
            }
            if last >= offset {
                return Ok((position, h, last));
            }
            position += h.total_bytes() as u64;
            expected = last + 1;
        }
    }

    /// Appends the batch of `total_bytes` at `position` to `out` after checking its CRC.
    pub(crate) fn read_batch_into(
        &self,
        position: u64,
        total_bytes: usize,
        out: &mut bytes::BytesMut,
    ) -> Result<(), LogError> {
        let start = out.len();
        out.resize(start + total_bytes, 0);
        let read = self
            .read_exact_at(&mut out[start..], position)
            .and_then(|()| {
                BatchView::parse(&out[start..])
                    .map(|_| ())
                    .map_err(|e| self.corrupt(position, e.to_string()))
            });
        if read.is_err() {
            out.truncate(start);
        }
        read
    }
}

/// What a [`Scanner`] found next.
#[derive(Debug)]
pub(crate) enum Scanned<'a> {
    /// A framed batch (length checked, nothing else); it started at the position before the call.
    Batch(&'a [u8]),
    /// The end of the scanned range.
    End,
    /// The bytes at the current position cannot be a whole batch (a torn tail).
    Torn(String),
}

/// Walks the batches of a file front to back, reading through a buffer.
#[derive(Debug)]
pub(crate) struct Scanner<'a> {
    file: &'a File,
    path: &'a Path,
    position: u64,
    end: u64,
    buf: Vec<u8>,
    buf_position: u64,
}

impl<'a> Scanner<'a> {
    /// Scans `file` from byte 0 up to `end`.
    pub(crate) fn new(file: &'a File, path: &'a Path, end: u64) -> Self {
        Self {
            file,
            path,
            position: 0,
            end,
            buf: Vec::new(),
            buf_position: 0,
        }
    }

    /// Position of the next batch.
    pub(crate) fn position(&self) -> u64 {
        self.position
    }

    /// The next framed batch.
    pub(crate) fn next_batch(&mut self) -> Result<Scanned<'_>, LogError> {
        let left = self.end - self.position;
        if left == 0 {
            return Ok(Scanned::End);
        }
        if left < BATCH_LENGTH_PREFIX_BYTES as u64 {
            return Ok(Scanned::Torn(format!("{left} stray bytes at the end")));
        }
        self.fill(BATCH_LENGTH_PREFIX_BYTES)?;
        let at = (self.position - self.buf_position) as usize;
        let total = peek_batch_bytes(&self.buf[at..]).unwrap_or(0);
        if total < BATCH_HEADER_BYTES {
            return Ok(Scanned::Torn(format!("batch length {total} is too small")));
        }
        if total as u64 > left {
            return Ok(Scanned::Torn(format!(
                "batch of {total} bytes but only {left} bytes left"
            )));
        }
        self.fill(total)?;
        let at = (self.position - self.buf_position) as usize;
        self.position += total as u64;
        Ok(Scanned::Batch(&self.buf[at..at + total]))
    }

    /// Makes the buffer hold at least `need` bytes from the current position (`need` is within
    /// the scanned range).
    fn fill(&mut self, need: usize) -> Result<(), LogError> {
        let buffered_end = self.buf_position + self.buf.len() as u64;
        if self.position >= self.buf_position && self.position + need as u64 <= buffered_end {
            return Ok(());
        }
        let len = (need.max(SCAN_CHUNK_BYTES) as u64).min(self.end - self.position) as usize;
        self.buf.resize(len, 0);
        self.buf_position = self.position;
        self.file
            .read_exact_at(&mut self.buf, self.position)
            .map_err(io_err("read", self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = segment_path(Path::new("/d"), 42, LOG_EXT);
        assert_eq!(p, Path::new("/d/00000000000000000042.log"));
        assert_eq!(
            parse_segment_name("00000000000000000042.timeindex"),
            Some((42, TIME_INDEX_EXT))
        );
        assert_eq!(parse_segment_name("0000000000000000042.log"), None);
        assert_eq!(parse_segment_name("00000000000000000042.log.deleted"), None);
        assert_eq!(parse_segment_name("99999999999999999999.log"), None);
        assert_eq!(parse_segment_name("leader-epoch-checkpoint"), None);
    }
}
