//! Endpoints: a [`Server`] accepting connections and a [`Client`] making them, each one UDP
//! socket driven by quinn's endpoint task.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TokioRuntime, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{Mutex, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::stream::{Connection, connection_error};
use crate::tls::{ClientTrust, ServerIdentity};
use crate::{TlsError, TransportError, TransportSettings};

/// Handshaken connections waiting for [`Server::accept`]; handshakes beyond it wait in their
/// tasks, and all of them together are bounded by `max_connections`.
const ACCEPT_QUEUE_LEN: usize = 16;
/// quinn's default upper bound of path MTU discovery (Ethernet minus IP/UDP headers).
const MTU_DISCOVERY_UPPER_BOUND: u16 = 1452;
/// quinn's default largest UDP payload this endpoint accepts.
const MAX_UDP_PAYLOAD_BYTES: u16 = 1472;
/// Datagrams a peer connection buffers each way (received but not yet read, or queued but not
/// yet sent); beyond it quinn drops the oldest. Gossip packets are ~1 KB and read at once, so
/// this is hundreds of packets of slack while bounding what one peer can pin.
const PEER_DATAGRAM_BUFFER_BYTES: usize = 256 * 1024;
/// Concurrent bidirectional streams a peer connection allows at least (one per replicated
/// partition a follower fetches, plus the controller's calls).
const PEER_BIDI_STREAMS_MIN: u32 = 16_384;
/// quinn sends up to 10 segments per GSO call and one call must fit a 64 KiB UDP datagram:
/// above ~6.5 KB the kernel rejects the batch (EMSGSIZE, silently dropped), black-hole
/// detection fires and the path falls back to 1200 bytes. Measured: 8952 ended at 1200 with
/// losses, 6500 held.
const MAX_INITIAL_MTU: u16 = 6500;

/// Socket buffer sizes the kernel granted (Linux reports twice the usable size and caps the
/// request at `net.core.rmem_max` / `wmem_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    /// `SO_RCVBUF` as read back after setting it.
    pub recv_bytes: usize,
    /// `SO_SNDBUF` as read back after setting it.
    pub send_bytes: usize,
}

/// A QUIC server endpoint. Handshakes run in background tasks so a slow or hostile client cannot
/// hold up [`Server::accept`] for others.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    accepted: Mutex<mpsc::Receiver<Connection>>,
    acceptor: JoinHandle<()>,
    buffers: SocketBuffers,
    shutdown_wait: Duration,
    connect_timeout: Duration,
    /// A peer endpoint: it also dials.
    dials: bool,
}

impl Server {
    /// Bind a UDP socket at `addr` and start accepting connections that speak `alpn`.
    /// Must be called within a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &ServerIdentity,
        alpn: &[u8],
        settings: &TransportSettings,
    ) -> Result<Self, TransportError> {
        Self::bind_with(
            addr,
            identity.rustls_config(alpn)?,
            settings,
            Datagrams::Off,
        )
    }

    /// A peer endpoint: as [`bind`](Self::bind) with ALPN `quiver-peer/1`, and every
    /// connecting node must present a certificate issued by a CA `peers` trusts. The same
    /// endpoint dials other peers ([`connect`](Self::connect)) presenting `identity`, so a
    /// node's peer traffic, in and out, uses one UDP port.
    pub fn bind_peer(
        addr: SocketAddr,
        identity: &ServerIdentity,
        peers: &ClientTrust,
        settings: &TransportSettings,
    ) -> Result<Self, TransportError> {
        // Each follower keeps one long-lived stream per partition it fetches from a leader,
        // on the connection that also carries the controller's calls: allow many more
        // streams than a client connection needs, so fetches never starve those calls.
        let mut peer_settings = settings.clone();
        peer_settings.max_concurrent_bidi_streams = settings
            .max_concurrent_bidi_streams
            .max(PEER_BIDI_STREAMS_MIN);
        let settings = &peer_settings;
        let mut server = Self::bind_with(
            addr,
            identity.rustls_peer_config(crate::ALPN_PEER, peers)?,
            settings,
            Datagrams::Peer,
        )?;
        let crypto =
            QuicClientConfig::try_from(peers.rustls_peer_config(crate::ALPN_PEER, identity)?)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let (transport, _) = quinn_configs(settings, Datagrams::Peer)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport);
        server.endpoint.set_default_client_config(client);
        server.connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
        server.dials = true;
        Ok(server)
    }

    /// Dials another peer from this endpoint (a peer endpoint only), like
    /// [`Client::connect`].
    pub async fn connect(
        &self,
        addr: &str,
        server_name: Option<&str>,
    ) -> Result<Connection, TransportError> {
        if !self.dials {
            return Err(TransportError::Connect(
                "this endpoint only accepts connections".into(),
            ));
        }
        // The peer socket is bound to one family: only addresses of that family are reachable.
        let ipv6 = self
            .endpoint
            .local_addr()
            .map(|a| a.is_ipv6())
            .unwrap_or(false);
        dial(
            &self.endpoint,
            addr,
            server_name,
            |c| c.is_ipv6() == ipv6,
            self.connect_timeout,
        )
        .await
    }

    fn bind_with(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        settings: &TransportSettings,
        datagrams: Datagrams,
    ) -> Result<Self, TransportError> {
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let (transport, endpoint_config) = quinn_configs(settings, datagrams)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config
            .transport_config(transport)
            .migration(true)
            .max_incoming(settings.max_connections.max(1));
        let (socket, buffers) = udp_socket(addr, settings.udp_buffer_bytes, false)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(config),
            socket,
            Arc::new(TokioRuntime),
        )?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE_LEN);
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), settings.max_connections, tx));
        Ok(Self {
            endpoint,
            accepted: Mutex::new(rx),
            acceptor,
            buffers,
            shutdown_wait: Duration::from_millis(settings.shutdown_wait_ms),
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            dials: false,
        })
    }

    /// The address the socket is bound to (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The UDP socket buffer sizes the kernel granted.
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Next incoming connection, fully handshaken; `None` when the endpoint is closed.
    /// Handshake failures are logged and skipped; connections beyond `max_connections` are
    /// refused.
    pub async fn accept(&self) -> Option<Connection> {
        self.accepted.lock().await.recv().await
    }

    /// Stop accepting, close every connection with `code` and `reason`, and wait (at most
    /// `shutdown_wait_ms`) for the peers to acknowledge so they see the reason, not a timeout.
    pub async fn shutdown(&self, code: u32, reason: &str) {
        self.endpoint.set_server_config(None);
        self.endpoint
            .close(VarInt::from_u32(code), reason.as_bytes());
        wait_idle(&self.endpoint, self.shutdown_wait).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The accept loop holds an endpoint handle; without this the socket would outlive us.
        self.acceptor.abort();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    max_connections: usize,
    tx: mpsc::Sender<Connection>,
) {
    // Owning the handshake tasks here means aborting this loop aborts them too.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                // Counts connections still handshaking, so the bound holds under a flood.
                if endpoint.open_connections() >= max_connections {
                    tracing::warn!(%remote, max_connections, "refusing connection: at limit");
                    incoming.refuse();
                    continue;
                }
                let tx = tx.clone();
                handshakes.spawn(async move {
                    let connecting = match incoming.accept() {
                        Ok(connecting) => connecting,
                        Err(e) => {
                            tracing::debug!(%remote, error = %e, "incoming connection failed");
                            return;
                        }
                    };
                    match connecting.await {
                        Ok(conn) => {
                            // A closed receiver means the server is gone; the connection drops.
                            let _ = tx.send(Connection::new(conn)).await;
                        }
                        Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

/// A QUIC client endpoint; one endpoint can hold connections to many servers.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    ipv6: bool,
    buffers: SocketBuffers,
    connect_timeout: Duration,
    shutdown_wait: Duration,
}

impl Client {
    /// Bind an ephemeral UDP port, dual-stack `[::]:0` when the host has IPv6, else
    /// `0.0.0.0:0`, and use `trust` and `alpn` for every connection.
    /// Must be called within a tokio runtime.
    pub fn new(
        trust: &ClientTrust,
        alpn: &[u8],
        settings: &TransportSettings,
    ) -> Result<Self, TransportError> {
        Self::new_with(trust.rustls_config(alpn)?, settings, Datagrams::Off)
    }

    /// A node's endpoint towards its peers: ALPN `quiver-peer/1`, servers verified against
    /// `trust`, and `identity` presented as the client certificate.
    pub fn new_peer(
        trust: &ClientTrust,
        identity: &ServerIdentity,
        settings: &TransportSettings,
    ) -> Result<Self, TransportError> {
        Self::new_with(
            trust.rustls_peer_config(crate::ALPN_PEER, identity)?,
            settings,
            Datagrams::Peer,
        )
    }

    fn new_with(
        tls: rustls::ClientConfig,
        settings: &TransportSettings,
        datagrams: Datagrams,
    ) -> Result<Self, TransportError> {
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let (transport, endpoint_config) = quinn_configs(settings, datagrams)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        let ((socket, buffers), ipv6) = match udp_socket(v6, settings.udp_buffer_bytes, true) {
            Ok(bound) => (bound, true),
            Err(e) => {
                tracing::debug!(error = %e, "no ipv6 socket, falling back to ipv4");
                let v4 = SocketAddr::from(([0, 0, 0, 0], 0));
                (udp_socket(v4, settings.udp_buffer_bytes, false)?, false)
            }
        };
        let mut endpoint =
            quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(TokioRuntime))?;
        endpoint.set_default_client_config(config);
        Ok(Self {
            endpoint,
            ipv6,
            buffers,
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            shutdown_wait: Duration::from_millis(settings.shutdown_wait_ms),
        })
    }

    /// The UDP socket buffer sizes the kernel granted.
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Resolve `addr` ("host:port", "[v6]:port") and connect with TLS server name `server_name`
    /// (default: the host part, or "localhost" for IP literals, matching development
    /// certificates). Resolution and handshake together are bounded by `connect_timeout_ms`.
    pub async fn connect(
        &self,
        addr: &str,
        server_name: Option<&str>,
    ) -> Result<Connection, TransportError> {
        // A v4-only socket cannot reach v6 addresses; a dual-stack one reaches both.
        let ipv6 = self.ipv6;
        dial(
            &self.endpoint,
            addr,
            server_name,
            |c| ipv6 || c.is_ipv4(),
            self.connect_timeout,
        )
        .await
    }

    /// Close every connection of this endpoint with `code` and `reason`, and wait (bounded) for
    /// the servers to acknowledge.
    pub async fn shutdown(&self, code: u32, reason: &str) {
        self.endpoint
            .close(VarInt::from_u32(code), reason.as_bytes());
        wait_idle(&self.endpoint, self.shutdown_wait).await;
    }
}

/// The host part of "host:port" as a TLS name; IP literals map to "localhost".
/// Resolves `addr` (taking the first address `reachable` accepts) and connects from
/// `endpoint` with TLS server name `server_name` (default: the host part, or "localhost" for IP
/// literals, matching development certificates); resolution and handshake are bounded by
/// `timeout` together.
async fn dial(
    endpoint: &quinn::Endpoint,
    addr: &str,
    server_name: Option<&str>,
    reachable: impl Fn(&SocketAddr) -> bool,
    timeout: Duration,
) -> Result<Connection, TransportError> {
    let server_name = match server_name {
        Some(name) => name.to_owned(),
        None => default_server_name(addr),
    };
    let attempt = async {
        let remote = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| TransportError::Resolve(format!("{addr}: {e}")))?
            .find(|c| reachable(c))
            .ok_or_else(|| TransportError::Resolve(format!("{addr}: no reachable address")))?;
        let connecting = endpoint
            .connect(remote, &server_name)
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        let conn = connecting.await.map_err(connection_error)?;
        Ok(Connection::new(conn))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| TransportError::Timeout)?
}

fn default_server_name(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _port)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        "localhost".to_owned()
    } else {
        host.to_owned()
    }
}

async fn wait_idle(endpoint: &quinn::Endpoint, limit: Duration) {
    if tokio::time::timeout(limit, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::debug!(
            open_connections = endpoint.open_connections(),
            "endpoint not idle after shutdown wait"
        );
    }
}

/// Whether an endpoint's connections carry QUIC datagrams (RFC 9221).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datagrams {
    /// Client-facing: nothing reads datagrams there, so none are accepted (a client could
    /// otherwise fill quinn's default 1.25 MB buffer on every connection).
    Off,
    /// Peer endpoints: gossip travels as datagrams, buffered up to
    /// [`PEER_DATAGRAM_BUFFER_BYTES`] each way.
    Peer,
}

/// quinn's per-connection and per-endpoint configs from the settings.
fn quinn_configs(
    settings: &TransportSettings,
    datagrams: Datagrams,
) -> Result<(Arc<quinn::TransportConfig>, EndpointConfig), TransportError> {
    let varint = |name: &str, value: u64| {
        VarInt::from_u64(value)
            .map_err(|_| TransportError::InvalidSettings(format!("{name} {value} is too large")))
    };
    let initial_mtu = initial_mtu(settings);
    let mut config = quinn::TransportConfig::default();
    config
        .stream_receive_window(varint(
            "stream_receive_window_bytes",
            settings.stream_receive_window_bytes,
        )?)
        .receive_window(varint(
            "receive_window_bytes",
            settings.receive_window_bytes,
        )?)
        .send_window(settings.send_window_bytes)
        .max_concurrent_bidi_streams(settings.max_concurrent_bidi_streams.into())
        .max_concurrent_uni_streams(settings.max_concurrent_uni_streams.into())
        .keep_alive_interval(
            (settings.keep_alive_ms > 0).then(|| Duration::from_millis(settings.keep_alive_ms)),
        )
        .max_idle_timeout(if settings.idle_timeout_ms == 0 {
            None
        } else {
            Some(IdleTimeout::from(varint(
                "idle_timeout_ms",
                settings.idle_timeout_ms,
            )?))
        })
        .initial_mtu(initial_mtu);
    // Let MTU discovery keep a configured jumbo initial MTU instead of capping it at Ethernet.
    let mut mtu_discovery = MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(initial_mtu.max(MTU_DISCOVERY_UPPER_BOUND));
    config.mtu_discovery_config(Some(mtu_discovery));
    match datagrams {
        Datagrams::Off => {
            config.datagram_receive_buffer_size(None);
        }
        Datagrams::Peer => {
            config
                .datagram_receive_buffer_size(Some(PEER_DATAGRAM_BUFFER_BYTES))
                .datagram_send_buffer_size(PEER_DATAGRAM_BUFFER_BYTES);
        }
    }

    let mut endpoint = EndpointConfig::default();
    // Advertise that we accept datagrams as large as our own initial MTU, else the peer
    // (configured alike) could never use it.
    endpoint
        .max_udp_payload_size(initial_mtu.max(MAX_UDP_PAYLOAD_BYTES))
        .map_err(|e| TransportError::InvalidSettings(e.to_string()))?;
    Ok((Arc::new(config), endpoint))
}

fn initial_mtu(settings: &TransportSettings) -> u16 {
    if settings.initial_mtu > MAX_INITIAL_MTU {
        tracing::warn!(
            requested = settings.initial_mtu,
            used = MAX_INITIAL_MTU,
            "initial_mtu clamped to what one GSO batch can carry"
        );
    }
    settings.initial_mtu.min(MAX_INITIAL_MTU)
}

/// A non-blocking UDP socket with enlarged buffers. A kernel cap on the buffers is not an error:
/// the sizes granted are logged and returned.
fn udp_socket(
    addr: SocketAddr,
    buffer_bytes: usize,
    dual_stack: bool,
) -> Result<(std::net::UdpSocket, SocketBuffers), TransportError> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer_bytes) {
        tracing::debug!(error = %e, buffer_bytes, "cannot set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer_bytes) {
        tracing::debug!(error = %e, buffer_bytes, "cannot set SO_SNDBUF");
    }
    let buffers = SocketBuffers {
        recv_bytes: socket.recv_buffer_size()?,
        send_bytes: socket.send_buffer_size()?,
    };
    tracing::debug!(
        requested_bytes = buffer_bytes,
        recv_bytes = buffers.recv_bytes,
        send_bytes = buffers.send_bytes,
        "udp socket buffers granted"
    );
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok((socket.into(), buffers))
}

#[cfg(test)]
mod tests {
    use super::default_server_name;

    #[test]
    fn server_name_defaults_to_host_or_localhost() {
        assert_eq!(default_server_name("broker-1.lan:7000"), "broker-1.lan");
        assert_eq!(default_server_name("127.0.0.1:7000"), "localhost");
        assert_eq!(default_server_name("[::1]:7000"), "localhost");
        assert_eq!(default_server_name("localhost:7000"), "localhost");
    }
}

#[cfg(test)]
mod datagram_tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;

    use super::*;

    /// Peer endpoints carry datagrams both ways (gossip); client-facing ones accept none, so a
    /// client cannot fill datagram buffers that nothing reads.
    #[tokio::test]
    async fn only_peer_connections_carry_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (a, ca) =
            ServerIdentity::load_or_generate_dev_with_ca(&dir.path().join("a"), &ca_dir, &[])
                .unwrap();
        let (b, _) =
            ServerIdentity::load_or_generate_dev_with_ca(&dir.path().join("b"), &ca_dir, &[])
                .unwrap();
        let trust = ClientTrust::from_ca_file(&ca).unwrap();
        let settings = TransportSettings::default();
        let limit = Duration::from_secs(10);

        let peer_a =
            Server::bind_peer("127.0.0.1:0".parse().unwrap(), &a, &trust, &settings).unwrap();
        let peer_b =
            Server::bind_peer("127.0.0.1:0".parse().unwrap(), &b, &trust, &settings).unwrap();
        let addr_a = peer_a.local_addr().unwrap().to_string();
        let dialled = peer_b.connect(&addr_a, None).await.unwrap();
        let accepted = tokio::time::timeout(limit, peer_a.accept())
            .await
            .unwrap()
            .unwrap();
        assert!(dialled.max_datagram_size().unwrap() >= 1150);
        dialled.send_datagram(Bytes::from_static(b"ping")).unwrap();
        let got = tokio::time::timeout(limit, accepted.read_datagram()).await;
        assert_eq!(&got.unwrap().unwrap()[..], b"ping");
        accepted.send_datagram(Bytes::from_static(b"ack")).unwrap();
        let got = tokio::time::timeout(limit, dialled.read_datagram()).await;
        assert_eq!(&got.unwrap().unwrap()[..], b"ack");

        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &a,
            crate::ALPN_CLIENT,
            &settings,
        )
        .unwrap();
        let client = Client::new(&trust, crate::ALPN_CLIENT, &settings).unwrap();
        let conn = client
            .connect(&server.local_addr().unwrap().to_string(), None)
            .await
            .unwrap();
        assert_eq!(conn.max_datagram_size(), None);
        assert!(matches!(
            conn.send_datagram(Bytes::from_static(b"ping")),
            Err(TransportError::InvalidSettings(_))
        ));
    }
}
