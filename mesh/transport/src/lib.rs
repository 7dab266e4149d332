//! Quiver's QUIC transport: endpoints, TLS identities and byte streams.
//!
//! Architecture Invariant: this is the only crate of the workspace that names `quinn`, `rustls`
//! or `rcgen`, and it knows nothing about frames or messages (`quiver-proto` owns those). It
//! moves bytes over bidirectional QUIC streams and hands out small wrappers so that the rest of
//! the project never sees a quinn type.
//!
//! Choices that follow the cluster design notes (section 3):
//! - TLS 1.3 only, the `ring` provider named explicitly, ALPN on both sides, and the server config
//!   built from a plain `rustls::ServerConfig` so that 0-RTT stays disabled (no replay concerns
//!   for produce requests).
//! - The client verifies the server against a CA file (webpki); there is no way to skip
//!   verification.
//! - Flow-control windows are bounded at the connection level (quinn's default is unbounded, a
//!   memory-exhaustion risk for client-facing endpoints) and UDP socket buffers are enlarged
//!   because on loopback most loss is receive-buffer overflow.
//! - A node without a configured certificate generates a development CA once and reuses it
//!   (trust-on-first-use), see [`ServerIdentity::load_or_generate_dev`].

#![forbid(unsafe_code)]

mod endpoint;
mod stream;
mod tls;

use std::path::PathBuf;

pub use endpoint::{Client, Server, SocketBuffers};
pub use stream::{Connection, ConnectionStats, RecvStream, SendStream};
pub use tls::{ClientTrust, ServerIdentity};

/// ALPN of client-facing connections (producers, consumers, admin tools).
pub const ALPN_CLIENT: &[u8] = b"quiver/1";
/// ALPN of broker-to-broker connections, kept apart so a client can never pose as a peer.
pub const ALPN_PEER: &[u8] = b"quiver-peer/1";

const MIB: u64 = 1024 * 1024;

/// Limits and windows of one endpoint and the connections it makes or accepts.
///
/// The defaults suit a client-facing endpoint on loopback or a LAN: per-stream windows large
/// enough for ~1 GB/s at 4 ms RTT, but the connection-level windows are bounded so that one
/// connection can pin at most `receive_window_bytes` of receive buffers and `send_window_bytes`
/// of unacknowledged data. Peer endpoints may raise them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// Bytes a peer may send on one stream beyond what the application has read.
    pub stream_receive_window_bytes: u64,
    /// Bytes a peer may send on all streams of a connection beyond what has been read.
    pub receive_window_bytes: u64,
    /// Unacknowledged bytes this side keeps in flight on a connection.
    pub send_window_bytes: u64,
    /// Bidirectional streams the peer may have open at once (the in-flight request bound).
    pub max_concurrent_bidi_streams: u32,
    /// Unidirectional streams the peer may have open at once (0: none accepted).
    pub max_concurrent_uni_streams: u32,
    /// Interval of keep-alive packets; keeps NAT bindings and idle connections alive (0: off).
    pub keep_alive_ms: u64,
    /// A connection with no traffic for this long is closed (0: never, not recommended).
    pub idle_timeout_ms: u64,
    /// Requested `SO_RCVBUF` and `SO_SNDBUF`; the kernel may grant less (`net.core.rmem_max`).
    pub udp_buffer_bytes: usize,
    /// UDP payload size used from the start, before path MTU discovery; raise it only when the
    /// path is known to carry it (loopback, jumbo-frame LANs). Values below 1200 count as 1200;
    /// values above 6500 count as 6500 (larger ones overflow quinn's GSO batches and collapse
    /// to 1200 after black-hole detection).
    pub initial_mtu: u16,
    /// Server only: connections beyond this many (including handshakes) are refused.
    pub max_connections: usize,
    /// Client only: bound on name resolution plus the handshake. QUIC gets no reset from a
    /// dead process (an ICMP error is not acted on), so a dead node costs this much per
    /// attempt: short enough for failover, long enough for a handshake across a WAN.
    pub connect_timeout_ms: u64,
    /// Bound on waiting for closed connections to drain in `shutdown`.
    pub shutdown_wait_ms: u64,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            stream_receive_window_bytes: 4 * MIB,
            receive_window_bytes: 32 * MIB,
            send_window_bytes: 32 * MIB,
            max_concurrent_bidi_streams: 256,
            max_concurrent_uni_streams: 0,
            keep_alive_ms: 10_000,
            idle_timeout_ms: 30_000,
            udp_buffer_bytes: 8 * MIB as usize,
            initial_mtu: 1200,
            max_connections: 1024,
            connect_timeout_ms: 3_000,
            shutdown_wait_ms: 3_000,
        }
    }
}

/// Errors of endpoints, connections and streams.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection failed: network error, protocol violation or stateless reset.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The connection or endpoint was closed by this side.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection on purpose.
    #[error("connection closed by peer with code {code}: {reason}")]
    ClosedByPeer {
        /// Application error code sent by the peer.
        code: u64,
        /// Reason sent by the peer (lossily decoded as UTF-8).
        reason: String,
    },
    /// The server refused the connection (for example at its connection limit).
    #[error("connection refused by server")]
    Refused,
    /// Connecting took too long, or the connection was idle past its timeout.
    #[error("timed out")]
    Timeout,
    /// The stream carried more than the caller's limit.
    #[error("stream longer than {limit_bytes} bytes")]
    TooLong {
        /// The limit that was exceeded.
        limit_bytes: usize,
    },
    /// The stream ended before the expected number of bytes arrived.
    #[error("stream ended early")]
    UnexpectedEnd,
    /// The peer stopped reading the stream this side writes.
    #[error("stream stopped by peer with code {code}")]
    Stopped {
        /// Application error code sent by the peer.
        code: u64,
    },
    /// The peer reset the stream this side reads.
    #[error("stream reset by peer with code {code}")]
    Reset {
        /// Application error code sent by the peer.
        code: u64,
    },
    /// The stream was already finished, reset or stopped by this side.
    #[error("stream already closed")]
    StreamClosed,
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Certificates, keys or the TLS handshake failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address did not resolve to a usable socket address.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The settings are out of range for QUIC.
    #[error("invalid transport settings: {0}")]
    InvalidSettings(String),
    /// The connection attempt could not start (for example an invalid server name).
    #[error("cannot connect: {0}")]
    Connect(String),
}

/// Errors of certificates, keys and TLS handshakes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid PEM or does not hold the expected item.
    #[error("invalid pem in {path}: {reason}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificates(PathBuf),
    /// Generating the development CA or server certificate failed.
    #[error("cannot generate certificate: {0}")]
    Generate(String),
    /// rustls rejected the certificates, key or protocol configuration.
    #[error("invalid tls configuration: {0}")]
    Config(String),
    /// The TLS handshake failed (untrusted certificate, wrong name, no common ALPN).
    #[error("tls handshake failed: {0}")]
    Handshake(String),
}
