//! Request and response frames of the client protocol.
//!
//! Each request travels on its own bidirectional QUIC stream: the client writes one request
//! frame and finishes its side; the server writes one response frame and finishes. Frames are
//! length-prefixed so a reader knows the size before allocating and can refuse absurd lengths.
//!
//! ```text
//! request  = length:u32  api:u16  version:u16  request_id:u64  body
//! response = length:u32  api:u16  error:u16    request_id:u64  body
//! ```
//!
//! `length` counts the bytes after itself. In a response, `error` is a request-level
//! [`ErrorCode`](crate::ErrorCode); when it is not 0 the body is a single `string` message.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{DecodeError, Reader};

/// Bytes of the fixed part of a frame, length prefix included.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Bytes of the length prefix.
pub const FRAME_LENGTH_BYTES: usize = 4;

/// The APIs of protocol version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKey {
    /// Which APIs and versions the server supports.
    ApiVersions,
    /// Brokers and topic/partition layout.
    Metadata,
    /// Create topics.
    CreateTopics,
    /// Delete topics.
    DeleteTopics,
    /// List topic names.
    ListTopics,
    /// Topic settings and per-partition offsets.
    DescribeTopics,
    /// Change settings of a live topic.
    AlterTopic,
    /// Members, controller and partition leadership of the cluster.
    ClusterStatus,
    /// Move partitions to other replicas, or cancel a move (cluster mode).
    ReassignPartitions,
    /// Elect partition leaders on an operator's request: preferred or unclean (cluster mode).
    ElectLeaders,
    /// Append record batches.
    Produce,
    /// Read record batches (long poll).
    Fetch,
    /// Earliest, latest or by-timestamp offsets.
    ListOffsets,
    /// Deploy a plugin component as name@version.
    PluginDeploy,
    /// List deployed plugins.
    PluginList,
    /// Remove a deployed plugin version.
    PluginRemove,
    /// Create a pipeline.
    PipelineCreate,
    /// Pipelines and their progress.
    PipelineList,
    /// Pause or resume a pipeline.
    PipelineControl,
    /// Delete a pipeline.
    PipelineDelete,
    /// Raw stream throughput probe for `quiver perf transport` (not a data API).
    TransportProbe,
}

impl ApiKey {
    /// Every API, in code order.
    pub const ALL: &'static [ApiKey] = &[
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::ListTopics,
        ApiKey::DescribeTopics,
        ApiKey::AlterTopic,
        ApiKey::ClusterStatus,
        ApiKey::ReassignPartitions,
        ApiKey::ElectLeaders,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::PluginDeploy,
        ApiKey::PluginList,
        ApiKey::PluginRemove,
        ApiKey::PipelineCreate,
        ApiKey::PipelineList,
        ApiKey::PipelineControl,
        ApiKey::PipelineDelete,
        ApiKey::TransportProbe,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            ApiKey::ApiVersions => 0,
            ApiKey::Metadata => 1,
            ApiKey::CreateTopics => 2,
            ApiKey::DeleteTopics => 3,
            ApiKey::ListTopics => 4,
            ApiKey::DescribeTopics => 5,
            ApiKey::AlterTopic => 6,
            ApiKey::ClusterStatus => 7,
            ApiKey::ReassignPartitions => 8,
            ApiKey::ElectLeaders => 9,
            ApiKey::Produce => 10,
            ApiKey::Fetch => 11,
            ApiKey::ListOffsets => 12,
            ApiKey::PluginDeploy => 20,
            ApiKey::PluginList => 21,
            ApiKey::PluginRemove => 22,
            ApiKey::PipelineCreate => 30,
            ApiKey::PipelineList => 31,
            ApiKey::PipelineControl => 32,
            ApiKey::PipelineDelete => 33,
            ApiKey::TransportProbe => 90,
        }
    }

    /// The API for a wire value, if known.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| a.code() == code)
    }

    /// The highest version of this API the crate implements (all start at 1).
    pub fn version_max(self) -> u16 {
        match self {
            // Version 2 adds a plugin chain and `next_offset`.
            ApiKey::Fetch => 2,
            _ => 1,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is larger than the receiver allows.
    #[error("frame of {length} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        /// Claimed length.
        length: u64,
        /// Receiver's limit.
        limit_bytes: usize,
    },
    /// The frame is shorter than its fixed header.
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// The length prefix disagrees with the bytes received.
    #[error("frame length prefix says {claimed} bytes but {actual} arrived")]
    LengthMismatch {
        /// From the prefix.
        claimed: usize,
        /// Received.
        actual: usize,
    },
}

/// The fixed part of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// API code (see [`ApiKey`]); kept raw so unknown APIs can be answered.
    pub api: u16,
    /// API version.
    pub version: u16,
    /// Client-chosen id echoed in the response.
    pub request_id: u64,
}

/// The fixed part of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    /// API code of the request.
    pub api: u16,
    /// Request-level error code.
    pub error: u16,
    /// The request's id.
    pub request_id: u64,
}

/// Reads the length prefix of a frame and checks it against `limit_bytes`, returning the number
/// of bytes that follow the prefix.
pub fn check_length_prefix(prefix: [u8; 4], limit_bytes: usize) -> Result<usize, FrameError> {
    let length = u32::from_le_bytes(prefix) as usize;
    if length > limit_bytes {
        return Err(FrameError::TooLarge {
            length: length as u64,
            limit_bytes,
        });
    }
    if length < FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES {
        return Err(FrameError::TooShort(length + FRAME_LENGTH_BYTES));
    }
    Ok(length)
}

fn encode(a: u16, b: u16, id: u64, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_BYTES + body.len());
    buf.put_u32_le((FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES + body.len()) as u32);
    buf.put_u16_le(a);
    buf.put_u16_le(b);
    buf.put_u64_le(id);
    buf.put_slice(body);
    buf.freeze()
}

/// The 16-byte prefix of a frame whose body (of `body_bytes`) is sent separately, so large
/// bodies are written with a gather write and never copied.
pub fn frame_prefix(a: u16, b: u16, id: u64, body_bytes: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_BYTES);
    buf.put_u32_le((FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES + body_bytes) as u32);
    buf.put_u16_le(a);
    buf.put_u16_le(b);
    buf.put_u64_le(id);
    buf.freeze()
}

impl RequestHeader {
    /// Encodes a whole request frame.
    pub fn encode(&self, body: &[u8]) -> Bytes {
        encode(self.api, self.version, self.request_id, body)
    }

    /// Splits a whole frame (length prefix included) into its header and body.
    pub fn decode(frame: Bytes) -> Result<(Self, Bytes), DecodeOrFrameError> {
        let (a, b, id, body) = decode(frame)?;
        Ok((
            Self {
                api: a,
                version: b,
                request_id: id,
            },
            body,
        ))
    }

    /// Splits the bytes that followed an already-checked length prefix into header and body.
    pub fn decode_after_prefix(rest: Bytes) -> Result<(Self, Bytes), DecodeOrFrameError> {
        let mut r = Reader::new(rest.clone());
        let header = Self {
            api: r.u16("api")?,
            version: r.u16("version")?,
            request_id: r.u64("request_id")?,
        };
        Ok((
            header,
            rest.slice(FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES..),
        ))
    }
}

impl ResponseHeader {
    /// Encodes a whole response frame.
    pub fn encode(&self, body: &[u8]) -> Bytes {
        encode(self.api, self.error, self.request_id, body)
    }

    /// Splits a whole frame (length prefix included) into its header and body.
    pub fn decode(frame: Bytes) -> Result<(Self, Bytes), DecodeOrFrameError> {
        let (a, b, id, body) = decode(frame)?;
        Ok((
            Self {
                api: a,
                error: b,
                request_id: id,
            },
            body,
        ))
    }
}

/// A frame that failed to split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeOrFrameError {
    /// Framing is wrong.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A field is malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn decode(frame: Bytes) -> Result<(u16, u16, u64, Bytes), DecodeOrFrameError> {
    if frame.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::TooShort(frame.len()).into());
    }
    let mut r = Reader::new(frame.clone());
    let length = r.u32("length")? as usize;
    if length != frame.len() - FRAME_LENGTH_BYTES {
        return Err(FrameError::LengthMismatch {
            claimed: length,
            actual: frame.len() - FRAME_LENGTH_BYTES,
        }
        .into());
    }
    let a = r.u16("api")?;
    let b = r.u16("version")?;
    let id = r.u64("request_id")?;
    Ok((a, b, id, frame.slice(FRAME_HEADER_BYTES..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let h = RequestHeader {
            api: ApiKey::Produce.code(),
            version: 1,
            request_id: 99,
        };
        let f = h.encode(b"body");
        let (back, body) = RequestHeader::decode(f).unwrap();
        assert_eq!(back, h);
        assert_eq!(&body[..], b"body");
        let p = frame_prefix(1, 2, 3, 4);
        let mut whole = p.to_vec();
        whole.extend_from_slice(b"abcd");
        let (rh, body) = ResponseHeader::decode(Bytes::from(whole)).unwrap();
        assert_eq!((rh.api, rh.error, rh.request_id), (1, 2, 3));
        assert_eq!(&body[..], b"abcd");
    }

    #[test]
    fn bad_frames() {
        assert!(matches!(
            check_length_prefix(u32::MAX.to_le_bytes(), 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            check_length_prefix(3u32.to_le_bytes(), 1 << 20),
            Err(FrameError::TooShort(_))
        ));
        assert!(RequestHeader::decode(Bytes::from_static(b"short")).is_err());
        let mut f = RequestHeader {
            api: 1,
            version: 1,
            request_id: 1,
        }
        .encode(b"xy")
        .to_vec();
        f.push(0);
        assert!(matches!(
            RequestHeader::decode(Bytes::from(f)),
            Err(DecodeOrFrameError::Frame(FrameError::LengthMismatch { .. }))
        ));
    }
}
