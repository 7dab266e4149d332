//! A partition's leader-epoch lineage: for every leader epoch that appended to the log, the
//! offset of its first batch (Kafka's leader-epoch checkpoint). Replication answers
//! OffsetForLeaderEpoch from it (KIP-101/279): where an epoch ends is where the next one
//! starts, or the log end.
//!
//! Kept in `leader-epochs` in the partition's directory, rewritten (temporary file, fsync,
//! rename, fsync of the directory) only when an epoch starts or the log is truncated, which
//! happens at leader changes, not per append. A missing or unreadable file is rebuilt from
//! the batch headers of the log.

use std::io::Write;
use std::path::{Path, PathBuf};

use quiver_log::PartitionLog;
use quiver_proto::BatchHeader;

const FILE: &str = "leader-epochs";
const HEADER: &str = "quiver leader-epochs 1";

/// The lineage: `(epoch, start offset)`, epochs and offsets strictly increasing.
#[derive(Debug, Clone)]
pub struct EpochCache {
    path: PathBuf,
    entries: Vec<(u32, u64)>,
}

impl EpochCache {
    /// Loads the lineage of the log in `dir` (rebuilding it from `log` when the file is
    /// missing or bad) and drops entries at or past the log end (a torn tail recovery cut).
    pub fn load(dir: &Path, log: &PartitionLog) -> std::io::Result<Self> {
        let path = dir.join(FILE);
        let parsed = std::fs::read_to_string(&path).ok().and_then(|t| parse(&t));
        let mut cache = match parsed {
            Some(entries) => Self { path, entries },
            None => {
                let entries = scan(log);
                let c = Self { path, entries };
                if !c.entries.is_empty() {
                    c.persist()?;
                }
                c
            }
        };
        let end = log.log_end_offset();
        if cache.entries.iter().any(|(_, start)| *start >= end) {
            cache.entries.retain(|(_, start)| *start < end);
            cache.persist()?;
        }
        Ok(cache)
    }

    /// The epoch of the last batch.
    pub fn last_epoch(&self) -> Option<u32> {
        self.entries.last().map(|(e, _)| *e)
    }

    /// The lineage.
    pub fn entries(&self) -> &[(u32, u64)] {
        &self.entries
    }

    /// A batch of `epoch` is appended at `start`: records a new epoch (durably) when it is
    /// larger than the last one.
    pub fn on_append(&mut self, epoch: u32, start: u64) -> std::io::Result<()> {
        if self.last_epoch().is_none_or(|last| epoch > last) {
            self.entries.push((epoch, start));
            self.persist()?;
        }
        Ok(())
    }

    /// The log was truncated to `end`.
    pub fn truncate(&mut self, end: u64) -> std::io::Result<()> {
        if self.entries.iter().any(|(_, s)| *s >= end) {
            self.entries.retain(|(_, s)| *s < end);
            self.persist()?;
        }
        Ok(())
    }

    fn persist(&self) -> std::io::Result<()> {
        let mut text = format!("{HEADER}\n");
        for (e, s) in &self.entries {
            text.push_str(&format!("{e} {s}\n"));
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// OffsetForLeaderEpoch over a lineage: the largest epoch ≤ `epoch` and where it ends (the
/// next epoch's start, or `log_end`); `None` when every epoch is larger.
pub fn end_of_epoch(entries: &[(u32, u64)], epoch: u32, log_end: u64) -> Option<(u32, u64)> {
    let i = entries.partition_point(|(e, _)| *e <= epoch);
    if i == 0 {
        return None;
    }
    let end = entries.get(i).map_or(log_end, |(_, s)| *s);
    Some((entries[i - 1].0, end))
}

fn parse(text: &str) -> Option<Vec<(u32, u64)>> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut out: Vec<(u32, u64)> = Vec::new();
    for line in lines {
        let (e, s) = line.split_once(' ')?;
        let (e, s) = (e.parse().ok()?, s.parse().ok()?);
        if out.last().is_some_and(|(le, ls)| e <= *le || s <= *ls) {
            return None;
        }
        out.push((e, s));
    }
    Some(out)
}

/// Rebuilds the lineage from the batch headers.
fn scan(log: &PartitionLog) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut offset = log.log_start_offset();
    let end = log.log_end_offset();
    while offset < end {
        let Ok(bytes) = log.read(offset, 1 << 20, u64::MAX) else {
            break;
        };
        if bytes.is_empty() {
            break;
        }
        let mut at = 0;
        while at < bytes.len() {
            let Ok(h) = BatchHeader::parse(&bytes[at..]) else {
                return out;
            };
            if out.last().is_none_or(|(e, _)| h.leader_epoch > *e) {
                out.push((h.leader_epoch, h.base_offset));
            }
            offset = h.base_offset + u64::from(h.last_offset_delta) + 1;
            at += h.total_bytes();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_epoch_follows_the_lineage() {
        let l = [(1, 0), (2, 2), (5, 5)];
        assert_eq!(end_of_epoch(&l, 0, 6), None);
        assert_eq!(end_of_epoch(&l, 1, 6), Some((1, 2)));
        assert_eq!(end_of_epoch(&l, 3, 6), Some((2, 5)));
        assert_eq!(end_of_epoch(&l, 5, 6), Some((5, 6)));
        assert_eq!(end_of_epoch(&l, 9, 6), Some((5, 6)));
        assert_eq!(end_of_epoch(&[], 3, 0), None);
    }

    #[test]
    fn the_file_round_trips_and_bad_files_are_refused() {
        assert_eq!(
            parse("quiver leader-epochs 1\n1 0\n3 7\n"),
            Some(vec![(1, 0), (3, 7)])
        );
        assert_eq!(
            parse("quiver leader-epochs 1\n3 0\n1 7\n"),
            None,
            "epochs must grow"
        );
        assert_eq!(parse("something else\n"), None);
        assert_eq!(parse("quiver leader-epochs 1\n1 x\n"), None);
    }
}
