//! The record batch: Quiver's unit of storage, replication and transfer, byte-identical on the
//! wire and on disk.
//!
//! # Layout
//!
//! A batch is a fixed 61-byte little-endian header followed by the records section:
//!
//! | offset | field               | type | notes |
//! |-------:|---------------------|------|-------|
//! | 0      | `base_offset`       | u64  | offset of the first record; set by the broker on append |
//! | 8      | `batch_length`      | u32  | bytes that follow this field (total size − 12) |
//! | 12     | `leader_epoch`      | u32  | set by the partition leader on append |
//! | 16     | `magic`             | u8   | format version, [`MAGIC`] = 1 |
//! | 17     | `crc`               | u32  | CRC-32C (Castagnoli) of bytes 21..end |
//! | 21     | `attributes`        | u16  | bits 0–2 compression (0 none, 1 lz4, 2 zstd); bit 3 timestamp type (0 create time); bit 4 transactional; bit 5 control; other bits 0 |
//! | 23     | `last_offset_delta` | u32  | `record_count − 1` |
//! | 27     | `first_timestamp`   | i64  | ms since the Unix epoch |
//! | 35     | `max_timestamp`     | i64  | largest record timestamp |
//! | 43     | `producer_id`       | i64  | −1 when not idempotent (reserved for idempotence) |
//! | 51     | `producer_epoch`    | i16  | −1 when not idempotent |
//! | 53     | `base_sequence`     | i32  | −1 when not idempotent |
//! | 57     | `record_count`      | u32  | number of records, ≥ 1 |
//! | 61     | records             |      | the records, compressed as a whole when compression ≠ 0 |
//!
//! `base_offset` and `leader_epoch` sit outside the CRC so a broker assigns them without
//! recomputing it; everything a producer wrote is covered.
//!
//! Each record (after decompression) is:
//!
//! ```text
//! length            varint   bytes of the record after this field
//! attributes        u8       0 (reserved)
//! timestamp_delta   varint   record timestamp − first_timestamp
//! offset_delta      varint   0, 1, 2, ... in order
//! key_length        varint   −1 = no key
//! key               bytes
//! value_length      varint   −1 = no value (tombstone)
//! value             bytes
//! header_count      varint
//!   header_key_length   varint, header_key (UTF-8)
//!   header_value_length varint (−1 = null), header_value
//! ```
//!
//! Varints are zig-zag LEB128 ([`crate::varint`]).

use std::borrow::Cow;

use bytes::{BufMut, Bytes};

use crate::varint::{get_varint, put_varint, varint_len};

/// Size of the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before and including the `batch_length` field.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
/// Current batch format version.
pub const MAGIC: u8 = 1;
/// First byte covered by the CRC.
pub const CRC_START: usize = 21;

const OFF_BASE_OFFSET: usize = 0;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_FIRST_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
const OFF_RECORD_COUNT: usize = 57;

const ATTR_COMPRESSION_MASK: u16 = 0b111;
const ATTR_TIMESTAMP_TYPE: u16 = 1 << 3;
const ATTR_TRANSACTIONAL: u16 = 1 << 4;
const ATTR_CONTROL: u16 = 1 << 5;
const ATTR_KNOWN: u16 =
    ATTR_COMPRESSION_MASK | ATTR_TIMESTAMP_TYPE | ATTR_TRANSACTIONAL | ATTR_CONTROL;

/// Compression of a batch's records section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// LZ4 block format with the uncompressed size prepended (`lz4_flex` "size-prepended").
    Lz4,
    /// A Zstandard frame.
    Zstd,
}

impl Compression {
    /// The attribute bits of this codec.
    pub fn code(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    /// The codec named by attribute bits.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            2 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?}; expected none, lz4 or zstd"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than the header, or than `batch_length` claims.
    #[error("batch truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the batch claims.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// `batch_length` is smaller than a header or larger than allowed.
    #[error("batch length {0} is out of range")]
    BadLength(u64),
    /// Unknown format version.
    #[error("unsupported batch magic {0}")]
    BadMagic(u8),
    /// The CRC does not match the contents.
    #[error("batch crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Attribute bits name an unknown codec or reserved bits are set.
    #[error("invalid batch attributes {0:#06x}")]
    BadAttributes(u16),
    /// Header fields contradict each other or the records.
    #[error("invalid batch: {0}")]
    Invalid(String),
    /// A record is larger than the topic allows.
    #[error(
        "record at offset delta {offset_delta} is {bytes} bytes, more than the maximum of {max_bytes}"
    )]
    RecordTooLarge {
        /// Index of the record in its batch.
        offset_delta: u32,
        /// Size of the record.
        bytes: usize,
        /// Allowed size.
        max_bytes: usize,
    },
    /// The records section failed to decompress.
    #[error("batch decompression failed: {0}")]
    Decompress(String),
}

/// The fixed header of a batch, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the `batch_length` field.
    pub batch_length: u32,
    /// Leader epoch stamped on append.
    pub leader_epoch: u32,
    /// Format version.
    pub magic: u8,
    /// Stored CRC-32C.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// `record_count − 1`.
    pub last_offset_delta: u32,
    /// Timestamp of the first record, ms.
    pub first_timestamp: i64,
    /// Largest record timestamp, ms.
    pub max_timestamp: i64,
    /// Idempotent producer id, or −1.
    pub producer_id: i64,
    /// Idempotent producer epoch, or −1.
    pub producer_epoch: i16,
    /// Sequence of the first record, or −1.
    pub base_sequence: i32,
    /// Records in the batch.
    pub record_count: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Decodes the header at the front of `buf` (no CRC check).
    pub fn parse(buf: &[u8]) -> Result<Self, BatchError> {
        if buf.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated {
                need: BATCH_HEADER_BYTES,
                have: buf.len(),
            });
        }
        Ok(Self {
            base_offset: le_u64(buf, OFF_BASE_OFFSET),
            batch_length: le_u32(buf, OFF_BATCH_LENGTH),
            leader_epoch: le_u32(buf, OFF_LEADER_EPOCH),
            magic: buf[OFF_MAGIC],
            crc: le_u32(buf, OFF_CRC),
            attributes: le_u16(buf, OFF_ATTRIBUTES),
            last_offset_delta: le_u32(buf, OFF_LAST_OFFSET_DELTA),
            first_timestamp: le_u64(buf, OFF_FIRST_TIMESTAMP) as i64,
            max_timestamp: le_u64(buf, OFF_MAX_TIMESTAMP) as i64,
            producer_id: le_u64(buf, OFF_PRODUCER_ID) as i64,
            producer_epoch: le_u16(buf, OFF_PRODUCER_EPOCH) as i16,
            base_sequence: le_u32(buf, OFF_BASE_SEQUENCE) as i32,
            record_count: le_u32(buf, OFF_RECORD_COUNT),
        })
    }

    /// Total size of the batch in bytes.
    pub fn total_bytes(&self) -> usize {
        self.batch_length as usize + BATCH_LENGTH_PREFIX_BYTES
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// Compression codec, if the bits name a known one.
    pub fn compression(&self) -> Option<Compression> {
        Compression::from_code(self.attributes & ATTR_COMPRESSION_MASK)
    }

    /// Whether this is a control batch (transaction markers; reserved).
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
}

/// Length of the batch at the front of `buf`, read from its `batch_length` field, or `None` when
/// fewer than 12 bytes are present. Used to frame batches in a stream of bytes.
pub fn peek_batch_bytes(buf: &[u8]) -> Option<usize> {
    if buf.len() < BATCH_LENGTH_PREFIX_BYTES {
        return None;
    }
    Some(le_u32(buf, OFF_BATCH_LENGTH) as usize + BATCH_LENGTH_PREFIX_BYTES)
}

/// The offset after the last batch in `buf` (whole batches back to back), reading only the
/// headers (no CRC check); `None` when `buf` holds no whole batch.
pub fn next_offset_after(buf: &[u8]) -> Option<u64> {
    let mut rest = buf;
    let mut next = None;
    while let Ok(h) = BatchHeader::parse(rest) {
        let total = h.total_bytes();
        if total < BATCH_HEADER_BYTES || total > rest.len() {
            break;
        }
        next = Some(h.next_offset());
        rest = &rest[total..];
    }
    next
}

/// Writes `base_offset` into a batch in place (outside the CRC).
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_le_bytes());
}

/// Writes `leader_epoch` into a batch in place (outside the CRC).
pub fn set_leader_epoch(batch: &mut [u8], epoch: u32) {
    batch[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_le_bytes());
}

/// A batch whose length and CRC have been checked, borrowed from a larger buffer.
#[derive(Clone, Copy, Debug)]
pub struct BatchView<'a> {
    header: BatchHeader,
    bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Checks the batch at the front of `buf` (length, magic, CRC, attributes) and returns it and
    /// its size. Bytes after the batch are ignored.
    pub fn parse(buf: &'a [u8]) -> Result<Self, BatchError> {
        Self::parse_checked(buf, true)
    }

    /// As [`parse`](Self::parse) without recomputing the CRC: for bytes whose CRC was just
    /// checked by the same process (a node's own log reads).
    pub fn parse_verified(buf: &'a [u8]) -> Result<Self, BatchError> {
        Self::parse_checked(buf, false)
    }

    fn parse_checked(buf: &'a [u8], check_crc: bool) -> Result<Self, BatchError> {
        let header = BatchHeader::parse(buf)?;
        let total = header.total_bytes();
        if total < BATCH_HEADER_BYTES {
            return Err(BatchError::BadLength(u64::from(header.batch_length)));
        }
        if buf.len() < total {
            return Err(BatchError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        if header.magic != MAGIC {
            return Err(BatchError::BadMagic(header.magic));
        }
        let bytes = &buf[..total];
        let computed = if check_crc {
            crc32c::crc32c(&bytes[CRC_START..])
        } else {
            header.crc
        };
        if computed != header.crc {
            return Err(BatchError::CrcMismatch {
                stored: header.crc,
                computed,
            });
        }
        if header.attributes & !ATTR_KNOWN != 0 || header.compression().is_none() {
            return Err(BatchError::BadAttributes(header.attributes));
        }
        Ok(Self { header, bytes })
    }

    /// The decoded header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The whole batch, header included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The records section, decompressed if needed.
    pub fn records_section(&self) -> Result<Cow<'a, [u8]>, BatchError> {
        let raw = &self.bytes[BATCH_HEADER_BYTES..];
        match self.header.compression() {
            Some(Compression::None) => Ok(Cow::Borrowed(raw)),
            Some(Compression::Lz4) => {
                // The size prefix comes from the network: check it against the most an lz4
                // block of this size can expand to before allocating anything.
                let (prefix, block) = raw
                    .split_first_chunk::<4>()
                    .ok_or_else(|| BatchError::Decompress("lz4 size prefix missing".into()))?;
                let size = u32::from_le_bytes(*prefix) as usize;
                let limit = decompressed_bytes_max(block.len());
                if size > limit {
                    return Err(BatchError::Decompress(format!(
                        "lz4 block of {} bytes claims {size} bytes, more than the maximum of {limit}",
                        block.len()
                    )));
                }
                lz4_flex::block::decompress(block, size)
                    .map(Cow::Owned)
                    .map_err(|e| BatchError::Decompress(e.to_string()))
            }
            Some(Compression::Zstd) => zstd_section(raw).map(Cow::Owned),
            None => Err(BatchError::BadAttributes(self.header.attributes)),
        }
    }

    /// Decodes every record, checking structure, offset deltas (0, 1, 2, ...: a batch as a
    /// producer writes it and the node stores it) and sizes; calls `f` per record.
    pub fn for_each_record(
        &self,
        max_record_bytes: usize,
        f: impl FnMut(&Record<'_>),
    ) -> Result<(), BatchError> {
        self.records_checked(max_record_bytes, Deltas::Contiguous, f)
    }

    /// As [`for_each_record`](Self::for_each_record), but also accepts a batch a plugin chain
    /// re-encoded (a fetch version 2 with a chain): offset deltas never decrease and stay at
    /// or below `last_offset_delta`, with gaps where records were dropped. Records a transform
    /// made from one source record share its offset.
    pub fn for_each_record_sparse(
        &self,
        max_record_bytes: usize,
        f: impl FnMut(&Record<'_>),
    ) -> Result<(), BatchError> {
        self.records_checked(max_record_bytes, Deltas::Sparse, f)
    }

    fn records_checked(
        &self,
        max_record_bytes: usize,
        deltas: Deltas,
        mut f: impl FnMut(&Record<'_>),
    ) -> Result<(), BatchError> {
        let section = self.records_section()?;
        let mut it = RecordIter::new(&section, self.header.first_timestamp);
        let mut n: u32 = 0;
        let mut previous = 0u32;
        while let Some(rec) = it.next_record()? {
            let in_order = match deltas {
                Deltas::Contiguous => rec.offset_delta == n,
                Deltas::Sparse => {
                    rec.offset_delta >= previous
                        && rec.offset_delta <= self.header.last_offset_delta
                }
            };
            if !in_order {
                return Err(BatchError::Invalid(format!(
                    "record {n} has offset delta {}",
                    rec.offset_delta
                )));
            }
            previous = rec.offset_delta;
            if rec.encoded_bytes > max_record_bytes {
                return Err(BatchError::RecordTooLarge {
                    offset_delta: n,
                    bytes: rec.encoded_bytes,
                    max_bytes: max_record_bytes,
                });
            }
            if rec.timestamp > self.header.max_timestamp {
                return Err(BatchError::Invalid(format!(
                    "record {n} timestamp {} is after the batch max timestamp",
                    rec.timestamp
                )));
            }
            f(&rec);
            n = n
                .checked_add(1)
                .ok_or_else(|| BatchError::Invalid("too many records".into()))?;
        }
        if n != self.header.record_count {
            return Err(BatchError::Invalid(format!(
                "header says {} records, found {n}",
                self.header.record_count
            )));
        }
        Ok(())
    }

    /// Decodes the records into owned values (for clients and tests; the broker never needs this).
    pub fn to_records(&self) -> Result<Vec<OwnedRecord>, BatchError> {
        let mut out = Vec::with_capacity(self.header.record_count.min(1 << 16) as usize);
        let base = self.header.base_offset;
        self.for_each_record(usize::MAX, |r| out.push(r.to_owned(base)))?;
        Ok(out)
    }
}

#[derive(Clone, Copy)]
enum Deltas {
    Contiguous,
    Sparse,
}

/// Decompresses a zstd records section: one frame, at most [`DECOMPRESSED_BYTES_MAX`] bytes.
///
/// zstd's ratio has no useful bound (a run of zeros compresses more than 10,000:1), so the
/// output is bounded absolutely, and allocated for what the frame declares rather than for the
/// bound: a frame header states its content size (every encoder here writes it); one without
/// it is decoded as a stream that stops at the bound.
fn zstd_section(raw: &[u8]) -> Result<Vec<u8>, BatchError> {
    let too_big = |n: u64| {
        BatchError::Decompress(format!(
            "zstd frame of {} bytes claims {n} bytes, more than the maximum of {DECOMPRESSED_BYTES_MAX}",
            raw.len()
        ))
    };
    match zstd::zstd_safe::get_frame_content_size(raw) {
        Ok(Some(n)) => {
            if n > DECOMPRESSED_BYTES_MAX as u64 {
                return Err(too_big(n));
            }
            let out = zstd::bulk::decompress(raw, n as usize)
                .map_err(|e| BatchError::Decompress(e.to_string()))?;
            if out.len() as u64 != n {
                return Err(BatchError::Decompress(format!(
                    "zstd frame claims {n} bytes but holds {}",
                    out.len()
                )));
            }
            Ok(out)
        }
        Ok(None) => {
            use std::io::Read;
            let decoder = zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| BatchError::Decompress(e.to_string()))?;
            let mut out = Vec::new();
            decoder
                .single_frame()
                .take(DECOMPRESSED_BYTES_MAX as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| BatchError::Decompress(e.to_string()))?;
            if out.len() > DECOMPRESSED_BYTES_MAX {
                return Err(too_big(out.len() as u64));
            }
            Ok(out)
        }
        Err(_) => Err(BatchError::Decompress("not a zstd frame".into())),
    }
}

/// Most bytes an lz4 records section of `compressed_bytes` may expand to: lz4's worst-case
/// ratio (255:1) with a 1 MiB floor, never above [`DECOMPRESSED_BYTES_MAX`], so a hostile size
/// prefix cannot make a decoder allocate without bound.
fn decompressed_bytes_max(compressed_bytes: usize) -> usize {
    compressed_bytes
        .saturating_mul(255)
        .clamp(1 << 20, DECOMPRESSED_BYTES_MAX)
}

/// Largest decompressed records section accepted, bytes.
pub const DECOMPRESSED_BYTES_MAX: usize = 256 << 20;

/// Limits a broker applies when validating a produced batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Largest single record (encoded size), bytes.
    pub record_bytes_max: usize,
    /// Largest batch, bytes.
    pub batch_bytes_max: usize,
}

/// What validation learned about a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidatedBatch {
    /// Size in bytes.
    pub bytes: usize,
    /// Records in the batch.
    pub record_count: u32,
    /// The header's base timestamp (record timestamps are deltas from it; usually the first
    /// record's).
    pub first_timestamp: i64,
    /// Largest record timestamp (checked: equal to the largest delta-decoded timestamp).
    pub max_timestamp: i64,
}

/// Full validation of one produced batch occupying exactly `buf`: framing, CRC, attributes,
/// header consistency and every record's structure and size. Does not modify the bytes.
pub fn validate_batch(buf: &[u8], limits: &BatchLimits) -> Result<ValidatedBatch, BatchError> {
    if buf.len() > limits.batch_bytes_max {
        return Err(BatchError::BadLength(buf.len() as u64));
    }
    let view = BatchView::parse(buf)?;
    if view.as_bytes().len() != buf.len() {
        return Err(BatchError::Invalid(format!(
            "{} bytes after the batch",
            buf.len() - view.as_bytes().len()
        )));
    }
    let h = *view.header();
    if h.record_count == 0 || h.last_offset_delta != h.record_count - 1 {
        return Err(BatchError::Invalid(format!(
            "record count {} and last offset delta {} disagree",
            h.record_count, h.last_offset_delta
        )));
    }
    if h.max_timestamp < h.first_timestamp {
        return Err(BatchError::Invalid(
            "max timestamp before first timestamp".into(),
        ));
    }
    if h.is_control() {
        return Err(BatchError::Invalid(
            "producers may not send control batches".into(),
        ));
    }
    // The header's max timestamp drives the time index and time-based retention, so it must be
    // exactly the largest record timestamp: a far-future value would pin a segment forever.
    let mut max_seen = i64::MIN;
    view.for_each_record(limits.record_bytes_max, |r| {
        max_seen = max_seen.max(r.timestamp)
    })?;
    if max_seen != h.max_timestamp {
        return Err(BatchError::Invalid(format!(
            "batch max timestamp {} is not the largest record timestamp {max_seen}",
            h.max_timestamp
        )));
    }
    Ok(ValidatedBatch {
        bytes: buf.len(),
        record_count: h.record_count,
        first_timestamp: h.first_timestamp,
        max_timestamp: h.max_timestamp,
    })
}

/// A record header (`key` → optional `value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// Header name.
    pub key: &'a str,
    /// Header value; `None` is a null value.
    pub value: Option<&'a [u8]>,
}

/// One decoded record borrowing from its batch.
#[derive(Clone, Debug)]
pub struct Record<'a> {
    /// Position in the batch.
    pub offset_delta: u32,
    /// Absolute timestamp, ms.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<&'a [u8]>,
    /// Value; `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    header_count: usize,
    headers_raw: &'a [u8],
    /// Encoded size of the record including its length prefix.
    pub encoded_bytes: usize,
}

impl<'a> Record<'a> {
    /// Number of headers.
    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// Iterates the record's headers (already validated when the record was decoded).
    pub fn headers(&self) -> impl Iterator<Item = Header<'a>> + 'a {
        let mut buf = self.headers_raw;
        (0..self.header_count).filter_map(move |_| {
            let (h, used) = decode_header(buf).ok()?;
            buf = &buf[used..];
            Some(h)
        })
    }

    /// Copies the record out of its batch.
    pub fn to_owned(&self, base_offset: u64) -> OwnedRecord {
        OwnedRecord {
            offset: base_offset + u64::from(self.offset_delta),
            timestamp: self.timestamp,
            key: self.key.map(Bytes::copy_from_slice),
            value: self.value.map(Bytes::copy_from_slice),
            headers: self
                .headers()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect(),
        }
    }
}

/// A record with its absolute offset, owning its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRecord {
    /// Offset in the partition.
    pub offset: u64,
    /// Timestamp, ms.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

fn take_varint(buf: &[u8], pos: &mut usize) -> Result<i64, BatchError> {
    let (v, used) = get_varint(&buf[*pos..]).map_err(|e| BatchError::Invalid(e.to_string()))?;
    *pos += used;
    Ok(v)
}

fn take_nullable<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    what: &str,
) -> Result<Option<&'a [u8]>, BatchError> {
    let len = take_varint(buf, pos)?;
    if len == -1 {
        return Ok(None);
    }
    let len =
        usize::try_from(len).map_err(|_| BatchError::Invalid(format!("negative {what} length")))?;
    if buf.len() - *pos < len {
        return Err(BatchError::Invalid(format!("{what} runs past the record")));
    }
    let out = &buf[*pos..*pos + len];
    *pos += len;
    Ok(Some(out))
}

fn decode_header(buf: &[u8]) -> Result<(Header<'_>, usize), BatchError> {
    let mut pos = 0;
    let key = take_nullable(buf, &mut pos, "header key")?
        .ok_or_else(|| BatchError::Invalid("null header key".into()))?;
    let key = std::str::from_utf8(key)
        .map_err(|_| BatchError::Invalid("header key is not UTF-8".into()))?;
    let value = take_nullable(buf, &mut pos, "header value")?;
    Ok((Header { key, value }, pos))
}

/// Iterates the records of a (decompressed) records section.
#[derive(Debug)]
pub struct RecordIter<'a> {
    buf: &'a [u8],
    pos: usize,
    first_timestamp: i64,
}

impl<'a> RecordIter<'a> {
    /// Starts at the first record of `section`.
    pub fn new(section: &'a [u8], first_timestamp: i64) -> Self {
        Self {
            buf: section,
            pos: 0,
            first_timestamp,
        }
    }

    /// The next record, `Ok(None)` at the end, or an error for malformed bytes.
    pub fn next_record(&mut self) -> Result<Option<Record<'a>>, BatchError> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let start = self.pos;
        let len = take_varint(self.buf, &mut self.pos)?;
        let len = usize::try_from(len)
            .map_err(|_| BatchError::Invalid("negative record length".into()))?;
        if self.buf.len() - self.pos < len {
            return Err(BatchError::Invalid("record runs past the batch".into()));
        }
        let body = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        let encoded_bytes = self.pos - start;

        let mut p = 0;
        if body.is_empty() {
            return Err(BatchError::Invalid("empty record".into()));
        }
        let _attributes = body[0];
        p += 1;
        let ts_delta = take_varint(body, &mut p)?;
        let offset_delta = take_varint(body, &mut p)?;
        let offset_delta = u32::try_from(offset_delta)
            .map_err(|_| BatchError::Invalid("offset delta out of range".into()))?;
        let key = take_nullable(body, &mut p, "key")?;
        let value = take_nullable(body, &mut p, "value")?;
        let header_count = take_varint(body, &mut p)?;
        let header_count = usize::try_from(header_count)
            .map_err(|_| BatchError::Invalid("negative header count".into()))?;
        let headers_start = p;
        for _ in 0..header_count {
            if p >= body.len() {
                return Err(BatchError::Invalid(
                    "header count exceeds the record".into(),
                ));
            }
            let (_, used) = decode_header(&body[p..])?;
            p += used;
        }
        if p != body.len() {
            return Err(BatchError::Invalid("trailing bytes in record".into()));
        }
        Ok(Some(Record {
            offset_delta,
            timestamp: self.first_timestamp.saturating_add(ts_delta),
            key,
            value,
            header_count,
            headers_raw: &body[headers_start..],
            encoded_bytes,
        }))
    }
}

/// Iterates the CRC-checked batches of a buffer holding whole batches back to back (a fetch
/// response, a produce request, a segment file).
#[derive(Debug, Clone)]
pub struct RecordBatches<'a> {
    buf: &'a [u8],
    check_crc: bool,
}

impl<'a> RecordBatches<'a> {
    /// Iterates `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            check_crc: true,
        }
    }

    /// Iterates `buf` without recomputing CRCs (see [`BatchView::parse_verified`]).
    pub fn verified(buf: &'a [u8]) -> Self {
        Self {
            buf,
            check_crc: false,
        }
    }
}

impl<'a> Iterator for RecordBatches<'a> {
    type Item = Result<BatchView<'a>, BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        match BatchView::parse_checked(self.buf, self.check_crc) {
            Ok(v) => {
                self.buf = &self.buf[v.as_bytes().len()..];
                Some(Ok(v))
            }
            Err(e) => {
                self.buf = &[];
                Some(Err(e))
            }
        }
    }
}

/// Builds one batch from records, client side.
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    records: Vec<u8>,
    count: u32,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
}

impl BatchBuilder {
    /// An empty batch that will use `compression`.
    pub fn new(compression: Compression) -> Self {
        Self {
            compression,
            // The header's space comes first so an uncompressed batch is finished in place.
            records: vec![0u8; BATCH_HEADER_BYTES],
            count: 0,
            first_timestamp: None,
            max_timestamp: i64::MIN,
        }
    }

    /// An empty batch with room for `records_bytes` of encoded records before it reallocates.
    pub fn with_capacity(compression: Compression, records_bytes: usize) -> Self {
        let mut b = Self::new(compression);
        b.records.reserve_exact(records_bytes);
        b
    }

    /// Records added so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed size so far, header included.
    pub fn estimated_bytes(&self) -> usize {
        self.records.len()
    }

    /// Size a record would add, in bytes.
    pub fn record_bytes(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> usize {
        let body = Self::body_bytes(key, value, headers, 0, 0);
        body + varint_len(body as i64)
    }

    fn body_bytes(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        ts_delta: i64,
        offset_delta: u32,
    ) -> usize {
        let nullable = |b: Option<&[u8]>| match b {
            None => varint_len(-1),
            Some(b) => varint_len(b.len() as i64) + b.len(),
        };
        1 + varint_len(ts_delta)
            + varint_len(i64::from(offset_delta))
            + nullable(key)
            + nullable(value)
            + varint_len(headers.len() as i64)
            + headers
                .iter()
                .map(|(k, v)| nullable(Some(k.as_bytes())) + nullable(*v))
                .sum::<usize>()
    }

    /// Appends a record with timestamp `timestamp_ms`.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp_ms: i64,
    ) {
        self.push_at(self.count, key, value, headers, timestamp_ms);
    }

    /// Appends a record at `offset_delta` from the base offset, for re-encoding a stored batch
    /// with only some of its records (see [`finish_sparse`](Self::finish_sparse)). Deltas must
    /// not decrease; that is the caller's to keep.
    pub fn push_at(
        &mut self,
        offset_delta: u32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp_ms: i64,
    ) {
        let first = *self.first_timestamp.get_or_insert(timestamp_ms);
        let ts_delta = timestamp_ms.saturating_sub(first);
        let body = Self::body_bytes(key, value, headers, ts_delta, offset_delta);
        let r = &mut self.records;
        r.reserve(body + 10);
        put_varint(r, body as i64);
        r.push(0);
        put_varint(r, ts_delta);
        put_varint(r, i64::from(offset_delta));
        let put_nullable = |r: &mut Vec<u8>, b: Option<&[u8]>| match b {
            None => put_varint(r, -1),
            Some(b) => {
                put_varint(r, b.len() as i64);
                r.extend_from_slice(b);
            }
        };
        put_nullable(r, key);
        put_nullable(r, value);
        put_varint(r, headers.len() as i64);
        for (k, v) in headers {
            put_nullable(r, Some(k.as_bytes()));
            put_nullable(r, *v);
        }
        self.count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
    }

    /// Encodes the batch (base offset 0, leader epoch 0, no producer id) and resets the builder.
    ///
    /// Timestamps: `first_timestamp` is the first record's and deltas are taken against it (a
    /// later record may be older, a negative delta); `max_timestamp` is the largest.
    pub fn finish(&mut self) -> Bytes {
        let last_offset_delta = self.count.saturating_sub(1);
        self.finish_with(0, last_offset_delta)
    }

    /// Encodes a re-encoded stored batch: `base_offset` and `last_offset_delta` are the
    /// original batch's, so the batch still spans the same offsets while holding only the
    /// records pushed with [`push_at`](Self::push_at). Resets the builder.
    pub fn finish_sparse(&mut self, base_offset: u64, last_offset_delta: u32) -> Bytes {
        self.finish_with(base_offset, last_offset_delta)
    }

    fn finish_with(&mut self, base_offset: u64, last_offset_delta: u32) -> Bytes {
        let mut records = std::mem::replace(&mut self.records, vec![0u8; BATCH_HEADER_BYTES]);
        let compressed = match self.compression {
            Compression::None => None,
            Compression::Lz4 => Some(lz4_flex::block::compress_prepend_size(
                &records[BATCH_HEADER_BYTES..],
            )),
            // zstd only fails on allocation failure or bad parameters; then the records are
            // stored uncompressed rather than lost.
            Compression::Zstd => zstd::bulk::compress(&records[BATCH_HEADER_BYTES..], 1).ok(),
        };
        let (compression, mut out) = match compressed {
            None => (Compression::None, records),
            Some(c) => {
                records.truncate(BATCH_HEADER_BYTES);
                records.extend_from_slice(&c);
                (self.compression, records)
            }
        };
        let first = self.first_timestamp.take().unwrap_or(0);
        let max = if self.count == 0 {
            first
        } else {
            self.max_timestamp.max(first)
        };
        let total = out.len();
        let mut h = &mut out[..BATCH_HEADER_BYTES];
        h.put_u64_le(base_offset);
        h.put_u32_le((total - BATCH_LENGTH_PREFIX_BYTES) as u32);
        h.put_u32_le(0);
        h.put_u8(MAGIC);
        h.put_u32_le(0); // crc, patched below
        h.put_u16_le(compression.code());
        h.put_u32_le(last_offset_delta);
        h.put_i64_le(first);
        h.put_i64_le(max);
        h.put_i64_le(-1);
        h.put_i16_le(-1);
        h.put_i32_le(-1);
        h.put_u32_le(self.count);
        let crc = crc32c::crc32c(&out[CRC_START..]);
        out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        self.count = 0;
        self.max_timestamp = i64::MIN;
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    const LIMITS: BatchLimits = BatchLimits {
        record_bytes_max: 1 << 20,
        batch_bytes_max: 16 << 20,
    };

    fn sample(compression: Compression) -> Bytes {
        let mut b = BatchBuilder::new(compression);
        b.push(Some(b"k1"), Some(b"hello"), &[("h", Some(b"v"))], 1000);
        b.push(None, None, &[], 1005);
        b.push(
            Some(b""),
            Some(&[7u8; 300]),
            &[("a", None), ("b", Some(b""))],
            1001,
        );
        b.finish()
    }

    #[test]
    fn roundtrip_each_codec() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let bytes = sample(c);
            let v = validate_batch(&bytes, &LIMITS).unwrap();
            assert_eq!(v.record_count, 3);
            let view = BatchView::parse(&bytes).unwrap();
            assert_eq!(view.header().compression(), Some(c));
            let recs = view.to_records().unwrap();
            assert_eq!(recs.len(), 3);
            assert_eq!(recs[0].key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(
                recs[0].headers,
                vec![("h".to_string(), Some(Bytes::from_static(b"v")))]
            );
            assert_eq!(recs[1].value, None);
            assert_eq!(recs[1].timestamp, 1005);
            assert_eq!(recs[2].offset, 2);
            assert_eq!(recs[2].value.as_deref(), Some(&[7u8; 300][..]));
            assert_eq!(recs[2].headers[0], ("a".to_string(), None));
        }
    }

    #[test]
    fn offset_and_epoch_are_outside_the_crc() {
        let mut bytes = BytesMut::from(&sample(Compression::None)[..]);
        set_base_offset(&mut bytes, 42);
        set_leader_epoch(&mut bytes, 7);
        let view = BatchView::parse(&bytes).unwrap();
        assert_eq!(view.header().base_offset, 42);
        assert_eq!(view.header().leader_epoch, 7);
        assert_eq!(view.to_records().unwrap()[1].offset, 43);
    }

    #[test]
    fn every_flipped_bit_in_crc_scope_is_caught() {
        let bytes = sample(Compression::None);
        for i in CRC_START..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x10;
            assert!(validate_batch(&b, &LIMITS).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn lz4_size_prefix_cannot_force_a_huge_allocation() {
        // Found by the `batch` fuzz target: a 4-byte prefix claiming 4 GiB.
        let mut b = BatchBuilder::new(Compression::Lz4);
        b.push(None, Some(b"x"), &[], 0);
        let good = b.finish();
        let mut evil = good[..BATCH_HEADER_BYTES].to_vec();
        evil.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]);
        let len = (evil.len() - BATCH_LENGTH_PREFIX_BYTES) as u32;
        evil[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&evil[CRC_START..]);
        evil[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        match validate_batch(&evil, &LIMITS) {
            Err(BatchError::Decompress(m)) => assert!(m.contains("claims 4294967295"), "{m}"),
            other => panic!("expected a decompression error, got {other:?}"),
        }
    }

    #[test]
    fn max_timestamp_must_be_the_largest_record_timestamp() {
        // A far-future max timestamp would keep a segment from ever expiring by time.
        let good = sample(Compression::None);
        let mut evil = good.to_vec();
        evil[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8]
            .copy_from_slice(&(i64::MAX / 2).to_le_bytes());
        let crc = crc32c::crc32c(&evil[CRC_START..]);
        evil[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        match validate_batch(&evil, &LIMITS) {
            Err(BatchError::Invalid(m)) => {
                assert!(m.contains("largest record timestamp 1005"), "{m}")
            }
            other => panic!("expected invalid, got {other:?}"),
        }
        assert_eq!(validate_batch(&good, &LIMITS).unwrap().max_timestamp, 1005);
    }

    /// `batch` (uncompressed) with its records section replaced by `section` under `codec`.
    fn rewrap(batch: &[u8], codec: u16, section: &[u8]) -> Vec<u8> {
        let mut out = batch[..BATCH_HEADER_BYTES].to_vec();
        out.extend_from_slice(section);
        let len = (out.len() - BATCH_LENGTH_PREFIX_BYTES) as u32;
        out[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        let attrs = u16::from_le_bytes([out[OFF_ATTRIBUTES], out[OFF_ATTRIBUTES + 1]]);
        let attrs = (attrs & !ATTR_COMPRESSION_MASK) | codec;
        out[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
        let crc = crc32c::crc32c(&out[CRC_START..]);
        out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn zstd_is_bounded_absolutely_not_by_ratio() {
        // A 2 MiB periodic value compresses far beyond 255:1 and must still round-trip.
        let value: Vec<u8> = (0..2u32 << 20).map(|i| i as u8).collect();
        let mut b = BatchBuilder::new(Compression::Zstd);
        b.push(None, Some(&value), &[], 7);
        let bytes = b.finish();
        assert!(
            bytes.len() * 255 < value.len(),
            "ratio {}",
            value.len() / bytes.len()
        );
        let big = BatchLimits {
            record_bytes_max: 4 << 20,
            batch_bytes_max: 4 << 20,
        };
        validate_batch(&bytes, &big).unwrap();
        let recs = BatchView::parse(&bytes).unwrap().to_records().unwrap();
        assert_eq!(recs[0].value.as_deref(), Some(&value[..]));

        // A frame that does not declare its size is decoded as a stream.
        let plain = sample(Compression::None);
        let section = &plain[BATCH_HEADER_BYTES..];
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, section).unwrap();
        let undeclared = rewrap(&plain, 2, &enc.finish().unwrap());
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&undeclared[BATCH_HEADER_BYTES..]).unwrap(),
            None
        );
        validate_batch(&undeclared, &LIMITS).unwrap();

        // A frame declaring more than the bound is refused before anything is allocated.
        let huge = (DECOMPRESSED_BYTES_MAX + 1) as u64;
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.set_pledged_src_size(Some(huge)).unwrap();
        enc.include_contentsize(true).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = huge as usize;
        while left > 0 {
            let n = left.min(zeros.len());
            std::io::Write::write_all(&mut enc, &zeros[..n]).unwrap();
            left -= n;
        }
        let bomb = rewrap(&plain, 2, &enc.finish().unwrap());
        assert!(bomb.len() < 64 << 10, "bomb of {} bytes", bomb.len());
        match validate_batch(&bomb, &LIMITS) {
            Err(BatchError::Decompress(m)) => assert!(m.contains("more than the maximum"), "{m}"),
            other => panic!("expected a decompression error, got {other:?}"),
        }
        // A declared size that is a lie is refused too.
        let mut liar = undeclared.clone();
        let honest = zstd::bulk::compress(section, 3).unwrap();
        liar.truncate(BATCH_HEADER_BYTES);
        liar.extend_from_slice(&honest);
        let liar = rewrap(&liar, 2, &honest[..honest.len() - 1]);
        assert!(validate_batch(&liar, &LIMITS).is_err());
    }

    /// The worked example of PROTOCOL.md §6.8 is exactly what the encoder produces, and it
    /// validates and decodes: a client written from the document alone gets these bytes.
    #[test]
    fn protocol_md_worked_example_is_exact() {
        let doc = include_str!("../../../PROTOCOL.md");
        let section = &doc[doc.find("### 6.8 Worked example").unwrap()..];
        let block = &section[section.find("```text").unwrap() + 7..];
        let block = &block[..block.find("```").unwrap()];
        let bytes: Vec<u8> = block
            .lines()
            .filter_map(|l| l.split_once(':'))
            .flat_map(|(_, hex)| hex.split_whitespace())
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let mut b = BatchBuilder::new(Compression::None);
        b.push(Some(b"k"), Some(b"hello"), &[], 1_700_000_000_000);
        assert_eq!(bytes, b.finish().to_vec(), "PROTOCOL.md 6.8 vs the encoder");
        assert_eq!(crc32c::crc32c(&bytes[CRC_START..]), 0x4779_4ACC);
        assert_eq!(validate_batch(&bytes, &LIMITS).unwrap().record_count, 1);
        let recs = BatchView::parse(&bytes).unwrap().to_records().unwrap();
        assert_eq!(recs[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(recs[0].value.as_deref(), Some(&b"hello"[..]));
        assert_eq!(recs[0].timestamp, 1_700_000_000_000);
    }

    #[test]
    fn sparse_batches_keep_offsets_and_need_the_sparse_decoder() {
        let mut b = BatchBuilder::new(Compression::Lz4);
        b.push_at(1, Some(b"k1"), Some(b"one"), &[], 10);
        b.push_at(4, None, Some(b"four"), &[("h", None)], 12);
        b.push_at(4, None, Some(b"four-again"), &[], 12);
        let batch = b.finish_sparse(100, 5);
        let view = BatchView::parse(&batch).unwrap();
        assert_eq!(view.header().base_offset, 100);
        assert_eq!(view.header().next_offset(), 106);
        assert_eq!(view.header().record_count, 3);
        let mut seen = Vec::new();
        view.for_each_record_sparse(usize::MAX, |r| {
            seen.push((r.offset_delta, r.value.unwrap().to_vec()))
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (1, b"one".to_vec()),
                (4, b"four".to_vec()),
                (4, b"four-again".to_vec())
            ]
        );
        // A producer's batch must be contiguous: the strict decoder refuses gaps.
        assert!(view.for_each_record(usize::MAX, |_| {}).is_err());
        // Deltas past last_offset_delta, or going back, are refused by the sparse decoder too.
        let mut b = BatchBuilder::new(Compression::None);
        b.push_at(6, None, Some(b"x"), &[], 1);
        let past = b.finish_sparse(0, 5);
        assert!(
            BatchView::parse(&past)
                .unwrap()
                .for_each_record_sparse(usize::MAX, |_| {})
                .is_err()
        );
        let mut b = BatchBuilder::new(Compression::None);
        b.push_at(3, None, Some(b"x"), &[], 1);
        b.push_at(2, None, Some(b"y"), &[], 1);
        let back = b.finish_sparse(0, 5);
        assert!(
            BatchView::parse(&back)
                .unwrap()
                .for_each_record_sparse(usize::MAX, |_| {})
                .is_err()
        );
    }

    #[test]
    fn record_too_large() {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, Some(&[0u8; 2000]), &[], 0);
        let bytes = b.finish();
        let limits = BatchLimits {
            record_bytes_max: 1000,
            batch_bytes_max: 1 << 20,
        };
        assert!(matches!(
            validate_batch(&bytes, &limits),
            Err(BatchError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn batches_iterate_back_to_back() {
        let mut all = Vec::new();
        all.extend_from_slice(&sample(Compression::None));
        all.extend_from_slice(&sample(Compression::Lz4));
        let n = RecordBatches::new(&all)
            .map(|b| b.unwrap().header().record_count)
            .sum::<u32>();
        assert_eq!(n, 6);
        // A torn tail is reported, not skipped.
        let torn = &all[..all.len() - 3];
        let results: Vec<_> = RecordBatches::new(torn).collect();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(BatchError::Truncated { .. })));
    }

    #[allow(clippy::type_complexity)]
    fn arb_record() -> impl Strategy<
        Value = (
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Vec<(String, Option<Vec<u8>>)>,
            i64,
        ),
    > {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
            proptest::collection::vec(
                (
                    "[a-z]{0,8}",
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
                ),
                0..4,
            ),
            0i64..1_000_000,
        )
    }

    proptest! {
        #[test]
        fn builder_roundtrips(records in proptest::collection::vec(arb_record(), 1..30), codec in 0u16..3) {
            let c = Compression::from_code(codec).unwrap();
            let mut b = BatchBuilder::new(c);
            for (k, v, h, ts) in &records {
                let hs: Vec<(&str, Option<&[u8]>)> = h.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
                b.push(k.as_deref(), v.as_deref(), &hs, *ts);
            }
            let bytes = b.finish();
            prop_assert!(validate_batch(&bytes, &LIMITS).is_ok());
            let back = BatchView::parse(&bytes).unwrap().to_records().unwrap();
            prop_assert_eq!(back.len(), records.len());
            for (i, (r, (k, v, h, ts))) in back.iter().zip(&records).enumerate() {
                prop_assert_eq!(r.offset, i as u64);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
                prop_assert_eq!(r.timestamp, *ts);
                prop_assert_eq!(r.headers.len(), h.len());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validate_batch(&bytes, &LIMITS);
            let _ = RecordBatches::new(&bytes).count();
        }
    }
}
