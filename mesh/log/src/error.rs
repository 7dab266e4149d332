//! Errors of the partition log.

use std::io;
use std::path::{Path, PathBuf};

use quiver_proto::BatchError;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Stored bytes failed verification (framing, offsets or CRC); they are never served.
    #[error("corrupt log data in {} at byte {position}: {detail}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the bad batch in that file.
        position: u64,
        /// What was wrong.
        detail: String,
    },
    /// The requested offset is outside `[start, end]`.
    #[error("offset {offset} is out of range [{start}, {end}]")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// The log start offset.
        start: u64,
        /// The log end offset.
        end: u64,
    },
    /// The batch given to `append` is malformed (the caller should have validated it).
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// The batch given to `append` cannot fit in a segment.
    #[error("batch of {bytes} bytes exceeds the maximum of {max_bytes}")]
    BatchTooLarge {
        /// Size of the batch.
        bytes: u64,
        /// Largest batch a segment can hold.
        max_bytes: u64,
    },
}

/// Maps an `io::Error` from operation `op` on `path` into a [`LogError::Io`].
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
