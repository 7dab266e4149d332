//! End-to-end tests of the transport over real quinn endpoints on loopback.
//!
//! Every test starts its own server on port 0 with a development CA generated in a temporary
//! directory, so tests share nothing and can run in parallel. Each body runs under `bounded`,
//! which fails the test instead of hanging if a handshake or stream stalls. Nothing here asserts
//! on speed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use quiver_transport::{
    ALPN_CLIENT, ALPN_PEER, Client, ClientTrust, Connection, RecvStream, SendStream, Server,
    ServerIdentity, TransportError, TransportSettings,
};
use tempfile::TempDir;

const TEST_LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(body: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .map_err(|_| anyhow!("test did not finish within {TEST_LIMIT:?}"))?
}

/// A server with its own development CA.
struct Node {
    server: Arc<Server>,
    addr: SocketAddr,
    ca: PathBuf,
    _dir: TempDir,
}

impl Node {
    fn start(bind: &str, alpn: &[u8], settings: &TransportSettings) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (identity, ca) = ServerIdentity::load_or_generate_dev(dir.path(), &[])?;
        let server = Server::bind(bind.parse()?, &identity, alpn, settings)?;
        let addr = server.local_addr()?;
        Ok(Self {
            server: Arc::new(server),
            addr,
            ca,
            _dir: dir,
        })
    }

    /// Start a server that echoes every stream back, chunk by chunk.
    fn echo(bind: &str) -> Result<Self> {
        let node = Self::start(bind, ALPN_CLIENT, &TransportSettings::default())?;
        let server = Arc::clone(&node.server);
        tokio::spawn(async move {
            while let Some(conn) = server.accept().await {
                tokio::spawn(serve_echo(conn));
            }
        });
        Ok(node)
    }

    async fn connect(&self, alpn: &[u8]) -> Result<(Client, Connection)> {
        let client = client(&self.ca, alpn)?;
        let conn = client.connect(&self.addr.to_string(), None).await?;
        Ok((client, conn))
    }
}

fn client(ca: &Path, alpn: &[u8]) -> Result<Client> {
    let trust = ClientTrust::from_ca_file(ca)?;
    Ok(Client::new(&trust, alpn, &TransportSettings::default())?)
}

async fn serve_echo(conn: Connection) {
    while let Ok(Some((send, recv))) = conn.accept_bi().await {
        tokio::spawn(echo_stream(send, recv));
    }
}

async fn echo_stream(mut send: SendStream, mut recv: RecvStream) -> Result<()> {
    while let Some(chunk) = recv.read_chunk(64 * 1024).await? {
        send.write_chunks(&mut [chunk]).await?;
    }
    Ok(send.finish()?)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Send `payload` in 16 KiB chunks over a new stream and return the echo.
async fn round_trip(conn: &Connection, payload: &[u8]) -> Result<Bytes> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut chunks: Vec<Bytes> = payload
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    send.write_chunks(&mut chunks).await?;
    send.finish()?;
    let echoed = recv.read_exact_bytes(payload.len()).await?;
    ensure!(
        recv.read_chunk(1024).await?.is_none(),
        "echo longer than sent"
    );
    Ok(echoed)
}

#[cfg(unix)]
fn mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[test]
fn dev_ca_is_generated_once_then_reused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = ["ca.pem", "ca.key", "server.pem", "server.key"];
    let read_all = || -> Result<Vec<Vec<u8>>> {
        files
            .iter()
            .map(|f| std::fs::read(dir.path().join(f)).with_context(|| f.to_string()))
            .collect()
    };

    let (_, ca) = ServerIdentity::load_or_generate_dev(dir.path(), &[])?;
    assert_eq!(ca, dir.path().join("ca.pem"));
    let first = read_all()?;
    #[cfg(unix)]
    for key in ["ca.key", "server.key"] {
        assert_eq!(mode(&dir.path().join(key))?, 0o600, "{key}");
    }

    let (_, ca_again) = ServerIdentity::load_or_generate_dev(dir.path(), &[])?;
    assert_eq!(ca_again, ca);
    assert_eq!(read_all()?, first, "second start must reuse every file");

    // New names re-issue the server certificate from the same CA.
    ServerIdentity::load_or_generate_dev(dir.path(), &["broker-1.lan".to_owned()])?;
    let reissued = read_all()?;
    assert_eq!(reissued[..2], first[..2], "the CA must not change");
    assert_ne!(
        reissued[2], first[2],
        "the server certificate must be re-issued"
    );
    Ok(())
}

#[test]
fn pem_loading_reports_bad_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "")?;
    assert!(matches!(
        ClientTrust::from_ca_file(&empty),
        Err(quiver_transport::TlsError::NoCertificates(_))
    ));
    let missing = dir.path().join("missing.pem");
    assert!(matches!(
        ServerIdentity::from_pem_files(&missing, &missing),
        Err(quiver_transport::TlsError::Io { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn echoes_one_mib_over_ipv4_and_ipv6() -> Result<()> {
    bounded(async {
        let mut binds = vec!["127.0.0.1:0"];
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            binds.push("[::1]:0");
        } else {
            eprintln!("no ipv6 loopback: testing ipv4 only");
        }
        for bind in binds {
            let node = Node::echo(bind)?;
            let (client, conn) = node.connect(ALPN_CLIENT).await?;
            let payload = pattern(1024 * 1024, 7);
            let echoed = round_trip(&conn, &payload).await?;
            assert!(echoed == payload[..], "echo differs over {bind}");
            let stats = conn.stats();
            assert!(stats.sent_bytes > payload.len() as u64, "{stats}");
            eprintln!(
                "{bind}: server {:?}, client {:?}; {stats}",
                node.server.socket_buffers(),
                client.socket_buffers()
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn client_trusting_another_ca_fails_with_tls_error() -> Result<()> {
    bounded(async {
        let node = Node::echo("127.0.0.1:0")?;
        let other_dir = tempfile::tempdir()?;
        let (_, other_ca) = ServerIdentity::load_or_generate_dev(other_dir.path(), &[])?;
        let client = client(&other_ca, ALPN_CLIENT)?;
        match client.connect(&node.addr.to_string(), None).await {
            Err(TransportError::Tls(e)) => {
                eprintln!("as expected: {e}");
                Ok(())
            }
            Err(e) => bail!("expected a tls error, got {e}"),
            Ok(_) => bail!("connected to a server signed by an untrusted CA"),
        }
    })
    .await
}

#[tokio::test]
async fn wrong_alpn_fails_with_tls_error() -> Result<()> {
    bounded(async {
        let node = Node::start("127.0.0.1:0", ALPN_PEER, &TransportSettings::default())?;
        match node.connect(ALPN_CLIENT).await {
            Err(e) => match e.downcast_ref::<TransportError>() {
                Some(TransportError::Tls(e)) => {
                    eprintln!("as expected: {e}");
                    Ok(())
                }
                _ => bail!("expected a tls error, got {e}"),
            },
            Ok(_) => bail!("connected with a mismatched alpn"),
        }
    })
    .await
}

#[tokio::test]
async fn stream_reads_enforce_limits_and_ends() -> Result<()> {
    bounded(async {
        let node = Node::start("127.0.0.1:0", ALPN_CLIENT, &TransportSettings::default())?;
        let (_client, conn) = node.connect(ALPN_CLIENT).await?;
        let server_conn = node.server.accept().await.context("server closed")?;

        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&pattern(2000, 1)).await?;
        send.finish()?;
        let (_, mut recv) = server_conn.accept_bi().await?.context("no stream")?;
        match recv.read_to_end(1000).await {
            Err(TransportError::TooLong { limit_bytes: 1000 }) => {}
            other => bail!("expected TooLong, got {other:?}"),
        }

        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(b"short").await?;
        send.finish()?;
        let (_, mut recv) = server_conn.accept_bi().await?.context("no stream")?;
        match recv.read_exact_bytes(10).await {
            Err(TransportError::UnexpectedEnd) => Ok(()),
            other => bail!("expected UnexpectedEnd, got {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() -> Result<()> {
    bounded(async {
        let node = Node::echo("127.0.0.1:0")?;
        let (_client, conn) = node.connect(ALPN_CLIENT).await?;
        let mut streams = tokio::task::JoinSet::new();
        for i in 0..64u8 {
            let conn = conn.clone();
            streams.spawn(async move {
                let payload = pattern(32 * 1024 + usize::from(i), i);
                let echoed = round_trip(&conn, &payload).await?;
                ensure!(echoed == payload[..], "stream {i} echo differs");
                Ok(())
            });
        }
        while let Some(result) = streams.join_next().await {
            result??;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn server_shutdown_is_seen_by_clients() -> Result<()> {
    bounded(async {
        let node = Node::start("127.0.0.1:0", ALPN_CLIENT, &TransportSettings::default())?;
        let (_client, conn) = node.connect(ALPN_CLIENT).await?;
        let _server_conn = node.server.accept().await.context("server closed")?;

        node.server.shutdown(7, "node stopping").await;
        match conn.closed().await {
            TransportError::ClosedByPeer { code: 7, reason } => {
                assert_eq!(reason, "node stopping")
            }
            other => bail!("expected ClosedByPeer, got {other}"),
        }
        assert!(conn.open_bi().await.is_err());
        assert!(
            node.server.accept().await.is_none(),
            "accept after shutdown"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() -> Result<()> {
    bounded(async {
        let settings = TransportSettings {
            max_connections: 1,
            ..TransportSettings::default()
        };
        let node = Node::start("127.0.0.1:0", ALPN_CLIENT, &settings)?;
        let (_first_client, _first) = node.connect(ALPN_CLIENT).await?;
        match node.connect(ALPN_CLIENT).await {
            Err(e) => match e.downcast_ref::<TransportError>() {
                Some(TransportError::Refused) => Ok(()),
                _ => bail!("expected Refused, got {e}"),
            },
            Ok(_) => bail!("second connection accepted beyond max_connections 1"),
        }
    })
    .await
}

/// A peer endpoint with mutual TLS: nodes whose certificates share its CA get through; a
/// client without a certificate, or with one from another CA, never completes a round trip.
#[tokio::test]
async fn peer_endpoints_require_a_certificate_from_the_cluster_ca() -> Result<()> {
    bounded(async {
        let ca_dir = tempfile::tempdir()?;
        let node_dir = |n: &str| ca_dir.path().join(n);
        let (server_id, ca) =
            ServerIdentity::load_or_generate_dev_with_ca(&node_dir("a"), ca_dir.path(), &[])?;
        let trust = ClientTrust::from_ca_file(&ca)?;
        let server = Arc::new(Server::bind_peer(
            "127.0.0.1:0".parse()?,
            &server_id,
            &trust,
            &TransportSettings::default(),
        )?);
        let addr = server.local_addr()?.to_string();
        let accepting = Arc::clone(&server);
        tokio::spawn(async move {
            while let Some(conn) = accepting.accept().await {
                tokio::spawn(serve_echo(conn));
            }
        });

        // A second node of the same cluster: same CA directory, its own certificate.
        let (peer_id, peer_ca) =
            ServerIdentity::load_or_generate_dev_with_ca(&node_dir("b"), ca_dir.path(), &[])?;
        assert_eq!(peer_ca, ca, "one CA for the cluster");
        let peer = Client::new_peer(&trust, &peer_id, &TransportSettings::default())?;
        let conn = peer.connect(&addr, None).await?;
        assert_eq!(&round_trip(&conn, b"hello peer").await?[..], b"hello peer");

        // A plain client speaking the peer ALPN, with no certificate.
        let anonymous = Client::new(&trust, ALPN_PEER, &TransportSettings::default())?;
        let refused = match anonymous.connect(&addr, None).await {
            Err(_) => true,
            Ok(conn) => round_trip(&conn, b"let me in").await.is_err(),
        };
        ensure!(
            refused,
            "a client without a certificate reached the peer endpoint"
        );

        // A node of another cluster: its certificate is issued by another CA.
        let other = tempfile::tempdir()?;
        let (other_id, _) = ServerIdentity::load_or_generate_dev(other.path(), &[])?;
        let stranger = Client::new_peer(&trust, &other_id, &TransportSettings::default())?;
        let refused = match stranger.connect(&addr, None).await {
            Err(_) => true,
            Ok(conn) => round_trip(&conn, b"let me in").await.is_err(),
        };
        ensure!(
            refused,
            "a certificate of another CA reached the peer endpoint"
        );
        Ok(())
    })
    .await
}
