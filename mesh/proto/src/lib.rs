//! Quiver's shared vocabulary and byte formats: identifiers, the record batch (identical on the
//! wire and on disk), the request/response frames of the client protocol, and their messages.
//!
//! Architecture invariant: this crate does no I/O, has no async, and never reads the clock or a
//! global random number generator. Everything here is a pure function of its inputs, so every
//! decoder can be fuzzed and every encoder tested byte for byte.
//!
//! Decoders never panic on hostile input: they return [`DecodeError`] or [`BatchError`].
#![forbid(unsafe_code)]

pub mod batch;
pub mod codec;
pub mod error;
pub mod frame;
pub mod ids;
pub mod messages;
pub mod peer;
pub mod varint;

pub use batch::{
    BatchBuilder, BatchError, BatchHeader, BatchLimits, BatchView, Compression, Header, Record,
    RecordBatches, ValidatedBatch,
};
pub use codec::{DecodeError, Reader, Writer};
pub use error::ErrorCode;
pub use frame::{ApiKey, FrameError, RequestHeader, ResponseHeader};
pub use ids::{LeaderEpoch, Offset, PartitionId, TopicName, TopicNameError};
