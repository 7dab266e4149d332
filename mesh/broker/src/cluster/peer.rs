//! The peer protocol's two ends: [`PeerClient`] (one QUIC connection per peer, one request
//! per stream) and the request loop of the peer endpoint, which hands each request to a
//! [`PeerHandler`]. Replica fetches may instead travel on one long-lived stream per
//! follower and partition ([`PeerSession`]): a series of requests, each answered before the
//! next is sent.
//!
//! Besides requests, peer connections carry unreliable QUIC datagrams (gossip): whatever
//! arrives on any peer connection, accepted or dialled, goes to one [`DatagramSink`], and
//! [`PeerClient::send_datagram`] sends over the cached connection.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quiver_proto::codec::Writer;
use quiver_proto::frame::{FRAME_LENGTH_BYTES, check_length_prefix};
use quiver_proto::peer::PeerApi;
use quiver_proto::{ErrorCode, RequestHeader, ResponseHeader};
use quiver_transport::{Connection, RecvStream, SendStream, Server, TransportError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Largest peer frame, either way (a Raft snapshot chunk, a batch of log entries).
pub const PEER_FRAME_BYTES_MAX: usize = 64 << 20;
/// How long a peer may take to send a whole request.
const PEER_REQUEST_READ: Duration = Duration::from_secs(10);
/// How long a replica fetch session may wait for its next request before the leader ends it.
const SESSION_IDLE: Duration = Duration::from_secs(30);

/// A peer call failed before an answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Connecting, sending or receiving failed.
    #[error("peer {addr}: {reason}")]
    Transport {
        /// The peer.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("peer {0}: no answer in time")]
    Timeout(String),
}

/// Where datagrams from peers go: one receiver, attached once (by the gossip layer), shared by
/// the [`PeerClient`] and the accept loop. Until a receiver is attached, datagrams are dropped.
#[derive(Clone, Debug, Default)]
pub struct DatagramSink(Arc<OnceLock<mpsc::Sender<Bytes>>>);

impl DatagramSink {
    /// Sends every datagram from now on to `tx`; `false` (and `tx` unused) if a receiver is
    /// attached already.
    pub fn attach(&self, tx: mpsc::Sender<Bytes>) -> bool {
        self.0.set(tx).is_ok()
    }

    /// Hands one datagram over without waiting: datagrams are unreliable anyway, and a slow
    /// receiver must not hold up the connection's reader.
    fn deliver(&self, datagram: Bytes) {
        let Some(tx) = self.0.get() else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(datagram) {
            tracing::debug!("datagram receiver is full, datagram dropped");
        }
    }

    /// Reads `conn`'s datagrams into the sink until the connection closes.
    async fn read_from(self, conn: Connection) {
        while let Ok(datagram) = conn.read_datagram().await {
            self.deliver(datagram);
        }
    }
}

/// A cached connection and the task reading its datagrams. Dropping it stops the reader, so
/// the reader's handle never keeps a forgotten connection open.
struct Cached {
    conn: Connection,
    reader: JoinHandle<()>,
}

impl Drop for Cached {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Calls to peers, over one cached connection per address.
pub struct PeerClient {
    /// The node's peer endpoint: it dials from the port it listens on.
    endpoint: Arc<Server>,
    conns: tokio::sync::Mutex<HashMap<String, Cached>>,
    datagrams: DatagramSink,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A client dialling from the node's peer endpoint (`Server::bind_peer`).
    pub fn new(endpoint: Arc<Server>) -> Self {
        Self {
            endpoint,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            datagrams: DatagramSink::default(),
        }
    }

    /// The sink that datagrams of this client's connections go to; pass it to
    /// [`serve_with_datagrams`] so that accepted connections feed the same one.
    pub fn datagram_sink(&self) -> DatagramSink {
        self.datagrams.clone()
    }

    async fn connection(&self, addr: &str) -> Result<Connection, PeerError> {
        if let Some(c) = self.conns.lock().await.get(addr) {
            return Ok(c.conn.clone());
        }
        // Connect without holding the map: a dead peer's handshake must not hold up calls
        // to the live ones (a controller election needs them at once).
        let c = self
            .endpoint
            .connect(addr, None)
            .await
            .map_err(|e| PeerError::Transport {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let mut conns = self.conns.lock().await;
        // Two calls may have connected at once: keep the first, close the other.
        if let Some(existing) = conns.get(addr) {
            c.close(0, "duplicate");
            return Ok(existing.conn.clone());
        }
        let reader = tokio::spawn(self.datagrams.clone().read_from(c.clone()));
        conns.insert(
            addr.to_string(),
            Cached {
                conn: c.clone(),
                reader,
            },
        );
        Ok(c)
    }

    /// Sends one datagram to the peer at `addr`, dialling it first if there is no connection
    /// yet (that wait is bounded by the endpoint's connect timeout). Delivery is not
    /// confirmed; a datagram larger than the connection's current limit fails with a
    /// transport error and leaves the connection in place.
    pub async fn send_datagram(&self, addr: &str, datagram: Bytes) -> Result<(), PeerError> {
        let conn = self.connection(addr).await?;
        match conn.send_datagram(datagram) {
            Ok(()) => Ok(()),
            Err(e) => {
                if !matches!(e, TransportError::TooLong { .. }) {
                    // The next datagram connects anew (the peer may have restarted).
                    self.forget(addr).await;
                }
                Err(PeerError::Transport {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Drops the cached connection to `addr`: the next call dials anew (the peer may have
    /// restarted).
    pub async fn forget(&self, addr: &str) {
        self.conns.lock().await.remove(addr);
    }

    /// Opens a long-lived stream to `addr` for a series of replica fetches (see
    /// [`PeerSession`]).
    pub async fn open_session(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<PeerSession, PeerError> {
        let attempt = async {
            let conn = self.connection(addr).await?;
            let (send, recv) = conn.open_bi().await.map_err(|e| PeerError::Transport {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
            Ok(PeerSession {
                addr: addr.to_string(),
                send,
                recv,
            })
        };
        let r = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Timeout(addr.to_string())),
        };
        if r.is_err() {
            self.forget(addr).await;
        }
        r
    }

    /// Sends one request and returns the answer's code and body (on an error code, the body
    /// is the error's own: a message string, and for `not_controller` a leader hint).
    pub async fn call(
        &self,
        addr: &str,
        api: PeerApi,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(ErrorCode, Bytes), PeerError> {
        let attempt = async {
            let conn = self.connection(addr).await?;
            let transport = |e: quiver_transport::TransportError| PeerError::Transport {
                addr: addr.to_string(),
                reason: e.to_string(),
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(transport)?;
            let frame = RequestHeader {
                api: api.code(),
                version: 1,
                request_id: 0,
            }
            .encode(body);
            send.write_chunks(&mut [frame]).await.map_err(transport)?;
            send.finish().map_err(transport)?;
            let frame = read_frame(&mut recv)
                .await
                .map_err(|reason| PeerError::Transport {
                    addr: addr.to_string(),
                    reason,
                })?;
            let (header, body) =
                ResponseHeader::decode(frame).map_err(|e| PeerError::Transport {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            Ok((ErrorCode::from_code(header.error), body))
        };
        let r = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Timeout(addr.to_string())),
        };
        if r.is_err() {
            // The next call connects anew (the peer may have restarted).
            self.forget(addr).await;
        }
        r
    }

    /// Forgets every connection (the endpoint itself is shut down by its owner).
    pub async fn shutdown(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            c.conn.close(0, "node shutting down");
        }
    }
}

/// One follower's long-lived stream to its leader for a partition's replica fetches: each
/// request is written without finishing the stream and answered on it, in order. Dropping
/// the session finishes the stream, which ends it on the leader.
#[derive(Debug)]
pub struct PeerSession {
    addr: String,
    send: SendStream,
    recv: RecvStream,
}

impl PeerSession {
    /// The peer this session is with.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request on the session and waits for its answer. After an error the
    /// session is unusable (the answer may still be on its way): drop it and open another.
    pub async fn call(
        &mut self,
        api: PeerApi,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(ErrorCode, Bytes), PeerError> {
        let addr = self.addr.clone();
        let transport = |reason: String| PeerError::Transport {
            addr: addr.clone(),
            reason,
        };
        let attempt = async {
            let frame = RequestHeader {
                api: api.code(),
                version: 1,
                request_id: 0,
            }
            .encode(body);
            self.send
                .write_chunks(&mut [frame])
                .await
                .map_err(|e| transport(e.to_string()))?;
            let frame = read_frame(&mut self.recv).await.map_err(&transport)?;
            let (header, body) =
                ResponseHeader::decode(frame).map_err(|e| transport(e.to_string()))?;
            Ok((ErrorCode::from_code(header.error), body))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Timeout(self.addr.clone())),
        }
    }
}

/// The next frame of a session, or `None` when the peer finished the stream between frames.
async fn read_next_frame(recv: &mut RecvStream) -> Result<Option<Bytes>, String> {
    let Some(first) = recv
        .read_chunk(FRAME_LENGTH_BYTES)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    prefix[..first.len()].copy_from_slice(&first);
    if first.len() < FRAME_LENGTH_BYTES {
        recv.read_exact(&mut prefix[first.len()..])
            .await
            .map_err(|e| e.to_string())?;
    }
    read_frame_after(recv, prefix).await.map(Some)
}

async fn read_frame(recv: &mut RecvStream) -> Result<Bytes, String> {
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    read_frame_after(recv, prefix).await
}

/// The rest of a frame whose length prefix was read.
async fn read_frame_after(
    recv: &mut RecvStream,
    prefix: [u8; FRAME_LENGTH_BYTES],
) -> Result<Bytes, String> {
    let length = check_length_prefix(prefix, PEER_FRAME_BYTES_MAX).map_err(|e| e.to_string())?;
    let rest = recv
        .read_exact_bytes(length)
        .await
        .map_err(|e| e.to_string())?;
    let mut frame = bytes::BytesMut::with_capacity(FRAME_LENGTH_BYTES + length);
    frame.extend_from_slice(&prefix);
    frame.extend_from_slice(&rest);
    Ok(frame.freeze())
}

/// An answer: a code and a body.
#[derive(Debug)]
pub struct PeerAnswer {
    /// `None` on success.
    pub code: ErrorCode,
    /// The body.
    pub body: Bytes,
}

impl PeerAnswer {
    /// Success with `body`.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self {
            code: ErrorCode::None,
            body: body.into(),
        }
    }

    /// A failure with a message.
    pub fn err(code: ErrorCode, message: &str) -> Self {
        let mut w = Writer::new();
        w.string(message);
        Self {
            code,
            body: w.into_bytes().freeze(),
        }
    }
}

/// What serves the peer endpoint's requests.
pub trait PeerHandler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        self: Arc<Self>,
        api: PeerApi,
        body: Bytes,
    ) -> impl std::future::Future<Output = PeerAnswer> + Send;
}

/// Accepts peer connections until the endpoint closes; datagrams they carry are dropped.
pub async fn serve<H: PeerHandler>(server: Arc<Server>, handler: Arc<H>) {
    serve_with_datagrams(server, handler, DatagramSink::default()).await;
}

/// Accepts peer connections until the endpoint closes, serving requests with `handler` and
/// handing datagrams to `datagrams` (usually [`PeerClient::datagram_sink`]).
pub async fn serve_with_datagrams<H: PeerHandler>(
    server: Arc<Server>,
    handler: Arc<H>,
    datagrams: DatagramSink,
) {
    while let Some(conn) = server.accept().await {
        let handler = handler.clone();
        let datagrams = datagrams.clone();
        tokio::spawn(async move {
            let requests = async {
                while let Ok(Some((send, recv))) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(handler.clone(), send, recv));
                }
            };
            // Both loops end when the connection closes.
            tokio::join!(requests, datagrams.read_from(conn.clone()));
        });
    }
}

async fn serve_stream<H: PeerHandler>(handler: Arc<H>, mut send: SendStream, mut recv: RecvStream) {
    let frame = match tokio::time::timeout(PEER_REQUEST_READ, read_frame(&mut recv)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            return answer(&mut send, 0, PeerAnswer::err(ErrorCode::InvalidRequest, &e)).await;
        }
        Err(_) => {
            return answer(
                &mut send,
                0,
                PeerAnswer::err(ErrorCode::RequestTimedOut, "request not received in time"),
            )
            .await;
        }
    };
    let (header, body) = match RequestHeader::decode(frame) {
        Ok(h) => h,
        Err(e) => {
            return answer(
                &mut send,
                0,
                PeerAnswer::err(ErrorCode::InvalidRequest, &e.to_string()),
            )
            .await;
        }
    };
    let a = match PeerApi::from_code(header.api) {
        Some(PeerApi::ReplicaFetch) => {
            let a = handler.clone().handle(PeerApi::ReplicaFetch, body).await;
            return fetch_session(handler, send, recv, a).await;
        }
        Some(api) => handler.handle(api, body).await,
        None => PeerAnswer::err(
            ErrorCode::UnsupportedApi,
            &format!("peer api {} is not supported", header.api),
        ),
    };
    answer(&mut send, header.api, a).await;
}

/// A replica fetch stream: answers `first`, then every further ReplicaFetch the follower
/// sends on the stream, in order, until it finishes the stream (or goes quiet for
/// `SESSION_IDLE`). A follower that sends one request and finishes gets one answer, as on
/// any other stream.
async fn fetch_session<H: PeerHandler>(
    handler: Arc<H>,
    mut send: SendStream,
    mut recv: RecvStream,
    first: PeerAnswer,
) {
    let api = PeerApi::ReplicaFetch.code();
    if !write_answer(&mut send, api, first).await {
        return;
    }
    loop {
        let frame = match tokio::time::timeout(SESSION_IDLE, read_next_frame(&mut recv)).await {
            Ok(Ok(Some(f))) => f,
            // Finished between requests, or idle: the session ends.
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => {
                return answer(
                    &mut send,
                    api,
                    PeerAnswer::err(ErrorCode::InvalidRequest, &e),
                )
                .await;
            }
        };
        let a = match RequestHeader::decode(frame) {
            Err(e) => PeerAnswer::err(ErrorCode::InvalidRequest, &e.to_string()),
            Ok((header, _)) if header.api != api => {
                return answer(
                    &mut send,
                    header.api,
                    PeerAnswer::err(
                        ErrorCode::InvalidRequest,
                        &format!(
                            "peer api {} on a replica fetch stream, which carries fetches only",
                            header.api
                        ),
                    ),
                )
                .await;
            }
            Ok((_, body)) => handler.clone().handle(PeerApi::ReplicaFetch, body).await,
        };
        if !write_answer(&mut send, api, a).await {
            return;
        }
    }
    let _ = send.finish();
}

/// Writes one answer frame and leaves the stream open; `false` if the peer is gone or does
/// not take the answer within `PEER_REQUEST_READ` (the stream is then reset).
async fn write_answer(send: &mut SendStream, api: u16, a: PeerAnswer) -> bool {
    let frame = ResponseHeader {
        api,
        error: a.code.code(),
        request_id: 0,
    }
    .encode(&a.body);
    match tokio::time::timeout(PEER_REQUEST_READ, send.write_chunks(&mut [frame])).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            send.reset(0);
            false
        }
    }
}

async fn answer(send: &mut SendStream, api: u16, a: PeerAnswer) {
    if write_answer(send, api, a).await {
        let _ = send.finish();
    }
}
