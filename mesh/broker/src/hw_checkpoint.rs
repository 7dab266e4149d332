//! A replica's high-watermark checkpoint (cluster mode): `DIR/high-watermark`, two lines of
//! text, `quiver-hw 1` then the offset. Kafka keeps the same
//! (`replication-offset-checkpoint`), so that a restarted replica that becomes leader can
//! serve consumers what was committed before, without waiting for its followers to report.
//!
//! The checkpoint lags: it is written about once a second while the high watermark moves.
//! Any offset it holds was committed when written (a high watermark only ever names committed
//! records), so a replica may start from it, capped at what it recovered on disk. A missing
//! or unreadable file means 0: replication then restores the high watermark as before.

use std::io::Write;
use std::path::Path;

/// File name inside the partition directory.
pub const FILE: &str = "high-watermark";
const HEADER: &str = "quiver-hw 1";

/// The checkpointed high watermark, if there is a readable one.
pub fn load(dir: &Path) -> Option<u64> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "high-watermark checkpoint unreadable; starting from 0");
            return None;
        }
    };
    let mut lines = text.lines();
    match (
        lines.next(),
        lines.next().map(str::parse::<u64>),
        lines.next(),
    ) {
        (Some(HEADER), Some(Ok(hw)), None) => Some(hw),
        _ => {
            tracing::warn!(path = %path.display(), "high-watermark checkpoint malformed; starting from 0");
            None
        }
    }
}

/// Replaces the checkpoint with `hw`: written to a temporary file, fsynced, renamed over the
/// old one (a crash leaves the old checkpoint or the new one, never a torn file).
pub fn store(dir: &Path, hw: u64) -> std::io::Result<()> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        write!(f, "{HEADER}\n{hw}\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files_mean_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), None);
        store(dir.path(), 42).unwrap();
        assert_eq!(load(dir.path()), Some(42));
        store(dir.path(), 7).unwrap();
        assert_eq!(load(dir.path()), Some(7));
        for bad in [
            "",
            "quiver-hw 1\n",
            "quiver-hw 2\n5\n",
            "quiver-hw 1\nx\n",
            "quiver-hw 1\n5\n6\n",
        ] {
            std::fs::write(dir.path().join(FILE), bad).unwrap();
            assert_eq!(load(dir.path()), None, "{bad:?}");
        }
    }
}
