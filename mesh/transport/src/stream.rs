//! Connections and bidirectional streams: thin wrappers that translate quinn's errors into
//! [`TransportError`] and keep quinn types out of callers' signatures.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use quinn::{
    ConnectionError, ReadError, SendDatagramError, TransportErrorCode, VarInt, WriteError,
};

use crate::{TlsError, TransportError};

/// A cloneable handle to an established QUIC connection; the connection closes when the last
/// handle is dropped or [`Connection::close`] is called.
#[derive(Clone, Debug)]
pub struct Connection(quinn::Connection);

impl Connection {
    pub(crate) fn new(conn: quinn::Connection) -> Self {
        Self(conn)
    }

    /// The peer's current address (it may change if the peer migrates).
    pub fn remote_addr(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// An id unique among this endpoint's live connections, for logs.
    pub fn id(&self) -> usize {
        self.0.stable_id()
    }

    /// Open a bidirectional stream. Waits for stream credit from the peer, which makes
    /// `max_concurrent_bidi_streams` the natural bound on requests in flight.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.0.open_bi().await.map_err(connection_error)?;
        Ok((SendStream(send), RecvStream(recv)))
    }

    /// Accept the peer's next bidirectional stream; `Ok(None)` once the connection was closed on
    /// purpose by either side.
    pub async fn accept_bi(&self) -> Result<Option<(SendStream, RecvStream)>, TransportError> {
        match self.0.accept_bi().await {
            Ok((send, recv)) => Ok(Some((SendStream(send), RecvStream(recv)))),
            Err(ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed) => Ok(None),
            Err(e) => Err(connection_error(e)),
        }
    }

    /// Close the connection at once with an application `code` and `reason`; streams in flight
    /// are abandoned.
    pub fn close(&self, code: u32, reason: &str) {
        self.0.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Wait until the connection is closed, and say why.
    pub async fn closed(&self) -> TransportError {
        connection_error(self.0.closed().await)
    }

    /// Queue an unreliable datagram; it goes out with the next packet or not at all. Never
    /// waits: when the send buffer is full quinn drops the oldest queued datagrams instead.
    /// [`TransportError::TooLong`] if `data` exceeds [`max_datagram_size`](Self::max_datagram_size).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), TransportError> {
        self.0.send_datagram(data).map_err(|e| match e {
            SendDatagramError::TooLarge => TransportError::TooLong {
                limit_bytes: self.0.max_datagram_size().unwrap_or(0),
            },
            SendDatagramError::UnsupportedByPeer => {
                TransportError::InvalidSettings("the peer does not accept datagrams".into())
            }
            SendDatagramError::Disabled => {
                TransportError::InvalidSettings("datagrams are disabled on this endpoint".into())
            }
            SendDatagramError::ConnectionLost(e) => connection_error(e),
        })
    }

    /// The next datagram the peer sent. Fails once the connection is closed (by either side:
    /// [`TransportError::Closed`] or [`TransportError::ClosedByPeer`]) or lost.
    pub async fn read_datagram(&self) -> Result<Bytes, TransportError> {
        self.0.read_datagram().await.map_err(connection_error)
    }

    /// The largest datagram [`send_datagram`](Self::send_datagram) accepts now; it follows
    /// the path MTU. `None` if the peer does not accept datagrams.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.0.max_datagram_size()
    }

    /// A snapshot of the connection's path and UDP counters.
    pub fn stats(&self) -> ConnectionStats {
        let stats = self.0.stats();
        ConnectionStats {
            rtt_us: u64::try_from(stats.path.rtt.as_micros()).unwrap_or(u64::MAX),
            congestion_window_bytes: stats.path.cwnd,
            path_mtu_bytes: stats.path.current_mtu,
            sent_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            sent_bytes: stats.udp_tx.bytes,
            sent_datagrams: stats.udp_tx.datagrams,
            send_calls: stats.udp_tx.ios,
            received_bytes: stats.udp_rx.bytes,
            received_datagrams: stats.udp_rx.datagrams,
            receive_calls: stats.udp_rx.ios,
        }
    }
}

/// Counters of one connection. `sent_datagrams / send_calls` is the GSO batch size and
/// `received_datagrams / receive_calls` the GRO one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Smoothed round-trip time.
    pub rtt_us: u64,
    /// Current congestion window.
    pub congestion_window_bytes: u64,
    /// Current path MTU (UDP payload).
    pub path_mtu_bytes: u16,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// UDP payload bytes sent.
    pub sent_bytes: u64,
    /// UDP datagrams sent.
    pub sent_datagrams: u64,
    /// Send system calls.
    pub send_calls: u64,
    /// UDP payload bytes received.
    pub received_bytes: u64,
    /// UDP datagrams received.
    pub received_datagrams: u64,
    /// Receive system calls.
    pub receive_calls: u64,
}

impl fmt::Display for ConnectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt {} us, cwnd {} B, mtu {} B, lost {}/{} packets, sent {} B in {} datagrams / {} calls, \
             received {} B in {} datagrams / {} calls",
            self.rtt_us,
            self.congestion_window_bytes,
            self.path_mtu_bytes,
            self.lost_packets,
            self.sent_packets,
            self.sent_bytes,
            self.sent_datagrams,
            self.send_calls,
            self.received_bytes,
            self.received_datagrams,
            self.receive_calls,
        )
    }
}

/// The sending half of a bidirectional stream. Dropping it without [`SendStream::finish`] also
/// finishes the stream; use [`SendStream::reset`] to abandon it.
#[derive(Debug)]
pub struct SendStream(quinn::SendStream);

impl SendStream {
    /// Write all chunks, gathered into as few packets as possible without copying.
    /// On return `chunks` are drained (empty).
    pub async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        self.0.write_all_chunks(chunks).await.map_err(write_error)
    }

    /// Write all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), TransportError> {
        self.0.write_all(buf).await.map_err(write_error)
    }

    /// Mark the end of the stream; the data written so far is still delivered.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.0.finish().map_err(|_| TransportError::StreamClosed)
    }

    /// Abandon the stream: unsent data is discarded and the peer's reads fail with `code`.
    pub fn reset(&mut self, code: u32) {
        // Already finished or reset: nothing left to abandon.
        let _ = self.0.reset(VarInt::from_u32(code));
    }
}

/// The receiving half of a bidirectional stream.
///
/// Chunk boundaries do not match the peer's writes: framing belongs to the caller.
#[derive(Debug)]
pub struct RecvStream(quinn::RecvStream);

impl RecvStream {
    /// Read exactly `n` bytes into a fresh buffer; [`TransportError::UnexpectedEnd`] if the
    /// stream ends first. The caller bounds `n` (it allocates up front).
    pub async fn read_exact_bytes(&mut self, n: usize) -> Result<Bytes, TransportError> {
        // Gather quinn's chunks without zero-filling the buffer first; a frame that arrives
        // as one chunk is returned without any copy.
        let mut buf: Option<bytes::BytesMut> = None;
        let mut first: Option<Bytes> = None;
        let mut have = 0;
        while have < n {
            let chunk = self
                .read_chunk(n - have)
                .await?
                .ok_or(TransportError::UnexpectedEnd)?;
            have += chunk.len();
            match (&mut buf, first.take()) {
                (None, None) if have == n => return Ok(chunk),
                (None, None) => first = Some(chunk),
                (None, Some(f)) => {
                    let mut b = bytes::BytesMut::with_capacity(n);
                    b.extend_from_slice(&f);
                    b.extend_from_slice(&chunk);
                    buf = Some(b);
                }
                (Some(b), _) => b.extend_from_slice(&chunk),
            }
        }
        Ok(match (buf, first) {
            (Some(b), _) => b.freeze(),
            (None, Some(f)) => f,
            (None, None) => Bytes::new(),
        })
    }

    /// Fill `buf`; [`TransportError::UnexpectedEnd`] if the stream ends first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.0.read_exact(buf).await.map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(_) => TransportError::UnexpectedEnd,
            quinn::ReadExactError::ReadError(e) => read_error(e),
        })
    }

    /// Read to the end of the stream; [`TransportError::TooLong`] if more than `limit_bytes`
    /// arrive (the stream is then stopped).
    pub async fn read_to_end(&mut self, limit_bytes: usize) -> Result<Bytes, TransportError> {
        // Keep quinn's chunks and copy them once into a buffer of the exact size (a growing
        // Vec would copy large responses several times); a single chunk is not copied at all.
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        while let Some(chunk) = self.read_chunk(usize::MAX).await? {
            total += chunk.len();
            if total > limit_bytes {
                // Tell the peer to stop sending rather than draining what we will not use.
                let _ = self.0.stop(VarInt::from_u32(0));
                return Err(TransportError::TooLong { limit_bytes });
            }
            chunks.push(chunk);
        }
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut buf = bytes::BytesMut::with_capacity(total);
                for c in &chunks {
                    buf.extend_from_slice(c);
                }
                buf.freeze()
            }
        })
    }

    /// Read the next chunk of at most `max` bytes without copying; `None` at the end.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, TransportError> {
        match self.0.read_chunk(max, true).await {
            Ok(chunk) => Ok(chunk.map(|chunk| chunk.bytes)),
            Err(e) => Err(read_error(e)),
        }
    }

    /// Ask the peer to stop sending with `code`; further reads fail.
    pub fn stop(&mut self, code: u32) {
        // Already stopped or finished: nothing to stop.
        let _ = self.0.stop(VarInt::from_u32(code));
    }
}

/// TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100-0x1ff (RFC 9001, section 4.8).
fn is_tls_alert(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

pub(crate) fn connection_error(e: ConnectionError) -> TransportError {
    match e {
        ConnectionError::LocallyClosed => TransportError::Closed,
        ConnectionError::ApplicationClosed(close) => TransportError::ClosedByPeer {
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        ConnectionError::TimedOut => TransportError::Timeout,
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            TransportError::Refused
        }
        ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
            TlsError::Handshake(format!("rejected by peer: {close}")).into()
        }
        ConnectionError::TransportError(error) if is_tls_alert(error.code) => {
            TlsError::Handshake(error.to_string()).into()
        }
        other => TransportError::ConnectionLost(other.to_string()),
    }
}

fn read_error(e: ReadError) -> TransportError {
    match e {
        ReadError::Reset(code) => TransportError::Reset {
            code: code.into_inner(),
        },
        ReadError::ConnectionLost(e) => connection_error(e),
        ReadError::ClosedStream | ReadError::IllegalOrderedRead => TransportError::StreamClosed,
        ReadError::ZeroRttRejected => TlsError::Handshake("0-rtt rejected".to_owned()).into(),
    }
}

fn write_error(e: WriteError) -> TransportError {
    match e {
        WriteError::Stopped(code) => TransportError::Stopped {
            code: code.into_inner(),
        },
        WriteError::ConnectionLost(e) => connection_error(e),
        WriteError::ClosedStream => TransportError::StreamClosed,
        WriteError::ZeroRttRejected => TlsError::Handshake("0-rtt rejected".to_owned()).into(),
    }
}
