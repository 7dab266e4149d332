//! The sparse offset and time indexes of a segment: their entries, where entries are added, how
//! the files are decoded and validated, and lookups. Indexes are hints: every answer they give is
//! checked against the log itself, and they are rebuilt from the log when in doubt.

/// Bytes of one `.index` entry: relative offset u32 LE, position u32 LE.
pub(crate) const OFFSET_ENTRY_BYTES: usize = 8;
/// Bytes of one `.timeindex` entry: timestamp i64 LE, relative offset u32 LE.
pub(crate) const TIME_ENTRY_BYTES: usize = 12;

/// `.index` entry: the batch with base offset `segment base + rel_offset` starts at `position`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub(crate) rel_offset: u32,
    pub(crate) position: u32,
}

impl OffsetEntry {
    pub(crate) fn encode(self) -> [u8; OFFSET_ENTRY_BYTES] {
        let mut b = [0u8; OFFSET_ENTRY_BYTES];
        b[..4].copy_from_slice(&self.rel_offset.to_le_bytes());
        b[4..].copy_from_slice(&self.position.to_le_bytes());
        b
    }
}

/// `.timeindex` entry: every record in the segment before the batch at `segment base +
/// rel_offset`, and every record of that batch, has a timestamp `<= timestamp_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub(crate) timestamp_ms: i64,
    pub(crate) rel_offset: u32,
}

impl TimeEntry {
    pub(crate) fn encode(self) -> [u8; TIME_ENTRY_BYTES] {
        let mut b = [0u8; TIME_ENTRY_BYTES];
        b[..8].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        b[8..].copy_from_slice(&self.rel_offset.to_le_bytes());
        b
    }
}

/// Both indexes of one segment, in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Indexes {
    pub(crate) offsets: Vec<OffsetEntry>,
    pub(crate) times: Vec<TimeEntry>,
}

impl Indexes {
    /// The last entry at or below `rel_offset`, or the implicit entry for the start of the file.
    pub(crate) fn offset_floor(&self, rel_offset: u32) -> OffsetEntry {
        let n = self.offsets.partition_point(|e| e.rel_offset <= rel_offset);
        n.checked_sub(1)
            .map_or(OffsetEntry::default(), |i| self.offsets[i])
    }

    /// A relative offset from which a scan for the first record with timestamp `>= ts_ms` can
    /// start: the last entry whose timestamp is below `ts_ms` (nothing before it can match).
    pub(crate) fn time_floor(&self, ts_ms: i64) -> u32 {
        let n = self.times.partition_point(|e| e.timestamp_ms < ts_ms);
        n.checked_sub(1).map_or(0, |i| self.times[i].rel_offset)
    }

    /// The `.index` file contents.
    pub(crate) fn encode_offsets(&self) -> Vec<u8> {
        self.offsets.iter().flat_map(|e| e.encode()).collect()
    }

    /// The `.timeindex` file contents.
    pub(crate) fn encode_times(&self) -> Vec<u8> {
        self.times.iter().flat_map(|e| e.encode()).collect()
    }

    /// Decodes and checks the index files of a sealed segment holding relative offsets
    /// `0..rel_offset_end` in `log_bytes` bytes. `None` when anything is off: a size that is not
    /// a whole number of entries, entries out of order or pointing past the segment, or a
    /// non-empty segment without a time entry (every sealed segment ends with one).
    pub(crate) fn decode_sealed(
        offset_bytes: &[u8],
        time_bytes: &[u8],
        rel_offset_end: u64,
        log_bytes: u64,
    ) -> Option<Self> {
        if !offset_bytes.len().is_multiple_of(OFFSET_ENTRY_BYTES)
            || !time_bytes.len().is_multiple_of(TIME_ENTRY_BYTES)
        {
            return None;
        }
        let offsets: Vec<OffsetEntry> = offset_bytes
            .chunks_exact(OFFSET_ENTRY_BYTES)
            .map(|c| OffsetEntry {
                rel_offset: le_u32(&c[..4]),
                position: le_u32(&c[4..]),
            })
            .collect();
        let times: Vec<TimeEntry> = time_bytes
            .chunks_exact(TIME_ENTRY_BYTES)
            .map(|c| TimeEntry {
                timestamp_ms: i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
                rel_offset: le_u32(&c[8..]),
            })
            .collect();
        let offsets_ok = offsets
            .windows(2)
            .all(|w| w[0].rel_offset < w[1].rel_offset && w[0].position < w[1].position)
            && offsets.iter().all(|e| {
                u64::from(e.rel_offset) < rel_offset_end && u64::from(e.position) < log_bytes
            });
        let times_ok = times
            .windows(2)
            .all(|w| w[0].timestamp_ms < w[1].timestamp_ms && w[0].rel_offset <= w[1].rel_offset)
            && times
                .iter()
                .all(|e| u64::from(e.rel_offset) < rel_offset_end)
            && (log_bytes == 0 || !times.is_empty());
        (offsets_ok && times_ok).then_some(Self { offsets, times })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decides where index entries go. The same rules run on append and on rebuild, so a rebuilt
/// index is byte-identical to the one written while appending.
///
/// An offset entry is added for a batch once at least `interval_bytes` of log were written since
/// the previous entry (the start of the file is an implicit entry, so the first batch gets
/// none). At those same points a time entry is added if the segment's max timestamp grew since
/// the last time entry. Sealing adds a final time entry for the segment's max timestamp, so a
/// sealed segment's largest timestamp is its last time entry.
#[derive(Clone, Debug)]
pub(crate) struct IndexBuilder {
    interval_bytes: u64,
    bytes_since_entry: u64,
    max_timestamp: Option<i64>,
    last_rel_offset: u32,
}

impl IndexBuilder {
    /// A builder for an empty segment.
    pub(crate) fn new(interval_bytes: u32) -> Self {
        Self {
            interval_bytes: u64::from(interval_bytes),
            bytes_since_entry: 0,
            max_timestamp: None,
            last_rel_offset: 0,
        }
    }

    /// The largest batch max timestamp seen, `None` while the segment is empty.
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        self.max_timestamp
    }

    /// Accounts for a batch at `position` with relative base offset `rel_offset`; pushes any new
    /// entries into `idx` and returns them so the caller can append them to the files.
    pub(crate) fn on_batch(
        &mut self,
        idx: &mut Indexes,
        rel_offset: u32,
        position: u64,
        batch_bytes: u64,
        batch_max_timestamp: i64,
    ) -> (Option<OffsetEntry>, Option<TimeEntry>) {
        let max = self
            .max_timestamp
            .map_or(batch_max_timestamp, |m| m.max(batch_max_timestamp));
        self.max_timestamp = Some(max);
        self.last_rel_offset = rel_offset;
        let mut added = (None, None);
        // Positions above u32 cannot occur in segments this crate writes; a foreign file simply
        // gets no entries past that point.
        if self.bytes_since_entry >= self.interval_bytes
            && let Ok(position) = u32::try_from(position)
        {
            let e = OffsetEntry {
                rel_offset,
                position,
            };
            idx.offsets.push(e);
            added.0 = Some(e);
            added.1 = self.push_time(idx, max, rel_offset);
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry = self.bytes_since_entry.saturating_add(batch_bytes);
        added
    }

    /// The final time entry of a segment being sealed: its largest timestamp, unless that is
    /// already the last entry.
    pub(crate) fn final_time_entry(&self, idx: &Indexes) -> Option<TimeEntry> {
        let max = self.max_timestamp?;
        grows(idx, max).then_some(TimeEntry {
            timestamp_ms: max,
            rel_offset: self.last_rel_offset,
        })
    }

    fn push_time(&self, idx: &mut Indexes, ts: i64, rel_offset: u32) -> Option<TimeEntry> {
        let e = TimeEntry {
            timestamp_ms: ts,
            rel_offset,
        };
        grows(idx, ts).then(|| {
            idx.times.push(e);
            e
        })
    }
}

/// Whether `ts` is above the last time entry (time entries strictly increase).
fn grows(idx: &Indexes, ts: i64) -> bool {
    idx.times.last().is_none_or(|e| e.timestamp_ms < ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches of 100 bytes at relative offsets 0, 10, 20, ... with the given max timestamps.
    fn build(interval_bytes: u32, max_ts: &[i64], seal: bool) -> Indexes {
        let mut idx = Indexes::default();
        let mut b = IndexBuilder::new(interval_bytes);
        for (i, ts) in max_ts.iter().enumerate() {
            b.on_batch(&mut idx, i as u32 * 10, i as u64 * 100, 100, *ts);
        }
        if seal {
            idx.times.extend(b.final_time_entry(&idx));
        }
        idx
    }

    #[test]
    fn entries_every_interval_and_time_entries_only_when_max_grows() {
        let idx = build(250, &[5, 9, 7, 8, 3, 4, 20, 1, 2], true);
        // 100 bytes per batch: an entry once 250 bytes passed, i.e. every third batch.
        let rels: Vec<u32> = idx.offsets.iter().map(|e| e.rel_offset).collect();
        assert_eq!(rels, vec![30, 60]);
        assert_eq!(idx.offsets[1].position, 600);
        // Max after batch 3 is 9; after batch 6 it is 20; sealing adds nothing new.
        assert_eq!(
            idx.times,
            vec![
                TimeEntry {
                    timestamp_ms: 9,
                    rel_offset: 30
                },
                TimeEntry {
                    timestamp_ms: 20,
                    rel_offset: 60
                }
            ]
        );
        // A max reached after the last index point is recorded when sealing.
        let idx = build(250, &[1, 2, 3, 4, 50], true);
        assert_eq!(
            idx.times.last().map(|e| (e.timestamp_ms, e.rel_offset)),
            Some((50, 40))
        );
    }

    #[test]
    fn floors() {
        let idx = build(250, &[5, 9, 7, 8, 3, 4, 20, 1, 2], true);
        assert_eq!(idx.offset_floor(0), OffsetEntry::default());
        assert_eq!(idx.offset_floor(29).rel_offset, 0);
        assert_eq!(idx.offset_floor(30).rel_offset, 30);
        assert_eq!(idx.offset_floor(59).position, 300);
        assert_eq!(idx.offset_floor(u32::MAX).rel_offset, 60);
        assert_eq!(idx.time_floor(i64::MIN), 0);
        assert_eq!(idx.time_floor(9), 0);
        assert_eq!(idx.time_floor(10), 30);
        assert_eq!(idx.time_floor(21), 60);
    }

    #[test]
    fn decode_round_trips_and_rejects_bad_files() {
        let idx = build(150, &[1, 2, 3, 4, 5, 6], true);
        let (o, t) = (idx.encode_offsets(), idx.encode_times());
        assert_eq!(Indexes::decode_sealed(&o, &t, 60, 600), Some(idx.clone()));
        // Torn entry.
        assert_eq!(Indexes::decode_sealed(&o[..o.len() - 1], &t, 60, 600), None);
        // Points past the segment.
        assert_eq!(Indexes::decode_sealed(&o, &t, 60, 300), None);
        assert_eq!(Indexes::decode_sealed(&o, &t, 30, 600), None);
        // Out of order.
        let mut swapped = o.clone();
        swapped.rotate_left(OFFSET_ENTRY_BYTES);
        assert_eq!(Indexes::decode_sealed(&swapped, &t, 60, 600), None);
        // A sealed non-empty segment always has a time entry.
        assert_eq!(Indexes::decode_sealed(&o, &[], 60, 600), None);
        assert!(Indexes::decode_sealed(&[], &[], 0, 0).is_some());
    }

    #[test]
    fn zero_interval_indexes_every_batch() {
        let idx = build(0, &[1, 1, 2], false);
        assert_eq!(idx.offsets.len(), 3);
        assert_eq!(idx.times.len(), 2);
    }
}
